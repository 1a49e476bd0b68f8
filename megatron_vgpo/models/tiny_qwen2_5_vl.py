"""Randomly initialised Qwen2.5-VL checkpoints of the real architecture, small enough for 2 CPU cores.

:func:`build_tiny_checkpoint` writes a complete Hugging Face folder (config, safetensors with the on-disk
names ``visual.*``, ``model.layers.*``, ``model.embed_tokens.weight``, ``lm_head.weight`` when untied,
generation config, tokenizer, chat template, processor configs) that
``Qwen2_5_VLForConditionalGeneration`` / ``AutoModelForImageTextToText`` and ``AutoProcessor`` load offline.
Weights depend only on (preset, seed, tokenizer, dtype): the same arguments give byte-identical safetensors.

Presets (:data:`PRESETS`):

- ``tiny``: the default job's model (text hidden 128, 2 layers, 4 heads / 2 KV heads, MLP 256, tied
  embeddings; vision depth 1, hidden 64, 2 heads). An 84x84 image stays 84x84: 6x6 patches of 14 -> 9 tokens.
- ``small``: parity coverage for the Megatron model: untied embeddings, GQA ratio 3 (12 heads / 4 KV heads,
  so TP 1/2/4 all divide the KV heads), 4 text layers (PP 2/4), vision depth 4 with windowed blocks 0 and 2
  and full-attention blocks 1 and 3; window 56 px, so a 112x112 image (4x4 merged patches) is split into
  four 2x2 windows, and a 140x140 image (5x5) into padded windows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from megatron_vgpo.models.tokenizers import TOKENIZER_KINDS, TokenizerKind, build_tokenizer, special_token_ids

logger = logging.getLogger(__name__)

BUILD_INFO_FILE = "tiny_model_build.json"  # provenance of a generated folder (preset, seed, sizes)
QWEN2_5_VL_VOCAB_SIZE = 151936  # embedding rows of the released Qwen2.5-VL checkpoints (151,665 tokens used)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files this builder writes at the top level of a folder; only these are removed by overwrite=True.
_CHECKPOINT_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt")


@dataclass(frozen=True)
class TinyQwen25VLSizes:
    """Sizes of one preset. Text widths are per model (not per TP rank); pixel bounds are in pixels.

    ``mrope_section`` splits the rotary half-dimension (``head_dim // 2``) into temporal/height/width parts.
    ``fullatt_block_indexes`` lists the vision blocks with full attention; the others attend within windows
    of ``window_size`` x ``window_size`` pixels. ``min_pixels``/``max_pixels`` bound the image processor's
    resize (images are resized to multiples of ``patch_size * spatial_merge_size``).
    """

    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate_size: int
    tie_word_embeddings: bool
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_hidden_size: int
    vision_heads: int
    vision_intermediate_size: int
    fullatt_block_indexes: tuple[int, ...]
    window_size: int
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 256
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    vocab_multiple: int = (
        64  # the config's vocab_size is len(tokenizer) rounded up to this (like Qwen's padding)
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.text_hidden_size % self.text_heads:
            problems.append(
                f"text_hidden_size {self.text_hidden_size} not divisible by text_heads {self.text_heads}"
            )
        elif sum(self.mrope_section) * 2 != self.text_hidden_size // self.text_heads:
            problems.append(
                f"mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}, "
                f"expected head_dim/2 = {self.text_hidden_size // self.text_heads // 2}"
            )
        if self.text_heads % self.text_kv_heads:
            problems.append(
                f"text_heads {self.text_heads} not divisible by text_kv_heads {self.text_kv_heads}"
            )
        if self.vision_hidden_size % self.vision_heads:
            problems.append(
                f"vision_hidden_size {self.vision_hidden_size} not divisible by {self.vision_heads} heads"
            )
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            problems.append(f"window_size {self.window_size} not a multiple of patch_size*spatial_merge_size")
        if any(not 0 <= index < self.vision_depth for index in self.fullatt_block_indexes):
            problems.append(
                f"fullatt_block_indexes {self.fullatt_block_indexes} outside depth {self.vision_depth}"
            )
        if problems:
            raise ValueError("invalid TinyQwen25VLSizes: " + "; ".join(problems))

    @property
    def text_head_dim(self) -> int:
        """Per-head width of the language model's attention."""
        return self.text_hidden_size // self.text_heads

    @property
    def image_factor(self) -> int:
        """Image sides are resized to multiples of this many pixels (one merged patch)."""
        return self.patch_size * self.spatial_merge_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image-pad tokens for an image whose side lengths are already multiples of :attr:`image_factor`
        and whose area lies within [min_pixels, max_pixels] (so the processor does not resize it)."""
        if height % self.image_factor or width % self.image_factor:
            raise ValueError(f"{height}x{width} is not a multiple of {self.image_factor} pixels per side")
        if not self.min_pixels <= height * width <= self.max_pixels:
            raise ValueError(f"{height}x{width} lies outside [{self.min_pixels}, {self.max_pixels}] pixels")
        return (height // self.image_factor) * (width // self.image_factor)


PRESETS: dict[str, TinyQwen25VLSizes] = {
    "tiny": TinyQwen25VLSizes(
        text_hidden_size=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate_size=256,
        tie_word_embeddings=True,
        mrope_section=(4, 6, 6),
        vision_depth=1,
        vision_hidden_size=64,
        vision_heads=2,
        vision_intermediate_size=128,
        fullatt_block_indexes=(0,),
        window_size=112,
    ),
    "small": TinyQwen25VLSizes(
        text_hidden_size=384,
        text_layers=4,
        text_heads=12,
        text_kv_heads=4,
        text_intermediate_size=768,
        tie_word_embeddings=False,
        mrope_section=(4, 6, 6),
        vision_depth=4,
        vision_hidden_size=128,
        vision_heads=4,
        vision_intermediate_size=256,
        fullatt_block_indexes=(1, 3),
        window_size=56,
    ),
}


def padded_vocab_size(num_tokens: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``num_tokens`` (the embedding table's row count)."""
    return int(math.ceil(num_tokens / multiple) * multiple)


def default_vocab_size(tokenizer_kind: str, tokenizer_length: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer: 151,936 (as released) for the real Qwen vocabulary, else
    ``tokenizer_length`` rounded up to ``multiple`` (padded rows, like the released checkpoints have)."""
    if tokenizer_kind == "qwen":
        return max(QWEN2_5_VL_VOCAB_SIZE, tokenizer_length)
    return padded_vocab_size(tokenizer_length, multiple)


def make_config(
    sizes: TinyQwen25VLSizes,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str = "float32",
    vocab_size: int | None = None,
) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL config for ``sizes`` whose vocabulary size and token ids agree with ``tokenizer``.

    ``vocab_size`` (embedding rows) defaults to ``len(tokenizer)`` rounded up to ``sizes.vocab_multiple``;
    it must be >= ``len(tokenizer)``.
    """
    ids = special_token_ids(tokenizer)
    if vocab_size is None:
        vocab_size = padded_vocab_size(len(tokenizer), sizes.vocab_multiple)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": sizes.text_hidden_size,
        "intermediate_size": sizes.text_intermediate_size,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": sizes.text_heads,
        "num_key_value_heads": sizes.text_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": sizes.max_position_embeddings,
        "rms_norm_eps": sizes.rms_norm_eps,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": sizes.rope_theta,
            "mrope_section": list(sizes.mrope_section),
        },
        "use_sliding_window": False,
        "max_window_layers": sizes.text_layers,
        "attention_dropout": 0.0,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "dtype": dtype,
    }
    vision_config = {
        "depth": sizes.vision_depth,
        "hidden_size": sizes.vision_hidden_size,
        "intermediate_size": sizes.vision_intermediate_size,
        "num_heads": sizes.vision_heads,
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": sizes.patch_size,
        "spatial_merge_size": sizes.spatial_merge_size,
        "temporal_patch_size": sizes.temporal_patch_size,
        "window_size": sizes.window_size,
        "fullatt_block_indexes": list(sizes.fullatt_block_indexes),
        "out_hidden_size": sizes.text_hidden_size,
        "tokens_per_second": 2,
        "dtype": dtype,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids.image_pad,
        video_token_id=ids.video_pad,
        vision_start_token_id=ids.vision_start,
        vision_end_token_id=ids.vision_end,
        tie_word_embeddings=sizes.tie_word_embeddings,
        dtype=dtype,
    )


