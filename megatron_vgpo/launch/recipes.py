"""NeMo-Run recipes built from the typed run config: the job command, executors, and the experiment chain.

There is one copy of the settings: the :class:`~megatron_vgpo.config.TrainConfig`. A recipe turns it into
the job command ``python -m megatron_vgpo.train BASE.yaml key=value ...`` whose overrides are exactly the
keys where the config differs from ``BASE.yaml`` (:func:`config_overrides`, checked by reloading: the
command rebuilds the same config or the builder raises). Executors:

* :func:`local_executor` -- this machine, NeMo-Run's ``torchrun`` launcher (2 gloo ranks on a CPU);
* :func:`slurm_executor` -- sbatch + srun + pyxis container, ``torchrun`` on every node (nodes, GPUs per
  node, image, mounts, time, account, partition are parameters);
* :func:`chain_experiment` -- checkpoint import (HF -> Megatron) -> training -> export (Megatron -> HF),
  run in order (``exp.run(sequential=True)``).

NeMo-Run 0.11.1 facts this relies on: the venv's ``bin`` must be on ``PATH`` for the local torchrun launcher;
``run.Script`` needs ``entrypoint="python"``; ``run.run``/``exp.run`` do not raise when a job fails, so read
:func:`experiment_states` after the ``with run.Experiment(...)`` block; drivers need a ``__main__`` guard.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from megatron_vgpo.config import TrainConfig, load_config, to_dict

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


class RecipeError(ValueError):
    """A recipe cannot be built as asked (the message names the parameter)."""


# ------------------------------------------------------------------------------------------------
# TrainConfig -> job command
# ------------------------------------------------------------------------------------------------


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def format_value(value: Any) -> str:
    """A value as a YAML scalar / flow list that ``key=value`` parsing reads back unchanged."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def config_overrides(cfg: TrainConfig, base_config: str | Path | None) -> list[str]:
    """The ``key=value`` overrides that turn ``base_config`` (YAML; ``None``: the defaults) into ``cfg``.

    Raises:
        RecipeError: the overrides do not rebuild ``cfg`` exactly (a value YAML cannot round-trip).
    """
    base = load_config(base_config)
    want, have = _flatten(to_dict(cfg)), _flatten(to_dict(base))
    overrides = [f"{k}={format_value(v)}" for k, v in want.items() if have.get(k, object()) != v]
    rebuilt = load_config(base_config, overrides)
    if rebuilt != cfg:
        raise RecipeError(f"overrides {overrides} do not rebuild the config from {base_config}")
    return overrides


def train_args(cfg: TrainConfig, base_config: str | Path, *, config_path: str | None = None) -> list[str]:
    """Arguments of ``python -m megatron_vgpo.train``: the config path (as the job will see it, e.g. inside a
    container: ``config_path``; default ``base_config``) and the overrides relative to ``base_config``."""
    return [str(config_path or base_config), *config_overrides(cfg, base_config)]


def train_script(cfg: TrainConfig, base_config: str | Path, *, config_path: str | None = None,
                 env: Mapping[str, str] | None = None) -> Any:
    """``run.Script`` of the training job (``python -m megatron_vgpo.train CONFIG key=value ...``).

    Arguments are given as they are: NeMo-Run 0.11.1 shell-quotes them itself where it writes a shell line
    (the Slurm ``srun`` line), so values with spaces or brackets survive (tested).
    """
    import nemo_run as run

    return run.Script(path="megatron_vgpo.train", args=train_args(cfg, base_config, config_path=config_path),
                      entrypoint="python", m=True, env=dict(env or {}))


def check_world(cfg: TrainConfig, nodes: int, nproc_per_node: int) -> None:
    """Refuse a recipe whose world size the config's layout cannot use (same rule as the pre-flight)."""
    from megatron_vgpo.launch.preflight import PreflightError, check_world_size

    try:
        check_world_size(nodes, nproc_per_node, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp)
    except PreflightError as e:
        raise RecipeError(str(e)) from e


def convert_script(subcommand: str, args: Sequence[str], *, repo_dir: str | Path = REPO_ROOT,
                   env: Mapping[str, str] | None = None) -> Any:
    """``run.Script`` of ``tools/convert_checkpoint.py SUBCOMMAND ARGS`` (``import`` / ``export``)."""
    import nemo_run as run

    if subcommand not in ("import", "export"):
        raise RecipeError(f"convert subcommand must be 'import' or 'export', got {subcommand!r}")
    return run.Script(path=str(Path(repo_dir) / "tools" / "convert_checkpoint.py"), args=[subcommand, *args],
                      entrypoint="python", env=dict(env or {}))


# ------------------------------------------------------------------------------------------------
# Executors
# ------------------------------------------------------------------------------------------------


def local_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for local jobs: this interpreter's ``bin`` first on ``PATH`` (torchrun, python), one
    OpenMP thread per rank, the model hub off."""
    venv_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def local_executor(nproc_per_node: int = 2, *, torchrun: bool = True, env: Mapping[str, str] | None = None) -> Any:
    """This machine: ``nproc_per_node`` ranks under NeMo-Run's torchrun launcher (or one plain process)."""
    import nemo_run as run

    if torchrun:
        return run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun", env_vars=local_env(env))
    return run.LocalExecutor(ntasks_per_node=1, env_vars=local_env(env))


