"""PNG learning curves of a run from ``RUN_DIR/metrics.jsonl`` (matplotlib, Agg canvas, no display needed).

:func:`plot_run` writes one PNG per group of metrics in :data:`CURVES` (validation accuracy, reward, response
length, clip fractions, entropy, grad norm, time per phase, ...), a grid of every ``vgpo/*`` diagnostic and one
of every ``sft/*`` metric (the SFT warm start counts its own steps), and
``focus_over_generation.png``: the ``focus/bin_XX`` curve (mean focus score rho of the response tokens whose
relative position t / L falls in bin XX) of the first, middle and last step that logged it.

Reading rules: a metric absent from a record, or logged as ``null`` (non-finite), contributes no point; a
group whose metrics are all absent writes no file. When a step appears more than once (a resumed run appends
to the same file) the later record wins. A missing or empty metrics file raises :class:`PlotError`; so does
an unreadable line, except the last one, which a live run may be writing (it is skipped with a warning).

The return value holds the data read back from the drawn matplotlib lines, so callers (and tests) can check
that what is plotted is what the file says.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = ["CURVES", "GRIDS", "CurveGroup", "PlotError", "PlotResult", "focus_curves", "metric_series", "plot_run",
           "read_records"]

FOCUS_PATTERN = re.compile(r"^focus/bin_(\d+)$")
FOCUS_FILE = "focus_over_generation.png"
VGPO_FILE = "vgpo_diagnostics.png"
SFT_FILE = "sft.png"
DPI = 100


class PlotError(ValueError):
    """The run has nothing to plot (no ``metrics.jsonl``, or no records in it)."""


@dataclass(frozen=True)
class CurveGroup:
    """One PNG: ``metrics`` (exact names) and every metric starting with one of ``prefixes``, on one axis."""

    file: str
    title: str
    ylabel: str
    metrics: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    def select(self, names: Sequence[str]) -> list[str]:
        """The metric names of this group among ``names``: the listed ones in order, then prefix matches."""
        listed = [m for m in self.metrics if m in names]
        matched = sorted(n for n in names if n.startswith(self.prefixes) and n not in listed) if self.prefixes \
            else []
        return listed + matched


#: The learning-curve PNGs, in the order they are written.
CURVES: tuple[CurveGroup, ...] = (
    CurveGroup("val_accuracy.png", "Validation accuracy (greedy)", "accuracy", ("val/accuracy",)),
    CurveGroup("val_boxed_fraction.png", "Validation responses with a \\boxed{} answer", "fraction",
               ("val/boxed_fraction",)),
    CurveGroup("reward.png", "Rollout reward", "mean reward", ("rollout/reward_mean",)),
    CurveGroup("response_length.png", "Response length", "tokens",
               ("rollout/response_length", "val/response_tokens")),
    CurveGroup("disagree_fraction.png", "Prompt groups with mixed rewards", "fraction",
               ("rollout/disagree_fraction",)),
    CurveGroup("clip_fraction.png", "PPO clip fractions", "fraction of tokens",
               ("actor/pg_clipfrac_high", "actor/pg_clipfrac_low", "actor/pg_clipfrac_dual")),
    CurveGroup("loss.png", "Actor loss", "loss", ("actor/loss",)),
    CurveGroup("entropy.png", "Policy entropy", "nats per token", ("actor/entropy",)),
    CurveGroup("grad_norm.png", "Gradient norm (before clipping)", "norm", ("actor/grad_norm",)),
    CurveGroup("lr.png", "Learning rate", "lr", ("actor/lr",)),
    CurveGroup("time_per_phase.png", "Time per phase", "seconds", ("time/rollout", "time/actor", "time/sync"),
               ("time/",)),
    CurveGroup("throughput.png", "Throughput", "tokens / s", ("perf/tokens_per_s",)),
    CurveGroup("approx_kl.png", "Approximate KL to the rollout policy", "KL", ("actor/approx_kl",)),
)

#: Grids of small plots, one per metric with the prefix: (prefix, file, title).
GRIDS: tuple[tuple[str, str, str], ...] = (
    ("vgpo/", VGPO_FILE, "VGPO diagnostics (x: step)"),
    ("sft/", SFT_FILE, "SFT warm start (x: SFT step)"),
)


@dataclass
class PlotResult:
    """What :func:`plot_run` wrote.

    Attributes:
        paths: every PNG written, in order.
        curves: PNG file name -> metric name -> ``(steps, values)`` read back from the drawn lines.
        focus: step -> the focus curve drawn for it (``nan`` where that bin was not logged).
        focus_positions: x of each focus bin: its centre as a relative position in the response.
    """

    paths: list[Path] = field(default_factory=list)
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = field(default_factory=dict)
    focus: dict[int, list[float]] = field(default_factory=dict)
    focus_positions: list[float] = field(default_factory=list)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def metric_series(records: Sequence[Mapping[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of metric ``name``, sorted by step; later records win for a repeated step."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(name)
        if _finite(value):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def focus_curves(records: Sequence[Mapping[str, Any]]) -> tuple[int, dict[int, list[float]]]:
    """``(number of bins, step -> curve)`` for every step that logged a finite ``focus/bin_XX`` value.

    The number of bins is one more than the largest bin index seen; a bin a step did not log is ``nan``.
    """
    bins = 0
    per_step: dict[int, dict[int, float]] = {}
    for record in records:
        values = {int(m.group(1)): float(v) for k, v in record.items()
                  if (m := FOCUS_PATTERN.match(k)) and _finite(v)}
        if not values:
            continue
        bins = max(bins, max(values) + 1)
        per_step[int(record["step"])] = values
    return bins, {s: [v.get(b, math.nan) for b in range(bins)] for s, v in sorted(per_step.items())}


def _pick_first_middle_last(steps: Sequence[int]) -> list[int]:
    if not steps:
        return []
    chosen = [steps[0], steps[len(steps) // 2], steps[-1]]
    return sorted(set(chosen))


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _drawn(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
            for line in ax.get_lines()}


def _plot_group(group: CurveGroup, series: dict[str, tuple[list[int], list[float]]], out: Path,
                result: PlotResult) -> None:
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for name, (steps, values) in series.items():
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
    ax.set(title=group.title, xlabel="step", ylabel=group.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    result.paths.append(_save(fig, out / group.file))
    result.curves[group.file] = _drawn(ax)


def _plot_grid(prefix: str, file: str, title: str, series: dict[str, tuple[list[int], list[float]]], out: Path,
               result: PlotResult) -> None:
    cols = min(4, len(series))
    rows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows), layout="constrained")
    drawn: dict[str, tuple[list[float], list[float]]] = {}
    for i, (name, (steps, values)) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=2, label=name)
        ax.set_title(name.removeprefix(prefix), fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.grid(alpha=0.3)
        drawn.update(_drawn(ax))
    fig.suptitle(title)
    result.paths.append(_save(fig, out / file))
    result.curves[file] = drawn


def _plot_focus(records: Sequence[Mapping[str, Any]], out: Path, result: PlotResult) -> None:
    bins, curves = focus_curves(records)
    chosen = _pick_first_middle_last(list(curves))
    if not chosen:
        return
    positions = [(b + 0.5) / bins for b in range(bins)]
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for step in chosen:
        ax.plot(positions, curves[step], marker="o", markersize=3, label=f"step {step}")
    ax.set(title="Visual focus over the generation", xlabel="relative position in the response (t / L)",
           ylabel="mean focus score rho", xlim=(0.0, 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    result.paths.append(_save(fig, out / FOCUS_FILE))
    result.curves[FOCUS_FILE] = _drawn(ax)
    result.focus = {step: curves[step] for step in chosen}
    result.focus_positions = positions


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a ``metrics.jsonl`` (blank lines ignored; see the module docstring for errors)."""
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for n, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines) - 1:
                logger.warning("%s:%d: skipping an incomplete last line (%s)", path, lineno, err)
                continue
            raise PlotError(f"{path}:{lineno}: not a JSON record: {err}") from err
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise PlotError(f"{path}:{lineno}: expected an object with an integer 'step', got {line[:80]!r}")
        records.append(record)
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> PlotResult:
    """Write the PNGs of ``run_dir/metrics.jsonl`` into ``out`` (default ``run_dir/plots``).

    Raises:
        PlotError: the metrics file is missing, holds no records, or has an unreadable line.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"no metrics file at {path} (is {run_dir} a run folder?)")
    records = read_records(path)
    if not records:
        raise PlotError(f"{path} holds no metric records")
    out_dir = Path(out) if out is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted({k for r in records for k in r if k not in ("step", "time")})
    result = PlotResult()
    for group in CURVES:
        series = {m: metric_series(records, m) for m in group.select(names)}
        series = {m: s for m, s in series.items() if s[0]}
        if series:
            _plot_group(group, series, out_dir, result)
    for prefix, file, title in GRIDS:
        grid = {m: metric_series(records, m) for m in names if m.startswith(prefix)}
        grid = {m: s for m, s in grid.items() if s[0]}
        if grid:
            _plot_grid(prefix, file, title, grid, out_dir, result)
    _plot_focus(records, out_dir, result)
    return result
