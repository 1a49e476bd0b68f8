"""Stand-in for the CPU build of ``sgl-kernel`` (not published on PyPI).

SGLang imports ``sgl_kernel`` unconditionally. On a CPU without AMX its CPU engine takes torch code paths
and calls none of these kernels, so every attribute here is a function that raises if it is ever called:
a call would mean SGLang took a kernel path we cannot serve, and it must fail loudly, not silently.
Only put on ``PYTHONPATH`` by :func:`megatron_vgpo.platform.sglang_cpu.engine_env` when CUDA is absent.
"""

__version__ = "0.0.0+megatron_vgpo.standin"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _not_available(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this is megatron_vgpo's CPU stand-in for sgl-kernel "
            "(the real CPU kernels are not published); this code path needs a GPU or AMX build"
        )

    _not_available.__name__ = name
    return _not_available
