"""MegatronActor resume: 2 steps + save + fresh actor + load + 2 steps == 4 uninterrupted steps, bit for bit.

One launch of 2 gloo ranks (TP1, DP2, distributed optimizer, cosine LR with warmup, so the Adam moments and
step, the LR scheduler position and the sharded optimizer state all matter). Each step recomputes the old
log-probs with the actor itself, then updates on that DP rank's shard of the 8-trajectory batch of
``test_actor``, with step-dependent advantages. Compared: per-step losses, LRs and grad norms, the final full
HF weights, the caller's extra state (data position), the step counters and the RNG streams (torch
default + Megatron tracker) right after save / load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_vgpo.distributed.multiprocess import run_on_ranks

STEPS = 4


def _config() -> Any:
    from megatron_vgpo.actor.megatron_actor import ActorConfig

    return ActorConfig(lr=1e-3, min_lr=1e-4, lr_schedule="cosine", lr_warmup_steps=1, lr_decay_steps=6,
                       use_distributed_optimizer=True, micro_batch_tokens=120, clip_grad=1.0)


def _one_step(actor: Any, batch: Any, step: int, dp_rank: int, dp: int) -> dict[str, float]:
    from megatron_vgpo.actor.rl_batch import shard_for_data_parallel

    old = actor.compute_log_probs(batch).log_probs
    gen = torch.Generator().manual_seed(100 + step)
    adv = torch.randn(batch.batch_size, 1, generator=gen) * batch.response_mask.float()
    noise = 0.2 * torch.randn(old.shape, generator=gen) * batch.response_mask.float()
    full = dataclasses.replace(batch, old_log_probs=old + noise, advantages=adv)
    return actor.train_step(shard_for_data_parallel(full, dp_rank, dp), mini_batches=1)


def _draw() -> torch.Tensor:
    """Numbers from the default torch generator and from Megatron's model-parallel RNG stream."""
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(2)
    return torch.cat([torch.rand(2), tracked])


def _resume_body(rank: int, world_size: int, hf_dir: str, root: str) -> dict[str, Any]:
    from test_actor import make_batch

    from megatron_vgpo.actor.megatron_actor import MegatronActor
    from megatron_vgpo.distributed.process_groups import init_model_parallel

    layout = init_model_parallel(tp=1, pp=1, seed=1234)
    batch = make_batch(hf_dir)
    out: dict[str, Any] = {}

    straight = MegatronActor(hf_dir, _config())
    out["straight"] = [_one_step(straight, batch, s, layout.dp_rank, layout.dp) for s in range(STEPS)]
    out["straight_weights"] = {n: t.clone() for n, t in straight.export_hf_weights()}
    del straight

    first = MegatronActor(hf_dir, _config())
    out["resumed"] = [_one_step(first, batch, s, layout.dp_rank, layout.dp) for s in range(2)]
    saved_at = first.save(root, extra_state={"data_position": 17, "epoch": 0})
    out["rng_after_save"] = _draw()
    del first

    second = MegatronActor(hf_dir, _config())
    out["extra_state"] = second.load(root)
    out["counters_after_load"] = (second.steps, second.skipped_steps)
    out["rng_after_load"] = _draw()
    out["resumed"] += [_one_step(second, batch, s, layout.dp_rank, layout.dp) for s in range(2, STEPS)]
    out["resumed_weights"] = {n: t.clone() for n, t in second.export_hf_weights()}
    out["saved_at"] = str(saved_at)
    return out


@pytest.mark.multirank
def test_resume_equals_uninterrupted(tiny_hf_dir: Path, tmp_path: Path):
    results = run_on_ranks(_resume_body, world_size=2, args=(str(tiny_hf_dir), str(tmp_path / "ckpt")),
                           megatron=True, env={"OMP_NUM_THREADS": "1"}, timeout_s=600)
    for rank, r in enumerate(results):
        assert r["extra_state"] == {"data_position": 17, "epoch": 0}
        assert r["counters_after_load"] == (2, 0)
        assert Path(r["saved_at"]).name == "iter_0000002"
        lrs = [m["lr"] for m in r["straight"]]
        assert lrs[0] == pytest.approx(1e-3) and lrs[1] < lrs[0] and lrs[3] < lrs[2]  # warmup 1, cosine decay
        for step, (a, b) in enumerate(zip(r["straight"], r["resumed"], strict=True)):
            for key in ("loss", "lr", "grad_norm", "pg_clipfrac_high", "pg_clipfrac_low"):
                assert a[key] == b[key], (rank, step, key, a[key], b[key])
        assert torch.equal(r["rng_after_save"], r["rng_after_load"]), rank  # RNG states restored
    weights_a, weights_b = results[0]["straight_weights"], results[0]["resumed_weights"]
    assert set(weights_a) == set(weights_b) and weights_a
    mismatched = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not mismatched, mismatched
    # the two resumed steps really trained: the losses differ from step to step
    assert len({m["loss"] for m in results[0]["straight"]}) == STEPS
