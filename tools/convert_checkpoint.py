#!/usr/bin/env python
"""Convert Qwen2.5-VL checkpoints between Hugging Face folders and Megatron distributed checkpoints.

Subcommands (the names and flags are a contract)::

    import    --hf-dir DIR --out CKPT --tp T --pp P      HF folder -> Megatron dist checkpoint
    export    --ckpt CKPT --out DIR [--tp T --pp P]      Megatron dist checkpoint -> HF folder
    roundtrip --hf-dir DIR --tp T --pp P                 import + export + per-tensor comparison

``import`` launches its own T x P ranks (gloo on CPU). The layout it writes at is NOT the layout of later
training: a Megatron distributed checkpoint loads at any TP/PP. ``export`` loads at ``--tp/--pp`` (default
1 x 1) and writes safetensors with on-disk HF names, ``config.json`` from the configuration recorded in the
checkpoint, and the tokenizer / processor files of the source HF folder recorded at import (or
``--tokenizer-dir``). ``roundtrip`` imports at T x P, exports loading at ``--export-tp/--export-pp`` and prints
the max abs difference of every tensor; any mismatch, missing or extra tensor exits 1.

Nothing is written when a check fails: the HF folder's tensors are compared with its ``config.json`` (names
and shapes, from the safetensors headers) and the layout is validated before any rank starts; the model is
compared field by field with the config before the checkpoint is written; ``export --hf-config`` compares
the checkpoint's recorded config with the expected one before anything is read. Outputs are written to a
temporary folder and renamed into place. Exit status: 0 ok, 1 roundtrip mismatch, 2 refused (bad input).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

logger = logging.getLogger("convert_checkpoint")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Files of an HF folder that describe weights/config; everything else (tokenizer, processor, chat
#: template, generation config) is copied to exported folders.
_WEIGHT_OR_CONFIG = ("config.json", "model.safetensors.index.json", "tiny_model_build.json")
MAX_SHARD_BYTES = 4 * 1024**3


class ConversionRefused(RuntimeError):
    """Input rejected before anything was written (message names the file / field)."""


# --------------------------------------------------------------------------------------------------
# Checks that run in the launching process, before any rank starts
# --------------------------------------------------------------------------------------------------


def safetensors_headers(hf_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{on-disk name: (shape, dtype)}`` of every tensor of an HF folder, from the headers only."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionRefused(f"{hf_dir}: no *.safetensors files")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def precheck_hf_folder(hf_dir: Path, cfg: Any, tp: int, pp: int) -> str:
    """Refuse an HF folder whose tensors do not match its config, or a layout that cannot hold it.

    Returns the folder's common floating dtype name (``float32``, ``bfloat16``...).
    """
    from megatron_vgpo.checkpoint.hf_mapping import expected_hf_shapes, normalize_hf_name
    from megatron_vgpo.models.qwen2_5_vl import UnsupportedConfigError, check_supported

    try:
        check_supported(cfg, tp=tp, pp=pp)
    except UnsupportedConfigError as e:
        raise ConversionRefused(f"{hf_dir / 'config.json'}: {e}") from e
    headers = {normalize_hf_name(k): v for k, v in safetensors_headers(hf_dir).items()}
    expected = {k: tuple(v) for k, v in expected_hf_shapes(cfg).items()}
    tied_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    problems = [f"missing {n} {s}" for n, s in expected.items() if n not in headers]
    problems += [f"unexpected {n}" for n in headers if n not in expected and n not in tied_extra]
    problems += [f"{n}: file {headers[n][0]} vs config {s}" for n, s in expected.items()
                 if n in headers and headers[n][0] != s]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems)} in all)" if len(problems) > 12 else "")
        raise ConversionRefused(f"{hf_dir}: safetensors do not match config.json: {shown}")
    dtypes = {d for _, d in headers.values()}
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    return names.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"


def _launch(fn: Any, world: int, args: tuple) -> list[Any]:
    from megatron_vgpo.distributed.multiprocess import run_on_ranks

    return run_on_ranks(fn, world_size=world, args=args, megatron=True, timeout_s=3600)


# --------------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------------


def _import_rank(rank: int, world: int, hf_dir: str, out: str, tp: int, pp: int, dtype: str,
                 overwrite: bool) -> str:
    from megatron_vgpo.checkpoint.dist_checkpoint import save_checkpoint
    from megatron_vgpo.checkpoint.hf_mapping import load_hf_weights, read_hf_state_dict
    from megatron_vgpo.distributed.process_groups import init_model_parallel
    from megatron_vgpo.models.known_configs import load_hf_config
    from megatron_vgpo.models.qwen2_5_vl import build_model

    init_model_parallel(tp, pp)
    cfg = load_hf_config(hf_dir)
    model = build_model(cfg, params_dtype=DTYPES[dtype])
    load_hf_weights(model, read_hf_state_dict(hf_dir, lazy=True), cfg)  # reads only this stage's tensors
    return str(save_checkpoint(out, model, hf_config=cfg, iteration=0, hf_source_dir=hf_dir, overwrite=overwrite))


def import_hf(hf_dir: str | Path, out: str | Path, tp: int, pp: int, *, dtype: str = "auto",
              overwrite: bool = False) -> Path:
    """HF folder -> Megatron distributed checkpoint under ``out`` (``out/iter_0000000``, ``out/latest``)."""
    from megatron_vgpo.models.known_configs import load_hf_config

    hf_dir = Path(hf_dir).resolve()
    try:
        cfg = load_hf_config(hf_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionRefused(str(e)) from e
    file_dtype = precheck_hf_folder(hf_dir, cfg, tp, pp)
    dtype = file_dtype if dtype == "auto" else dtype
    if (Path(out) / "iter_0000000").exists() and not overwrite:
        raise ConversionRefused(f"{Path(out) / 'iter_0000000'} exists (use --overwrite)")
    paths = _launch(_import_rank, tp * pp, (str(hf_dir), str(out), tp, pp, dtype, overwrite))
    return Path(paths[0])


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------


def _export_rank(rank: int, world: int, ckpt: str, tp: int, pp: int, tmp_dir: str) -> list[tuple[str, list]]:
    """Load the checkpoint at TP x PP and stream this stage's HF tensors (TP-gathered) into safetensors.

    TP rank 0 of each stage writes ``stageNNN-partMMM.safetensors`` files of at most
    :data:`MAX_SHARD_BYTES` into ``tmp_dir`` and returns ``[(file name, [(tensor name, shape), ...])]``;
    other ranks return ``[]``. Memory: one stage's tensors at a time, never the whole model.
    """
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig

    from megatron_vgpo.checkpoint.dist_checkpoint import load_checkpoint, read_metadata
    from megatron_vgpo.checkpoint.hf_mapping import iter_hf_weights
    from megatron_vgpo.distributed.process_groups import init_model_parallel
    from megatron_vgpo.models.qwen2_5_vl import build_model

    layout = init_model_parallel(tp, pp)
    meta = read_metadata(ckpt)
    cfg = Qwen2_5_VLConfig(**meta.hf_config)
    model = build_model(cfg, params_dtype=DTYPES.get(meta.params_dtype or "float32", torch.float32))
    load_checkpoint(ckpt, model)
    files: list[tuple[str, list]] = []
    part: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal part, size
        if part:
            name = f"stage{layout.pp_rank:03d}-part{len(files):03d}.safetensors"
            save_file(part, str(Path(tmp_dir) / name), metadata={"format": "pt"})
            files.append((name, [(k, tuple(v.shape)) for k, v in part.items()]))
        part, size = {}, 0

    for name, tensor in iter_hf_weights(model, cfg):  # collective over TP; TP rank 0 yields
        tensor = tensor.detach().to("cpu").contiguous().clone()
        nbytes = tensor.numel() * tensor.element_size()
        if part and size + nbytes > MAX_SHARD_BYTES:
            flush()
        part[name] = tensor
        size += nbytes
    flush()
    return files if layout.dp_rank == 0 else []


def _assemble_safetensors(tmp: Path, per_rank: list[list[tuple[str, list]]], cfg: Any) -> list[str]:
    """Rename the stage files to HF's ``model-XXXXX-of-YYYYY`` scheme (or ``model.safetensors``), write the
    index, and refuse (raise) unless the union of tensors is exactly the HF checkpoint of ``cfg``."""
    import json

    from megatron_vgpo.checkpoint.hf_mapping import expected_hf_shapes

    parts = sorted((item for files in per_rank for item in files), key=lambda f: f[0])
    written = {n: tuple(shape) for _, names in parts for n, shape in names}
    expected = {n: tuple(s) for n, s in expected_hf_shapes(cfg).items()}
    if written != expected:
        missing = sorted(set(expected) - set(written))
        extra = sorted(set(written) - set(expected))
        bad = sorted(n for n in set(expected) & set(written) if expected[n] != written[n])
        raise RuntimeError(f"exported tensors do not form the HF checkpoint: missing {missing}, "
                           f"unexpected {extra}, mis-shaped {bad}")
    if len(parts) == 1:
        os.rename(tmp / parts[0][0], tmp / "model.safetensors")
        return ["model.safetensors"]
    weight_map, names = {}, []
    for i, (fname, tensors) in enumerate(parts, start=1):
        final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        os.rename(tmp / fname, tmp / final)
        names.append(final)
        weight_map.update({n: final for n, _ in tensors})
    total = sum((tmp / n).stat().st_size for n in names)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def export_hf(ckpt: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, hf_config: str | None = None,
              tokenizer_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Megatron distributed checkpoint -> HF folder ``out`` (atomic: temporary folder + rename)."""
    from transformers import Qwen2_5_VLConfig

    from megatron_vgpo.checkpoint.config_check import ConfigMismatchError, check_hf_configs_match
    from megatron_vgpo.checkpoint.dist_checkpoint import CheckpointError, read_metadata, resolve_checkpoint
    from megatron_vgpo.models.known_configs import load_hf_config
    from megatron_vgpo.models.qwen2_5_vl import UnsupportedConfigError, check_supported

    out = Path(out)
    try:
        ckpt_dir = resolve_checkpoint(ckpt)
        meta = read_metadata(ckpt_dir)
        cfg = Qwen2_5_VLConfig(**meta.hf_config)
        if hf_config is not None:
            check_hf_configs_match(load_hf_config(hf_config), cfg, expected_name=str(hf_config),
                                   actual_name=f"{ckpt_dir} metadata", context="refusing to export")
        check_supported(cfg, tp=tp, pp=pp)
    except (CheckpointError, ConfigMismatchError, UnsupportedConfigError, FileNotFoundError, ValueError) as e:
        raise ConversionRefused(str(e)) from e
    source = Path(tokenizer_dir) if tokenizer_dir is not None else (
        Path(meta.hf_source_dir) if meta.hf_source_dir else None)
    if source is None or not source.is_dir():
        raise ConversionRefused(f"{ckpt_dir}: tokenizer/processor source {source} not found (pass --tokenizer-dir)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionRefused(f"{out} exists and is not empty (use --overwrite)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp.{out.name}.", dir=out.parent))
    try:
        per_rank = _launch(_export_rank, tp * pp, (str(ckpt_dir), tp, pp, str(tmp)))
        _assemble_safetensors(tmp, per_rank, cfg)
        cfg.save_pretrained(tmp)
        for item in sorted(source.iterdir()):
            if item.is_file() and item.name not in _WEIGHT_OR_CONFIG and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------------
# roundtrip
# --------------------------------------------------------------------------------------------------


def compare_hf_folders(original: Path, exported: Path) -> list[dict[str, Any]]:
    """One row per tensor name of either folder: shape, dtype, max abs diff and a status."""
    from megatron_vgpo.checkpoint.hf_mapping import normalize_hf_name, read_hf_state_dict
    from megatron_vgpo.models.known_configs import load_hf_config

    a = {normalize_hf_name(k): v for k, v in read_hf_state_dict(original).items()}
    b = {normalize_hf_name(k): v for k, v in read_hf_state_dict(exported).items()}
    tied = bool(load_hf_config(original).tie_word_embeddings)
    rows = []
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if x is None or y is None:
            if tied and name == "lm_head.weight" and y is None and "model.embed_tokens.weight" in b:
                y, status = b["model.embed_tokens.weight"], "tied"
            else:
                rows.append({"name": name, "shape": tuple((x if x is not None else y).shape),
                             "dtype": str((x if x is not None else y).dtype).replace("torch.", ""),
                             "max_abs_diff": None, "status": "missing" if y is None else "extra"})
                continue
        else:
            status = "ok"
        if x.shape != y.shape or x.dtype != y.dtype:
            diff, status = None, f"shape/dtype {tuple(y.shape)} {y.dtype}"
        else:
            diff = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
            if not torch.equal(x, y):
                status = "MISMATCH"
        rows.append({"name": name, "shape": tuple(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
                     "max_abs_diff": diff, "status": status})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The per-tensor table printed by ``roundtrip``."""
    cols = ("tensor", "shape", "dtype", "max abs diff", "status")
    body = [(r["name"], "x".join(map(str, r["shape"])), r["dtype"],
             "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}", r["status"]) for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def roundtrip(hf_dir: str | Path, tp: int, pp: int, *, export_tp: int = 1, export_pp: int = 1,
              work_dir: str | Path | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Import at TP x PP, export loading at export_tp x export_pp, compare every tensor and the config."""
    from megatron_vgpo.checkpoint.config_check import ConfigMismatchError, check_hf_configs_match
    from megatron_vgpo.models.known_configs import load_hf_config

    hf_dir = Path(hf_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="vgpo_roundtrip_") as scratch:
        base = Path(work_dir) if work_dir is not None else Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        ckpt, exported = base / "megatron_ckpt", base / "hf_export"
        t0 = time.perf_counter()
        import_hf(hf_dir, ckpt, tp, pp, overwrite=True)
        t1 = time.perf_counter()
        export_hf(ckpt, exported, tp=export_tp, pp=export_pp, overwrite=True)
        t2 = time.perf_counter()
        rows = compare_hf_folders(hf_dir, exported)
        try:
            check_hf_configs_match(load_hf_config(hf_dir), load_hf_config(exported),
                                   expected_name="source config.json", actual_name="exported config.json")
            rows.append({"name": "config.json (architecture fields)", "shape": (), "dtype": "-",
                         "max_abs_diff": None, "status": "ok"})
        except ConfigMismatchError as e:
            rows.append({"name": "config.json (architecture fields)", "shape": (), "dtype": "-",
                         "max_abs_diff": None, "status": f"MISMATCH {e}"})
        logger.info("import %.1fs, export %.1fs", t1 - t0, t2 - t1)
    ok = all(r["status"] in ("ok", "tied") for r in rows)
    return rows, ok


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Qwen2.5-VL checkpoints: HF <-> Megatron distributed")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="HF folder -> Megatron distributed checkpoint")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True, help="checkpoint root (gets iter_0000000/ and latest)")
    p.add_argument("--tp", type=_positive, default=1)
    p.add_argument("--pp", type=_positive, default=1)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: the safetensors dtype")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("export", help="Megatron distributed checkpoint -> HF folder")
    p.add_argument("--ckpt", required=True, help="checkpoint root (follows latest) or iteration folder")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=_positive, default=1, help="layout to load the checkpoint at")
    p.add_argument("--pp", type=_positive, default=1)
    p.add_argument("--hf-config", default=None, help="refuse unless the checkpoint implements this config")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer/processor files (default: import source)")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("roundtrip", help="import + export + per-tensor comparison")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tp", type=_positive, default=1)
    p.add_argument("--pp", type=_positive, default=1)
    p.add_argument("--export-tp", type=_positive, default=1)
    p.add_argument("--export-pp", type=_positive, default=1)
    p.add_argument("--work-dir", default=None, help="keep the checkpoint and export here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("ignore", UserWarning)
    try:
        if args.command == "import":
            path = import_hf(args.hf_dir, args.out, args.tp, args.pp, dtype=args.dtype, overwrite=args.overwrite)
            print(f"imported {args.hf_dir} -> {path} (written at TP{args.tp} x PP{args.pp}; loads at any layout)")
            return 0
        if args.command == "export":
            path = export_hf(args.ckpt, args.out, tp=args.tp, pp=args.pp, hf_config=args.hf_config,
                             tokenizer_dir=args.tokenizer_dir, overwrite=args.overwrite)
            print(f"exported {args.ckpt} -> {path}")
            return 0
        rows, _ = roundtrip(args.hf_dir, args.tp, args.pp, export_tp=args.export_tp,
                             export_pp=args.export_pp, work_dir=args.work_dir)
    except ConversionRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    bad = [r for r in rows if r["status"] not in ("ok", "tied")]
    print(f"roundtrip import TP{args.tp} x PP{args.pp} -> export TP{args.export_tp} x PP{args.export_pp}: "
          f"{len(rows)} rows, {len(bad)} problem(s): {'FAILED' if bad else 'exact'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
