"""The RL batch: trajectories (prompt with expanded image tokens + sampled response) packed for the actor.

Layout of :class:`RLBatch` (``B`` trajectories, ``S`` packed length, ``R`` padded response length):

* ``input_ids`` [B, S] int64, RIGHT-padded: sample ``i`` is ``prompt_i`` (``response_start[i]`` tokens,
  image placeholders already expanded) followed by ``response_length[i]`` response tokens, then pad ids.
  ``attention_mask`` [B, S] int64 (1 on the ``response_start + response_length`` valid tokens) and
  ``mm_token_type_ids`` [B, S] int64 (1 on image tokens, 0 on text, response and padding).
* ``responses`` [B, R] int64 (the response ids again, padded) and ``response_mask`` [B, R] bool
  (``t < response_length[i]``). Response token ``t`` of sample ``i`` sits at absolute position
  ``response_start[i] + t`` of ``input_ids`` and is predicted by the logits at the position before it.
* ``pixel_values`` [num_patches, C*T*P*P] and ``image_grid_thw`` [num_images, 3]: all images of the batch
  concatenated in sample order; ``images_per_sample`` [B] and ``patches_per_sample`` [B] int64 say which
  rows belong to which sample, so :meth:`RLBatch.select` keeps every image with its sample.
* per-trajectory ``uids`` [B] int64 (prompt group), ``rewards`` [B] float32, and per-token slots filled in
  by later stages: ``old_log_probs`` / ``advantages`` / ``focus_cos`` / ``ref_log_probs`` (the KL
  reference's) [B, R] float32, ``has_image`` [B] bool and ``truncated`` [B] bool (the response hit the
  length limit without an end token; read by overlong filtering) (``None`` until set); ``pad_token_id``
  fills padding.

Everything lives on the CPU until a consumer moves a micro-batch to its device (:meth:`RLBatch.to`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["PromptLike", "RLBatch", "build_local_rl_batch", "build_rl_batch", "dp_shard_indices",
           "shard_for_data_parallel"]

_PER_TOKEN_SLOTS = ("old_log_probs", "advantages", "focus_cos", "ref_log_probs")


class PromptLike(Protocol):
    """What the builder reads from a prompt (``megatron_vgpo.data.PromptSample`` has all of it).

    ``input_ids`` int [L] (image tokens expanded); ``pixel_values`` [num_patches, D] or None;
    ``image_grid_thw`` int [num_images, 3] or None; ``mm_token_type_ids`` int [L] or None (then derived as
    ``input_ids == image_token_id`` by the builder).
    """

    input_ids: Tensor
    pixel_values: Tensor | None
    image_grid_thw: Tensor | None
    mm_token_type_ids: Tensor | None


@dataclass
class RLBatch:
    """A packed batch of trajectories (see the module docstring for every field's shape and meaning)."""

    input_ids: Tensor
    attention_mask: Tensor
    mm_token_type_ids: Tensor
    response_start: Tensor
    response_length: Tensor
    responses: Tensor
    response_mask: Tensor
    pixel_values: Tensor | None
    image_grid_thw: Tensor | None
    images_per_sample: Tensor
    patches_per_sample: Tensor
    uids: Tensor
    rewards: Tensor
    old_log_probs: Tensor | None = None
    advantages: Tensor | None = None
    focus_cos: Tensor | None = None
    has_image: Tensor | None = None
    ref_log_probs: Tensor | None = None
    truncated: Tensor | None = None
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        b, s = self.input_ids.shape
        r = self.responses.shape[1]
        problems = []
        for name in ("attention_mask", "mm_token_type_ids"):
            if tuple(getattr(self, name).shape) != (b, s):
                problems.append(f"{name} {tuple(getattr(self, name).shape)} != [B, S] = [{b}, {s}]")
        for name in ("response_start", "response_length", "images_per_sample", "patches_per_sample", "uids",
                     "rewards"):
            if tuple(getattr(self, name).shape) != (b,):
                problems.append(f"{name} {tuple(getattr(self, name).shape)} != [B] = [{b}]")
        if tuple(self.response_mask.shape) != (b, r):
            problems.append(f"response_mask {tuple(self.response_mask.shape)} != [B, R] = [{b}, {r}]")
        for name in _PER_TOKEN_SLOTS:
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b, r):
                problems.append(f"{name} {tuple(value.shape)} != [B, R] = [{b}, {r}]")
        for name in ("has_image", "truncated"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b,):
                problems.append(f"{name} {tuple(value.shape)} != [B] = [{b}]")
        if b and int((self.response_start + self.response_length).max()) > s:
            problems.append("some response_start + response_length exceeds S")
        if b and int(self.response_length.max()) > r:
            problems.append("some response_length exceeds R")
        num_images = 0 if self.image_grid_thw is None else self.image_grid_thw.shape[0]
        num_patches = 0 if self.pixel_values is None else self.pixel_values.shape[0]
        if int(self.images_per_sample.sum()) != num_images:
            problems.append(f"images_per_sample sums to {int(self.images_per_sample.sum())}, grid has {num_images}")
        if int(self.patches_per_sample.sum()) != num_patches:
            problems.append(f"patches_per_sample sums to {int(self.patches_per_sample.sum())}, pixel_values has "
                            f"{num_patches} rows")
        if problems:
            raise ValueError("inconsistent RLBatch: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    @property
    def seq_lengths(self) -> Tensor:
        """Valid tokens per trajectory, [B] int64 (``response_start + response_length``)."""
        return self.response_start + self.response_length

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_length.sum())

    def select(self, indices: Sequence[int] | Tensor, *, seq_multiple: int = 1) -> RLBatch:
        """The trajectories ``indices`` (in that order), with their images, as a new batch.

        The packed length is trimmed to the longest selected trajectory rounded up to ``seq_multiple``
        (e.g. the TP size under sequence parallelism); ``R`` is kept so per-token results scatter back by
        row index.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
            raise IndexError(f"indices out of range for a batch of {self.batch_size}: {idx.tolist()}")
        seq = int(self.seq_lengths[idx].max()) if idx.numel() else 0
        seq = max(seq_multiple, -(-seq // seq_multiple) * seq_multiple)
        if seq > self.input_ids.shape[1]:
            pad = seq - self.input_ids.shape[1]
            ids = torch.nn.functional.pad(self.input_ids, (0, pad), value=self.pad_token_id)
            att = torch.nn.functional.pad(self.attention_mask, (0, pad))
            mm = torch.nn.functional.pad(self.mm_token_type_ids, (0, pad))
        else:
            ids, att, mm = self.input_ids, self.attention_mask, self.mm_token_type_ids
        image_offsets = torch.cumsum(self.images_per_sample, 0) - self.images_per_sample
        patch_offsets = torch.cumsum(self.patches_per_sample, 0) - self.patches_per_sample
        image_rows = [torch.arange(int(image_offsets[i]), int(image_offsets[i] + self.images_per_sample[i]))
                      for i in idx.tolist()]
        patch_rows = [torch.arange(int(patch_offsets[i]), int(patch_offsets[i] + self.patches_per_sample[i]))
                      for i in idx.tolist()]
        image_rows_t = torch.cat(image_rows) if image_rows else torch.zeros(0, dtype=torch.int64)
        patch_rows_t = torch.cat(patch_rows) if patch_rows else torch.zeros(0, dtype=torch.int64)
        has_images = image_rows_t.numel() > 0

        def rows(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return RLBatch(
            input_ids=ids[idx, :seq],
            attention_mask=att[idx, :seq],
            mm_token_type_ids=mm[idx, :seq],
            response_start=self.response_start[idx],
            response_length=self.response_length[idx],
            responses=self.responses[idx],
            response_mask=self.response_mask[idx],
            pixel_values=self.pixel_values[patch_rows_t] if has_images else None,
            image_grid_thw=self.image_grid_thw[image_rows_t] if has_images else None,
            images_per_sample=self.images_per_sample[idx],
            patches_per_sample=self.patches_per_sample[idx],
            uids=self.uids[idx],
            rewards=self.rewards[idx],
            old_log_probs=rows(self.old_log_probs),
            advantages=rows(self.advantages),
            focus_cos=rows(self.focus_cos),
            has_image=rows(self.has_image),
            ref_log_probs=rows(self.ref_log_probs),
            truncated=rows(self.truncated),
            pad_token_id=self.pad_token_id,
        )

    def to(self, device: torch.device | str) -> RLBatch:
        """A copy with every tensor on ``device``."""
        changes = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **changes)

    def model_inputs(self) -> dict[str, Tensor | None]:
        """The keyword arguments of ``Qwen2_5_VLModel.forward`` (and of transformers' model)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
            "mm_token_type_ids": self.mm_token_type_ids,
        }

    @classmethod
    def concat(cls, batches: Sequence[RLBatch]) -> RLBatch:
        """Concatenate batches (sample order kept); packed lengths are padded to the longest."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        seq = max(b.input_ids.shape[1] for b in batches)
        width = max(b.responses.shape[1] for b in batches)
        pad_id = batches[0].pad_token_id

        def cat_padded(name: str, length: int, fill: Any) -> Tensor:
            parts = [torch.nn.functional.pad(getattr(b, name), (0, length - getattr(b, name).shape[1]), value=fill)
                     for b in batches]
            return torch.cat(parts)

        def cat_opt(name: str, length: int | None = None) -> Tensor | None:
            values = [getattr(b, name) for b in batches]
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError(f"cannot concat: {name} is set in some batches and not in others")
            if length is not None:
                values = [torch.nn.functional.pad(v, (0, length - v.shape[1])) for v in values]
            return torch.cat(values)

        return cls(
            input_ids=cat_padded("input_ids", seq, pad_id),
            attention_mask=cat_padded("attention_mask", seq, 0),
            mm_token_type_ids=cat_padded("mm_token_type_ids", seq, 0),
            response_start=torch.cat([b.response_start for b in batches]),
            response_length=torch.cat([b.response_length for b in batches]),
            responses=cat_padded("responses", width, pad_id),
            response_mask=cat_padded("response_mask", width, False),
            pixel_values=cat_opt("pixel_values"),
            image_grid_thw=cat_opt("image_grid_thw"),
            images_per_sample=torch.cat([b.images_per_sample for b in batches]),
            patches_per_sample=torch.cat([b.patches_per_sample for b in batches]),
            uids=torch.cat([b.uids for b in batches]),
            rewards=torch.cat([b.rewards for b in batches]),
            old_log_probs=cat_opt("old_log_probs", width),
            advantages=cat_opt("advantages", width),
            focus_cos=cat_opt("focus_cos", width),
            has_image=cat_opt("has_image"),
            ref_log_probs=cat_opt("ref_log_probs", width),
            truncated=cat_opt("truncated"),
            pad_token_id=pad_id,
        )


def build_rl_batch(
    prompts: Sequence[PromptLike],
    responses: Sequence[Sequence[int] | Tensor],
    *,
    pad_token_id: int,
    image_token_id: int,
    uids: Sequence[int] | Tensor | None = None,
    rewards: Sequence[float] | Tensor | None = None,
    response_pad_to: int | None = None,
    seq_multiple: int = 1,
) -> RLBatch:
    """Pack (prompt, response) pairs into an :class:`RLBatch`.

    Args:
        prompts: one prompt per trajectory (the same prompt object may repeat for the n samples of a group;
            its images are then repeated too). ``input_ids`` must contain no padding.
        responses: the sampled token ids of each trajectory (1-D), EOS included if it was generated.
        pad_token_id: id written into padding slots of ``input_ids`` / ``responses``.
        image_token_id: ``<|image_pad|>`` id, used when a prompt has no ``mm_token_type_ids``.
        uids: prompt-group id per trajectory (int64); default ``arange(B)``.
        rewards: scalar reward per trajectory; default zeros.
        response_pad_to: ``R`` (default: the longest response); must be >= every response length.
        seq_multiple: round ``S`` up to a multiple of this (TP size under sequence parallelism).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    b = len(prompts)
    if b == 0:
        raise ValueError("an RL batch needs at least one trajectory")
    prompt_ids = [torch.as_tensor(p.input_ids, dtype=torch.int64).reshape(-1) for p in prompts]
    resp_ids = [torch.as_tensor(r, dtype=torch.int64).reshape(-1) for r in responses]
    starts = torch.tensor([len(p) for p in prompt_ids], dtype=torch.int64)
    lengths = torch.tensor([len(r) for r in resp_ids], dtype=torch.int64)
    width = int(lengths.max()) if response_pad_to is None else int(response_pad_to)
    if int(lengths.max()) > width:
        raise ValueError(f"a response has {int(lengths.max())} tokens > response_pad_to={width}")
    seq = int((starts + lengths).max())
    seq = -(-seq // seq_multiple) * seq_multiple
    input_ids = torch.full((b, seq), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((b, seq), dtype=torch.int64)
    mm_types = torch.zeros((b, seq), dtype=torch.int64)
    resp = torch.full((b, width), pad_token_id, dtype=torch.int64)
    for i, (p, ids, r) in enumerate(zip(prompts, prompt_ids, resp_ids, strict=True)):
        n, m = len(ids), len(r)
        input_ids[i, :n] = ids
        input_ids[i, n:n + m] = r
        attention_mask[i, :n + m] = 1
        types = p.mm_token_type_ids
        mm_types[i, :n] = (ids == image_token_id).to(torch.int64) if types is None else torch.as_tensor(types)
        resp[i, :m] = r
    response_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)

    pixel_parts, grid_parts, n_images, n_patches = [], [], [], []
    for p in prompts:
        if p.pixel_values is None or p.image_grid_thw is None or p.image_grid_thw.numel() == 0:
            n_images.append(0)
            n_patches.append(0)
            continue
        grid = torch.as_tensor(p.image_grid_thw, dtype=torch.int64).reshape(-1, 3)
        if int(grid.prod(-1).sum()) != p.pixel_values.shape[0]:
            raise ValueError(f"a prompt's image_grid_thw gives {int(grid.prod(-1).sum())} patches but its "
                             f"pixel_values has {p.pixel_values.shape[0]} rows")
        pixel_parts.append(p.pixel_values)
        grid_parts.append(grid)
        n_images.append(grid.shape[0])
        n_patches.append(p.pixel_values.shape[0])
    uid_t = torch.arange(b, dtype=torch.int64) if uids is None else torch.as_tensor(uids, dtype=torch.int64)
    reward_t = torch.zeros(b) if rewards is None else torch.as_tensor(rewards, dtype=torch.float32)
    return RLBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_types,
        response_start=starts,
        response_length=lengths,
        responses=resp,
        response_mask=response_mask,
        pixel_values=torch.cat(pixel_parts) if pixel_parts else None,
        image_grid_thw=torch.cat(grid_parts) if grid_parts else None,
        images_per_sample=torch.tensor(n_images, dtype=torch.int64),
        patches_per_sample=torch.tensor(n_patches, dtype=torch.int64),
        uids=uid_t.reshape(b),
        rewards=reward_t.reshape(b),
        pad_token_id=int(pad_token_id),
    )


