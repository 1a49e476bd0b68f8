"""DAPO dynamic sampling (online group filtering with over-sampling) and soft overlong punishment.

A *group* is the set of trajectories sampled for one prompt (same ``group_id``). DAPO drops groups whose
mean accuracy is not strictly inside ``(low, high)`` (all-correct / all-wrong groups carry no GRPO signal)
and keeps sampling rounds until enough groups survive. All per-trajectory inputs are ``[B]`` tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from megatron_vgpo.algo.masked_ops import group_index

logger = logging.getLogger(__name__)

__all__ = [
    "DynamicSamplingBuffer",
    "DynamicSamplingExhausted",
    "disagreement_fraction",
    "dp_group_multiple",
    "group_filter_mask",
    "group_mean",
    "overlong_penalty",
]

Batch = Mapping[str, torch.Tensor | Sequence[Any]]


class DynamicSamplingExhausted(RuntimeError):
    """Raised when ``max_rounds`` over-sampling rounds did not yield the target number of groups."""


def group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values [B]`` per group. Returns ``(per_group_mean [G], group_index [B] in [0, G))``."""
    index, num_groups = group_index(group_ids)
    vals = values.to(torch.float64)
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=values.device)
    count = zeros.index_add(0, index, torch.ones_like(vals))
    return zeros.index_add(0, index, vals) / count, index


def group_filter_mask(
    accuracy: torch.Tensor, group_ids: torch.Tensor, low: float = 0.01, high: float = 0.99
) -> torch.Tensor:
    """``[B]`` bool: True for trajectories whose group mean accuracy is strictly inside ``(low, high)``."""
    _validate_bounds(low, high)
    if accuracy.shape != group_ids.shape or accuracy.dim() != 1:
        raise ValueError(f"accuracy {tuple(accuracy.shape)} and group_ids {tuple(group_ids.shape)} must both be [B]")
    if accuracy.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=accuracy.device)
    means, index = group_mean(accuracy, group_ids)
    keep_group = (means > low) & (means < high)
    return keep_group[index]


def disagreement_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Fraction of groups whose members' rewards are not all equal (0.0 for an empty batch)."""
    if rewards.numel() == 0:
        return 0.0
    index, num_groups = group_index(group_ids)
    vals = rewards.to(torch.float64)
    init = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device)
    lo = init.scatter_reduce(0, index, vals, reduce="amin", include_self=False)
    hi = init.scatter_reduce(0, index, vals, reduce="amax", include_self=False)
    return float((hi > lo).double().mean())


