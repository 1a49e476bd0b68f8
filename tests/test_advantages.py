"""Outcome advantages vs a float64 per-group loop restatement of spec 5.2 (GRPO) and Dr.GRPO."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from megatron_vgpo.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    compute_outcome_advantages,
    register_advantage_estimator,
)


def ref_advantages(rewards: list[float], ids: list[int], estimator: str, eps: float) -> list[float]:
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if ids[j] == ids[i]]
        mean = sum(members) / len(members)
        if estimator == "grpo":
            std = statistics.stdev(members) if len(members) > 1 else 0.0  # unbiased (n - 1)
            out.append((r - mean) / (std + eps))
        else:
            out.append(r - mean)
    return out


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "dr_grpo"])
def test_matches_restatement_with_interleaved_noncontiguous_ids(estimator: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        B = int(rng.integers(1, 40))
        ids = rng.choice(np.array([10**12, -3, 77, 5, 0, 123456]), size=B)
        rewards = rng.choice([0.0, 1.0, 0.5], size=B) + rng.normal(scale=0.1, size=B) * (rng.random(B) > 0.5)
        got = compute_outcome_advantages(
            torch.tensor(rewards), torch.tensor(ids, dtype=torch.int64), estimator=estimator, eps=1e-6
        )
        exp = ref_advantages(rewards.tolist(), ids.tolist(), estimator.replace("dr_grpo", "drgrpo"), 1e-6)
        np.testing.assert_allclose(got.numpy(), exp, rtol=1e-9, atol=1e-9)


def test_grpo_binary_group_known_values() -> None:
    # Group of 4 with rewards 1,0,0,0: mean 0.25, unbiased std = sqrt(0.75 / 3) = 0.5.
    adv = compute_outcome_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([9, 9, 9, 9]))
    np.testing.assert_allclose(adv.numpy(), np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6), rtol=1e-6)


def test_singleton_and_constant_groups_are_zero_not_nan() -> None:
    rewards = torch.tensor([1.0, 0.3, 0.3, 0.7])
    ids = torch.tensor([4, 8, 8, 2])  # groups {4} and {2} are singletons, {8} is constant
    for est in ("grpo", "drgrpo"):
        adv = compute_outcome_advantages(rewards, ids, estimator=est)
        assert torch.all(torch.isfinite(adv)) and torch.all(adv == 0)


def test_float32_and_empty() -> None:
    adv = compute_outcome_advantages(torch.tensor([0.0, 1.0], dtype=torch.float32), torch.tensor([1, 1]))
    assert adv.dtype == torch.float32
    assert math.isclose(float(adv[1]), 0.5 / (math.sqrt(0.5) + 1e-6), rel_tol=1e-6)
    assert compute_outcome_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.int64)).shape == (0,)


def test_registry_adds_one_function() -> None:
    name = "test_only_rank_sign"
    if name not in ADVANTAGE_ESTIMATORS:

        @register_advantage_estimator(name)
        def _sign(rewards, stats, eps):  # type: ignore[no-untyped-def]
            return torch.sign(rewards - stats.mean[stats.index])

    adv = compute_outcome_advantages(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1, 1, 5]), estimator=name)
    assert adv.tolist() == [1.0, -1.0, 0.0]
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(lambda r, s, e: r)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="estimator"):
        compute_outcome_advantages(torch.zeros(2), torch.zeros(2).long(), estimator="ppo")
    with pytest.raises(ValueError, match="group_ids"):
        compute_outcome_advantages(torch.zeros(2), torch.zeros(3).long())
    with pytest.raises(TypeError, match="group_ids"):
        compute_outcome_advantages(torch.zeros(2), torch.zeros(2))
    with pytest.raises(TypeError, match="rewards"):
        compute_outcome_advantages(torch.zeros(2).long(), torch.zeros(2).long())


def test_broadcast_to_tokens() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
