"""Outcome advantages computed per prompt group (GRPO, Dr.GRPO) with a small estimator registry.

One scalar reward per trajectory; trajectories that share a prompt share a ``group_id`` (the prompt uid,
any int64 values, not necessarily contiguous or sorted). Everything is vectorized with ``index_add`` over
the contiguous group index given by ``torch.unique(..., return_inverse=True)``.

Adding an estimator is one decorated function::

    @register_advantage_estimator("my_estimator")
    def _my_estimator(rewards: torch.Tensor, stats: GroupStats, eps: float) -> torch.Tensor:
        return rewards - stats.mean[stats.index]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_vgpo.algo.masked_ops import as_bool_mask, group_index

logger = logging.getLogger(__name__)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "GroupStats",
    "broadcast_to_tokens",
    "compute_group_stats",
    "compute_outcome_advantages",
    "register_advantage_estimator",
]


@dataclass(frozen=True)
class GroupStats:
    """Per-group statistics of the rewards.

    Attributes:
        index: ``[B]`` int64, contiguous group index of each trajectory in ``[0, G)``.
        count: ``[G]`` float (rewards' dtype), number of trajectories in each group.
        mean: ``[G]`` float, group mean reward.
        std: ``[G]`` float, UNBIASED group standard deviation (divides by ``count - 1``); defined as 0 for a
            group of size 1 (no spread can be measured).
    """

    index: torch.Tensor
    count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


EstimatorFn = Callable[[torch.Tensor, GroupStats, float], torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, EstimatorFn] = {}


def register_advantage_estimator(*names: str) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register ``fn(rewards [B], stats: GroupStats, eps) -> advantages [B]`` under one or more names."""
    if not names:
        raise ValueError("register_advantage_estimator needs at least one name")

    def decorator(fn: EstimatorFn) -> EstimatorFn:
        for name in names:
            if name in ADVANTAGE_ESTIMATORS:
                raise ValueError(f"advantage estimator {name!r} is already registered")
            ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def compute_group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    """Group count, mean and unbiased std of ``rewards [B]`` grouped by ``group_ids [B]`` (int64)."""
    index, num_groups = group_index(group_ids)
    zeros = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    count = zeros.index_add(0, index, torch.ones_like(rewards))
    mean = zeros.index_add(0, index, rewards) / count
    sq_dev = zeros.index_add(0, index, (rewards - mean[index]) ** 2)
    var = torch.where(count > 1, sq_dev / (count - 1).clamp(min=1), torch.zeros_like(sq_dev))
    return GroupStats(index=index, count=count, mean=mean, std=var.sqrt())


@register_advantage_estimator("grpo")
def _grpo(rewards: torch.Tensor, stats: GroupStats, eps: float) -> torch.Tensor:
    """GRPO: ``(r - mean_g) / (std_g + eps)`` with the unbiased group std. A group of size 1 gets 0."""
    return (rewards - stats.mean[stats.index]) / (stats.std[stats.index] + eps)


@register_advantage_estimator("drgrpo", "dr_grpo")
def _dr_grpo(rewards: torch.Tensor, stats: GroupStats, eps: float) -> torch.Tensor:
    """Dr.GRPO: ``r - mean_g`` (no division by the std). A group of size 1 gets 0."""
    del eps
    return rewards - stats.mean[stats.index]


def compute_outcome_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    estimator: str = "grpo",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Outcome advantage of every trajectory, normalized within its prompt group.

    Args:
        rewards: ``[B]`` float, one scalar reward per trajectory.
        group_ids: ``[B]`` int64 prompt uid of each trajectory (arbitrary, possibly interleaved values).
        estimator: a name in ``ADVANTAGE_ESTIMATORS`` ("grpo", "drgrpo"/"dr_grpo", or a registered one).
        eps: added to the group std by "grpo" (1e-6 as in the reference run).

    Returns:
        ``[B]`` advantages in the dtype of ``rewards``. A group of size 1 has a zero std by definition and
        its single member gets advantage 0 (its reward equals its own group mean), never NaN.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but rewards has shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a float tensor, got dtype {rewards.dtype}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rewards.numel() == 0:
        return rewards.clone()
    stats = compute_group_stats(rewards, group_ids)
    singletons = int((stats.count == 1).sum())
    if singletons:
        logger.debug("%d prompt group(s) of size 1 get advantage 0", singletons)
    return ADVANTAGE_ESTIMATORS[estimator](rewards, stats, eps)


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Copy one advantage per trajectory ``[B]`` onto its valid tokens: ``[B, T]``, 0 on padding."""
    mask = as_bool_mask(response_mask)
    if advantages.dim() != 1 or mask.dim() != 2 or advantages.shape[0] != mask.shape[0]:
        raise ValueError(
            f"advantages must be [B] and response_mask [B, T]; got {tuple(advantages.shape)} and {tuple(mask.shape)}"
        )
    return advantages.unsqueeze(-1) * mask.to(advantages.dtype)
