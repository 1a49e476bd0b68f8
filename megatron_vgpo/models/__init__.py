"""Models: the tiny Hugging Face Qwen2.5-VL kit (random checkpoints, tokenizers) and, in ``qwen2_5_vl/``,
the Megatron-Core Qwen2.5-VL.

Import the submodules directly (``megatron_vgpo.models.tiny_qwen2_5_vl``, ``megatron_vgpo.models.tokenizers``)
so that importing this package stays cheap.
"""
