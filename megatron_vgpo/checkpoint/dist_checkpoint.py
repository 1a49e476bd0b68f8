"""Megatron distributed checkpoints (model, optimizer, extra state) that a crash can never damage.

On-disk layout of a checkpoint root::

    ROOT/
      latest                      one line: the name of the newest complete checkpoint (updated last)
      iter_0000100/
        vgpo_checkpoint.json      format version, HF config, Megatron fields, layout, contents, sources
        dist/                     a megatron.core.dist_checkpointing checkpoint (sharded_state_dict)
      .tmp.iter_0000200/          a save in progress (or one that crashed): never read, removed on retry

How a save stays safe: every rank checks the model against the HF config first (nothing is written if any
rank disagrees); the sharded state is written into ``.tmp.<name>``; rank 0 then writes the metadata JSON,
fsyncs and renames the folder to its final name, and only after that replaces ``latest`` (write + fsync +
``os.replace``). A crash at any point leaves the previous checkpoint and ``latest`` untouched.

How a load stays safe: the metadata JSON is read and the recorded configuration is compared, field by
field, with the target model (and with the HF config given by the caller) before any tensor is read; the
sharded state is then read with Megatron's ``dist_checkpointing.load`` into the model's own
``sharded_state_dict`` -- which is what lets a checkpoint written at one TP/PP layout load at another.

State kinds:

* ``model`` -- the model's ``sharded_state_dict()`` (resharded freely across TP/PP).
* ``optimizer`` -- the Megatron optimizer's ``sharded_state_dict`` (the distributed optimizer is saved as
  ``dp_reshardable``, which requires the same TP/PP at load; load happens under ``torch.no_grad()``; a
  fresh distributed optimizer is primed with zero state first, and torch Adam's per-parameter ``step`` is
  recorded and restored explicitly, so a resumed step is bit-identical to the uninterrupted one).
* ``extra_state`` -- a picklable object common to all ranks (data position, step counters, config); rank
  0's copy is stored.
* ``rank_state`` -- a picklable object per rank (RNG states); restored only when the load layout equals the
  save layout (RNG streams cannot be resharded), else ``None`` with a logged warning.

Collective: :func:`save_checkpoint` and :func:`load_checkpoint` must be called on every rank.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vgpo.checkpoint.atomic_files import fsync_dir, replace_dir, write_file_atomic
from megatron_vgpo.checkpoint.config_check import (
    ConfigMismatchError,
    as_hf_config,
    check_hf_configs_match,
    check_model_matches_hf,
    check_recorded_megatron_fields,
    megatron_model_fields,
    unwrap_model,
)
from megatron_vgpo.distributed import comm

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "vgpo_checkpoint.json"
DIST_DIR = "dist"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp."
TRASH_PREFIX = ".trash."


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or of an unknown format (the message names the path)."""


