"""The issue's acceptance run at loop level: ``parallel.dp=2 model.dtype=bfloat16 algorithm.kl_coef=0.01
algorithm.overlong_buffer_len=8`` trains the Megatron actor in bf16 mixed precision (TP1 x DP2, the
transformers engine in bf16 synced every step, a frozen KL reference, DAPO overlong shaping), writes
``actor_params_dtype: bfloat16`` in ``summary.json`` and its checkpoints, and a second launch with more
steps resumes from the bf16 checkpoint (fp32 main params and Adam states in the optimizer state). The first
launch also drives ``parallel.recompute=full`` through the run (the resume runs without: checkpoints do not
depend on it); its numerics are checked against no recompute in ``test_actor_precision``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from test_rl_loop import _metrics, _train

BF16 = ["parallel.tp=1", "parallel.sp=false", "parallel.dp=2", "model.dtype=bfloat16", "algorithm.kl_coef=0.01",
        "algorithm.overlong_buffer_len=8", "rollout.max_new_tokens=12"]


def test_bf16_loop_trains_and_resumes(tmp_path: Path):
    run_dir = tmp_path / "bf16"
    summary = _train(run_dir, *BF16, "trainer.steps=3", "parallel.recompute=full")
    assert summary["actor_params_dtype"] == "bfloat16" and summary["recompute"] == "full"
    assert summary["steps"] == 3 and summary["resumed_from_step"] == 0
    steps = [r for r in _metrics(run_dir) if "actor/steps" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["actor/steps"] == 1 and r["actor/skipped_steps"] == 0
        assert math.isfinite(r["actor/grad_norm"])  # 0 when every reward of the step is equal
        assert r["time/sync"] > 0 and "actor/kl_ref" in r and "rollout/overlong_fraction" in r
    meta = json.loads((run_dir / "checkpoints" / "iter_0000003" / "vgpo_checkpoint.json").read_text())
    assert meta["params_dtype"] == "bfloat16"

    summary = _train(run_dir, *BF16, "trainer.steps=5")
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 5
    assert summary["actor_params_dtype"] == "bfloat16" and summary["recompute"] == "none"
    assert [r["step"] for r in _metrics(run_dir) if "actor/steps" in r] == [1, 2, 3, 4, 5]
