"""MegatronActor in bf16 (Megatron mixed precision) and with activation recompute (tiny preset, gloo).

ONE launch of 2 ranks, on the 8-trajectory batch of ``test_actor``:

* bf16 at TP1 (DP2, distributed optimizer) and TP2+SP (DP1, plain optimizer): every parameter (vision tower
  included) is bf16, the gradient buffers, the optimizer's main params and Adam states are fp32;
  ``compute_log_probs`` is compared with transformers' model loaded in bf16 (log-softmax in float64 of its
  bf16 logits). Tolerance 2e-2, bf16-sized: two bf16 implementations (8 significant bits, relative rounding
  2^-8 = 4e-3 per op, accumulated over the layers and carried into each log-softmax by the logits' absolute
  error) differ by 3e-3 here (measured, both layouts), where the fp32 tests use 1e-4. The dtype checks
  are what fail if the actor silently ran in fp32. Then 4 optimizer steps: weights move, stay finite and
  bf16; a save -> load into a fresh actor restores the fp32 main params exactly, and one more step on each
  gives bit-identical weights (exact resume). At TP2+SP the trained bf16 weights are pushed into rank 0's
  bf16 transformers engine (the loop's per-step sync path) and land there bit for bit.
* fp32 at TP2+SP: one training step with ``recompute`` ``none``, ``selective`` and ``full`` -- losses and
  every parameter's reduced gradient (DDP ``main_grad``) must agree to 1e-6 (measured: identical).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_vgpo.distributed.multiprocess import run_on_ranks

BF16_LOGPROB_TOLERANCE = 2e-2
LR = 1e-3


def _main_params(actor: Any) -> list[torch.Tensor]:
    """The optimizer's main params (fp32 copies of bf16 weights), this rank's share, in order."""
    opt = actor.optimizer
    inner = getattr(opt, "chained_optimizers", [opt])
    return [p.detach().clone() for o in inner for g in o.optimizer.param_groups for p in g["params"]]


def _adam_state_dtypes(actor: Any) -> set[torch.dtype]:
    opt = actor.optimizer
    inner = getattr(opt, "chained_optimizers", [opt])
    return {v.dtype for o in inner for s in o.optimizer.state.values() for k, v in s.items()
            if torch.is_tensor(v) and k != "step"}


def _precision_body(rank: int, world_size: int, hf_dir: str, root: str) -> dict[str, Any]:
    from test_actor import make_batch, with_training_inputs

    from megatron_vgpo.actor.megatron_actor import ActorConfig, MegatronActor
    from megatron_vgpo.actor.rl_batch import shard_for_data_parallel
    from megatron_vgpo.actor.weight_export import iter_model_weights_to_rank
    from megatron_vgpo.distributed.process_groups import init_model_parallel

    batch = make_batch(hf_dir)
    out: dict[str, Any] = {}
    for name, tp, sp, dist_opt in (("tp1", 1, False, True), ("tp2_sp", 2, True, False)):
        layout = init_model_parallel(tp=tp, pp=1, seed=1234)
        cfg = ActorConfig(params_dtype=torch.bfloat16, sequence_parallel=sp, use_distributed_optimizer=dist_opt,
                          lr=LR, micro_batch_tokens=100, adam_eps=1e-6)
        actor = MegatronActor(hf_dir, cfg)
        r: dict[str, Any] = {"param_dtypes": {p.dtype for p in actor.module.parameters()},
                             "vision_dtypes": {p.dtype for p in actor.module.vision_model.parameters()}}
        res = actor.compute_log_probs(batch, with_focus=True)
        r["log_probs"], r["focus_cos"] = res.log_probs, res.focus_cos
        train = with_training_inputs(batch, res.log_probs)
        local = shard_for_data_parallel(train, layout.dp_rank, layout.dp, mini_batches=2)
        r["metrics"] = [actor.train_step(local, mini_batches=2) for _ in range(2)]  # 4 optimizer steps
        r["grad_dtypes"] = {p.main_grad.dtype for p in actor.module.parameters()}
        r["param_dtypes_after"] = {p.dtype for p in actor.module.parameters()}
        r["main_dtypes"] = {p.dtype for p in _main_params(actor)}
        r["adam_dtypes"] = _adam_state_dtypes(actor)
        r["weights"] = {n: t.clone() for n, t in actor.export_hf_weights()}
        actor.save(Path(root) / name)
        main_saved = _main_params(actor)
        fresh = MegatronActor(hf_dir, cfg)
        fresh.load(Path(root) / name)
        r["main_equal_after_load"] = all(torch.equal(a, b) for a, b in zip(main_saved, _main_params(fresh),
                                                                           strict=True))
        one_more = shard_for_data_parallel(train, layout.dp_rank, layout.dp, mini_batches=1)
        actor.train_step(one_more, mini_batches=1)
        fresh.train_step(one_more, mini_batches=1)
        a_w = dict(actor.export_hf_weights())
        r["resume_mismatch"] = [k for k, v in fresh.export_hf_weights() if not torch.equal(v, a_w[k])]
        if name == "tp2_sp":  # the loop's weight sync: bf16 actor -> bf16 transformers engine on rank 0
            from megatron_vgpo.rollout.hf_backend import HFRolloutEngine

            engine = HFRolloutEngine(hf_dir, dtype=torch.bfloat16) if rank == 0 else None
            pushed = list(iter_model_weights_to_rank(actor.model, actor.hf_config, dst=0))
            if engine is not None:
                engine.update_weights(iter(pushed))
                held = {n: t for n, t in engine.model.state_dict().items()}
                r["engine_dtypes"] = {t.dtype for t in held.values() if t.is_floating_point()}
                r["engine_sync"] = _engine_matches(engine, pushed)
        out[name] = r
        del actor, fresh

    # activation recompute, fp32, TP2 + SP: same loss and gradients
    layout = init_model_parallel(tp=2, pp=1, seed=1234)
    res = None
    for mode in ("none", "selective", "full"):
        actor = MegatronActor(hf_dir, ActorConfig(sequence_parallel=True, recompute=mode, lr=LR,
                                                  micro_batch_tokens=100))
        if res is None:
            res = actor.compute_log_probs(batch)
        train = with_training_inputs(batch, res.log_probs)
        metrics = actor.train_step(train, mini_batches=1)
        grads = {n: p.main_grad.detach().clone() for n, p in actor.module.named_parameters()}
        out[f"recompute_{mode}"] = {"metrics": metrics, "grads": grads,
                                    "granularity": actor.module.config.recompute_granularity}
        del actor
    return out


def _engine_matches(engine: Any, pushed: list[tuple[str, torch.Tensor]]) -> bool:
    """Every pushed tensor equals (bit for bit, bf16) the engine model's tensor of that checkpoint name."""
    from megatron_vgpo.rollout.hf_backend import checkpoint_name_to_module_name

    by_name = engine._tensors_by_name
    for name, tensor in pushed:
        target = by_name[checkpoint_name_to_module_name(name, by_name)]
        if target.dtype != torch.bfloat16 or not torch.equal(target, tensor.to(target.dtype)):
            return False
    return bool(pushed)


