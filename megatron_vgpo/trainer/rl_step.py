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

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vgpo.algo.dynamic_sampling import disagreement_fraction, group_filter_mask
from megatron_vgpo.algo.vgpo import apply_vgpo, focus_from_cosine
from megatron_vgpo.config.schema import TrainConfig
from megatron_vgpo.distributed import comm
from megatron_vgpo.distributed.group_stats import dp_outcome_advantages, dp_vgpo_factors
from megatron_vgpo.rollout.base import RolloutRequest, SamplingParams, cut_before_tokens

logger = logging.getLogger(__name__)

FOCUS_BINS = 10


@dataclass
class Rollouts:
    """One step's kept trajectories (rank 0 builds it; broadcast to all ranks).

    ``prompt_index[i]``: index of trajectory i's prompt in the training dataset; ``uid[i]``: its group id
    (unique per prompt draw); ``responses[i]``: sampled token ids; ``rewards[i]`` in {0, 1}.
    """

    prompt_index: list[int] = field(default_factory=list)
    uid: list[int] = field(default_factory=list)
    responses: list[list[int]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.responses)


def collect_rollouts(engine: Any, dataset: Any, next_prompts: Callable[[], list[int]], grader: Any,
                     decode: Callable[[list[int]], str], cfg: TrainConfig, step: int,
                     vision_token_ids: Collection[int] = ()) -> Rollouts:
    """Rank 0: sample ``rollout.n`` responses for batches of prompts, grade them, keep groups.

    A response that samples one of ``vision_token_ids`` (vision start/end/pad markers, which the model
    would read as a new image and then refuse the batch) is cut just before it (counted as
    ``rollout/cut_at_vision_token``, the fraction of samples cut) and graded as cut.

    Without dynamic sampling one batch of ``trainer.prompts_per_step`` prompts is used as is. With it (DAPO),
    only groups whose mean reward lies strictly inside ``algorithm.accuracy_bounds`` are kept, and new
    batches are drawn until ``prompts_per_step`` groups are kept (truncated exactly) or
    ``algorithm.max_sampling_rounds`` rounds have run (then the step trains on what was kept; ``<= 0`` means
    no limit, as in DAPO, and as ``DynamicSamplingBuffer`` reads it).
    """
    rc, alg, target = cfg.rollout, cfg.algorithm, cfg.trainer.prompts_per_step
    params = SamplingParams(n=rc.n, temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens,
                            seed=cfg.seed + step)
    out = Rollouts()
    all_rewards: list[float] = []
    all_lengths: list[int] = []
    all_groups: list[int] = []
    rounds = 0
    kept_groups = 0
    num_cut = 0
    stop_ids = frozenset(vision_token_ids)
    while kept_groups < target:
        rounds += 1
        indices = next_prompts()
        inputs_of = getattr(dataset, "prompt_inputs", dataset.__getitem__)  # text + raw images, no processor
        samples = [inputs_of(i) for i in indices]
        requests = [RolloutRequest(uid=str(i), prompt_text=s.prompt_text, images=list(s.images))
                    for i, s in zip(indices, samples)]
        outputs = engine.generate(requests, params)
        num_cut += sum(cut_before_tokens(o, stop_ids) for o in outputs)
        texts = [decode(o.response_ids) for o in outputs]
        answers = [samples[k // rc.n].answer for k in range(len(outputs))]
        rewards = torch.tensor(grader.score_batch(texts, answers), dtype=torch.float32)
        groups = torch.arange(len(indices)).repeat_interleave(rc.n)
        all_rewards += rewards.tolist()
        all_lengths += [len(o.response_ids) for o in outputs]
        all_groups += (groups + 1000 * rounds).tolist()
        keep = (group_filter_mask(rewards, groups, *alg.accuracy_bounds) if alg.uses_dynamic_sampling
                else torch.ones_like(rewards, dtype=torch.bool))
        for g in range(len(indices)):
            if kept_groups >= target or not bool(keep[g * rc.n]):
                continue
            base = (step * 1_000_000) + rounds * 10_000 + g
            for k in range(g * rc.n, (g + 1) * rc.n):
                out.prompt_index.append(indices[g])
                out.uid.append(base)
                out.responses.append(list(outputs[k].response_ids))
                out.rewards.append(float(rewards[k]))
            kept_groups += 1
        if not alg.uses_dynamic_sampling or 0 < alg.max_sampling_rounds <= rounds:
            break
    rewards_t = torch.tensor(all_rewards)
    out.metrics = {
        "rollout/reward_mean": float(rewards_t.mean()),
        "rollout/response_length": sum(all_lengths) / len(all_lengths),
        "rollout/disagree_fraction": disagreement_fraction(rewards_t, torch.tensor(all_groups)),
        "rollout/rounds": float(rounds),
        "rollout/kept_groups": float(kept_groups),
        "rollout/cut_at_vision_token": num_cut / len(all_lengths),
    }
    return out


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
    """All ranks: build this DP rank's shard of the batch, old log-probs (+ focus), advantages (+ VGPO),
    optimizer steps. ``dataset[j]`` is the processed prompt of dataset index j; each rank processes only the
    prompts of its own shard, once per prompt. Returns metrics (same on all ranks except the VGPO
    diagnostics, which describe this rank's shard). With ``dump_path`` the tensors the update trains on are
    saved there first (:func:`dump_update_inputs`)."""
    from megatron.core import parallel_state as ps

    from megatron_vgpo.actor.megatron_actor import LossConfig
    from megatron_vgpo.actor.rl_batch import build_local_rl_batch

    alg, tc = cfg.algorithm, cfg.trainer
    started = time.perf_counter()
    dp, dp_group = ps.get_data_parallel_world_size(), ps.get_data_parallel_group()
    mini_batches = tc.mini_batches
    while len(rollouts) % (mini_batches * dp):
        mini_batches -= 1  # a short (dynamic-sampling) step: fewer, larger mini-batches
        if mini_batches == 0:
            raise ValueError(f"{len(rollouts)} trajectories cannot be split over {dp} data-parallel ranks")
    local = build_local_rl_batch(dataset.__getitem__, rollouts.prompt_index, rollouts.responses,
                                 dp_rank=ps.get_data_parallel_rank(), dp_size=dp, mini_batches=mini_batches,
                                 pad_token_id=pad_token_id, image_token_id=image_token_id, uids=rollouts.uid,
                                 rewards=rollouts.rewards)
    use_vgpo = alg.name == "vgpo"
    lp = actor.compute_log_probs(local, temperature=cfg.rollout.temperature or 1.0, with_focus=use_vgpo,
                                 state_position=alg.state_position)
    local.old_log_probs = lp.log_probs
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
    time_logprob = time.perf_counter() - started
    loss_cfg = LossConfig(clip_low=alg.clip_low, clip_high=alg.clip_high, dual_clip=alg.dual_clip, agg=alg.loss_agg,
                          temperature=cfg.rollout.temperature or 1.0, entropy_coef=alg.entropy_coef)
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
