"""Qwen2.5-VL 3B / 7B / 32B at TP8xPP2 and TP4xPP4, on paper and on the meta device (no memory used).

For every (tp_rank, pp_rank) of each layout, the project's real ``Qwen2_5_VLModel`` is built on the meta
device in a simulated process group, and:

* every tensor ``hf_to_megatron_shard`` maps from the HF model (itself built on the meta device) has the
  shape of the rank's own tensor, and no tensor is missing or extra;
* the per-rank parameter counts equal the planner's arithmetic (:func:`plan_layout`);
* over one data-parallel replica, the counts add up to the HF model's own count
  (``Qwen2_5_VLForConditionalGeneration`` on the meta device) once the TP-replicated tensors (vision tower,
  norms), vocabulary padding and the tied-embedding copy of the last stage are accounted for explicitly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megatron_vgpo.distributed.multiprocess import run_on_ranks

LAYOUTS = [
    ("qwen2.5-vl-7b", 4, 4),
    ("qwen2.5-vl-32b", 8, 2),
    ("qwen2.5-vl-32b", 4, 4),
    ("qwen2.5-vl-3b", 2, 2),  # tied embeddings: the last stage holds a copy
    ("qwen2.5-vl-3b+odd-vocab", 2, 2),  # vocabulary 151937: Megatron pads one row per vocab matrix
]


def _body(rank: int, world_size: int, layouts: list[tuple[str, int, int]]) -> dict:
    import torch.distributed as dist

    from megatron_vgpo.checkpoint import memory_plan as mp
    from megatron_vgpo.models.known_configs import load_hf_config
    from megatron_vgpo.models.qwen2_5_vl import UnsupportedConfigError

    dist.destroy_process_group()  # the simulated ranks need a process without a real group
    out: dict = {}
    for name, tp, pp in layouts:
        cfg = load_hf_config(name.split("+")[0])
        if name.endswith("+odd-vocab"):
            cfg.text_config.vocab_size += 1
        ranks = mp.meta_rank_models(cfg, tp, pp)
        plan = mp.plan_layout(cfg, tp, pp, dp=1)
        text = cfg.text_config
        stage_replicated = {r.pp_rank: r.replicated for r in ranks if r.tp_rank == 0}
        embed_rows = {r.shapes["language_model.embedding.word_embeddings.weight"][0] for r in ranks
                      if r.pp_rank == 0}
        out[(name, tp, pp)] = {
            "ranks": [(r.tp_rank, r.pp_rank) for r in ranks],
            "mapping_problems": [p for r in ranks for p in r.mapping_problems],
            "config_problems": [r.config_problem for r in ranks if r.config_problem],
            "mapped_tensors": [r.mapped_tensors for r in ranks],
            "built_vs_plan": [(r.params, r.replicated, plan.stages[r.pp_rank].params,
                               plan.stages[r.pp_rank].replicated) for r in ranks],
            "sum_params": sum(r.params for r in ranks),
            "replicated_extra": sum((tp - 1) * n for n in stage_replicated.values()),
            "padding": (plan.megatron_vocab_size - text.vocab_size) * text.hidden_size
            * (1 if cfg.tie_word_embeddings else 2),
            # under tying with PP > 1 the last stage holds a full (padded) copy of the embedding
            "tied_copy": plan.megatron_vocab_size * text.hidden_size if (cfg.tie_word_embeddings and pp > 1)
            else 0,
            "megatron_vocab": plan.megatron_vocab_size,
            "hf_meta": mp.hf_param_count_meta(cfg),
            "hf_arith": mp.hf_param_count_arithmetic(cfg),
            "embed_rows_times_tp": {n * tp for n in embed_rows},
            "vocab": text.vocab_size,
        }
    cfg7 = load_hf_config("qwen2.5-vl-7b")
    try:
        mp.plan_layout(cfg7, 8, 2)
        out["7b_tp8_plan"] = ""
    except mp.LayoutError as e:
        out["7b_tp8_plan"] = str(e)
    try:
        with mp.simulated_rank(8, 2, 0):
            mp.build_rank_on_meta(cfg7)
        out["7b_tp8_build"] = ""
    except UnsupportedConfigError as e:
        out["7b_tp8_build"] = str(e)
    return out


@pytest.fixture(scope="module")
def report() -> dict:
    return run_on_ranks(_body, world_size=1, args=(LAYOUTS,), megatron=True, timeout_s=300)[0]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{n}-tp{t}pp{p}" for n, t, p in LAYOUTS])
def test_every_rank_maps_and_counts(report, layout):
    _, tp, pp = layout
    r = report[layout]
    assert sorted(r["ranks"]) == [(t, p) for t in range(tp) for p in range(pp)]
    assert r["mapping_problems"] == [] and r["config_problems"] == []
    assert all(n > 0 for n in r["mapped_tensors"])
    for built, built_repl, planned, planned_repl in r["built_vs_plan"]:
        assert (built, built_repl) == (planned, planned_repl)
    # No padding is needed for the released vocabularies at these TP sizes; an odd vocabulary is padded
    # to a multiple of TP (and no further). Then the reconciliation with the HF count.
    assert r["embed_rows_times_tp"] == {r["megatron_vocab"]}
    if layout[0].endswith("odd-vocab"):
        # one padded row of hidden 2048 in the one (tied) vocabulary matrix
        assert r["megatron_vocab"] == r["vocab"] + 1 == 151938 and r["padding"] == 1 * 2048
    else:
        assert r["megatron_vocab"] == r["vocab"] and r["padding"] == 0
    assert r["sum_params"] - r["replicated_extra"] - r["padding"] - r["tied_copy"] == r["hf_meta"]
    assert r["hf_arith"] == r["hf_meta"]


def test_hf_counts_match_published_sizes(report):
    # Sizes shown for the released checkpoints: 3.75B and 8.29B parameters.
    assert round(report[("qwen2.5-vl-3b", 2, 2)]["hf_meta"] / 1e9, 2) == 3.75
    assert round(report[("qwen2.5-vl-7b", 4, 4)]["hf_meta"] / 1e9, 2) == 8.29
    assert 33.0e9 < report[("qwen2.5-vl-32b", 4, 4)]["hf_meta"] < 34.0e9


def test_7b_cannot_run_at_tp8(report):
    # 28 query heads and 4 KV heads: neither divides by 8, in the plan and in the real model builder.
    for key in ("7b_tp8_plan", "7b_tp8_build"):
        assert "num_attention_heads=28" in report[key] and "num_key_value_heads=4" in report[key], report[key]


def _load_tool(name: str):
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_memory_cli(capsys):
    from megatron_vgpo.cli import main as cli_main

    def main(argv: list[str]) -> int:  # ``megatron-vgpo plan-memory ...``, same as tools/plan_memory.py
        return cli_main(["plan-memory", *argv])

    assert _load_tool("plan_memory").main is not None

    assert main(["--model", "qwen2.5-vl-32b", "--tp", "8", "--pp", "2", "--dp", "4",
                 "--micro-batch-tokens", "8192"]) == 0
    text = capsys.readouterr().out
    assert "TP8 x PP2 x DP4 = 64 GPUs" in text and "HF parameters 33,448,292,352" in text
    assert text.count("\n    0 ") + text.count("\n    1 ") == 2 and "act(8192 tok)" in text
    assert main(["--model", "qwen2.5-vl-7b", "--tp", "8", "--pp", "2"]) == 2
    assert "num_attention_heads=28" in capsys.readouterr().err
