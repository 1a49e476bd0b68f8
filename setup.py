"""megatron_vgpo: RL post-training (GRPO, DAPO, VGPO) of Qwen2.5-VL on Megatron-Core with SGLang rollouts.

Pinned, tested versions live in requirements/*.txt and are installed by scripts/setup_env.sh (the order
matters: torch first, SGLang without its CUDA-only dependencies, then everything else in one resolve).
The ranges below are what the package itself needs at import time.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_vgpo",
    version="0.1.0",
    description="Visually-Guided Policy Optimization (and GRPO/DAPO) for Qwen2.5-VL on Megatron-Core + SGLang",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_vgpo", "megatron_vgpo.*"]),
    include_package_data=True,
    package_data={"megatron_vgpo": ["platform/sgl_kernel_standin/**/*", "data/templates/*"]},
    install_requires=[
        "torch>=2.9",
        "torchvision",
        "megatron-core>=0.16.1",
        "transformers>=5.0,<6",
        "math-verify",
        "mathruler",
        "pylatexenc",
        "sympy",
        "pyarrow",
        "pillow",
        "pyyaml",
        "tensorboard",
        "tqdm",
        "psutil",
        "safetensors",
        "tokenizers",
    ],
    extras_require={
        "rollout": ["sglang==0.5.23", "requests"],
        "cluster": ["nemo-run==0.11.1", "leptonai==0.27.3"],
        "gpu": ["transformer-engine[pytorch]"],
        "wandb": ["wandb"],
        "test": ["pytest", "ruff"],
    },
    entry_points={"console_scripts": ["megatron-vgpo=megatron_vgpo.cli:main"]},
)
