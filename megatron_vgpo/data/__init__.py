"""Parquet prompt datasets (ViRL39K / Geo3K / MMK12 schema), the VGPO prompt, resumable batching, and
generated visual-reasoning data (``megatron_vgpo.data.synthetic``)."""

from megatron_vgpo.data.dataset import (
    BAD_ROW_REASONS,
    BadRow,
    BadRowError,
    DatasetColumns,
    PromptDataset,
    PromptInputs,
    PromptSample,
)
from megatron_vgpo.data.images import ImageDecodeError, load_image, resize_to_pixel_bounds
from megatron_vgpo.data.prompts import (
    IMAGE_PLACEHOLDER,
    PROMPT_TEMPLATE,
    REASONING_INSTRUCTION,
    build_messages,
    format_problem,
)
from megatron_vgpo.data.sampler import PromptBatch, PromptLoader, PromptSampler, collate_prompts, iterate_once

__all__ = [
    "BAD_ROW_REASONS",
    "IMAGE_PLACEHOLDER",
    "PROMPT_TEMPLATE",
    "REASONING_INSTRUCTION",
    "BadRow",
    "BadRowError",
    "DatasetColumns",
    "ImageDecodeError",
    "PromptBatch",
    "PromptDataset",
    "PromptInputs",
    "PromptLoader",
    "PromptSample",
    "PromptSampler",
    "build_messages",
    "collate_prompts",
    "format_problem",
    "iterate_once",
    "load_image",
    "resize_to_pixel_bounds",
]
