"""Held-out evaluation: greedy decoding through any rollout engine, graded by the reward function.

Accuracy follows the evaluation protocol of VGPO_SPEC.md section 6: one greedy run, a sample is correct
when its last ``\\boxed{}`` answer grades equal to the gold answer (mathruler, then math-verify), with the
lenient multiple-choice rule only when ``lenient=True`` (never for training rewards).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from megatron_vgpo.data import PromptInputs, PromptSample
from megatron_vgpo.reward import RewardGrader, extract_boxed
from megatron_vgpo.rollout.base import RolloutEngine, RolloutRequest, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Accuracy over ``num_samples`` prompts, mean response length (tokens), the fraction of responses
    with a ``\\boxed{}`` answer, every decoded response and its reward (in sample order), and a few
    (source, answer, response) examples for the log."""

    accuracy: float
    num_samples: int
    mean_response_tokens: float
    boxed_fraction: float
    responses: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    examples: list[dict[str, str]] = field(default_factory=list)

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        return {f"{prefix}/accuracy": self.accuracy, f"{prefix}/response_tokens": self.mean_response_tokens,
                f"{prefix}/boxed_fraction": self.boxed_fraction}


def evaluate_greedy(
    engine: RolloutEngine,
    samples: Sequence[PromptInputs | PromptSample],
    decode,
    grader: RewardGrader,
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    num_examples_kept: int = 3,
) -> EvalResult:
    """Greedy-decode every sample with ``engine``, decode with ``decode(token_ids) -> str``, grade.

    Args:
        engine: any :class:`RolloutEngine` (transformers or SGLang backend).
        samples: prompts (``PromptInputs`` or ``PromptSample``: their ``prompt_text`` and ``images`` are sent
            to the engine; ``source`` and ``answer`` are read).
        decode: token ids -> text (the tokenizer's ``decode`` with special tokens skipped).
        grader: reward grader; its ``lenient`` setting decides the multiple-choice rule.
        max_new_tokens: response budget per sample.
        batch_size: prompts per engine call.
    """
    if not samples:
        raise ValueError("evaluate_greedy: no samples to evaluate")
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    texts: list[str] = []
    lengths: list[int] = []
    for start in tqdm(range(0, len(samples), batch_size), desc="validate", unit="batch", leave=False):
        chunk = samples[start : start + batch_size]
        requests = [RolloutRequest(uid=s.source, prompt_text=s.prompt_text, images=list(s.images)) for s in chunk]
        for out in engine.generate(requests, params):
            texts.append(decode(out.response_ids))
            lengths.append(len(out.response_ids))
    rewards = grader.score_batch(texts, [s.answer for s in samples])
    boxed = sum(extract_boxed(t) is not None for t in texts)
    examples = [{"source": s.source, "answer": s.answer, "response": t}
                for s, t in list(zip(samples, texts))[:num_examples_kept]]
    return EvalResult(accuracy=sum(rewards) / len(rewards), num_samples=len(rewards),
                      mean_response_tokens=sum(lengths) / len(lengths), boxed_fraction=boxed / len(texts),
                      responses=texts, rewards=list(rewards), examples=examples)
