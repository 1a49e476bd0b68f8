"""What the VGPO reference-code modes do in this loop (docs/vgpo.md, "What the reference-code modes do").

The loop computes the factors on each DP rank's shard (rows ``dp_shard_indices``), in the order of the
step's batch (each prompt's ``rollout.n`` trajectories next to each other). Reference: the factors by
prompt uid over the whole step's batch (what ``dp_trajectory_factors`` returns, checked across ranks in
``test_group_stats.py``), and a float64 restatement of consecutive blocks.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vgpo.actor.rl_batch import dp_shard_indices
from megatron_vgpo.algo.vgpo import VGPOConfig, focus_from_cosine, trajectory_factors


def _blocks_reference(score: torch.Tensor, n: int, clamp: tuple[float, float]) -> torch.Tensor:
    s = score.double()
    out = torch.ones_like(s)
    groups = [range(0, len(s))] if len(s) < n else [range(k * n, (k + 1) * n) for k in range(len(s) // n)]
    for rows in groups:
        v = s[list(rows)]
        hat = (v - v.min()) / (v.max() - v.min() + 1e-8)
        out[list(rows)] = (1 + hat - hat.mean()).clamp(*clamp)
    return out


@pytest.mark.parametrize(("prompts", "n", "dp", "mini_batches", "same_as_uid"), [
    (8, 4, 2, 2, True),    # per-rank piece 8 = two whole groups
    (4, 2, 2, 1, True),    # piece 4 = two whole groups
    (3, 4, 2, 1, False),   # piece 6: the second block straddles two prompts' groups
    (6, 2, 4, 1, False),   # piece 3: blocks of 2 cut the groups
])
def test_reference_blocks_on_the_dp_shard(prompts: int, n: int, dp: int, mini_batches: int,
                                          same_as_uid: bool) -> None:
    b = prompts * n
    uids = torch.arange(prompts).repeat_interleave(n) + 500
    score = torch.rand(b, generator=torch.Generator().manual_seed(b + dp), dtype=torch.float64)
    blocks = VGPOConfig(grouping="reference_blocks", rollout_n=n)
    by_uid = trajectory_factors(score, uids, VGPOConfig(grouping="uid", rollout_n=n))  # the whole step's groups
    differs = False
    for rank in range(dp):
        rows = dp_shard_indices(b, rank, dp, mini_batches)
        local = trajectory_factors(score[rows], uids[rows], blocks)
        assert torch.allclose(local, _blocks_reference(score[rows], n, blocks.traj_clamp), atol=1e-12)
        differs |= not torch.allclose(local, by_uid[rows], atol=1e-12)
    assert differs != same_as_uid


def test_batch_minmax_spans_the_rank_shard_including_padding() -> None:
    """rho = (c - min) / (max - min + eps) over every [B_local, R] slot of the shard, padding zeros included."""
    cos = torch.tensor([[0.5, 0.7, 0.0, 0.0], [0.2, 0.4, 0.6, 0.9]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    rho = focus_from_cosine(cos, mask, VGPOConfig(focus_norm="batch_minmax"))
    lo, hi = 0.0, 0.9  # the padding zero is the minimum
    assert torch.allclose(rho, torch.where(mask, (cos - lo) / (hi - lo + 1e-8), torch.zeros_like(cos)), atol=1e-12)
