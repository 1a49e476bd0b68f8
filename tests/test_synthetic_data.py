"""Tests for the generated visual-reasoning data (megatron_vgpo.data.synthetic, tools/make_synthetic_data.py).

The main check reads each answer back from the pixels alone with small image-analysis routines written
here (connected components, bar tops, ray directions, segment lengths), independent of the generators.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_vgpo.data.synthetic import (
    DIFFICULTIES,
    SYNTHETIC_TASKS,
    generate_examples,
    make_synthetic_splits,
    register_task,
)


def _load_cli_module() -> object:
    path = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_data.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_data", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_synthetic_data = _load_cli_module()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int32)


def connected_components(mask: np.ndarray) -> int:
    """Number of 4-connected True regions of a 2-D boolean mask."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    count = 0
    for start_y, start_x in zip(*np.nonzero(mask)):
        if seen[start_y, start_x]:
            continue
        count += 1
        stack = [(start_y, start_x)]
        seen[start_y, start_x] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def red_mask(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] > 150) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)


def blue_mask(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 2] > 150) & (rgb[..., 0] < 100) & (rgb[..., 1] < 150)


def bar_tops(rgb: np.ndarray) -> list[int]:
    """Top row of each blue bar, bars ordered left to right (runs of columns holding blue pixels)."""
    columns = blue_mask(rgb).any(axis=0)
    tops: list[int] = []
    x = 0
    while x < len(columns):
        if not columns[x]:
            x += 1
            continue
        run_start = x
        while x < len(columns) and columns[x]:
            x += 1
        rows = np.nonzero(blue_mask(rgb)[:, run_start:x].any(axis=1))[0]
        tops.append(int(rows.min()))
    return tops


def read_count_red(image: Image.Image) -> int:
    return connected_components(red_mask(pixels(image)))


def read_bar_tallest(image: Image.Image) -> int:
    tops = bar_tops(pixels(image))
    return int(np.argmin(tops)) + 1


def read_bar_count_taller(image: Image.Image) -> int:
    rgb = pixels(image)
    line_row = int(np.argmax(red_mask(rgb).sum(axis=1)))
    return sum(1 for top in bar_tops(rgb) if top < line_row)


def read_angle(image: Image.Image, vertex: tuple[float, float]) -> float:
    """Angle between the two dark rays leaving ``vertex``, in degrees."""
    rgb = pixels(image)
    ys, xs = np.nonzero(rgb.sum(axis=-1) < 200)
    dx, dy = xs - vertex[0], vertex[1] - ys
    distance = np.hypot(dx, dy)
    direction = np.degrees(np.arctan2(dy, dx))
    far = distance > 8
    first = direction[far][np.argmax(distance[far])]
    gap = np.abs((direction - first + 180.0) % 360.0 - 180.0)
    other = far & (gap > 10)
    second = direction[other][np.argmax(distance[other])]
    angle = abs(first - second) % 360.0
    return min(angle, 360.0 - angle)


def read_length_units(image: Image.Image) -> float:
    rgb = pixels(image)
    dark = rgb.sum(axis=-1) < 100
    reference_columns = np.nonzero(dark[:8].any(axis=0))[0]
    unit = reference_columns.max() - reference_columns.min() + 1
    ys, xs = np.nonzero(blue_mask(rgb))
    points = np.stack([xs, ys], axis=1).astype(float)
    end_a = points[np.argmax(np.linalg.norm(points - points[0], axis=1))]
    end_b = points[np.argmax(np.linalg.norm(points - end_a, axis=1))]
    # Pixel extent of a 2-px-wide line overshoots its length by up to ~1 px at each end.
    return float(np.linalg.norm(end_a - end_b) + 1) / unit


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_answers_are_readable_from_the_pixels(difficulty: str) -> None:
    for example in generate_examples(25, seed=11, tasks=("count_red",), difficulty=difficulty):
        assert read_count_red(example.image) == int(example.answer), example.geometry
    for example in generate_examples(20, seed=12, tasks=("bar_tallest",), difficulty=difficulty):
        assert read_bar_tallest(example.image) == int(example.answer), example.geometry
    for example in generate_examples(20, seed=13, tasks=("bar_count_taller",), difficulty=difficulty):
        assert read_bar_count_taller(example.image) == int(example.answer), example.geometry
    for example in generate_examples(20, seed=14, tasks=("angle_choice",), difficulty=difficulty):
        measured = read_angle(example.image, example.geometry["vertex"])
        choices = {letter: int(value) for letter, value in re.findall(r"([A-D])\. (\d+)°", example.problem)}
        assert len(choices) == 4
        nearest = min(choices, key=lambda letter: abs(choices[letter] - measured))
        assert nearest == example.answer, (measured, choices, example.answer)
        assert abs(choices[example.answer] - measured) < 5.0
    for example in generate_examples(20, seed=15, tasks=("length_units",), difficulty=difficulty):
        measured = read_length_units(example.image)
        assert abs(measured - int(example.answer)) < 0.35, (measured, example.answer, example.geometry)


