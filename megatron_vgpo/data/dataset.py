"""Prompt datasets read from parquet files in the RL schema of ViRL39K, Geo3K and MMK12.

Each row has a problem text with ``<image>`` placeholders, a gold answer, and a list of images (Hugging Face
image structs, raw bytes or file paths). ``PromptDataset`` checks every row once at construction, keeps the
good ones and records the bad ones (a summary is logged once and kept in ``skipped`` / ``bad_rows``); item
``i`` is then the VGPO prompt of the i-th good row, run through the model's processor.

A row is bad when: the problem or answer is missing or empty; an image is missing or cannot be decoded; the
number of ``<image>`` placeholders is neither zero nor the number of images; or the prompt is longer than
``max_prompt_length`` tokens once every image is expanded into its image tokens.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
import torch
from PIL import Image

from megatron_vgpo.data.images import ImageDecodeError, load_image, resize_to_pixel_bounds
from megatron_vgpo.data.prompts import (
    IMAGE_PLACEHOLDER,
    REASONING_INSTRUCTION,
    build_messages,
    format_problem,
)

logger = logging.getLogger(__name__)

OnBadRow = Literal["skip", "raise"]
_PROGRESS_EVERY = 10_000  # rows between progress messages while checking a file
BAD_ROW_REASONS: tuple[str, ...] = (
    "empty_problem",
    "empty_answer",
    "missing_image",
    "undecodable_image",
    "placeholder_mismatch",
    "too_long",
)


@dataclass(frozen=True)
class DatasetColumns:
    """Column names of the problem text, the gold answer and the images (``images=None``: text only)."""

    prompt: str = "problem"
    answer: str = "answer"
    images: str | None = "images"


@dataclass(frozen=True)
class BadRow:
    """Where a bad row is (file, 0-based row index in that file), which field, which check failed, and why."""

    file: str
    row: int
    field: str
    reason: str
    detail: str

    def message(self) -> str:
        return f"{self.file} row {self.row}, field {self.field!r}: {self.reason}: {self.detail}"


class BadRowError(ValueError):
    """Raised for a bad row when ``on_bad_row="raise"`` (or when a row goes bad after the initial check)."""

    def __init__(self, bad_row: BadRow) -> None:
        super().__init__(bad_row.message())
        self.bad_row = bad_row


@dataclass
class PromptInputs:
    """What a rollout request needs of a prompt, without the image processor's output.

    Attributes: ``index`` / ``source`` / ``problem`` / ``answer`` / ``images`` / ``prompt_text``, described
    in :class:`PromptSample` (the images decoded and resized into the pixel bounds, not processed).
    """

    index: int
    source: str
    problem: str
    answer: str
    images: list[Image.Image]
    prompt_text: str


@dataclass
class PromptSample(PromptInputs):
    """One processed prompt: the request fields of :class:`PromptInputs` and the processor's output.

    Attributes:
        index: position of the row among the dataset's good rows.
        source: ``"<file>:<row>"`` of the parquet row.
        problem: the raw problem text (with its ``<image>`` placeholders).
        answer: the gold answer as a string.
        images: RGB PIL images in prompt order, already resized into the dataset's pixel bounds; hand these
            same images to the rollout engine.
        prompt_text: chat-templated prompt with the generation prompt, one ``<|image_pad|>`` per image
            (not yet expanded).
        input_ids: int64 [L], the prompt with every image expanded to its image tokens.
        attention_mask: int64 [L], all ones.
        pixel_values: float32 [num_patches, channels * temporal_patch * patch**2], or None without images.
        image_grid_thw: int64 [num_images, 3] (t, h, w patch grid per image), or None without images.
        mm_token_type_ids: int64 [L] (1 on image tokens) when the processor returns it, else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    mm_token_type_ids: torch.Tensor | None


@dataclass(frozen=True)
class _RowRef:
    file_index: int
    row: int


