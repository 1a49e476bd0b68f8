"""The process that hosts one ``sglang.Engine`` for :class:`~megatron_vgpo.rollout.sglang_backend.SGLangEngine`.

Run as ``python -m megatron_vgpo.rollout.sglang_worker ADDRESS`` with the environment of
:func:`megatron_vgpo.platform.sglang_cpu.engine_env` (SGLang's CPU engine needs it at interpreter start)
plus ``MEGATRON_VGPO_WORKER_AUTHKEY`` (hex). It connects to the parent's
``multiprocessing.connection.Listener`` at ``ADDRESS`` and serves requests until ``shutdown``.

Protocol: every message is ``pickle.dumps(obj)`` sent with ``send_bytes`` (plain pickle, so a CPU tensor
travels as its bytes; no shared-memory file descriptors between unrelated processes). The parent sends
``(command, payload)``; the worker answers ``("ok", result)`` or ``("error", traceback text)``. Commands are
those of :meth:`EngineHost.handle`. With CUDA, :class:`EngineHost` can also be used in-process.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

AUTHKEY_ENV = "MEGATRON_VGPO_WORKER_AUTHKEY"
# SGLang 0.5.23 caches vision-encoder outputs by image hash (SGLANG_VLM_CACHE_SIZE_MB, default 100) and
# flush_cache does NOT clear that cache: after a weight update, an image seen before would still be
# embedded with the OLD vision weights (measured: logprob gap ~1 on the tiny model). RL re-uses images,
# so every engine this package starts runs with that cache off.
STALE_CACHE_SAFE_ENV: dict[str, str] = {"SGLANG_VLM_CACHE_SIZE_MB": "0"}
# Fields of a generate result the parent needs (the rest of meta_info stays in the worker).
_META_KEYS = ("finish_reason", "output_token_logprobs", "input_token_logprobs", "prompt_tokens", "id")


def flatten_bucket(bucket: Sequence[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """One contiguous CPU uint8 tensor [total_bytes] holding a bucket, and per-tensor metadata
    (``name``, ``dtype`` string, ``shape``, byte ``start``/``end``). Uses SGLang's ``FlattenedTensorBucket``
    layout (tensors concatenated in order as bytes)."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    cpu_bucket = [(name, t.detach().to("cpu").contiguous()) for name, t in bucket]
    flat = FlattenedTensorBucket(named_tensors=cpu_bucket)
    metadata = [
        {
            "name": m.name,
            "dtype": str(m.dtype).removeprefix("torch."),
            "shape": list(m.shape),
            "start": m.start_idx,
            "end": m.end_idx,
        }
        for m in flat.get_metadata()
    ]
    return flat.get_flattened_tensor(), metadata


def unflatten_bucket(flat: torch.Tensor, metadata: Sequence[dict[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """Tensors rebuilt from :func:`flatten_bucket` metadata: views into ``flat`` (no copy), except for a
    tensor whose byte offset is not a multiple of its element size (mixed dtypes), which is copied."""
    out = []
    for m in metadata:
        dtype = getattr(torch, m["dtype"])
        raw = flat[m["start"] : m["end"]]
        if m["start"] % dtype.itemsize:
            raw = raw.clone()
        out.append((m["name"], raw.view(dtype).reshape(m["shape"])))
    return out


def _check_success(method: str, result: Any) -> Any:
    """SGLang's weight APIs answer ``(success, message, ...)``; turn a failure into an exception."""
    if isinstance(result, tuple) and result and isinstance(result[0], bool) and not result[0]:
        raise RuntimeError(f"sglang.Engine.{method} failed: {result[1] if len(result) > 1 else result}")
    return result


class EngineHost:
    """Owns one ``sglang.Engine`` and executes commands on it (in the worker process, or in-process)."""

    def __init__(self) -> None:
        self.engine: Any = None

    def handle(self, command: str, payload: dict[str, Any]) -> Any:
        """Execute one command.

        Commands: ``start`` (``engine_kwargs``: user keyword arguments, merged over the CPU defaults),
        ``generate`` (keyword arguments of ``sglang.Engine.generate``; returns a list of trimmed result
        dicts), ``call`` (``method``, ``kwargs``: any engine method, e.g. ``update_weights_from_disk``),
        ``tensor_bucket`` (``flat`` + ``metadata`` from :func:`flatten_bucket`, or ``named_tensors``;
        ``update_weights_from_tensor`` without flushing), ``pause`` (``mode``), ``resume``, ``shutdown``.
        """
        if command == "start":
            return self._start(payload["engine_kwargs"])
        if self.engine is None:
            raise RuntimeError(f"command {command!r} before the engine was started")
        if command == "generate":
            results = self.engine.generate(**payload)
            return [
                {"output_ids": r.get("output_ids"), "meta_info": {k: r["meta_info"].get(k) for k in _META_KEYS}}
                for r in results
            ]
        if command == "call":
            method = payload["method"]
            return _check_success(method, getattr(self.engine, method)(**payload.get("kwargs", {})))
        if command == "tensor_bucket":
            named = payload.get("named_tensors")
            if named is None:
                named = unflatten_bucket(payload["flat"], payload["metadata"])
            result = self.engine.update_weights_from_tensor(named_tensors=list(named), flush_cache=False)
            return _check_success("update_weights_from_tensor", result)
        if command in ("pause", "resume"):
            from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput

            manager = self.engine.tokenizer_manager
            if command == "pause":
                coroutine = manager.pause_generation(PauseGenerationReqInput(mode=payload.get("mode", "abort")))
            else:
                coroutine = manager.continue_generation(ContinueGenerationReqInput())
            return self.engine.loop.run_until_complete(coroutine)
        if command == "shutdown":
            self.shutdown()
            return None
        raise ValueError(f"unknown worker command {command!r}")

    def _start(self, user_kwargs: dict[str, Any]) -> dict[str, Any]:
        import sglang

        from megatron_vgpo.platform.sglang_cpu import engine_kwargs

        os.environ.update(STALE_CACHE_SAFE_ENV)  # in-process hosting; the worker already has it
        self.engine = sglang.Engine(**engine_kwargs(user_kwargs))
        return {"pid": os.getpid(), "cuda": torch.cuda.is_available()}

    def shutdown(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Connect to the parent and serve until ``shutdown`` or until the parent goes away."""
    from multiprocessing.connection import Client

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m megatron_vgpo.rollout.sglang_worker ADDRESS", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[sglang_worker %(process)d] %(levelname)s %(message)s")
    authkey = bytes.fromhex(os.environ.pop(AUTHKEY_ENV))
    conn = Client(args[0], family="AF_UNIX", authkey=authkey)
    host = EngineHost()
    try:
        while True:
            try:
                command, payload = pickle.loads(conn.recv_bytes())
            except EOFError:
                logger.info("parent closed the connection; shutting down")
                return 0
            try:
                reply: tuple[str, Any] = ("ok", host.handle(command, payload))
            except Exception:
                reply = ("error", traceback.format_exc())
            conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
            if command == "shutdown":
                return 0
    finally:
        host.shutdown()
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
