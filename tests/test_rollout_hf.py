"""The transformers rollout engine against transformers itself, plus the engine-independent sync pieces.

References are computed here directly with ``Qwen2_5_VLForConditionalGeneration`` + the folder's
processor (its own ``generate`` and a plain forward pass), not through the engine under test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from megatron_vgpo.rollout.base import RolloutRequest, SamplingParams, iter_buckets
from megatron_vgpo.rollout.hf_backend import HFRolloutEngine, checkpoint_name_to_module_name
from megatron_vgpo.rollout.sync_disk import write_hf_weights_folder


def _image(color: str, size: int = 84) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill=color)
    return image


def _chat(engine: HFRolloutEngine, text: str, images: int) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return engine.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def engine(tiny_hf_dir: Path) -> HFRolloutEngine:
    return HFRolloutEngine(tiny_hf_dir)


def _reference_logprobs(model, processor, prompt: str, images, response: list[int], temperature: float = 1.0):
    """Plain transformers forward pass over prompt + response: float32 [R] logprobs of the response."""
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([response])], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    types = inputs["mm_token_type_ids"]
    extra["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, len(response))], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float()
    start = inputs["input_ids"].shape[1]
    logprobs = torch.log_softmax(logits[start - 1 : -1] / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_greedy_matches_transformers_generate_and_forward(engine: HFRolloutEngine) -> None:
    model, processor = engine.model, engine.processor
    prompts = [
        (_chat(engine, "How many red shapes?", 1), [_image("red")]),
        (_chat(engine, "Two images: count red ones please", 2), [_image("red"), _image("blue", 112)]),
        (_chat(engine, "No image here.", 0), []),
    ]
    requests = [RolloutRequest(f"p{i}", prompt_text=t, images=im) for i, (t, im) in enumerate(prompts)]
    outputs = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=7))  # one padded batch
    assert [o.uid for o in outputs] == ["p0", "p1", "p2"]
    for (prompt, images), output in zip(prompts, outputs):
        inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
        with torch.no_grad():
            own = model.generate(**inputs, do_sample=False, max_new_tokens=7, pad_token_id=engine.pad_token_id)
        expected = own[0, inputs["input_ids"].shape[1] :].tolist()
        assert output.response_ids == expected[: len(output.response_ids)]
        assert output.finish_reason == ("length" if len(output.response_ids) == 7 else "stop")
        reference = _reference_logprobs(model, processor, prompt, images, output.response_ids)
        assert output.logprobs.dtype == torch.float32
        torch.testing.assert_close(output.logprobs, reference, atol=1e-5, rtol=0)
        # the raw prompt ids are the tokenizer's ids of the templated text (one placeholder per image)
        assert output.prompt_ids == engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # score() is the same forward pass
    for output, score in zip(outputs, engine.score(requests, [o.response_ids for o in outputs])):
        torch.testing.assert_close(output.logprobs, score, atol=1e-5, rtol=0)


def test_sampling_shapes_seed_stop_and_temperature(engine: HFRolloutEngine) -> None:
    requests = [
        RolloutRequest("a", prompt_text=_chat(engine, "How many?", 1), images=[_image("red")]),
        RolloutRequest("b", prompt_ids=engine.tokenizer("plain text prompt", add_special_tokens=False)["input_ids"]),
    ]
    params = SamplingParams(n=4, temperature=0.8, top_p=0.9, max_new_tokens=5, seed=7)
    outputs = engine.generate(requests, params)
    assert [(o.uid, o.sample_index) for o in outputs] == [(u, j) for u in "ab" for j in range(4)]
    assert all(len(o.response_ids) == o.logprobs.numel() <= 5 for o in outputs)
    assert len({tuple(o.response_ids) for o in outputs}) > 2
    again = engine.generate(requests, params)
    assert [o.response_ids for o in again] == [o.response_ids for o in outputs]
    # logprobs are log_softmax(logits / temperature) of the drawn tokens (no top-p renormalisation)
    scores = engine.score([requests[0]] * 4 + [requests[1]] * 4, [o.response_ids for o in outputs], temperature=0.8)
    for output, score in zip(outputs, scores):
        torch.testing.assert_close(output.logprobs, score, atol=1e-5, rtol=0)

    greedy = engine.generate(requests[:1], SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    stop = greedy.response_ids[1]
    stopped = engine.generate(requests[:1], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(stop,)))[
        0
    ]
    assert stopped.finish_reason == "stop"
    assert stopped.response_ids == greedy.response_ids[: greedy.response_ids.index(stop) + 1]
    torch.testing.assert_close(stopped.logprobs, greedy.logprobs[: len(stopped.response_ids)], atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="placeholder"):
        engine.generate([RolloutRequest("c", prompt_ids=[5, 6], images=[_image("red")])], SamplingParams())


def _perturbed_named_tensors(hf_dir: Path, out_dir: Path, seed: int):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out_dir)
    return model.eval(), sorted(load_file(out_dir / "model.safetensors").items())


@pytest.mark.parametrize("fixture_name", ["tiny_hf_dir", "small_hf_dir"])
def test_update_weights_is_exact(fixture_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    hf_dir: Path = request.getfixturevalue(fixture_name)
    engine = HFRolloutEngine(hf_dir)
    prompt = _chat(engine, "How many red shapes?", 1)
    requests = [RolloutRequest("a", prompt_text=prompt, images=[_image("red", 112)])]
    before = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=6))[0]

    perturbed, named = _perturbed_named_tensors(hf_dir, tmp_path / "perturbed", seed=11)
    assert any(n.startswith("visual.") for n, _ in named) and any(n.startswith("model.layers.") for n, _ in named)
    stats = engine.update_weights(iter(named), bucket_bytes=200_000)
    assert stats.num_tensors == len(named) and stats.num_buckets > 1

    after = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    reference = _reference_logprobs(perturbed, engine.processor, prompt, requests[0].images, after.response_ids)
    # incremental (KV-cached) decoding vs one forward pass: fp32 rounding only; the weights are bit-exact
    torch.testing.assert_close(after.logprobs, reference, atol=1e-5, rtol=0)
    assert (after.logprobs - before.logprobs).abs().max() > 0.05 or after.response_ids != before.response_ids
    for name, tensor in perturbed.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name

    with pytest.raises(KeyError, match=re.escape("model.layers.99.mlp.up_proj.weight")):
        engine.update_weights([("model.layers.99.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])
    # in-memory names are accepted as they are
    norm = engine.model.state_dict()["model.language_model.norm.weight"]
    engine.update_weights([("model.language_model.norm.weight", torch.full_like(norm, 0.5))])
    assert torch.equal(engine.model.state_dict()["model.language_model.norm.weight"], torch.full_like(norm, 0.5))


def test_name_mapping_table() -> None:
    names = {
        "model.visual.blocks.0.attn.qkv.weight",
        "model.language_model.layers.0.mlp.up_proj.weight",
        "lm_head.weight",
    }
    assert (
        checkpoint_name_to_module_name("visual.blocks.0.attn.qkv.weight", names)
        == "model.visual.blocks.0.attn.qkv.weight"
    )
    assert checkpoint_name_to_module_name("model.layers.0.mlp.up_proj.weight", names).startswith(
        "model.language_model."
    )
    assert checkpoint_name_to_module_name("lm_head.weight", names) == "lm_head.weight"
    with pytest.raises(KeyError, match=re.escape("visual.merger.nope")):
        checkpoint_name_to_module_name("visual.merger.nope", names)


def test_iter_buckets() -> None:
    tensors = [
        ("a", torch.zeros(10)),
        ("b", torch.zeros(10)),
        ("big", torch.zeros(100)),
        ("c", torch.zeros(5, dtype=torch.bfloat16)),
    ]
    buckets = list(iter_buckets(iter(tensors), bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["big"], ["c"]]
    buckets = list(iter_buckets(tensors[:2] + tensors[3:], bucket_bytes=1000, split_on_dtype=True))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"]]
    with pytest.raises(TypeError, match="'x'"):
        list(iter_buckets([("x", [1, 2])], 10))
    with pytest.raises(ValueError):
        RolloutRequest("u")
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_disk_folder_and_flat_bucket_roundtrip(small_hf_dir: Path, tmp_path: Path) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vgpo.rollout.sglang_worker import flatten_bucket, unflatten_bucket

    named = sorted(load_file(small_hf_dir / "model.safetensors").items())
    stats = write_hf_weights_folder(iter(named), tmp_path / "sync", template_dir=small_hf_dir, bucket_bytes=300_000)
    assert stats.num_buckets == len(list((tmp_path / "sync").glob("model-*.safetensors"))) > 1
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "sync", dtype=torch.float32)
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(small_hf_dir, dtype=torch.float32)
    for (name, a), b in zip(original.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

    mixed = [("x", torch.randn(3, 5)), ("y", torch.randn(7).to(torch.bfloat16)), ("z", torch.arange(4))]
    flat, metadata = flatten_bucket(mixed)
    assert flat.dtype == torch.uint8 and flat.numel() == 3 * 5 * 4 + 7 * 2 + 4 * 8
    for (name, tensor), (name2, view) in zip(mixed, unflatten_bucket(flat, metadata)):
        assert name == name2 and view.dtype == tensor.dtype and torch.equal(view, tensor)


def test_sampled_vision_markers_are_cut_off(engine: HFRolloutEngine):
    """A policy can sample ``<|image_pad|>`` & co.; :func:`cut_before_tokens` keeps the prefix before the first
    one (tokens and log-probs of the real sample), so the actor never sees a response that reads as an image."""
    from megatron_vgpo.models.tokenizers import special_token_ids
    from megatron_vgpo.rollout.base import cut_before_tokens

    ids = special_token_ids(engine.tokenizer)
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    assert ids.vision_markers == tuple(engine.tokenizer.convert_tokens_to_ids(names))

    request = RolloutRequest("a", prompt_text=_chat(engine, "How many?", 1), images=[_image("red")])
    outputs = engine.generate([request], SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=3))
    originals = [(list(o.response_ids), o.logprobs.clone(), o.finish_reason) for o in outputs]
    stop = {originals[0][0][4], ids.image_pad}  # a token sample 0 surely holds, and the image pad
    cut = [cut_before_tokens(o, stop) for o in outputs]
    assert cut[0] and outputs[0].response_ids == originals[0][0][: originals[0][0].index(originals[0][0][4])]
    for o, was_cut, (tokens, logprobs, reason) in zip(outputs, cut, originals):
        kept = len(o.response_ids)
        assert not stop & set(o.response_ids) and o.response_ids == tokens[:kept]
        assert torch.equal(o.logprobs, logprobs[:kept])
        assert was_cut == (kept < len(tokens)) and o.finish_reason == ("length" if was_cut else reason)
