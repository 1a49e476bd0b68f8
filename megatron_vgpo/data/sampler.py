"""Deterministic, resumable prompt batches.

``PromptSampler`` walks a seeded permutation of ``range(num_items)`` per epoch (a new permutation every
epoch, the same one for the same ``(seed, epoch)``) and rolls into the next epoch on its own, so an RL loop
that draws extra batches (DAPO dynamic sampling) simply keeps calling ``next_batch()``. Its state (epoch and
position in the epoch) is a small dict: a run restored from it continues with exactly the batches the
uninterrupted run would have drawn. ``PromptLoader`` pairs a sampler with a ``PromptDataset``;
``iterate_once`` is the ordered single pass for validation; ``collate_prompts`` left-pads a list of samples
into one batch of tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from megatron_vgpo.data.dataset import PromptDataset, PromptSample

_STATE_VERSION = 1


class PromptSampler:
    """Batches of item indices from a seeded per-epoch permutation.

    Args:
        num_items: dataset length (> 0).
        batch_size: indices per batch (> 0).
        seed: permutation seed; epoch ``e`` uses ``numpy.random.default_rng([seed, e])``.
        shuffle: False walks ``0..num_items-1`` in order every epoch.
        drop_last: True drops an epoch's final partial batch (every batch has ``batch_size`` indices; needs
            ``num_items >= batch_size``); False yields it.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True
    ) -> None:
        if num_items <= 0:
            raise ValueError(f"PromptSampler: num_items must be > 0, got {num_items}")
        if batch_size <= 0:
            raise ValueError(f"PromptSampler: batch_size must be > 0, got {batch_size}")
        if drop_last and batch_size > num_items:
            raise ValueError(
                f"PromptSampler: batch_size {batch_size} > dataset size {num_items} with drop_last=True "
                "would never yield a batch"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next item to hand out
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self._order = self._epoch_order(epoch)

    def next_batch(self) -> list[int]:
        """The next batch of indices; starts the next epoch when this one is used up."""
        remaining = self.num_items - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self._start_epoch(self.epoch + 1)
        end = min(self.position + self.batch_size, self.num_items)
        batch = [int(index) for index in self._order[self.position : end]]
        self.position = end
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        """Endless stream of batches (``next_batch`` forever)."""
        while True:
            yield self.next_batch()

    def batches_per_epoch(self) -> int:
        full, partial = divmod(self.num_items, self.batch_size)
        return full if self.drop_last or partial == 0 else full + 1

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position and the settings they are only valid with."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; raises ValueError when it was saved with different data or settings."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"PromptSampler state has version {state.get('version')}, expected {_STATE_VERSION}"
            )
        for key in ("seed", "num_items", "batch_size", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"PromptSampler state was saved with {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; resuming would not reproduce the data order "
                    "(did the dataset or its bad-row filtering change?)"
                )
        if not 0 <= state["position"] <= self.num_items or state["epoch"] < 0:
            raise ValueError(f"PromptSampler state has an invalid epoch/position: {state}")
        self._start_epoch(int(state["epoch"]))
        self.position = int(state["position"])


class PromptLoader:
    """Batches of ``PromptSample`` from a ``PromptDataset`` in the order of a ``PromptSampler``."""

    def __init__(
        self,
        dataset: PromptDataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        self.dataset = dataset
        self.sampler = PromptSampler(
            len(dataset), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last
        )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def next_batch(self) -> list[PromptSample]:
        return [self.dataset[index] for index in self.sampler.next_batch()]

    def __iter__(self) -> Iterator[list[PromptSample]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


def iterate_once(dataset: PromptDataset, batch_size: int) -> Iterator[list[PromptSample]]:
    """Every sample of ``dataset`` exactly once, in order, in batches of ``batch_size`` (the last may be
    shorter): the pass used for validation and evaluation."""
    if batch_size <= 0:
        raise ValueError(f"iterate_once: batch_size must be > 0, got {batch_size}")
    for start in range(0, len(dataset), batch_size):
        yield [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]


@dataclass
class PromptBatch:
    """Left-padded prompts.

    Attributes:
        input_ids: int64 [B, L], left-padded with ``pad_token_id``.
        attention_mask: int64 [B, L], 0 on padding.
        pixel_values: float32 [total_patches, D], the samples' patches concatenated in batch order, or None.
        image_grid_thw: int64 [total_images, 3] in batch order, or None.
        mm_token_type_ids: int64 [B, L] (0 on padding), or None when the samples carry none.
        images: per sample, its PIL images (for the rollout engine).
        prompt_texts, answers, sources: per sample.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    mm_token_type_ids: torch.Tensor | None
    images: list[list[Image.Image]]
    prompt_texts: list[str]
    answers: list[str]
    sources: list[str]


def collate_prompts(
    samples: Sequence[PromptSample], pad_token_id: int, pad_to: int | None = None
) -> PromptBatch:
    """Left-pad ``samples`` to the longest prompt (or to ``pad_to`` tokens) and concatenate their image
    tensors. Raises ValueError when a prompt is longer than ``pad_to``."""
    if not samples:
        raise ValueError("collate_prompts needs at least one sample")
    longest = max(int(sample.input_ids.shape[0]) for sample in samples)
    if pad_to is not None and longest > pad_to:
        too_long = next(s for s in samples if int(s.input_ids.shape[0]) == longest)
        raise ValueError(f"collate_prompts: prompt {too_long.source} has {longest} tokens > pad_to={pad_to}")
    length = longest if pad_to is None else pad_to
    batch_size = len(samples)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    with_types = all(sample.mm_token_type_ids is not None for sample in samples)
    mm_token_type_ids = torch.zeros((batch_size, length), dtype=torch.long) if with_types else None
    for row, sample in enumerate(samples):
        size = int(sample.input_ids.shape[0])
        input_ids[row, length - size :] = sample.input_ids
        attention_mask[row, length - size :] = sample.attention_mask
        if mm_token_type_ids is not None:
            mm_token_type_ids[row, length - size :] = sample.mm_token_type_ids  # type: ignore[assignment]
    pixel_parts = [sample.pixel_values for sample in samples if sample.pixel_values is not None]
    grid_parts = [sample.image_grid_thw for sample in samples if sample.image_grid_thw is not None]
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.cat(pixel_parts) if pixel_parts else None,
        image_grid_thw=torch.cat(grid_parts) if grid_parts else None,
        mm_token_type_ids=mm_token_type_ids,
        images=[sample.images for sample in samples],
        prompt_texts=[sample.prompt_text for sample in samples],
        answers=[sample.answer for sample in samples],
        sources=[sample.source for sample in samples],
    )
