"""Verified weight sync in the loop: after a sync, the engine and the actor score one fixed probe.

The probe is a held-out prompt (with its image) and a fixed response. After every
``rollout.verify_sync_every``-th sync, rank 0's engine scores it (``RolloutEngine.score``) and every rank's
actor scores it in a no-grad pass (``MegatronActor.compute_log_probs``, collective). Metrics (same on every
rank):

* ``sync/probe_max_abs_diff``: max |engine - actor| log-prob over the probe's tokens; above
  ``rollout.verify_sync_tolerance`` the run stops with :class:`WeightSyncMismatch` (the engine does not
  serve the weights being trained);
* ``sync/probe_change_from_start``: max |actor now - actor at the first check|: > 0 once an update has
  changed the policy, so a loop that never pushes new weights cannot pass the first metric.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


class WeightSyncMismatch(RuntimeError):
    """The engine's log-probs of the probe differ from the actor's by more than the tolerance."""


class SyncProbe:
    """One fixed (prompt, response) pair scored by engine and actor (see the module docstring).

    ``sample``: a processed prompt (``data.PromptSample``) that every rank holds; ``response_ids``: the
    fixed response token ids; ``tolerance``: the largest accepted engine-actor gap.
    """

    def __init__(self, sample: Any, response_ids: list[int], *, tolerance: float, pad_token_id: int,
                 image_token_id: int, seq_multiple: int = 1) -> None:
        from megatron_vgpo.actor.rl_batch import build_rl_batch
        from megatron_vgpo.rollout.base import RolloutRequest

        if not response_ids:
            raise ValueError("the sync probe needs a non-empty response")
        self.request = RolloutRequest(uid="sync-probe", prompt_text=sample.prompt_text, images=list(sample.images))
        self.response_ids = list(response_ids)
        self.tolerance = tolerance
        self.batch = build_rl_batch([sample], [self.response_ids], pad_token_id=pad_token_id,
                                    image_token_id=image_token_id, uids=[0], rewards=[0.0],
                                    seq_multiple=seq_multiple)
        self.start: torch.Tensor | None = None

    def check(self, actor: Any, engine: Any) -> dict[str, float]:
        """Collective over every rank (``engine`` is None except on rank 0); returns the two metrics or
        raises :class:`WeightSyncMismatch`."""
        from megatron_vgpo.trainer.rl_step import broadcast_object

        n = len(self.response_ids)
        ours = actor.compute_log_probs(self.batch, temperature=1.0).log_probs[0, :n].double()
        theirs = None
        if engine is not None:
            theirs = engine.score([self.request], [self.response_ids], temperature=1.0)[0].double()
        gap = broadcast_object(float((theirs - ours).abs().max()) if theirs is not None else None)
        if self.start is None:
            self.start = ours.clone()
        change = float((ours - self.start).abs().max())
        if gap > self.tolerance:
            raise WeightSyncMismatch(
                f"after the weight sync the engine's log-probs of the probe differ from the actor's by {gap:.3e} "
                f"(> rollout.verify_sync_tolerance={self.tolerance:g}): the engine is not serving the trained "
                "weights (check rollout.weight_sync and the engine's logs)")
        return {"sync/probe_max_abs_diff": gap, "sync/probe_change_from_start": change}
