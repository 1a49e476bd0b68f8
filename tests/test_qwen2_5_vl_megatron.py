"""Megatron Qwen2.5-VL vs transformers' Qwen2_5_VLForConditionalGeneration, at every parallel layout.

ONE launch of 4 gloo ranks (a launch costs 6-11 s here) runs, with the HF weights loaded through the
mapping (``load_hf_weights`` refuses any key/shape difference between a mapped shard and the real model):

* the tiny preset (tied embeddings) at TP1, TP2, TP2+SP, PP2 and TP2xPP2, and the small preset (untied,
  GQA 3, windowed + full-attention vision blocks) at TP2+SP and TP2xPP2: logits and final-norm hidden states
  at valid positions of a right-padded ragged batch with 1-2 images per sample, fp32, tolerance 1e-4;
  the M-RoPE ids that every stage fed its decoder equal transformers' ``get_rope_index``;
* the image-count mismatch error names the sample;
* the streaming export ``iter_hf_weights`` at TP2xPP2 yields every HF tensor exactly once, bit-exact;
* at TP2+SP, the vision tower's gradients (after ``allreduce_vision_grads``) equal transformers' for the
  same loss on the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_vgpo.distributed.multiprocess import run_on_ranks

TOLERANCE = 1e-4
TINY_LAYOUTS = [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False)]
SMALL_LAYOUTS = [(2, 1, True), (2, 2, False)]


def _export_check(hf_dir: str) -> dict[str, Any]:
    """Streaming export from a model loaded at the current layout, compared with the HF file."""
    from transformers import AutoConfig

    from megatron_vgpo.checkpoint.hf_mapping import iter_hf_weights, load_hf_weights, read_hf_state_dict
    from megatron_vgpo.models.qwen2_5_vl import build_model

    hf_config, hf_state = AutoConfig.from_pretrained(hf_dir), read_hf_state_dict(hf_dir)
    model = build_model(hf_config)
    load_hf_weights(model, hf_state, hf_config)
    names, mismatched = [], []
    for name, tensor in iter_hf_weights(model, hf_config):
        names.append(name)
        if not torch.equal(tensor, hf_state[name]):
            mismatched.append(name)
    return {"names": names, "mismatched": mismatched, "expected": sorted(hf_state)}


def _vision_grad_check(hf_dir: str) -> dict[str, float]:
    """TP2+SP: grads of the vision tower for loss = sum(valid logits * W) vs transformers' grads."""
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_vgpo.checkpoint.hf_mapping import load_hf_weights, read_hf_state_dict
    from megatron_vgpo.distributed.process_groups import init_model_parallel
    from megatron_vgpo.models.qwen2_5_vl import allreduce_vision_grads, build_model
    from megatron_vgpo.models.qwen2_5_vl.parity import make_parity_batch

    hf_config = AutoConfig.from_pretrained(hf_dir)
    batch = make_parity_batch(hf_dir, seed=2)
    valid = batch["attention_mask"].bool()
    vocab = hf_config.text_config.vocab_size
    weights = torch.randn(*valid.shape, vocab, generator=torch.Generator().manual_seed(3)) * valid[..., None]

    hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    (hf_model(**batch).logits * weights).sum().backward()
    hf_grads = {n: p.grad for n, p in hf_model.model.visual.named_parameters()}

    init_model_parallel(tp=2, pp=1, seed=5)
    model = build_model(hf_config, sequence_parallel=True)
    load_hf_weights(model, read_hf_state_dict(hf_dir), hf_config)
    logits = model(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
    )  # [b, s, V/2]
    shard = vocab // 2
    tp_rank = ps.get_tensor_model_parallel_rank()
    (logits * weights[..., tp_rank * shard : (tp_rank + 1) * shard]).sum().backward()
    before = {n: p.grad.clone() for n, p in model.vision_model.named_parameters()}
    allreduce_vision_grads(model)
    after = {n: p.grad for n, p in model.vision_model.named_parameters()}
    return {
        "max_abs_diff_vs_hf": max(float((after[n] - hf_grads[n]).abs().max()) for n in hf_grads),
        "max_abs_hf_grad": max(float(g.abs().max()) for g in hf_grads.values()),
        "allreduce_changed": max(float((after[n] - before[n]).abs().max()) for n in before),
    }


def _body(rank: int, world_size: int, tiny_dir: str, small_dir: str) -> dict[str, Any]:
    from megatron_vgpo.models.qwen2_5_vl.parity import parity_rank_body

    out = {
        "tiny": parity_rank_body(rank, world_size, tiny_dir, TINY_LAYOUTS, seed=0, check_errors=True),
        "small": parity_rank_body(rank, world_size, small_dir, SMALL_LAYOUTS, seed=1),
    }
    out["export"] = _export_check(small_dir)  # the small preset's last layout (TP2xPP2) is still set up
    out["grads"] = _vision_grad_check(tiny_dir)
    return out


