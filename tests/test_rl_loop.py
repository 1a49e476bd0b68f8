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
SMALL = ["sft.enabled=false", "optimizer.lr_schedule=constant", "optimizer.warmup_steps=0",
         "data.synthetic.num=40",
         "validation.num_samples=4", "validation.max_new_tokens=6", "trainer.prompts_per_step=2",
         "trainer.mini_batches=1", "rollout.n=4", "rollout.max_new_tokens=6", "rollout.backend=hf",
         "algorithm.dynamic_sampling=false", "optimizer.lr=1e-3", "trainer.val_every=2", "trainer.save_every=1"]


def _train(run_dir: Path, *overrides: str) -> dict:
    """The default job's config with :data:`SMALL` and ``overrides``, in a subprocess; returns its summary."""
    return run_job(run_dir, *SMALL, *overrides)


def run_job(run_dir: Path, *overrides: str) -> dict:
    """``python -m megatron_vgpo.train examples/tiny_cpu.yaml run_dir=RUN_DIR overrides...``; asserts it succeeds
    and returns ``summary.json``."""
    command = [sys.executable, "-m", "megatron_vgpo.train", str(REPO / "examples/tiny_cpu.yaml"),
               f"run_dir={run_dir}", *overrides]
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
        assert r["time/sync"] > 0 and r["rollout/kept_groups"] == 2
    assert (run_dir / "checkpoints" / "latest").is_file()

    # same run_dir, more steps: continues from the checkpoint of step 2
    summary = _train(run_dir, "trainer.steps=3")
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 3
    assert [r["step"] for r in _metrics(run_dir) if "actor/steps" in r] == [1, 2, 3]


def test_sft_warm_start_then_grpo_baseline_by_one_override(tmp_path: Path):
    """One launch: an SFT warm start gated on the answer format (target 0.0, so it stops at the first
    evaluation), its exported folder used as the RL start, one GRPO step, and the PNG curves at the end."""
    run_dir = tmp_path / "grpo"
    sft = ["sft.enabled=true", "sft.max_steps=12", "sft.batch_size=8", "sft.eval_every=6", "sft.eval_samples=4",
           "sft.warmup_steps=1", "sft.target_accuracy=1.0", "sft.target_boxed_fraction=0.0"]
    summary = _train(run_dir, "trainer.steps=1", "algorithm.name=grpo", "trainer.save_every=0",
                     "trainer.collective_timeout_s=5400", *sft)
    assert summary["algorithm"] == "grpo"
    # the configured timeout reaches the relaunch config and, read back from torch, every process group
    assert "collective_timeout_s: 5400" in (run_dir / "config.yaml").read_text()
    log = (run_dir / "train.log").read_text()
    assert "collective timeouts (s): default group 5400.0, Megatron TP group 5400.0, DP group 5400.0" in log
    assert summary["sft_steps"] == 6 and 0.0 <= summary["sft_boxed_fraction"] <= 1.0  # gate hit at step 6
    sft_records = [r for r in _metrics(run_dir) if "sft/nll" in r]
    assert [r["step"] for r in sft_records] == list(range(1, 7))
    assert sft_records[-1]["sft/nll"] < 0.8 * sft_records[0]["sft/nll"]  # the warm start does learn
    assert "sft/accuracy" in sft_records[-1] and "sft/boxed_fraction" in sft_records[-1]
    assert json.loads((run_dir / "val_before.json").read_text())["model_dir"] == str(run_dir / "sft_model")
    assert summary["model_dir"] == str(run_dir / "sft_model") and (run_dir / "sft_model/config.json").is_file()
    assert "val_boxed_fraction_after" in summary
    assert summary["plots"] and all((run_dir / "plots" / name).is_file() for name in summary["plots"])
    step = next(r for r in _metrics(run_dir) if "actor/steps" in r)
    assert not any(k.startswith(("vgpo/", "focus/")) for k in step)
    assert not (run_dir / "checkpoints").exists()
