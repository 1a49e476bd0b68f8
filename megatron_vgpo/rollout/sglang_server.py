"""SGLang over HTTP: :class:`SGLangServerEngine` drives one or many running SGLang servers.

For servers started with ``python -m sglang.launch_server`` (or :func:`launch_server` here), possibly
behind SGLang's router, on this or other hosts. It uses SGLang's HTTP API: ``/generate`` (raw prompt ids +
``image_data`` as PNG data URIs, ``return_logprob``), ``/update_weights_from_disk``,
``/init_weights_update_group`` + ``/update_weights_from_distributed``, ``/flush_cache``,
``/pause_generation`` / ``/continue_generation``, ``/release_memory_occupation`` /
``/resume_memory_occupation`` (GPU servers only).

With several URLs, the requests of one ``generate`` call are spread over the servers by prompt (all
samples of a prompt go to the same server, which shares its prefix cache) and sent concurrently; weight
syncs reach every server (disk: each reloads the same folder, which must be visible to all; distributed:
one group holding the trainer as rank 0 and every server's TP ranks after it). The tensor transport
needs a colocated engine (shared memory / CUDA IPC) and is refused here: use ``SGLangEngine``.
Servers at given URLs are not owned: :meth:`SGLangServerEngine.shutdown` only closes the HTTP session;
servers started by :func:`launch_server_engine` are owned and stopped by it.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests as http
import torch

from megatron_vgpo.platform.sglang_cpu import engine_env, engine_kwargs
from megatron_vgpo.rollout.base import (
    DEFAULT_BUCKET_BYTES,
    RolloutEngine,
    RolloutOutput,
    RolloutRequest,
    SamplingParams,
    WeightSyncStats,
)
from megatron_vgpo.rollout.sglang_backend import (
    parse_generation,
    parse_prompt_logprobs,
    sglang_sampling_params,
    tokenize_prompts,
)
from megatron_vgpo.rollout.sglang_worker import STALE_CACHE_SAFE_ENV
from megatron_vgpo.rollout.sync_disk import sync_weights_by_disk
from megatron_vgpo.rollout.sync_distributed import DistributedWeightSender, Waiter

logger = logging.getLogger(__name__)


def image_to_data_uri(image: Any) -> str:
    """A PIL image as a ``data:image/png;base64,...`` string (lossless, so pixels are unchanged)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def server_command(model_path: str | Path, *, host: str, port: int, server_kwargs: dict[str, Any] | None) -> list[str]:
    """``python -m sglang.launch_server`` arguments: the CPU defaults (without CUDA) under the caller's."""
    options = engine_kwargs({"model_path": str(model_path), "host": host, "port": port, **(server_kwargs or {})})
    command = [sys.executable, "-m", "sglang.launch_server"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False and value is not None:
            command += [flag, str(value)]
    return command


def launch_server(
    model_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int,
    server_kwargs: dict[str, Any] | None = None,
    log_path: str | Path | None = None,
    ready_timeout_s: float = 600.0,
) -> subprocess.Popen:
    """Start an SGLang HTTP server (environment of :func:`engine_env`, vision-embedding cache off: see
    ``STALE_CACHE_SAFE_ENV``) and wait until it answers.

    The caller owns the process: end it with :func:`stop_server`. Raises ``RuntimeError`` with the log tail
    when the server exits before it is ready, ``TimeoutError`` after ``ready_timeout_s``.
    """
    log_file = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 (kept by the child)
    command = server_command(model_path, host=host, port=port, server_kwargs=server_kwargs)
    env = {**engine_env(), **STALE_CACHE_SAFE_ENV}
    # own session: stop_server can end the server AND its scheduler/detokenizer children as a group
    process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if process.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-4000:] if log_path else "<no log file>"
            raise RuntimeError(f"SGLang server exited with code {process.returncode}; log tail:\n{tail}")
        try:
            if http.get(f"{url}/model_info", timeout=5).status_code == 200:
                return process
        except http.RequestException:
            pass
        if time.monotonic() > deadline:
            stop_server(process)
            raise TimeoutError(f"SGLang server at {url} not ready within {ready_timeout_s} s")
        time.sleep(1.0)


