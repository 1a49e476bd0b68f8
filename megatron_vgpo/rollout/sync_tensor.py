"""Weight sync by tensor push into a colocated SGLang engine (``update_weights_from_tensor``).

The engine must be open for updates: SGLang 0.5.23 only accepts ``update_weights_from_tensor`` between
``begin_weight_update()`` and ``end_weight_update()`` (measured on CPU), and only with Hugging Face
*checkpoint* names. Weights travel in buckets of about ``bucket_bytes`` (one engine call per bucket, no
cache flush per bucket), then the session is closed and the prefix cache flushed once.

Where the bytes go: with :class:`~megatron_vgpo.rollout.sglang_backend.SGLangEngine` on CPU, each bucket is
flattened into one uint8 buffer, pickled over the worker connection and handed to the engine, which
shares it with its scheduler process; with an in-process engine on CUDA, the (GPU) tensors are handed to
SGLang directly, which passes CUDA IPC handles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Protocol

import torch
from tqdm import tqdm

from megatron_vgpo.rollout.base import WeightSyncStats, bucket_nbytes, iter_buckets

logger = logging.getLogger(__name__)


class TensorSyncTarget(Protocol):
    """What an engine offers for a tensor push (implemented by ``SGLangEngine``)."""

    def begin_weight_update(self) -> None: ...

    def push_tensor_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> None: ...

    def end_weight_update(self) -> None: ...

    def flush_cache(self) -> None: ...


def sync_weights_by_tensor(
    target: TensorSyncTarget,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    bucket_bytes: int,
) -> WeightSyncStats:
    """Push ``(HF checkpoint name, full tensor)`` pairs in buckets; close the session; flush the cache.

    The session is closed (``end_weight_update``) even when a bucket fails, then the error propagates.
    """
    stats = WeightSyncStats(transport="tensor")
    start = time.perf_counter()
    target.begin_weight_update()
    try:
        for bucket in tqdm(iter_buckets(named_tensors, bucket_bytes), desc="tensor sync", leave=False, delay=2.0):
            target.push_tensor_bucket(bucket)
            stats.num_tensors += len(bucket)
            stats.num_bytes += bucket_nbytes(bucket)
            stats.num_buckets += 1
    finally:
        target.end_weight_update()
    target.flush_cache()
    stats.seconds = time.perf_counter() - start
    logger.info(
        "tensor sync: %d tensors, %.1f MB in %d bucket(s), %.3f s",
        stats.num_tensors,
        stats.num_bytes / 1e6,
        stats.num_buckets,
        stats.seconds,
    )
    return stats
