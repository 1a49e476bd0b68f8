"""Small masked reductions shared by the algorithm modules.

Every function works on a batch of right-padded sequences: ``values`` is ``[B, T]`` (any float dtype) and
``mask`` is ``[B, T]`` (bool or 0/1 numbers) marking the valid slots. Rows with no valid slot are legal
everywhere and never produce NaN.
"""

from __future__ import annotations

import torch

__all__ = [
    "as_bool_mask",
    "check_same_shape",
    "group_index",
    "masked_mean",
    "masked_row_kth_largest",
    "masked_row_max",
    "masked_row_min",
    "masked_row_minmax_normalize",
    "masked_std",
    "safe_ratio",
    "valid_positions",
]


def as_bool_mask(mask: torch.Tensor, name: str = "response_mask") -> torch.Tensor:
    """Return ``mask`` as a bool tensor; 0/1 numeric masks are accepted, anything else is rejected."""
    if mask.dtype == torch.bool:
        return mask
    integer_types = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
    if mask.is_floating_point() or mask.dtype in integer_types:
        return mask != 0
    raise TypeError(f"{name} must be a bool or numeric tensor, got dtype {mask.dtype}")


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first tensor in ``others`` whose shape differs from ``reference``."""
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {reference_name} has shape {tuple(reference.shape)}"
            )


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (whole tensor if ``dim`` is None); 0 where nothing is valid."""
    maskf = as_bool_mask(mask).to(values.dtype)
    total = (values * maskf).sum() if dim is None else (values * maskf).sum(dim)
    count = maskf.sum() if dim is None else maskf.sum(dim)
    return total / count.clamp(min=1)


def masked_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of the valid entries of ``values`` (0-dim; 0 if fewer than 1 valid)."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask).sqrt()


def masked_row_min(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row minimum over valid slots: ``[B, T] -> [B]``; 0 for rows with no valid slot."""
    m = as_bool_mask(mask)
    big = torch.finfo(values.dtype).max
    out = values.masked_fill(~m, big).amin(dim=-1)
    return torch.where(m.any(dim=-1), out, torch.zeros_like(out))


def masked_row_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row maximum over valid slots: ``[B, T] -> [B]``; 0 for rows with no valid slot."""
    m = as_bool_mask(mask)
    small = torch.finfo(values.dtype).min
    out = values.masked_fill(~m, small).amax(dim=-1)
    return torch.where(m.any(dim=-1), out, torch.zeros_like(out))


def masked_row_minmax_normalize(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-row min-max normalization over valid slots, ``(v - min) / (max - min + eps)``; 0 off-mask.

    A row whose valid values are all equal (including a single valid slot) becomes all zeros.
    """
    lo = masked_row_min(values, mask).unsqueeze(-1)
    hi = masked_row_max(values, mask).unsqueeze(-1)
    out = (values - lo) / (hi - lo + eps)
    return out * as_bool_mask(mask).to(values.dtype)


def valid_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of each slot among its row's valid slots, and the valid length per row.

    Returns ``(position [B, T] long, length [B] long)``. ``position`` counts valid slots before a slot; for
    the usual right-padded response mask it equals the column index on valid slots. Off-mask slots get
    the rank of the preceding valid slot (callers must mask them).
    """
    m = as_bool_mask(mask).long()
    position = (m.cumsum(dim=-1) - 1).clamp(min=0)
    return position, m.sum(dim=-1)


def group_index(group_ids: torch.Tensor, name: str = "group_ids") -> tuple[torch.Tensor, int]:
    """Map arbitrary int64 ids ``[B]`` to contiguous group indices ``[B]`` in ``[0, G)``: (index, G)."""
    if group_ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {group_ids.dtype}")
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(unique.numel())


def safe_ratio(numerator: float, denominator: float, eps: float = 1e-8) -> float:
    """``numerator / (denominator + eps)``: the convention of the reference code's late/early ratios."""
    return float(numerator) / (float(denominator) + eps)


def masked_row_kth_largest(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-row ``k``-th largest of ``scores [B, T]`` among ``candidates [B, T]`` (bool), as ``[B, 1]``.

    ``k [B]`` (int64, >= 1) may differ per row; rows with fewer than ``k`` candidates (e.g. none) get -inf.
    One ``topk`` with the largest ``k`` of the batch, then a per-row gather.
    """
    masked = scores.masked_fill(~candidates, float("-inf"))
    if masked.shape[0] == 0 or masked.shape[1] == 0:
        return torch.full((masked.shape[0], 1), float("-inf"), dtype=scores.dtype, device=scores.device)
    k_max = min(int(k.max()), masked.shape[1])
    top = masked.topk(k_max, dim=-1, sorted=True).values
    return top.gather(-1, (k - 1).clamp(max=k_max - 1).unsqueeze(-1))
