"""Everything that exists only to run Megatron-Core (and SGLang) on a CPU-only machine.

Public API:

* :func:`apply_cpu_patches` -- make Megatron-Core run on CPU with gloo (see :mod:`.megatron_cpu` for the
  patch-by-patch list). A no-op when CUDA is available. Call it before building any Megatron module.
* :func:`has_cuda`, :func:`default_backend`, :func:`compute_device` -- the one place that decides between
  NCCL/CUDA and gloo/CPU.
"""

from __future__ import annotations

import torch

from megatron_vgpo.platform import megatron_cpu


def has_cuda() -> bool:
    """True when a CUDA device is usable (then every patch here is a no-op)."""
    return torch.cuda.is_available()


def default_backend() -> str:
    """``"nccl"`` with CUDA, else ``"gloo"``."""
    return "nccl" if has_cuda() else "gloo"


def compute_device(local_rank: int = 0) -> torch.device:
    """The device a rank computes on: ``cuda:<local_rank>`` with CUDA, else CPU."""
    return torch.device("cuda", local_rank) if has_cuda() else torch.device("cpu")


def apply_cpu_patches() -> list[str]:
    """Apply the Megatron-Core CPU patches selected by ``MEGATRON_VGPO_CPU_PATCHES`` (default all).

    Idempotent and a no-op (returns ``[]``) when CUDA is available. Imports ``megatron.core``.
    Returns the names of all patches active in this process.
    """
    if has_cuda():
        return []
    megatron_cpu.apply(megatron_cpu.requested_patches())
    return megatron_cpu.applied()


__all__ = ["apply_cpu_patches", "compute_device", "default_backend", "has_cuda"]
