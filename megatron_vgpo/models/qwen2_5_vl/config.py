"""From a Hugging Face ``Qwen2_5_VLConfig`` to Megatron-Core's ``TransformerConfig`` and layer spec.

Everything that decides *how* the Megatron language model is shaped lives here, so that the model builder
(:mod:`.model`) and the weight mapping (:mod:`megatron_vgpo.checkpoint.hf_mapping`) agree:

* :func:`transformer_config_from_hf` -- the ``TransformerConfig`` (RMSNorm, SwiGLU, GQA, QKV bias only,
  M-RoPE sections, no dropout); TP/PP sizes come from Megatron's parallel state.
* :func:`megatron_vocab_size` -- embedding/output rows in Megatron: the HF ``vocab_size`` rounded up to a
  multiple of TP only (usually equal to it; see the function for why we never pad further).
* :func:`use_te_spec` / :func:`layer_spec` -- the Transformer-Engine spec when TE imports (GPU), else the
  local (pure torch) spec. The two name their norms differently; the mapping asks :func:`use_te_spec`.
* :func:`check_supported` -- refuses, naming the field, HF configs this model cannot represent.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class UnsupportedConfigError(ValueError):
    """The HF config (or its combination with the parallel layout) cannot be represented; names the field."""


def text_rope(hf_config: Any) -> tuple[float, list[int], str]:
    """``(rope_theta, mrope_section, rope_type)`` of the text config (transformers 5 ``rope_parameters``,
    falling back to the 4.x ``rope_theta`` / ``rope_scaling`` attributes)."""
    text = hf_config.text_config
    params = dict(getattr(text, "rope_parameters", None) or {})
    legacy = dict(getattr(text, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(text, "rope_theta", None))
    section = params.get("mrope_section", legacy.get("mrope_section"))
    rope_type = params.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
    if theta is None:
        raise UnsupportedConfigError("text_config.rope_parameters.rope_theta is missing")
    if section is None:
        raise UnsupportedConfigError("text_config.rope_parameters.mrope_section is missing (M-RoPE needs it)")
    return float(theta), [int(x) for x in section], str(rope_type)


def head_dim(hf_config: Any) -> int:
    """Per-head width of the language model's attention."""
    text = hf_config.text_config
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def check_supported(hf_config: Any, *, tp: int = 1, pp: int = 1) -> None:
    """Raise :class:`UnsupportedConfigError` naming every field that this Megatron model cannot represent
    (alone or at tensor-parallel size ``tp`` and pipeline size ``pp``)."""
    text, vision = hf_config.text_config, hf_config.vision_config
    problems: list[str] = []
    _, section, rope_type = text_rope(hf_config)
    if rope_type not in ("default", "mrope"):
        problems.append(f"text_config.rope_parameters.rope_type={rope_type!r} (only 'default' M-RoPE)")
    if text.hidden_size % text.num_attention_heads:
        problems.append(f"text_config.hidden_size={text.hidden_size} not divisible by num_attention_heads")
    if head_dim(hf_config) * text.num_attention_heads != text.hidden_size:
        problems.append(f"text_config.head_dim={head_dim(hf_config)} != hidden_size / num_attention_heads")
    if sum(section) * 2 != head_dim(hf_config):
        problems.append(f"text_config mrope_section={section} sums to {sum(section)}, need head_dim/2")
    if text.num_attention_heads % text.num_key_value_heads:
        problems.append("text_config.num_attention_heads not divisible by num_key_value_heads")
    if getattr(text, "use_sliding_window", False):
        problems.append("text_config.use_sliding_window=True (sliding-window attention is not implemented)")
    if text.hidden_act != "silu":
        problems.append(f"text_config.hidden_act={text.hidden_act!r} (only 'silu' / SwiGLU)")
    if getattr(vision, "out_hidden_size", text.hidden_size) != text.hidden_size:
        problems.append(
            f"vision_config.out_hidden_size={vision.out_hidden_size} != "
            f"text_config.hidden_size={text.hidden_size}"
        )
    if text.num_key_value_heads % tp:
        problems.append(
            f"text_config.num_key_value_heads={text.num_key_value_heads} not divisible by TP={tp}"
        )
    if text.num_attention_heads % tp:
        problems.append(
            f"text_config.num_attention_heads={text.num_attention_heads} not divisible by TP={tp}"
        )
    if text.intermediate_size % tp:
        problems.append(f"text_config.intermediate_size={text.intermediate_size} not divisible by TP={tp}")
    if text.num_hidden_layers % pp:
        problems.append(f"text_config.num_hidden_layers={text.num_hidden_layers} not divisible by PP={pp}")
    if problems:
        raise UnsupportedConfigError("unsupported Qwen2.5-VL config: " + "; ".join(problems))


