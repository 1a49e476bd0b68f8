"""Batch grading in worker processes with a hard per-item time limit.

sympy (behind mathruler and math-verify) can take minutes on a pathological answer such as a tower of
exponents. ``RewardGrader`` hands items one at a time to long-lived worker processes; an item that runs past
``timeout_s`` scores 0.0, is counted and logged, and its worker is killed and replaced, so one bad answer
never stalls a training step. Workers are reused across ``score_batch`` calls. A worker counts as started
once it has imported the grading code and graded one warm-up item, so start-up time never eats into an
item's time limit.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import Any

from megatron_vgpo.reward.grading import score

logger = logging.getLogger(__name__)

ScoreFn = Callable[[str, str], float]

# First message a worker sends once it is ready to grade.
_READY = "ready"
# Longest a new worker may take to import the grading code and grade its warm-up item.
WORKER_STARTUP_TIMEOUT_S: float = 120.0


@dataclass
class GradingStats:
    """Counts of graded items; ``timeouts`` and ``errors`` items scored 0.0 without a verdict."""

    items: int = 0
    timeouts: int = 0
    errors: int = 0

    def add(self, other: GradingStats) -> None:
        self.items += other.items
        self.timeouts += other.timeouts
        self.errors += other.errors


def _worker_loop(connection: Connection, score_fn: ScoreFn) -> None:
    """Worker process body: warm up, send ``_READY``, then answer ``(index, response, answer)`` messages with
    ``(index, score, error_or_None)``. A ``None`` message or a closed pipe ends the loop.
    """
    with contextlib.suppress(Exception):
        # Needs both graders (mathruler says no, math-verify yes): imports and initialises them untimed.
        score_fn("\\boxed{\\sqrt{2}}", "1.41421356")
    try:
        connection.send(_READY)
    except (BrokenPipeError, OSError):
        return
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, response, answer = message
        try:
            result: tuple[int, float, str | None] = (index, float(score_fn(response, answer)), None)
        except Exception as error:
            result = (index, 0.0, f"{type(error).__name__}: {error}")
        try:
            connection.send(result)
        except (BrokenPipeError, OSError):
            return


class _Worker:
    """One grading process and the parent's end of its pipe; ``ready`` once its warm-up is done."""

    def __init__(self, context: Any, score_fn: ScoreFn) -> None:
        parent_end, child_end = context.Pipe(duplex=True)
        self.connection: Connection = parent_end
        self.process = context.Process(target=_worker_loop, args=(child_end, score_fn), daemon=True)
        self.launched_at = time.monotonic()
        self.process.start()
        child_end.close()
        self.ready = False
        self.item_index: int | None = None
        self.started_at: float = 0.0

    def submit(self, index: int, response: str, answer: str) -> None:
        self.item_index = index
        self.started_at = time.monotonic()
        self.connection.send((index, response, answer))

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5.0)
        self.connection.close()

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.connection.send(None)
        self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5.0)
        self.connection.close()