@pytest.mark.multirank
def test_parity_with_transformers_at_every_layout(tiny_hf_dir: Path, small_hf_dir: Path):
    results = run_on_ranks(
        _body,
        world_size=4,
        args=(str(tiny_hf_dir), str(small_hf_dir)),
        megatron=True,
        env={"OMP_NUM_THREADS": "1"},
        timeout_s=900,
    )
    for preset, layouts in (("tiny", TINY_LAYOUTS), ("small", SMALL_LAYOUTS)):
        for tp, pp, sp in layouts:
            name = f"tp{tp}_pp{pp}" + ("_sp" if sp else "")
            entries = [r[preset]["layouts"][name] for r in results]
            assert all(e["rope_ids_equal"] for e in entries), (preset, name)
            assert {e["stage"] for e in entries} == set(range(pp))
            reports = [e for e in entries if "logits_max_abs_diff" in e]
            # one reporter per (DP replica): last stage, TP rank 0
            assert len(reports) == 4 // (tp * pp), (preset, name)
            for e in reports:
                assert e["logits_max_abs_diff"] < TOLERANCE, (preset, name, e)
                assert e["final_hidden_max_abs_diff"] < TOLERANCE, (preset, name, e)
                seq = results[0][preset]["seq_len"]
                assert e["captured_hidden_shape"][0] == (seq // tp if sp else seq), (preset, name, e)
        assert results[0][preset]["num_images"] == 4

    message = results[0]["tiny"]["mismatch_error"]
    assert message.startswith("sample 1:") and "<|image_pad|>" in message, message

    export = [r["export"] for r in results]
    names = [n for e in export for n in e["names"]]
    assert sorted(names) == export[0]["expected"]  # every HF tensor exactly once over the 4 ranks
    assert not any(e["mismatched"] for e in export)
    # ranks 0..3 = (tp0,pp0), (tp1,pp0), (tp0,pp1), (tp1,pp1): only TP rank 0 of each stage yields
    assert export[1]["names"] == [] and export[3]["names"] == []
    assert any(n.startswith("visual.") for n in export[0]["names"])
    assert "lm_head.weight" in export[2]["names"] and "model.norm.weight" in export[2]["names"]

    for r in results:
        grads = r["grads"]
        assert grads["max_abs_hf_grad"] > 1e-3
        assert grads["max_abs_diff_vs_hf"] < 1e-4 * max(1.0, grads["max_abs_hf_grad"]), grads
        assert grads["allreduce_changed"] < 1e-6, grads


def test_input_checks_and_text_only_positions(tiny_hf_dir: Path):
    """Pure functions (no Megatron ranks): padding side, image bookkeeping, text-only M-RoPE ids."""
    from transformers import AutoConfig

    from megatron_vgpo.models.qwen2_5_vl.model import (
        ImageTokenMismatchError,
        check_right_padded,
        image_features_per_sample,
    )
    from megatron_vgpo.models.qwen2_5_vl.rope_index import mrope_position_ids

    hf_config = AutoConfig.from_pretrained(tiny_hf_dir)
    check_right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"rows \[1\] are not right-padded"):
        check_right_padded(torch.tensor([[1, 1, 0], [0, 1, 1]]))

    img = hf_config.image_token_id
    ids = torch.tensor([[5, img, img, img, img, 6, 0], [5, img, img, img, img, img, img]])
    grid = torch.tensor([[1, 4, 4], [1, 2, 4], [1, 2, 8]])  # 4, 2 and 4 merged tokens
    assert image_features_per_sample(ids, img, grid, 2) == [1, 2]
    with pytest.raises(ImageTokenMismatchError, match=r"sample 1: 6 <\|image_pad\|> tokens .* give 8 features"):
        image_features_per_sample(ids, img, torch.tensor([[1, 4, 4]] * 3), 2)
    with pytest.raises(ImageTokenMismatchError, match="1 image\\(s\\) left over"):
        image_features_per_sample(ids[:1], img, grid[:2], 2)

    text = torch.tensor([[3, 4, 5, 6, 0, 0], [3, 4, 5, 6, 7, 8]])
    mask = (torch.arange(6) < torch.tensor([[4], [6]])).long()
    positions = mrope_position_ids(text, hf_config, attention_mask=mask)
    assert positions.shape == (3, 2, 6)
    assert torch.equal(positions[:, mask.bool()], torch.cat([torch.arange(4), torch.arange(6)]).expand(3, -1))
    with pytest.raises(ValueError, match="1 image-token run"):
        mrope_position_ids(ids[:1], hf_config)
