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


def test_buffer_group_index_is_collision_free_across_large_rounds() -> None:
    """Three rounds of 1,500 groups each (ids repeat between rounds): every group gets its own index."""
    buf = DynamicSamplingBuffer(target_groups=10_000, max_rounds=3, filter_groups=False, on_exhausted="partial")
    for r in range(3):
        ids = torch.arange(1500).repeat_interleave(2)  # the same per-round ids every round
        buf.add_round({"round": torch.full((3000,), r)}, accuracy=torch.zeros(3000), group_ids=ids)
    out = buf.result()
    assert buf.exhausted and buf.num_groups == 4500
    expected = torch.arange(4500).repeat_interleave(2)
    assert torch.equal(out["group_index"], expected)
    assert torch.equal(out["round"], torch.arange(3).repeat_interleave(3000))


def test_buffer_partial_result_is_trimmed_to_the_group_multiple() -> None:
    """on_exhausted='partial': the kept groups so far, minus the latest ones down to a multiple of 2."""
    buf = DynamicSamplingBuffer(target_groups=5, max_rounds=2, on_exhausted="partial", group_multiple=2)
    assert buf.target_groups == 4  # rounded down to the multiple
    acc = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    ids = torch.tensor([7, 7, 8, 8, 9, 9])  # groups 7 and 9 mixed (kept), 8 all-correct (filtered)
    assert buf.add_round({"row": torch.arange(6)}, accuracy=acc, group_ids=ids) == 2
    assert buf.add_round({"row": torch.arange(6, 12)}, accuracy=acc, group_ids=ids) == 2
    # 4 kept = target: full, nothing to trim
    assert buf.is_full and buf.result()["row"].tolist() == [0, 1, 4, 5, 6, 7, 10, 11]
    short = DynamicSamplingBuffer(target_groups=4, max_rounds=2, on_exhausted="partial", group_multiple=2)
    short.add_round({"row": torch.arange(6)}, accuracy=acc, group_ids=ids)  # 2 kept
    one = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # only group 7 mixed
    short.add_round({"row": torch.arange(6, 12)}, accuracy=one, group_ids=ids)  # 3 kept -> trimmed to 2
    assert short.is_done and not short.is_full and short.exhausted
    out = short.result()
    assert out["row"].tolist() == [0, 1, 4, 5] and out["group_index"].tolist() == [0, 0, 2, 2]
    m = short.metrics()
    assert m["dynamic_sampling/groups_dropped"] == 1 and m["dynamic_sampling/groups_filtered"] == 3
    assert m["dynamic_sampling/groups_kept"] == 2 and m["dynamic_sampling/exhausted"] == 1.0
    with pytest.raises(RuntimeError, match="done"):
        short.add_round({"row": torch.arange(6)}, accuracy=acc, group_ids=ids)
    empty = DynamicSamplingBuffer(target_groups=2, max_rounds=1, on_exhausted="partial")
    empty.add_round({"row": torch.arange(2), "tag": ["a", "b"]}, accuracy=torch.ones(2),
                    group_ids=torch.zeros(2, dtype=torch.long))
    out = empty.result()
    assert out["row"].numel() == 0 and out["tag"] == [] and out["group_index"].numel() == 0
    with pytest.raises(ValueError, match="group_multiple"):
        DynamicSamplingBuffer(target_groups=1, group_multiple=2)


def test_dp_group_multiple() -> None:
    from megatron_vgpo.algo.dynamic_sampling import dp_group_multiple

    assert [dp_group_multiple(n, 2) for n in (1, 2, 3, 8)] == [2, 1, 2, 1]
    assert dp_group_multiple(6, 4) == 2 and dp_group_multiple(5, 1) == 1
    for n in range(1, 9):
        for dp in range(1, 9):
            k = dp_group_multiple(n, dp)
            assert (k * n) % dp == 0 and all((j * n) % dp for j in range(1, k))
