"""Tests for megatron_vgpo.reward: box extraction, grading (mathruler + math-verify), the lenient
multiple-choice rule, and the process-pool grader with its per-item timeout.

Expected values are mathematical facts written by hand (1/2 == 0.5), not outputs of the code under test;
extraction is also cross-checked against mathruler's own extractor on the cases both must agree on.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from mathruler.grader import extract_boxed_content

from megatron_vgpo.reward import (
    RewardGrader,
    extract_boxed,
    is_equivalent,
    named_choice_letters,
    score,
    squeeze_markup_whitespace,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {7}", "7"),
        ("\\boxed\n{ 7 }", "7"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed{a_{1}+\\sqrt{b^{2}}}", "a_{1}+\\sqrt{b^{2}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("no box here", None),
        ("", None),
        ("\\boxed{1} and \\boxed{2", None),
        ("\\boxed{\\frac{1}{2}", None),
        ("\\boxedx{3}", None),
        ("<think>count</think> \\boxed{}", ""),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    ["\\boxed{42}", "a \\boxed{x} b \\boxed{\\frac{3}{4}} c", "\\boxed{{1}{2}}", "\\boxed{ 5 }"],
)
def test_extract_boxed_agrees_with_mathruler(text: str) -> None:
    assert extract_boxed(text) == extract_boxed_content(text)


def test_squeeze_markup_whitespace() -> None:
    assert squeeze_markup_whitespace("< think > a < / think > 1 / 2") == "<think>a</think>1/2"


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0),
        ("\\boxed{\\frac12}", "1/2", 1.0),
        ("\\boxed{0.51}", "\\frac{1}{2}", 0.0),
        ("\\boxed{2 cm}", "2", 1.0),
        ("\\boxed{2\\text{ cm}}", "2", 1.0),
        ("\\boxed{30^\\circ}", "30", 1.0),
        ("\\boxed{60}", "60^\\circ", 1.0),
        ("\\boxed{3.0}", "3", 1.0),
        ("\\boxed{ 4 }", "4", 1.0),
        ("\\boxed{4}", " 4 ", 1.0),
        ("\\boxed{5}", "4", 0.0),
        ("\\boxed{x=3}", "3", 1.0),
        ("\\boxed{2,000}", "2000", 1.0),
        ("\\boxed{\\sqrt{2}}", "1.41421356", 1.0),
        ("The answer is 4.", "4", 0.0),
        ("\\boxed{4", "4", 0.0),
        ("\\boxed{4} wait, actually \\boxed{5}", "5", 1.0),
        ("\\boxed{4} wait, actually \\boxed{5}", "4", 0.0),
        ("\\boxed{\\boxed{6}}", "6", 1.0),
        ("\\boxed{A}", "A", 1.0),
        ("\\boxed{(B)}", "B", 1.0),
        ("\\boxed{\\text{C}}", "C", 1.0),
        ("\\boxed{ABCD}", "A", 0.0),
        ("\\boxed{A, B}", "A", 0.0),
        ("\\boxed{B}", "A", 0.0),
        ("\\boxed{}", "0", 0.0),
        ("<think> a < / think > \\boxed{1 / 2}", "0.5", 1.0),
        ("\\boxed{3}", "\\boxed{3}", 1.0),
        ("\\boxed{3}", "$\\frac{6}{2}$", 1.0),
        ("\\boxed{4}", "\\boxed{3}", 0.0),
    ],
)
def test_score_strict(response: str, answer: str, expected: float) -> None:
    assert score(response, answer) == expected


@pytest.mark.parametrize(
    ("response", "answer", "strict", "lenient"),
    [
        ("\\boxed{B. 60^\\circ}", "B", 0.0, 1.0),
        ("\\boxed{Option C}", "C", 0.0, 1.0),
        ("\\boxed{The answer is D}", "D", 0.0, 1.0),
        ("\\boxed{ABCD}", "A", 0.0, 0.0),
        ("\\boxed{A or B}", "A", 0.0, 0.0),
        ("\\boxed{A, C}", "C", 0.0, 0.0),
        ("\\boxed{a, c}", "C", 0.0, 0.0),
        ("\\boxed{B. 60^\\circ}", "A", 0.0, 0.0),
        ("no box, but B", "B", 0.0, 0.0),
        ("\\boxed{12}", "12", 1.0, 1.0),
    ],
)
def test_lenient_choice_rule_is_evaluation_only(
    response: str, answer: str, strict: float, lenient: float
) -> None:
    assert score(response, answer) == strict
    assert score(response, answer, lenient=True) == lenient


def test_named_choice_letters() -> None:
    assert named_choice_letters("(B)") == {"B"}
    assert named_choice_letters("Option B") == {"B"}
    assert named_choice_letters("ABCD") == {"A", "B", "C", "D"}
    assert named_choice_letters("\\text{A} or \\text{B}") == {"A", "B"}
    assert named_choice_letters("b") == {"B"}
    assert named_choice_letters("42") == set()


def test_is_equivalent_rejects_empty_sides() -> None:
    assert not is_equivalent("", "1")
    assert not is_equivalent("1", "   ")


def test_score_in_a_thread_has_math_verify_timeouts_off() -> None:
    """math-verify's signal-based timeouts raise outside the main thread unless switched off."""
    results: list[float] = []
    # sqrt(2) vs a decimal needs math-verify (mathruler says no), so this exercises the threaded path.
    worker = threading.Thread(target=lambda: results.append(score("\\boxed{\\sqrt{2}}", "1.41421356")))
    worker.start()
    worker.join(timeout=30)
    assert results == [1.0]


