"""The project's collectives, each run on its group's communication device, and an audit that enforces it.

NCCL only moves CUDA tensors and gloo only CPU tensors (in this project's use), so a CPU tensor handed to an
NCCL collective fails on the GPU path, and nothing on a CPU machine would notice. Every collective in
``megatron_vgpo`` therefore goes through this module:

* :func:`comm_device` -- the device a group communicates on: ``cuda:<current device>`` for an NCCL group,
  ``cpu`` for gloo.
* :func:`all_reduce`, :func:`all_gather`, :func:`broadcast`, :func:`send`, :func:`recv`, :func:`barrier`
  and the object collectives -- thin wrappers with ``torch.distributed``'s signatures (synchronous only):
  a tensor not on the group's device (or not contiguous) is copied there, the collective runs, and the result
  is copied back into the caller's tensor, so callers get results on their own device.

The audit (:func:`install_audit`; on when ``MEGATRON_VGPO_COLLECTIVE_AUDIT=1``, installed by
``process_groups.init_torch_distributed`` and by ``multiprocess.run_on_ranks`` ranks; the test-suite turns it on
for every process) wraps the ``torch.distributed`` collectives in the process and raises
:class:`CollectiveAuditError` when (a) a tensor is not on ``comm_device(group)`` for its group (any caller,
Megatron included), or (b) a module under ``megatron_vgpo`` other than this one calls a ``torch.distributed``
collective directly. Rule (b) makes the CPU-tensor-under-NCCL bug visible on a CPU: with gloo every tensor is
on the CPU, so only the routing rule can catch a call site that bypasses this module.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

AUDIT_ENV = "MEGATRON_VGPO_COLLECTIVE_AUDIT"

__all__ = [
    "AUDIT_ENV",
    "CollectiveAuditError",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "audit_installed",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "comm_device",
    "install_audit",
    "maybe_install_audit",
    "recv",
    "recv_object_list",
    "send",
    "send_object_list",
]

Group = dist.ProcessGroup | None


def _backend_devices(backend: str) -> list[torch.device]:
    """Devices a backend string (``nccl``, ``gloo``, ``cpu:gloo,cuda:nccl``) communicates on, preferred first."""
    backend = backend.lower()
    devices = []
    if "nccl" in backend:
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    if "gloo" in backend or not devices:
        devices.append(torch.device("cpu"))
    return devices


def comm_device(group: Group = None) -> torch.device:
    """The device ``group``'s collectives run on: ``cuda:<current device>`` for NCCL, ``cpu`` for gloo.

    A group with both backends (``cpu:gloo,cuda:nccl``) communicates on CUDA. Requires an initialized group.
    """
    return _backend_devices(str(dist.get_backend(group)))[0]


def _staged(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` itself when it is contiguous on ``device``, else a contiguous copy there."""
    if tensor.device == device and tensor.is_contiguous():
        return tensor
    return tensor.to(device).contiguous()


def _copy_back(work: torch.Tensor, tensor: torch.Tensor) -> None:
    if work is not tensor:
        tensor.copy_(work)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
               group: Group = None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` (any device) over ``group``; returns ``tensor``."""
    work = _staged(tensor, comm_device(group))
    dist.all_reduce(work, op=op, group=group)
    _copy_back(work, tensor)
    return tensor


def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Group = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` into ``tensor_list`` (one per rank, shapes equal, any device); returns the list."""
    device = comm_device(group)
    work_in = _staged(tensor, device)
    work_out = [_staged(t, device) if t.device == device else torch.empty_like(t, device=device)
                for t in tensor_list]
    dist.all_gather(work_out, work_in, group=group)
    for work, out in zip(work_out, tensor_list, strict=True):
        _copy_back(work, out)
    return tensor_list


def broadcast(tensor: torch.Tensor, src: int, group: Group = None) -> torch.Tensor:
    """In-place broadcast of ``tensor`` from global rank ``src``; returns ``tensor``."""
    work = _staged(tensor, comm_device(group))
    dist.broadcast(work, src=src, group=group)
    _copy_back(work, tensor)
    return tensor


def send(tensor: torch.Tensor, dst: int, group: Group = None) -> None:
    """Send ``tensor`` (any device) to global rank ``dst``."""
    dist.send(_staged(tensor, comm_device(group)), dst=dst, group=group)


def recv(tensor: torch.Tensor, src: int | None = None, group: Group = None) -> torch.Tensor:
    """Receive into ``tensor`` (any device) from global rank ``src``; returns ``tensor``."""
    work = _staged(tensor, comm_device(group))
    dist.recv(work, src=src, group=group)
    _copy_back(work, tensor)
    return tensor


def barrier(group: Group = None) -> None:
    """Wait for every rank of ``group`` (NCCL: on the current CUDA device)."""
    device = comm_device(group)
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)


def broadcast_object_list(objects: list[Any], src: int = 0, group: Group = None) -> list[Any]:
    """Pickled-object broadcast from global rank ``src`` (in place); returns ``objects``."""
    dist.broadcast_object_list(objects, src=src, group=group, device=comm_device(group))
    return objects


def all_gather_object(object_list: list[Any], obj: Any, group: Group = None) -> list[Any]:
    """Every rank's ``obj`` into ``object_list`` (torch stages it on the current CUDA device under NCCL)."""
    dist.all_gather_object(object_list, obj, group=group)
    return object_list


