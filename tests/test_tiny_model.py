"""The tiny Qwen2.5-VL kit: generated folders load offline in transformers and run with real images.

References are independent of the builder: transformers' own loaders, processor and model code, the
Qwen2.5-VL conversation format written out literally, and the token-count rule (grid_thw.prod() / merge^2).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from megatron_vgpo.models.tiny_qwen2_5_vl import PRESETS, TinyQwen25VLSizes, build_tiny_checkpoint
from megatron_vgpo.models.tokenizers import synthetic_corpus, train_bpe_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How many red circles are in the image?"
# Qwen2.5-VL's conversation format, written out by hand (default system turn, one image, generation prompt).
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + QUESTION + "<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _shapes_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A white RGB image with a few coloured circles (deterministic for ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = (torch.randint(0, max(1, s - 20), (1,), generator=generator).item() for s in size)
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=generator))
        draw.ellipse((x, y, x + 18, y + 18), fill=colour)
    return image


def _image_prompt(processor, image: Image.Image) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == EXPECTED_PROMPT
    return processor(text=[text], images=[image], return_tensors="pt")


def _tensor_names(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def test_tiny_loads_offline_and_generates_from_an_image(tiny_hf_dir: Path):
    model, loading_info = AutoModelForImageTextToText.from_pretrained(tiny_hf_dir, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(tiny_hf_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert not any(loading_info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 0.65e6
    model.eval()

    inputs = _image_prompt(processor, _shapes_image((84, 84), seed=1))
    # 84x84 stays 84x84: a 6x6 grid of 14-px patches, merged 2x2 -> 9 image tokens
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert inputs["pixel_values"].shape == (36, 3 * 2 * 14 * 14)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 9

    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        other_image = _image_prompt(processor, _shapes_image((84, 84), seed=2))
        other_logits = model(**other_image).logits
    prompt_length = inputs["input_ids"].shape[1]
    assert logits.shape == (1, prompt_length, model.config.text_config.vocab_size)
    assert generated.shape == (1, prompt_length + 6)
    assert torch.equal(generated[0, :prompt_length], inputs["input_ids"][0])
    # greedy decoding's first token is the argmax of a plain forward pass
    assert int(generated[0, prompt_length]) == int(logits[0, -1].argmax())
    # the pixels reach the language model: another image changes the next-token distribution
    assert not torch.allclose(logits[0, -1], other_logits[0, -1])
    assert isinstance(processor.decode(generated[0, prompt_length:]), str)


def test_on_disk_names_and_tied_vs_untied(tiny_hf_dir: Path, small_hf_dir: Path):
    for folder, sizes in ((tiny_hf_dir, PRESETS["tiny"]), (small_hf_dir, PRESETS["small"])):
        names = _tensor_names(folder)
        assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
        assert not any(name.startswith(("model.visual.", "model.language_model.")) for name in names)
        assert {name.split(".")[2] for name in names if name.startswith("model.layers.")} == {
            str(i) for i in range(sizes.text_layers)
        }
        assert {name.split(".")[2] for name in names if name.startswith("visual.blocks.")} == {
            str(i) for i in range(sizes.vision_depth)
        }
        assert {"visual.patch_embed.proj.weight", "visual.merger.ln_q.weight"} <= names
        assert ("lm_head.weight" in names) == (not sizes.tie_word_embeddings)
        config = json.loads((folder / "config.json").read_text())
        assert config["tie_word_embeddings"] is sizes.tie_word_embeddings

    tied = AutoModelForImageTextToText.from_pretrained(tiny_hf_dir)
    untied = AutoModelForImageTextToText.from_pretrained(small_hf_dir)
    embed = tied.get_input_embeddings().weight
    assert tied.lm_head.weight.data_ptr() == embed.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.get_input_embeddings().weight)


def test_same_seed_gives_identical_files_and_other_seed_differs(tiny_hf_dir: Path, tmp_path: Path):
    again = build_tiny_checkpoint(tmp_path / "again", preset="tiny", seed=0, tokenizer="bpe")
    other = build_tiny_checkpoint(tmp_path / "other", preset="tiny", seed=1, tokenizer="bpe")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
        assert (again / name).read_bytes() == (tiny_hf_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_hf_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_hf_dir / "tokenizer.json").read_bytes()
    name = "model.layers.0.mlp.up_proj.weight"
    seed0_path, seed1_path = str(tiny_hf_dir / "model.safetensors"), str(other / "model.safetensors")
    with safe_open(seed0_path, "pt") as seed0, safe_open(seed1_path, "pt") as seed1:
        assert not torch.equal(seed0.get_tensor(name), seed1.get_tensor(name))
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_checkpoint(again, seed=0)


@pytest.mark.parametrize("folder_fixture", ["tiny_hf_dir", "small_hf_dir"])
def test_config_ids_agree_with_tokenizer_and_processor(folder_fixture: str, request: pytest.FixtureRequest):
    folder: Path = request.getfixturevalue(folder_fixture)
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    token_id = tokenizer.convert_tokens_to_ids
    assert config["image_token_id"] == token_id("<|image_pad|>") == processor.image_token_id
    assert config["video_token_id"] == token_id("<|video_pad|>")
    assert config["vision_start_token_id"] == token_id("<|vision_start|>")
    assert config["vision_end_token_id"] == token_id("<|vision_end|>")
    text = config["text_config"]
    assert text["eos_token_id"] == token_id("<|im_end|>") == tokenizer.eos_token_id
    assert text["pad_token_id"] == text["bos_token_id"] == token_id("<|endoftext|>") == tokenizer.pad_token_id
    assert generation["eos_token_id"] == [token_id("<|im_end|>"), token_id("<|endoftext|>")]
    assert len(tokenizer) <= text["vocab_size"] < len(tokenizer) + 64
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == head_dim
    assert config["vision_config"]["out_hidden_size"] == text["hidden_size"]

    merge = processor.image_processor.merge_size
    # sizes on the 28-px grid stay as they are; odd sizes are resized onto it
    for width, height in ((84, 84), (112, 112), (140, 84), (100, 70)):
        inputs = _image_prompt(processor, _shapes_image((width, height), seed=width))
        grid = inputs["image_grid_thw"]
        pads = int((inputs["input_ids"] == config["image_token_id"]).sum())
        assert pads == int(grid.prod()) // merge**2
        assert inputs["pixel_values"].shape[0] == int(grid.prod())
        assert inputs["mm_token_type_ids"].shape == inputs["input_ids"].shape
        if width % 28 == 0 and height % 28 == 0:
            assert grid.tolist() == [[1, height // 14, width // 14]]


def test_small_vision_tower_uses_windows_and_full_attention(small_hf_dir: Path):
    """With a 112x112 image the windowed blocks see 4 windows: making every block full-attention changes
    the vision output, while the tiny preset (one full-attention block) has nothing to window."""
    model = AutoModelForImageTextToText.from_pretrained(small_hf_dir).eval()
    processor = AutoProcessor.from_pretrained(small_hf_dir)
    inputs = processor.image_processor(images=[_shapes_image((112, 112), seed=5)], return_tensors="pt")
    vision = model.model.visual
    vision_config = model.config.vision_config
    assert list(vision_config.fullatt_block_indexes) == [1, 3] and vision_config.depth == 4
    with torch.no_grad():
        windowed = vision(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        vision.fullatt_block_indexes = list(range(vision_config.depth))
        full = vision(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    assert windowed.shape == (16, model.config.text_config.hidden_size)
    assert not torch.allclose(windowed, full, atol=1e-6)
    # 140x140 -> 5x5 merged patches: windows are padded at the border, and the model still runs end to end
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(text=[prompt], images=[_shapes_image((140, 140), seed=6)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 25
    assert torch.isfinite(logits).all()
    small = PRESETS["small"]
    assert 112 // small.window_size == 2  # 2x2 windows of 2x2 merged patches on the 4x4 merged grid
    text = model.config.text_config
    assert text.num_attention_heads // text.num_key_value_heads == 3


def test_qwen_vocabulary_variant(qwen_vocab_hf_dir: Path):
    config = json.loads((qwen_vocab_hf_dir / "config.json").read_text())
    processor = AutoProcessor.from_pretrained(qwen_vocab_hf_dir)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 151669 and config["text_config"]["vocab_size"] == 151936
    assert tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|im_end|>"]) == [
        151655,
        151652,
        151645,
    ]
    assert (config["image_token_id"], config["vision_start_token_id"], config["vision_end_token_id"]) == (
        151655,
        151652,
        151653,
    )
    assert (config["video_token_id"], config["text_config"]["eos_token_id"]) == (151656, 151645)
    model = AutoModelForImageTextToText.from_pretrained(qwen_vocab_hf_dir).eval()
    inputs = _image_prompt(processor, _shapes_image((84, 84), seed=3))
    assert int((inputs["input_ids"] == 151655).sum()) == 9
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_bpe_tokenizer_roundtrips_task_text_and_keeps_markers_whole(tiny_hf_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == EXPECTED_PROMPT
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    assert 300 < len(tokenizer) < 500
    for marker in ("<think>", "</think>", "<|im_start|>", "<|image_pad|>"):
        assert len(tokenizer(marker)["input_ids"]) == 1, marker
    answer = (
        "<think>\nThere are 4 red circles and 2 pink ones.\n</think>\nThe answer is \\boxed{\\frac{4}{6}}."
    )
    for text in [*synthetic_corpus(num_lines=20, seed=7), answer, "unseen words: zebra Ω 3.14"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    # special tokens are dropped by skip_special_tokens, reasoning markers are not (as in Qwen's files)
    ids = tokenizer("<|im_start|>assistant\n<think>x</think><|im_end|>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think>"
    # the tokenizer is independent of the model seed and retrains identically
    assert train_bpe_tokenizer().get_vocab() == tokenizer.get_vocab()


def _load_cli_main():
    spec = importlib.util.spec_from_file_location(
        "make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_presets_validate_and_cli_writes_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    make_tiny_model_main = _load_cli_main()
    with pytest.raises(ValueError, match="mrope_section"):
        dataclasses.replace(PRESETS["tiny"], mrope_section=(4, 4, 4))
    with pytest.raises(ValueError, match="text_kv_heads"):
        dataclasses.replace(PRESETS["small"], text_kv_heads=5)
    assert isinstance(PRESETS["tiny"], TinyQwen25VLSizes)
    assert PRESETS["tiny"].num_image_tokens(84, 84) == 9
    make_tiny_model_main(["--out", str(tmp_path / "cli"), "--seed", "3"])
    assert "num_parameters" in capsys.readouterr().out
    info = json.loads((tmp_path / "cli" / "tiny_model_build.json").read_text())
    assert (info["preset"], info["seed"], info["tokenizer"]) == ("tiny", 3, "bpe")
    with pytest.raises(SystemExit, match="overwrite"):
        make_tiny_model_main(["--out", str(tmp_path / "cli")])
    make_tiny_model_main(
        ["--out", str(tmp_path / "cli"), "--overwrite", "--seed", "4", "--dtype", "bfloat16"]
    )
    assert json.loads((tmp_path / "cli" / "tiny_model_build.json").read_text())["seed"] == 4
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "cli" / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
