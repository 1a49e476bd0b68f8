"""Shared pytest fixtures: random Qwen2.5-VL Hugging Face checkpoints built once per test session.

- ``tiny_hf_dir``: preset ``tiny`` (tied embeddings, 0.57M parameters), local BPE tokenizer, seed 0.
- ``small_hf_dir``: preset ``small`` (untied, GQA 3, windowed + full-attention vision blocks), BPE, seed 0.
- ``qwen_vocab_hf_dir``: preset ``tiny`` with the real 151,669-token Qwen vocabulary (about 80 MB, ~1.5 s).

Each is a folder that ``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained``
load offline; treat it as read-only (copy it before changing anything). Building happens lazily, only for
the fixtures a session requests. The hub is switched off for the whole test session (``HF_HUB_OFFLINE``), and
the collective audit of ``megatron_vgpo.distributed.comm`` is on in every process the tests start (each
subprocess and torchrun rank inherits ``MEGATRON_VGPO_COLLECTIVE_AUDIT=1``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MEGATRON_VGPO_COLLECTIVE_AUDIT", "1")


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, **options: object) -> Path:
    from megatron_vgpo.models.tiny_qwen2_5_vl import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("hf_checkpoints") / name, **options)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the ``tiny`` preset checkpoint (BPE tokenizer, seed 0)."""
    return _build(tmp_path_factory, "tiny_bpe_seed0", preset="tiny", seed=0, tokenizer="bpe")


@pytest.fixture(scope="session")
def small_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the ``small`` preset checkpoint (BPE tokenizer, seed 0)."""
    return _build(tmp_path_factory, "small_bpe_seed0", preset="small", seed=0, tokenizer="bpe")


@pytest.fixture(scope="session")
def qwen_vocab_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the ``tiny`` preset checkpoint with the real Qwen vocabulary (seed 0)."""
    return _build(tmp_path_factory, "tiny_qwen_seed0", preset="tiny", seed=0, tokenizer="qwen")
