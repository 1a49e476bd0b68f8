"""Process groups: torch.distributed (NCCL with CUDA, gloo on CPU) and Megatron's model-parallel state.

Works the same under ``torchrun`` (reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``), under
:func:`megatron_vgpo.distributed.multiprocess.run_on_ranks` (default group already initialized), and in a
plain single process (a world of one on a free local port).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_vgpo.platform import apply_cpu_patches, compute_device, default_backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes and this rank's coordinates in the TP x PP x DP (x CP) grid."""

    world_size: int
    rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


DEFAULT_TIMEOUT_S = 1800.0  # torch's own default; a job passes ``trainer.collective_timeout_s``


def init_torch_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialize the default process group once (env:// rendezvous; a world of 1 if no env is set).

    ``timeout_s`` is how long a collective may wait before the process group aborts it (the other ranks wait
    in one while rank 0 generates rollouts). With NCCL the current CUDA device is set to ``LOCAL_RANK`` first
    (object collectives stage their tensors there). Installs the collective audit of
    :mod:`megatron_vgpo.distributed.comm` when ``MEGATRON_VGPO_COLLECTIVE_AUDIT=1``.
    """
    from megatron_vgpo.distributed.comm import maybe_install_audit

    maybe_install_audit()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        from megatron_vgpo.distributed.multiprocess import find_free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(find_free_port()))
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def init_model_parallel(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    *,
    seed: int = 1234,
    virtual_pp: int | None = None,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ParallelLayout:
    """Set up torch.distributed and Megatron's parallel state for a TP x PP x CP x DP grid.

    Applies the CPU patches first (no-op with CUDA), checks that ``tp * pp * cp`` divides the world
    size, initializes Megatron's groups (rank order tp-cp-dp-pp, Megatron's default) and seeds its RNG
    tracker with ``seed`` (TP ranks get distinct model-parallel streams, as on GPU). ``timeout_s`` is the
    collectives' timeout of the default group (when this call creates it) and of Megatron's groups (which
    otherwise get Megatron's own 30 minutes), rounded up to whole minutes for Megatron.
    """
    apply_cpu_patches()
    init_torch_distributed(backend, timeout_s=timeout_s)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tp({tp}) x pp({pp}) x cp({cp}) = {tp * pp * cp}"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=virtual_pp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60.0)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    layout = current_layout()
    logger.debug("parallel layout: %s on %s", layout, compute_device())
    return layout


def group_timeout_s(group: dist.ProcessGroup | None = None) -> float | None:
    """The collectives' timeout torch stores for ``group`` (None = default group), in seconds; None where this
    torch build does not expose it."""
    from megatron_vgpo.distributed.comm import comm_device

    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        return float(pg._get_backend(comm_device(group)).options._timeout.total_seconds())
    except (AttributeError, RuntimeError, ValueError):
        return None


def current_layout() -> ParallelLayout:
    """This rank's :class:`ParallelLayout` (Megatron's parallel state must be initialized)."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_model_parallel() -> None:
    """Tear down Megatron's model-parallel groups only; the default group stays (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def destroy() -> None:
    """Tear down Megatron's groups and the default group (safe to call twice)."""
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
