"""Batch grading in worker processes with a hard per-item time limit.

sympy (behind mathruler and math-verify) can take minutes on a pathological answer such as a tower of
exponents. ``RewardGrader`` hands items one at a time to long-lived worker processes; an item that runs past
``timeout_s`` scores 0.0, is counted and logged, and its worker is killed and replaced, so one bad answer
never stalls a training step. Workers are reused across ``score_batch`` calls.
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
    """Worker process body: receive ``(index, response, answer)``, send ``(index, score, error_or_None)``.

    A ``None`` message or a closed pipe ends the loop.
    """
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
    """One grading process and the parent's end of its pipe."""

    def __init__(self, context: Any, score_fn: ScoreFn) -> None:
        parent_end, child_end = context.Pipe(duplex=True)
        self.connection: Connection = parent_end
        self.process = context.Process(target=_worker_loop, args=(child_end, score_fn), daemon=True)
        self.process.start()
        child_end.close()
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

    def _ensure_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._context, self.score_fn))

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
            scores = [float(self.score_fn(text, str(answer))) for text, answer in zip(responses, answers)]
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

    def _score_in_workers(
        self, responses: Sequence[str], answers: Sequence[str], batch_stats: GradingStats
    ) -> list[float]:
        self._ensure_workers()
        scores: list[float | None] = [None] * len(responses)
        pending = deque(range(len(responses)))
        idle = list(self._workers)
        busy: dict[Connection, _Worker] = {}

        def dispatch() -> None:
            while pending and idle:
                worker = idle.pop()
                index = pending.popleft()
                worker.submit(index, responses[index], str(answers[index]))
                busy[worker.connection] = worker

        dispatch()
        while busy:
            next_deadline = min(worker.started_at for worker in busy.values()) + self.timeout_s
            ready = wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic()))
            for connection in ready:
                worker = busy.pop(connection)  # type: ignore[arg-type]
                try:
                    index, item_score, error = connection.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    index, item_score = worker.item_index, 0.0
                    error = f"worker process died (exit code {worker.process.exitcode})"
                    worker = self._replace(worker)
                assert index is not None
                scores[index] = item_score
                if error is not None:
                    batch_stats.errors += 1
                    logger.warning("RewardGrader: item %d scored 0.0 after an error: %s", index, error)
                idle.append(worker)
            now = time.monotonic()
            for connection, worker in list(busy.items()):
                if now - worker.started_at >= self.timeout_s:
                    del busy[connection]
                    index = worker.item_index
                    assert index is not None
                    scores[index] = 0.0
                    batch_stats.timeouts += 1
                    logger.warning(
                        "RewardGrader: item %d timed out after %.1f s (answer %r, response tail %r); "
                        "scored 0.0",
                        index,
                        self.timeout_s,
                        str(answers[index])[:80],
                        responses[index][-200:],
                    )
                    idle.append(self._replace(worker))
            dispatch()
        return [float(value) for value in scores]  # type: ignore[arg-type]
