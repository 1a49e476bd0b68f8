"""The one metrics logger: TensorBoard by default, W&B when configured, and a JSONL file for plots.

Only the rank that owns the logger writes (create it with ``enabled=False`` elsewhere). Every record is
also appended to ``RUN_DIR/metrics.jsonl`` (one JSON object per ``log`` call) so plots and tests read
the same numbers as TensorBoard without its event-file format.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Log scalar metrics per step to TensorBoard / W&B / ``metrics.jsonl``.

    Args:
        run_dir: run folder; TensorBoard events go to ``run_dir/tb``.
        tensorboard: write TensorBoard events.
        wandb_project: W&B project name, or None for no W&B (``wandb`` must be installed when set).
        enabled: False on ranks that must not write (all calls become no-ops).
        config: a plain dict of the run config, recorded by W&B.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, wandb_project: str | None = None,
                 enabled: bool = True, config: Mapping[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError(
                    f"logging.wandb_project={wandb_project!r} but wandb is not installed: pip install wandb"
                ) from err
            self._wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), config=dict(config or {}))

    def log(self, step: int, metrics: Mapping[str, float | int]) -> None:
        """Record scalar ``metrics`` at ``step``; non-finite values are kept (as null in JSONL)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        record = {"step": step, "time": time.time(),
                  **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._jsonl is not None:
            self._jsonl.close()
        self._tb = self._wandb = self._jsonl = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl`` in order (empty list when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
