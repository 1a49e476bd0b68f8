"""Process-wide patches under which Megatron-Core runs on a CPU-only machine with gloo.

Megatron-Core assumes CUDA in a handful of places (RNG tracker, ``torch.cuda.current_device()`` as an
allocation device, ``device="cuda"`` literals in the pipeline schedules and optimizers, ``param.type()``
checks, the SP assert of its torch norm fallback). Each patch below removes exactly one of those
assumptions. Every patch is a no-op when CUDA is available, and each can be switched off with the
``MEGATRON_VGPO_CPU_PATCHES`` environment variable (``all`` (default), ``none``, or a comma list of
names), which is how each one was shown to be necessary.

Patches (name: what breaks without it -> what it does):

``cuda_device``
    Megatron allocates with ``device=torch.cuda.current_device()`` (SP gather/scatter buffers, p2p
    receive buffers, rotary ``inv_freq``, DDP grad buffers) and calls ``torch.cuda.synchronize`` and
    streams/events. -> ``current_device()`` returns the CPU device; synchronize, streams and events
    become no-ops.
``device_map``
    The pipeline schedules (``total_num_tokens``), optimizers (``found_inf``, ``_scale_one``), grad
    clipping and the grad scaler hard-code ``device="cuda"`` / ``.cuda()``. -> A process-wide
    ``TorchFunctionMode`` rewrites CUDA device arguments of factory functions, ``Tensor.to``,
    ``Tensor.cuda`` and ``pin_memory`` to CPU. Torch function modes do not reach the autograd engine's
    backward calls, and activation recompute re-runs forward code (``device="cuda"`` causal masks)
    inside Megatron's ``CheckpointFunction`` / ``CheckpointWithoutOutputFunction`` backward: those two
    backward methods enter the mode again.
``cuda_tensor_type``
    The optimizers check ``param.type() == "torch.cuda.FloatTensor"`` (clip_grads, optimizer,
    distrib_optimizer). -> Inside the same mode, a bare ``Tensor.type()`` of a CPU tensor reports the
    ``torch.cuda.*`` name. Requires ``device_map``.
``rng_tracker``
    ``model_parallel_cuda_manual_seed`` and the tracker's ``fork`` read and write CUDA generator
    states. -> A tracker with the same interface whose states are CPU generator states. Activation
    recompute (``tensor_parallel.checkpoint``, ``CheckpointWithoutOutput``) also saves and restores "the
    CUDA RNG state" beside the CPU one and the tracker's: on a CPU there is none, so Megatron's
    ``_get_cuda_rng_state`` returns ``None`` and ``_set_cuda_rng_state(None)`` does nothing (the CPU
    state and the tracker's states, which are what a CPU run draws from, are still restored).
``sp_norm``
    Without apex/TE, Megatron's ``WrappedTorchNorm`` asserts ``not sequence_parallel``. -> Build the
    norm with the flag off, then tag its parameters ``sequence_parallel=True`` exactly as apex's fused
    norm does, so ``finalize_model_grads`` all-reduces their grads over the TP group.

Not patches but requirements: ``dist_checkpointing`` imports ``psutil`` (a declared dependency), and
scripts launched with spawn/torchrun need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "MEGATRON_VGPO_CPU_PATCHES"
ALL_PATCHES = ("cuda_device", "device_map", "cuda_tensor_type", "rng_tracker", "sp_norm")

_applied: list[str] = []
_device_mode: torch.overrides.TorchFunctionMode | None = None


def requested_patches() -> set[str]:
    """The patch names enabled by ``MEGATRON_VGPO_CPU_PATCHES`` (default: all)."""
    value = os.environ.get(ENV_VAR, "all").strip()
    if value == "all":
        return set(ALL_PATCHES)
    if value in ("", "none"):
        return set()
    names = {v.strip() for v in value.split(",") if v.strip()}
    unknown = names - set(ALL_PATCHES)
    if unknown:
        raise ValueError(f"{ENV_VAR}: unknown patch name(s) {sorted(unknown)}; known: {list(ALL_PATCHES)}")
    return names


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: records nothing, always complete."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: _NullEvent) -> float:
        return 0.0


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args, **kwargs) -> _NullEvent:
        return _NullEvent()


def patch_cuda_device() -> None:
    """``torch.cuda.current_device()`` -> CPU device; sync, streams and events become no-ops."""
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _is_cuda_device(device: object) -> bool:
    if device is None or isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare int device means cuda:N
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made while the mode is active.

    Handles ``device=`` keyword arguments of factory functions, ``Tensor.to(<cuda device>, ...)``,
    ``Tensor.cuda()``, ``Tensor.pin_memory()`` and ``pin_memory=True``. With ``fake_cuda_type`` a bare
    ``Tensor.type()`` of a CPU tensor reports ``torch.cuda.<Type>`` (the optimizers' type checks).
    """

    def __init__(self, fake_cuda_type: bool) -> None:
        super().__init__()
        self.fake_cuda_type = fake_cuda_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if self.fake_cuda_type and func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=torch.device("cpu"))
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


