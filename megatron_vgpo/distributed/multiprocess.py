"""Run one function on N real processes joined in a torch.distributed group (gloo on CPU).

This is the multi-rank harness of the test-suite and of the tools that launch their own ranks
(``tools/check_parity.py`` ...). Each rank is a fresh ``spawn``-ed interpreter, so the function and its
arguments must be picklable (a module-level function). A launch costs several seconds (each rank imports
torch, and Megatron when ``megatron=True``), so put many checks in one function.

Example::

    def body(rank: int, world_size: int, n: int) -> float:
        t = torch.full((n,), float(rank))
        torch.distributed.all_reduce(t)
        return t.sum().item()

    results = run_on_ranks(body, world_size=2, args=(4,))   # [4.0, 4.0]

Failures are collected from every rank: :class:`RankFailure` carries each failing rank's traceback, and
ranks that died without reporting (segfault, OOM kill) are named with their exit code.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import queue as queue_lib
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """One or more ranks failed. ``failures`` maps rank -> traceback text (or exit-code message)."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = dict(sorted(failures.items()))
        parts = [f"{len(self.failures)} rank(s) failed: {sorted(self.failures)}"]
        for rank, text in self.failures.items():
            parts.append(f"\n===== rank {rank} =====\n{text.rstrip()}")
        super().__init__("\n".join(parts))


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    backend: str,
    megatron: bool,
    env: dict[str, str],
    timeout_s: float,
    results: Any,
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        from megatron_vgpo.distributed.comm import maybe_install_audit

        maybe_install_audit()  # MEGATRON_VGPO_COLLECTIVE_AUDIT=1 (the test-suite sets it)
        if megatron:
            from megatron_vgpo.platform import apply_cpu_patches

            apply_cpu_patches()
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        out = fn(rank, world_size, *args, **kwargs)
        # Plain pickle bytes: no shared-memory handles that would die with this process.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # report everything, including SystemExit from argparse-style code
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            if megatron:
                with contextlib.suppress(Exception):
                    from megatron.core import parallel_state

                    parallel_state.destroy_model_parallel()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    backend: str = "gloo",
    megatron: bool = False,
    env: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned processes.

    Args:
        fn: a picklable (module-level) function; its return value must be picklable.
        world_size: number of ranks; each gets ``torch.set_num_threads(1)``.
        backend: torch.distributed backend of the default group (``gloo`` on CPU).
        megatron: apply :func:`megatron_vgpo.platform.apply_cpu_patches` in each rank before ``fn``.
        env: extra environment variables set in each rank before anything else.
        timeout_s: wall-clock limit for the whole launch (and the collectives' timeout).

    Returns:
        The list of per-rank return values, indexed by rank.

    Raises:
        RankFailure: with every failing rank's traceback; the remaining ranks are terminated.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, fn, tuple(args), dict(kwargs or {}), backend, megatron,
                  dict(env or {}), timeout_s, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    grace_deadline: float | None = None  # after a failure, wait briefly for the others to report
    try:
        while len(outputs) + len(failures) < world_size:
            now = time.monotonic()
            limit = deadline if grace_deadline is None else min(deadline, grace_deadline)
            if now >= limit:
                break
            try:
                rank, status, payload = results.get(timeout=min(0.5, max(limit - now, 0.01)))
            except queue_lib.Empty:
                for rank, p in enumerate(procs):
                    if (p.exitcode is not None and p.exitcode != 0 and rank not in outputs
                            and rank not in failures):
                        failures[rank] = f"process exited with code {p.exitcode} without reporting"
                if failures and grace_deadline is None:
                    grace_deadline = time.monotonic() + 10.0
                continue
            if status == "ok":
                outputs[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                if grace_deadline is None:
                    grace_deadline = time.monotonic() + 10.0
        for rank in range(world_size):
            if rank not in outputs and rank not in failures:
                why = "timed out" if time.monotonic() >= deadline else "stopped after another rank failed"
                failures[rank] = f"no result ({why}; limit {timeout_s:.0f}s)"
    finally:
        for p in procs:
            p.join(timeout=5.0 if not failures else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
        results.close()
    if failures:
        raise RankFailure(failures)
    return [outputs[r] for r in range(world_size)]