def test_count_red_is_uniform_and_the_question_carries_no_answer() -> None:
    examples = generate_examples(600, seed=3, tasks=("count_red",))
    counts = collections.Counter(example.answer for example in examples)
    assert sorted(counts) == ["1", "2", "3", "4", "5", "6"]
    assert all(0.12 < n / len(examples) < 0.22 for n in counts.values()), counts
    assert len({example.problem for example in examples}) == 1
    assert all(example.image.size == (84, 84) for example in examples)


def test_difficulty_adds_distractors() -> None:
    def mean_distractors(difficulty: str) -> float:
        totals = []
        for example in generate_examples(40, seed=5, tasks=("count_red",), difficulty=difficulty):
            rgb = pixels(example.image)
            coloured = rgb.sum(axis=-1) < 700  # not white background
            totals.append(connected_components(coloured & ~red_mask(rgb)))
        return float(np.mean(totals))

    easy, medium, hard = (mean_distractors(d) for d in DIFFICULTIES)
    assert easy < medium < hard


def test_generation_is_deterministic_and_duplicate_free() -> None:
    first = generate_examples(30, seed=7, tasks=tuple(sorted(SYNTHETIC_TASKS)))
    again = generate_examples(30, seed=7, tasks=tuple(sorted(SYNTHETIC_TASKS)))
    other = generate_examples(30, seed=8, tasks=tuple(sorted(SYNTHETIC_TASKS)))
    assert [e.content_key() for e in first] == [e.content_key() for e in again]
    assert [e.content_key() for e in first] != [e.content_key() for e in other]
    assert len({e.content_key() for e in first}) == 30
    assert [e.task for e in first[:5]] == sorted(SYNTHETIC_TASKS)


def read_split(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_splits_schema_disjoint_and_deterministic(tmp_path: Path) -> None:
    paths = make_synthetic_splits(
        tmp_path / "a", 50, seed=2, tasks=("count_red", "bar_tallest"), test_fraction=0.2
    )
    again = make_synthetic_splits(
        tmp_path / "b", 50, seed=2, tasks=("count_red", "bar_tallest"), test_fraction=0.2
    )
    train, test = read_split(paths["train"]), read_split(paths["test"])
    assert (len(train), len(test)) == (40, 10)
    assert train == read_split(again["train"]) and test == read_split(again["test"])
    schema = pq.read_schema(paths["train"])
    assert schema.field("images").type.value_type.names == ["bytes", "path"]
    for row in train + test:
        assert row["problem"].count("<image>") == 1 == len(row["images"])
        assert row["images"][0]["path"] is None
        Image.open(io.BytesIO(row["images"][0]["bytes"])).verify()

    def keys(rows: list[dict]) -> set[tuple[str, bytes]]:
        decoded = (Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB") for row in rows)
        return {(row["problem"], image.tobytes()) for row, image in zip(rows, decoded)}

    assert not keys(train) & keys(test)


def test_cli_writes_files_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--num", "20", "--seed", "4", "--task", "all", "--test-fraction", "0.25"]
    assert make_synthetic_data.main([*argv, "--difficulty", "hard", "--image-size", "112"]) == 0
    rows = read_split(tmp_path / "train.parquet")
    assert len(rows) == 15 and len(read_split(tmp_path / "test.parquet")) == 5
    assert {row["task"] for row in rows} == set(SYNTHETIC_TASKS)
    assert Image.open(io.BytesIO(rows[0]["images"][0]["bytes"])).size == (112, 112)
    assert "train: 15 rows" in capsys.readouterr().out
    assert make_synthetic_data.main(["--out", str(tmp_path / "x"), "--num", "3", "--task", "nope"]) == 2
    assert "unknown synthetic task" in capsys.readouterr().err


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="difficulty"):
        generate_examples(2, seed=0, difficulty="extreme")
    with pytest.raises(ValueError, match="already registered"):
        register_task("count_red")(lambda rng, difficulty, size: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="test_fraction"):
        make_synthetic_splits("/nonexistent", 4, seed=0, test_fraction=1.0)


def test_bar_count_taller_answers_are_uniform() -> None:
    """The default task's counts are uniform over 0..5 (chance 1/6), so answering the most common count
    scores no better than chance: a gain over 1/6 means the image is being read."""
    from collections import Counter

    counts = Counter(int(e.answer) for e in generate_examples(1200, seed=21, tasks=("bar_count_taller",)))
    assert set(counts) == set(range(6))
    assert max(counts.values()) / 1200 < 0.2 and min(counts.values()) / 1200 > 0.13, counts
