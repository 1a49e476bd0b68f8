"""Registers the ``torch.ops.sgl_kernel.*`` CPU ops that SGLang looks up when its module is imported.

Runs at interpreter start (``sitecustomize``) only in processes launched with this folder on
``PYTHONPATH`` and ``SGLANG_USE_CPU_ENGINE=1``. The ops are the ones SGLang resolves at import time;
none of them is called by Qwen2 / Qwen2.5-VL on a CPU without AMX, so each raises if called, except
``fused_sigmoid_mul_cpu`` whose reference semantics (x *= sigmoid(gate)) are one line of torch.
"""

import os

if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    import torch

    _OPS_RESOLVED_AT_IMPORT = (
        "fused_qk_gemma_rmsnorm_cpu",
        "fused_qk_gemma_rmsnorm_with_gate_cpu",
        "fused_qkvzba_split_reshape_cat_contiguous_cpu",
    )
    _library = torch.library.Library("sgl_kernel", "FRAGMENT")

    def _fused_sigmoid_mul(x: torch.Tensor, gate: torch.Tensor) -> None:
        x.mul_(torch.sigmoid(gate))

    _library.define("fused_sigmoid_mul_cpu(Tensor(a!) x, Tensor gate) -> ()")
    _library.impl("fused_sigmoid_mul_cpu", _fused_sigmoid_mul, "CPU")

    def _make_unavailable(op_name: str):
        def _unavailable(x: torch.Tensor) -> None:
            raise NotImplementedError(f"torch.ops.sgl_kernel.{op_name}: not available in the CPU stand-in")

        return _unavailable

    for _name in _OPS_RESOLVED_AT_IMPORT:
        _library.define(f"{_name}(Tensor x) -> ()")
        _library.impl(_name, _make_unavailable(_name), "CPU")
