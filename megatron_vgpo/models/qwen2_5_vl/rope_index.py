"""M-RoPE position ids of Qwen2.5-VL, computed identically on every pipeline stage.

The computation is transformers' own ``Qwen2_5_VLModel.get_rope_index`` (called unbound: it reads only
``config`` and the weight-free ``get_vision_position_ids`` helper), so positions are those of the HF model by
construction. Only inputs that every stage holds are needed (token ids, image grids, attention mask), which
is why no pipeline stage has to receive positions from another.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

TEXT_TOKEN_TYPE, IMAGE_TOKEN_TYPE, VIDEO_TOKEN_TYPE = 0, 1, 2


def token_types_from_ids(input_ids: torch.Tensor, hf_config: Any) -> torch.Tensor:
    """``mm_token_type_ids`` [b, s] int32 from the ids: 1 at ``<|image_pad|>``, 2 at ``<|video_pad|>``."""
    types_ = torch.zeros_like(input_ids, dtype=torch.int32)
    types_[input_ids == hf_config.image_token_id] = IMAGE_TOKEN_TYPE
    video_id = getattr(hf_config, "video_token_id", None)
    if video_id is not None:
        types_[input_ids == video_id] = VIDEO_TOKEN_TYPE
    return types_


def _count_runs(token_types: torch.Tensor, value: int, attention_mask: torch.Tensor | None) -> int:
    """Number of maximal runs of ``value`` in each (valid part of each) row, summed over rows."""
    total = 0
    for row in range(token_types.shape[0]):
        t = token_types[row]
        if attention_mask is not None:
            t = t[attention_mask[row].bool()]
        hit = (t == value).to(torch.int8)
        total += int(((hit[1:] - hit[:-1]) == 1).sum()) + int(hit[:1].sum())
    return total


def mrope_position_ids(
    input_ids: torch.Tensor,
    hf_config: Any,
    *,
    image_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """M-RoPE position ids [3, b, s] (int64; temporal, height, width) for ``input_ids`` [b, s].

    ``image_grid_thw`` [num_images, 3] lists the images of the whole batch in order; ``attention_mask``
    [b, s] (1 = token) makes padded positions 0, as in transformers; ``mm_token_type_ids`` [b, s] defaults to
    :func:`token_types_from_ids`. Raises ``ValueError`` when the batch's image-token runs and grid rows
    differ in number. Text-only batches get ``arange`` positions in all three components.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel as HFModel

    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [b, s], got shape {tuple(input_ids.shape)}")
    if mm_token_type_ids is None:
        mm_token_type_ids = token_types_from_ids(input_ids, hf_config)
    n_runs = _count_runs(mm_token_type_ids, IMAGE_TOKEN_TYPE, attention_mask)
    n_grids = 0 if image_grid_thw is None else int(image_grid_thw.shape[0])
    if n_runs != n_grids:
        raise ValueError(
            f"the batch holds {n_runs} image-token run(s) but image_grid_thw has {n_grids} row(s)"
        )
    if _count_runs(mm_token_type_ids, VIDEO_TOKEN_TYPE, attention_mask):
        raise ValueError("video tokens are not supported by this model (no video_grid_thw input)")
    holder = types.SimpleNamespace(
        config=hf_config,
        get_vision_position_ids=functools.partial(HFModel.get_vision_position_ids, None),
    )
    position_ids, _ = HFModel.get_rope_index(
        holder,
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
    )
    return position_ids


__all__ = [
    "IMAGE_TOKEN_TYPE",
    "TEXT_TOKEN_TYPE",
    "VIDEO_TOKEN_TYPE",
    "mrope_position_ids",
    "token_types_from_ids",
]