def shard_for_data_parallel(batch: RLBatch, dp_rank: int, dp_size: int, mini_batches: int = 1) -> RLBatch:
    """This DP rank's part of a GLOBAL batch such that global mini-batch ``k`` is the same set of
    trajectories at every DP size.

    The global batch is cut into ``mini_batches`` contiguous blocks; each block into ``dp_size`` contiguous
    pieces; DP rank ``d`` takes piece ``d`` of every block (in block order). Splitting the local result into
    ``mini_batches`` contiguous parts (as :meth:`MegatronActor.train_step` does) then gives, over all DP
    ranks, exactly global block ``k``. ``B`` must be divisible by ``mini_batches * dp_size``.
    """
    return batch.select(dp_shard_indices(batch.batch_size, dp_rank, dp_size, mini_batches))


def dp_shard_indices(batch_size: int, dp_rank: int, dp_size: int, mini_batches: int = 1) -> list[int]:
    """The global trajectory indices :func:`shard_for_data_parallel` gives DP rank ``dp_rank``, in order."""
    b = batch_size
    if b % (mini_batches * dp_size):
        raise ValueError(f"batch of {b} is not divisible by mini_batches ({mini_batches}) x dp ({dp_size})")
    block = b // mini_batches
    piece = block // dp_size
    return [k * block + dp_rank * piece + j for k in range(mini_batches) for j in range(piece)]


