"""Raw VGPO focus cosines from final-norm hidden states (VGPO_SPEC.md section 2), single process.

For trajectory ``i`` the image prototype ``mu_i`` is the plain mean of the final-norm hidden states at its
image-token positions (all images of the sample pooled; ``<|vision_start|>``/``<|vision_end|>`` excluded,
so the mask is ``input_ids == image_token_id``). Each response slot ``t`` gets
``cos[i, t] = cos(h[p(i, t), i], mu_i)`` where the absolute position is

* ``state_position="own"``:       ``p = response_start[i] + t``      (released code, spec 2.3), or
* ``state_position="producing"``: ``p = response_start[i] + t - 1``  (the state that produced ``y_t``, A2).

Both layouts are covered by ``response_start``: an int (left-padded prompts of a fixed length ``P``) or an
int64 tensor ``[b]`` (right-padded packed prompt+response with a per-sample start). Slots
``t >= response_length[i]`` and samples without image tokens get ``cos = 0``.

Shapes follow Megatron: ``hidden`` is sequence-first ``[s, b, h]``; masks are batch-first ``[b, s]``.
Everything is computed in ``promote_types(hidden.dtype, float32)`` (fp32 for bf16/fp16 inputs, fp64 stays
fp64) under ``torch.no_grad`` (the scores are constants in the loss). Only the rows that are needed are
gathered (image tokens, valid response states), never a full fp32 copy of ``hidden``.

The building blocks (``prototype_partials``, ``response_partials``, ``cosine_from_parts``) work on any
shard of ``hidden``: a subset of sequence rows (pass ``row_lookup``) and/or a slice of the hidden dim. Their
outputs are partial sums that add up across shards, which is what ``megatron_vgpo.distributed.focus``
all-reduces.

Cosine eps: like ``torch.cosine_similarity`` as it actually computes (torch 2.x), each norm is clamped
separately, ``cos = <h, mu> / (max(|h|, eps) * max(|mu|, eps))`` with ``eps = 1e-8``; the formula in
torch's docstring (and in the spec), ``max(|h| |mu|, eps)``, is available as ``clamp="product"``. The two
differ only when a norm is below ``eps``-scale, never for real hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "COS_EPS",
    "STATE_POSITIONS",
    "ResponsePartials",
    "cosine_from_parts",
    "focus_cosines",
    "gather_response_states",
    "image_token_mask",
    "prototype_from_partials",
    "prototype_partials",
    "response_partials",
    "response_positions",
    "row_lookup_from_positions",
]

COS_EPS = 1e-8
STATE_POSITIONS = ("own", "producing")
CLAMP_MODES = ("per_norm", "product")
DEFAULT_CHUNK_ROWS = 4096


def _check_chunk(chunk_rows: int) -> int:
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return int(chunk_rows)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """``promote_types(hidden.dtype, float32)``; rejects non-float inputs."""
    if not hidden.is_floating_point():
        raise TypeError(f"hidden states must be a float tensor, got dtype {hidden.dtype}")
    return torch.promote_types(hidden.dtype, torch.float32)


def _check_hidden(hidden: torch.Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be sequence-first [s, b, h], got shape {tuple(hidden.shape)}")
    compute_dtype(hidden)


def _check_image_mask(image_mask: torch.Tensor, batch: int, seq: int, what: str = "hidden") -> torch.Tensor:
    if image_mask.dim() != 2 or tuple(image_mask.shape) != (batch, seq):
        raise ValueError(
            f"image_mask must be [b, s] = [{batch}, {seq}] to match {what}, "
            f"got shape {tuple(image_mask.shape)}"
        )
    if image_mask.dtype != torch.bool:
        if image_mask.is_floating_point():
            raise TypeError(f"image_mask must be bool or integer 0/1, got dtype {image_mask.dtype}")
        image_mask = image_mask != 0
    return image_mask


def image_token_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``[b, s]`` bool: positions holding the image placeholder (``<|image_pad|>``, 151655 for Qwen2.5-VL).

    Vision start/end markers and video pads are not image tokens (spec 2.2).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [b, s], got shape {tuple(input_ids.shape)}")
    return input_ids == int(image_token_id)


def response_positions(
    response_start: int | torch.Tensor,
    response_length: torch.Tensor,
    T: int,
    state_position: str = "own",
    *,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute sequence position of the state paired with each response slot.

    Args:
        response_start: int (same start for every sample, left-padded prompts) or int64 ``[b]``.
        response_length: int ``[b]``, number of valid response tokens (``0 <= L <= T``).
        T: padded response length (number of slots).
        state_position: "own" (``start + t``) or "producing" (``start + t - 1``).
        seq_len: if given, every valid position must lie in ``[0, seq_len)`` (else ``ValueError``).

    Returns:
        ``positions [b, T]`` int64 (0 on invalid slots, so it is always a legal index) and
        ``valid [b, T]`` bool (``t < response_length``).
    """
    if state_position not in STATE_POSITIONS:
        raise ValueError(f"state_position={state_position!r} is not one of {STATE_POSITIONS}")
    if response_length.dim() != 1:
        raise ValueError(f"response_length must be [b], got shape {tuple(response_length.shape)}")
    if response_length.is_floating_point():
        raise TypeError(f"response_length must be an integer tensor, got dtype {response_length.dtype}")
    T = int(T)
    if T < 0:
        raise ValueError(f"T must be >= 0, got {T}")
    device = response_length.device
    lengths = response_length.to(torch.int64)
    batch = lengths.shape[0]
    if isinstance(response_start, torch.Tensor):
        if response_start.dim() == 0:
            response_start = response_start.expand(batch)
        if tuple(response_start.shape) != (batch,) or response_start.is_floating_point():
            raise ValueError(
                f"response_start must be an int or an integer [b]=[{batch}] tensor, got shape "
                f"{tuple(response_start.shape)} dtype {response_start.dtype}"
            )
        starts = response_start.to(device=device, dtype=torch.int64)
    else:
        starts = torch.full((batch,), int(response_start), dtype=torch.int64, device=device)
    if batch and (bool((lengths < 0).any()) or bool((lengths > T).any())):
        raise ValueError(f"response_length must lie in [0, T={T}], got {lengths.tolist()}")
    slots = torch.arange(T, dtype=torch.int64, device=device)
    valid = slots.unsqueeze(0) < lengths.unsqueeze(1)
    shift = 1 if state_position == "producing" else 0
    positions = starts.unsqueeze(1) + slots.unsqueeze(0) - shift
    if valid.any():
        used = positions[valid]
        upper = seq_len
        bad = used < 0 if upper is None else (used < 0) | (used >= upper)
        if bool(bad.any()):
            rows = valid.nonzero(as_tuple=True)[0][bad].unique().tolist()
            raise ValueError(
                f"response states fall outside the sequence [0, {upper}) for samples {rows} "
                f"(state_position={state_position!r}, response_start={starts.tolist()}, "
                f"response_length={lengths.tolist()})"
            )
    positions = torch.where(valid, positions, torch.zeros_like(positions))
    return positions, valid