@dataclass
class CheckpointMetadata:
    """What ``vgpo_checkpoint.json`` records about one checkpoint."""

    format_version: int
    iteration: int
    hf_config: dict[str, Any]
    megatron_config: dict[str, Any]
    layout: dict[str, int]
    contents: list[str]
    hf_source_dir: str | None = None
    optimizer_format: str | None = None
    params_dtype: str | None = None
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, path: Path) -> CheckpointMetadata:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise CheckpointError(f"{path.parent}: not a complete checkpoint ({path.name} missing)") from e
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: unreadable metadata ({e})") from e
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
        required = ("iteration", "hf_config", "megatron_config", "layout", "contents")
        missing = [k for k in required if k not in raw]
        if missing:
            raise CheckpointError(f"{path}: metadata lacks field(s) {missing}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns besides the state it put into the model / optimizer."""

    path: Path
    metadata: CheckpointMetadata
    extra_state: Any = None
    rank_state: Any = None


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def checkpoint_name(iteration: int) -> str:
    """``iter_0000100`` for iteration 100."""
    return f"iter_{iteration:07d}"


def read_latest(root: str | Path) -> str | None:
    """The name recorded in ``ROOT/latest``, or ``None`` when there is no pointer."""
    path = Path(root) / LATEST_FILE
    if not path.is_file():
        return None
    name = path.read_text().strip()
    return name or None


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder of one complete checkpoint: ``path`` itself, or what ``path/latest`` points at."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    name = read_latest(path)
    if name is None:
        raise CheckpointError(
            f"{path}: neither a checkpoint ({META_FILE}) nor a root with a '{LATEST_FILE}' file"
        )
    target = path / name
    if not (target / META_FILE).is_file():
        raise CheckpointError(f"{path}/{LATEST_FILE} points at {name!r}, which is not a complete checkpoint")
    return target


def read_metadata(path: str | Path) -> CheckpointMetadata:
    """The metadata of a checkpoint folder or root (follows ``latest``)."""
    return CheckpointMetadata.from_json(resolve_checkpoint(path) / META_FILE)


# --------------------------------------------------------------------------------------------------
# Collective helpers
# --------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        comm.barrier()


def _agree(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; if it raises on any rank, raise on all (no rank is left in a collective)."""
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # re-raised below, on every rank
        error = e
    _, world = _world()
    failed = 1 if error is not None else 0
    if world > 1:
        flag = torch.tensor([failed], dtype=torch.int64)
        comm.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = int(flag.item())
    if error is not None:
        raise error
    if failed:
        raise CheckpointError("another rank failed its pre-check (see that rank's error); nothing done here")
    return result


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    _, world = _world()
    if not ps.model_parallel_is_initialized():
        return {"world_size": world, "tp": 1, "pp": 1, "cp": 1, "dp": world}
    return {
        "world_size": world,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        import megatron.core

        out["megatron.core"] = getattr(megatron.core, "__version__", "?")
    except ImportError:  # pragma: no cover - megatron is a hard dependency
        pass
    return out


def _is_distributed_optimizer(optimizer: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _inner_optimizers(optimizer))


def _optimizer_format(optimizer: Any) -> str | None:
    """``"dp_reshardable"`` (distributed optimizer: same TP/PP needed to load), ``"reshardable"``, or None."""
    if optimizer is None:
        return None
    return "dp_reshardable" if _is_distributed_optimizer(optimizer) else "reshardable"


def _optimizer_metadata(optimizer: Any) -> dict[str, Any] | None:
    return {"distrib_optim_sharding_type": "dp_reshardable"} if _is_distributed_optimizer(optimizer) else None


def _inner_optimizers(optimizer: Any) -> list[Any]:
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    return list(optimizer.chained_optimizers) if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def _prime_for_loading(optimizer: Any) -> None:
    """Give a never-stepped distributed optimizer the per-parameter state its ``state_dict`` needs.

    Megatron's ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` reads ``state_dict()``, which
    (without apex / Transformer Engine, i.e. torch's Adam) requires every parameter's state to hold the
    same ``step``; a fresh optimizer has no state at all. Zeros are filled in here and then overwritten by
    the checkpoint (``load_state_dict`` restores ``step`` and Adam's moments).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)


def _torch_adams(optimizer: Any) -> list[torch.optim.Optimizer]:
    out = []
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            out.append(inner)
    return out


def _adam_step_count(optimizer: Any) -> float | None:
    """The (common) Adam step of torch Adam states, or ``None`` when there is none to record."""
    steps = {float(state["step"]) for inner in _torch_adams(optimizer) for state in inner.state.values()
             if "step" in state}
    if len(steps) > 1:
        raise CheckpointError(f"optimizer parameters are at different Adam steps {sorted(steps)}")
    return steps.pop() if steps else None


def _restore_adam_step(optimizer: Any, step: float | None) -> None:
    """Set every torch Adam parameter state's ``step`` (Megatron's distributed optimizer restores it from
    its parameter groups, which torch's Adam does not keep; without this a resumed run restarts the bias
    correction at step 0 and diverges from the uninterrupted run)."""
    if step is None:
        return
    for inner in _torch_adams(optimizer):
        for state in inner.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step), dtype=torch.float32)


def _rank_state_object(data: Any, rank: int, world: int) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rank_state", data, (world,), (rank,), replica_id=0)


def _single_model(model: Any) -> torch.nn.Module:
    if isinstance(model, list | tuple) and len(model) != 1:
        raise ValueError(f"expected one model chunk, got {len(model)} (virtual pipeline chunks unsupported)")
    return unwrap_model(model)


def _build_sharded_state(
    model: torch.nn.Module, optimizer: Any, *, is_loading: bool, rank_state: Any, with_rank_state: bool,
) -> dict[str, Any]:
    model_sd = model.sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        if is_loading:
            _prime_for_loading(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_optimizer_metadata(optimizer)
        )
    if with_rank_state:
        rank, world = _world()
        state["rank_state"] = _rank_state_object(rank_state, rank, world)
    return state


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | Path,
    model: Any,
    *,
    hf_config: Any,
    iteration: int = 0,
    optimizer: Any = None,
    extra_state: Any = None,
    rank_state: Any = None,
    hf_source_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` (and optionally ``optimizer``, ``extra_state``, ``rank_state``) under ``root``.

    Collective. Writes ``root/iter_XXXXXXX`` atomically (temporary folder + rename) and then points
    ``root/latest`` at it.

    Args:
        root: checkpoint root folder (created if needed).
        model: the Megatron model of this rank (``GPTModel``, ``Qwen2_5_VLModel``, DDP-wrapped or not).
        hf_config: the HF ``Qwen2_5_VLConfig`` (or its dict) the model implements; checked field by field
            against the model on every rank before anything is written, and recorded in the metadata.
        iteration: training iteration (names the folder).
        optimizer: a Megatron optimizer (plain or distributed) whose state is saved with the model.
        extra_state: a picklable object common to all ranks (rank 0's copy is stored).
        rank_state: a picklable per-rank object (e.g. RNG states).
        hf_source_dir: the HF folder the weights came from (tokenizer / processor files for export).
        overwrite: replace an existing checkpoint of the same iteration (else it is an error).

    Returns:
        The final checkpoint folder.

    Raises:
        ConfigMismatchError: the model does not implement ``hf_config`` (nothing written).
        FileExistsError: the checkpoint exists and ``overwrite`` is False (nothing written).
    """
    root = Path(root)
    rank, world = _world()
    name = checkpoint_name(iteration)
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    module = _single_model(model)
    cfg = as_hf_config(hf_config)

    def precheck() -> None:
        check_model_matches_hf(module, cfg, context=f"refusing to save {final}")
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} exists (pass overwrite=True to replace it)")

    _agree(precheck)

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            logger.warning("removing %s left by an interrupted save", tmp)
            shutil.rmtree(tmp)
        (tmp / DIST_DIR).mkdir(parents=True)
    _barrier()

    from megatron.core import dist_checkpointing

    state = _build_sharded_state(module, optimizer, is_loading=False, rank_state=rank_state,
                                 with_rank_state=rank_state is not None)
    if extra_state is not None:
        state["extra_state"] = extra_state
    if optimizer is not None:
        state["optimizer_adam_step"] = _adam_step_count(optimizer)
    dist_checkpointing.save(state, str(tmp / DIST_DIR))
    _barrier()

    contents = ["model"] + (["optimizer"] if optimizer is not None else [])
    contents += (["extra_state"] if extra_state is not None else [])
    contents += (["rank_state"] if rank_state is not None else [])
    meta = CheckpointMetadata(
        format_version=FORMAT_VERSION,
        iteration=int(iteration),
        hf_config=json.loads(cfg.to_json_string(use_diff=False)),
        megatron_config=megatron_model_fields(module),
        layout=_layout(),
        contents=contents,
        hf_source_dir=str(Path(hf_source_dir).resolve()) if hf_source_dir is not None else None,
        optimizer_format=_optimizer_format(optimizer),
        params_dtype=str(next(module.parameters()).dtype).replace("torch.", ""),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        versions=_versions(),
    )
    if rank == 0:
        _finalize(root, tmp, final, meta)
    _barrier()
    logger.info("saved checkpoint %s (%s) from %d rank(s)", final, ", ".join(contents), world)
    return final


def _finalize(root: Path, tmp: Path, final: Path, meta: CheckpointMetadata) -> None:
    """Rank 0: metadata into the temporary folder, swap it into place (an existing ``final`` only with
    ``overwrite=True``, checked by every rank), then move ``latest``."""
    write_file_atomic(tmp / META_FILE, json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")
    fsync_dir(tmp)
    replace_dir(tmp, final, root / f"{TRASH_PREFIX}{final.name}")
    write_file_atomic(root / LATEST_FILE, final.name + "\n")


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def check_checkpoint_compatible(path: str | Path, model: Any, *, hf_config: Any = None) -> CheckpointMetadata:
    """Read a checkpoint's metadata and raise unless it matches ``model`` (and ``hf_config`` if given).

    Reads no tensor. Raises :class:`CheckpointError` or :class:`ConfigMismatchError`.
    """
    ckpt = resolve_checkpoint(path)
    meta = CheckpointMetadata.from_json(ckpt / META_FILE)
    module = _single_model(model)
    context = f"refusing to load {ckpt}"
    if hf_config is not None:
        check_hf_configs_match(meta.hf_config, hf_config, expected_name="checkpoint HF config",
                               actual_name="given HF config", context=context)
    check_model_matches_hf(module, meta.hf_config, context=context)
    check_recorded_megatron_fields(meta.megatron_config, module, context=context)
    return meta


def load_checkpoint(
    path: str | Path,
    model: Any,
    *,
    hf_config: Any = None,
    optimizer: Any = None,
    load_optimizer: bool = True,
    load_rank_state: bool = True,
    strict: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint (a checkpoint folder, or a root whose ``latest`` is followed) into ``model``.

    Collective. The recorded configuration is checked against the model (and against ``hf_config``) on
    every rank before any tensor is read; a mismatch raises on all ranks and leaves the model untouched.

    Args:
        path: checkpoint folder or root.
        model: this rank's Megatron model, built for the layout in use now (may differ from the saved one).
        hf_config: optional HF config the caller expects; compared with the recorded one.
        optimizer: a Megatron optimizer to restore (the checkpoint must contain one when given, unless
            ``load_optimizer`` is False).
        load_optimizer: set False to restore only the model from a checkpoint that has optimizer state.
        load_rank_state: restore the per-rank object when the layout matches the saved one.
        strict: the model's ``load_state_dict`` strictness.

    Returns:
        :class:`LoadedCheckpoint` with the metadata, ``extra_state`` and (layout permitting) ``rank_state``.
    """
    module = _single_model(model)

    def precheck() -> tuple[Path, CheckpointMetadata]:
        ckpt = resolve_checkpoint(path)
        meta = check_checkpoint_compatible(ckpt, module, hf_config=hf_config)
        if optimizer is not None and load_optimizer:
            if "optimizer" not in meta.contents:
                raise CheckpointError(f"{ckpt}: holds no optimizer state (contents: {meta.contents})")
            now = _layout()
            if meta.optimizer_format == "dp_reshardable" and (meta.layout["tp"], meta.layout["pp"]) != (
                    now["tp"], now["pp"]):
                raise CheckpointError(
                    f"{ckpt}: distributed-optimizer state was saved at TP{meta.layout['tp']} x "
                    f"PP{meta.layout['pp']} and cannot load at TP{now['tp']} x PP{now['pp']} "
                    "(load the model only with load_optimizer=False, or use the saved TP/PP)")
            if _optimizer_format(optimizer) != meta.optimizer_format:
                raise CheckpointError(f"{ckpt}: optimizer state format {meta.optimizer_format!r} does not "
                                      f"match this optimizer ({_optimizer_format(optimizer)!r})")
        return ckpt, meta

    ckpt, meta = _agree(precheck)
    from megatron.core import dist_checkpointing

    _, world = _world()
    same_layout = meta.layout == _layout()
    with_rank_state = load_rank_state and "rank_state" in meta.contents and same_layout
    if load_rank_state and "rank_state" in meta.contents and not same_layout:
        logger.warning("%s: rank_state not restored (saved at %s, loading at %s)", ckpt, meta.layout,
                       _layout())
    opt = optimizer if (optimizer is not None and load_optimizer) else None
    with torch.no_grad():
        sharded = _build_sharded_state(module, opt, is_loading=True, rank_state=None,
                                       with_rank_state=with_rank_state)
        loaded = dist_checkpointing.load(sharded, str(ckpt / DIST_DIR))
        module.load_state_dict(loaded["model"], strict=strict)
        if opt is not None:
            opt.load_state_dict(loaded["optimizer"])
            _restore_adam_step(opt, loaded.get("optimizer_adam_step"))
    _barrier()
    logger.info("loaded checkpoint %s (iteration %d) on %d rank(s)", ckpt, meta.iteration, world)
    return LoadedCheckpoint(
        path=ckpt, metadata=meta, extra_state=loaded.get("extra_state"),
        rank_state=loaded.get("rank_state") if with_rank_state else None,
    )


__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointMetadata",
    "ConfigMismatchError",
    "LoadedCheckpoint",
    "check_checkpoint_compatible",
    "checkpoint_name",
    "load_checkpoint",
    "read_latest",
    "read_metadata",
    "resolve_checkpoint",
    "save_checkpoint",
]
