"""The KL reference of MegatronActor at TP2+SP, PP2 and TP1 (DP2), in ONE launch of 2 gloo ranks.

For each layout a fresh actor with ``reference_hf_dir`` = its own starting folder:

* its first ``compute_log_probs`` returns ``ref_log_probs`` bit-identical to its ``log_probs`` (same
  weights, same micro-batches, same pass);
* after one ``train_step`` with ``kl_coef > 0`` the policy's log-probs move while ``ref_log_probs`` still
  equal, bit for bit, those of the freshly loaded model (the first pass);
* a second ``train_step`` reports ``kl_ref`` equal to a float64 restatement of the k3 estimator's token
  mean over the (global) mini-batch, the same on every rank, and its loss is ``pg_loss + kl_coef * kl_ref``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from test_actor import make_batch, with_training_inputs

from megatron_vgpo.distributed.multiprocess import run_on_ranks

LAYOUTS = [("tp2_sp", 2, 1, True), ("pp2", 1, 2, False), ("tp1", 1, 1, False)]
KL_COEF = 0.1


def _body(rank: int, world_size: int, hf_dir: str) -> dict[str, Any]:
    from megatron_vgpo.actor.megatron_actor import ActorConfig, LossConfig, MegatronActor
    from megatron_vgpo.actor.rl_batch import shard_for_data_parallel
    from megatron_vgpo.distributed.process_groups import init_model_parallel

    batch = make_batch(hf_dir)
    loss_cfg = LossConfig(kl_coef=KL_COEF, kl_type="k3")
    out: dict[str, Any] = {}
    for name, tp, pp, sp in LAYOUTS:
        layout = init_model_parallel(tp=tp, pp=pp, seed=1234)
        cfg = ActorConfig(sequence_parallel=sp, lr=1e-2, micro_batch_tokens=100, logprob_micro_batch_tokens=150,
                          adam_eps=1e-2, reference_hf_dir=hf_dir)
        actor = MegatronActor(hf_dir, cfg)
        first = actor.compute_log_probs(batch)
        train = dataclasses.replace(with_training_inputs(batch, first.log_probs), ref_log_probs=first.ref_log_probs)
        m1 = actor.train_step(shard_for_data_parallel(train, layout.dp_rank, layout.dp), loss_cfg=loss_cfg)
        second = actor.compute_log_probs(batch)
        train2 = dataclasses.replace(train, old_log_probs=second.log_probs, ref_log_probs=second.ref_log_probs)
        m2 = actor.train_step(shard_for_data_parallel(train2, layout.dp_rank, layout.dp), loss_cfg=loss_cfg)
        out[name] = {"first": first, "second": second, "m1": m1, "m2": m2, "dp": layout.dp,
                     "reference_grads": [p.requires_grad for p in actor.reference.parameters()],
                     "reference_training": actor.reference.training}
    return out


def _k3_mean(log_probs: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    lp, rf = log_probs.double(), ref.double()
    k3 = (torch.exp(rf - lp) - (rf - lp) - 1.0).clamp(-10, 10)
    return float((k3 * mask).sum() / mask.sum())


@pytest.mark.multirank
def test_reference_log_probs_and_kl_at_every_layout(tiny_hf_dir: Path):
    hf_dir = str(tiny_hf_dir)
    results = run_on_ranks(_body, world_size=2, args=(hf_dir,), megatron=True, env={"OMP_NUM_THREADS": "1"},
                           timeout_s=900)
    mask = make_batch(hf_dir).response_mask.double()
    for name, *_ in LAYOUTS:
        for r in results:
            res = r[name]
            first, second = res["first"], res["second"]
            assert not any(res["reference_grads"]) and not res["reference_training"], name
            assert torch.equal(first.ref_log_probs, first.log_probs), name  # fresh actor == its reference
            assert torch.equal(second.ref_log_probs, first.log_probs), name  # reference frozen at the start
            moved = float(((second.log_probs - first.log_probs).abs() * mask).max())
            assert moved > 1e-3, (name, moved)  # the policy itself moved
            m1, m2 = res["m1"], res["m2"]
            assert m1["steps"] == 1 and m2["steps"] == 1, name
            assert m1["kl_ref"] == pytest.approx(0.0, abs=1e-9), name  # policy == reference before the update
            expected = _k3_mean(second.log_probs, second.ref_log_probs, mask)
            assert expected > 1e-6, name
            assert m2["kl_ref"] == pytest.approx(expected, rel=1e-3), (name, m2["kl_ref"], expected)
            assert m2["loss"] == pytest.approx(m2["pg_loss"] + KL_COEF * m2["kl_ref"], rel=1e-5), name
            assert m2["kl_ref"] == results[0][name]["m2"]["kl_ref"], name  # same on every rank
        # the same log-probs at every layout (fp32 reduction order only)
        diff = float((results[0][name]["second"].ref_log_probs - results[0]["tp1"]["second"].ref_log_probs).abs().max())
        assert diff < 1e-4, (name, diff)
    assert results[0]["tp1"]["dp"] == 2