def make_processor(sizes: TinyQwen25VLSizes, tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLProcessor:
    """The stock Qwen2.5-VL processor (Qwen2-VL image/video processors) for ``sizes`` and ``tokenizer``."""
    vision_kwargs = {
        "min_pixels": sizes.min_pixels,
        "max_pixels": sizes.max_pixels,
        "patch_size": sizes.patch_size,
        "merge_size": sizes.spatial_merge_size,
        "temporal_patch_size": sizes.temporal_patch_size,
    }
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**vision_kwargs),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**vision_kwargs),
        chat_template=tokenizer.chat_template,
    )


def make_generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Generation defaults like Qwen2.5-VL's ids (stop at ``<|im_end|>`` or ``<|endoftext|>``), no sampling
    settings: callers (rollout engines, tests) choose temperature/top-p themselves."""
    ids = special_token_ids(tokenizer)
    return GenerationConfig(
        bos_token_id=ids.bos, eos_token_id=[ids.im_end, ids.endoftext], pad_token_id=ids.pad
    )


def init_random_model(
    config: Qwen2_5_VLConfig, seed: int, dtype: str = "float32"
) -> Qwen2_5_VLForConditionalGeneration:
    """Build the model with transformers' own initialisation, drawn from a private RNG seeded by ``seed``
    (the caller's global torch RNG state is left untouched). Returned in ``dtype``, in eval mode, on CPU."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; expected one of {sorted(_DTYPES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.to(_DTYPES[dtype]).eval()


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a folder")
    existing = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} is not empty ({existing[:5]}...); pass overwrite=True (CLI: --overwrite) to replace "
            "the checkpoint files in it"
        )
    for name in existing:
        path = out_dir / name
        if path.is_file() and name.endswith(_CHECKPOINT_FILE_SUFFIXES):
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def build_tiny_checkpoint(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    seed: int = 0,
    tokenizer: TokenizerKind = "bpe",
    dtype: str = "float32",
    vocab_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete, randomly initialised Qwen2.5-VL Hugging Face checkpoint folder; return its path.

    Args:
        out_dir: folder to create (must be empty or absent unless ``overwrite``).
        preset: a key of :data:`PRESETS` (``"tiny"`` or ``"small"``).
        seed: seeds the weights only (the tokenizer does not depend on it). Same arguments -> byte-identical
            ``model.safetensors``.
        tokenizer: ``"bpe"`` (small local BPE, ~430 tokens) or ``"qwen"`` (real 151,669-token vocabulary).
        dtype: stored weight dtype (``float32`` default, ``bfloat16`` or ``float16``).
        vocab_size: embedding rows; default 151,936 for ``"qwen"`` (as released), else the tokenizer length
            rounded up to a multiple of 64 (448 for ``"bpe"``).
        overwrite: replace the checkpoint files (``*.safetensors``, ``*.json``, ``*.jinja``, ``*.txt``) of an
            existing folder.

    The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer
    (``tokenizer.json``, ``tokenizer_config.json``), ``chat_template.jinja``, ``processor_config.json``
    (image/video processor settings) and ``tiny_model_build.json`` (preset, seed, tokenizer, sizes).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; expected one of {sorted(_DTYPES)}")
    if tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZER_KINDS}")
    sizes = PRESETS[preset]
    out_path = Path(out_dir)
    _prepare_out_dir(out_path, overwrite)
    started = time.perf_counter()

    text_tokenizer = build_tokenizer(tokenizer)
    if vocab_size is None:
        vocab_size = default_vocab_size(tokenizer, len(text_tokenizer), sizes.vocab_multiple)
    config = make_config(sizes, text_tokenizer, dtype, vocab_size)
    model = init_random_model(config, seed, dtype)
    model.generation_config = make_generation_config(text_tokenizer)
    model.save_pretrained(out_path)
    make_processor(sizes, text_tokenizer).save_pretrained(out_path)

    num_parameters = sum(p.numel() for p in model.parameters())
    build_info = {
        "builder": "megatron_vgpo.models.tiny_qwen2_5_vl.build_tiny_checkpoint",
        "preset": preset,
        "seed": seed,
        "tokenizer": tokenizer,
        "dtype": dtype,
        "num_parameters": num_parameters,
        "tokenizer_length": len(text_tokenizer),
        "vocab_size": config.text_config.vocab_size,
        "sizes": dataclasses.asdict(sizes),
    }
    (out_path / BUILD_INFO_FILE).write_text(json.dumps(build_info, indent=2, sort_keys=True) + "\n")
    logger.info(
        "built Qwen2.5-VL preset=%s seed=%d tokenizer=%s (%d parameters, vocab %d) in %.2f s at %s",
        preset,
        seed,
        tokenizer,
        num_parameters,
        config.text_config.vocab_size,
        time.perf_counter() - started,
        out_path,
    )
    return out_path
