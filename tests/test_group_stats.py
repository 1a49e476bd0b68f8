"""Cross-DP group statistics (megatron_vgpo.distributed.group_stats) on 2 and 4 gloo ranks.

A global batch of trajectories (prompt groups of varying size with interleaved, large uids; one singleton,
one all-equal group; some image-less rows) is split over the ranks with uneven sizes (one rank empty at 4
ranks) and a different padded response length per rank. Each rank returns its results; the parent compares
them with the single-process functions on the concatenated batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_vgpo.algo.advantages import compute_outcome_advantages
from megatron_vgpo.algo.vgpo import VGPOConfig, compute_vgpo_factors, trajectory_factors
from megatron_vgpo.distributed.group_stats import (
    all_gather_rows,
    dp_outcome_advantages,
    dp_trajectory_factors,
    dp_vgpo_factors,
)
from megatron_vgpo.distributed.multiprocess import run_on_ranks

T_MAX = 9

CONFIGS = {
    "default": VGPOConfig(),
    "imageless_reference": VGPOConfig(imageless="reference"),
    "no_intra": VGPOConfig(intra=False),
    "affine_nogate": VGPOConfig(gating=False, traj_clamp=(0.5, 2.0)),
    "blocks": VGPOConfig(grouping="reference_blocks", rollout_n=4),
}


def make_global(world_size: int) -> dict:
    g = torch.Generator().manual_seed(10 + world_size)
    sizes = [5, 1, 8, 3, 6, 2, 7, 4, 8]  # prompt groups: a singleton, several sizes
    uids = torch.cat([torch.full((n,), 10**12 + 7919 * k) for k, n in enumerate(sizes)])
    n = uids.numel()
    order = torch.randperm(n, generator=g)  # interleave the groups
    uids = uids[order]
    rewards = (torch.rand(n, generator=g) > 0.5).float()
    rewards[uids == uids[0]] = 1.0  # one all-equal group
    rewards[uids == 10**12 + 7919 * 4] = torch.rand(int((uids == 10**12 + 7919 * 4).sum()), generator=g)
    lengths = torch.randint(0, T_MAX + 1, (n,), generator=g)
    mask = torch.arange(T_MAX).unsqueeze(0) < lengths.unsqueeze(1)
    rho = torch.rand(n, T_MAX, generator=g) * mask
    has_image = torch.rand(n, generator=g) > 0.15
    if world_size == 2:
        split = [17, n - 17]
    else:
        split = [9, 0, 25, n - 34]
    return {"uids": uids, "rewards": rewards, "rho": rho, "mask": mask, "has_image": has_image,
            "split": split}


def local_slice(data: dict, rank: int) -> dict:
    start = sum(data["split"][:rank])
    stop = start + data["split"][rank]
    mask = data["mask"][start:stop]
    t_local = max(1, int(mask.sum(-1).max())) if stop > start else 3  # a different padded T per rank
    return {
        "uids": data["uids"][start:stop], "rewards": data["rewards"][start:stop],
        "rho": data["rho"][start:stop, :t_local].contiguous(), "mask": mask[:, :t_local].contiguous(),
        "has_image": data["has_image"][start:stop], "start": start, "stop": stop, "t_local": t_local,
    }


def _body(rank: int, world_size: int) -> dict:
    data = make_global(world_size)
    mine = local_slice(data, rank)
    group = dist.group.WORLD
    out: dict = {}
    for est in ("grpo", "drgrpo"):
        out[("adv", est, "fp32")] = dp_outcome_advantages(mine["rewards"], mine["uids"], group=group,
                                                          estimator=est)
        out[("adv", est, "fp64")] = dp_outcome_advantages(mine["rewards"].double(), mine["uids"], group=group,
                                                          estimator=est)
    for name, cfg in CONFIGS.items():
        factors = dp_vgpo_factors(mine["rho"], mine["mask"], mine["uids"], cfg, group=group,
                                  has_image=mine["has_image"])
        out[("vgpo", name)] = (factors.token_factor, factors.traj_factor, factors.trajectory_score)
    # trajectory factors straight from scores, has_image omitted
    score = mine["rho"].sum(-1)
    out[("traj", "no_has_image")] = dp_trajectory_factors(score, mine["uids"], CONFIGS["default"],
                                                          group=group)
    # the raw gather: rank order, offsets, uneven sizes
    rows = torch.full((mine["stop"] - mine["start"], 2), rank, dtype=torch.int64)
    out["gather"] = all_gather_rows(rows, group=group)
    return out


def _check(results: list[dict], world_size: int) -> None:
    data = make_global(world_size)
    for est in ("grpo", "drgrpo"):
        for prec, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
            ref = compute_outcome_advantages(data["rewards"].to(dtype), data["uids"], estimator=est)
            got = torch.cat([res[("adv", est, prec)] for res in results])
            assert got.dtype == dtype
            assert torch.equal(got, ref), (est, prec)
    assert torch.cat([res[("adv", "grpo", "fp32")] for res in results]).abs().sum() > 0

    mask_full = data["mask"]
    for name, cfg in CONFIGS.items():
        if cfg.grouping == "reference_blocks":  # blocks are per local micro-batch: reference per rank
            refs = []
            for rank in range(world_size):
                mine = local_slice(data, rank)
                f = compute_vgpo_factors(mine["rho"], mine["mask"], mine["uids"], cfg, mine["has_image"])
                refs.append((f.token_factor, f.traj_factor))
        else:
            f = compute_vgpo_factors(data["rho"], mask_full, data["uids"], cfg, data["has_image"])
            refs = []
            for rank in range(world_size):
                mine = local_slice(data, rank)
                sl = slice(mine["start"], mine["stop"])
                refs.append((f.token_factor[sl, : mine["t_local"]], f.traj_factor[sl]))
        for rank, res in enumerate(results):
            token, traj, _ = res[("vgpo", name)]
            torch.testing.assert_close(token, refs[rank][0], atol=1e-6, rtol=0, msg=f"{name} rank {rank}")
            torch.testing.assert_close(traj, refs[rank][1], atol=1e-6, rtol=0, msg=f"{name} rank {rank}")
    # the cross-rank grouping matters: some factor differs from the purely local computation
    local_only = []
    for r, res in enumerate(results):
        mine = local_slice(data, r)
        local_only.append(trajectory_factors(res[("vgpo", "default")][2], mine["uids"], CONFIGS["default"],
                                             mine["has_image"]))
    global_traj = torch.cat([res[("vgpo", "default")][1] for res in results])
    assert not torch.allclose(torch.cat(local_only), global_traj)
    assert (global_traj != 1).sum() > 5

    ref_traj = trajectory_factors(data["rho"].sum(-1), data["uids"], CONFIGS["default"])
    torch.testing.assert_close(torch.cat([res[("traj", "no_has_image")] for res in results]), ref_traj,
                               atol=1e-6, rtol=0)

    expected_rows = torch.cat([torch.full((n, 2), r, dtype=torch.int64) for r, n in enumerate(data["split"])])
    for rank, res in enumerate(results):
        full, offset = res["gather"]
        assert torch.equal(full, expected_rows) and offset == sum(data["split"][:rank])


@pytest.mark.multirank
@pytest.mark.parametrize("world_size", [2, 4])
def test_group_statistics_across_dp_ranks_match_concatenated_batch(world_size):
    _check(run_on_ranks(_body, world_size=world_size, timeout_s=300), world_size)


def test_single_process_is_the_plain_computation_and_errors_are_clear():
    data = make_global(2)
    assert not dist.is_initialized()
    adv = dp_outcome_advantages(data["rewards"], data["uids"])
    assert torch.equal(adv, compute_outcome_advantages(data["rewards"], data["uids"]))
    f = dp_vgpo_factors(data["rho"], data["mask"], data["uids"], CONFIGS["default"],
                        has_image=data["has_image"])
    ref = compute_vgpo_factors(data["rho"], data["mask"], data["uids"], CONFIGS["default"], data["has_image"])
    assert torch.equal(f.traj_factor, ref.traj_factor) and torch.equal(f.token_factor, ref.token_factor)
    with pytest.raises(ValueError, match="group_ids"):
        dp_outcome_advantages(data["rewards"], data["uids"][:-1])
    with pytest.raises(TypeError, match="integer"):
        dp_outcome_advantages(data["rewards"], data["uids"].double())
    with pytest.raises(ValueError, match="required"):
        dp_trajectory_factors(data["rho"].sum(-1), None, CONFIGS["default"])
