"""Weight-sync time and throughput, trainer -> SGLang engine, by transport and bucket size.

CPU (default): for the ``tiny`` and ``small`` generated Qwen2.5-VL checkpoints, one :class:`SGLangEngine`
per model (worker process, gloo), pushing the checkpoint's own tensors (HF on-disk names) with each
transport (``tensor``, ``distributed``, ``disk``) and bucket size; wall seconds per full sync (median of
``--repeats``, after one warm-up sync that also creates the broadcast group), GB/s, and ms per bucket.

GPU (``--model-shape qwen2.5-vl-7b``; not run on the CPU machines): an engine serving the published 7B
configuration with dummy (random) weights, and a push of random bf16 tensors of every 7B checkpoint shape
(about 8.3B parameters, 16.6 GB), generated on the GPU bucket by bucket. Engine arguments can be added
with ``--engine-arg key=value``.

    python benchmarks/bench_weight_sync.py --quick
    python benchmarks/bench_weight_sync.py --models tiny small --buckets-mb 0.25 1 4 64 --repeats 3
    python benchmarks/bench_weight_sync.py --model-shape qwen2.5-vl-7b --buckets-mb 128 512 1024
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("bench_weight_sync")

TRANSPORTS = ("tensor", "distributed", "disk")
IN_MEMORY_TO_CHECKPOINT = (("model.visual.", "visual."), ("model.language_model.", "model."))


def checkpoint_shapes(config: Any) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(HF checkpoint name, shape, dtype) of every tensor of a Qwen2.5-VL checkpoint of ``config``,
    from a model built on the meta device (no memory); the tied ``lm_head.weight`` is left out."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    out = []
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        for prefix, disk_prefix in IN_MEMORY_TO_CHECKPOINT:
            if name.startswith(prefix):
                name = disk_prefix + name[len(prefix) :]
                break
        out.append((name, tuple(tensor.shape), tensor.dtype))
    return out


def random_weights(
    shapes: list[tuple[str, tuple[int, ...], torch.dtype]], dtype: torch.dtype, device: str, seed: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random tensors of the given shapes, made one at a time on ``device`` (never all held at once)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape, _ in shapes:
        yield name, torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype) * 0.02


def model_shape_folder(name: str, out_dir: Path) -> Path:
    """A folder an engine can load with ``load_format="dummy"``: the published config of ``name`` plus
    the real Qwen tokenizer / processor / chat template of a generated checkpoint (no weights)."""
    from megatron_vgpo.models.known_configs import known_config_dict
    from megatron_vgpo.models.tiny_qwen2_5_vl import BUILD_INFO_FILE, build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        source = build_tiny_checkpoint(Path(tmp) / "tok", preset="tiny", tokenizer="qwen")
        out_dir.mkdir(parents=True, exist_ok=True)
        for item in source.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in ("config.json", BUILD_INFO_FILE):
                shutil.copy2(item, out_dir / item.name)
    (out_dir / "config.json").write_text(json.dumps(known_config_dict(name), indent=1))
    return out_dir


def measure(engine: Any, make_weights: Any, transport: str, bucket_bytes: int, repeats: int) -> dict[str, Any]:
    """Median of ``repeats`` timed syncs after one warm-up; returns a table row."""
    engine.update_weights(make_weights(), bucket_bytes=bucket_bytes, transport=transport)  # warm-up
    runs = [
        engine.update_weights(make_weights(), bucket_bytes=bucket_bytes, transport=transport) for _ in range(repeats)
    ]
    seconds = statistics.median(r.seconds for r in runs)
    stats = runs[0]
    return {
        "transport": transport,
        "bucket_mb": bucket_bytes / 2**20,
        "buckets": stats.num_buckets,
        "tensors": stats.num_tensors,
        "mb": stats.num_bytes / 1e6,
        "seconds": seconds,
        "gb_per_s": stats.num_bytes / 1e9 / seconds,
        "ms_per_bucket": 1000 * seconds / stats.num_buckets,
    }


def run_model(
    label: str, model_dir: Path, make_weights: Any, args: argparse.Namespace, engine_kwargs: dict
) -> list[dict]:
    from megatron_vgpo.rollout.sglang_backend import SGLangEngine

    rows = []
    start = time.perf_counter()
    with SGLangEngine(model_dir, engine_kwargs=engine_kwargs) as engine:
        logger.info("%s: engine up in %.1f s", label, time.perf_counter() - start)
        flush_s = []
        for _ in range(5):
            tick = time.perf_counter()
            engine.flush_cache()
            flush_s.append(time.perf_counter() - tick)
        logger.info(
            "%s: one control round trip (flush_cache) takes %.1f ms (median of 5)",
            label,
            1000 * statistics.median(flush_s),
        )
        for transport in args.transports:
            for bucket_mb in args.buckets_mb:
                row = measure(engine, make_weights, transport, int(bucket_mb * 2**20), args.repeats)
                row["model"] = label
                rows.append(row)
                logger.info("%s", row)
    return rows


def print_table(rows: list[dict]) -> str:
    header = "| model | MB | transport | bucket MB | buckets | s / sync | GB/s | ms / bucket |"
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mb']:.2f} | {r['transport']} | {r['bucket_mb']:g} | {r['buckets']} | "
            f"{r['seconds']:.3f} | {r['gb_per_s']:.4f} | {1000 * r['seconds'] / r['buckets']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, buckets 0.25 and 64 MB, 1 repeat")
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    parser.add_argument("--buckets-mb", nargs="+", type=float, default=[0.25, 1.0, 64.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-shape", default=None, help="GPU only: e.g. qwen2.5-vl-7b (random weights)")
    parser.add_argument("--engine-arg", action="append", default=[], help="extra sglang.Engine key=value")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.models, args.buckets_mb, args.repeats = ["tiny"], [0.25, 64.0], 1
    extra = {}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)  # numbers, true/false, lists
        except json.JSONDecodeError:
            extra[key] = value

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_weight_sync_") as tmp:
        if args.model_shape:
            if not torch.cuda.is_available():
                raise SystemExit(f"--model-shape {args.model_shape} pushes ~16 GB of weights: run it on a GPU machine")
            from transformers import Qwen2_5_VLConfig

            folder = model_shape_folder(args.model_shape, Path(tmp) / args.model_shape)
            shapes = checkpoint_shapes(Qwen2_5_VLConfig.from_pretrained(folder))
            logger.info(
                "%s: %d tensors, %.2fB parameters",
                args.model_shape,
                len(shapes),
                sum(torch.Size(s).numel() for _, s, _ in shapes) / 1e9,
            )
            kwargs = {
                "dtype": "bfloat16",
                "load_format": "dummy",
                "mem_fraction_static": 0.5,
                "log_level": "error",
                **extra,
            }
            rows += run_model(
                args.model_shape, folder, lambda: random_weights(shapes, torch.bfloat16, "cuda"), args, kwargs
            )
        else:
            from safetensors.torch import load_file

            from megatron_vgpo.models.tiny_qwen2_5_vl import build_tiny_checkpoint

            for preset in args.models:
                folder = build_tiny_checkpoint(Path(tmp) / preset, preset=preset)
                weights = sorted(load_file(folder / "model.safetensors").items())
                # mem_fraction_static above the CPU default: the memory profile sees other jobs' allocations
                kwargs = {"dtype": "float32", "log_level": "error", "mem_fraction_static": 0.3, **extra}
                rows += run_model(preset, folder, lambda w=weights: iter(w), args, kwargs)
    table = print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
