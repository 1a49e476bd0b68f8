"""What SGLang needs to serve on a CPU-only machine (a no-op with CUDA).

SGLang 0.5.23's CPU engine (``device="cpu"``, ``attention_backend="torch_native"``) serves tiny Qwen2 and
Qwen2.5-VL models here if (1) an importable ``sgl_kernel`` exists (the CPU build of sgl-kernel is not on
PyPI: :mod:`sgl_kernel_standin` provides one whose functions raise if called) and (2) four
``torch.ops.sgl_kernel`` ops are registered at interpreter start (``sgl_kernel_standin/sitecustomize.py``),
and (3) ``SGLANG_USE_CPU_ENGINE=1`` is in the environment when the interpreter STARTS (set later, the
Qwen2.5-VL multimodal processor is not registered and the engine reports "No processor registered for
architecture Qwen2_5_VLForConditionalGeneration"). Hence SGLang runs in a subprocess started with
:func:`engine_env`. When a child of the engine fails SGLang kills its parent, another reason for a
subprocess. ``release_memory_occupation`` is CUDA-only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

STANDIN_DIR = Path(__file__).resolve().parent / "sgl_kernel_standin"

# Engine arguments that worked on CPU (see DESIGN.md); merged under the caller's own arguments.
CPU_ENGINE_DEFAULTS: dict[str, object] = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "disable_cuda_graph": True,
    "skip_server_warmup": True,
    "mem_fraction_static": 0.3,  # the KV pool stays capped by max_total_tokens; 0.05 fails under memory pressure
    "max_total_tokens": 4096,
}


def engine_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess that will import SGLang: unchanged with CUDA; on CPU it puts the
    stand-in first on ``PYTHONPATH`` and sets ``SGLANG_USE_CPU_ENGINE=1``."""
    env = dict(os.environ if base is None else base)
    if torch.cuda.is_available():
        return env
    paths = [str(STANDIN_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    return env


def engine_kwargs(user_kwargs: Mapping[str, object] | None = None) -> dict[str, object]:
    """``sglang.Engine`` keyword arguments: the CPU defaults (only without CUDA) overridden by the user's."""
    base = {} if torch.cuda.is_available() else dict(CPU_ENGINE_DEFAULTS)
    base.update(user_kwargs or {})
    return base
