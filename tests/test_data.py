"""Tests for megatron_vgpo.data: the VGPO prompt, the parquet PromptDataset (image encodings, bad rows,
pixel bounds, token counts), the resumable sampler/loader and collation.

The processor is the stock Qwen2_5_VLProcessor of the tiny checkpoint (``tiny_hf_dir`` fixture). Expected
prompts are built independently: chat messages written out literally and run through the processor.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from megatron_vgpo.data import (
    REASONING_INSTRUCTION,
    BadRowError,
    DatasetColumns,
    PromptDataset,
    PromptLoader,
    PromptSampler,
    build_messages,
    collate_prompts,
    format_problem,
    iterate_once,
    resize_to_pixel_bounds,
)
from megatron_vgpo.data.synthetic import make_synthetic_splits

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def processor(tiny_hf_dir: Path) -> Any:
    return AutoProcessor.from_pretrained(tiny_hf_dir)


def png_bytes(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict[str, Any]], images_type: pa.DataType) -> Path:
    schema = pa.schema([("problem", pa.string()), ("answer", pa.string()), ("images", images_type)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_prompt_template_and_messages() -> None:
    text = format_problem("  How many? ")
    assert text == f"How many?\n\n{REASONING_INSTRUCTION}"
    assert "<think> </think>" in REASONING_INSTRUCTION and "\\boxed{}" in REASONING_INSTRUCTION
    assert build_messages("A<image>B<image>", 2) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "A"},
                {"type": "image"},
                {"type": "text", "text": "B"},
                {"type": "image"},
            ],
        }
    ]
    assert build_messages("<image>Q", 1)[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q"}]
    assert build_messages("Q", 2)[0]["content"] == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "Q"},
    ]
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        build_messages("<image><image>", 1)


def test_resize_to_pixel_bounds() -> None:
    big = Image.new("RGB", (300, 200))
    small = Image.new("RGB", (20, 10))
    shrunk = resize_to_pixel_bounds(big, None, 10_000)
    grown = resize_to_pixel_bounds(small, 5_000, None)
    assert shrunk.width * shrunk.height <= 10_000 and abs(shrunk.width / shrunk.height - 1.5) < 0.05
    assert grown.width * grown.height >= 5_000 and abs(grown.width / grown.height - 2.0) < 0.05
    assert resize_to_pixel_bounds(big, 100, 100_000) is big


def test_good_rows_in_every_image_encoding(tmp_path: Path, processor: Any) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "green.png").write_bytes(png_bytes((84, 84), (0, 200, 0)))
    red, blue = png_bytes((84, 84), (200, 0, 0)), png_bytes((112, 56), (0, 0, 200))
    struct_rows = [
        {"problem": "<image>Colour?", "answer": "red", "images": [{"bytes": red, "path": None}]},
        {
            "problem": "Left <image> right <image> which?",
            "answer": "A",
            "images": [{"bytes": red, "path": None}, {"bytes": blue, "path": "ignored.png"}],
        },
        {"problem": "No placeholder.", "answer": "2", "images": [{"bytes": None, "path": "imgs/green.png"}]},
        {"problem": "Text only", "answer": "7", "images": []},
    ]
    path_a = write_parquet(tmp_path / "a.parquet", struct_rows, pa.list_(IMAGE_STRUCT))
    bytes_rows = [{"problem": "<image>Q", "answer": "1", "images": [blue]}]
    path_b = write_parquet(tmp_path / "b.parquet", bytes_rows, pa.list_(pa.binary()))
    path_rows = [{"problem": "<image>Q", "answer": "3", "images": ["imgs/green.png"]}]
    path_c = write_parquet(tmp_path / "c.parquet", path_rows, pa.list_(pa.string()))

    dataset = PromptDataset([path_a, path_b, path_c], processor, max_prompt_length=1024)
    assert len(dataset) == 6 and not dataset.skipped and dataset.num_rows_read == 6
    image_pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    # Reference for row 1: messages written out by hand, images decoded by PIL directly.
    two = dataset[1]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Left "},
                {"type": "image"},
                {"type": "text", "text": " right "},
                {"type": "image"},
                {"type": "text", "text": f" which?\n\n{REASONING_INSTRUCTION}"},
            ],
        }
    ]
    reference_text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    reference_images = [Image.open(io.BytesIO(data)).convert("RGB") for data in (red, blue)]
    reference = processor(text=[reference_text], images=reference_images, return_tensors="pt")
    assert two.prompt_text == reference_text
    assert reference_text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert reference_text.endswith("<|im_start|>assistant\n")
    assert torch.equal(two.input_ids, reference["input_ids"][0])
    assert torch.equal(two.pixel_values, reference["pixel_values"])
    assert torch.equal(two.image_grid_thw, torch.tensor([[1, 6, 6], [1, 4, 8]]))
    assert torch.equal(two.mm_token_type_ids, reference["mm_token_type_ids"][0])
    assert (two.input_ids == image_pad_id).sum() == 9 + 8
    assert (two.answer, two.source) == ("A", f"{path_a}:1")

    for index in range(len(dataset)):
        sample = dataset[index]
        # The length check used at construction matches what the processor actually produced.
        assert dataset.prompt_length(sample.prompt_text, sample.images) == sample.input_ids.shape[0]
        assert sample.attention_mask.sum() == sample.input_ids.shape[0]
        grid_tokens = (
            0 if sample.image_grid_thw is None else int(sample.image_grid_thw.prod(dim=1).sum()) // 4
        )
        assert int((sample.input_ids == image_pad_id).sum()) == grid_tokens
    # No placeholder: the image comes before the text.
    no_placeholder = dataset[2].prompt_text
    assert no_placeholder.index("<|vision_start|>") < no_placeholder.index("No placeholder.")
    text_only = dataset[3]
    assert text_only.pixel_values is None and text_only.image_grid_thw is None and text_only.images == []


def test_bad_rows_are_skipped_and_named(
    tmp_path: Path, processor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    good = png_bytes((84, 84), (10, 20, 30))
    rows = [
        {"problem": "<image>ok", "answer": "1", "images": [{"bytes": good, "path": None}]},
        {"problem": "<image>gone", "answer": "1", "images": [{"bytes": None, "path": "missing.png"}]},
        {"problem": "<image>junk", "answer": "1", "images": [{"bytes": b"not an image", "path": None}]},
        {"problem": "<image><image>two", "answer": "1", "images": [{"bytes": good, "path": None}]},
        {"problem": "   ", "answer": "1", "images": []},
        {"problem": "<image>no answer", "answer": None, "images": [{"bytes": good, "path": None}]},
        {"problem": "<image>" + "long " * 400, "answer": "1", "images": [{"bytes": good, "path": None}]},
        {"problem": "<image>null image", "answer": "1", "images": [None]},
        {"problem": "<image>also ok", "answer": "2", "images": [{"bytes": good, "path": None}]},
    ]
    path = write_parquet(tmp_path / "bad.parquet", rows, pa.list_(IMAGE_STRUCT))
    with caplog.at_level(logging.WARNING, logger="megatron_vgpo.data.dataset"):
        dataset = PromptDataset([path], processor, max_prompt_length=300)
    assert len(dataset) == 2 and [dataset[i].answer for i in range(2)] == ["1", "2"]
    assert dict(dataset.skipped) == {
        "missing_image": 2,
        "undecodable_image": 1,
        "placeholder_mismatch": 1,
        "empty_problem": 1,
        "empty_answer": 1,
        "too_long": 1,
    }
    by_row = {bad.row: bad for bad in dataset.bad_rows}
    assert sorted(by_row) == [1, 2, 3, 4, 5, 6, 7]
    assert (by_row[1].field, by_row[1].reason) == ("images[0]", "missing_image")
    assert "missing.png" in by_row[1].detail
    assert (by_row[2].field, by_row[2].reason) == ("images[0]", "undecodable_image")
    assert (by_row[3].field, by_row[6].field, by_row[5].field) == ("problem", "problem", "answer")
    assert by_row[2].message().startswith(f"{path} row 2, field 'images[0]': undecodable_image")
    summary = [record for record in caplog.records if "skipped 7 bad rows" in record.getMessage()]
    assert len(summary) == 1 and str(path) in summary[0].getMessage()

    only_bad = write_parquet(tmp_path / "only_bad.parquet", rows[1:3], pa.list_(IMAGE_STRUCT))
    with pytest.raises(ValueError, match=r"no usable rows .*only_bad\.parquet row 0, field 'images\[0\]'"):
        PromptDataset([only_bad], processor)
    with pytest.raises(BadRowError, match=r"bad\.parquet row 1, field 'images\[0\]': missing_image") as info:
        PromptDataset([path], processor, max_prompt_length=300, on_bad_row="raise")
    assert info.value.bad_row.row == 1


def test_configurable_columns_single_image_and_pixel_bounds(tmp_path: Path, processor: Any) -> None:
    schema = pa.schema([("question", pa.string()), ("solution", pa.int64()), ("image", IMAGE_STRUCT)])
    rows = [
        {
            "question": "<image>How wide?",
            "solution": 300,
            "image": {"bytes": png_bytes((300, 200), (1, 2, 3))},
        }
    ]
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    columns = DatasetColumns(prompt="question", answer="solution", images="image")
    dataset = PromptDataset([path], processor, columns=columns, max_pixels=28 * 28 * 16)
    sample = dataset[0]
    assert sample.answer == "300" and len(sample.images) == 1
    assert sample.images[0].width * sample.images[0].height <= 28 * 28 * 16
    assert int(sample.image_grid_thw.prod()) // 4 <= 16
    with pytest.raises(
        KeyError, match=r"custom\.parquet: missing column\(s\) \['problem', 'answer', 'images'\]"
    ):
        PromptDataset([path], processor)


def test_sampler_is_deterministic_and_covers_each_epoch() -> None:
    sampler = PromptSampler(10, 3, seed=5)
    again = PromptSampler(10, 3, seed=5)
    batches = [sampler.next_batch() for _ in range(9)]
    assert batches == [again.next_batch() for _ in range(9)]
    assert all(len(batch) == 3 for batch in batches)
    epochs = [[index for batch in batches[3 * e : 3 * e + 3] for index in batch] for e in range(3)]
    assert all(len(set(epoch)) == 9 for epoch in epochs)  # drop_last: 9 distinct of 10 per epoch
    assert epochs[0] != epochs[1] and sampler.epoch == 2
    assert PromptSampler(10, 3, seed=6).next_batch() != batches[0]
    ordered = PromptSampler(5, 2, shuffle=False, drop_last=False)
    assert [ordered.next_batch() for _ in range(4)] == [[0, 1], [2, 3], [4], [0, 1]]
    with pytest.raises(ValueError, match="batch_size 4 > dataset size 3"):
        PromptSampler(3, 4)


def test_sampler_resume_continues_exactly() -> None:
    uninterrupted = PromptSampler(7, 2, seed=1)
    expected = [uninterrupted.next_batch() for _ in range(11)]  # crosses several epochs
    for stop in (0, 2, 3, 5):
        first = PromptSampler(7, 2, seed=1)
        drawn = [first.next_batch() for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = PromptSampler(7, 2, seed=1)
        resumed.load_state_dict(state)
        drawn += [resumed.next_batch() for _ in range(11 - stop)]
        assert drawn == expected, stop
    with pytest.raises(ValueError, match="num_items=7 but this sampler has num_items=8"):
        PromptSampler(8, 2, seed=1).load_state_dict(state)


def test_loader_resume_and_collate_on_synthetic_data(tmp_path: Path, processor: Any) -> None:
    paths = make_synthetic_splits(
        tmp_path, 12, seed=0, tasks=("count_red", "angle_choice"), test_fraction=0.25
    )
    dataset = PromptDataset([paths["train"]], processor, max_prompt_length=512)
    assert len(dataset) == 9
    loader = PromptLoader(dataset, batch_size=4, seed=3)
    expected = [[s.source for s in loader.next_batch()] for _ in range(3)]
    first = PromptLoader(dataset, batch_size=4, seed=3)
    first.next_batch()
    resumed = PromptLoader(dataset, batch_size=4, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert [[s.source for s in resumed.next_batch()] for _ in range(2)] == expected[1:]

    validation = PromptDataset([paths["test"]], processor, max_prompt_length=512)
    passes = [[sample.source for sample in batch] for batch in iterate_once(validation, batch_size=2)]
    assert passes == [[f"{paths['test']}:0", f"{paths['test']}:1"], [f"{paths['test']}:2"]]

    samples = [dataset[i] for i in range(3)]
    pad_id = processor.tokenizer.pad_token_id
    batch = collate_prompts(samples, pad_token_id=pad_id)
    length = max(sample.input_ids.shape[0] for sample in samples)
    assert batch.input_ids.shape == (3, length)
    for row, sample in enumerate(samples):
        size = sample.input_ids.shape[0]
        assert torch.equal(batch.input_ids[row, length - size :], sample.input_ids)
        assert bool((batch.input_ids[row, : length - size] == pad_id).all())
        assert int(batch.attention_mask[row].sum()) == size
        assert torch.equal(batch.mm_token_type_ids[row, length - size :], sample.mm_token_type_ids)
    assert torch.equal(batch.pixel_values, torch.cat([s.pixel_values for s in samples]))
    assert batch.image_grid_thw.shape == (3, 3) and batch.answers == [s.answer for s in samples]
    fixed = collate_prompts(samples, pad_token_id=pad_id, pad_to=length + 5)
    assert fixed.input_ids.shape == (3, length + 5) and torch.equal(fixed.input_ids[:, 5:], batch.input_ids)
    with pytest.raises(ValueError, match=f"has {length} tokens > pad_to={length - 1}"):
        collate_prompts(samples, pad_token_id=pad_id, pad_to=length - 1)
