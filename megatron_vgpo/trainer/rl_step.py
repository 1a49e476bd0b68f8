"""The pieces of one RL step: rollouts with rewards and dynamic sampling (rank 0), the update (all ranks),
and weight sync back to the engine.

Which rank does what: the rollout engine and the reward grader live on global rank 0 (the engine driver);
:func:`collect_rollouts` runs there and its result is broadcast as plain Python lists. Every rank then
builds only its data-parallel shard of the :class:`RLBatch` (processing only its own prompts), and
:func:`update_policy` runs the actor's no-grad pass (old log-probs + VGPO focus cosines), the advantages
(groups by prompt uid, across DP ranks), the VGPO re-weighting and the optimizer steps.
:func:`sync_weights` streams every stage's weights to rank 0, which pushes them into the engine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vgpo.algo.dynamic_sampling import (
    DynamicSamplingBuffer,
    disagreement_fraction,
    dp_group_multiple,
    overlong_penalty,
)
from megatron_vgpo.algo.vgpo import apply_vgpo, focus_from_cosine
from megatron_vgpo.config.schema import TrainConfig
from megatron_vgpo.distributed import comm
from megatron_vgpo.distributed.group_stats import dp_outcome_advantages, dp_vgpo_factors
from megatron_vgpo.rollout.base import RolloutRequest, SamplingParams, cut_before_tokens

logger = logging.getLogger(__name__)

FOCUS_BINS = 10


UID_STRIDE = 1 << 32  # group ids: step * UID_STRIDE + the group's arrival index within the step


@dataclass
class Rollouts:
    """One step's kept trajectories (rank 0 builds it; broadcast to all ranks).

    ``prompt_index[i]``: index of trajectory i's prompt in the training dataset; ``uid[i]``: its group id,
    ``step * UID_STRIDE + k`` for the ``k``-th group sampled in the step (unique by construction);
    ``responses[i]``: sampled token ids; ``scores[i]``: the grader's raw score in {0, 1} (what dynamic
    sampling filters on); ``rewards[i]``: the score plus the overlong penalty (what the advantages use; equal
    to ``scores`` without shaping); ``truncated[i]``: the response hit ``rollout.max_new_tokens`` without an
    end token.
    """

    prompt_index: list[int] = field(default_factory=list)
    uid: list[int] = field(default_factory=list)
    responses: list[list[int]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.responses)


def data_parallel_size() -> int:
    """The data-parallel size from Megatron's parallel state (1 when it is not initialized)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return 1
    return ps.get_data_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def check_group_layout(cfg: TrainConfig, dp: int) -> None:
    """Refuse, before any step, a ``trainer.prompts_per_step`` too small to give every one of ``dp``
    data-parallel ranks whole trajectories (the kept groups are a multiple of ``dp / gcd(rollout.n, dp)``)."""
    multiple = dp_group_multiple(cfg.rollout.n, dp)
    if cfg.trainer.prompts_per_step < multiple:
        raise ValueError(f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} with rollout.n={cfg.rollout.n} "
                         f"cannot be split over {dp} data-parallel ranks: a step needs a multiple of {multiple} "
                         f"groups; use trainer.prompts_per_step >= {multiple}")