def slurm_executor(
    *,
    account: str,
    partition: str,
    nodes: int,
    gpus_per_node: int,
    time: str,
    container_image: str,
    container_mounts: Sequence[str] = (),
    job_dir: str | Path,
    env: Mapping[str, str] | None = None,
    tunnel: Any = None,
    torchrun: bool = True,
    job_name_prefix: str | None = None,
) -> Any:
    """A Slurm (pyxis) executor: ``nodes`` x ``gpus_per_node`` GPUs, ``torchrun`` on each node.

    ``tunnel`` defaults to a local tunnel writing under ``job_dir`` (run from a login node, or dry-run
    anywhere); pass ``run.SSHTunnel(...)`` to submit from elsewhere. Code is expected inside the image (or a
    mount): the packager copies nothing.
    """
    import nemo_run as run

    if nodes < 1 or gpus_per_node < 1:
        raise RecipeError(f"nodes ({nodes}) and gpus_per_node ({gpus_per_node}) must be >= 1")
    for name, value in (("account", account), ("partition", partition), ("time", time),
                        ("container_image", container_image)):
        if not value:
            raise RecipeError(f"slurm_executor: {name} is required")
    bad = [m for m in container_mounts if ":" not in m]
    if bad:
        raise RecipeError(f"container_mounts must be HOST:CONTAINER, got {bad}")
    executor = run.SlurmExecutor(
        account=account, partition=partition, nodes=nodes,
        ntasks_per_node=gpus_per_node if torchrun else 1, gpus_per_node=gpus_per_node, time=time,
        container_image=container_image, container_mounts=list(container_mounts),
        env_vars={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
        tunnel=tunnel or run.LocalTunnel(job_dir=str(job_dir)), packager=run.Packager(),
        launcher="torchrun" if torchrun else None,
    )
    executor.job_name_prefix = job_name_prefix or f"{account}-megatron-vgpo."  # NeMo-Run's default repeats it
    return executor


# ------------------------------------------------------------------------------------------------
# Experiments
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChainPaths:
    """Where the chain reads and writes (paths as the jobs see them)."""

    hf_dir: str  # source HF folder (import reads it; training takes its config, tokenizer, processor)
    ckpt: str  # Megatron checkpoint written by import; training starts from its weights
    export_dir: str  # HF folder written by export
    trained_ckpt: str | None = None  # what export reads; default: see :func:`chain_tasks`


def trains_and_saves(cfg: TrainConfig) -> bool:
    """True when the job takes RL steps and writes checkpoints (``RUN_DIR/checkpoints``)."""
    return cfg.trainer.steps > 0 and cfg.trainer.save_every > 0


def chain_tasks(cfg: TrainConfig, base_config: str | Path, paths: ChainPaths, *, import_tp: int = 1,
                import_pp: int = 1, export_tp: int | None = None, export_pp: int | None = None,
                config_path: str | None = None, repo_dir: str | Path = REPO_ROOT,
                env: Mapping[str, str] | None = None) -> list[tuple[str, Any]]:
    """``[(name, run.Script)]`` for import -> train -> export.

    Training starts from the imported checkpoint (``model.load_checkpoint=paths.ckpt``; ``model.hf_dir`` is
    ``paths.hf_dir``, which gives the config, tokenizer and processor). Export reads
    ``paths.trained_ckpt``, by default the job's ``RUN_DIR/checkpoints`` (its ``latest``) when the job trains and
    saves, else the imported checkpoint. The conversions launch their own ranks: import writes at
    ``import_tp`` x ``import_pp``, export loads at ``export_tp`` x ``export_pp`` (default: the import's layout;
    a distributed checkpoint loads at any layout).
    """
    train_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_dir=paths.hf_dir,
                                                                   load_checkpoint=paths.ckpt))
    source = paths.trained_ckpt or (f"{cfg.run_dir}/checkpoints" if trains_and_saves(cfg) else paths.ckpt)
    return [
        ("import", convert_script("import", ["--hf-dir", paths.hf_dir, "--out", paths.ckpt, "--tp", str(import_tp),
                                             "--pp", str(import_pp)], repo_dir=repo_dir, env=env)),
        ("train", train_script(train_cfg, base_config, config_path=config_path, env=env)),
        ("export", convert_script("export", ["--ckpt", source, "--out", paths.export_dir,
                                             "--tp", str(export_tp or import_tp), "--pp", str(export_pp or import_pp)],
                                  repo_dir=repo_dir, env=env)),
    ]


def experiment_states(exp: Any) -> dict[str, str]:
    """``{task name: state}`` (e.g. ``SUCCEEDED``, ``FAILED``) of an experiment after its ``with`` block."""
    out = {}
    for name, info in (exp.status(return_dict=True) or {}).items():
        state = info.get("status") if isinstance(info, Mapping) else info
        out[name] = str(getattr(state, "name", state))
    return out


def render_sbatch(exp: Any) -> dict[str, str]:
    """``{task name: sbatch script}`` of a Slurm experiment, without submitting (NeMo-Run's dry run)."""
    exp.dryrun(log=False, delete_exp_dir=False)
    scripts = {}
    for job in exp.jobs:
        info = getattr(job, "_dryrun_info", None)  # set by Job.launch(dryrun=True) in NeMo-Run 0.11.1
        request = getattr(info, "request", None)
        if request is None or not hasattr(request, "materialize"):
            raise RecipeError(f"task {job.id}: NeMo-Run produced no sbatch request (not a Slurm executor?)")
        scripts[job.id] = request.materialize()
    return scripts


def load_job_config(base_config: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The job's typed config: ``base_config`` plus ``key=value`` overrides (same rules as the CLI)."""
    return load_config(base_config, overrides)


__all__ = [
    "ChainPaths",
    "RecipeError",
    "chain_tasks",
    "check_world",
    "config_overrides",
    "convert_script",
    "experiment_states",
    "format_value",
    "load_job_config",
    "local_env",
    "local_executor",
    "render_sbatch",
    "slurm_executor",
    "train_args",
    "train_script",
    "trains_and_saves",
]
