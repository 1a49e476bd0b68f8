"""DAPO dynamic sampling: group filter, over-sampling buffer, overlong shaping, disagreement metric.

References are loop restatements of the DAPO rules (spec 5.3) written in this file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_vgpo.algo.dynamic_sampling import (
    DynamicSamplingBuffer,
    DynamicSamplingExhausted,
    disagreement_fraction,
    group_filter_mask,
    overlong_penalty,
)


def ref_keep(acc: list[float], ids: list[int], low: float, high: float) -> list[bool]:
    out = []
    for i in range(len(acc)):
        members = [acc[j] for j in range(len(acc)) if ids[j] == ids[i]]
        mean = sum(members) / len(members)
        out.append(low < mean < high)
    return out


def random_round(rng: np.random.Generator, n_prompts: int, n: int, base_uid: int):
    """Interleaved rows of n_prompts groups of size n with 0/1 accuracy; uids non-contiguous."""
    uids = np.repeat(base_uid + 7 * np.arange(n_prompts), n)
    p = rng.choice([0.0, 0.5, 1.0], size=n_prompts)
    acc = (rng.random(n_prompts * n) < np.repeat(p, n)).astype(float)
    perm = rng.permutation(len(uids))
    return acc[perm], uids[perm]


def test_filter_matches_restatement() -> None:
    rng = np.random.default_rng(0)
    for low, high in ((0.01, 0.99), (0.2, 0.8), (0.0, 1.0)):
        acc, uids = random_round(rng, 12, 4, base_uid=10**9)
        got = group_filter_mask(torch.tensor(acc), torch.tensor(uids), low, high)
        assert got.tolist() == ref_keep(acc.tolist(), uids.tolist(), low, high)


def test_filter_bounds_are_strict() -> None:
    acc = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    ids = torch.tensor([1, 1, 2, 2, 3, 3])
    assert group_filter_mask(acc, ids).tolist() == [False, False, False, False, True, True]
    # mean 0.5 equals the bound -> dropped (strict inequality)
    assert group_filter_mask(acc, ids, low=0.5, high=0.99).tolist() == [False] * 6


def test_disagreement_fraction() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.2])
    ids = torch.tensor([5, 5, 9, 9, -1, -1, 4])  # groups: {5} same, {9} differ, {-1} same, {4} singleton
    assert disagreement_fraction(rewards, ids) == pytest.approx(1 / 4)


def test_buffer_accumulates_whole_groups_and_truncates_exactly() -> None:
    rng = np.random.default_rng(1)
    n, target = 4, 7
    buf = DynamicSamplingBuffer(target_groups=target, max_rounds=0)
    expected_rows: list[int] = []
    row_offset = 0
    while not buf.is_full:
        acc, uids = random_round(rng, 5, n, base_uid=1000 + 100 * buf.rounds)
        rows = np.arange(row_offset, row_offset + len(acc))
        # Restatement: kept groups in order of first appearance, admitted until the target is reached.
        keep = ref_keep(acc.tolist(), uids.tolist(), 0.01, 0.99)
        order: list[int] = []
        for i, u in enumerate(uids.tolist()):
            if keep[i] and u not in order:
                order.append(u)
        admitted = set(order[: target - len(expected_rows) // n])
        expected_rows += [int(r) for r, u in zip(rows, uids) if u in admitted]
        buf.add_round(
            {"row": torch.tensor(rows), "uid": torch.tensor(uids), "tag": [f"r{r}" for r in rows]},
            accuracy=torch.tensor(acc),
            group_ids=torch.tensor(uids),
        )
        row_offset += len(acc)
    out = buf.result()
    assert out["row"].tolist() == expected_rows
    assert out["tag"] == [f"r{r}" for r in expected_rows]
    assert len(expected_rows) == target * n  # whole groups, exactly the target
    counts = np.unique(out["uid"].numpy(), return_counts=True)[1]
    assert np.all(counts == n) and len(counts) == target
    m = buf.metrics()
    assert m["dynamic_sampling/rounds"] == buf.rounds and m["dynamic_sampling/groups_kept"] == target
    with pytest.raises(RuntimeError, match="full"):
        buf.add_round({"row": torch.tensor([0])}, accuracy=torch.tensor([0.5]), group_ids=torch.tensor([1]))


def test_buffer_raises_after_max_rounds() -> None:
    buf = DynamicSamplingBuffer(target_groups=3, max_rounds=2)
    acc = torch.tensor([1.0, 1.0, 0.0, 1.0])
    ids = torch.tensor([1, 1, 2, 2])  # one useful group per round
    buf.add_round({"acc": acc}, accuracy=acc, group_ids=ids)
    with pytest.raises(DynamicSamplingExhausted, match="max_rounds=2"):
        buf.add_round({"acc": acc}, accuracy=acc, group_ids=ids)
    with pytest.raises(RuntimeError, match="2/3"):
        buf.result()


def test_buffer_argument_errors() -> None:
    with pytest.raises(ValueError, match="target_groups"):
        DynamicSamplingBuffer(target_groups=0)
    with pytest.raises(ValueError, match="low"):
        DynamicSamplingBuffer(target_groups=1, low=0.9, high=0.1)
    buf = DynamicSamplingBuffer(target_groups=1)
    with pytest.raises(ValueError, match="'x'"):
        buf.add_round({"x": torch.zeros(3)}, accuracy=torch.zeros(2), group_ids=torch.zeros(2).long())


def test_overlong_penalty_matches_dapo_rule() -> None:
    max_len, buffer = 20, 8
    lengths = torch.arange(0, 26)
    got = overlong_penalty(lengths, max_len, buffer, penalty_factor=0.5)
    for length, value in zip(lengths.tolist(), got.tolist()):
        if length <= max_len - buffer:
            exp = 0.0
        elif length <= max_len:
            exp = ((max_len - buffer) - length) / buffer
        else:
            exp = -1.0
        assert value == pytest.approx(0.5 * exp)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_len, 0)