def patch_device_map(fake_cuda_type: bool) -> None:
    """Enter a process-wide :class:`CudaToCpuMode` (stays active for the life of the process), and in the
    backward of Megatron's recompute functions (the autograd engine runs those without the mode)."""
    global _device_mode
    _device_mode = CudaToCpuMode(fake_cuda_type)
    _device_mode.__enter__()
    from megatron.core.tensor_parallel import random as mrandom

    for cls in (mrandom.CheckpointFunction, getattr(mrandom, "CheckpointWithoutOutputFunction", None)):
        if cls is None or getattr(cls.backward, "_megatron_vgpo_patched", False):
            continue
        original = cls.backward

        def backward(ctx, *grads, _original=original):
            with CudaToCpuMode(fake_cuda_type):
                return _original(ctx, *grads)

        backward._megatron_vgpo_patched = True  # type: ignore[attr-defined]
        cls.backward = staticmethod(backward)


def patch_rng_tracker() -> None:
    """Replace Megatron's CUDA RNG-states tracker with one that keeps CPU generator states."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Same bookkeeping as Megatron's tracker; each named state is a CPU generator state."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise KeyError(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    def _get_cuda_rng_state(*args, **kwargs) -> None:
        return None  # no CUDA generator on a CPU-only machine

    def _set_cuda_rng_state(new_state, *args, **kwargs) -> None:
        if new_state is not None:
            raise RuntimeError("a CUDA RNG state reached the CPU patch of _set_cuda_rng_state")

    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state

    original_init = mrandom.initialize_rng_tracker

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs) -> None:
        # Megatron re-creates its tracker on force_reset; keep ours instead.
        if force_reset or not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    initialize_rng_tracker.__wrapped__ = original_init  # type: ignore[attr-defined]
    mrandom.initialize_rng_tracker = initialize_rng_tracker
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def patch_sp_norm() -> None:
    """Let the torch norm fallback accept ``sequence_parallel=True`` and tag its params as apex does."""
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__
    if getattr(original_new, "_megatron_vgpo_patched", False):
        return

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False  # only to pass the assert
        try:
            norm = original_new(cls, config, hidden_size, eps, persist_layer_norm,
                                zero_centered_gamma, normalization)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    __new__._megatron_vgpo_patched = True  # type: ignore[attr-defined]
    torch_norm.WrappedTorchNorm.__new__ = __new__


def apply(names: set[str]) -> list[str]:
    """Apply the named patches once each (idempotent). Returns the names applied by this call."""
    steps: list[tuple[str, Callable[[], None]]] = [
        ("cuda_device", patch_cuda_device),
        ("device_map", lambda: patch_device_map("cuda_tensor_type" in names)),
        ("rng_tracker", patch_rng_tracker),
        ("sp_norm", patch_sp_norm),
    ]
    if "cuda_tensor_type" in names and "device_map" not in names:
        raise ValueError("patch 'cuda_tensor_type' needs 'device_map'")
    done: list[str] = []
    for name, fn in steps:
        if name in names and name not in _applied:
            fn()
            _applied.append(name)
            done.append(name)
    if "cuda_tensor_type" in names and "cuda_tensor_type" not in _applied and "device_map" in _applied:
        _applied.append("cuda_tensor_type")
        done.append("cuda_tensor_type")
    if done:
        logger.debug("megatron CPU patches applied: %s", done)
    return done


def applied() -> list[str]:
    """Names of the patches active in this process."""
    return list(_applied)
