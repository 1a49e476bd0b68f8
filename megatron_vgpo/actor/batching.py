"""Micro-batches by a token budget: greedy, stable, deterministic packing of right-padded sequences.

A micro-batch of right-padded sequences costs ``len(micro_batch) * max_length`` token slots (activations
and the [b, s, V/TP] logits scale with it), so the budget bounds that padded size, not the sum of the
valid lengths. Packing walks the sequences in the given order and closes the current micro-batch when the
next sequence would push ``count * max_len`` over the budget ("next fit"): the result depends only on the
lengths and the budget, never on timing or hashing, and keeps the original order inside and across
micro-batches. A sequence longer than the budget on its own still gets a micro-batch of one (logged), so
packing never fails.

How variable lengths meet Megatron's schedules: every micro-batch has its own [b, s]. Without pipeline
parallelism nothing is communicated between stages and Megatron's ``seq_length`` / ``micro_batch_size``
arguments are unused. With PP the actor sets ``config.variable_seq_lengths = True``, so the p2p layer
exchanges each activation's [s, b, h] shape before the tensor (one small extra message per transfer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["pack_by_token_budget", "padded_tokens", "split_contiguous"]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack_by_token_budget(
    lengths: Sequence[int] | torch.Tensor,
    max_tokens: int,
    *,
    seq_multiple: int = 1,
    max_sequences: int | None = None,
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into micro-batches of at most ``max_tokens`` padded token slots.

    Args:
        lengths: valid tokens per sequence (prompt + response), in batch order.
        max_tokens: budget for ``len(micro_batch) * round_up(max_len, seq_multiple)``.
        seq_multiple: the padded length is rounded up to this (TP size with sequence parallel).
        max_sequences: optional cap on sequences per micro-batch.

    Returns:
        A list of micro-batches, each a list of indices in increasing order; their concatenation is
        ``range(len(lengths))``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
    values = [int(v) for v in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    groups: list[list[int]] = []
    current: list[int] = []
    current_max = 0
    for index, length in enumerate(values):
        if length < 0:
            raise ValueError(f"sequence {index} has negative length {length}")
        padded = _round_up(max(length, 1), seq_multiple)
        new_max = max(current_max, padded)
        full = max_sequences is not None and len(current) >= max_sequences
        if current and ((len(current) + 1) * new_max > max_tokens or full):
            groups.append(current)
            current, current_max, new_max = [], 0, padded
        if not current and padded > max_tokens:
            logger.warning("sequence %d has %d tokens > micro-batch budget %d: it gets a micro-batch of its own",
                           index, padded, max_tokens)
        current.append(index)
        current_max = new_max
    if current:
        groups.append(current)
    return groups


def padded_tokens(lengths: Sequence[int] | torch.Tensor, groups: list[list[int]], seq_multiple: int = 1) -> int:
    """Total padded token slots of ``groups`` (sum over micro-batches of ``count * padded max length``)."""
    values = [int(v) for v in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    return sum(len(g) * _round_up(max(max(values[i] for i in g), 1), seq_multiple) for g in groups if g)


def split_contiguous(num: int, parts: int) -> list[list[int]]:
    """``range(num)`` cut into ``parts`` contiguous, equal pieces (``num`` must be divisible by ``parts``)."""
    if parts < 1 or num % parts:
        raise ValueError(f"cannot split {num} items into {parts} equal parts")
    size = num // parts
    return [list(range(k * size, (k + 1) * size)) for k in range(parts)]
