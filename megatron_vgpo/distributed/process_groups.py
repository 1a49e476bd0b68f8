"""Process groups: torch.distributed (NCCL with CUDA, gloo on CPU) and Megatron's model-parallel state.

Works the same under ``torchrun`` (reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``), under
:func:`megatron_vgpo.distributed.multiprocess.run_on_ranks` (default group already initialized), and in a
plain single process (a world of one on a free local port).
"""

from __future__ import annotations

import datetime
import logging
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


def init_torch_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> None:
    """Initialize the default process group once (env:// rendezvous; a world of 1 if no env is set)."""
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
) -> ParallelLayout:
    """Set up torch.distributed and Megatron's parallel state for a TP x PP x CP x DP grid.

    Applies the CPU patches first (no-op with CUDA), checks that ``tp * pp * cp`` divides the world
    size, initializes Megatron's groups (rank order tp-cp-dp-pp, Megatron's default) and seeds its RNG
    tracker with ``seed`` (TP ranks get distinct model-parallel streams, as on GPU).
    """
    apply_cpu_patches()
    init_torch_distributed(backend)
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
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    layout = current_layout()
    logger.debug("parallel layout: %s on %s", layout, compute_device())
    return layout


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
