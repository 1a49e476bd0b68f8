"""VGPO: visually-guided re-weighting of outcome advantages (VGPO_SPEC.md sections 2.4, 3, 4, 7.2).

Pipeline for one batch of responses (all ``[B, T]`` tensors right-padded, ``response_mask`` valid slots):

1. ``focus_from_cosine``: cosine between each response token's final-norm hidden state and the image
   prototype -> visual focus score ``rho`` (``"affine"``: (cos + 1) / 2, the paper; ``"batch_minmax"``:
   min-max over every slot of the batch including padding, the released code).
2. ``compute_token_weights`` (per sequence, no cross-sequence statistics): compensation schedule ``C``,
   late-tail top-kappa gate ``G``, ``w = rho * (1 + G * C)``, per-sequence min-max ``w_hat``, token factor
   ``f = clip(1 + w_hat - mean(w_hat), *token_clamp)`` and trajectory score ``S = sum_t w_hat``.
3. ``trajectory_factors`` (the only cross-sequence step, by prompt uid or by consecutive reference blocks):
   ``g = clip(1 + S_hat - mean_group(S_hat), *traj_clamp)`` with ``S_hat`` the group min-max of ``S``.
4. ``apply_vgpo``: ``A_hat = A * g * f * mask``.

Stages 2 and 3 are separate so a distributed wrapper can gather ``trajectory_score`` and group ids across
data-parallel ranks before stage 3. Everything is computed under ``torch.no_grad`` (the factors are
constants in the loss) in ``promote_types(input dtype, float32)``.

Positions: a token's position ``t`` is its 0-based rank among its row's valid slots, which equals the
column index for the usual right-padded mask; ``L`` is the row's number of valid slots.

Edge cases: ``L = 1`` gives C = 0, G = 1, w_hat = 0, f = 1, S = 0; an empty row gives f = 1, S = 0 (and it
still takes part in its group's statistics, as in the reference code). Rows without image tokens
(``has_image`` False) with ``imageless="neutral"`` get f = g = 1 and are left out of their group's
min/max/mean; a distributed wrapper must therefore gather ``has_image`` along with ``trajectory_score``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from megatron_vgpo.algo.masked_ops import (
    as_bool_mask,
    group_index,
    masked_row_kth_largest,
    masked_row_minmax_normalize,
    valid_positions,
)
from megatron_vgpo.algo.vgpo_diagnostics import block_moments, finish_token_metrics, merge_moments

logger = logging.getLogger(__name__)

__all__ = [
    "TokenWeights",
    "VGPOConfig",
    "VGPOFactors",
    "apply_vgpo",
    "compensation_schedule",
    "compute_token_weights",
    "compute_vgpo_factors",
    "focus_from_cosine",
    "late_tail_gate",
    "trajectory_factors",
]

MINMAX_EPS = 1e-8
# On CPU, compute_token_weights works on blocks of about this many [B, T] slots (a few MiB per temporary,
# cache resident): measured 3x faster than one pass over B=4096 x T=2048. Other devices use one block.
CPU_BLOCK_ELEMENTS = 1 << 19

SCHEDULES = ("linear", "exponential", "step")
FOCUS_NORMS = ("affine", "batch_minmax")
GROUPINGS = ("uid", "reference_blocks")
IMAGELESS_MODES = ("neutral", "reference")
COMPENSATION_SCOPES = ("full", "late")


@dataclass
class VGPOConfig:
    """VGPO switches and hyper-parameters (defaults = the paper / released 7B run).

    Attributes:
        intra: token-level re-weighting (factor ``f``); compensation and gating live inside it.
        inter: trajectory-level re-weighting (factor ``g``).
        compensation: multiply ``rho`` by ``1 + C`` (only when ``intra``).
        gating: restrict compensation to the late-tail top-kappa tokens (only when ``compensation``).
        beta: maximum compensation boost. gamma: tail start fraction (``s0 = floor(gamma * L)``).
        kappa: fraction of the tail admitted by the gate (``k = max(1, floor(kappa * N_tail))``).
        schedule: "linear" | "exponential" | "step"; ``schedule_start`` (ramp start ratio),
            ``exponent`` (exponential only), ``step_at`` (step only).
        compensation_scope: "full" (ramp t / (L - 1) over the whole response, the spec) or "late" (ramp
            (t - gamma T) / ((1 - gamma) T), measured from the tail start; spec A7 ablation).
        focus_norm: "affine" ((cos + 1) / 2) or "batch_minmax" (released code's batch min-max).
        grouping: "uid" (prompt groups) or "reference_blocks" (consecutive blocks of ``rollout_n``).
            In the RL loop both reference modes act on each DP rank's whole shard in the old-log-prob pass,
            not on the released code's update micro-batches: with ``rollout_n == rollout.n`` and per-rank
            pieces that hold whole groups, ``reference_blocks`` equals ``uid`` (see docs/vgpo.md).
        token_clamp / traj_clamp: (low, high) clamps of ``f`` and ``g``.
        imageless: "neutral" (rows without image tokens get f = g = 1 and stay out of group statistics) or
            "reference" (treated like any other row: the code artifact of spec 4.5).
        bf16_focus: round cos and then rho to bf16 like the released bf16 run (creates ties). The
            arithmetic between the two roundings is fp32, so it is not bit-exact to a bf16 min-max.
        diagnostics: compute the spec 7.2 metric dict (costs one extra top-k per row and a host sync).
    """

    intra: bool = True
    inter: bool = True
    compensation: bool = True
    gating: bool = True
    beta: float = 0.3
    gamma: float = 0.5
    kappa: float = 0.2
    schedule: str = "linear"
    schedule_start: float = 0.0
    exponent: float = 2.0
    step_at: float = 0.5
    compensation_scope: str = "full"
    focus_norm: str = "affine"
    grouping: str = "uid"
    rollout_n: int = 8
    token_clamp: tuple[float, float] = (0.1, 2.0)
    traj_clamp: tuple[float, float] = (0.9, 2.0)
    imageless: str = "neutral"
    bf16_focus: bool = False
    diagnostics: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("focus_norm", FOCUS_NORMS),
            ("grouping", GROUPINGS),
            ("imageless", IMAGELESS_MODES),
            ("compensation_scope", COMPENSATION_SCOPES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"VGPOConfig.{name}={value!r} is not one of {allowed}")
        if not (math.isfinite(self.beta) and self.beta >= 0.0):
            raise ValueError(f"VGPOConfig.beta must be a finite number >= 0, got {self.beta}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"VGPOConfig.gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 < self.kappa <= 1.0:
            raise ValueError(f"VGPOConfig.kappa must be in (0, 1], got {self.kappa}")
        if not 0.0 <= self.schedule_start < 1.0:
            raise ValueError(f"VGPOConfig.schedule_start must be in [0, 1), got {self.schedule_start}")
        if not self.exponent > 0.0:
            raise ValueError(f"VGPOConfig.exponent must be > 0, got {self.exponent}")
        if not 0.0 <= self.step_at <= 1.0:
            raise ValueError(f"VGPOConfig.step_at must be in [0, 1], got {self.step_at}")
        if int(self.rollout_n) != self.rollout_n or self.rollout_n < 1:
            raise ValueError(f"VGPOConfig.rollout_n must be a positive integer, got {self.rollout_n}")
        for name in ("token_clamp", "traj_clamp"):
            bounds = tuple(getattr(self, name))
            if len(bounds) != 2 or not bounds[0] <= bounds[1]:
                raise ValueError(f"VGPOConfig.{name} must be (low, high) with low <= high, got {bounds}")
            setattr(self, name, (float(bounds[0]), float(bounds[1])))
        if self.gating and not self.compensation and self.intra:
            logger.debug("VGPOConfig: gating=True is ignored because compensation=False (spec 3.3)")


@dataclass
class TokenWeights:
    """Per-sequence VGPO quantities (stage 2).

    Attributes:
        w_hat: ``[B, T]`` float, per-sequence min-max of the (compensated) score, 0 off-mask.
        token_factor: ``[B, T]`` float, intra factor ``f`` (1 on padding, everywhere when intra is off).
        trajectory_score: ``[B]`` float, ``S_i = sum_t w_hat`` (spec 4.2).
        diagnostics: flat dict of float metrics (empty when ``cfg.diagnostics`` is False).
    """

    w_hat: torch.Tensor
    token_factor: torch.Tensor
    trajectory_score: torch.Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)


@dataclass
class VGPOFactors:
    """Output of ``compute_vgpo_factors``.

    Attributes:
        token_factor: ``[B, T]`` float, intra factor ``f`` (1 on padding).
        traj_factor: ``[B]`` float, inter factor ``g``.
        trajectory_score: ``[B]`` float, ``S`` before the group normalization.
        diagnostics: flat dict of float metrics, spec 7.2 names without the ``actor/`` prefix.
    """

    token_factor: torch.Tensor
    traj_factor: torch.Tensor
    trajectory_score: torch.Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    if not tensor.is_floating_point():
        raise TypeError(f"expected a float tensor, got dtype {tensor.dtype}")
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_batch(name: str, tensor: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(tensor.shape)}")
    if response_mask.shape != tensor.shape:
        raise ValueError(
            f"response_mask has shape {tuple(response_mask.shape)} but {name} has shape {tuple(tensor.shape)}"
        )
    return as_bool_mask(response_mask)


def _check_has_image(has_image: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if has_image is None:
        return None
    if has_image.shape != (batch,):
        raise ValueError(f"has_image must be [B]=[{batch}], got shape {tuple(has_image.shape)}")
    return as_bool_mask(has_image, "has_image")


def _quantize_bf16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).to(values.dtype)


@torch.no_grad()
def focus_from_cosine(
    cos: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: VGPOConfig,
    has_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """Visual focus score ``rho [B, T]`` from the token/prototype cosine ``cos [B, T]``.

    ``cos`` must be 0 on padding; rows flagged ``has_image=False`` are forced to 0 (no prototype). With
    ``focus_norm="batch_minmax"`` the min and max run over every slot of the batch, padding included (spec
    2.4). ``rho`` is 0 off-mask. Returned in ``promote_types(cos.dtype, float32)``.
    """
    mask = _check_batch("cos", cos, response_mask)
    image = _check_has_image(has_image, cos.shape[0])
    dtype = _compute_dtype(cos)
    c = cos.to(dtype)
    if image is not None:
        c = c * image.unsqueeze(-1).to(dtype)
    if cfg.bf16_focus:
        c = _quantize_bf16(c)
    if cfg.focus_norm == "affine":
        rho = (c + 1.0) / 2.0
    elif c.numel() == 0:
        rho = c
    else:
        lo, hi = c.min(), c.max()
        rho = (c - lo) / (hi - lo + MINMAX_EPS)
    if cfg.bf16_focus:
        rho = _quantize_bf16(rho)
    return rho * mask.to(dtype)


def compensation_schedule(
    position: torch.Tensor, length: torch.Tensor, mask: torch.Tensor, cfg: VGPOConfig, dtype: torch.dtype
) -> torch.Tensor:
    """Compensation ``C [B, T]`` (0 off-mask) from valid positions ``[B, T]``, lengths ``[B]`` (spec 3.1)."""
    pos = position.to(dtype)
    last = (length.to(dtype) - 1.0).unsqueeze(-1)  # T_i = L_i - 1
    if cfg.compensation_scope == "full":
        u = pos / (last + MINMAX_EPS)
    else:
        start = cfg.gamma * last
        u = ((pos - start) / ((1.0 - cfg.gamma) * last + MINMAX_EPS)).clamp(0.0, 1.0)
    s = cfg.schedule_start
    shifted = (u - s) / (1.0 - s + MINMAX_EPS)
    if cfg.schedule == "linear":
        comp = cfg.beta * shifted
    elif cfg.schedule == "exponential":
        comp = cfg.beta * shifted.clamp(0.0, 1.0) ** cfg.exponent
    else:
        comp = cfg.beta * (u >= cfg.step_at).to(dtype)
    return torch.where(mask & (u >= s), comp, torch.zeros_like(comp))


def late_tail_gate(
    rho: torch.Tensor, position: torch.Tensor, length: torch.Tensor, mask: torch.Tensor, cfg: VGPOConfig
) -> torch.Tensor:
    """Gate ``G [B, T]`` bool (spec 3.2): tail ``t >= floor(gamma L)``, top ``max(1, floor(kappa N_tail))``
    tokens of the tail by ``rho``, all ties at the threshold admitted."""
    len64 = length.to(torch.float64)
    tail_start = torch.floor(cfg.gamma * len64).long()
    n_tail = (length - tail_start).to(torch.float64)
    k = torch.floor(cfg.kappa * n_tail).long().clamp(min=1)
    tail = mask & (position >= tail_start.unsqueeze(-1))
    threshold = masked_row_kth_largest(rho, tail, k)
    return tail & (rho >= threshold)


@torch.no_grad()
def compute_token_weights(
    rho: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: VGPOConfig,
    has_image: torch.Tensor | None = None,
) -> TokenWeights:
    """Per-sequence stage of VGPO (spec 3 and 4.1): ``w_hat``, token factor ``f`` and score ``S``.

    Args:
        rho: ``[B, T]`` float visual focus score (0 off-mask), e.g. from ``focus_from_cosine``.
        response_mask: ``[B, T]`` bool / 0-1 valid-token mask.
        cfg: the VGPO configuration.
        has_image: optional ``[B]`` bool; with ``cfg.imageless="neutral"`` rows without image get f = 1.
    """
    mask = _check_batch("rho", rho, response_mask)
    image = _check_has_image(has_image, rho.shape[0])
    dtype = _compute_dtype(rho)
    batch, width = rho.shape
    rows = batch
    if rho.device.type == "cpu" and batch * width > CPU_BLOCK_ELEMENTS:
        rows = max(1, CPU_BLOCK_ELEMENTS // max(width, 1))
    if rows >= batch:
        w_hat, token_factor, score, moments = _token_weights_block(rho.to(dtype), mask, image, cfg)
        diagnostics = finish_token_metrics(merge_moments([moments])) if moments is not None else {}
        return TokenWeights(w_hat, token_factor, score, diagnostics)
    # A loop over row BLOCKS (not over sequences): each block is fully vectorized; see CPU_BLOCK_ELEMENTS.
    w_hat = torch.empty(batch, width, dtype=dtype, device=rho.device)
    token_factor = torch.empty(batch, width, dtype=dtype, device=rho.device)
    score = torch.empty(batch, dtype=dtype, device=rho.device)
    parts = []
    for start in range(0, batch, rows):
        stop = min(start + rows, batch)
        block_image = None if image is None else image[start:stop]
        block = _token_weights_block(rho[start:stop].to(dtype), mask[start:stop], block_image, cfg)
        w_hat[start:stop], token_factor[start:stop], score[start:stop] = block[:3]
        parts.append(block[3])
    diagnostics = finish_token_metrics(merge_moments(parts)) if cfg.diagnostics else {}
    return TokenWeights(w_hat, token_factor, score, diagnostics)


def _token_weights_block(
    rho: torch.Tensor, mask: torch.Tensor, image: torch.Tensor | None, cfg: VGPOConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """``compute_token_weights`` on one row block: (w_hat, token_factor, score, diagnostic moments)."""
    dtype = rho.dtype
    rho = rho * mask.to(dtype)
    position, length = valid_positions(mask)
    comp = gate = None
    if cfg.intra and cfg.compensation:
        comp = compensation_schedule(position, length, mask, cfg, dtype)
        if cfg.gating:
            gate = late_tail_gate(rho, position, length, mask, cfg)
            comp = comp * gate.to(dtype)
        w = rho * (1.0 + comp)
    else:
        w = rho  # intra off: inter uses the per-sequence min-max of rho, uncompensated (spec 4.2)
    w_hat = masked_row_minmax_normalize(w, mask, MINMAX_EPS)
    score = w_hat.sum(dim=-1)
    if cfg.intra:
        mean_w_hat = score.unsqueeze(-1) / length.clamp(min=1).unsqueeze(-1).to(dtype)
        factor = (1.0 + w_hat - mean_w_hat).clamp(*cfg.token_clamp)
        keep = mask if image is None or cfg.imageless == "reference" else mask & image.unsqueeze(-1)
        token_factor = torch.where(keep, factor, torch.ones_like(factor))
    else:
        token_factor = torch.ones_like(w_hat)
    moments = block_moments(rho, w_hat, token_factor, comp, gate, position, length, mask) if cfg.diagnostics else None
    return w_hat, token_factor, score, moments


def _block_groups(batch: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Consecutive-block grouping of spec 4.3: (group index [B], member [B] bool, number of groups)."""
    rows = torch.arange(batch, device=device)
    if batch < n:
        return torch.zeros_like(rows), torch.ones(batch, dtype=torch.bool, device=device), 1
    num_groups = batch // n
    member = rows < num_groups * n
    return torch.where(member, rows // n, torch.zeros_like(rows)), member, num_groups


@torch.no_grad()
def trajectory_factors(
    trajectory_score: torch.Tensor,
    group_ids: torch.Tensor | None,
    cfg: VGPOConfig,
    has_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inter-trajectory factor ``g [B]`` (spec 4.2-4.3); all ones when ``cfg.inter`` is False.

    ``grouping="uid"``: groups are the distinct values of ``group_ids [B]`` (int64, any order).
    ``grouping="reference_blocks"``: ``group_ids`` is ignored; consecutive blocks of ``rollout_n`` rows, the
    ``B mod rollout_n`` leftover rows get 1, and ``B < rollout_n`` forms a single group. Within a group:
    ``S_hat = (S - min) / (max - min + 1e-8)``, ``g = clip(1 + S_hat - mean(S_hat), *traj_clamp)``. With
    ``imageless="neutral"`` rows without image get 1 and are left out of their group's min/max/mean.
    """
    if trajectory_score.dim() != 1:
        raise ValueError(f"trajectory_score must be [B], got shape {tuple(trajectory_score.shape)}")
    batch = trajectory_score.shape[0]
    image = _check_has_image(has_image, batch)
    dtype = _compute_dtype(trajectory_score)
    score = trajectory_score.to(dtype)
    ones = torch.ones_like(score)
    if not cfg.inter or batch == 0:
        return ones
    if cfg.grouping == "uid":
        if group_ids is None or group_ids.shape != (batch,):
            shape = None if group_ids is None else tuple(group_ids.shape)
            raise ValueError(f"group_ids must be [B]=[{batch}] for grouping='uid', got {shape}")
        index, num_groups = group_index(group_ids)
        member = torch.ones(batch, dtype=torch.bool, device=score.device)
    else:
        index, member, num_groups = _block_groups(batch, cfg.rollout_n, score.device)
    if image is not None and cfg.imageless == "neutral":
        member = member & image

    idx, vals = index[member], score[member]
    lo = torch.full((num_groups,), float("inf"), dtype=dtype, device=score.device)
    hi = torch.full((num_groups,), float("-inf"), dtype=dtype, device=score.device)
    lo = lo.scatter_reduce(0, idx, vals, reduce="amin")
    hi = hi.scatter_reduce(0, idx, vals, reduce="amax")
    lo_row = torch.where(member, lo[index], torch.zeros_like(score))
    hi_row = torch.where(member, hi[index], torch.zeros_like(score))
    s_hat = torch.where(member, (score - lo_row) / (hi_row - lo_row + MINMAX_EPS), torch.zeros_like(score))
    zeros = torch.zeros(num_groups, dtype=dtype, device=score.device)
    count = zeros.index_add(0, idx, torch.ones_like(vals))
    mean = zeros.index_add(0, idx, s_hat[member]) / count.clamp(min=1)
    factor = (1.0 + s_hat - mean[index]).clamp(*cfg.traj_clamp)
    return torch.where(member, factor, ones)


@torch.no_grad()
def compute_vgpo_factors(
    rho: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor | None,
    cfg: VGPOConfig,
    has_image: torch.Tensor | None = None,
) -> VGPOFactors:
    """Both VGPO factors for one batch: ``compute_token_weights`` then ``trajectory_factors``.

    Args:
        rho: ``[B, T]`` float focus score (0 off-mask). response_mask: ``[B, T]`` bool / 0-1.
        group_ids: ``[B]`` int64 prompt uid (may be None with ``grouping="reference_blocks"``).
        has_image: optional ``[B]`` bool.
    """
    weights = compute_token_weights(rho, response_mask, cfg, has_image)
    return combine_factors(weights, trajectory_factors(weights.trajectory_score, group_ids, cfg, has_image), cfg)


def combine_factors(weights: TokenWeights, traj: torch.Tensor, cfg: VGPOConfig) -> VGPOFactors:
    """``VGPOFactors`` from the token stage and the trajectory factors ``traj`` [B] (however they were
    grouped: locally, or across data-parallel ranks), adding the trajectory-factor diagnostics."""
    diagnostics = dict(weights.diagnostics)
    if cfg.diagnostics and traj.numel():
        diagnostics.update(
            trajectory_weighting_factor_mean=float(traj.mean()),
            trajectory_weighting_factor_min=float(traj.min()),
            trajectory_weighting_factor_max=float(traj.max()),
        )
    return VGPOFactors(weights.token_factor, traj, weights.trajectory_score, diagnostics)


def apply_vgpo(advantages: torch.Tensor, factors: VGPOFactors, response_mask: torch.Tensor) -> torch.Tensor:
    """Re-weighted per-token advantages ``A * g * f * mask``: ``[B, T]``.

    ``advantages`` is ``[B]`` (one outcome advantage per trajectory) or ``[B, T]`` (already per token).
    """
    mask = as_bool_mask(response_mask)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    if advantages.dim() != 2 or advantages.shape[0] != mask.shape[0]:
        raise ValueError(
            f"advantages must be [B] or [B, T] with B={mask.shape[0]}, got shape {tuple(advantages.shape)}"
        )
    if factors.token_factor.shape != mask.shape:
        raise ValueError(
            f"factors.token_factor has shape {tuple(factors.token_factor.shape)}, response_mask {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(advantages.dtype, factors.token_factor.dtype)
    scale = advantages.to(dtype) * factors.traj_factor.to(dtype).unsqueeze(-1)  # [B, 1] or [B, T]
    return (factors.token_factor.to(dtype) * scale).masked_fill_(~mask, 0.0)
