"""Weight sync through a folder on disk (``update_weights_from_disk``).

The trainer writes the weights as a Hugging Face folder (``model-XXXXX.safetensors`` shards of about
``bucket_bytes`` each, ``model.safetensors.index.json``, and every non-weight file of the engine's original
model folder: config, tokenizer, processor), then asks the engine(s) to reload from it. The folder must be
readable by the engine processes (same machine or shared file system). Slowest transport, but it works
with any SGLang deployment, and the folder is a loadable checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_vgpo.rollout.base import WeightSyncStats, bucket_nbytes, iter_buckets

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class DiskSyncTarget(Protocol):
    """What an engine offers for a disk sync (``SGLangEngine``, ``SGLangServerEngine``)."""

    @property
    def model_path(self) -> str: ...

    def update_weights_from_disk(self, path: str) -> None: ...

    def flush_cache(self) -> None: ...


def write_hf_weights_folder(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    template_dir: str | Path,
    bucket_bytes: int,
) -> WeightSyncStats:
    """Write ``(HF checkpoint name, tensor)`` pairs as a loadable HF folder at ``out_dir``.

    Old ``*.safetensors`` files and the index in ``out_dir`` are removed first; the non-weight files of
    ``template_dir`` are copied. Returns stats with ``num_buckets`` = shard files written.
    """
    out = Path(out_dir)
    template = Path(template_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.safetensors"), out / INDEX_FILE]:
        old.unlink(missing_ok=True)
    for item in template.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX_FILE:
            shutil.copy2(item, out / item.name)
    stats = WeightSyncStats(transport="disk")
    weight_map: dict[str, str] = {}
    for bucket in tqdm(iter_buckets(named_tensors, bucket_bytes), desc="disk sync: write", leave=False, delay=2.0):
        shard = f"model-{stats.num_buckets + 1:05d}.safetensors"
        tensors = {}
        for name, tensor in bucket:
            if name in weight_map or name in tensors:
                raise ValueError(f"weight {name!r} given twice")
            tensors[name] = tensor.detach().to("cpu").contiguous()
            weight_map[name] = shard
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        stats.num_tensors += len(bucket)
        stats.num_bytes += bucket_nbytes(bucket)
        stats.num_buckets += 1
    index = {"metadata": {"total_size": stats.num_bytes}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return stats


def sync_weights_by_disk(
    target: DiskSyncTarget,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    sync_dir: str | Path,
    bucket_bytes: int,
) -> WeightSyncStats:
    """Write the folder (:func:`write_hf_weights_folder`), reload the engine from it, flush its cache."""
    start = time.perf_counter()
    stats = write_hf_weights_folder(named_tensors, sync_dir, template_dir=target.model_path, bucket_bytes=bucket_bytes)
    written = time.perf_counter()
    target.update_weights_from_disk(str(Path(sync_dir).resolve()))
    target.flush_cache()
    stats.seconds = time.perf_counter() - start
    logger.info(
        "disk sync: %d tensors, %.1f MB in %d shard(s): write %.3f s, load %.3f s",
        stats.num_tensors,
        stats.num_bytes / 1e6,
        stats.num_buckets,
        written - start,
        stats.seconds - (written - start),
    )
    return stats
