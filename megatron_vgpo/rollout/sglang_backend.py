"""SGLang as a rollout engine: :class:`SGLangEngine` hosts ``sglang.Engine`` in a worker process.

Why a worker process: SGLang's CPU engine needs ``SGLANG_USE_CPU_ENGINE=1`` and the ``sgl_kernel``
stand-in when the interpreter *starts* (see :mod:`megatron_vgpo.platform.sglang_cpu`), and when a child of
the engine fails SGLang kills its parent. So :class:`SGLangEngine` starts
``python -m megatron_vgpo.rollout.sglang_worker`` with :func:`engine_env` and talks to it over a
``multiprocessing.connection`` (AF_UNIX socket, random authkey, pickled messages). If the worker dies, the
next call raises :class:`EngineWorkerDied` with the tail of its log. With CUDA (``in_process=True``, the
default there) the engine is hosted in this process instead, which lets the tensor transport hand CUDA
tensors to SGLang directly.

Requests are sent as raw token ids (text prompts are tokenized here with the folder's tokenizer) plus
``image_data`` (PIL images), one SGLang request per sample (``n`` copies of a prompt share its cached
prefix). Logprobs are SGLang's default: ``log_softmax(logits / temperature)`` (see
:mod:`megatron_vgpo.rollout.base`). :meth:`SGLangEngine.score` scores given responses with a prefill-only
request (``max_new_tokens=0``, ``return_logprob=True``, ``logprob_start_len``): the last ``R`` entries of
``input_token_logprobs`` are the response's logprobs (SGLang counts ``logprob_start_len`` in the
image-expanded sequence, so the start is set early enough and the tail is taken).

Weight sync transports (``weight_sync=``): ``"tensor"`` (:mod:`.sync_tensor`), ``"distributed"``
(:mod:`.sync_distributed`), ``"disk"`` (:mod:`.sync_disk`).
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_vgpo.platform.sglang_cpu import engine_env
from megatron_vgpo.rollout.base import (
    DEFAULT_BUCKET_BYTES,
    RolloutEngine,
    RolloutOutput,
    RolloutRequest,
    SamplingParams,
    WeightSyncStats,
)
from megatron_vgpo.rollout.sglang_worker import AUTHKEY_ENV, STALE_CACHE_SAFE_ENV, EngineHost, flatten_bucket
from megatron_vgpo.rollout.sync_disk import sync_weights_by_disk
from megatron_vgpo.rollout.sync_distributed import DistributedWeightSender, Waiter
from megatron_vgpo.rollout.sync_tensor import sync_weights_by_tensor

logger = logging.getLogger(__name__)

WEIGHT_SYNC_TRANSPORTS = ("tensor", "distributed", "disk")


class EngineWorkerDied(RuntimeError):
    """The SGLang worker process exited; the message carries its exit code and log tail."""


# ---------------------------------------------------------------------------------------------------------
# Request building and result parsing, shared with the HTTP server engine.
# ---------------------------------------------------------------------------------------------------------
def tokenize_prompts(tokenizer: Any, requests: Sequence[RolloutRequest]) -> list[list[int]]:
    """Raw prompt ids of each request (text prompts tokenized without adding special tokens)."""
    return [
        [int(t) for t in r.prompt_ids]
        if r.prompt_ids is not None
        else list(tokenizer(r.prompt_text, add_special_tokens=False)["input_ids"])
        for r in requests
    ]


def sglang_sampling_params(params: SamplingParams, row_index: int) -> dict[str, Any]:
    """SGLang ``sampling_params`` of one sample (row ``row_index`` of the request-major batch)."""
    sampling: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": 1.0 if params.greedy else params.top_p,
        "top_k": -1,
        "skip_special_tokens": False,
    }
    if params.stop_token_ids:
        sampling["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:  # honoured by SGLang only with deterministic inference
        sampling["sampling_seed"] = params.seed + row_index
    return sampling


def parse_generation(result: dict[str, Any]) -> tuple[list[int], torch.Tensor, str]:
    """(response ids, float32 logprobs [R], finish reason) of one SGLang generate result."""
    meta = result["meta_info"]
    pairs = meta.get("output_token_logprobs") or []
    ids = [int(tok) for _, tok, *_ in pairs]
    logprobs = torch.tensor([float(lp) for lp, *_ in pairs], dtype=torch.float32)
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if kind not in ("stop", "length"):
        raise RuntimeError(f"SGLang request {meta.get('id')} ended with finish reason {reason!r}")
    return ids, logprobs, kind


def parse_prompt_logprobs(result: dict[str, Any], response_len: int) -> torch.Tensor:
    """The last ``response_len`` prompt-side logprobs of a prefill-only result (float32 [R])."""
    pairs = result["meta_info"].get("input_token_logprobs") or []
    tail = pairs[len(pairs) - response_len :] if response_len else []
    if len(tail) != response_len or any(lp is None for lp, *_ in tail):
        raise RuntimeError(f"SGLang returned {len(pairs)} input logprobs, cannot take the last {response_len}")
    return torch.tensor([float(lp) for lp, *_ in tail], dtype=torch.float32)


def _run_in_thread(function: Any, *args: Any) -> Waiter:
    """Start ``function(*args)`` in a daemon thread; the waiter joins it and returns or re-raises."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def wait() -> Any:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    return wait


