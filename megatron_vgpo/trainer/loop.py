"""The RL loop: rollout -> reward -> dynamic sampling -> old log-probs + focus -> advantages (+ VGPO) ->
updates -> weight sync, with periodic validation and checkpoints, resuming from the latest checkpoint.

Collective over every rank of the job (Megatron's parallel state initialized); the rollout engine and the
grader exist on global rank 0 only (``engine``/``grader`` are None elsewhere).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm.auto import tqdm

from megatron_vgpo.config.schema import TrainConfig
from megatron_vgpo.trainer.rl_step import broadcast_object, collect_rollouts, sync_weights, update_policy

logger = logging.getLogger(__name__)


def rl_loop(cfg: TrainConfig, actor: Any, engine: Any, grader: Any, train_ds: Any, sampler: Any,
            validate: Callable[[], dict[str, float]], log: Callable[[int, dict[str, float]], None], *,
            decode: Callable[[list[int]], str], pad_token_id: int, image_token_id: int,
            vision_token_ids: tuple[int, ...] = (), sync_probe: Any = None) -> dict[str, Any]:
    """Run ``trainer.steps`` RL steps (continuing after a resumed checkpoint); returns counters.

    Checkpoints are written every ``trainer.save_every`` steps once the actor has taken an optimizer step
    (before that there is nothing to resume but the starting weights). Sampled responses are cut before
    any of ``vision_token_ids`` (see :func:`collect_rollouts`). With ``sync_probe``
    (:class:`~megatron_vgpo.trainer.sync_probe.SyncProbe`) every ``rollout.verify_sync_every``-th sync (and
    the first one) is verified by log-probs."""
    tc, rank0 = cfg.trainer, dist.get_rank() == 0
    ckpt_root = Path(cfg.run_dir) / "checkpoints"
    start = 0
    if tc.resume and (ckpt_root / "latest").is_file():
        extra = actor.load(ckpt_root) or {}
        start = int(extra.get("step", 0))
        if rank0 and extra.get("sampler") is not None:
            sampler.load_state_dict(extra["sampler"])
        logger.info("resumed from %s at step %d", ckpt_root, start)
    sync_weights(actor, engine, cfg)  # the engine starts from the HF folder; make it equal the actor
    every = cfg.rollout.verify_sync_every if sync_probe is not None else 0
    if every:
        logger.info("weight sync verified by a probe: %s", sync_probe.check(actor, engine))
    bar = tqdm(total=tc.steps, initial=start, desc="rl", unit="step", disable=not rank0)
    for step in range(start, tc.steps):
        began = time.perf_counter()
        rollouts = (collect_rollouts(engine, train_ds, sampler.next_batch, grader, decode, cfg, step,
                                     vision_token_ids)
                    if rank0 else None)
        rollouts = broadcast_object(rollouts)
        time_rollout = time.perf_counter() - began
        metrics = dict(rollouts.metrics)
        if len(rollouts) == 0:
            logger.warning("step %d: no group kept by dynamic sampling; no update this step", step)
        else:
            dump = (Path(cfg.run_dir) / "dump" / f"step_{step + 1:06d}_rank_{dist.get_rank()}.pt"
                    if tc.dump_tensors else None)
            metrics.update(update_policy(actor, train_ds, rollouts, cfg, pad_token_id=pad_token_id,
                                         image_token_id=image_token_id, dump_path=dump))
            metrics["time/sync"] = sync_weights(actor, engine, cfg)
            if every and (step + 1) % every == 0:
                metrics.update(sync_probe.check(actor, engine))
        metrics["time/rollout"] = time_rollout
        metrics["time/step"] = time.perf_counter() - began
        tokens = sum(len(r) for r in rollouts.responses)
        metrics["perf/tokens_per_s"] = tokens / max(metrics["time/step"], 1e-9)
        done = step + 1
        if tc.val_every and (done % tc.val_every == 0 or done == tc.steps):
            metrics.update(validate())
        log(done, metrics)
        if rank0:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.2f}",
                            val=f"{metrics.get('val/accuracy', float('nan')):.2f}")
        if tc.save_every and (done % tc.save_every == 0 or done == tc.steps) and actor.steps > 0:
            extra = broadcast_object({"step": done, "sampler": sampler.state_dict() if rank0 else None})
            actor.save(ckpt_root, extra_state=extra, overwrite=True)
    bar.close()
    return {"steps": tc.steps, "resumed_from_step": start}
