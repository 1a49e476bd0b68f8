"""Reading Hugging Face checkpoint folders (``*.safetensors``), eagerly or lazily, for the weight mapping.

:func:`read_hf_state_dict` returns on-disk names -> CPU tensors; with ``lazy=True`` a
:class:`LazyHFCheckpoint` whose tensors are read only when indexed and whose ``shape(name)`` reads only the
file header, so that :func:`megatron_vgpo.checkpoint.hf_mapping.hf_to_megatron_shard` on a pipeline stage
reads just that stage's tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor


def read_hf_state_dict(hf_dir: str | Path, *, lazy: bool = False) -> Mapping[str, Tensor]:
    """All tensors of an HF checkpoint folder (``*.safetensors``) with their on-disk names, on CPU.

    ``lazy=True`` returns a :class:`LazyHFCheckpoint` that reads each tensor only when indexed (what a rank
    of a large model should pass to :func:`hf_to_megatron_shard` / :func:`load_hf_weights`: it then reads
    only its own stage's tensors); otherwise a plain dict with everything read.
    """
    checkpoint = LazyHFCheckpoint(hf_dir)
    return checkpoint if lazy else {name: checkpoint[name] for name in checkpoint}


class LazyHFCheckpoint(Mapping[str, Tensor]):
    """Read-only mapping over the safetensors files of an HF folder; ``shape(name)`` reads no data."""

    def __init__(self, hf_dir: str | Path) -> None:
        from safetensors import safe_open

        files = sorted(Path(hf_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {hf_dir}")
        self._file_of: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                self._file_of.update(dict.fromkeys(handle.keys(), file))

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def shape(self, name: str) -> torch.Size:
        """Shape of tensor ``name`` from the file header."""
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            return torch.Size(handle.get_slice(name).get_shape())


__all__ = ["LazyHFCheckpoint", "read_hf_state_dict"]
