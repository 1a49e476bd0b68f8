"""Training-time VGPO metrics of spec section 7.2, accumulated block by block.

``compute_token_weights`` may process a large CPU batch in row blocks; each block contributes *moments*
(count, sum, sum of squares, min, max as a float64 ``[5]`` tensor) per metric, merged exactly at the end,
so the metrics do not depend on the block size. Conventions:

* token statistics pool the valid tokens of the whole batch; ``std`` is the population std;
* "early" / "late" = the first / last ``floor(L / 3)`` valid tokens of each row;
* ``visual_compensation_*`` describe the multiplier ``1 + G * C`` applied to rho (``1 + C`` without gate);
* ``visual_token_percentage_*`` mark the top 40% (``max(1, floor(0.4 L))``, ties included) of each row's
  valid tokens by the UNcompensated rho and average, over non-empty rows, the marked fraction of ``L`` in
  the first ``floor(L / 2)`` tokens and in the rest;
* every ``*_late_early_ratio`` is ``late / (early + 1e-8)`` (the reference code's convention);
* names are the spec's without the ``actor/`` prefix; an empty selection gives 0.
"""

from __future__ import annotations

import math

import torch

from megatron_vgpo.algo.masked_ops import masked_row_kth_largest, safe_ratio

__all__ = ["VISUAL_TOKEN_TOP_FRACTION", "block_moments", "finish_token_metrics", "merge_moments"]

VISUAL_TOKEN_TOP_FRACTION = 0.4

Moments = dict[str, torch.Tensor]


def _moments(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """``[count, sum, sum_sq, min, max]`` (float64) of ``values`` where ``select`` (same shape) is True.

    Masked reductions instead of boolean indexing: no ``nonzero`` and no gathered copy.
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    picked = torch.where(select, values, zero)
    # Sums in the input dtype (torch's cascaded summation), then float64: a dtype= argument would first
    # copy the whole block to float64, which dominated the cost on CPU.
    count = select.sum().to(torch.float64)
    total = picked.sum().to(torch.float64)
    total_sq = (picked * picked).sum().to(torch.float64)
    inf = torch.full((), math.inf, dtype=values.dtype, device=values.device)
    lo = torch.where(select, values, inf).amin().to(torch.float64) if values.numel() else count.new_tensor(math.inf)
    hi = torch.where(select, values, -inf).amax().to(torch.float64) if values.numel() else -count.new_tensor(math.inf)
    return torch.stack([count, total, total_sq, lo, hi])


def block_moments(
    rho: torch.Tensor,
    w_hat: torch.Tensor,
    token_factor: torch.Tensor,
    comp: torch.Tensor | None,
    gate: torch.Tensor | None,
    position: torch.Tensor,
    length: torch.Tensor,
    mask: torch.Tensor,
) -> Moments:
    """Moments of one row block. All ``[b, T]`` except ``length [b]``; ``comp``/``gate`` may be None."""
    out: Moments = {
        "intra_weight": _moments(w_hat, mask),
        "advantage_weighting_factor": _moments(token_factor, mask),
    }
    third = (length // 3).unsqueeze(-1)
    early = mask & (position < third)
    late = mask & (position >= length.unsqueeze(-1) - third)
    if comp is not None:
        multiplier = 1.0 + comp
        out["visual_compensation"] = _moments(multiplier, mask)
        out["visual_compensation_early"] = _moments(multiplier, early)
        out["visual_compensation_late"] = _moments(multiplier, late)
    if gate is not None:
        g = gate.to(rho.dtype)
        out["gating"] = _moments(g, mask)
        out["gating_early"] = _moments(g, early)
        out["gating_late"] = _moments(g, late)
    k = torch.floor(VISUAL_TOKEN_TOP_FRACTION * length.to(torch.float64)).long().clamp(min=1)
    marked = mask & (rho >= masked_row_kth_largest(rho, mask, k))
    first_half = position < (length // 2).unsqueeze(-1)
    rows = length > 0
    denom = length.clamp(min=1).to(rho.dtype)
    out["vt_first"] = _moments((marked & first_half).sum(-1).to(rho.dtype) / denom, rows)
    out["vt_second"] = _moments((marked & ~first_half).sum(-1).to(rho.dtype) / denom, rows)
    return out


def merge_moments(parts: list[Moments]) -> Moments:
    """Exact merge of per-block moments (same keys in every part)."""
    merged: Moments = {}
    for key in parts[0]:
        stacked = torch.stack([p[key] for p in parts])
        merged[key] = torch.cat([stacked[:, :3].sum(0), stacked[:, 3].min().view(1), stacked[:, 4].max().view(1)])
    return merged


def finish_token_metrics(moments: Moments) -> dict[str, float]:
    """Turn merged moments into the flat float dict (one host sync)."""
    keys = list(moments)
    table = torch.stack([moments[k] for k in keys]).tolist() if keys else []
    stats: dict[str, dict[str, float]] = {}
    for key, (n, total, total_sq, lo, hi) in zip(keys, table, strict=True):
        mean = total / n if n else 0.0
        var = max(total_sq / n - mean * mean, 0.0) if n else 0.0
        stats[key] = {"mean": mean, "std": math.sqrt(var), "min": lo if n else 0.0, "max": hi if n else 0.0}

    out: dict[str, float] = {}
    for key in ("intra_weight", "advantage_weighting_factor"):
        out.update({f"{key}_{s}": stats[key][s] for s in ("mean", "min", "max", "std")})
    if "visual_compensation" in stats:
        out.update({f"visual_compensation_{s}": stats["visual_compensation"][s] for s in ("mean", "max", "std")})
        early, late = stats["visual_compensation_early"]["mean"], stats["visual_compensation_late"]["mean"]
        out.update(
            visual_compensation_early_mean=early,
            visual_compensation_late_mean=late,
            visual_compensation_late_early_ratio=safe_ratio(late, early),
        )
    if "gating" in stats:
        early, late = stats["gating_early"]["mean"], stats["gating_late"]["mean"]
        out.update(
            gating_pass_rate=stats["gating"]["mean"],
            gating_pass_rate_early=early,
            gating_pass_rate_late=late,
            gating_pass_rate_late_early_ratio=safe_ratio(late, early),
        )
    first, second = stats["vt_first"]["mean"], stats["vt_second"]["mean"]
    out.update(
        visual_token_percentage_first_half=first,
        visual_token_percentage_second_half=second,
        visual_token_percentage_total=first + second,
        visual_token_percentage_late_early_ratio=safe_ratio(second, first),
    )
    return out
