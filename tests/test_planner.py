"""``megatron-vgpo plan``: the cluster planner's memory per GPU against models built on the meta device.

Independent reference: the project's real Megatron ``Qwen2_5_VLModel`` of one rank per pipeline stage, built
on the meta device in a simulated process group (no memory), and the HF ``Qwen2_5_VLForConditionalGeneration``
on the meta device. The planner's bytes must be exactly bytes-per-parameter x those counts.
"""

from __future__ import annotations

import json

import pytest

from megatron_vgpo.distributed.multiprocess import run_on_ranks
from megatron_vgpo.launch import planner
from megatron_vgpo.models.known_configs import load_hf_config

GiB = 1024**3
# (model, nodes, GPUs per node, GPU GiB, TP, PP): a layout of each cluster checked rank by rank on meta
CASES = [("qwen2.5-vl-7b", 2, 8, 80.0, 4, 2), ("qwen2.5-vl-32b", 4, 8, 80.0, 8, 2)]


def _meta_counts(rank: int, world_size: int, cases: list[tuple]) -> dict:
    """Parameters of tp_rank 0 of every pipeline stage, built on meta; the HF model's count on meta."""
    import torch.distributed as dist

    from megatron_vgpo.checkpoint import memory_plan as mp

    dist.destroy_process_group()  # simulated ranks need a process without a real group
    out = {}
    for name, _, _, _, tp, pp in cases:
        cfg = load_hf_config(name)
        stages = []
        for stage in range(pp):
            with mp.simulated_rank(tp, pp, stage * tp):  # Megatron's rank order: TP fastest
                stages.append(mp.describe_rank_model(mp.build_rank_on_meta(cfg)).params)
        out[name] = {"stages": stages, "hf": mp.hf_param_count_meta(cfg)}
    return out


@pytest.fixture(scope="module")
def meta() -> dict:
    return run_on_ranks(_meta_counts, world_size=1, args=(CASES,), megatron=True, timeout_s=300)[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_memory_per_gpu_matches_meta_device_counts(meta, case):
    name, nodes, gpus, mem, tp, pp = case
    plan = planner.plan_cluster(load_hf_config(name), nodes, gpus, mem, micro_batch_tokens=4096,
                                colocate_sglang_fraction=0.3, reserve_gib=2.0, name=name)
    assert plan.hf_params == meta[name]["hf"]
    opt = plan.option(tp, pp)
    dp = nodes * gpus // (tp * pp)
    assert opt.dp == dp
    params = meta[name]["stages"][opt.worst_stage]
    assert opt.params_per_gpu == params
    assert opt.weights_bytes == 2 * params  # bf16
    assert opt.grads_bytes == 4 * params  # fp32 grads
    assert opt.optimizer_bytes == 12 * params  # fp32 main params + Adam m, v
    assert opt.optimizer_bytes_distributed == 12 * params // dp
    sglang = int(0.3 * mem * GiB)
    assert opt.sglang_bytes == sglang
    assert opt.need_bytes_distributed == (18 * params - 12 * params + 12 * params // dp
                                          + max(opt.activation_bytes, sglang) + 2 * GiB)
    # the worst GPU is the one with the largest need: every other stage needs no more
    for p in meta[name]["stages"]:
        assert 6 * p + 12 * p // dp <= opt.weights_bytes + opt.grads_bytes + opt.optimizer_bytes_distributed


def test_7b_layouts_exclude_tp8_and_recommend_by_the_rule():
    plan = planner.plan_cluster(load_hf_config("qwen2.5-vl-7b"), 2, 8, 80.0)
    assert plan.world_size == 16
    tps = {o.tp for o in plan.options}
    assert 8 not in tps and tps == {1, 2, 4}
    reasons = " ".join(e.reason for e in plan.excluded if e.tp == 8)
    assert "num_attention_heads=28" in reasons and "num_key_value_heads=4" in reasons
    assert all(o.tp * o.pp * o.dp == 16 for o in plan.options)
    assert {(o.tp, o.pp) for o in plan.options if 28 % o.pp} == set()  # PP divides the 28 layers
    rec = plan.recommended
    fitting = [o for o in plan.options if o.fits_distributed]
    assert rec is not None and rec.fits_distributed
    assert rec.model_parallel == min(o.model_parallel for o in fitting)
    assert rec.pp == min(o.pp for o in fitting if o.model_parallel == rec.model_parallel)


def test_layout_that_cannot_fit_is_marked():
    # 32B on one node of 8 x 24 GiB GPUs: nothing fits; on 4 x 8 x 80 GiB, TP1 does not fit but TP8 does
    small = planner.plan_cluster(load_hf_config("qwen2.5-vl-32b"), 1, 8, 24.0)
    assert small.options and not any(o.fits_distributed for o in small.options) and small.recommended is None
    assert "recommended: none" in planner.format_cluster_plan(small)
    big = planner.plan_cluster(load_hf_config("qwen2.5-vl-32b"), 4, 8, 80.0, colocate_sglang_fraction=0.4)
    tp1 = big.option(1, 1)
    assert not tp1.fits and not tp1.fits_distributed and tp1.need_bytes_distributed > tp1.gpu_bytes
    table = planner.format_cluster_plan(big)
    row = next(line for line in table.splitlines() if line.split()[:3] == ["1", "1", "32"])
    assert row.split()[-1] == "NO"
    rec = big.recommended
    assert (rec.tp, rec.pp) == (8, 1) and "<- recommended" in table


def test_cli_json_and_errors(capsys, tmp_path, tiny_hf_dir):
    from megatron_vgpo.cli import main

    assert main(["plan", "--model", "qwen2.5-vl-7b", "--nodes", "1", "--gpus-per-node", "8",
                 "--gpu-mem-gib", "80", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 8 and data["recommended"] is not None
    assert all(o["tp"] in (1, 2, 4) for o in data["options"])
    assert main(["plan", "--model", "qwen2.5-vl-32b", "--nodes", "1", "--gpus-per-node", "8",
                 "--gpu-mem-gib", "24"]) == 1
    assert "recommended: none" in capsys.readouterr().out
    assert main(["plan", "--model", str(tmp_path / "nowhere"), "--nodes", "1", "--gpus-per-node", "8",
                 "--gpu-mem-gib", "80"]) == 2
    assert "neither a known model" in capsys.readouterr().err
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\n")
    assert main(["plan", "--model", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem-gib", "8"]) == 2
    assert "run the job once" in capsys.readouterr().err
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nmodel:\n  hf_dir: {tiny_hf_dir}\n")
    assert main(["plan", "--model", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem-gib", "8"]) == 0
    out = capsys.readouterr().out
    assert str(tiny_hf_dir) in out and "recommended: TP1 x PP1 x DP2" in out