def _hf_bf16_log_probs(hf_dir: str, batch: Any) -> torch.Tensor:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(**{k: (v.to(torch.bfloat16) if k == "pixel_values" else v)
                          for k, v in batch.model_inputs().items()}).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    lp = torch.zeros(batch.batch_size, batch.responses.shape[1], dtype=torch.float64)
    for i in range(batch.batch_size):
        for t in range(int(batch.response_length[i])):
            p = int(batch.response_start[i]) + t
            lp[i, t] = logp[i, p - 1, batch.input_ids[i, p]]
    return lp


@pytest.mark.multirank
def test_bf16_actor_and_recompute(tiny_hf_dir: Path, tmp_path: Path):
    from test_actor import make_batch

    from megatron_vgpo.checkpoint.hf_mapping import read_hf_state_dict

    hf_dir = str(tiny_hf_dir)
    results = run_on_ranks(_precision_body, world_size=2, args=(hf_dir, str(tmp_path / "ckpt")), megatron=True,
                           env={"OMP_NUM_THREADS": "1"}, timeout_s=900)
    batch = make_batch(hf_dir)
    ref = _hf_bf16_log_probs(hf_dir, batch)
    initial = read_hf_state_dict(hf_dir)
    report: dict[str, float] = {}
    for rank, out in enumerate(results):
        for name in ("tp1", "tp2_sp"):
            r = out[name]
            assert r["param_dtypes"] == r["param_dtypes_after"] == r["vision_dtypes"] == {torch.bfloat16}, name
            assert r["grad_dtypes"] == r["main_dtypes"] == r["adam_dtypes"] == {torch.float32}, name
            diff = float((r["log_probs"].double() - ref).abs().max())
            report[f"{name}_bf16_logprob_diff"] = diff
            assert diff < BF16_LOGPROB_TOLERANCE, (rank, name, diff)
            assert torch.isfinite(r["focus_cos"]).all()
            for m in r["metrics"]:
                assert m["steps"] == 2 and m["skipped_steps"] == 0, (name, m)
                assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
            assert r["metrics"][0]["loss"] != r["metrics"][1]["loss"]  # the steps changed the policy
            if rank != 0:  # full HF tensors come out on TP rank 0 only
                assert r["main_equal_after_load"] and r["resume_mismatch"] == [], (rank, name)
                continue
            w = r["weights"]
            assert set(w) == set(initial) and all(t.dtype == torch.bfloat16 for t in w.values())
            assert all(torch.isfinite(t.float()).all() for t in w.values())
            moved = max(float((w[k].float() - initial[k].float()).abs().max()) for k in initial)
            report[f"{name}_weights_moved"] = moved
            assert moved > LR, (name, moved)
            assert r["main_equal_after_load"], (rank, name)
            assert r["resume_mismatch"] == [], (rank, name, r["resume_mismatch"])
    assert results[0]["tp2_sp"]["engine_dtypes"] == {torch.bfloat16}
    assert results[0]["tp2_sp"]["engine_sync"]

    base = results[0]["recompute_none"]
    assert base["granularity"] is None
    for mode in ("selective", "full"):
        for out in results:
            r = out[f"recompute_{mode}"]
            assert r["granularity"] == mode
            assert r["metrics"]["loss"] == pytest.approx(out["recompute_none"]["metrics"]["loss"], abs=1e-6)
            assert r["metrics"]["grad_norm"] == pytest.approx(out["recompute_none"]["metrics"]["grad_norm"],
                                                              rel=1e-6)
            g0 = out["recompute_none"]["grads"]
            diff = max(float((r["grads"][k] - g0[k]).abs().max()) for k in g0)
            report[f"recompute_{mode}_grad_diff"] = max(diff, report.get(f"recompute_{mode}_grad_diff", 0.0))
            assert diff < 1e-6, (mode, diff)
            assert max(float(g.abs().max()) for g in g0.values()) > 1e-4  # the gradients are not all zero
    print("precision test report:", report)


