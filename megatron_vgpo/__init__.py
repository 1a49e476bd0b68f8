"""megatron_vgpo: RL post-training (GRPO, DAPO, VGPO) of Qwen2.5-VL on Megatron-Core with SGLang rollouts."""

__version__ = "0.1.0"