def megatron_vocab_size(hf_vocab_size: int, tp: int) -> int:
    """Rows of the Megatron embedding / output layer for an HF vocabulary of ``hf_vocab_size`` at TP ``tp``.

    Vocab-parallel layers need the row count divisible by TP, so it is rounded up to a multiple of ``tp``
    and no further (Megatron-LM's usual 128 x TP padding is NOT applied): every padded row would add a logit
    of 0 to each softmax and shift log-probs away from the HF/SGLang model's. Qwen's released vocabularies
    (151,936) and the tiny presets (multiples of 64) need no padding at TP <= 64. When padding does happen
    the padded rows are zero (import) and dropped (export), and consumers must ignore logit columns
    ``>= hf_vocab_size`` (see :attr:`Qwen2_5_VLModel.hf_vocab_size`).
    """
    return int(math.ceil(hf_vocab_size / tp) * tp)


@functools.lru_cache(maxsize=1)
def use_te_spec() -> bool:
    """True when Transformer Engine imports (then the TE layer spec is used); False on CPU machines."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:
        logger.info("transformer_engine unavailable (%s): using the local layer spec", exc)
        return False
    return True


def layer_spec(te: bool | None = None) -> Any:
    """The GPT decoder-layer ``ModuleSpec``: TE when ``te`` (default :func:`use_te_spec`), else local."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te_spec() if te is None else te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


RECOMPUTE_MODES = ("none", "selective", "full")


def recompute_kwargs(recompute: str) -> dict[str, Any]:
    """``TransformerConfig`` activation-recompute fields for ``recompute`` in :data:`RECOMPUTE_MODES`.

    ``selective``: Megatron's selective recompute (its default module list: core attention) -- the
    attention scores/probabilities are recomputed in the backward instead of kept; ``full``: every decoder
    layer keeps only its input and is recomputed in the backward (``recompute_method="uniform"``,
    ``recompute_num_layers=1``: each layer is its own checkpoint). ``none``: nothing recomputed.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def transformer_config_from_hf(
    hf_config: Any,
    *,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    recompute: str = "none",
) -> Any:
    """Megatron ``TransformerConfig`` of the Qwen2.5-VL language model described by ``hf_config``.

    TP and PP sizes are read from Megatron's parallel state (which must be initialized). ``params_dtype``
    is also the pipeline p2p dtype; bf16/fp16 set Megatron's matching flags (bf16 compute in the decoder;
    the log-prob / entropy / focus paths upcast to fp32). ``recompute``: see :func:`recompute_kwargs`.
    Dropout is off (Qwen2.5-VL has none). Raises :class:`UnsupportedConfigError` for configs
    :func:`check_supported` refuses.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    check_supported(hf_config, tp=tp, pp=pp)
    if sequence_parallel and tp == 1:
        logger.info("sequence_parallel requested at TP=1: ignored")
        sequence_parallel = False
    text = hf_config.text_config
    return TransformerConfig(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads,
        ffn_hidden_size=text.intermediate_size,
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=float(text.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        mrope_section=text_rope(hf_config)[1],
        **recompute_kwargs(recompute),
    )


__all__ = [
    "RECOMPUTE_MODES",
    "UnsupportedConfigError",
    "check_supported",
    "head_dim",
    "layer_spec",
    "megatron_vocab_size",
    "recompute_kwargs",
    "text_rope",
    "transformer_config_from_hf",
    "use_te_spec",
]
