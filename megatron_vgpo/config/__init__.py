"""Run configuration: typed dataclasses (:mod:`.schema`) loaded from YAML with ``key=value`` overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megatron_vgpo.config.loader import ConfigError, apply_overrides, build, read_yaml, to_dict
from megatron_vgpo.config.schema import TrainConfig


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML; ``None`` for defaults only), apply ``key=value`` overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    return build(TrainConfig, apply_overrides(data, overrides))


__all__ = ["ConfigError", "TrainConfig", "apply_overrides", "build", "load_config", "read_yaml", "to_dict"]