def test_recompute_and_dtype_config_errors():
    from megatron_vgpo.actor.megatron_actor import ActorConfig
    from megatron_vgpo.config.schema import ParallelConfig
    from megatron_vgpo.models.qwen2_5_vl.config import recompute_kwargs

    assert recompute_kwargs("none") == {}
    assert recompute_kwargs("full") == {"recompute_granularity": "full", "recompute_method": "uniform",
                                        "recompute_num_layers": 1}
    with pytest.raises(ValueError, match=r"parallel\.recompute"):
        ParallelConfig(recompute="some")
    with pytest.raises(ValueError, match="recompute"):
        ActorConfig(recompute="partial")
    with pytest.raises(ValueError, match="params_dtype"):
        ActorConfig(params_dtype=torch.float16)


def test_memory_plan_counts_full_recompute():
    from megatron_vgpo.checkpoint import memory_plan as mp
    from megatron_vgpo.models.known_configs import load_hf_config

    cfg = load_hf_config("qwen2.5-vl-7b")
    tokens, h, tp, pp = 16384, cfg.text_config.hidden_size, 4, 2
    plans = {m: mp.plan_layout(cfg, tp, pp, dp=1, micro_batch_tokens=tokens, recompute=m)
             for m in ("none", "selective", "full")}
    for s, stage in enumerate(plans["full"].stages):
        layers, in_flight = stage.layers[1] - stage.layers[0], pp - s
        assert plans["none"].stages[s].activation_bytes == 34 * layers * in_flight * tokens * h // tp
        assert plans["selective"].stages[s].activation_bytes == plans["none"].stages[s].activation_bytes
        assert stage.activation_bytes == (2 * layers * in_flight + 34) * tokens * h // tp
        assert stage.activation_bytes < plans["none"].stages[s].activation_bytes / 4
