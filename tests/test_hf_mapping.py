"""HF <-> Megatron weight mapping for Qwen2.5-VL (pure tensor code: one process, no Megatron ranks).

Round trips HF -> every rank's shard -> HF must be bit-exact for the tied ``tiny`` and the untied ``small``
(GQA 3) presets at TP1PP1, TP2PP1 and TP2PP2. The fused layouts are checked against hand-built expectations
(not against the mapping's own inverse): Megatron's per-query-group QKV interleave and the per-TP-shard
gate/up concatenation. That each shard holds exactly a real model's keys and shapes is checked by the
multi-rank test (``load_hf_weights`` refuses any difference), which also runs the streaming export.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_vgpo.checkpoint.hf_mapping import (
    WeightMappingError,
    expected_hf_shapes,
    hf_to_megatron_shard,
    megatron_shards_to_hf,
    read_hf_state_dict,
)
from megatron_vgpo.models.qwen2_5_vl.config import UnsupportedConfigError, megatron_vocab_size

LAYOUTS = [(1, 1), (2, 1), (2, 2)]


def _load(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder), read_hf_state_dict(folder)


def _all_shards(hf_state, hf_config, tp: int, pp: int, te: bool = False):
    return {
        (t, p): hf_to_megatron_shard(hf_state, hf_config, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, te=te)
        for t in range(tp)
        for p in range(pp)
    }


def _assert_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_roundtrip_is_exact_at_every_layout(preset: str, tiny_hf_dir: Path, small_hf_dir: Path):
    hf_config, hf_state = _load(tiny_hf_dir if preset == "tiny" else small_hf_dir)
    tied = hf_config.tie_word_embeddings
    assert tied == (preset == "tiny")
    assert ("lm_head.weight" in hf_state) == (not tied)
    for tp, pp in LAYOUTS:
        shards = _all_shards(hf_state, hf_config, tp, pp)
        _assert_exact(megatron_shards_to_hf(shards, hf_config), hf_state)
        last = shards[(0, pp - 1)]
        first = shards[(0, 0)]
        # where the embedding, vision tower, final norm and output layer live
        assert "language_model.embedding.word_embeddings.weight" in first
        assert any(k.startswith("vision_model.") for k in first)
        assert "language_model.decoder.final_layernorm.weight" in last
        has_output = "language_model.output_layer.weight" in last
        assert has_output == (not tied or pp > 1), (tp, pp)
        if pp > 1:
            assert not any(k.startswith("vision_model.") for k in last)
            assert "language_model.embedding.word_embeddings.weight" not in last
            if tied:  # the last stage's copy of the tied embedding is the embedding's TP shard
                assert torch.equal(
                    last["language_model.output_layer.weight"],
                    first["language_model.embedding.word_embeddings.weight"],
                )
            # the local layer 0 of stage 1 is global layer L/pp
            per_stage = hf_config.text_config.num_hidden_layers // pp
            assert torch.equal(
                last["language_model.decoder.layers.0.mlp.linear_fc2.weight"],
                torch.chunk(hf_state[f"model.layers.{per_stage}.mlp.down_proj.weight"], tp, dim=1)[0],
            )


def test_fused_qkv_and_gate_up_layouts_match_hand_built_expectation(small_hf_dir: Path):
    hf_config, hf_state = _load(small_hf_dir)
    text = hf_config.text_config
    heads, groups = text.num_attention_heads, text.num_key_value_heads  # 12, 4
    d = text.hidden_size // heads
    per_group = heads // groups
    tp = 2
    for tp_rank in range(tp):
        shard = hf_to_megatron_shard(hf_state, hf_config, tp_rank=tp_rank, tp_size=tp, pp_rank=0, pp_size=1)
        for suffix in ("weight", "bias"):
            q = hf_state[f"model.layers.0.self_attn.q_proj.{suffix}"]
            k = hf_state[f"model.layers.0.self_attn.k_proj.{suffix}"]
            v = hf_state[f"model.layers.0.self_attn.v_proj.{suffix}"]
            rows = []
            for g in range(tp_rank * groups // tp, (tp_rank + 1) * groups // tp):
                rows += [
                    q[g * per_group * d : (g + 1) * per_group * d],
                    k[g * d : (g + 1) * d],
                    v[g * d : (g + 1) * d],
                ]
            expected = torch.cat(rows)
            assert torch.equal(shard[f"language_model.decoder.layers.0.self_attention.linear_qkv.{suffix}"], expected)
        ffn = text.intermediate_size
        gate = hf_state["model.layers.0.mlp.gate_proj.weight"][tp_rank * ffn // tp : (tp_rank + 1) * ffn // tp]
        up = hf_state["model.layers.0.mlp.up_proj.weight"][tp_rank * ffn // tp : (tp_rank + 1) * ffn // tp]
        fc1 = shard["language_model.decoder.layers.0.mlp.linear_fc1.weight"]
        assert torch.equal(fc1, torch.cat([gate, up]))
        o_proj = hf_state["model.layers.0.self_attn.o_proj.weight"]
        half = o_proj.shape[1] // tp
        assert torch.equal(
            shard["language_model.decoder.layers.0.self_attention.linear_proj.weight"],
            o_proj[:, tp_rank * half : (tp_rank + 1) * half],
        )
        assert torch.equal(shard["vision_model.blocks.0.attn.qkv.weight"], hf_state["visual.blocks.0.attn.qkv.weight"])


def test_in_memory_names_and_te_norm_names(tiny_hf_dir: Path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_config, hf_state = _load(tiny_hf_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    in_memory = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert any(k.startswith("model.language_model.") for k in in_memory)
    from_disk = hf_to_megatron_shard(hf_state, hf_config, tp_rank=1, tp_size=2, pp_rank=0, pp_size=1)
    _assert_exact(hf_to_megatron_shard(in_memory, hf_config, tp_rank=1, tp_size=2, pp_rank=0, pp_size=1), from_disk)
    te_shards = _all_shards(hf_state, hf_config, 2, 2, te=True)
    names = set(te_shards[(0, 0)])
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "language_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)
    _assert_exact(megatron_shards_to_hf(te_shards, hf_config), hf_state)


def test_vocab_padding_rows_are_zero_and_dropped(tiny_hf_dir: Path):
    hf_config, hf_state = _load(tiny_hf_dir)
    odd_vocab = hf_config.text_config.vocab_size - 1  # 447: not divisible by TP 2
    hf_config.text_config.vocab_size = odd_vocab
    hf_state = dict(hf_state, **{"model.embed_tokens.weight": hf_state["model.embed_tokens.weight"][:odd_vocab]})
    assert megatron_vocab_size(odd_vocab, 2) == odd_vocab + 1
    assert megatron_vocab_size(151936, 8) == 151936
    shards = _all_shards(hf_state, hf_config, 2, 2)
    rows = shards[(1, 0)]["language_model.embedding.word_embeddings.weight"]
    assert rows.shape[0] == (odd_vocab + 1) // 2
    assert torch.count_nonzero(rows[-1]) == 0
    assert torch.equal(rows[:-1], hf_state["model.embed_tokens.weight"][rows.shape[0] :])
    _assert_exact(megatron_shards_to_hf(shards, hf_config), hf_state)


def test_wrong_missing_and_unexpected_tensors_are_refused(tiny_hf_dir: Path):
    hf_config, hf_state = _load(tiny_hf_dir)
    kwargs = {"tp_rank": 0, "tp_size": 2, "pp_rank": 0, "pp_size": 1}

    bad = dict(hf_state)
    bad["model.layers.1.self_attn.k_proj.weight"] = bad["model.layers.1.self_attn.k_proj.weight"][:-1]
    with pytest.raises(WeightMappingError, match=r"mis-shaped.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        hf_to_megatron_shard(bad, hf_config, **kwargs)

    missing = {k: v for k, v in hf_state.items() if k != "visual.merger.ln_q.weight"}
    with pytest.raises(WeightMappingError, match=r"missing.*visual\.merger\.ln_q\.weight"):
        hf_to_megatron_shard(missing, hf_config, **kwargs)

    extra = dict(hf_state, **{"model.layers.7.mlp.up_proj.weight": torch.zeros(3)})
    with pytest.raises(WeightMappingError, match=r"unexpected.*model\.layers\.7\.mlp\.up_proj\.weight"):
        hf_to_megatron_shard(extra, hf_config, **kwargs)

    with pytest.raises(UnsupportedConfigError, match="num_key_value_heads=2 not divisible by TP=4"):
        hf_to_megatron_shard(hf_state, hf_config, tp_rank=0, tp_size=4, pp_rank=0, pp_size=1)
    with pytest.raises(UnsupportedConfigError, match="num_hidden_layers=2 not divisible by PP=3"):
        hf_to_megatron_shard(hf_state, hf_config, tp_rank=0, tp_size=1, pp_rank=0, pp_size=3)

    shards = _all_shards(hf_state, hf_config, 2, 1)
    name = "language_model.decoder.layers.0.mlp.linear_fc2.weight"
    shards[(1, 0)][name] = shards[(1, 0)][name][:, :-1]
    del shards[(0, 0)]["language_model.decoder.final_layernorm.weight"]
    with pytest.raises(WeightMappingError) as info:
        megatron_shards_to_hf(shards, hf_config)
    message = str(info.value)
    assert "shard (tp 1, pp 0) mis-shaped" in message and name in message
    assert "shard (tp 0, pp 0) missing" in message and "final_layernorm" in message
    del shards[(1, 0)]
    with pytest.raises(WeightMappingError, match=r"missing shards for \(tp_rank, pp_rank\) \[\(0, 1\), \(1, 0\)\]"):
        megatron_shards_to_hf({(0, 0): shards[(0, 0)], (1, 1): {}}, hf_config)


def test_expected_hf_shapes_cover_the_checkpoint(small_hf_dir: Path):
    hf_config, hf_state = _load(small_hf_dir)
    shapes = expected_hf_shapes(hf_config)
    assert {k: tuple(v) for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in hf_state.items()}


def test_unrepresentable_configs_are_refused_naming_the_field(tiny_hf_dir: Path):
    from megatron_vgpo.models.qwen2_5_vl.config import check_supported

    hf_config, _ = _load(tiny_hf_dir)
    check_supported(hf_config, tp=2, pp=2)
    hf_config.text_config.use_sliding_window = True
    hf_config.text_config.hidden_act = "gelu"
    with pytest.raises(UnsupportedConfigError) as info:
        check_supported(hf_config)
    assert "text_config.use_sliding_window=True" in str(info.value)
    assert "text_config.hidden_act='gelu'" in str(info.value)


def test_lazy_checkpoint_reads_the_same_shards(small_hf_dir: Path):
    hf_config, eager = _load(small_hf_dir)
    lazy = read_hf_state_dict(small_hf_dir, lazy=True)
    assert sorted(lazy) == sorted(eager) and lazy.shape("lm_head.weight") == eager["lm_head.weight"].shape
    for tp_rank, pp_rank in [(1, 0), (0, 1)]:
        kwargs = {"tp_rank": tp_rank, "tp_size": 2, "pp_rank": pp_rank, "pp_size": 2}
        _assert_exact(hf_to_megatron_shard(lazy, hf_config, **kwargs), hf_to_megatron_shard(eager, hf_config, **kwargs))