def build_local_rl_batch(
    prompt_of: Callable[[int], PromptLike],
    prompt_index: Sequence[int],
    responses: Sequence[Sequence[int] | Tensor],
    *,
    dp_rank: int,
    dp_size: int,
    mini_batches: int = 1,
    pad_token_id: int,
    image_token_id: int,
    uids: Sequence[int] | None = None,
    rewards: Sequence[float] | None = None,
) -> RLBatch:
    """This DP rank's shard of the global batch, built without building the global batch.

    Equal, field by field, to ``shard_for_data_parallel(build_rl_batch([prompt_of(i) for i in prompt_index],
    responses, ...), dp_rank, dp_size, mini_batches)``: the same trajectories (:func:`dp_shard_indices`), the
    same ``R`` (the longest response of the GLOBAL batch, as ``select`` keeps it) and ``S`` (the longest local
    trajectory, as ``select`` trims it). ``prompt_of(j)`` (e.g. a dataset's ``__getitem__``, which decodes and
    processes the images) runs once per distinct prompt index of this shard; the n trajectories of a prompt
    share that one processed sample.

    Args:
        prompt_of: dataset index -> processed prompt (``PromptLike``).
        prompt_index / responses / uids / rewards: per GLOBAL trajectory (every rank holds these lists).
    """
    if len(prompt_index) != len(responses):
        raise ValueError(f"{len(prompt_index)} prompt indices but {len(responses)} responses")
    if not responses:
        raise ValueError("an RL batch needs at least one trajectory")
    rows = dp_shard_indices(len(responses), dp_rank, dp_size, mini_batches)
    processed: dict[int, PromptLike] = {}
    for i in rows:
        j = int(prompt_index[i])
        if j not in processed:
            processed[j] = prompt_of(j)
    width = max(len(r) for r in responses)
    return build_rl_batch(
        [processed[int(prompt_index[i])] for i in rows], [responses[i] for i in rows],
        pad_token_id=pad_token_id, image_token_id=image_token_id,
        uids=list(rows) if uids is None else [int(uids[i]) for i in rows],  # default: as arange(B)
        rewards=None if rewards is None else [float(rewards[i]) for i in rows],
        response_pad_to=width)
