"""Accuracy reward: grade the last ``\\boxed{}`` of a response against the gold answer.

A response earns 1.0 when the content of its last box is judged equal to the gold answer by
``mathruler.grader.grade_answer`` (normalized strings or a sympy-simplified difference of zero) or, failing
that, by ``math_verify.verify`` (both sides parsed as LaTeX wrapped in ``$...$``); otherwise 0.0. No format
reward and no length penalty (VGPO_SPEC.md section 5.2).

``lenient=True`` adds the evaluation-only multiple-choice rule of VGPO_SPEC.md section 6: when the gold answer
is a single uppercase letter, a box that names exactly that one choice letter counts as correct (``(B)``,
``B. 60°``, ``Option B``). A box naming several choices (``ABCD``, ``A, B``, ``A or C``) is never correct.
Training rewards must use ``lenient=False``.

math-verify protects its parser with ``signal.alarm``, which only works in a process's main thread;
outside the main thread its timeouts are switched off here (``RewardGrader`` gives a hard per-item limit).
"""

from __future__ import annotations

import logging
import re
import threading

from math_verify import parse as math_verify_parse
from math_verify import verify as math_verify_verify
from mathruler.grader import grade_answer as mathruler_grade_answer

from megatron_vgpo.reward.extract import extract_boxed, squeeze_markup_whitespace

logger = logging.getLogger(__name__)

# math-verify's own per-call limits when running in a main thread (its defaults).
MATH_VERIFY_TIMEOUT_S: int = 5

_SINGLE_LETTER = re.compile(r"^[A-Z]$")
# A run of letters not glued to other letters; used to find the choice letters a prediction names.
_LETTER_RUN = re.compile(r"(?<![A-Za-z])([A-Za-z]+)(?![A-Za-z])")
_LATEX_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def _as_latex_math(text: str) -> str:
    """Wrap ``text`` in ``$...$`` unless it already carries math delimiters."""
    stripped = text.strip()
    if stripped.startswith("$") or stripped.startswith("\\(") or stripped.startswith("\\["):
        return stripped
    return f"${stripped}$"


def _math_verify_equal(prediction: str, gold: str) -> bool:
    """math-verify equivalence of two answer strings (gold first: it is the reference side)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    timeout_s = MATH_VERIFY_TIMEOUT_S if in_main_thread else None
    try:
        parsed_gold = math_verify_parse(_as_latex_math(gold), parsing_timeout=timeout_s)
        parsed_prediction = math_verify_parse(_as_latex_math(prediction), parsing_timeout=timeout_s)
        if not parsed_gold or not parsed_prediction:
            return False
        return bool(math_verify_verify(parsed_gold, parsed_prediction, timeout_seconds=timeout_s))
    except Exception as error:  # math-verify raises on pathological input; that is a wrong answer
        logger.debug("math-verify failed on prediction %r vs gold %r: %r", prediction, gold, error)
        return False


def named_choice_letters(prediction: str) -> set[str]:
    """Uppercase choice letters named by a prediction such as ``(B)``, ``B. 60``, ``\\text{B}``, ``A, C``.

    A standalone letter names itself (lowercase too when the prediction has no uppercase choice); an
    all-uppercase run such as ``ABCD`` names each of its letters; ordinary words (``Option``, ``or``)
    name none.
    """
    text = _LATEX_TEXT_WRAPPER.sub(r" \1 ", prediction)
    upper_letters: set[str] = set()
    lower_letters: set[str] = set()
    for run in _LETTER_RUN.findall(text):
        if run.isupper():
            upper_letters.update(run)
        elif len(run) == 1:
            lower_letters.add(run.upper())
    return upper_letters if upper_letters else lower_letters


def is_equivalent(prediction: str, gold: str, lenient: bool = False) -> bool:
    """True when the extracted ``prediction`` matches ``gold`` (mathruler, then math-verify, then the
    multiple-choice rule if ``lenient``)."""
    prediction = prediction.strip()
    gold = gold.strip()
    if not prediction or not gold:
        return False
    gold_is_choice = _SINGLE_LETTER.match(gold) is not None
    if gold_is_choice and len(named_choice_letters(prediction)) > 1:
        return False  # a box that names several choices is wrong under every rule
    try:
        if mathruler_grade_answer(prediction, gold):
            return True
    except Exception as error:  # mathruler's sympy path can raise on odd input
        logger.debug("mathruler failed on prediction %r vs gold %r: %r", prediction, gold, error)
    if _math_verify_equal(prediction, gold):
        return True
    if lenient and gold_is_choice:
        return named_choice_letters(prediction) == {gold}
    return False


def score(response: str, answer: str, lenient: bool = False) -> float:
    """Accuracy reward of one response: 1.0 if its last ``\\boxed{}`` holds the gold ``answer``, else 0.0.

    ``lenient`` enables the evaluation-only multiple-choice rule (never use it for training rewards). A gold
    answer written as ``\\boxed{...}`` is compared by its content.
    """
    prediction = extract_boxed(squeeze_markup_whitespace(response))
    if prediction is None:
        return 0.0
    gold = str(answer)
    boxed_gold = extract_boxed(gold)  # some datasets store the gold answer as "\boxed{...}"
    if boxed_gold:
        gold = boxed_gold
    return 1.0 if is_equivalent(prediction, gold, lenient=lenient) else 0.0
