"""Parity of :class:`Qwen2_5_VLModel` (any TP/SP/PP layout) with transformers' Qwen2.5-VL, fp32, eval.

Used by ``tools/check_parity.py`` and the tests. :func:`parity_rank_body` runs on every rank of a
``run_on_ranks`` launch: it builds the batch (:func:`make_parity_batch`: right-padded, ragged lengths, 1-2
images per sample, made by the checkpoint folder's own processor), runs transformers'
``Qwen2_5_VLForConditionalGeneration`` once as the reference, then for each requested layout builds the
Megatron model, loads the HF weights through :mod:`megatron_vgpo.checkpoint.hf_mapping`, and runs one
forward through Megatron's pipeline schedule (``get_forward_backward_func(..., forward_only=True)``, one
micro-batch; at PP 1 it is a plain forward). The last stage all-gathers the vocab-parallel logits (and, with
SP, the sequence-sharded final-norm hidden states) over TP and compares them at valid (non-pad) positions.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# (width, height) of the images of each sample: sample 0 has one image, sample 1 two, sample 2 one.
_IMAGE_SIZES = [[(84, 56)], [(56, 56), (56, 84)], [(112, 112)]]
_TEXTS = [
    "How many red circles?",
    "Compare the two pictures and count every shape you can see in them.",
    "Shapes?",
]


def _image(size: tuple[int, int], seed: int) -> Any:
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = (int(torch.randint(0, max(1, s - 16), (1,), generator=gen)) for s in size)
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=gen))
        draw.rectangle((x, y, x + 14, y + 14), fill=colour)
    return image


def make_parity_batch(hf_dir: str | Path, *, seed: int = 0, pad_to_multiple: int = 4) -> dict[str, Tensor]:
    """A batch of 3 chat prompts with 1-2 images each, right-padded to a multiple of ``pad_to_multiple``.

    Returns the processor's tensors: ``input_ids``/``attention_mask``/``mm_token_type_ids`` [b, s],
    ``pixel_values`` [num_patches, C*T*P*P], ``image_grid_thw`` [num_images, 3].
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(hf_dir))
    processor.tokenizer.padding_side = "right"
    texts, images = [], []
    for sample, sizes in enumerate(_IMAGE_SIZES):
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": _TEXTS[sample]}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images.extend(_image(size, seed * 100 + sample * 10 + i) for i, size in enumerate(sizes))
    batch = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    seq = batch["input_ids"].shape[1]
    extra = (-seq) % pad_to_multiple
    if extra:
        pad_id = processor.tokenizer.pad_token_id
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
            t = batch[key]
            batch[key] = torch.cat([t, t.new_full((t.shape[0], extra), fill)], dim=1)
    return {k: v for k, v in batch.items() if torch.is_tensor(v)}


def hf_reference(hf_dir: str | Path, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' fp32 eval outputs: ``logits`` [b, s, V], ``final_hidden`` [b, s, h] (output of the
    text model's final norm), ``position_ids`` [3, b, s] (its own ``get_rope_index``)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    captured: dict[str, Tensor] = {}
    model.model.language_model.norm.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("final_hidden", out.detach())
    )
    with torch.no_grad():
        logits = model(**batch).logits
        position_ids, _ = model.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
    return {"logits": logits, "final_hidden": captured["final_hidden"], "position_ids": position_ids}


