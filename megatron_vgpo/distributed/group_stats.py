"""Prompt-group statistics across data-parallel ranks: outcome advantages and VGPO trajectory factors.

The ``n`` rollouts of one prompt (same ``group_id``, the prompt uid) may be spread over several DP ranks, and
every rank may hold a different number of trajectories. The group statistics (GRPO mean/std, VGPO group
min-max of the trajectory score) therefore need every member of a group. The per-trajectory inputs are a
handful of scalars, so each rank all-gathers them over the DP group, runs the pure function of
``megatron_vgpo.algo`` on the concatenation (in rank order) and keeps its own slice. The result is exactly
what the single process would compute on the concatenated batch.

Communication per call: one all-gather of the local sizes (one int64 per rank) and one all-gather of a
``[max_local_B, k]`` int64 table (``k`` = 2 or 3 columns: value bits, group id, has_image), i.e. each rank
receives ``world * max_local_B * k * 8`` bytes. Floats travel as the bit pattern of their float64 value
(exact for fp16/bf16/fp32/fp64) and group ids as int64, so nothing is rounded and ids up to 2^63 survive.

``group_ids`` must be globally consistent (the same prompt has the same id on every rank). Every rank of
``group`` must call these functions together (they are collectives), each with its local rows (possibly 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vgpo.algo.advantages import compute_outcome_advantages
from megatron_vgpo.algo.vgpo import (
    VGPOConfig,
    VGPOFactors,
    combine_factors,
    compute_token_weights,
    trajectory_factors,
)
from megatron_vgpo.distributed import comm

__all__ = [
    "all_gather_rows",
    "dp_outcome_advantages",
    "dp_trajectory_factors",
    "dp_vgpo_factors",
]


def all_gather_rows(
    rows: torch.Tensor, *, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's ``rows [n_local, ...]`` in rank order (``n_local`` may differ, even be 0).

    Returns ``(all_rows [N, ...], offset)`` where ``offset`` is where this rank's rows start. Without an
    initialized process group (or with a group of one) this is ``(rows, 0)``. Trailing dims and dtype must
    match on all ranks. ``rows`` may live on any device (CPU rewards under NCCL included): the gathers run on
    the group's communication device and the result comes back on ``rows.device``.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return rows, 0
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    comm.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    pieces = [torch.empty_like(padded) for _ in range(world)]
    comm.all_gather(pieces, padded, group=group)
    full = torch.cat([piece[:n] for piece, n in zip(pieces, counts)], dim=0)
    return full, sum(counts[:me])


def _float_bits(values: torch.Tensor) -> torch.Tensor:
    """float tensor -> int64 bit pattern of its float64 value (exact, reversible with ``_from_bits``)."""
    return values.detach().to(torch.float64).contiguous().view(torch.int64)


def _from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bits.contiguous().view(torch.float64).to(dtype)


def _check_scalars(name: str, values: torch.Tensor, group_ids: torch.Tensor | None) -> None:
    if values.dim() != 1:
        raise ValueError(f"{name} must be [B_local], got shape {tuple(values.shape)}")
    if not values.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got dtype {values.dtype}")
    if group_ids is None:
        raise ValueError("group_ids [B_local] (int64 prompt uid) is required for grouping by uid")
    if group_ids.shape != values.shape:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but {name} has {tuple(values.shape)}")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")


@torch.no_grad()
def dp_outcome_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    estimator: str = "grpo",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-normalized outcome advantages of this rank's trajectories, groups spanning the DP ranks.

    Args:
        rewards: ``[B_local]`` float, one reward per local trajectory.
        group_ids: ``[B_local]`` int64 prompt uid (globally consistent).
        group: the data-parallel group (None = default group).
        estimator, eps: as in ``megatron_vgpo.algo.advantages.compute_outcome_advantages``.

    Returns:
        ``[B_local]`` advantages (dtype of ``rewards``), equal to the single-process result on the batch
        concatenated in DP-rank order, restricted to this rank's rows.
    """
    _check_scalars("rewards", rewards, group_ids)
    table = torch.stack([_float_bits(rewards), group_ids.to(torch.int64)], dim=1)
    full, offset = all_gather_rows(table, group=group)
    all_rewards = _from_bits(full[:, 0], rewards.dtype)
    advantages = compute_outcome_advantages(all_rewards, full[:, 1], estimator=estimator, eps=eps)
    return advantages[offset: offset + rewards.shape[0]]


@torch.no_grad()
def dp_trajectory_factors(
    trajectory_score: torch.Tensor,
    group_ids: torch.Tensor | None,
    cfg: VGPOConfig,
    *,
    group: dist.ProcessGroup | None = None,
    has_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """VGPO inter-trajectory factor ``g [B_local]`` with prompt groups spanning the DP ranks.

    ``trajectory_score [B_local]`` is ``S`` from ``compute_token_weights``. With ``cfg.grouping="uid"`` the
    scores, ids and ``has_image`` flags (default all True) are all-gathered and
    ``megatron_vgpo.algo.vgpo.trajectory_factors`` runs on the concatenation. With ``cfg.inter=False`` or
    ``cfg.grouping="reference_blocks"`` (blocks of consecutive rows of the LOCAL micro-batch, spec 4.3) no
    communication happens and the local result is returned.
    """
    if not cfg.inter or cfg.grouping != "uid":
        return trajectory_factors(trajectory_score, group_ids, cfg, has_image)
    _check_scalars("trajectory_score", trajectory_score, group_ids)
    assert group_ids is not None
    batch = trajectory_score.shape[0]
    if has_image is None:
        image = torch.ones(batch, dtype=torch.int64, device=trajectory_score.device)
    elif has_image.shape != (batch,):
        raise ValueError(f"has_image must be [B_local]=[{batch}], got shape {tuple(has_image.shape)}")
    else:
        image = (has_image != 0).to(torch.int64)
    table = torch.stack([_float_bits(trajectory_score), group_ids.to(torch.int64), image], dim=1)
    full, offset = all_gather_rows(table, group=group)
    scores = _from_bits(full[:, 0], trajectory_score.dtype)
    factors = trajectory_factors(scores, full[:, 1], cfg, full[:, 2] != 0)
    return factors[offset: offset + batch]


@torch.no_grad()
def dp_vgpo_factors(
    rho: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor | None,
    cfg: VGPOConfig,
    *,
    group: dist.ProcessGroup | None = None,
    has_image: torch.Tensor | None = None,
) -> VGPOFactors:
    """Both VGPO factors for this rank's trajectories: token part local, trajectory part across DP ranks.

    Args:
        rho: ``[B_local, T_local]`` float focus score (0 off-mask); ``T_local`` may differ between ranks.
        response_mask: ``[B_local, T_local]`` bool / 0-1.
        group_ids: ``[B_local]`` int64 prompt uid (may be None with ``grouping="reference_blocks"``).
        cfg: the VGPO configuration; group: the DP group; has_image: optional ``[B_local]`` bool.

    Returns:
        ``VGPOFactors`` whose ``token_factor [B_local, T_local]`` and ``traj_factor [B_local]`` equal the
        single-process ``compute_vgpo_factors`` on the concatenated batch, restricted to this rank. The
        ``diagnostics`` are those of the LOCAL rows (reduce them across DP like any other metric).
    """
    weights = compute_token_weights(rho, response_mask, cfg, has_image)
    traj = dp_trajectory_factors(weights.trajectory_score, group_ids, cfg, group=group, has_image=has_image)
    return combine_factors(weights, traj, cfg)
