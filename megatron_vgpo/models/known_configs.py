"""Hugging Face configurations of the released Qwen2.5-VL models, written from published facts.

No model hub is reachable from the machines this project is developed on, so the ``config.json`` of each
released checkpoint is written out here, field by field, in the on-disk (flat) form the Qwen team published
(text fields at the top level, ``vision_config`` nested, ``rope_scaling = {"type": "mrope", ...}``).
They are used for planning (memory per GPU, parameter counts per rank on the meta device) and for the
scale-on-paper tests; no weights are involved.

Where each number comes from:

* Common to all sizes (published ``config.json`` of Qwen2.5-VL-3B/7B/32B-Instruct and the defaults of
  ``transformers.Qwen2_5_VLVisionConfig``): vision tower depth 32, hidden 1280, MLP 3420 (SwiGLU with
  biases), 16 heads, patch 14, temporal patch 2, spatial merge 2, ``window_size`` 112,
  ``fullatt_block_indexes`` [7, 15, 23, 31]; ``out_hidden_size`` equals the language model's hidden size;
  rope theta 1e6; M-RoPE sections [16, 24, 24]; RMSNorm eps 1e-6; special token ids (bos 151643, eos
  151645, vision start/end 151652/151653, image 151655, video 151656).
* 3B: the published ``config.json`` (hidden 2048, MLP 11008, 36 layers, 16 heads, 2 KV heads, vocab
  151936, tied embeddings, ``max_window_layers`` 70).
* 7B: hidden 3584, MLP 18944, 28 layers, 28 heads, 4 KV heads (the published module print shows q/k/v
  3584/512/512 and ``Embedding(152064, 3584)``), vocab 152064, untied embeddings.
* 32B: the Qwen2.5-32B language model (64 layers, 40 query and 8 KV heads per its model card; hidden 5120,
  MLP 27648, vocab 152064, untied) under the same vision tower with ``out_hidden_size`` 5120.

Note on the vocabulary: only the 3B model uses 151936 rows; 7B and 32B use 152064 (the default of
``Qwen2_5_VLTextConfig`` in transformers, taken from the larger checkpoints). Both are multiples of 128.
The tokenizer has 151665 entries, so the extra rows are padding that the checkpoints themselves carry.

Public API: :data:`KNOWN_MODELS`, :func:`known_config_dict`, :func:`load_hf_config`.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_VISION_COMMON: dict[str, Any] = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}

_TEXT_COMMON: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}

# Per-size fields: (language model shape, vocabulary, tying, max_window_layers).
_SIZES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-3b": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_window_layers": 70,
    },
    "qwen2.5-vl-7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "max_window_layers": 28,
    },
    "qwen2.5-vl-32b": {
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "max_window_layers": 64,
    },
}

#: Names accepted by :func:`known_config_dict` and :func:`load_hf_config`.
KNOWN_MODELS: tuple[str, ...] = tuple(_SIZES)

_ALIASES = {
    "qwen/qwen2.5-vl-3b-instruct": "qwen2.5-vl-3b",
    "qwen/qwen2.5-vl-7b-instruct": "qwen2.5-vl-7b",
    "qwen/qwen2.5-vl-32b-instruct": "qwen2.5-vl-32b",
}


def _canonical(name: str) -> str | None:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in _SIZES else None


def known_config_dict(name: str) -> dict[str, Any]:
    """The published ``config.json`` (flat on-disk form) of a released Qwen2.5-VL size.

    Args:
        name: one of :data:`KNOWN_MODELS` (``qwen2.5-vl-3b``, ``qwen2.5-vl-7b``, ``qwen2.5-vl-32b``) or
            the hub id (``Qwen/Qwen2.5-VL-7B-Instruct``), case-insensitive.

    Raises:
        KeyError: for an unknown name (the message lists the known ones).
    """
    key = _canonical(name)
    if key is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    size = _SIZES[key]
    out = copy.deepcopy(_TEXT_COMMON)
    out.update(copy.deepcopy(size))
    vision = copy.deepcopy(_VISION_COMMON)
    vision["out_hidden_size"] = size["hidden_size"]
    out["vision_config"] = vision
    return out


def load_hf_config(model: str | Path) -> Any:
    """A ``transformers.Qwen2_5_VLConfig`` from a known model name or from an HF folder's ``config.json``.

    Args:
        model: a name from :data:`KNOWN_MODELS` (or its hub id), or a folder holding ``config.json``
            (or the path of that file).

    Raises:
        FileNotFoundError: when ``model`` is neither a known name nor a path to a config.
        ValueError: when the config is not a Qwen2.5-VL config.
    """
    from transformers import Qwen2_5_VLConfig

    if isinstance(model, str) and _canonical(model) is not None:
        return Qwen2_5_VLConfig(**known_config_dict(model))
    path = Path(model)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{model!s} is neither a known model ({', '.join(KNOWN_MODELS)}) nor a folder with config.json"
        )
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"{cfg_path}: model_type is {raw.get('model_type')!r}, expected 'qwen2_5_vl'")
    return Qwen2_5_VLConfig(**raw)


__all__ = ["KNOWN_MODELS", "known_config_dict", "load_hf_config"]
