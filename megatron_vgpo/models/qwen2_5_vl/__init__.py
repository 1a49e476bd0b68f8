"""Qwen2.5-VL on Megatron-Core (TP/SP/PP): transformers' vision tower + Megatron ``GPTModel`` with M-RoPE.

Public API:

* :class:`Qwen2_5_VLModel`, :func:`build_model`, :func:`allreduce_vision_grads` (:mod:`.model`);
* :func:`transformer_config_from_hf`, :func:`megatron_vocab_size`, :func:`use_te_spec`,
  :class:`UnsupportedConfigError` (:mod:`.config`);
* :func:`mrope_position_ids` (:mod:`.rope_index`);
* HF <-> Megatron weights: :mod:`megatron_vgpo.checkpoint.hf_mapping`.
"""

from megatron_vgpo.models.qwen2_5_vl.config import (
    UnsupportedConfigError,
    check_supported,
    megatron_vocab_size,
    transformer_config_from_hf,
    use_te_spec,
)
from megatron_vgpo.models.qwen2_5_vl.model import (
    ImageTokenMismatchError,
    Qwen2_5_VLModel,
    allreduce_vision_grads,
    build_model,
)
from megatron_vgpo.models.qwen2_5_vl.rope_index import mrope_position_ids

__all__ = [
    "ImageTokenMismatchError",
    "Qwen2_5_VLModel",
    "UnsupportedConfigError",
    "allreduce_vision_grads",
    "build_model",
    "check_supported",
    "megatron_vocab_size",
    "mrope_position_ids",
    "transformer_config_from_hf",
    "use_te_spec",
]