class PromptDataset:
    """Good rows of one or more parquet files, as processed VGPO prompts.

    Args:
        paths: parquet files; image file paths inside a file are relative to that file's folder.
        processor: the model's processor (``Qwen2_5_VLProcessor``): its chat template, tokenizer and image
            processor are used as they are, so prompts match what the rollout engine builds from the same
            checkpoint folder.
        columns: column names (``DatasetColumns``).
        max_prompt_length: longest prompt, in tokens after image expansion; longer rows are bad.
        min_pixels / max_pixels: every image is scaled (aspect kept) into this pixel-count range before the
            processor sees it; None leaves that side unbounded. Keep them within the processor's own range,
            or the processor scales the image again.
        on_bad_row: "skip" (count, log a summary) or "raise" (``BadRowError`` at the first bad row).
        instruction: the text appended after the problem (default: ``REASONING_INSTRUCTION``).

    Attributes:
        skipped: ``Counter`` of bad-row reasons. bad_rows: every ``BadRow``, in file/row order.
        num_rows_read: rows in all files.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        processor: Any,
        columns: DatasetColumns | None = None,
        max_prompt_length: int = 4096,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        on_bad_row: OnBadRow = "skip",
        instruction: str = REASONING_INSTRUCTION,
    ) -> None:
        if on_bad_row not in ("skip", "raise"):
            raise ValueError(f"on_bad_row must be 'skip' or 'raise', got {on_bad_row!r}")
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) > max_pixels ({max_pixels})")
        if not paths:
            raise ValueError("PromptDataset needs at least one parquet file")
        self.paths = [Path(path) for path in paths]
        self.processor = processor
        self.columns = columns or DatasetColumns()
        self.max_prompt_length = max_prompt_length
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.on_bad_row = on_bad_row
        self.instruction = instruction
        self._warn_if_bounds_exceed_processor()
        self._tables = [self._read_table(path) for path in self.paths]
        self.num_rows_read = sum(table.num_rows for table in self._tables)
        self.skipped: collections.Counter[str] = collections.Counter()
        self.bad_rows: list[BadRow] = []
        self._rows: list[_RowRef] = []
        for file_index, table in enumerate(self._tables):
            for row in range(table.num_rows):
                if row and row % _PROGRESS_EVERY == 0:
                    logger.info(
                        "PromptDataset: checked %d of %d rows of %s", row, table.num_rows, paths[file_index]
                    )
                bad_row = self._check_row(file_index, row)
                if bad_row is None:
                    self._rows.append(_RowRef(file_index, row))
                elif on_bad_row == "raise":
                    raise BadRowError(bad_row)
                else:
                    self.skipped[bad_row.reason] += 1
                    self.bad_rows.append(bad_row)
        self._log_summary()
        if not self._rows:
            raise ValueError(
                f"PromptDataset: no usable rows in {[str(path) for path in self.paths]}; "
                f"skipped {dict(self.skipped)}; first problem: "
                f"{self.bad_rows[0].message() if self.bad_rows else 'the files are empty'}"
            )

    def _warn_if_bounds_exceed_processor(self) -> None:
        """The processor clamps images into its own pixel range; say so when ours is wider (still consistent
        with the rollout engine, which uses the same processor config, but our bound has no effect)."""
        size = getattr(self.processor.image_processor, "size", None)

        def bound(name: str) -> int | None:
            value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
            return int(value) if value is not None else None

        lowest, highest = bound("shortest_edge"), bound("longest_edge")
        if self.max_pixels is not None and highest is not None and self.max_pixels > highest:
            logger.warning(
                "PromptDataset: max_pixels=%d exceeds the processor's own limit %d; the processor "
                "shrinks larger images further",
                self.max_pixels,
                highest,
            )
        if self.min_pixels is not None and lowest is not None and self.min_pixels < lowest:
            logger.warning(
                "PromptDataset: min_pixels=%d is below the processor's own minimum %d; the processor "
                "enlarges smaller images further",
                self.min_pixels,
                lowest,
            )

    # -- reading ---------------------------------------------------------------------------------------

    def _read_table(self, path: Path) -> Any:
        if not path.is_file():
            raise FileNotFoundError(f"parquet file not found: {path}")
        table = pq.read_table(path, memory_map=True)
        wanted = [self.columns.prompt, self.columns.answer]
        if self.columns.images is not None:
            wanted.append(self.columns.images)
        missing = [name for name in wanted if name not in table.column_names]
        if missing:
            raise KeyError(
                f"{path}: missing column(s) {missing}; the file has {table.column_names}. "
                "Set the column names with DatasetColumns(prompt=..., answer=..., images=...)."
            )
        return table

    def _raw_row(self, file_index: int, row: int) -> tuple[Any, Any, list[Any]]:
        table = self._tables[file_index]
        problem = table.column(self.columns.prompt)[row].as_py()
        answer = table.column(self.columns.answer)[row].as_py()
        images: list[Any] = []
        if self.columns.images is not None:
            value = table.column(self.columns.images)[row].as_py()
            if isinstance(value, list):
                images = value
            elif value is not None:
                images = [value]  # a single image stored without a list
        return problem, answer, images

    def _bad(self, file_index: int, row: int, field: str, reason: str, detail: str) -> BadRow:
        return BadRow(str(self.paths[file_index]), row, field, reason, detail)

    def _load_images(self, file_index: int, row: int, stored: list[Any]) -> list[Image.Image] | BadRow:
        images = []
        base_dir = self.paths[file_index].parent
        for position, value in enumerate(stored):
            try:
                image = load_image(value, base_dir)
            except ImageDecodeError as error:
                field = f"{self.columns.images}[{position}]"
                return self._bad(file_index, row, field, error.kind, str(error))
            images.append(resize_to_pixel_bounds(image, self.min_pixels, self.max_pixels))
        return images

    # -- checks ------------------------------------------------------------------------------------------

    def _check_row(self, file_index: int, row: int) -> BadRow | None:
        problem, answer, stored_images = self._raw_row(file_index, row)
        if problem is None or not str(problem).strip():
            return self._bad(file_index, row, self.columns.prompt, "empty_problem", "problem text is empty")
        if answer is None or not str(answer).strip():
            return self._bad(file_index, row, self.columns.answer, "empty_answer", "answer is empty")
        num_placeholders = str(problem).count(IMAGE_PLACEHOLDER)
        if num_placeholders not in (0, len(stored_images)):
            return self._bad(
                file_index,
                row,
                self.columns.prompt,
                "placeholder_mismatch",
                f"{num_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(stored_images)} images",
            )
        images = self._load_images(file_index, row, stored_images)
        if isinstance(images, BadRow):
            return images
        prompt_text = self._prompt_text(str(problem), len(images))
        length = self.prompt_length(prompt_text, images)
        if length > self.max_prompt_length:
            return self._bad(
                file_index,
                row,
                self.columns.prompt,
                "too_long",
                f"prompt is {length} tokens after image expansion (limit {self.max_prompt_length})",
            )
        return None

    def _prompt_text(self, problem: str, num_images: int) -> str:
        messages = build_messages(format_problem(problem, self.instruction), num_images)
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def image_token_count(self, image: Image.Image) -> int:
        """Number of image tokens the processor expands ``image`` into (patches / merge_size**2)."""
        image_processor = self.processor.image_processor
        width, height = image.size
        patches = image_processor.get_number_of_image_patches(height, width)
        return patches // (image_processor.merge_size**2)

    def prompt_length(self, prompt_text: str, images: list[Image.Image]) -> int:
        """Token count of ``prompt_text`` once each of its image placeholders is expanded."""
        text_ids = self.processor.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        return len(text_ids) + sum(self.image_token_count(image) - 1 for image in images)

    def _log_summary(self) -> None:
        kept = len(self._rows)
        if self.skipped:
            first = self.bad_rows[0].message()
            logger.warning(
                "PromptDataset: kept %d of %d rows from %d file(s); skipped %d bad rows %s (first: %s)",
                kept,
                self.num_rows_read,
                len(self.paths),
                sum(self.skipped.values()),
                dict(self.skipped),
                first,
            )
        else:
            logger.info("PromptDataset: kept all %d rows from %d file(s)", kept, len(self.paths))

    # -- items -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def source(self, index: int) -> str:
        """``"<file>:<row>"`` of good row ``index``."""
        ref = self._rows[index]
        return f"{self.paths[ref.file_index]}:{ref.row}"

    def prompt_inputs(self, index: int) -> PromptInputs:
        """Prompt text, decoded images and answer of good row ``index`` (what a rollout engine and the grader
        read); the image processor does not run (``self[index]`` adds its output)."""
        if not 0 <= index < len(self._rows):
            raise IndexError(f"PromptDataset index {index} out of range [0, {len(self._rows)})")
        ref = self._rows[index]
        problem, answer, stored_images = self._raw_row(ref.file_index, ref.row)
        images = self._load_images(ref.file_index, ref.row, stored_images)
        if isinstance(images, BadRow):  # the file changed on disk since the check
            raise BadRowError(images)
        return PromptInputs(index=index, source=self.source(index), problem=str(problem),
                            answer=str(answer).strip(), images=images,
                            prompt_text=self._prompt_text(str(problem), len(images)))

    def __getitem__(self, index: int) -> PromptSample:
        raw = self.prompt_inputs(index)
        images, prompt_text = raw.images, raw.prompt_text
        encoded = self.processor(text=[prompt_text], images=images if images else None, return_tensors="pt")
        return PromptSample(
            index=index,
            source=raw.source,
            problem=raw.problem,
            answer=raw.answer,
            images=images,
            prompt_text=prompt_text,
            input_ids=encoded["input_ids"][0],
            attention_mask=encoded["attention_mask"][0],
            pixel_values=encoded.get("pixel_values"),
            image_grid_thw=encoded.get("image_grid_thw"),
            mm_token_type_ids=encoded["mm_token_type_ids"][0] if "mm_token_type_ids" in encoded else None,
        )