class RewardGrader:
    """Grade many (response, answer) pairs in ``num_workers`` processes, each item limited to ``timeout_s``.

    Usage::

        with RewardGrader(num_workers=2, timeout_s=10.0) as grader:
            rewards = grader.score_batch(responses, answers)   # list[float], each 0.0 or 1.0

    ``score_fn(response, answer) -> float`` defaults to :func:`score` (``lenient`` selects the evaluation-only
    multiple-choice rule); it must be picklable (a module-level function or a ``functools.partial`` of one).
    ``num_workers=0`` grades in the calling process without any time limit (debugging only).
    ``start_method`` is a multiprocessing start method; "forkserver" keeps workers free of the trainer's
    threads and large tensors. ``stats`` holds totals since construction, ``last_batch_stats`` the last call.
    A worker that cannot start (``score_fn`` not importable in a child, start-up past
    ``WORKER_STARTUP_TIMEOUT_S``) raises ``RuntimeError``: that is a set-up error, not a wrong answer.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        *,
        lenient: bool = False,
        score_fn: ScoreFn | None = None,
        start_method: str = "forkserver",
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"RewardGrader: num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"RewardGrader: timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        if score_fn is None:
            score_fn = functools.partial(score, lenient=lenient)
        self.score_fn: ScoreFn = score_fn
        self._context = multiprocessing.get_context(start_method)
        self._workers: list[_Worker] = []
        self._closed = False
        self.stats = GradingStats()
        self.last_batch_stats = GradingStats()

    def __enter__(self) -> RewardGrader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker process. The grader cannot be used afterwards."""
        for worker in self._workers:
            worker.stop()
        self._workers = []
        self._closed = True

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill ``worker`` (hung or dead) and start a fresh one in its slot; returns the new worker."""
        position = self._workers.index(worker)
        worker.kill()
        self._workers[position] = _Worker(self._context, self.score_fn)
        return self._workers[position]

    def score_batch(self, responses: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Scores of ``responses[i]`` vs ``answers[i]`` in input order; timed-out or failed items get 0.0."""
        if self._closed:
            raise RuntimeError("RewardGrader.score_batch called after close()")
        if len(responses) != len(answers):
            raise ValueError(
                f"RewardGrader.score_batch: {len(responses)} responses but {len(answers)} answers"
            )
        batch_stats = GradingStats(items=len(responses))
        if self.num_workers == 0:
            scores = [
                self._score_here(index, text, str(answer), batch_stats)
                for index, (text, answer) in enumerate(zip(responses, answers))
            ]
        else:
            scores = self._score_in_workers(responses, answers, batch_stats)
        self.last_batch_stats = batch_stats
        self.stats.add(batch_stats)
        if batch_stats.timeouts or batch_stats.errors:
            logger.warning(
                "RewardGrader: %d of %d items scored 0.0 without a verdict "
                "(%d timed out after %.1f s, %d errors)",
                batch_stats.timeouts + batch_stats.errors,
                batch_stats.items,
                batch_stats.timeouts,
                self.timeout_s,
                batch_stats.errors,
            )
        return scores

    def _score_here(self, index: int, response: str, answer: str, batch_stats: GradingStats) -> float:
        """Grade one item in this process (``num_workers=0``): no time limit, errors score 0.0."""
        try:
            return float(self.score_fn(response, answer))
        except Exception as error:
            batch_stats.errors += 1
            logger.warning("RewardGrader: item %d scored 0.0 after an error: %r", index, error)
            return 0.0

    def _score_in_workers(
        self, responses: Sequence[str], answers: Sequence[str], batch_stats: GradingStats
    ) -> list[float]:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._context, self.score_fn))
        scores: list[float] = [0.0] * len(responses)
        pending = deque(range(len(responses)))
        idle = [worker for worker in self._workers if worker.ready]
        starting = {worker.connection: worker for worker in self._workers if not worker.ready}
        busy: dict[Connection, _Worker] = {}

        def record_failure(worker: _Worker, reason: str, is_timeout: bool) -> None:
            index = worker.item_index
            assert index is not None
            scores[index] = 0.0
            if is_timeout:
                batch_stats.timeouts += 1
            else:
                batch_stats.errors += 1
            logger.warning(
                "RewardGrader: item %d scored 0.0: %s (answer %r, response tail %r)",
                index,
                reason,
                str(answers[index])[:80],
                responses[index][-200:],
            )
            replacement = self._replace(worker)
            starting[replacement.connection] = replacement

        while pending or busy:
            while pending and idle:
                worker = idle.pop()
                index = pending.popleft()
                worker.submit(index, responses[index], str(answers[index]))
                busy[worker.connection] = worker
            deadlines = [worker.started_at + self.timeout_s for worker in busy.values()]
            deadlines += [worker.launched_at + WORKER_STARTUP_TIMEOUT_S for worker in starting.values()]
            timeout = max(0.0, min(deadlines) - time.monotonic())
            for connection in wait([*busy, *starting], timeout=timeout):
                if connection in starting:
                    worker = starting.pop(connection)  # type: ignore[arg-type]
                    try:
                        message = connection.recv()  # type: ignore[union-attr]
                    except (EOFError, OSError):
                        raise RuntimeError(
                            f"RewardGrader: a grading worker exited during start-up (exit code "
                            f"{worker.process.exitcode}); is score_fn {self.score_fn!r} importable in a "
                            "child process?"
                        ) from None
                    assert message == _READY, message
                    worker.ready = True
                    idle.append(worker)
                    continue
                worker = busy.pop(connection)  # type: ignore[arg-type]
                try:
                    index, item_score, error = connection.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    worker.process.join(timeout=1.0)  # reap it, so the exit code is known
                    record_failure(
                        worker, f"worker process died (exit code {worker.process.exitcode})", False
                    )
                    continue
                scores[index] = item_score
                if error is not None:
                    batch_stats.errors += 1
                    logger.warning("RewardGrader: item %d scored 0.0 after an error: %s", index, error)
                idle.append(worker)
            now = time.monotonic()
            for connection, worker in list(busy.items()):
                if now - worker.started_at >= self.timeout_s:
                    del busy[connection]
                    record_failure(worker, f"timed out after {self.timeout_s:.1f} s", True)
            for worker in starting.values():
                if now - worker.launched_at >= WORKER_STARTUP_TIMEOUT_S:
                    raise RuntimeError(
                        "RewardGrader: a grading worker did not start within "
                        f"{WORKER_STARTUP_TIMEOUT_S:.0f} s"
                    )
        return scores
