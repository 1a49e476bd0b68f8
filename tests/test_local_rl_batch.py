"""Each DP rank builds only its own shard of the RL batch (issue 11 item 5).

Reference: the global batch built from one processed prompt per trajectory, then
``shard_for_data_parallel`` (what every rank did before). The local build must equal it field by field, and
process each of the shard's prompts once. ``PromptDataset.prompt_inputs`` (rank 0's rollout requests) gives
the same text, images and answer as ``dataset[i]`` without running the image processor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoProcessor

from megatron_vgpo.actor.rl_batch import build_local_rl_batch, build_rl_batch, shard_for_data_parallel
from megatron_vgpo.data import PromptDataset
from megatron_vgpo.data.synthetic import make_synthetic_splits


@pytest.fixture(scope="module")
def dataset(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PromptDataset:
    paths = make_synthetic_splits(tmp_path_factory.mktemp("data"), 12, seed=0,
                                  tasks=("count_red", "angle_choice", "bar_count_taller"), test_fraction=0.25)
    return PromptDataset([paths["train"]], AutoProcessor.from_pretrained(tiny_hf_dir), max_prompt_length=512)


def _assert_batches_equal(got: Any, want: Any) -> None:
    for f in dataclasses.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f.name
        else:
            assert a == b, f.name


@pytest.mark.parametrize("mini_batches", [1, 2])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_local_build_equals_the_shard_of_the_global_batch(dataset: PromptDataset, dp: int,
                                                          mini_batches: int) -> None:
    n = 2
    prompt_index = [int(i) for i in torch.tensor([3, 0, 5, 3, 8, 1, 7, 2]).repeat_interleave(n)]  # 3 drawn twice
    gen = torch.Generator().manual_seed(dp * 10 + mini_batches)
    responses = [torch.randint(5, 100, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in prompt_index]
    uids = [1000 + k // n for k in range(len(prompt_index))]
    rewards = [float(k % 3 == 0) for k in range(len(prompt_index))]
    ids = {"pad_token_id": 0, "image_token_id": 151655}
    full = build_rl_batch([dataset[i] for i in prompt_index], responses, uids=uids, rewards=rewards, **ids)
    calls: list[int] = []

    def prompt_of(j: int) -> Any:
        calls.append(j)
        return dataset[j]

    for rank in range(dp):
        calls.clear()
        local = build_local_rl_batch(prompt_of, prompt_index, responses, dp_rank=rank, dp_size=dp,
                                     mini_batches=mini_batches, uids=uids, rewards=rewards, **ids)
        _assert_batches_equal(local, shard_for_data_parallel(full, rank, dp, mini_batches))
        assert local.pixel_values is not None and local.pixel_values.shape[0] > 0
        assert len(calls) == len(set(calls)), "a prompt was processed twice on one rank"
        wanted = {prompt_index[i] for i in range(len(prompt_index)) if i in _rows(len(prompt_index), rank, dp,
                                                                                     mini_batches)}
        assert set(calls) == wanted
    # default uids follow the global positions, as build_rl_batch's arange(B)
    no_uids = build_local_rl_batch(dataset.__getitem__, prompt_index, responses, dp_rank=dp - 1, dp_size=dp, **ids)
    assert torch.equal(no_uids.uids, shard_for_data_parallel(
        build_rl_batch([dataset[i] for i in prompt_index], responses, **ids), dp - 1, dp).uids)


def _rows(b: int, rank: int, dp: int, mini_batches: int) -> set[int]:
    block = b // mini_batches
    piece = block // dp
    return {k * block + rank * piece + j for k in range(mini_batches) for j in range(piece)}


class _CountingProcessor:
    """The real processor, counting how often its image-processing ``__call__`` runs."""

    def __init__(self, processor: Any) -> None:
        self.inner, self.calls = processor, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_prompt_inputs_skip_the_image_processor(dataset: PromptDataset) -> None:
    processor = dataset.processor
    counting = _CountingProcessor(processor)
    dataset.processor = counting
    try:
        for i in range(len(dataset)):
            before = counting.calls
            light = dataset.prompt_inputs(i)
            assert counting.calls == before, "prompt_inputs ran the processor"
            full = dataset[i]
            assert counting.calls == before + 1
            assert (light.index, light.source, light.problem, light.answer, light.prompt_text) == (
                full.index, full.source, full.problem, full.answer, full.prompt_text)
            assert [im.tobytes() for im in light.images] == [im.tobytes() for im in full.images]
    finally:
        dataset.processor = processor
    with pytest.raises(IndexError):
        dataset.prompt_inputs(len(dataset))
