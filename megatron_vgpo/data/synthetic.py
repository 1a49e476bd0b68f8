"""Generated visual-reasoning problems whose answers can only be read from a drawn image.

Every task draws one RGB image with PIL and asks a question about it; the question text alone carries no
information about the answer. Tasks (registry ``SYNTHETIC_TASKS``, add one with ``@register_task``):

- ``count_red``: how many red shapes (1-6, uniform: chance ~17%) among orange and pink distractors, all at
  free (non-overlapping) random positions. Difficulty: number of distractors and how close their colours are
  to red. (The tiny model does not learn it: its supervised loss stays at chance for 1,500 steps, while a
  sum-pooled linear head on the same vision tower reaches 78% in 1,000; see docs/benchmarks.md.)
- ``bar_tallest``: which bar (position from the left) is the tallest. Difficulty: number of bars and the
  height gap between the tallest and the runner-up.
- ``bar_count_taller`` (default): how many bars reach above a dashed reference line (uniform over 0..bars:
  chance 1/6 at medium). Difficulty: number of bars and how close bar tops may come to the line.
- ``angle_choice``: the size of a drawn angle, as a multiple-choice letter (A-D). Difficulty: spacing of
  the choices and the rotation of the figure.
- ``length_units``: the length of a blue segment in units of a black reference bar (integer). Difficulty:
  range of lengths and the segment's orientation.

Images are ``image_size`` x ``image_size`` (default 84, which the tiny Qwen2.5-VL turns into 9 image tokens).
Generation is deterministic for a seed: draw ``i`` uses its own ``random.Random`` seeded from
``(seed, task, difficulty, i)``; duplicates (same task, problem and pixels) are dropped, so a train/test
split of the unique examples is disjoint by construction.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")
DEFAULT_TASK = "bar_count_taller"  # the default job's task (learnable by the tiny model on 2 cores)
DEFAULT_IMAGE_SIZE = 84
IMAGE_PLACEHOLDER = "<image>"

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
RED: RGB = (220, 30, 30)
BAR_BLUE: RGB = (40, 90, 200)
SEGMENT_BLUE: RGB = (30, 80, 220)
# Distractor colours per difficulty: further from red when easy, closer when hard.
DISTRACTOR_COLOURS: dict[str, tuple[RGB, RGB]] = {
    "easy": ((255, 170, 0), (255, 160, 210)),
    "medium": ((245, 125, 20), (240, 115, 175)),
    "hard": ((235, 95, 30), (230, 85, 135)),
}
# Per-channel jitter applied to every filled shape colour, so no task is solved by one exact RGB value.
COLOUR_JITTER = 10


@dataclass
class SyntheticExample:
    """One generated problem.

    ``problem`` holds exactly one ``<image>`` placeholder; ``answer`` is the gold answer string; ``image`` is
    an RGB PIL image of ``image_size`` x ``image_size``; ``geometry`` records what was drawn (for checks and
    debugging, never written into the problem).
    """

    task: str
    difficulty: str
    problem: str
    answer: str
    image: Image.Image
    geometry: dict[str, Any] = field(default_factory=dict)

    def content_key(self) -> str:
        """Hash of task, problem and pixels: equal keys mean duplicate examples."""
        digest = hashlib.sha256()
        digest.update(self.task.encode())
        digest.update(self.problem.encode())
        digest.update(self.image.tobytes())
        return digest.hexdigest()


TaskFn = Callable[[random.Random, str, int], SyntheticExample]
SYNTHETIC_TASKS: dict[str, TaskFn] = {}


def register_task(name: str) -> Callable[[TaskFn], TaskFn]:
    """Decorator registering a generator ``fn(rng, difficulty, image_size) -> SyntheticExample``."""

    def decorate(task_fn: TaskFn) -> TaskFn:
        if name in SYNTHETIC_TASKS:
            raise ValueError(f"synthetic task {name!r} is already registered")
        SYNTHETIC_TASKS[name] = task_fn
        return task_fn

    return decorate


def _jitter(rng: random.Random, colour: RGB) -> RGB:
    return tuple(max(0, min(255, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in colour)  # type: ignore[return-value]


def _check_difficulty(difficulty: str) -> None:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {DIFFICULTIES}")


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float, colour: RGB
) -> None:
    """Filled ``kind`` ('circle', 'square', 'triangle') inscribed in the circle (cx, cy, radius)."""
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif kind == "square":
        half = radius / math.sqrt(2.0)
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
    elif kind == "triangle":
        points = [
            (cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a)))
            for a in (-90.0, 30.0, 150.0)
        ]
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def _free_positions(
    rng: random.Random, radii: list[float], image_size: int, gap: float, max_tries: int = 50
) -> list[tuple[float, float]]:
    """Centres for circles of ``radii`` inside the image, pairwise at least ``gap`` pixels apart (edges)."""
    for _ in range(max_tries):
        centres: list[tuple[float, float]] = []
        for radius in radii:
            low, high = radius + 1.0, image_size - radius - 2.0
            for _ in range(200):
                x, y = rng.uniform(low, high), rng.uniform(low, high)
                if all(
                    math.hypot(x - ox, y - oy) >= radius + o_radius + gap
                    for (ox, oy), o_radius in zip(centres, radii)
                ):
                    centres.append((x, y))
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
    raise RuntimeError(
        f"could not place {len(radii)} shapes without overlap in a {image_size}px image; "
        "use a larger --image-size or an easier difficulty"
    )


@register_task("count_red")
def make_count_red(rng: random.Random, difficulty: str, image_size: int) -> SyntheticExample:
    """Count red shapes (1-6) among orange/pink distractors at non-overlapping random positions."""
    _check_difficulty(difficulty)
    num_red = rng.randint(1, 6)
    low, high = {"easy": (0, 2), "medium": (1, 4), "hard": (3, 6)}[difficulty]
    num_distractors = rng.randint(low, high)
    orange, pink = DISTRACTOR_COLOURS[difficulty]
    colours = [RED] * num_red + [rng.choice((orange, pink)) for _ in range(num_distractors)]
    rng.shuffle(colours)
    radii = [rng.uniform(0.06, 0.085) * image_size for _ in colours]
    centres = _free_positions(rng, radii, image_size, gap=2.0)
    image = Image.new("RGB", (image_size, image_size), WHITE)
    draw = ImageDraw.Draw(image)
    shapes = []
    for colour, radius, (cx, cy) in zip(colours, radii, centres):
        kind = rng.choice(("circle", "square", "triangle"))
        _draw_shape(draw, kind, cx, cy, radius, _jitter(rng, colour))
        shapes.append({"kind": kind, "colour": "red" if colour == RED else "distractor", "centre": (cx, cy)})
    problem = f"{IMAGE_PLACEHOLDER}How many red shapes are in the image?"
    return SyntheticExample("count_red", difficulty, problem, str(num_red), image, {"shapes": shapes})


def _bar_layout(num_bars: int, image_size: int) -> tuple[list[tuple[int, int]], int, int]:
    """Column spans (x0, x1) of ``num_bars`` equal bars, the baseline row and the top usable row."""
    margin = max(4, image_size // 14)
    slot = (image_size - 2 * margin) / num_bars
    width = max(3, int(slot * 0.6))
    spans = []
    for index in range(num_bars):
        x0 = round(margin + index * slot + (slot - width) / 2)
        spans.append((x0, x0 + width - 1))
    return spans, image_size - margin, margin


def _draw_bars(heights: list[int], image_size: int) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    spans, baseline, _ = _bar_layout(len(heights), image_size)
    image = Image.new("RGB", (image_size, image_size), WHITE)
    draw = ImageDraw.Draw(image)
    draw.line((0, baseline + 1, image_size - 1, baseline + 1), fill=BLACK)
    for (x0, x1), height in zip(spans, heights):
        draw.rectangle((x0, baseline - height + 1, x1, baseline), fill=BAR_BLUE)
    return image, draw, baseline


@register_task("bar_tallest")
def make_bar_tallest(rng: random.Random, difficulty: str, image_size: int) -> SyntheticExample:
    """Which bar, counted from the left, is the tallest."""
    _check_difficulty(difficulty)
    num_bars = {"easy": 3, "medium": 4, "hard": 5}[difficulty]
    _, baseline, top = _bar_layout(num_bars, image_size)
    max_height = baseline - top
    min_gap = max(2, int(max_height * {"easy": 0.25, "medium": 0.12, "hard": 0.04}[difficulty]))
    tallest = rng.randint(max_height // 2 + min_gap, max_height)
    others = [rng.randint(max(2, max_height // 8), tallest - min_gap) for _ in range(num_bars - 1)]
    winner = rng.randrange(num_bars)
    heights = [*others[:winner], tallest, *others[winner:]]
    image, _, _ = _draw_bars(heights, image_size)
    problem = (
        f"{IMAGE_PLACEHOLDER}The chart has {num_bars} bars. Counting from the left, which bar is the "
        f"tallest? Answer with its position, a number from 1 to {num_bars}."
    )
    return SyntheticExample("bar_tallest", difficulty, problem, str(winner + 1), image, {"heights": heights})


@register_task("bar_count_taller")
def make_bar_count_taller(rng: random.Random, difficulty: str, image_size: int) -> SyntheticExample:
    """How many bars reach above a dashed red reference line. The answer is uniform over 0..num_bars (chance
    1/(num_bars + 1)), so always answering the most common count does not look like reading the image."""
    _check_difficulty(difficulty)
    num_bars = {"easy": 4, "medium": 5, "hard": 6}[difficulty]
    clearance = max(2, int(image_size * {"easy": 0.1, "medium": 0.05, "hard": 0.025}[difficulty]))
    _, baseline, top = _bar_layout(num_bars, image_size)
    max_height = baseline - top
    line_height = rng.randint(max_height // 4 + clearance, max_height - clearance - 2)
    taller = set(rng.sample(range(num_bars), rng.randint(0, num_bars)))
    heights = [rng.randint(line_height + clearance, max_height) if bar in taller
               else rng.randint(2, line_height - clearance) for bar in range(num_bars)]
    image, draw, baseline = _draw_bars(heights, image_size)
    line_row = baseline - line_height + 1  # the top row of a bar exactly line_height tall
    for x in range(0, image_size, 6):
        draw.line((x, line_row, min(x + 3, image_size - 1), line_row), fill=RED)
    answer = sum(1 for height in heights if height > line_height)
    problem = f"{IMAGE_PLACEHOLDER}How many bars are taller than the dashed red line?"
    return SyntheticExample(
        "bar_count_taller", difficulty, problem, str(answer), image, {"heights": heights, "line": line_height}
    )


CHOICE_LETTERS = "ABCD"


@register_task("angle_choice")
def make_angle_choice(rng: random.Random, difficulty: str, image_size: int) -> SyntheticExample:
    """The size of the angle between two black rays, as the letter of one of four choices."""
    _check_difficulty(difficulty)
    spacing = {"easy": 45, "medium": 30, "hard": 15}[difficulty]
    # Four evenly spaced candidate angles inside [15, 165]; the true one is a random member.
    first = rng.randrange(15, 166 - 3 * spacing, 15)
    candidates = [first + spacing * k for k in range(4)]
    angle = rng.choice(candidates)
    rng.shuffle(candidates)
    base_direction = 0.0 if difficulty == "easy" else rng.uniform(0.0, 360.0)
    ray_length = image_size * 0.42
    # Put the vertex so that both rays stay inside the image.
    directions = [math.radians(base_direction), math.radians(base_direction + angle)]
    xs = [0.0] + [ray_length * math.cos(d) for d in directions]
    ys = [0.0] + [-ray_length * math.sin(d) for d in directions]
    margin = 3.0
    vx = rng.uniform(margin - min(xs), image_size - 1 - margin - max(xs))
    vy = rng.uniform(margin - min(ys), image_size - 1 - margin - max(ys))
    image = Image.new("RGB", (image_size, image_size), WHITE)
    draw = ImageDraw.Draw(image)
    for direction in directions:
        end = (vx + ray_length * math.cos(direction), vy - ray_length * math.sin(direction))
        draw.line(((vx, vy), end), fill=BLACK, width=2)
    choices = " ".join(f"{letter}. {value}°" for letter, value in zip(CHOICE_LETTERS, candidates))
    problem = (
        f"{IMAGE_PLACEHOLDER}What is the measure of the angle between the two black rays? "
        f"Choices: {choices}. Answer with the letter of the correct choice."
    )
    answer = CHOICE_LETTERS[candidates.index(angle)]
    return SyntheticExample(
        "angle_choice", difficulty, problem, answer, image, {"angle": angle, "vertex": (vx, vy)}
    )


@register_task("length_units")
def make_length_units(rng: random.Random, difficulty: str, image_size: int) -> SyntheticExample:
    """Length of a blue segment in units of a black reference bar drawn at the top."""
    _check_difficulty(difficulty)
    max_units = {"easy": 4, "medium": 6, "hard": 7}[difficulty]
    units = rng.randint(1, max_units)
    usable = image_size - 8
    unit_px = rng.randint(max(4, usable // (2 * max_units)), usable // max_units)
    image = Image.new("RGB", (image_size, image_size), WHITE)
    draw = ImageDraw.Draw(image)
    ref_x = rng.randint(3, image_size - unit_px - 3)
    draw.rectangle((ref_x, 3, ref_x + unit_px - 1, 5), fill=BLACK)
    length = units * unit_px
    direction = 0.0 if difficulty != "hard" else rng.choice((0.0, 90.0, rng.uniform(0.0, 180.0)))
    dx, dy = math.cos(math.radians(direction)), -math.sin(math.radians(direction))
    # Segment from (x0, y0) covering `length` pixels; it lives below the reference bar.
    x_extent, y_extent = (length - 1) * dx, (length - 1) * dy
    low_y = 12 - min(0.0, y_extent)
    high_y = image_size - 3 - max(0.0, y_extent)
    low_x = 3 - min(0.0, x_extent)
    high_x = image_size - 3 - max(0.0, x_extent)
    if high_y < low_y or high_x < low_x:
        return make_length_units(rng, difficulty, image_size)  # does not fit at this angle: draw anew
    x0, y0 = rng.uniform(low_x, high_x), rng.uniform(low_y, high_y)
    draw.line(((x0, y0), (x0 + x_extent, y0 + y_extent)), fill=SEGMENT_BLUE, width=2)
    problem = (
        f"{IMAGE_PLACEHOLDER}The short black bar at the top is 1 unit long. "
        "How many units long is the blue segment?"
    )
    return SyntheticExample(
        "length_units",
        difficulty,
        problem,
        str(units),
        image,
        {"unit_px": unit_px, "direction": direction, "start": (x0, y0), "length_px": length},
    )


def generate_examples(
    num_examples: int,
    seed: int,
    tasks: tuple[str, ...] = (DEFAULT_TASK,),
    difficulty: str = "medium",
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> list[SyntheticExample]:
    """``num_examples`` unique examples; example ``i`` comes from ``tasks[i % len(tasks)]``.

    Deterministic for ``(seed, tasks, difficulty, image_size)``. Duplicates are skipped (and the next index
    tried), so the result holds ``num_examples`` pairwise different examples; raises if the task cannot
    produce that many distinct ones.
    """
    unknown = [task for task in tasks if task not in SYNTHETIC_TASKS]
    if unknown or not tasks:
        raise ValueError(
            f"unknown synthetic task(s) {unknown or tasks}; choose from {sorted(SYNTHETIC_TASKS)}"
        )
    _check_difficulty(difficulty)
    if image_size < 28:
        raise ValueError(f"image_size must be at least 28 pixels, got {image_size}")
    examples: list[SyntheticExample] = []
    seen: set[str] = set()
    index = 0
    max_index = 20 * num_examples + 100
    while len(examples) < num_examples:
        if index >= max_index:
            raise RuntimeError(
                f"only {len(examples)} distinct examples after {index} draws for tasks {tasks}; "
                "ask for fewer examples or a larger image"
            )
        task = tasks[len(examples) % len(tasks)]
        rng = random.Random(f"megatron_vgpo.synthetic:{seed}:{task}:{difficulty}:{index}")
        example = SYNTHETIC_TASKS[task](rng, difficulty, image_size)
        key = example.content_key()
        if key not in seen:
            seen.add(key)
            examples.append(example)
        index += 1
    return examples


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` (lossless, so pixel checks on the decoded image see what was drawn)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def examples_to_table(examples: list[SyntheticExample], split: str, seed: int) -> pa.Table:
    """Arrow table in the ViRL39K / Geo3K / MMK12 RL schema plus provenance columns.

    Columns: ``problem`` (string with one ``<image>``), ``answer`` (string), ``images``
    (list of ``{"bytes": PNG, "path": null}``, the Hugging Face image struct), ``task``, ``difficulty``,
    ``id`` (``{split}-{seed}-{row}``).
    """
    image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("problem", pa.string()),
            ("answer", pa.string()),
            ("images", pa.list_(image_struct)),
            ("task", pa.string()),
            ("difficulty", pa.string()),
            ("id", pa.string()),
        ]
    )
    columns = {
        "problem": [example.problem for example in examples],
        "answer": [example.answer for example in examples],
        "images": [[{"bytes": encode_png(example.image), "path": None}] for example in examples],
        "task": [example.task for example in examples],
        "difficulty": [example.difficulty for example in examples],
        "id": [f"{split}-{seed}-{row}" for row in range(len(examples))],
    }
    return pa.Table.from_pydict(columns, schema=schema)


def make_synthetic_splits(
    out_dir: str | Path,
    num_examples: int,
    seed: int,
    tasks: tuple[str, ...] = (DEFAULT_TASK,),
    difficulty: str = "medium",
    test_fraction: float = 0.1,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> dict[str, Path]:
    """Write ``out_dir/train.parquet`` and ``out_dir/test.parquet`` from ``num_examples`` unique examples.

    The test split takes ``round(num_examples * test_fraction)`` examples, the train split the rest; no
    example (task, problem, pixels) is in both. Returns ``{"train": path, "test": path}``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    examples = generate_examples(num_examples, seed, tasks, difficulty, image_size)
    num_test = round(num_examples * test_fraction)
    splits = {"train": examples[: num_examples - num_test], "test": examples[num_examples - num_test :]}
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, split_examples in splits.items():
        paths[split] = out_path / f"{split}.parquet"
        pq.write_table(examples_to_table(split_examples, split, seed), paths[split])
        logger.info("wrote %d %s examples to %s", len(split_examples), split, paths[split])
    return paths
