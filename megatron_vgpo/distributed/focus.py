"""VGPO focus cosines from SHARDED final-norm hidden states, without ever gathering the hidden states.

Megatron leaves the final-norm output (the input of the output layer) sharded on the last pipeline stage:

* ``shard="sequence"`` (sequence parallelism): rank ``r`` of the tensor-parallel ``group`` holds rows
  ``[r * s/tp, (r + 1) * s/tp)`` of ``[s, b, h]``, i.e. ``hidden_local`` is ``[s/tp, b, h]``
  (contiguous chunks in rank order, as ``scatter_to_sequence_parallel_region`` cuts them).
* ``shard="hidden"``: rank ``r`` holds columns ``[r * h/tp, (r + 1) * h/tp)``: ``[s, b, h/tp]``.
* optionally context parallelism on top (``cp_group``): Megatron's load-balanced layout splits the
  sequence into ``2 * cp`` chunks and CP rank ``c`` keeps chunks ``c`` and ``2 cp - 1 - c``
  (``cp_layout="zigzag"``; ``"contiguous"`` keeps chunk ``c`` of ``cp``); with ``shard="sequence"`` that
  CP-local sequence is then cut into ``tp`` contiguous pieces. ``group`` and ``cp_group`` must be the two
  axes of one grid (Megatron's TP and CP groups are). Any other row layout can be given as
  ``local_rows`` (absolute position of each local row; the row sets of the ranks must be disjoint).

What is communicated (all-reduce, SUM, in the compute dtype: fp32 for bf16 input):

1. rows sharded (sequence and/or CP): the prototype partials ``[b, h_local]`` sums + ``[b]`` counts over the
   row groups: ``b * (h_local + 1)`` scalars;
2. columns sharded (``shard="hidden"``): per-slot partial dots and squared norms ``[2, b, T]`` plus the
   prototype's squared norm ``[b]`` over ``group``: ``b * (2 T + 1)`` scalars;
3. rows sharded: the finished cosines ``[b, T]`` over the row groups (each valid slot is held by exactly one
   row shard, the others add exact zeros): ``b * T`` scalars.

So O(b * h) + O(b * T) per rank instead of the ``s * b * h`` of an all-gather; ``CommStats`` records the
payloads. Every rank of ``group`` (and ``cp_group``) returns the same, full ``cos [b, T]`` and
``has_image [b]``, equal to ``megatron_vgpo.algo.focus.focus_cosines`` on the unsharded tensor (up to fp32
summation order). The inputs ``image_mask [b, s]``, ``response_start`` and ``response_length [b]`` are small
and must be the same (full, unsharded) on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_vgpo.algo.focus import (
    COS_EPS,
    compute_dtype,
    cosine_from_parts,
    prototype_from_partials,
    prototype_partials,
    response_partials,
    response_positions,
    row_lookup_from_positions,
)
from megatron_vgpo.distributed import comm

__all__ = [
    "SHARD_MODES",
    "CommStats",
    "focus_comm_payload_bytes",
    "sequence_shard_rows",
    "sharded_focus_cosines",
]

SHARD_MODES = ("sequence", "hidden")
CP_LAYOUTS = ("zigzag", "contiguous")


@dataclass
class CommStats:
    """Accumulates what this rank sent into collectives.

    Attributes:
        collectives: number of collective calls (those with a group of size > 1).
        payload_bytes: sum of the tensors' byte sizes handed to all-reduce by this rank.
        ring_wire_bytes: bytes this rank sends over the wire with a ring all-reduce,
            ``2 (n - 1) / n * payload`` per call (``n`` the group size); an estimate, backends differ.
    """

    collectives: int = 0
    payload_bytes: int = 0
    ring_wire_bytes: float = 0.0

    def record(self, tensor: torch.Tensor, group_size: int) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.collectives += 1
        self.payload_bytes += nbytes
        self.ring_wire_bytes += 2.0 * (group_size - 1) / group_size * nbytes


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _all_reduce(tensor: torch.Tensor, groups: Sequence[dist.ProcessGroup | None],
                stats: CommStats | None) -> torch.Tensor:
    """Sum ``tensor`` in place over each group in turn (a grid of groups: the sum over their product)."""
    for group in groups:
        size = _group_size(group)
        if size == 1:
            continue
        comm.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        if stats is not None:
            stats.record(tensor, size)
    return tensor


def sequence_shard_rows(
    seq_len: int,
    tp_rank: int = 0,
    tp_size: int = 1,
    *,
    cp_rank: int = 0,
    cp_size: int = 1,
    cp_layout: str = "zigzag",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Absolute positions ``[s_local]`` int64 of the rows a (CP, sequence-parallel TP) rank holds.

    CP first (``zigzag``: chunks ``c`` and ``2 cp - 1 - c`` of ``2 cp``; ``contiguous``: chunk ``c`` of
    ``cp``), then the CP-local sequence is cut into ``tp_size`` contiguous pieces and piece ``tp_rank`` is
    kept. Raises ``ValueError`` when ``seq_len`` is not divisible accordingly (Megatron pads to a multiple).
    """
    if cp_layout not in CP_LAYOUTS:
        raise ValueError(f"cp_layout={cp_layout!r} is not one of {CP_LAYOUTS}")
    if not (0 <= tp_rank < tp_size and 0 <= cp_rank < cp_size):
        raise ValueError(f"bad ranks: tp {tp_rank}/{tp_size}, cp {cp_rank}/{cp_size}")
    chunks = 2 * cp_size if (cp_layout == "zigzag" and cp_size > 1) else cp_size
    if seq_len % chunks != 0 or (seq_len // cp_size) % tp_size != 0:
        raise ValueError(
            f"seq_len={seq_len} must be divisible by {chunks} CP chunks and the CP-local length by "
            f"tp_size={tp_size} (pad the sequence as Megatron does)"
        )
    chunk = seq_len // chunks
    if chunks == 2 * cp_size and cp_size > 1:
        starts = [cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk]
    else:
        starts = [cp_rank * chunk]
    cp_rows = torch.cat([torch.arange(s, s + chunk, dtype=torch.int64, device=device) for s in starts])
    piece = cp_rows.numel() // tp_size
    return cp_rows[tp_rank * piece:(tp_rank + 1) * piece]


@torch.no_grad()
def sharded_focus_cosines(
    hidden_local: torch.Tensor,
    image_mask: torch.Tensor,
    response_start: int | torch.Tensor,
    response_length: torch.Tensor,
    T: int,
    *,
    group: dist.ProcessGroup | None,
    shard: str = "sequence",
    state_position: str = "own",
    cp_group: dist.ProcessGroup | None = None,
    cp_layout: str = "zigzag",
    local_rows: torch.Tensor | None = None,
    eps: float = COS_EPS,
    clamp: str = "per_norm",
    comm_stats: CommStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focus cosines ``(cos [b, T], has_image [b])`` from this rank's shard of the final-norm states.

    Args:
        hidden_local: this rank's shard, ``[s/tp, b, h]`` (sequence) or ``[s, b, h/tp]`` (hidden); with a CP
            group the sequence dim is further the CP-local length. Any float dtype (computed in >= fp32).
        image_mask: ``[b, s]`` bool over the FULL sequence, identical on every rank.
        response_start: int or int64 ``[b]``: absolute position of response token 0 (full sequence).
        response_length: int ``[b]``: valid response tokens; ``T``: padded response length.
        group: the group the sharded dim is split over (the TP group); None = the default group.
        shard: "sequence" or "hidden" (see module docstring).
        state_position: "own" (``start + t``) or "producing" (``start + t - 1``). Positions are absolute,
            so a producing state that lives on the previous rank's chunk is found there.
        cp_group: optional context-parallel group (an extra split of the sequence).
        cp_layout: "zigzag" (Megatron's load-balanced CP) or "contiguous".
        local_rows: optional ``[s_local]`` int64 absolute positions of ``hidden_local``'s rows; overrides the
            layout derived from ``group``/``cp_group`` ranks.
        eps, clamp: cosine eps semantics (see ``megatron_vgpo.algo.focus.cosine_from_parts``).
        comm_stats: optional accumulator of the bytes this rank all-reduces.

    Returns:
        The full ``cos [b, T]`` (compute dtype; 0 on padding slots and image-less samples) and
        ``has_image [b]`` bool, the same on every rank of ``group`` and ``cp_group``.
    """
    if shard not in SHARD_MODES:
        raise ValueError(f"shard={shard!r} is not one of {SHARD_MODES}")
    if hidden_local.dim() != 3:
        raise ValueError(f"hidden_local must be [s_local, b, h_local], got {tuple(hidden_local.shape)}")
    compute_dtype(hidden_local)
    if image_mask.dim() != 2 or image_mask.shape[0] != hidden_local.shape[1]:
        raise ValueError(
            f"image_mask must be [b, s] over the full sequence with b={hidden_local.shape[1]}, got "
            f"{tuple(image_mask.shape)}"
        )
    batch, seq_len = image_mask.shape
    if response_length.shape != (batch,):
        raise ValueError(f"response_length must be [b]=[{batch}], got {tuple(response_length.shape)}")
    if image_mask.dtype != torch.bool:
        image_mask = image_mask != 0
    device = hidden_local.device

    row_groups: list[dist.ProcessGroup | None] = []
    if shard == "sequence":
        row_groups.append(group)
    if cp_group is not None:
        row_groups.append(cp_group)
    col_groups: list[dist.ProcessGroup | None] = [group] if shard == "hidden" else []

    if local_rows is None:
        tp_rank, tp_size = (_group_rank(group), _group_size(group)) if shard == "sequence" else (0, 1)
        cp_rank, cp_size = (_group_rank(cp_group), _group_size(cp_group)) if cp_group is not None else (0, 1)
        local_rows = sequence_shard_rows(seq_len, tp_rank, tp_size, cp_rank=cp_rank, cp_size=cp_size,
                                         cp_layout=cp_layout, device=device)
    local_rows = local_rows.to(device=device, dtype=torch.int64)
    if local_rows.numel() != hidden_local.shape[0]:
        raise ValueError(
            f"hidden_local has {hidden_local.shape[0]} rows but this rank's layout holds "
            f"{local_rows.numel()} of seq_len={seq_len} (shard={shard!r}, group size {_group_size(group)}, "
            f"cp size {_group_size(cp_group) if cp_group is not None else 1})"
        )
    full_rows = local_rows.numel() == seq_len
    lookup = None if full_rows else row_lookup_from_positions(local_rows, seq_len)

    positions, valid = response_positions(response_start, response_length.to(device), T, state_position,
                                          seq_len=seq_len)
    mask_local = image_mask.to(device)[:, local_rows] if not full_rows else image_mask.to(device)

    # 1. prototype: partial sums over the local rows, summed over the row shards
    total, count = prototype_partials(hidden_local, mask_local)
    width = total.shape[1]
    if row_groups:
        packed = _all_reduce(torch.cat([total.reshape(-1), count]), row_groups, comm_stats)
        total, count = packed[:batch * width].view(batch, width), packed[batch * width:]
    proto, has_image = prototype_from_partials(total, count)

    # 2. per-slot dot / squared norm over the local columns, summed over the column shards
    parts = response_partials(hidden_local, proto, positions, valid, row_lookup=lookup)
    dot, sq_h, sq_p = parts.dot, parts.sq_norm, proto.square().sum(-1)
    if col_groups:
        n = batch * dot.shape[1]
        packed = _all_reduce(torch.cat([dot.reshape(-1), sq_h.reshape(-1), sq_p]), col_groups, comm_stats)
        dot, sq_h, sq_p = packed[:n].view_as(dot), packed[n:2 * n].view_as(sq_h), packed[2 * n:]

    # 3. cosines of the held slots; the other row shards contribute exact zeros
    cos = cosine_from_parts(dot, sq_h, sq_p, eps, clamp=clamp)
    cos = cos * (parts.held & has_image.unsqueeze(-1)).to(cos.dtype)
    if row_groups:
        cos = _all_reduce(cos.contiguous(), row_groups, comm_stats)
    return cos, has_image


def focus_comm_payload_bytes(
    batch: int,
    hidden_local: int,
    T: int,
    *,
    shard: str = "sequence",
    tp_size: int = 2,
    cp_size: int = 1,
    dtype_bytes: int = 4,
) -> int:
    """Per-rank all-reduce payload of ``sharded_focus_cosines`` (bytes), summed over its collectives.

    ``hidden_local`` is the local hidden width (``h`` for sequence sharding, ``h/tp`` for hidden sharding).
    Groups of size 1 are skipped. Compare with an all-gather of the states, ``s * b * h * element_size``.
    """
    if shard not in SHARD_MODES:
        raise ValueError(f"shard={shard!r} is not one of {SHARD_MODES}")
    row_reductions = int(shard == "sequence" and tp_size > 1) + int(cp_size > 1)
    scalars = row_reductions * (batch * (hidden_local + 1) + batch * T)
    if shard == "hidden" and tp_size > 1:
        scalars += batch * (2 * T + 1)
    return scalars * dtype_bytes