def overlong_penalty(
    response_lengths: torch.Tensor, max_length: int, buffer: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment, ``[B]`` float32 (add it to the task reward).

    0 for ``length <= max_length - buffer``; then a linear ramp ``-(length - (max_length - buffer)) / buffer``
    reaching ``-1`` at ``max_length``; ``-1`` beyond. Everything is multiplied by ``penalty_factor``.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be > 0, got {max_length}")
    if not 0 < buffer <= max_length:
        raise ValueError(f"buffer must be in (0, max_length={max_length}], got {buffer}")
    excess = response_lengths.to(torch.float32) - float(max_length - buffer)
    return (-(excess / buffer)).clamp(-1.0, 0.0) * penalty_factor


def dp_group_multiple(group_size: int, dp_size: int) -> int:
    """Fewest groups of ``group_size`` trajectories whose total splits evenly over ``dp_size`` ranks:
    ``dp_size / gcd(group_size, dp_size)``."""
    if group_size < 1 or dp_size < 1:
        raise ValueError(f"group_size ({group_size}) and dp_size ({dp_size}) must be >= 1")
    return dp_size // math.gcd(group_size, dp_size)


def _validate_bounds(low: float, high: float) -> None:
    if not low < high:
        raise ValueError(f"filter bounds need low < high, got low={low}, high={high}")


def _first_appearance_rank(index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """For contiguous group indices ``[B]``: rank ``[G]`` of each group by the row of its first member."""
    rows = torch.arange(index.numel(), device=index.device)
    first_row = torch.full((num_groups,), index.numel(), dtype=torch.long, device=index.device)
    first_row = first_row.scatter_reduce(0, index, rows, reduce="amin", include_self=True)
    rank = torch.empty_like(first_row)
    rank[torch.argsort(first_row)] = torch.arange(num_groups, device=index.device)
    return rank


def _select_rows(batch: Batch, rows: torch.Tensor) -> dict[str, torch.Tensor | list[Any]]:
    out: dict[str, torch.Tensor | list[Any]] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.index_select(0, rows.to(value.device))
        else:
            out[key] = [value[i] for i in rows.tolist()]
    return out


class DynamicSamplingBuffer:
    """Accumulates whole kept groups across over-sampling rounds until ``target_groups`` are collected.

    Usage::

        buf = DynamicSamplingBuffer(target_groups=512, max_rounds=8, on_exhausted="partial")
        while not buf.is_done:
            batch = sample_and_score()            # dict of [B]-leading tensors / lists
            buf.add_round(batch, accuracy=batch["acc"], group_ids=batch["uid"])
        train_batch = buf.result()                # whole groups in arrival order, + "group_index"

    Groups are identified per round (the same id in two rounds is two groups). Every group seen gets a
    step-unique ``group_index`` (0, 1, 2, ... over all rounds, by arrival: round, then first member), which
    :meth:`result` returns for its rows, so group ids derived from it cannot collide however many prompts a
    round has. Within a round the kept groups are taken in order of their first member; once full, the
    surplus is dropped group-wise so the result holds exactly the target of complete groups, rows in their
    original order. ``filter_groups=False`` keeps every group (no DAPO filter: one plain batch).

    ``group_multiple``: the result always holds a multiple of it (e.g. the data-parallel size over
    ``gcd(n, dp)``, so the trajectories split evenly over DP ranks): the target is rounded down to one, and a
    partial result drops its last groups down to one (counted in ``groups_dropped``).

    ``max_rounds <= 0`` means unlimited. When the ``max_rounds``-th round still leaves the buffer short:
    ``on_exhausted="raise"`` makes ``add_round`` raise ``DynamicSamplingExhausted``; ``"partial"`` ends the
    collection (``is_done``) and :meth:`result` returns the groups kept so far (possibly none).
    """

    def __init__(self, target_groups: int, max_rounds: int = 0, low: float = 0.01, high: float = 0.99, *,
                 filter_groups: bool = True, on_exhausted: str = "raise", group_multiple: int = 1) -> None:
        if target_groups <= 0:
            raise ValueError(f"target_groups must be > 0, got {target_groups}")
        if group_multiple < 1 or target_groups < group_multiple:
            raise ValueError(f"target_groups ({target_groups}) must be >= group_multiple ({group_multiple}) >= 1")
        if on_exhausted not in ("raise", "partial"):
            raise ValueError(f"on_exhausted must be 'raise' or 'partial', got {on_exhausted!r}")
        _validate_bounds(low, high)
        self.requested_groups = target_groups
        self.target_groups = target_groups - target_groups % group_multiple
        self.group_multiple = group_multiple
        self.max_rounds = max_rounds
        self.low = low
        self.high = high
        self.filter_groups = filter_groups
        self.on_exhausted = on_exhausted
        self.rounds = 0
        self.num_groups = 0
        self.groups_seen = 0
        self.groups_filtered = 0
        self.groups_dropped = 0
        self.exhausted = False
        self.disagreement_fractions: list[float] = []
        self._parts: list[dict[str, torch.Tensor | list[Any]]] = []
        self._template: dict[str, torch.Tensor | list[Any]] | None = None

    @property
    def is_full(self) -> bool:
        """True once ``target_groups`` groups have been kept."""
        return self.num_groups >= self.target_groups

    @property
    def is_done(self) -> bool:
        """True when full, or when the rounds ran out (``on_exhausted="partial"``)."""
        return self.is_full or self.exhausted

    def add_round(self, batch: Batch, accuracy: torch.Tensor, group_ids: torch.Tensor) -> int:
        """Filter one sampled round and keep its surviving groups; returns the number of groups kept.

        Args:
            batch: mapping of per-trajectory fields (tensors with leading dim B, or length-B sequences).
            accuracy: ``[B]`` float accuracy (or any reward) used for the filter.
            group_ids: ``[B]`` int64 prompt uid per trajectory.
        """
        if self.is_done:
            raise RuntimeError("DynamicSamplingBuffer is done (full or out of rounds); call result()")
        n_rows = accuracy.shape[0]
        for key, value in batch.items():
            if len(value) != n_rows:
                raise ValueError(f"batch field {key!r} has length {len(value)}, expected B={n_rows}")
        if "group_index" in batch:
            raise ValueError("batch field 'group_index' is reserved: the buffer assigns it")
        if self._template is None:
            self._template = _select_rows(batch, torch.zeros(0, dtype=torch.long))
        self.rounds += 1
        kept_groups = 0
        if n_rows:
            keep = (group_filter_mask(accuracy, group_ids, self.low, self.high) if self.filter_groups
                    else torch.ones(n_rows, dtype=torch.bool, device=accuracy.device))
            index, num_groups = group_index(group_ids)
            self.disagreement_fractions.append(disagreement_fraction(accuracy, group_ids))
            kept_per_group = torch.zeros(num_groups, dtype=torch.bool, device=index.device)
            kept_per_group[index[keep]] = True
            # Rank the kept groups by arrival and admit only as many as are still missing.
            rank = _first_appearance_rank(index, num_groups)
            kept_rank = torch.full_like(rank, num_groups)
            order = torch.argsort(torch.where(kept_per_group, rank, rank + num_groups))
            n_kept = int(kept_per_group.sum())
            kept_rank[order[:n_kept]] = torch.arange(n_kept, device=index.device)
            missing = self.target_groups - self.num_groups
            admit_group = kept_per_group & (kept_rank < missing)
            rows = torch.nonzero(admit_group[index], as_tuple=False).squeeze(-1)
            kept_groups = int(admit_group.sum())
            if kept_groups:
                part = _select_rows(batch, rows)
                part["group_index"] = (self.groups_seen + rank[index[rows]]).to(torch.int64).cpu()
                self._parts.append(part)
            self.groups_seen += num_groups
            self.groups_filtered += num_groups - n_kept
            self.groups_dropped += n_kept - kept_groups
            self.num_groups += kept_groups
        logger.debug("dynamic sampling round %d: kept %d groups, %d/%d collected", self.rounds, kept_groups,
                    self.num_groups, self.target_groups)
        if not self.is_full and self.max_rounds > 0 and self.rounds >= self.max_rounds:
            if self.on_exhausted == "raise":
                raise DynamicSamplingExhausted(
                    f"dynamic sampling collected only {self.num_groups}/{self.target_groups} groups after "
                    f"max_rounds={self.max_rounds} rounds ({self.groups_seen} groups sampled); raise max_rounds, "
                    f"widen (low, high)=({self.low}, {self.high}), set max_rounds<=0 for unlimited or train on "
                    "the partial batch")
            self.exhausted = True
            self._trim_to_multiple()
        return kept_groups

    def _trim_to_multiple(self) -> None:
        """Drop the last kept groups until their number is a multiple of ``group_multiple``."""
        surplus = self.num_groups % self.group_multiple
        while surplus:
            part = self._parts[-1]
            last = part["group_index"]
            groups = torch.unique(last)  # sorted: the latest-arriving groups last
            drop = min(surplus, groups.numel())
            keep_rows = torch.nonzero(~torch.isin(last, groups[groups.numel() - drop:]), as_tuple=False).squeeze(-1)
            if keep_rows.numel():
                self._parts[-1] = _select_rows(part, keep_rows)
            else:
                self._parts.pop()
            surplus -= drop
            self.num_groups -= drop
            self.groups_dropped += drop

    def result(self) -> dict[str, torch.Tensor | list[Any]]:
        """Concatenate the kept rows of all rounds, plus ``group_index`` [B] int64 (see the class doc).

        Raises unless full, or out of rounds with ``on_exhausted="partial"`` (then possibly no rows)."""
        if not self.is_done:
            raise RuntimeError(f"only {self.num_groups}/{self.target_groups} groups collected so far")
        parts = self._parts
        if not parts:
            template = dict(self._template or {})
            template["group_index"] = torch.zeros(0, dtype=torch.int64)
            return template
        merged: dict[str, torch.Tensor | list[Any]] = {}
        for key in parts[0]:
            values = [part[key] for part in parts]
            if isinstance(values[0], torch.Tensor):
                merged[key] = torch.cat(values, dim=0)  # type: ignore[arg-type]
            else:
                merged[key] = [item for value in values for item in value]  # type: ignore[union-attr]
        return merged

    def metrics(self) -> dict[str, float]:
        """Bookkeeping numbers for logging."""
        mean_disagree = (
            sum(self.disagreement_fractions) / len(self.disagreement_fractions) if self.disagreement_fractions else 0.0
        )
        return {
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/groups_kept": float(self.num_groups),
            "dynamic_sampling/groups_seen": float(self.groups_seen),
            "dynamic_sampling/groups_filtered": float(self.groups_filtered),
            "dynamic_sampling/groups_dropped": float(self.groups_dropped),
            "dynamic_sampling/exhausted": float(self.exhausted),
            "dynamic_sampling/keep_rate": self.num_groups / max(self.groups_seen, 1),
            "dynamic_sampling/disagreement_fraction": mean_disagree,
        }