def send_object_list(objects: list[Any], dst: int, group: Group = None) -> None:
    """Send pickled ``objects`` to global rank ``dst``."""
    dist.send_object_list(objects, dst=dst, group=group, device=comm_device(group))


def recv_object_list(objects: list[Any], src: int | None = None, group: Group = None) -> list[Any]:
    """Receive pickled objects from global rank ``src`` into ``objects``; returns it."""
    dist.recv_object_list(objects, src=src, group=group, device=comm_device(group))
    return objects


# ------------------------------------------------------------------------------------------------------
# audit
# ------------------------------------------------------------------------------------------------------

class CollectiveAuditError(RuntimeError):
    """A collective broke the project's rule: wrong device for its group, or a call that bypasses comm.py."""


TENSOR_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced",
    "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "gather",
    "scatter", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "all_reduce_coalesced",
)
OTHER_COLLECTIVES = (
    "batch_isend_irecv", "barrier", "monitored_barrier", "broadcast_object_list", "all_gather_object",
    "gather_object", "scatter_object_list", "send_object_list", "recv_object_list",
)
_PROJECT = "megatron_vgpo"
_installed: dict[str, Callable[..., Any]] = {}


def audit_installed() -> bool:
    """Whether :func:`install_audit` has wrapped this process's collectives."""
    return bool(_installed)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []


def _check_devices(name: str, tensors: Sequence[torch.Tensor], group: Any) -> None:
    """Rule (a): every tensor on a device ``group`` communicates on."""
    if not tensors or not dist.is_initialized():
        return
    try:
        backend = str(dist.get_backend(group))
    except (ValueError, RuntimeError):  # not a member of ``group``: torch itself reports it
        return
    if backend == "fake":  # torch's fake backend (meta-device memory planning) moves no data
        return
    allowed = _backend_devices(backend)
    for tensor in tensors:
        if tensor.device not in allowed:
            raise CollectiveAuditError(
                f"torch.distributed.{name}: tensor on {tensor.device}, expected {allowed[0]} for a {backend} group "
                f"(route the call through megatron_vgpo.distributed.comm, which moves it)")


def _check_caller(name: str, frame: Any) -> None:
    """Rule (b): no module of the project but this one calls a collective directly.

    Torch re-dispatches a collective through any active ``TorchFunctionMode`` (the CPU platform's device
    mode is one): the frames of that dispatch are skipped, so the re-entered call is attributed to torch.
    """
    while frame is not None and (frame.f_code.co_name == "__torch_function__"
                                 or frame.f_globals.get("__name__", "") == "torch.overrides"):
        frame = frame.f_back
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    if (module == _PROJECT or module.startswith(_PROJECT + ".")) and module != __name__:
        raise CollectiveAuditError(
            f"torch.distributed.{name} called directly from {module} (line {frame.f_lineno}); use "
            f"megatron_vgpo.distributed.comm.{name.lstrip('_')}, which runs it on the group's device")


def _audited(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)
    tensor_collective = name in TENSOR_COLLECTIVES

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_caller(name, sys._getframe(1))
        if name == "batch_isend_irecv":
            for p2p in (args[0] if args else kwargs.get("p2p_op_list", [])):
                _check_devices(name, [p2p.tensor], p2p.group)
        elif tensor_collective:
            bound = signature.bind_partial(*args, **kwargs).arguments
            tensors = [t for key, value in bound.items() if key != "group" for t in _tensors(value)]
            _check_devices(name, tensors, bound.get("group"))
        return original(*args, **kwargs)

    wrapper.__wrapped_by_audit__ = True  # type: ignore[attr-defined]
    return wrapper


def install_audit() -> None:
    """Wrap the ``torch.distributed`` collectives of this process with the audit (idempotent)."""
    if _installed:
        return
    c10d = dist.distributed_c10d
    for name in TENSOR_COLLECTIVES + OTHER_COLLECTIVES:
        original = getattr(c10d, name, None)
        if original is None:
            continue
        wrapped = _audited(name, original)
        _installed[name] = original
        setattr(c10d, name, wrapped)
        if getattr(dist, name, None) is original:
            setattr(dist, name, wrapped)
    logger.debug("collective audit installed on %d functions", len(_installed))


def maybe_install_audit() -> bool:
    """Install the audit when ``MEGATRON_VGPO_COLLECTIVE_AUDIT=1``; returns whether it is installed."""
    if os.environ.get(AUDIT_ENV, "") not in ("", "0"):
        install_audit()
    return audit_installed()