def megatron_forward(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """One forward through Megatron's schedule on this rank. Returns on the last stage the logits
    [b, s, V/tp] and ``model.captured_final_hidden`` [s(/tp), b, h]; ``(None, None)`` elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator: Any, module: Any) -> tuple[Tensor, None]:
        b = next(data_iterator)
        out = module(
            b["input_ids"],
            attention_mask=b["attention_mask"],
            pixel_values=b["pixel_values"],
            image_grid_thw=b["image_grid_thw"],
            mm_token_type_ids=b["mm_token_type_ids"],
        )
        return out, None  # no loss function: the schedule collects the raw output on the last stage

    bsz, seq = batch["input_ids"].shape
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=bsz,
            forward_only=True,
        )
    if not ps.is_pipeline_last_stage():
        return None, None
    return outputs[0], model.captured_final_hidden


def gather_tp(tensor: Tensor, dim: int) -> Tensor:
    """Concatenate the TP group's pieces of ``tensor`` along ``dim`` (identity at TP 1)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(tp)]
    from megatron_vgpo.distributed import comm

    comm.all_gather(pieces, tensor, group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=dim)


def _max_diff(a: Tensor, b: Tensor, valid: Tensor) -> float:
    return float((a[valid] - b[valid]).abs().max())


def parity_rank_body(
    rank: int,
    world_size: int,
    hf_dir: str,
    layouts: list[tuple[int, int, bool]],
    seed: int = 0,
    check_errors: bool = False,
) -> dict[str, Any]:
    """Per-rank body for ``run_on_ranks(..., megatron=True)``: compare each (tp, pp, sp) layout with HF.

    Returns ``{"layouts": {name: {...}}}``; a layout's entry has, on its reporting rank (last stage, TP
    rank 0), ``logits_max_abs_diff`` and ``final_hidden_max_abs_diff``; on every rank ``rope_ids_equal``
    (the M-RoPE ids this stage fed the decoder vs transformers' own) and the rank's ``stage``. With
    ``check_errors`` the first layout's first stage also records the image-count mismatch error message.
    """
    from transformers import AutoConfig

    from megatron_vgpo.checkpoint.hf_mapping import load_hf_weights, read_hf_state_dict
    from megatron_vgpo.distributed.process_groups import init_model_parallel
    from megatron_vgpo.models.qwen2_5_vl.model import build_model
    from megatron_vgpo.platform import compute_device

    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = compute_device(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    torch.manual_seed(seed)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    hf_state = read_hf_state_dict(hf_dir, lazy=True)  # each rank reads only its own tensors
    # sequence parallel needs the length divisible by TP
    batch = make_parity_batch(hf_dir, seed=seed, pad_to_multiple=math.lcm(4, *(tp for tp, _, _ in layouts)))
    ref = hf_reference(hf_dir, batch)
    dev_batch = {k: v.to(device) for k, v in batch.items()}
    valid = batch["attention_mask"].bool()  # [b, s]
    result: dict[str, Any] = {
        "layouts": {},
        "seq_len": int(valid.shape[1]),
        "num_images": int(batch["image_grid_thw"].shape[0]),
    }
    for tp, pp, sp in layouts:
        name = f"tp{tp}_pp{pp}" + ("_sp" if sp else "")
        layout = init_model_parallel(tp=tp, pp=pp, seed=1234 + seed)
        model = build_model(hf_config, sequence_parallel=sp).eval()
        load_hf_weights(model, hf_state, hf_config)
        seen: dict[str, Tensor] = {}
        model.language_model.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.__setitem__("position_ids", args[1].detach().clone())
        )
        logits, hidden = megatron_forward(model, dev_batch)
        entry: dict[str, Any] = {
            "stage": layout.pp_rank,
            "tp_rank": layout.tp_rank,
            "rope_ids_equal": bool(torch.equal(seen["position_ids"].cpu()[:, valid], ref["position_ids"][:, valid])),
        }
        if logits is not None:
            full_logits = gather_tp(logits, dim=-1)[..., : hf_config.text_config.vocab_size]
            full_hidden = gather_tp(hidden, dim=0) if sp and tp > 1 else hidden  # [s, b, h]
            entry["captured_hidden_shape"] = list(hidden.shape)
            if layout.tp_rank == 0:
                full_logits, full_hidden = full_logits.cpu(), full_hidden.cpu()
                entry["logits_max_abs_diff"] = _max_diff(full_logits, ref["logits"], valid)
                entry["final_hidden_max_abs_diff"] = _max_diff(full_hidden.transpose(0, 1), ref["final_hidden"], valid)
        if check_errors and layout.pp_rank == 0 and not result.get("mismatch_error"):
            result["mismatch_error"] = _image_mismatch_message(model, dev_batch)
        result["layouts"][name] = entry
    return result


def _image_mismatch_message(model: Any, batch: dict[str, Tensor]) -> str:
    """Drop one ``<|image_pad|>`` of sample 1 and return the error message the model raises."""
    from megatron_vgpo.models.qwen2_5_vl.model import ImageTokenMismatchError

    image_id = model.hf_config.image_token_id
    ids = batch["input_ids"].clone()
    position = int((ids[1] == image_id).nonzero()[0])
    ids[1, position] = 0
    try:
        with torch.no_grad():
            model.embed_inputs(ids, batch["pixel_values"], batch["image_grid_thw"])
    except ImageTokenMismatchError as exc:
        return str(exc)
    return "<no error raised>"


__all__ = ["gather_tp", "hf_reference", "make_parity_batch", "megatron_forward", "parity_rank_body"]
