"""tools/plot_run.py: PNGs from a run's metrics.jsonl, with the plotted data equal to the file's."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vgpo.trainer.metrics import MetricsLogger
from megatron_vgpo.trainer.plots import FOCUS_FILE, SFT_FILE, VGPO_FILE, PlotError, plot_run

TOOL = Path(__file__).resolve().parents[1] / "tools" / "plot_run.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = range(1, 8)


def _step_metrics(step: int) -> dict[str, float]:
    metrics = {
        "rollout/reward_mean": 0.1 * step,
        "rollout/response_length": 100.0 + 7 * step,
        "actor/loss": -0.01 * step,
        "actor/pg_clipfrac_high": 0.002 * step,
        "actor/pg_clipfrac_low": 0.001 * step,
        "actor/entropy": 1.5 - 0.05 * step,
        "actor/grad_norm": 0.3 + 0.01 * step,
        "time/rollout": 10.0 + step,
        "time/actor": 5.0 + step,
        "time/sync": 0.5,
        "time/step": 16.0 + 2 * step,
        "vgpo/visual_token_percentage_late_early_ratio": 0.5 + 0.02 * step,
        "vgpo/trajectory_weighting_factor_mean": 1.0 + 0.001 * step,
    }
    # focus curves decaying over the response; step 4 logs no token in the last bin
    for b in range(10):
        if not (step == 4 and b == 9):
            metrics[f"focus/bin_{b:02d}"] = 0.6 - 0.01 * b + 0.001 * step
    if step == 2:
        metrics["actor/grad_norm"] = math.inf  # non-finite: logged as null, must not be plotted
    if step % 3 == 0:
        metrics["val/accuracy"] = 0.05 * step
    return metrics


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    with MetricsLogger(run, tensorboard=False) as logger:
        for step in (1, 2, 3):  # an SFT warm start logs its own steps first
            logger.log(step, {"sft/nll": 3.0 - step, "sft/lr": 1e-4 * step})
        logger.log(0, {"val/accuracy": 0.0})
        for step in STEPS:
            logger.log(step, _step_metrics(step))
    # a resumed run appends: step 5 again with new values (the later record wins)
    with MetricsLogger(run, tensorboard=False) as logger:
        logger.log(5, {**_step_metrics(5), "rollout/reward_mean": 0.99, "focus/bin_00": 0.9})
    return run


def _expected_series(run: Path, name: str) -> tuple[list[float], list[float]]:
    """Independent reading of the file: last finite value per step, sorted by step."""
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get(name) is not None:
            by_step[record["step"]] = record[name]
    return [float(s) for s in sorted(by_step)], [float(by_step[s]) for s in sorted(by_step)]


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 200, (path, width, height)
    assert len(data) > 10_000, (path, len(data))  # axes, lines and text, not a blank canvas
    from PIL import Image

    with Image.open(path) as image:
        image.verify()


def test_tool_writes_valid_pngs_and_prints_their_paths(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, str(TOOL), str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    printed = [Path(line) for line in proc.stdout.splitlines()]
    expected = {"val_accuracy.png", "reward.png", "response_length.png", "clip_fraction.png", "loss.png",
                "entropy.png", "grad_norm.png", "time_per_phase.png", VGPO_FILE, SFT_FILE, FOCUS_FILE}
    assert {p.name for p in printed} == expected  # nothing for metrics that were never logged (lr, ...)
    assert sorted(out.iterdir()) == sorted(printed)
    for path in printed:
        _check_png(path)


def test_plotted_data_equals_the_metrics_file(run_dir: Path) -> None:
    result = plot_run(run_dir)
    assert all(p.parent == run_dir / "plots" and p.is_file() for p in result.paths)
    checks = {
        "val_accuracy.png": ["val/accuracy"],
        "reward.png": ["rollout/reward_mean"],
        "clip_fraction.png": ["actor/pg_clipfrac_high", "actor/pg_clipfrac_low"],
        "entropy.png": ["actor/entropy"],
        "grad_norm.png": ["actor/grad_norm"],
        "time_per_phase.png": ["time/rollout", "time/actor", "time/sync", "time/step"],
        VGPO_FILE: ["vgpo/trajectory_weighting_factor_mean", "vgpo/visual_token_percentage_late_early_ratio"],
        SFT_FILE: ["sft/lr", "sft/nll"],
    }
    for file, names in checks.items():
        assert sorted(result.curves[file]) == sorted(names), file
        for name in names:
            steps, values = result.curves[file][name]
            want_steps, want_values = _expected_series(run_dir, name)
            assert steps == want_steps and values == pytest.approx(want_values), (file, name)
    # spot checks of the reading rules: validation at steps 0, 3, 6; the null grad norm left out; the
    # resumed step 5 replaced, not duplicated
    assert result.curves["val_accuracy.png"]["val/accuracy"][0] == [0.0, 3.0, 6.0]
    assert 2.0 not in result.curves["grad_norm.png"]["actor/grad_norm"][0]
    steps, rewards = result.curves["reward.png"]["rollout/reward_mean"]
    assert steps == [float(s) for s in STEPS] and rewards[steps.index(5.0)] == pytest.approx(0.99)


def test_focus_plot_shows_first_middle_and_last_step(run_dir: Path) -> None:
    result = plot_run(run_dir)
    assert sorted(result.focus) == [1, 4, 7]  # steps 1..7 logged focus bins
    assert result.focus_positions == pytest.approx([(b + 0.5) / 10 for b in range(10)])
    drawn = result.curves[FOCUS_FILE]
    assert sorted(drawn) == ["step 1", "step 4", "step 7"]
    for step in (1, 7):
        x, y = drawn[f"step {step}"]
        assert x == pytest.approx(result.focus_positions)
        per_bin = [dict(zip(*_expected_series(run_dir, f"focus/bin_{b:02d}"), strict=True)) for b in range(10)]
        assert y == pytest.approx([per_bin[b][float(step)] for b in range(10)])
    # step 4 logged no last bin: a gap, not a made-up value
    y4 = drawn["step 4"][1]
    assert math.isnan(y4[9]) and y4[:9] == pytest.approx([0.6 - 0.01 * b + 0.004 for b in range(9)])


def test_missing_metrics_are_skipped(tmp_path: Path) -> None:
    run = tmp_path / "partial"
    with MetricsLogger(run, tensorboard=False) as logger:
        logger.log(0, {"val/accuracy": 0.1})
        logger.log(1, {"rollout/reward_mean": 0.4, "sft/loss": math.nan})
    result = plot_run(run, tmp_path / "out")
    assert [p.name for p in result.paths] == ["val_accuracy.png", "reward.png"]
    assert result.focus == {} and not (tmp_path / "out" / FOCUS_FILE).exists()


def test_missing_or_empty_metrics_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PlotError, match="no metrics file"):
        plot_run(tmp_path / "nothing_here")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    with pytest.raises(PlotError, match="holds no metric records"):
        plot_run(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"\n{"step": 3, "a": 2.0}\n')
    with pytest.raises(PlotError, match=r"metrics\.jsonl:2"):
        plot_run(bad)
    # an incomplete last line (a live run writing) is skipped
    (bad / "metrics.jsonl").write_text('{"step": 1, "actor/loss": 1.0}\n{"step": 2, "actor/lo')
    assert plot_run(bad).curves["loss.png"]["actor/loss"] == ([1.0], [1.0])
    proc = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "nothing_here")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "no metrics file" in proc.stderr and not proc.stdout