def stop_server(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """End a server started by :func:`launch_server` and its children: SIGTERM to its process group,
    SIGKILL after ``timeout_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("SGLang server %d ignored SIGTERM for %.0f s; killing its group", process.pid, timeout_s)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


class SGLangServerEngine(RolloutEngine):
    """Rollouts and weight syncs against running SGLang servers at ``urls``.

    Args:
        urls: base URLs (``http://host:port``), one per server (or the router's).
        model_path: the Hugging Face folder the servers serve (tokenizer here; template for disk syncs).
        weight_sync: default transport, ``"disk"`` or ``"distributed"``.
        sync_dir: folder for disk syncs, readable by every server.
        master_address: address of this process as seen by the servers (distributed transport).
        timeout_s: HTTP timeout of one call.
        owned_servers: server processes this engine owns (see :func:`launch_server_engine`);
            :meth:`shutdown` stops them. Servers at other URLs are never stopped.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model_path: str | Path,
        weight_sync: str = "disk",
        sync_dir: str | Path | None = None,
        master_address: str = "127.0.0.1",
        timeout_s: float = 3600.0,
        owned_servers: Sequence[subprocess.Popen] = (),
    ) -> None:
        from transformers import AutoTokenizer

        self._owned = list(owned_servers)

        if not urls:
            raise ValueError("SGLangServerEngine needs at least one server URL")
        if weight_sync not in ("disk", "distributed"):
            raise ValueError(f"weight_sync over HTTP must be 'disk' or 'distributed', got {weight_sync!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self._model_path = str(Path(model_path).resolve())
        self.weight_sync = weight_sync
        self.sync_dir = Path(sync_dir) if sync_dir else None
        self.master_address = master_address
        self.timeout_s = timeout_s
        self.tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        self._session = http.Session()
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.urls)))
        self._sender: DistributedWeightSender | None = None
        self.server_infos = [self._request("GET", url, "/server_info") for url in self.urls]

    @property
    def model_path(self) -> str:
        return self._model_path

    def _request(self, method: str, url: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._session.request(method, url + path, json=body, timeout=self.timeout_s)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {url}{path} -> HTTP {response.status_code}: {response.text[:2000]}")
        try:
            return response.json()
        except ValueError:
            return response.text

    def _all(self, path: str, body: dict[str, Any] | None = None) -> list[Any]:
        futures = [self._pool.submit(self._request, "POST", url, path, body) for url in self.urls]
        return [f.result() for f in futures]

    # ------------------------------------------------------------------ rollouts
    def _post_batches(self, per_server: list[list[int]], build: Any) -> dict[int, Any]:
        """Send one batched /generate per server (rows given by index) concurrently; results by row."""
        futures: list[tuple[list[int], Future]] = []
        for url, rows in zip(self.urls, per_server):
            if rows:
                futures.append((rows, self._pool.submit(self._request, "POST", url, "/generate", build(rows))))
        results: dict[int, Any] = {}
        for rows, future in futures:
            answer = future.result()
            answer = answer if isinstance(answer, list) else [answer]
            results.update(zip(rows, answer, strict=True))
        return results

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[RolloutOutput]:
        """See :meth:`RolloutEngine.generate`; prompts are spread over the servers round-robin."""
        prompt_ids = tokenize_prompts(self.tokenizer, requests)
        rows = [(i, j) for i in range(len(requests)) for j in range(params.n)]
        images = {i: [image_to_data_uri(im) for im in r.images] for i, r in enumerate(requests) if r.images}
        per_server: list[list[int]] = [[] for _ in self.urls]
        for k, (i, _) in enumerate(rows):
            per_server[i % len(self.urls)].append(k)

        def build(indices: list[int]) -> dict[str, Any]:
            body: dict[str, Any] = {
                "input_ids": [prompt_ids[rows[k][0]] for k in indices],
                "sampling_params": [sglang_sampling_params(params, k) for k in indices],
                "return_logprob": True,
            }
            if images:
                body["image_data"] = [images.get(rows[k][0]) for k in indices]
            return body

        results = self._post_batches(per_server, build)
        outputs = []
        for k, (i, j) in enumerate(rows):
            ids, logprobs, finish = parse_generation(results[k])
            outputs.append(RolloutOutput(requests[i].uid, j, prompt_ids[i], ids, logprobs, finish))  # type: ignore[arg-type]
        return outputs

    def score(
        self,
        requests: Sequence[RolloutRequest],
        response_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        """Prefill-only scoring, as :meth:`SGLangEngine.score` (temperature 1 only)."""
        if temperature != 1.0:
            raise ValueError("SGLang scores prompt tokens under temperature 1 only")
        prompt_ids = tokenize_prompts(self.tokenizer, requests)
        per_server: list[list[int]] = [[] for _ in self.urls]
        for k in range(len(requests)):
            per_server[k % len(self.urls)].append(k)

        def build(indices: list[int]) -> dict[str, Any]:
            body: dict[str, Any] = {
                "input_ids": [prompt_ids[k] + [int(t) for t in response_ids[k]] for k in indices],
                "sampling_params": [{"max_new_tokens": 0, "temperature": 0.0} for _ in indices],
                "return_logprob": True,
                "logprob_start_len": [max(len(prompt_ids[k]) - 1, 0) for k in indices],
            }
            if any(requests[k].images for k in indices):
                body["image_data"] = [[image_to_data_uri(im) for im in requests[k].images] or None for k in indices]
            return body

        results = self._post_batches(per_server, build)
        return [parse_prompt_logprobs(results[k], len(response_ids[k])) for k in range(len(requests))]

    # ------------------------------------------------------------------ weight sync
    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        transport: str | None = None,
    ) -> WeightSyncStats:
        """Push ``(HF checkpoint name, full tensor)`` pairs to every server (``"disk"``/``"distributed"``)."""
        transport = transport or self.weight_sync
        if transport == "disk":
            if self.sync_dir is None:
                raise ValueError("disk sync over HTTP needs sync_dir= (a folder every server can read)")
            return sync_weights_by_disk(self, named_tensors, sync_dir=self.sync_dir, bucket_bytes=bucket_bytes)
        if transport == "distributed":
            if self._sender is None:
                self._sender = DistributedWeightSender(self, master_address=self.master_address)
            return self._sender.sync(named_tensors, bucket_bytes=bucket_bytes)
        raise ValueError(
            f"transport {transport!r} is not available over HTTP (tensor push needs a colocated engine: "
            "use SGLangEngine); choose 'disk' or 'distributed'"
        )

    def update_weights_from_disk(self, path: str) -> None:
        self._all("/update_weights_from_disk", {"model_path": path})

    def begin_weight_update(self) -> None:
        self._all("/begin_weight_update", {})

    def end_weight_update(self) -> None:
        self._all("/end_weight_update", {})

    def engine_ranks(self) -> int:
        return sum(self._ranks_of(info) for info in self.server_infos)

    @staticmethod
    def _ranks_of(info: dict[str, Any]) -> int:
        return int(info.get("tp_size", 1) or 1) * int(info.get("dp_size", 1) or 1)

    def _start_all(self, path: str, bodies: list[dict[str, Any]]) -> Waiter:
        futures = [self._pool.submit(self._request, "POST", u, path, b) for u, b in zip(self.urls, bodies)]
        return lambda: [f.result() for f in futures]

    def start_init_weights_update_group(self, *, rank_offset: int, **kwargs: Any) -> Waiter:
        bodies, offset = [], rank_offset
        for info in self.server_infos:
            bodies.append({**kwargs, "rank_offset": offset})
            offset += self._ranks_of(info)
        return self._start_all("/init_weights_update_group", bodies)

    def start_update_weights_from_distributed(self, **kwargs: Any) -> Waiter:
        body = {**kwargs, "flush_cache": False}
        return self._start_all("/update_weights_from_distributed", [body] * len(self.urls))

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._all("/destroy_weights_update_group", {"group_name": group_name})

    # ------------------------------------------------------------------ control
    def flush_cache(self) -> None:
        self._all("/flush_cache")

    def pause(self) -> None:
        self._all("/pause_generation", {"mode": "abort"})

    def resume(self) -> None:
        self._all("/continue_generation", {})

    def _on_gpu(self) -> bool:
        return all(str(info.get("device", "cuda")) != "cpu" for info in self.server_infos)

    def release_memory(self) -> None:
        """GPU servers free weights + KV cache; CPU servers: logged no-op (SGLang's release is CUDA-only)."""
        if not self._on_gpu():
            super().release_memory()
            return
        self._all("/release_memory_occupation", {})

    def resume_memory(self) -> None:
        if not self._on_gpu():
            super().resume_memory()
            return
        self._all("/resume_memory_occupation", {})

    def shutdown(self) -> None:
        """Destroy the weight-update group, close the HTTP session and stop the owned servers (servers at
        given URLs keep running)."""
        if self._sender is not None:
            sender, self._sender = self._sender, None
            sender.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()
        owned, self._owned = self._owned, []
        for process in owned:
            stop_server(process)


def launch_server_engine(
    model_path: str | Path,
    *,
    num_servers: int = 1,
    server_kwargs: dict[str, Any] | None = None,
    log_dir: str | Path | None = None,
    ready_timeout_s: float = 600.0,
    **engine_options: Any,
) -> SGLangServerEngine:
    """Launch ``num_servers`` SGLang HTTP servers of ``model_path`` on 127.0.0.1 (free ports; logs in
    ``log_dir/sglang_server_<k>.log``) and return a :class:`SGLangServerEngine` that owns them (its
    ``shutdown`` stops them). ``engine_options`` go to the engine (``weight_sync``, ``sync_dir``, ...).
    A failed start stops the servers already started and re-raises."""
    from megatron_vgpo.distributed.multiprocess import find_free_port

    processes: list[subprocess.Popen] = []
    try:
        urls = []
        for k in range(num_servers):
            port = find_free_port()
            log_path = Path(log_dir) / f"sglang_server_{k}.log" if log_dir else None
            processes.append(launch_server(model_path, host="127.0.0.1", port=port, server_kwargs=server_kwargs,
                                           log_path=log_path, ready_timeout_s=ready_timeout_s))
            urls.append(f"http://127.0.0.1:{port}")
        logger.info("launched %d SGLang server(s) at %s", num_servers, ", ".join(urls))
        return SGLangServerEngine(urls, model_path=model_path, owned_servers=processes, **engine_options)
    except BaseException:
        for process in processes:
            stop_server(process)
        raise
