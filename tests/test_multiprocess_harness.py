"""The multi-rank harness itself: results come back per rank, failures carry each rank's traceback."""

import pytest
import torch
import torch.distributed as dist

from megatron_vgpo.distributed.multiprocess import RankFailure, run_on_ranks


def _all_reduce_body(rank: int, world_size: int, n: int) -> torch.Tensor:
    t = torch.full((n,), float(rank + 1))
    dist.all_reduce(t)
    return t


def _fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    return rank


def test_results_and_failures_are_reported_per_rank():
    out = run_on_ranks(_all_reduce_body, world_size=3, args=(4,))
    expected = torch.full((4,), 6.0)
    assert len(out) == 3 and all(torch.equal(t, expected) for t in out)

    with pytest.raises(RankFailure) as info:
        run_on_ranks(_fail_on_rank_one, world_size=2, timeout_s=60)
    assert set(info.value.failures) == {1}
    assert "deliberate failure on rank one" in info.value.failures[1]
    assert "ValueError" in str(info.value)
