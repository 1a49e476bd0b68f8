"""Answer extraction and accuracy rewards (last ``\\boxed{}`` graded by mathruler, then math-verify)."""

from megatron_vgpo.reward.extract import extract_boxed, squeeze_markup_whitespace
from megatron_vgpo.reward.grading import is_equivalent, named_choice_letters, score
from megatron_vgpo.reward.pool import GradingStats, RewardGrader

__all__ = [
    "GradingStats",
    "RewardGrader",
    "extract_boxed",
    "is_equivalent",
    "named_choice_letters",
    "score",
    "squeeze_markup_whitespace",
]
