"""Supervised warm start through the Megatron actor, so a random or weak model learns the answer format.

The target of a prompt is the gold answer in ``\\boxed{}`` followed by the end token. The loss is the policy
loss with advantage 1 on every target token and ``old_log_probs`` equal to the current log-probs (computed in
the no-grad pass just before): at ratio 1 its gradient is exactly the gradient of the token-mean negative
log-likelihood, so SFT reuses the RL update path (TP/SP/PP, DDP, distributed optimizer, grad clipping)
unchanged. The reported ``sft/nll`` is the token-mean NLL from the
no-grad pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_vgpo.config.schema import TrainConfig

logger = logging.getLogger(__name__)


def sft_target(answer: str) -> str:
    """The supervised response for a gold ``answer``: just the boxed answer, so the token-mean loss is not
    diluted by a reasoning stub around the one token that matters; RL then learns whatever text the reward
    allows around the box."""
    return f"\\boxed{{{answer}}}"


def sft_step(actor: Any, prompts: Sequence[Any], answers: Sequence[str], tokenizer: Any, cfg: TrainConfig, *,
             pad_token_id: int, image_token_id: int, eos_token_id: int) -> dict[str, float]:
    """One supervised optimizer step on (prompt, gold answer) pairs; collective over all ranks (each rank
    passes the same global batch and keeps its data-parallel shard)."""
    from megatron.core import parallel_state as ps

    from megatron_vgpo.actor.megatron_actor import LossConfig
    from megatron_vgpo.actor.rl_batch import build_rl_batch, shard_for_data_parallel

    targets = [tokenizer(sft_target(a), add_special_tokens=False)["input_ids"] + [eos_token_id] for a in answers]
    batch = build_rl_batch(prompts, targets, pad_token_id=pad_token_id, image_token_id=image_token_id,
                           seq_multiple=cfg.parallel.tp if cfg.parallel.sp else 1)
    dp = ps.get_data_parallel_world_size()
    if batch.batch_size % dp:
        raise ValueError(f"sft.batch_size ({batch.batch_size}) must be divisible by the {dp} data-parallel ranks")
    local = shard_for_data_parallel(batch, ps.get_data_parallel_rank(), dp)
    lp = actor.compute_log_probs(local)
    mask = local.response_mask
    local.old_log_probs = lp.log_probs
    local.advantages = mask.to(torch.float32)
    metrics = actor.train_step(local, loss_cfg=LossConfig(dual_clip=None),
                               micro_batch_tokens=cfg.trainer.micro_batch_tokens)
    nll = -(lp.log_probs * mask).sum() / mask.sum().clamp(min=1)
    return {"sft/nll": float(nll), "sft/grad_norm": float(metrics["grad_norm"]), "sft/lr": float(metrics["lr"])}


def run_sft(actor: Any, dataset: Any, next_prompts: Callable[[], list[int]],
            evaluate: Callable[[], dict[str, float]],
            tokenizer: Any, cfg: TrainConfig, log: Callable[[int, dict[str, float]], None], *,
            pad_token_id: int, image_token_id: int, eos_token_id: int) -> dict[str, float]:
    """Warm-start loop: ``sft.max_steps`` steps, greedy validation every ``sft.eval_every`` steps (via
    ``evaluate``, collective, returns ``val/accuracy`` and ``val/boxed_fraction`` on every rank); stops once
    the accuracy reaches ``sft.target_accuracy`` or the fraction of boxed answers reaches
    ``sft.target_boxed_fraction``. ``next_prompts`` gives the same indices on every rank."""
    from tqdm.auto import tqdm

    sc = cfg.sft
    accuracy = boxed = 0.0
    step = 0
    bar = tqdm(total=sc.max_steps, desc="sft", unit="step", disable=not _is_rank0())
    for step in range(1, sc.max_steps + 1):
        indices = next_prompts()
        samples = [dataset[i] for i in indices]
        metrics = sft_step(actor, samples, [s.answer for s in samples], tokenizer, cfg, pad_token_id=pad_token_id,
                           image_token_id=image_token_id, eos_token_id=eos_token_id)
        bar.update(1)
        bar.set_postfix(nll=f"{metrics['sft/nll']:.3f}", acc=f"{accuracy:.2f}")
        if step % sc.eval_every == 0 or step == sc.max_steps:
            result = evaluate()
            accuracy, boxed = result["val/accuracy"], result["val/boxed_fraction"]
            metrics.update({"sft/accuracy": accuracy, "sft/boxed_fraction": boxed})
            logger.info("sft step %d: nll %.3f, greedy accuracy %.3f, boxed answers %.3f", step,
                        metrics["sft/nll"], accuracy, boxed)
        log(step, metrics)
        format_reached = sc.target_boxed_fraction is not None and boxed >= sc.target_boxed_fraction
        if "sft/accuracy" in metrics and (accuracy >= sc.target_accuracy or format_reached):
            break
    bar.close()
    return {"sft_steps": step, "sft_accuracy": accuracy, "sft_boxed_fraction": boxed}


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
