"""Weight sync by broadcast over a process group that joins the trainer and the engine(s).

The trainer process is rank 0; the engine's TP ranks (of every server, for several servers) are ranks
1..N. The group is made by SGLang's ``init_weights_update_group`` on the engine side and by SGLang's own
``init_custom_process_group`` on the trainer side (same rendezvous: ``tcp://master:port``, a store prefixed
with the group name), with ``gloo`` on CPU and ``nccl`` on GPU. It is created once (:meth:`connect`) and
reused by every sync.

SGLang 0.5.23 accepts these updates only inside ``begin_weight_update()`` / ``end_weight_update()``.
Per bucket (one dtype per bucket, at most ``bucket_bytes``): the engine is told the names / dtypes /
shapes with ``update_weights_from_distributed(load_format="flattened_bucket")``, then rank 0 broadcasts the
bucket as ONE flat uint8 tensor (SGLang's ``FlattenedTensorBucket`` layout: tensors' bytes concatenated in
order) and the engine loads it. The cache is flushed once at the end. With nccl the tensors must be on
the trainer's current CUDA device; with gloo they are moved to the CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_vgpo.distributed.multiprocess import find_free_port
from megatron_vgpo.rollout.base import WeightSyncStats, bucket_nbytes, iter_buckets

logger = logging.getLogger(__name__)

DEFAULT_GROUP_NAME = "megatron_vgpo_weight_sync"
Waiter = Callable[[], Any]  # blocks until the engine side of a started call finished; returns its result


class DistributedSyncTarget(Protocol):
    """What an engine offers for a broadcast sync (``SGLangEngine``, ``SGLangServerEngine``).

    The ``start_*`` methods send the request and return at once with a waiter, because the engine side
    blocks inside the collective until rank 0 (this process) joins it.
    """

    def engine_ranks(self) -> int: ...

    def begin_weight_update(self) -> None: ...

    def end_weight_update(self) -> None: ...

    def start_init_weights_update_group(
        self,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> Waiter: ...

    def start_update_weights_from_distributed(
        self,
        *,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        load_format: str | None,
    ) -> Waiter: ...

    def destroy_weights_update_group(self, group_name: str) -> None: ...

    def flush_cache(self) -> None: ...


def flatten_on_device(bucket: list[tuple[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The bucket's tensors as one uint8 tensor [total_bytes] on ``device``, in bucket order."""
    parts = [t.detach().to(device).contiguous().reshape(-1).view(torch.uint8) for _, t in bucket]
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def _engine_outcome(wait: Waiter) -> str:
    """The engine's answer to a started call, or its error, as text (for error messages)."""
    try:
        return repr(wait())
    except Exception as error:
        return f"{type(error).__name__}: {error}"


class DistributedWeightSender:
    """Trainer side (rank 0) of the weight-update group of one or more engines.

    Args:
        target: the engine(s).
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available, else gloo.
        master_address: address the engine ranks can reach this process at.
        master_port: free TCP port for the rendezvous (default: a free one on this host).
        group_name: name of the group on both sides; default a name unique to this sender (a process
            cannot create two groups of the same name, e.g. for two engines).
        timeout_s: collective timeout; a broadcast the engine never joins fails after it (with the
            engine's own error message when it sent one) instead of hanging.
    """

    def __init__(
        self,
        target: DistributedSyncTarget,
        *,
        backend: str | None = None,
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        group_name: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.target = target
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name or f"{DEFAULT_GROUP_NAME}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.timeout_s = timeout_s
        self.group: Any = None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def connect(self) -> None:
        """Create the group on both sides (idempotent)."""
        if self.group is not None:
            return
        from sglang.srt.utils.common import init_custom_process_group

        port = self.master_port or find_free_port()
        world_size = 1 + self.target.engine_ranks()
        logger.info(
            "weight-update group %r: %s, tcp://%s:%d, world size %d",
            self.group_name,
            self.backend,
            self.master_address,
            port,
            world_size,
        )
        wait = self.target.start_init_weights_update_group(
            master_address=self.master_address,
            master_port=port,
            rank_offset=1,
            world_size=world_size,
            group_name=self.group_name,
            backend=self.backend,
        )
        self.group = init_custom_process_group(
            backend=self.backend,
            init_method=f"tcp://{self.master_address}:{port}",
            world_size=world_size,
            rank=0,
            group_name=self.group_name,
            timeout=datetime.timedelta(seconds=self.timeout_s),
        )
        wait()

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int) -> WeightSyncStats:
        """Broadcast ``(HF checkpoint name, full tensor)`` pairs bucket by bucket, then flush the cache."""
        self.connect()
        stats = WeightSyncStats(transport="distributed")
        start = time.perf_counter()
        buckets = iter_buckets(named_tensors, bucket_bytes, split_on_dtype=True)
        self.target.begin_weight_update()
        try:
            self._send_buckets(buckets, stats)
        finally:
            self.target.end_weight_update()
        self.target.flush_cache()
        stats.seconds = time.perf_counter() - start
        logger.info(
            "distributed sync: %d tensors, %.1f MB in %d bucket(s), %.3f s",
            stats.num_tensors,
            stats.num_bytes / 1e6,
            stats.num_buckets,
            stats.seconds,
        )
        return stats

    def _send_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], stats: WeightSyncStats) -> None:
        for bucket in tqdm(buckets, desc="distributed sync", leave=False, delay=2.0):
            wait = self.target.start_update_weights_from_distributed(
                names=[name for name, _ in bucket],
                dtypes=[str(t.dtype).removeprefix("torch.") for _, t in bucket],
                shapes=[list(t.shape) for _, t in bucket],
                group_name=self.group_name,
                load_format="flattened_bucket",
            )
            flat = flatten_on_device(bucket, self.device)
            options = dist.BroadcastOptions()
            options.rootRank = 0
            try:
                self.group.broadcast([flat], options).wait()
            except Exception as error:
                raise RuntimeError(
                    f"broadcast of a {flat.numel()}-byte bucket ({bucket[0][0]} ...) failed: {error}; "
                    f"engine side: {_engine_outcome(wait)}"
                ) from error
            wait()
            stats.num_tensors += len(bucket)
            stats.num_bytes += bucket_nbytes(bucket)
            stats.num_buckets += 1

    def close(self) -> None:
        """Destroy the group on both sides (best effort on the engine side)."""
        if self.group is None:
            return
        group, self.group = self.group, None
        try:
            self.target.destroy_weights_update_group(self.group_name)
        except Exception as error:  # the engine may already be gone
            logger.warning("destroy_weights_update_group(%r) failed: %s", self.group_name, error)
        try:
            dist.destroy_process_group(group)
        except Exception as error:
            logger.warning("destroying the trainer side of %r failed: %s", self.group_name, error)
