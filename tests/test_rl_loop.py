"""The RL loop end to end on 2 gloo ranks (TP2 + SP, relaunched under torchrun by the job itself):
rollouts -> rewards -> old log-probs + focus -> GRPO/VGPO advantages -> update -> weight sync ->
validation -> checkpoint, then a resume that continues from the checkpoint, and the GRPO baseline by one
override."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["sft.enabled=false", "data.synthetic.num=40", "validation.num_samples=4", "validation.max_new_tokens=6",
         "trainer.prompts_per_step=2", "trainer.mini_batches=1", "rollout.n=4", "rollout.max_new_tokens=6",
         "rollout.backend=hf", "algorithm.dynamic_sampling=false", "optimizer.lr=1e-3", "trainer.val_every=2",
         "trainer.save_every=1"]


def _train(run_dir: Path, *overrides: str) -> dict:
    command = [sys.executable, "-m", "megatron_vgpo.train", str(REPO / "examples/tiny_cpu.yaml"),
               f"run_dir={run_dir}", *SMALL, *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_vgpo_loop_checkpoints_and_resumes(tmp_path: Path):
    run_dir = tmp_path / "vgpo"
    summary = _train(run_dir, "trainer.steps=2")
    assert summary["steps"] == 2 and summary["resumed_from_step"] == 0 and summary["algorithm"] == "vgpo"
    assert 0.0 <= summary["val_accuracy_before"] <= 1.0 and 0.0 <= summary["val_accuracy_after"] <= 1.0
    records = _metrics(run_dir)
    steps = [r for r in records if "actor/steps" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["actor/steps"] == 1 and r["actor/skipped_steps"] == 0
        assert r["actor/grad_norm"] is not None
        assert any(k.startswith("vgpo/") for k in r) and any(k.startswith("focus/bin_") for k in r)
        assert r["sync/seconds"] > 0 and r["rollout/kept_groups"] == 2
    assert (run_dir / "checkpoints" / "latest").is_file()

    # same run_dir, more steps: continues from the checkpoint of step 2
    summary = _train(run_dir, "trainer.steps=3")
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 3
    assert [r["step"] for r in _metrics(run_dir) if "actor/steps" in r] == [1, 2, 3]


def test_grpo_baseline_by_one_override(tmp_path: Path):
    run_dir = tmp_path / "grpo"
    summary = _train(run_dir, "trainer.steps=1", "algorithm.name=grpo", "trainer.save_every=0")
    assert summary["algorithm"] == "grpo"
    step = next(r for r in _metrics(run_dir) if "actor/steps" in r)
    assert not any(k.startswith(("vgpo/", "focus/")) for k in step)
    assert not (run_dir / "checkpoints").exists()