def collect_rollouts(engine: Any, dataset: Any, next_prompts: Callable[[], list[int]], grader: Any,
                     decode: Callable[[list[int]], str], cfg: TrainConfig, step: int,
                     vision_token_ids: Collection[int] = (), *, dp: int | None = None) -> Rollouts:
    """Rank 0: sample ``rollout.n`` responses for batches of prompts, grade them, shape, keep groups.

    A response that samples one of ``vision_token_ids`` (vision start/end/pad markers, which the model
    would read as a new image and then refuse the batch) is cut just before it (counted as
    ``rollout/cut_at_vision_token``, the fraction of samples cut) and graded as cut.

    One implementation for both modes, :class:`DynamicSamplingBuffer`: without dynamic sampling one batch of
    ``trainer.prompts_per_step`` prompts is kept as is; with it (DAPO) only groups whose mean RAW score lies
    strictly inside ``algorithm.accuracy_bounds`` are kept, and new batches are drawn until
    ``prompts_per_step`` groups are kept (truncated exactly) or ``algorithm.max_sampling_rounds`` rounds
    have run (``<= 0``: no limit); then ``algorithm.sampling_exhausted`` decides: ``train`` on the groups
    kept so far (possibly none: the loop then skips the update) or ``raise`` ``DynamicSamplingExhausted``.
    The kept groups are a multiple of ``dp / gcd(n, dp)`` (``dp``: Megatron's data-parallel size unless
    given), so every DP rank gets the same number of trajectories. Overlong shaping (when on) is added to
    the rewards after grading and does not change which groups are kept.
    """
    rc, alg, target = cfg.rollout, cfg.algorithm, cfg.trainer.prompts_per_step
    dp = data_parallel_size() if dp is None else dp
    check_group_layout(cfg, dp)
    params = SamplingParams(n=rc.n, temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens,
                            seed=cfg.seed + step)
    dynamic = alg.uses_dynamic_sampling
    buffer = DynamicSamplingBuffer(target, max_rounds=alg.max_sampling_rounds if dynamic else 1,
                                   low=alg.accuracy_bounds[0], high=alg.accuracy_bounds[1], filter_groups=dynamic,
                                   on_exhausted="raise" if dynamic and alg.sampling_exhausted == "raise" else "partial",
                                   group_multiple=dp_group_multiple(rc.n, dp))
    all_scores: list[float] = []
    all_lengths: list[int] = []
    all_truncated: list[bool] = []
    all_penalties: list[float] = []
    num_cut = 0
    stop_ids = frozenset(vision_token_ids)
    while not buffer.is_done:
        indices = next_prompts()
        inputs_of = getattr(dataset, "prompt_inputs", dataset.__getitem__)  # text + raw images, no processor
        samples = [inputs_of(i) for i in indices]
        requests = [RolloutRequest(uid=str(i), prompt_text=s.prompt_text, images=list(s.images))
                    for i, s in zip(indices, samples)]
        outputs = engine.generate(requests, params)
        num_cut += sum(cut_before_tokens(o, stop_ids) for o in outputs)
        texts = [decode(o.response_ids) for o in outputs]
        answers = [samples[k // rc.n].answer for k in range(len(outputs))]
        scores = torch.tensor(grader.score_batch(texts, answers), dtype=torch.float32)
        lengths = torch.tensor([len(o.response_ids) for o in outputs], dtype=torch.int64)
        truncated = [o.finish_reason == "length" and len(o.response_ids) >= rc.max_new_tokens for o in outputs]
        penalty = (overlong_penalty(lengths, rc.max_new_tokens, alg.overlong_buffer_len, alg.overlong_penalty_factor)
                   if alg.uses_overlong_shaping else torch.zeros(len(outputs)))
        all_scores += scores.tolist()
        all_lengths += lengths.tolist()
        all_truncated += truncated
        all_penalties += penalty.tolist()
        rows = {"prompt_index": [indices[k // rc.n] for k in range(len(outputs))],
                "responses": [list(o.response_ids) for o in outputs], "scores": scores,
                "rewards": scores + penalty, "truncated": truncated}
        buffer.add_round(rows, accuracy=scores, group_ids=torch.arange(len(indices)).repeat_interleave(rc.n))
    kept = buffer.result()
    group_index = kept["group_index"]
    if group_index.numel() and int(group_index.max()) >= UID_STRIDE:
        raise ValueError(f"more than {UID_STRIDE} groups sampled in one step")
    out = Rollouts(prompt_index=list(kept["prompt_index"]), uid=(step * UID_STRIDE + group_index).tolist(),
                   responses=list(kept["responses"]), rewards=kept["rewards"].tolist(),
                   scores=kept["scores"].tolist(), truncated=list(kept["truncated"]))
    scores_t = torch.tensor(all_scores)
    groups_t = torch.arange(len(all_scores)) // rc.n  # every round's batch holds whole groups, in order
    ds = buffer.metrics()
    out.metrics = {
        "rollout/reward_mean": float(scores_t.mean()),
        "rollout/response_length": sum(all_lengths) / len(all_lengths),
        "rollout/disagree_fraction": disagreement_fraction(scores_t, groups_t),
        "rollout/rounds": float(buffer.rounds),
        "rollout/kept_groups": float(buffer.num_groups),
        "rollout/groups_seen": ds["dynamic_sampling/groups_seen"],
        "rollout/filtered_groups": ds["dynamic_sampling/groups_filtered"],
        "rollout/dropped_groups": ds["dynamic_sampling/groups_dropped"],
        "rollout/exhausted": ds["dynamic_sampling/exhausted"],
        "rollout/cut_at_vision_token": num_cut / len(all_lengths),
        "rollout/overlong_fraction": sum(all_truncated) / len(all_truncated),
    }
    if alg.uses_overlong_shaping:
        out.metrics["rollout/overlong_penalty_mean"] = sum(all_penalties) / len(all_penalties)
    if cfg.logging.rollout_dump:
        _dump_rollouts(Path(cfg.run_dir) / "rollouts.jsonl", step, out)
    return out


def _dump_rollouts(path: Path, step: int, rollouts: Rollouts) -> None:
    """Append one JSON line: the step's kept groups (uid -> prompt index, scores, rewards, lengths, truncated)."""
    groups: dict[int, dict[str, Any]] = {}
    for i, uid in enumerate(rollouts.uid):
        g = groups.setdefault(uid, {"uid": uid, "prompt_index": rollouts.prompt_index[i], "scores": [],
                                    "rewards": [], "lengths": [], "truncated": []})
        g["scores"].append(rollouts.scores[i])
        g["rewards"].append(rollouts.rewards[i])
        g["lengths"].append(len(rollouts.responses[i]))
        g["truncated"].append(rollouts.truncated[i])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"step": step + 1, "groups": list(groups.values())}) + "\n")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (a no-op without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    comm.broadcast_object_list(box, src=src)
    return box[0]


def focus_curve(rho: torch.Tensor, mask: torch.Tensor, bins: int = FOCUS_BINS) -> dict[str, float]:
    """Mean focus score per tenth of the response (relative position t / L), as ``focus/bin_XX``."""
    mask = mask.bool()
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    position = torch.arange(mask.shape[1]).expand_as(mask) / lengths
    which = (position * bins).long().clamp(max=bins - 1)
    out = {}
    for b in range(bins):
        sel = mask & (which == b)
        if sel.any():
            out[f"focus/bin_{b:02d}"] = float(rho[sel].mean())
    return out


def update_policy(actor: Any, dataset: Any, rollouts: Rollouts, cfg: TrainConfig, *,
                  pad_token_id: int, image_token_id: int, dump_path: Path | None = None) -> dict[str, float]:
    """All ranks: build this DP rank's shard of the batch, old log-probs (+ focus, + the KL reference's),
    advantages (+ VGPO), optimizer steps. ``dataset[j]`` is the processed prompt of dataset index j; each rank
    processes only the prompts of its own shard, once per prompt. Returns metrics (same on all ranks except
    the VGPO diagnostics, which describe this rank's shard). With ``dump_path`` the tensors the update trains
    on are saved there first (:func:`dump_update_inputs`).

    The step takes ``trainer.mini_batches`` optimizer updates, or fewer when its trajectories do not split
    into that many equal mini-batches per DP rank (``actor/mini_batches`` logs the count taken; the kept
    groups always split over the DP ranks, see :func:`collect_rollouts`). With ``algorithm.overlong_filter``
    truncated responses get zero loss weight after the advantages are computed."""
    from megatron.core import parallel_state as ps

    from megatron_vgpo.actor.megatron_actor import LossConfig
    from megatron_vgpo.actor.rl_batch import build_local_rl_batch, dp_shard_indices

    alg, tc = cfg.algorithm, cfg.trainer
    started = time.perf_counter()
    dp, dp_group = ps.get_data_parallel_world_size(), ps.get_data_parallel_group()
    mini_batches = tc.mini_batches
    while len(rollouts) % (mini_batches * dp):
        mini_batches -= 1  # a short (dynamic-sampling) step: fewer, larger mini-batches
        if mini_batches == 0:
            raise ValueError(f"{len(rollouts)} trajectories cannot be split over {dp} data-parallel ranks")
    if mini_batches < tc.mini_batches:
        logger.info("step of %d trajectories: %d mini-batches instead of trainer.mini_batches=%d",
                    len(rollouts), mini_batches, tc.mini_batches)
    dp_rank = ps.get_data_parallel_rank()
    local = build_local_rl_batch(dataset.__getitem__, rollouts.prompt_index, rollouts.responses,
                                 dp_rank=dp_rank, dp_size=dp, mini_batches=mini_batches,
                                 pad_token_id=pad_token_id, image_token_id=image_token_id, uids=rollouts.uid,
                                 rewards=rollouts.rewards)
    if alg.overlong_filter:
        rows = dp_shard_indices(len(rollouts), dp_rank, dp, mini_batches)
        local = dataclasses.replace(local, truncated=torch.tensor([rollouts.truncated[i] for i in rows],
                                                                  dtype=torch.bool))
    use_vgpo = alg.name == "vgpo"
    lp = actor.compute_log_probs(local, temperature=cfg.rollout.temperature or 1.0, with_focus=use_vgpo,
                                 state_position=alg.state_position)
    local.old_log_probs = lp.log_probs
    local.ref_log_probs = lp.ref_log_probs
    mask = local.response_mask
    adv = dp_outcome_advantages(local.rewards, local.uids, group=dp_group, estimator=alg.estimator)
    metrics: dict[str, float] = {}
    if use_vgpo:
        rho = focus_from_cosine(lp.focus_cos, mask, alg.vgpo, lp.has_image)
        factors = dp_vgpo_factors(rho, mask, local.uids, alg.vgpo, group=dp_group, has_image=lp.has_image)
        local.advantages = apply_vgpo(adv, factors, mask)
        metrics.update({f"vgpo/{k}": v for k, v in factors.diagnostics.items()})
        metrics.update(focus_curve(rho, mask))
    else:
        local.advantages = adv[:, None] * mask.to(adv.dtype)
    if local.truncated is not None:  # DAPO overlong filtering: truncated responses leave the loss
        local.response_mask = mask & ~local.truncated[:, None]
    time_logprob = time.perf_counter() - started
    loss_cfg = LossConfig(clip_low=alg.clip_low, clip_high=alg.clip_high, dual_clip=alg.dual_clip, agg=alg.loss_agg,
                          temperature=cfg.rollout.temperature or 1.0, entropy_coef=alg.entropy_coef,
                          kl_coef=alg.kl_coef, kl_type=alg.kl_estimator)
    if dump_path is not None:
        dump_update_inputs(dump_path, local, lp, mini_batches=mini_batches)
    train = actor.train_step(local, mini_batches=mini_batches, loss_cfg=loss_cfg,
                             micro_batch_tokens=tc.micro_batch_tokens)
    metrics.update({f"actor/{k}": float(v) for k, v in train.items()})
    metrics["time/logprob"] = time_logprob
    metrics["time/actor"] = time.perf_counter() - started
    return metrics


def dump_update_inputs(path: Path, local: Any, lp: Any, *, mini_batches: int) -> None:
    """Save this rank's shard of what the update trains on (``trainer.dump_tensors``): ``uids`` /
    ``rewards`` [B_local], ``response_mask`` / ``advantages`` / ``old_log_probs`` [B_local, R] and, with VGPO,
    ``focus_cos`` [B_local, R] and ``has_image`` [B_local] (CPU tensors, one ``torch.save`` dict)."""
    fields = {"uids": local.uids, "rewards": local.rewards, "response_mask": local.response_mask,
              "advantages": local.advantages, "old_log_probs": local.old_log_probs, "focus_cos": lp.focus_cos,
              "has_image": lp.has_image}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: (v.detach().cpu().clone() if v is not None else None) for k, v in fields.items()}
               | {"mini_batches": mini_batches}, path)


def sync_weights(actor: Any, engine: Any, cfg: TrainConfig) -> float:
    """All ranks: stream the actor's weights to rank 0 and push them into ``engine`` (rank 0 only)."""
    from megatron_vgpo.actor.weight_export import iter_model_weights_to_rank

    started = time.perf_counter()
    weights = iter_model_weights_to_rank(actor.model, actor.hf_config, dst=0)
    if engine is not None:
        kwargs = {"transport": cfg.rollout.weight_sync} if hasattr(engine, "weight_sync") else {}
        engine.update_weights(weights, bucket_bytes=int(cfg.rollout.sync_bucket_mb * 2**20), **kwargs)
    else:
        for _ in weights:
            pass
    return time.perf_counter() - started
