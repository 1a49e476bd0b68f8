"""Field-by-field checks between a Qwen2.5-VL HF config, a Megatron model and a checkpoint's metadata.

Every conversion and every checkpoint load calls one of these BEFORE anything is written or any tensor of
the model is touched, so that a checkpoint can never be silently loaded into (or exported for) a model of a
different shape. A mismatch raises :class:`ConfigMismatchError`, whose message lists every differing field
with both values and names where each side came from.

Three views of "the model configuration" are compared:

* :func:`hf_architecture_fields` -- the fields of an HF ``Qwen2_5_VLConfig`` that define weights or
  behaviour (shapes, norm eps, rope, tying, special token ids), as a flat ``{"text.hidden_size": ...}`` dict.
* :func:`expected_megatron_fields` -- what the Megatron language model built from that HF config must have,
  derived here directly from the HF facts (independently of the model builder).
* :func:`megatron_model_fields` -- what a built Megatron model (``GPTModel``, or ``Qwen2_5_VLModel`` with a
  ``language_model`` and a ``vision_model``, possibly wrapped in DDP) actually has.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Language-model rows are padded at most to this multiple (times TP) beyond the HF vocabulary.
VOCAB_PAD_LIMIT_MULTIPLE = 128


class ConfigMismatchError(ValueError):
    """Two model configurations disagree. ``diffs`` maps field -> (left value, right value)."""

    def __init__(
        self, diffs: Mapping[str, tuple[Any, Any]], left: str, right: str, context: str = ""
    ) -> None:
        self.diffs = dict(diffs)
        self.left = left
        self.right = right
        head = f"{context}: " if context else ""
        head += f"{len(self.diffs)} field(s) differ between {left} and {right}:"
        body = [f"  {name}: {left}={a!r} vs {right}={b!r}" for name, (a, b) in sorted(self.diffs.items())]
        super().__init__("\n".join([head, *body]))


# --------------------------------------------------------------------------------------------------
# HF side
# --------------------------------------------------------------------------------------------------


def as_hf_config(hf_config: Any) -> Any:
    """Normalize a ``Qwen2_5_VLConfig``, a flat on-disk ``config.json`` dict, or a nested ``to_dict()``."""
    if isinstance(hf_config, Mapping):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(**dict(hf_config))
    return hf_config


def _rope(text_cfg: Any) -> tuple[float | None, list[int] | None]:
    params = getattr(text_cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(text_cfg, "rope_theta", None))
    section = params.get("mrope_section")
    if section is None:
        legacy = getattr(text_cfg, "rope_scaling", None) or {}
        section = legacy.get("mrope_section")
    return (float(theta) if theta is not None else None), (list(section) if section is not None else None)


def hf_architecture_fields(hf_config: Any) -> dict[str, Any]:
    """The weight- and behaviour-defining fields of a Qwen2.5-VL HF config, flat and JSON-friendly."""
    cfg = as_hf_config(hf_config)
    text, vision = cfg.text_config, cfg.vision_config
    theta, section = _rope(text)
    fields: dict[str, Any] = {
        "model_type": getattr(cfg, "model_type", None),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "image_token_id": getattr(cfg, "image_token_id", None),
        "video_token_id": getattr(cfg, "video_token_id", None),
        "vision_start_token_id": getattr(cfg, "vision_start_token_id", None),
        "vision_end_token_id": getattr(cfg, "vision_end_token_id", None),
        "text.vocab_size": text.vocab_size,
        "text.hidden_size": text.hidden_size,
        "text.intermediate_size": text.intermediate_size,
        "text.num_hidden_layers": text.num_hidden_layers,
        "text.num_attention_heads": text.num_attention_heads,
        "text.num_key_value_heads": text.num_key_value_heads,
        "text.hidden_act": text.hidden_act,
        "text.rms_norm_eps": float(text.rms_norm_eps),
        "text.rope_theta": theta,
        "text.mrope_section": section,
        "vision.depth": vision.depth,
        "vision.hidden_size": vision.hidden_size,
        "vision.intermediate_size": vision.intermediate_size,
        "vision.num_heads": vision.num_heads,
        "vision.hidden_act": vision.hidden_act,
        "vision.in_channels": getattr(vision, "in_channels", getattr(vision, "in_chans", None)),
        "vision.patch_size": vision.patch_size,
        "vision.temporal_patch_size": vision.temporal_patch_size,
        "vision.spatial_merge_size": vision.spatial_merge_size,
        "vision.out_hidden_size": vision.out_hidden_size,
        "vision.window_size": vision.window_size,
        "vision.fullatt_block_indexes": list(vision.fullatt_block_indexes),
    }
    return fields


def _diff(left: Mapping[str, Any], right: Mapping[str, Any], keys: list[str] | None = None) -> dict:
    names = keys if keys is not None else sorted(set(left) | set(right))
    out = {}
    for name in names:
        a, b = left.get(name, "<absent>"), right.get(name, "<absent>")
        if isinstance(a, float) and isinstance(b, float):
            if not math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0):
                out[name] = (a, b)
        elif a != b:
            out[name] = (a, b)
    return out


def check_hf_configs_match(
    expected: Any, actual: Any, *, expected_name: str = "expected", actual_name: str = "actual",
    context: str = "",
) -> None:
    """Raise :class:`ConfigMismatchError` if two HF configs differ in any architecture field."""
    diffs = _diff(hf_architecture_fields(expected), hf_architecture_fields(actual))
    if diffs:
        raise ConfigMismatchError(diffs, expected_name, actual_name, context)


# --------------------------------------------------------------------------------------------------
# Megatron side
# --------------------------------------------------------------------------------------------------


def expected_megatron_fields(hf_config: Any) -> dict[str, Any]:
    """The Megatron language-model fields a Qwen2.5-VL HF config implies (vocab before padding)."""
    f = hf_architecture_fields(hf_config)
    return {
        "num_layers": f["text.num_hidden_layers"],
        "hidden_size": f["text.hidden_size"],
        "num_attention_heads": f["text.num_attention_heads"],
        "num_query_groups": f["text.num_key_value_heads"],
        "ffn_hidden_size": f["text.intermediate_size"],
        "kv_channels": f["text.hidden_size"] // f["text.num_attention_heads"],
        "layernorm_epsilon": f["text.rms_norm_eps"],
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "activation": f["text.hidden_act"],
        "add_qkv_bias": True,
        "add_bias_linear": False,
        "position_embedding_type": "mrope",
        "rotary_base": f["text.rope_theta"],
        "mrope_section": f["text.mrope_section"],
        "share_embeddings_and_output_weights": f["tie_word_embeddings"],
        "vocab_size": f["text.vocab_size"],
    }


def unwrap_model(model: Any) -> Any:
    """Strip DDP / Float16Module wrappers (``.module``) and take the first chunk of a list of chunks."""
    if isinstance(model, list | tuple):
        if not model:
            raise ValueError("empty list of model chunks")
        model = model[0]
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def language_model_of(model: Any) -> Any:
    """The Megatron ``GPTModel`` inside ``model`` (itself, or its ``language_model``)."""
    model = unwrap_model(model)
    return getattr(model, "language_model", None) or model


def vision_model_of(model: Any) -> Any | None:
    """The (transformers) vision tower inside ``model``, or ``None`` (plain GPTModel, later PP stages)."""
    return getattr(unwrap_model(model), "vision_model", None)


def _activation_name(fn: Any) -> str:
    name = getattr(fn, "__name__", type(fn).__name__).lower()
    return {"silu": "silu", "swish": "silu", "gelu": "gelu"}.get(name, name)


def megatron_model_fields(model: Any) -> dict[str, Any]:
    """The fields of a built Megatron model comparable with :func:`expected_megatron_fields`."""
    lm = language_model_of(model)
    cfg = lm.config
    rotary_base = getattr(lm, "rotary_base", None)
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups or cfg.num_attention_heads,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "kv_channels": cfg.kv_channels,
        "layernorm_epsilon": float(cfg.layernorm_epsilon),
        "normalization": cfg.normalization,
        "gated_linear_unit": bool(cfg.gated_linear_unit),
        "activation": _activation_name(cfg.activation_func),
        "add_qkv_bias": bool(cfg.add_qkv_bias),
        "add_bias_linear": bool(cfg.add_bias_linear),
        "position_embedding_type": getattr(lm, "position_embedding_type", None),
        "rotary_base": float(rotary_base) if rotary_base is not None else None,
        "mrope_section": list(cfg.mrope_section) if getattr(cfg, "mrope_section", None) else None,
        "share_embeddings_and_output_weights": bool(lm.share_embeddings_and_output_weights),
        "vocab_size": int(lm.vocab_size),
    }


def vocab_size_acceptable(hf_vocab: int, megatron_vocab: int, tp: int) -> bool:
    """Megatron rows may pad the HF vocabulary (divisible by TP), never shrink it or pad beyond reason."""
    limit = hf_vocab + VOCAB_PAD_LIMIT_MULTIPLE * max(tp, 1)
    return hf_vocab <= megatron_vocab < limit and megatron_vocab % max(tp, 1) == 0


def check_model_matches_hf(model: Any, hf_config: Any, *, context: str = "") -> None:
    """Raise :class:`ConfigMismatchError` if a built Megatron model does not implement ``hf_config``.

    Compares the language model field by field (vocabulary: padding up to ``VOCAB_PAD_LIMIT_MULTIPLE`` x TP
    rows is accepted) and, when the model holds a vision tower, the tower's HF config.
    """
    expected = expected_megatron_fields(hf_config)
    actual = megatron_model_fields(model)
    tp = language_model_of(model).config.tensor_model_parallel_size
    diffs = _diff(expected, actual, [k for k in expected if k != "vocab_size"])
    if not vocab_size_acceptable(expected["vocab_size"], actual["vocab_size"], tp):
        diffs["vocab_size"] = (expected["vocab_size"], actual["vocab_size"])
    vision = vision_model_of(model)
    if vision is not None and getattr(vision, "config", None) is not None:
        want = {k: v for k, v in hf_architecture_fields(hf_config).items() if k.startswith("vision.")}
        have = _vision_fields(vision.config)
        diffs.update(_diff(want, have))
    if diffs:
        raise ConfigMismatchError(diffs, "HF config", "Megatron model", context)


def _vision_fields(vision_cfg: Any) -> dict[str, Any]:
    return {
        "vision.depth": vision_cfg.depth,
        "vision.hidden_size": vision_cfg.hidden_size,
        "vision.intermediate_size": vision_cfg.intermediate_size,
        "vision.num_heads": vision_cfg.num_heads,
        "vision.hidden_act": vision_cfg.hidden_act,
        "vision.in_channels": getattr(vision_cfg, "in_channels", getattr(vision_cfg, "in_chans", None)),
        "vision.patch_size": vision_cfg.patch_size,
        "vision.temporal_patch_size": vision_cfg.temporal_patch_size,
        "vision.spatial_merge_size": vision_cfg.spatial_merge_size,
        "vision.out_hidden_size": vision_cfg.out_hidden_size,
        "vision.window_size": vision_cfg.window_size,
        "vision.fullatt_block_indexes": list(vision_cfg.fullatt_block_indexes),
    }


def check_recorded_megatron_fields(recorded: Mapping[str, Any], model: Any, *, context: str = "") -> None:
    """Raise if the Megatron fields recorded in a checkpoint differ from the target model's (vocab exact)."""
    diffs = _diff(dict(recorded), megatron_model_fields(model))
    if diffs:
        raise ConfigMismatchError(diffs, "checkpoint", "target model", context)


__all__ = [
    "ConfigMismatchError",
    "as_hf_config",
    "check_hf_configs_match",
    "check_model_matches_hf",
    "check_recorded_megatron_fields",
    "expected_megatron_fields",
    "hf_architecture_fields",
    "language_model_of",
    "megatron_model_fields",
    "unwrap_model",
    "vision_model_of",
    "vocab_size_acceptable",
]
