"""Verify mode: does the engine compute the actor's logprobs on the actor's own sequences?

After a weight sync the rollout engine and the trainer should hold the same weights; then the engine's
logprobs of a sequence (prompt + response, with its images) equal the actor's up to kernel noise (fp32 on
CPU: about 1e-6 on text, up to ~1e-3 with images because SGLang's vision code differs from transformers').
A gap of order 0.1-1 means a missed tensor, a wrong name mapping or a stale cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_vgpo.rollout.base import RolloutEngine, RolloutRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyReport:
    """Absolute logprob differences engine vs actor over all response tokens."""

    max_abs_gap: float
    mean_abs_gap: float
    per_sequence_max: tuple[float, ...]
    num_tokens: int


def verify_logprobs(
    engine: RolloutEngine,
    requests: Sequence[RolloutRequest],
    response_ids: Sequence[Sequence[int]],
    actor_logprobs: Sequence[torch.Tensor],
    *,
    temperature: float = 1.0,
) -> VerifyReport:
    """Score ``response_ids`` after ``requests`` with ``engine`` and compare with ``actor_logprobs``.

    Args:
        requests: the prompts (text or raw ids, with images), one per sequence.
        response_ids: the response tokens of each sequence.
        actor_logprobs: float tensors [R_i], the actor's ``log_softmax(logits / temperature)`` of them.
    """
    if not (len(requests) == len(response_ids) == len(actor_logprobs)):
        raise ValueError(
            f"lengths differ: {len(requests)} requests, {len(response_ids)} responses, "
            f"{len(actor_logprobs)} logprob tensors"
        )
    engine_logprobs = engine.score(requests, response_ids, temperature=temperature)
    per_sequence = []
    total, count = 0.0, 0
    for uid, ours, theirs in zip((r.uid for r in requests), engine_logprobs, actor_logprobs):
        theirs = theirs.detach().to(torch.float32).cpu().reshape(-1)
        if ours.shape != theirs.shape:
            raise ValueError(f"sequence {uid!r}: engine gave {tuple(ours.shape)} logprobs, actor {tuple(theirs.shape)}")
        gap = (ours - theirs).abs()
        per_sequence.append(float(gap.max()) if gap.numel() else 0.0)
        total += float(gap.sum())
        count += gap.numel()
    report = VerifyReport(
        max_abs_gap=max(per_sequence, default=0.0),
        mean_abs_gap=total / count if count else 0.0,
        per_sequence_max=tuple(per_sequence),
        num_tokens=count,
    )
    logger.info("verify: max |engine - actor| logprob gap %.3g over %d tokens", report.max_abs_gap, count)
    return report