def row_lookup_from_positions(local_rows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Inverse map of a shard's rows: ``lookup [seq_len]`` int64, local row index or -1 if not held.

    ``local_rows [s_local]`` int64 gives the absolute position of each row of the local ``hidden`` shard
    (e.g. ``offset + arange(s_local)`` for a contiguous sequence-parallel chunk).
    """
    if local_rows.dim() != 1 or local_rows.is_floating_point():
        raise ValueError(f"local_rows must be an integer [s_local] tensor, got {tuple(local_rows.shape)}")
    if local_rows.numel() and (int(local_rows.min()) < 0 or int(local_rows.max()) >= seq_len):
        raise ValueError(
            f"local_rows must lie in [0, {seq_len}), got range "
            f"[{int(local_rows.min())}, {int(local_rows.max())}]"
        )
    lookup = torch.full((seq_len,), -1, dtype=torch.int64, device=local_rows.device)
    lookup[local_rows.to(torch.int64)] = torch.arange(
        local_rows.numel(), dtype=torch.int64, device=local_rows.device
    )
    return lookup


@torch.no_grad()
def prototype_partials(
    hidden: torch.Tensor, image_mask: torch.Tensor, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial image-prototype sums over the rows of ``hidden``.

    Args:
        hidden: ``[s, b, h]`` final-norm states (or a shard: ``s`` local rows, ``h`` local columns).
        image_mask: ``[b, s]`` bool, image tokens among THESE rows (slice the full mask to the shard).
        chunk_rows: at most this many image rows are upcast at a time (bounds the extra memory to
            ``chunk_rows * h`` compute-dtype values; the loop runs over chunks, not tokens).

    Returns:
        ``sum [b, h]`` and ``count [b]``, both in the compute dtype (fp32 for bf16 input). Shards add up:
        the prototype is ``sum / count`` after summing over the row shards.
    """
    _check_hidden(hidden)
    seq, batch, width = hidden.shape
    mask = _check_image_mask(image_mask, batch, seq)
    dtype = compute_dtype(hidden)
    b_idx, s_idx = mask.nonzero(as_tuple=True)
    total = torch.zeros(batch, width, dtype=dtype, device=hidden.device)
    for lo in range(0, b_idx.numel(), _check_chunk(chunk_rows)):  # only the image rows are upcast
        bi, si = b_idx[lo:lo + chunk_rows], s_idx[lo:lo + chunk_rows]
        total.index_add_(0, bi, hidden[si, bi].to(dtype))
    count = mask.sum(dim=1).to(dtype)
    return total, count


def prototype_from_partials(total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prototype [b, h], has_image [b] bool)`` from fully reduced sums; zero prototype without images."""
    has_image = count > 0
    proto = total / count.clamp(min=1).unsqueeze(-1)
    return proto, has_image


def _response_rows(
    positions: torch.Tensor, valid: torch.Tensor, row_lookup: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b_idx, t_idx, local row) of the valid slots whose state is held by this shard."""
    if row_lookup is None:
        rows = positions
        held = valid
    else:
        rows = row_lookup[positions.clamp(0, row_lookup.numel() - 1)]
        held = valid & (rows >= 0)
    b_idx, t_idx = held.nonzero(as_tuple=True)
    return b_idx, t_idx, rows[b_idx, t_idx]


@torch.no_grad()
def gather_response_states(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    *,
    row_lookup: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialize the response states ``[b, T, h]`` (compute dtype, zeros where not valid / not held).

    ``positions``/``valid`` come from ``response_positions``. With ``row_lookup`` (a sequence shard),
    positions are absolute and only the rows held locally are filled; the second output ``held [b, T]``
    says which. Memory ``b * T * h`` in the compute dtype: prefer ``response_partials`` when only the
    cosine is needed.
    """
    _check_hidden(hidden)
    batch, slots = positions.shape
    if hidden.shape[1] != batch:
        raise ValueError(f"positions has batch {batch} but hidden has batch {hidden.shape[1]}")
    dtype = compute_dtype(hidden)
    b_idx, t_idx, rows = _response_rows(positions, valid, row_lookup)
    out = torch.zeros(batch, slots, hidden.shape[2], dtype=dtype, device=hidden.device)
    out[b_idx, t_idx] = hidden[rows, b_idx].to(dtype)
    held = torch.zeros_like(valid)
    held[b_idx, t_idx] = True
    return out, held


@dataclass
class ResponsePartials:
    """Per-slot partial sums over the hidden columns of one shard (all ``[b, T]``, compute dtype).

    Attributes:
        dot: ``<h_t, mu>`` restricted to the local columns; 0 where the slot is not held.
        sq_norm: ``|h_t|^2`` restricted to the local columns; 0 where not held.
        held: bool, the slot is valid and its state row is in this shard.
    """

    dot: torch.Tensor
    sq_norm: torch.Tensor
    held: torch.Tensor


@torch.no_grad()
def response_partials(
    hidden: torch.Tensor,
    prototype: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    *,
    row_lookup: torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> ResponsePartials:
    """Dot products with the prototype and squared norms of the response states held by this shard.

    Args:
        hidden: ``[s, b, h]`` (or a shard ``[s_local, b, h_local]``).
        prototype: ``[b, h]`` (the same columns as ``hidden``), compute dtype.
        positions, valid: ``[b, T]`` from ``response_positions`` (absolute positions).
        row_lookup: ``[seq_len]`` from ``row_lookup_from_positions`` when ``hidden`` holds a subset of rows;
            None when it holds every row in order.

    Only the held valid rows are gathered and upcast, ``chunk_rows`` at a time (``chunk_rows x h`` memory).
    """
    _check_hidden(hidden)
    batch, slots = positions.shape
    if hidden.shape[1] != batch or tuple(prototype.shape) != (batch, hidden.shape[2]):
        raise ValueError(
            f"shapes disagree: hidden {tuple(hidden.shape)}, prototype {tuple(prototype.shape)}, "
            f"positions {tuple(positions.shape)}"
        )
    dtype = compute_dtype(hidden)
    b_idx, t_idx, rows = _response_rows(positions, valid, row_lookup)
    proto = prototype.to(dtype)
    dot = torch.zeros(batch, slots, dtype=dtype, device=hidden.device)
    sq = torch.zeros_like(dot)
    for lo in range(0, b_idx.numel(), _check_chunk(chunk_rows)):
        bi, ti, ri = b_idx[lo:lo + chunk_rows], t_idx[lo:lo + chunk_rows], rows[lo:lo + chunk_rows]
        states = hidden[ri, bi].to(dtype)  # [n_chunk, h]
        dot[bi, ti] = (states * proto[bi]).sum(-1)
        sq[bi, ti] = states.square().sum(-1)
    held = torch.zeros_like(valid)
    held[b_idx, t_idx] = True
    return ResponsePartials(dot=dot, sq_norm=sq, held=held)


def cosine_from_parts(
    dot: torch.Tensor,
    sq_norm_h: torch.Tensor,
    sq_norm_proto: torch.Tensor,
    eps: float = COS_EPS,
    *,
    clamp: str = "per_norm",
) -> torch.Tensor:
    """Cosine from fully reduced parts: ``dot [b, T]``, ``sq_norm_h [b, T]``, ``sq_norm_proto [b]``.

    ``clamp="per_norm"`` (torch.cosine_similarity's computation): ``dot / (max(|h|, eps) max(|mu|, eps))``;
    ``clamp="product"`` (its docstring's formula): ``dot / max(|h| |mu|, eps)``. A zero state or a zero
    prototype gives exactly 0.
    """
    if clamp not in CLAMP_MODES:
        raise ValueError(f"clamp={clamp!r} is not one of {CLAMP_MODES}")
    norm_h = sq_norm_h.clamp(min=0).sqrt()
    norm_p = sq_norm_proto.clamp(min=0).sqrt().unsqueeze(-1)
    if clamp == "per_norm":
        return dot / (norm_h.clamp(min=eps) * norm_p.clamp(min=eps))
    return dot / (norm_h * norm_p).clamp(min=eps)


@torch.no_grad()
def focus_cosines(
    hidden: torch.Tensor,
    image_mask: torch.Tensor,
    response_start: int | torch.Tensor,
    response_length: torch.Tensor,
    T: int,
    state_position: str = "own",
    *,
    eps: float = COS_EPS,
    clamp: str = "per_norm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw focus cosines of one micro-batch (single process, unsharded ``hidden``).

    Args:
        hidden: ``[s, b, h]`` final-norm hidden states (any float dtype; computed in >= fp32).
        image_mask: ``[b, s]`` bool image-token positions (``image_token_mask``).
        response_start: int or int64 ``[b]``: absolute position of response token 0.
        response_length: int ``[b]``: valid response tokens per sample (``<= T``).
        T: padded response length.
        state_position: "own" or "producing" (see module docstring).

    Returns:
        ``cos [b, T]`` in the compute dtype (0 on padding slots and for samples without image tokens) and
        ``has_image [b]`` bool.
    """
    _check_hidden(hidden)
    seq, batch, _ = hidden.shape
    if response_length.shape != (batch,):
        raise ValueError(f"response_length must be [b]=[{batch}], got {tuple(response_length.shape)}")
    positions, valid = response_positions(response_start, response_length, T, state_position, seq_len=seq)
    total, count = prototype_partials(hidden, image_mask)
    proto, has_image = prototype_from_partials(total, count)
    parts = response_partials(hidden, proto, positions, valid)
    cos = cosine_from_parts(parts.dot, parts.sq_norm, proto.square().sum(-1), eps, clamp=clamp)
    cos = cos * (valid & has_image.unsqueeze(-1)).to(cos.dtype)
    return cos, has_image