# --- process pool ---------------------------------------------------------------------------------------

SLEEP_ANSWER = "__sleep__"
CRASH_ANSWER = "__crash__"


def sleepy_or_crashing_score(response: str, answer: str) -> float:
    """Grades like `score`, but hangs on SLEEP_ANSWER and kills its process on CRASH_ANSWER."""
    if answer == SLEEP_ANSWER:
        time.sleep(60)
    if answer == CRASH_ANSWER:
        os._exit(3)
    return score(response, answer)


def raising_score(response: str, answer: str) -> float:
    """Grades like `score`, but raises on answer "__raise__"."""
    if answer == "__raise__":
        raise ArithmeticError("grader blew up")
    return score(response, answer)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_grader_errors_score_zero_and_are_counted(num_workers: int) -> None:
    with RewardGrader(num_workers=num_workers, timeout_s=20.0, score_fn=raising_score) as grader:
        assert grader.score_batch(["\\boxed{1}", "\\boxed{2}"], ["__raise__", "2"]) == [0.0, 1.0]
        assert (grader.last_batch_stats.errors, grader.last_batch_stats.timeouts) == (1, 0)


def test_pool_matches_in_process_scores_and_reuses_workers() -> None:
    responses = ["\\boxed{0.5}", "\\boxed{ABCD}", "no box", "\\boxed{7}", "\\boxed{\\dfrac{3}{4}}"] * 3
    answers = ["\\frac{1}{2}", "A", "1", "7", "0.75"] * 3
    with RewardGrader(num_workers=2, timeout_s=20.0) as grader:
        first = grader.score_batch(responses, answers)
        pids = sorted(worker.process.pid for worker in grader._workers)
        second = grader.score_batch(responses[:4], answers[:4])
        assert sorted(worker.process.pid for worker in grader._workers) == pids
        assert grader.stats.items == len(responses) + 4
        assert grader.stats.timeouts == 0 and grader.stats.errors == 0
    assert first == [1.0, 0.0, 0.0, 1.0, 1.0] * 3
    assert second == first[:4]
    assert first == [score(r, a) for r, a in zip(responses, answers)]


def test_pool_lenient_flag() -> None:
    with RewardGrader(num_workers=1, timeout_s=20.0, lenient=True) as grader:
        assert grader.score_batch(["\\boxed{B. 60}", "\\boxed{AB}"], ["B", "B"]) == [1.0, 0.0]


def test_pool_timeout_and_crash_score_zero_and_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    responses = ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}", "\\boxed{5}"]
    answers = ["1", SLEEP_ANSWER, "3", CRASH_ANSWER, "6"]
    started = time.monotonic()
    with RewardGrader(num_workers=2, timeout_s=0.5, score_fn=sleepy_or_crashing_score) as grader:
        scores = grader.score_batch(responses, answers)
        assert scores == [1.0, 0.0, 1.0, 0.0, 0.0]
        assert grader.last_batch_stats.timeouts == 1
        assert grader.last_batch_stats.errors == 1
        # The hung and the dead worker were replaced: the pool still grades.
        assert grader.score_batch(["\\boxed{9}"], ["9"]) == [1.0]
        assert all(worker.process.is_alive() for worker in grader._workers)
    assert time.monotonic() - started < 15.0
    assert "timed out" in caplog.text and "worker process died" in caplog.text


def test_pool_times_out_a_real_pathological_answer() -> None:
    """A power tower sends sympy into a huge computation; the real grader must give up on it alone."""
    responses = ["\\boxed{10^{10^{10}}}", "\\boxed{\\dfrac{1}{4}}", "\\boxed{3}"]
    with RewardGrader(num_workers=2, timeout_s=1.0) as grader:
        assert grader.score_batch(responses, ["2", "0.25", "3"]) == [0.0, 1.0, 1.0]
        assert grader.last_batch_stats.timeouts == 1


def test_pool_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        RewardGrader(num_workers=1, timeout_s=0)
    with RewardGrader(num_workers=0, timeout_s=1.0) as grader:
        assert grader.score_batch(["\\boxed{1}"], ["1"]) == [1.0]
        with pytest.raises(ValueError, match="1 responses but 2 answers"):
            grader.score_batch(["a"], ["1", "2"])
    with pytest.raises(RuntimeError, match="after close"):
        grader.score_batch([], [])