class _WorkerConnection:
    """The parent's end of the worker protocol (see :mod:`.sglang_worker`)."""

    def __init__(self, start_timeout_s: float) -> None:
        from multiprocessing.connection import Listener

        self._tmp = tempfile.TemporaryDirectory(prefix="sglang_worker_")
        authkey = secrets.token_bytes(32)
        self._listener = Listener(os.path.join(self._tmp.name, "sock"), family="AF_UNIX", authkey=authkey)
        self.log_path = Path(self._tmp.name) / "worker.log"
        env = engine_env()
        env.update(STALE_CACHE_SAFE_ENV)
        env[AUTHKEY_ENV] = authkey.hex()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        command = [sys.executable, "-m", "megatron_vgpo.rollout.sglang_worker", self._listener.address]
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        accepted: list[Any] = []
        thread = threading.Thread(target=lambda: accepted.append(self._listener.accept()), daemon=True)
        thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not accepted:
            self._raise_if_dead("while connecting")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"SGLang worker did not connect within {start_timeout_s} s")
            thread.join(0.2)
        self.conn = accepted[0]
        self.pending: str | None = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no worker log>"

    def _raise_if_dead(self, when: str) -> None:
        code = self.process.poll()
        if code is not None:
            raise EngineWorkerDied(f"SGLang worker exited with code {code} {when}; log tail:\n{self.log_tail()}")

    def send(self, command: str, payload: dict[str, Any]) -> None:
        if self.pending is not None:
            raise RuntimeError(f"worker call {command!r} while {self.pending!r} is still pending")
        self._raise_if_dead(f"before {command!r}")
        self.conn.send_bytes(pickle.dumps((command, payload), protocol=pickle.HIGHEST_PROTOCOL))
        self.pending = command

    def receive(self, timeout_s: float) -> Any:
        command, self.pending = self.pending, None
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.5):
            self._raise_if_dead(f"during {command!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"SGLang worker: {command!r} took more than {timeout_s} s")
        try:
            status, value = pickle.loads(self.conn.recv_bytes())
        except EOFError:
            self.process.wait(timeout=30)
            self._raise_if_dead(f"during {command!r}")
            raise
        if status == "error":
            raise RuntimeError(f"SGLang worker: {command!r} failed:\n{value}")
        return value

    def close(self, timeout_s: float = 60.0) -> None:
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("SGLang worker %d did not exit; killing it", self.process.pid)
                self.process.kill()
                self.process.wait()
        for closer in (getattr(self, "conn", None), self._listener, self._log):
            if closer is not None:
                closer.close()
        self._tmp.cleanup()


class SGLangEngine(RolloutEngine):
    """One ``sglang.Engine`` serving ``model_path``, in a worker process (CPU) or in-process (CUDA).

    Args:
        model_path: Hugging Face folder the engine loads (also the template for disk syncs).
        engine_kwargs: extra ``sglang.Engine`` arguments (merged over the CPU defaults of
            :func:`megatron_vgpo.platform.sglang_cpu.engine_kwargs`; ``model_path`` is set here).
        weight_sync: default transport of :meth:`update_weights`: ``"tensor"``, ``"distributed"``, ``"disk"``.
        sync_dir: folder for disk syncs (default: a temporary folder removed at shutdown).
        in_process: host the engine in this process (default: only when CUDA is available).
        start_timeout_s / request_timeout_s: limits for the engine start and for one call.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        engine_kwargs: dict[str, Any] | None = None,
        weight_sync: str = "tensor",
        sync_dir: str | Path | None = None,
        in_process: bool | None = None,
        start_timeout_s: float = 900.0,
        request_timeout_s: float = 3600.0,
    ) -> None:
        from transformers import AutoTokenizer

        if weight_sync not in WEIGHT_SYNC_TRANSPORTS:
            raise ValueError(f"weight_sync must be one of {WEIGHT_SYNC_TRANSPORTS}, got {weight_sync!r}")
        self._model_path = str(Path(model_path).resolve())
        self.weight_sync = weight_sync
        self.request_timeout_s = request_timeout_s
        self.engine_kwargs = {"model_path": self._model_path, **(engine_kwargs or {})}
        self.tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        self._sync_tmp = None if sync_dir else tempfile.TemporaryDirectory(prefix="weight_sync_")
        self.sync_dir = Path(sync_dir) if sync_dir else Path(self._sync_tmp.name)
        self._sender: DistributedWeightSender | None = None
        self._host: EngineHost | None = None
        self._worker: _WorkerConnection | None = None
        self._in_process_result: Any = None
        in_process = torch.cuda.is_available() if in_process is None else in_process
        start = time.perf_counter()
        if in_process:
            self._host = EngineHost()
        else:
            self._worker = _WorkerConnection(start_timeout_s)
        try:
            self.info = self._call("start", {"engine_kwargs": self.engine_kwargs}, timeout_s=start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        logger.info("SGLang engine for %s ready in %.1f s", self._model_path, time.perf_counter() - start)

    # ------------------------------------------------------------------ channel
    def _start(self, command: str, payload: dict[str, Any], *, background: bool = False) -> Waiter:
        """Send a command; the returned waiter gives its result. ``background``: the call blocks in a
        collective this process must join afterwards (in-process hosting then runs it in a thread)."""
        if self._host is not None:
            if not background:
                result = self._host.handle(command, payload)
                return lambda: result
            return _run_in_thread(self._host.handle, command, payload)
        if self._worker is None:
            raise RuntimeError("the SGLang engine was shut down")
        self._worker.send(command, payload)
        worker = self._worker
        return lambda: worker.receive(self.request_timeout_s)

    def _call(self, command: str, payload: dict[str, Any], timeout_s: float | None = None) -> Any:
        if self._worker is not None and timeout_s is not None:
            self._worker.send(command, payload)
            return self._worker.receive(timeout_s)
        return self._start(command, payload)()

    def _engine_call(self, method: str, **kwargs: Any) -> Any:
        return self._call("call", {"method": method, "kwargs": kwargs})

    @property
    def model_path(self) -> str:
        return self._model_path

    # ------------------------------------------------------------------ rollouts
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[RolloutOutput]:
        """See :meth:`RolloutEngine.generate`: one SGLang request per sample, one batched call."""
        prompt_ids = tokenize_prompts(self.tokenizer, requests)
        rows = [(i, j) for i in range(len(requests)) for j in range(params.n)]
        if not rows:
            return []
        payload: dict[str, Any] = {
            "input_ids": [prompt_ids[i] for i, _ in rows],
            "sampling_params": [sglang_sampling_params(params, k) for k in range(len(rows))],
            "return_logprob": True,
        }
        if any(r.images for r in requests):
            payload["image_data"] = [list(requests[i].images) or None for i, _ in rows]
        results = self._call("generate", payload)
        outputs = []
        for (i, j), result in zip(rows, results, strict=True):
            ids, logprobs, finish = parse_generation(result)
            outputs.append(RolloutOutput(requests[i].uid, j, prompt_ids[i], ids, logprobs, finish))  # type: ignore[arg-type]
        return outputs

    def score(
        self,
        requests: Sequence[RolloutRequest],
        response_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        """Engine logprobs of given responses (prefill only). Only ``temperature == 1`` is supported:
        SGLang returns prompt-side logprobs of the raw logits."""
        if temperature != 1.0:
            raise ValueError("SGLang scores prompt tokens under temperature 1 only; divide the actor's logits by 1")
        if len(requests) != len(response_ids):
            raise ValueError(f"{len(requests)} requests but {len(response_ids)} responses")
        prompt_ids = tokenize_prompts(self.tokenizer, requests)
        payload: dict[str, Any] = {
            "input_ids": [p + [int(t) for t in r] for p, r in zip(prompt_ids, response_ids)],
            "sampling_params": [{"max_new_tokens": 0, "temperature": 0.0}] * len(requests),
            "return_logprob": True,
            "logprob_start_len": [max(len(p) - 1, 0) for p in prompt_ids],
        }
        if any(r.images for r in requests):
            payload["image_data"] = [list(r.images) or None for r in requests]
        results = self._call("generate", payload)
        return [parse_prompt_logprobs(res, len(r)) for res, r in zip(results, response_ids, strict=True)]

    # ------------------------------------------------------------------ weight sync
    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        transport: str | None = None,
    ) -> WeightSyncStats:
        """Push ``(HF checkpoint name, full tensor)`` pairs with ``transport`` (default ``weight_sync``)."""
        transport = transport or self.weight_sync
        if transport == "tensor":
            return sync_weights_by_tensor(self, named_tensors, bucket_bytes=bucket_bytes)
        if transport == "disk":
            return sync_weights_by_disk(self, named_tensors, sync_dir=self.sync_dir, bucket_bytes=bucket_bytes)
        if transport == "distributed":
            if self._sender is None:
                self._sender = DistributedWeightSender(self)
            return self._sender.sync(named_tensors, bucket_bytes=bucket_bytes)
        raise ValueError(f"unknown transport {transport!r}; choose from {WEIGHT_SYNC_TRANSPORTS}")

    # TensorSyncTarget
    def begin_weight_update(self) -> None:
        self._engine_call("begin_weight_update")

    def end_weight_update(self) -> None:
        self._engine_call("end_weight_update")

    def push_tensor_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        if self._host is not None:
            self._call("tensor_bucket", {"named_tensors": bucket})
        else:
            flat, metadata = flatten_bucket(bucket)
            self._call("tensor_bucket", {"flat": flat, "metadata": metadata})

    # DiskSyncTarget
    def update_weights_from_disk(self, path: str) -> None:
        self._engine_call("update_weights_from_disk", model_path=path)

    # DistributedSyncTarget
    def engine_ranks(self) -> int:
        return int(self.engine_kwargs.get("tp_size", 1)) * int(self.engine_kwargs.get("dp_size", 1))

    def start_init_weights_update_group(self, **kwargs: Any) -> Waiter:
        return self._start("call", {"method": "init_weights_update_group", "kwargs": kwargs}, background=True)

    def start_update_weights_from_distributed(self, **kwargs: Any) -> Waiter:
        kwargs = {**kwargs, "flush_cache": False}
        return self._start("call", {"method": "update_weights_from_distributed", "kwargs": kwargs}, background=True)

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._engine_call("destroy_weights_update_group", group_name=group_name)

    # ------------------------------------------------------------------ control
    def flush_cache(self) -> None:
        self._engine_call("flush_cache")

    def pause(self) -> None:
        """Abort in-flight requests and hold new ones until :meth:`resume`."""
        self._call("pause", {"mode": "abort"})

    def resume(self) -> None:
        self._call("resume", {})

    def release_memory(self) -> None:
        """Free weights and KV cache on the GPU; on CPU a logged no-op (SGLang's release is CUDA-only)."""
        if not self.info.get("cuda"):
            super().release_memory()
            return
        self._engine_call("release_memory_occupation")

    def resume_memory(self) -> None:
        if not self.info.get("cuda"):
            super().resume_memory()
            return
        self._engine_call("resume_memory_occupation")

    def shutdown(self) -> None:
        """Destroy the weight-update group, stop the engine and the worker. Idempotent."""
        if self._sender is not None:
            sender, self._sender = self._sender, None
            sender.close()
        if self._host is not None:
            host, self._host = self._host, None
            host.shutdown()
        if self._worker is not None:
            worker, self._worker = self._worker, None
            try:
                if worker.process.poll() is None:
                    worker.pending = None
                    worker.send("shutdown", {})
                    worker.receive(120.0)
            except Exception as error:
                logger.warning("SGLang worker shutdown: %s", error)
            worker.close()
        if self._sync_tmp is not None:
            self._sync_tmp.cleanup()
            self._sync_tmp = None
