"""Distributed checkpoints: cross-layout reload, crash safety, config refusal, optimizer + extra state.

One launch of 4 gloo ranks runs every multi-rank check (a launch costs several seconds). The reference for
"exact" is independent of the checkpoint code: every parameter is filled from a global tensor generated
from its *global* name (seeded by a hash), sliced by the rank's TP/PP coordinates with Megatron's own
partition attributes; after a load at another layout each parameter must equal its slice bit for bit.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from megatron_vgpo.distributed.multiprocess import run_on_ranks

TINY_HF = {
    "model_type": "qwen2_5_vl",
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                      "out_hidden_size": 64, "fullatt_block_indexes": [0], "window_size": 112},
}


def _build_gpt(hf: dict, tp: int, pp: int, *, seed: int = 7) -> torch.nn.Module:
    """A plain Megatron GPTModel (mrope, GQA, SwiGLU, RMSNorm) implementing the text part of ``hf``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_vgpo.distributed.process_groups import init_model_parallel

    init_model_parallel(tp, pp, seed=seed)
    cfg = TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], num_query_groups=hf["num_key_value_heads"],
        ffn_hidden_size=hf["intermediate_size"], normalization="RMSNorm",
        layernorm_epsilon=hf["rms_norm_eps"],
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=True, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, use_cpu_initialization=True,
        mrope_section=hf["rope_scaling"]["mrope_section"],
    )
    return GPTModel(
        cfg, get_gpt_layer_local_spec(), vocab_size=hf["vocab_size"], max_sequence_length=256,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="mrope", rotary_base=int(hf["rope_theta"]),
        share_embeddings_and_output_weights=hf["tie_word_embeddings"],
    )


def _expected_params(model: torch.nn.Module, num_layers: int, salt: int) -> dict[str, torch.Tensor]:
    """Each local parameter's slice of a global tensor seeded by its global (TP1 PP1) name."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    offset = pp_rank * (num_layers // pp)
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(int(parts[2]) + offset)
        global_name = ".".join(parts)
        shape = list(p.shape)
        dim = getattr(p, "partition_dim", -1)
        sharded = getattr(p, "tensor_model_parallel", False)
        if sharded:
            shape[dim] *= tp
        gen = torch.Generator().manual_seed(zlib.crc32(global_name.encode()) + salt)
        full = torch.randn(shape, generator=gen)
        if name.endswith("mlp.linear_fc1.weight"):  # SwiGLU: each TP shard is [gate shard; up shard]
            gate, up = full.chunk(2, dim=0)
            out[name] = torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
        else:
            out[name] = full.chunk(tp, dim=dim)[tp_rank].clone() if sharded else full
    return out


def _fill(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(values[name])


def _mismatches(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach(), values[n])]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _body(rank: int, world_size: int, root: str) -> dict:
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from megatron_vgpo.checkpoint import dist_checkpoint as dc
    from megatron_vgpo.checkpoint.config_check import ConfigMismatchError
    from megatron_vgpo.distributed.process_groups import current_layout

    hf, layers = TINY_HF, TINY_HF["num_hidden_layers"]
    report: dict = {}

    # 1. Save at TP2 (x DP2) with extra state (common) and rank state (per rank).
    model = _build_gpt(hf, tp=2, pp=1)
    _fill(model, _expected_params(model, layers, salt=1))
    rng = torch.get_rng_state()
    path = dc.save_checkpoint(root, model, hf_config=hf, iteration=1,
                              extra_state={"consumed_samples": 96, "epoch": 2},
                              rank_state={"rng": rng, "rank": rank})
    report["saved"] = str(path)

    # 2. Reload at TP1 (x DP4): every parameter equals the global tensor.
    model = _build_gpt(hf, tp=1, pp=1, seed=99)
    loaded = dc.load_checkpoint(root, model, hf_config=hf)
    report["tp1_mismatch"] = _mismatches(model, _expected_params(model, layers, salt=1))
    report["tp1_extra"] = loaded.extra_state
    report["tp1_rank_state_is_none"] = loaded.rank_state is None  # layout changed: not restored

    # 3. Reload at TP2 x PP2 (x DP1).
    model = _build_gpt(hf, tp=2, pp=2, seed=5)
    loaded = dc.load_checkpoint(root, model)
    report["tp2pp2_mismatch"] = _mismatches(model, _expected_params(model, layers, salt=1))
    report["layout"] = (current_layout().tp_rank, current_layout().pp_rank)

    # 4. Crash inside Megatron's sharded save, after the shard files were written (every rank fails).
    _fill(model, _expected_params(model, layers, salt=2))
    original = TorchDistSaveShardedStrategy.save

    def crashing_save(self, sharded_state_dict, checkpoint_dir):
        original(self, sharded_state_dict, checkpoint_dir)
        raise RuntimeError("injected crash after shard files")

    TorchDistSaveShardedStrategy.save = crashing_save
    try:
        dc.save_checkpoint(root, model, hf_config=hf, iteration=2)
        report["crash1_raised"] = False
    except RuntimeError as e:
        report["crash1_raised"] = "injected crash" in str(e)
    finally:
        TorchDistSaveShardedStrategy.save = original
    torch.distributed.barrier()
    report["crash1_tmp_files"] = sorted(p.name for p in (Path(root) / ".tmp.iter_0000002" / "dist").iterdir())
    report["crash1_latest"] = dc.read_latest(root)
    report["crash1_final_exists"] = (Path(root) / "iter_0000002").exists()

    # 5. Crash of rank 0 between the metadata write and the rename (the others wait in the last barrier,
    #    which the test releases by hand, as a dying job would never do).
    from megatron_vgpo.checkpoint import atomic_files

    real_publish = atomic_files.publish_dir
    if rank == 0:
        def failing_publish(tmp, final):
            raise OSError("injected crash before rename")
        atomic_files.publish_dir = failing_publish
    try:
        dc.save_checkpoint(root, model, hf_config=hf, iteration=2)
        report["crash2_raised"] = False
    except OSError as e:
        report["crash2_raised"] = "injected" in str(e)
        torch.distributed.barrier()  # the barrier rank 0 never reached
    finally:
        atomic_files.publish_dir = real_publish
    torch.distributed.barrier()
    report["crash2_latest"] = dc.read_latest(root)
    report["crash2_final_exists"] = (Path(root) / "iter_0000002").exists()

    # The previous checkpoint still loads exactly (here at TP2 x PP2).
    dc.load_checkpoint(root, model)
    report["after_crash_mismatch"] = _mismatches(model, _expected_params(model, layers, salt=1))

    # 6. A mismatched config is refused before any state is touched.
    before = _snapshot(model)
    wrong = json.loads(json.dumps(hf))
    wrong["rms_norm_eps"] = 1e-5
    try:
        dc.load_checkpoint(root, model, hf_config=wrong)
        report["refused_hf"] = ""
    except ConfigMismatchError as e:
        report["refused_hf"] = str(e)
    deeper = dict(hf, num_hidden_layers=6)
    other = _build_gpt(deeper, tp=2, pp=2)
    other_before = _snapshot(other)
    try:
        dc.load_checkpoint(root, other)
        report["refused_model"] = ""
    except ConfigMismatchError as e:
        report["refused_model"] = str(e)
    report["untouched"] = (all(torch.equal(before[n], p) for n, p in model.named_parameters())
                           and all(torch.equal(other_before[n], p) for n, p in other.named_parameters()))
    try:  # saving a model under a config it does not implement writes nothing
        dc.save_checkpoint(root, model, hf_config=deeper, iteration=3)
        report["refused_save"] = ""
    except ConfigMismatchError as e:
        report["refused_save"] = str(e)
    torch.distributed.barrier()
    report["iter3_exists"] = any(p.name.endswith("iter_0000003") for p in Path(root).iterdir())

    # 7. A successful save after the crashes: tmp leftovers replaced, latest moves last.
    _fill(model, _expected_params(model, layers, salt=2))
    dc.save_checkpoint(root, model, hf_config=hf, iteration=2, rank_state={"rank": rank})
    report["final_latest"] = dc.read_latest(root)
    report["leftovers"] = sorted(p.name for p in Path(root).iterdir() if p.name.startswith("."))
    model2 = _build_gpt(hf, tp=2, pp=2, seed=3)
    loaded = dc.load_checkpoint(root, model2)
    report["iter2_mismatch"] = _mismatches(model2, _expected_params(model2, layers, salt=2))
    report["iter2_rank_state"] = loaded.rank_state  # same layout: restored

    # 8. Optimizer state: one Adam step, save, a second step -> reference; a fresh model + optimizer loaded
    #    from the checkpoint must reproduce the second step bit for bit (plain and distributed optimizer).
    for dist_opt in (False, True):
        tag = "distopt" if dist_opt else "plain"
        opt_root = Path(root) / f"opt_{tag}"
        model, ddp, opt = _model_with_optimizer(hf, dist_opt, salt=3)
        _adam_step(ddp, opt, salt=10)
        dc.save_checkpoint(opt_root, ddp, hf_config=hf, iteration=1, optimizer=opt,
                           extra_state={"step": 1})
        _adam_step(ddp, opt, salt=11)
        reference = _snapshot(model)
        model2, ddp2, opt2 = _model_with_optimizer(hf, dist_opt, salt=4)
        loaded = dc.load_checkpoint(opt_root, ddp2, optimizer=opt2)
        _adam_step(ddp2, opt2, salt=11)
        report[f"resume_{tag}"] = [n for n, p in model2.named_parameters() if not torch.equal(p, reference[n])]
        report[f"resume_{tag}_moved"] = any(not torch.equal(p, _expected_params(model2, layers, 3)[n])
                                            for n, p in model2.named_parameters())
        report[f"resume_{tag}_extra"] = loaded.extra_state
    # Distributed-optimizer state cannot change TP/PP: refused before anything is read.
    model3 = _build_gpt(hf, tp=1, pp=1)
    try:
        dc.load_checkpoint(Path(root) / "opt_distopt", model3, optimizer=_tp1_distributed_optimizer())
        report["distopt_relayout"] = ""
    except dc.CheckpointError as e:
        report["distopt_relayout"] = str(e)
    return report


def _tp1_distributed_optimizer():
    """A Megatron distributed optimizer at TP1 x PP1 (to ask for a load at another layout than saved)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_vgpo.checkpoint.config_check import unwrap_model

    model = _build_gpt(TINY_HF, tp=1, pp=1)
    ddp = DistributedDataParallel(config=unwrap_model(model).config, module=model,
                                  ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True))
    return get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True,
                                                  params_dtype=torch.float32), [ddp])


def _model_with_optimizer(hf: dict, dist_opt: bool, salt: int):
    """TP2 (x DP2) GPTModel filled from the global reference, wrapped in DDP, with a Megatron Adam."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = _build_gpt(hf, tp=2, pp=1)
    _fill(model, _expected_params(model, hf["num_hidden_layers"], salt))
    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=dist_opt),
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, use_distributed_optimizer=dist_opt,
                        params_dtype=torch.float32),
        [ddp],
    )
    return model, ddp, opt


def _adam_step(ddp, opt, salt: int) -> None:
    """One optimizer step on deterministic gradients (equal on every DP rank, so no reduction is needed)."""
    from megatron.core import parallel_state as ps

    ddp.zero_grad_buffer()
    with torch.no_grad():
        for name, p in ddp.module.named_parameters():
            # TP-replicated parameters (norms) get the same gradient on every TP rank, as in training.
            tp_coord = ps.get_tensor_model_parallel_rank() * 100 if getattr(p, "tensor_model_parallel", False) else 0
            coord = tp_coord + ps.get_pipeline_model_parallel_rank()
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + salt + coord)
            p.main_grad.copy_(torch.randn(p.shape, generator=gen))
    ok, _, _ = opt.step()
    assert ok


@pytest.mark.multirank
def test_cross_layout_reload_crash_safety_and_refusal(tmp_path):
    root = tmp_path / "ckpt"
    reports = run_on_ranks(_body, world_size=4, args=(str(root),), megatron=True, timeout_s=240)
    for rank, r in enumerate(reports):
        assert r["tp1_mismatch"] == [], r["tp1_mismatch"]
        assert r["tp2pp2_mismatch"] == [], r["tp2pp2_mismatch"]
        assert r["tp1_extra"] == {"consumed_samples": 96, "epoch": 2}
        assert r["tp1_rank_state_is_none"]
        assert r["crash1_raised"] and r["crash1_latest"] == "iter_0000001" and not r["crash1_final_exists"]
        assert any(name.endswith(".distcp") for name in r["crash1_tmp_files"]), r["crash1_tmp_files"]
        assert r["crash2_latest"] == "iter_0000001" and not r["crash2_final_exists"]
        assert r["after_crash_mismatch"] == []
        assert "text.rms_norm_eps" in r["refused_hf"] and "1e-05" in r["refused_hf"], r["refused_hf"]
        assert "num_layers" in r["refused_model"] and "6" in r["refused_model"], r["refused_model"]
        assert "num_layers" in r["refused_save"] and not r["iter3_exists"]
        assert r["untouched"]
        assert r["final_latest"] == "iter_0000002" and r["leftovers"] == []
        assert r["iter2_mismatch"] == [] and r["iter2_rank_state"] == {"rank": rank}
        for tag in ("plain", "distopt"):
            assert r[f"resume_{tag}"] == [], (tag, r[f"resume_{tag}"])
            assert r[f"resume_{tag}_moved"] and r[f"resume_{tag}_extra"] == {"step": 1}
        assert "saved at TP2 x PP1 and cannot load at TP1 x PP1" in r["distopt_relayout"], r["distopt_relayout"]
    assert reports[0]["crash2_raised"]
    assert {r["layout"] for r in reports} == {(0, 0), (1, 0), (0, 1), (1, 1)}
    meta = json.loads((root / "iter_0000002" / "vgpo_checkpoint.json").read_text())
    assert meta["layout"] == {"world_size": 4, "tp": 2, "pp": 2, "cp": 1, "dp": 1}
    assert meta["contents"] == ["model", "rank_state"] and meta["format_version"] == 1
    assert meta["hf_config"]["text_config"]["hidden_size"] == 64


# ------------------------------------------------------------------------------------------------
# Single-process checks (no launch): config comparison and checkpoint path resolution
# ------------------------------------------------------------------------------------------------


def test_config_mismatch_names_every_field_with_both_values():
    from megatron_vgpo.checkpoint.config_check import (
        ConfigMismatchError,
        check_hf_configs_match,
        hf_architecture_fields,
    )
    from megatron_vgpo.models.known_configs import known_config_dict, load_hf_config

    flat = known_config_dict("qwen2.5-vl-7b")
    obj = load_hf_config("qwen2.5-vl-7b")
    nested = obj.to_dict()
    # The same model in three representations: on-disk flat dict, config object, transformers-5 nested dict.
    assert hf_architecture_fields(flat) == hf_architecture_fields(obj) == hf_architecture_fields(nested)
    check_hf_configs_match(flat, nested)
    with pytest.raises(ConfigMismatchError) as info:
        check_hf_configs_match(obj, load_hf_config("qwen2.5-vl-32b"), expected_name="7b", actual_name="32b")
    diffs = info.value.diffs
    assert diffs["text.hidden_size"] == (3584, 5120) and diffs["vision.out_hidden_size"] == (3584, 5120)
    assert diffs["text.num_hidden_layers"] == (28, 64) and diffs["text.num_key_value_heads"] == (4, 8)
    assert "vision.depth" not in diffs and "text.vocab_size" not in diffs  # equal fields are not listed
    assert "text.hidden_size: 7b=3584 vs 32b=5120" in str(info.value)
    assert str(info.value).count("\n") == len(diffs)


def test_known_configs_are_the_published_shapes():
    from megatron_vgpo.checkpoint.config_check import hf_architecture_fields
    from megatron_vgpo.models.known_configs import KNOWN_MODELS, load_hf_config

    rows = {n: hf_architecture_fields(load_hf_config(n)) for n in KNOWN_MODELS}
    shapes = {n: (f["text.hidden_size"], f["text.num_hidden_layers"], f["text.num_attention_heads"],
                  f["text.num_key_value_heads"], f["text.intermediate_size"], f["text.vocab_size"],
                  f["tie_word_embeddings"]) for n, f in rows.items()}
    assert shapes == {
        "qwen2.5-vl-3b": (2048, 36, 16, 2, 11008, 151936, True),
        "qwen2.5-vl-7b": (3584, 28, 28, 4, 18944, 152064, False),
        "qwen2.5-vl-32b": (5120, 64, 40, 8, 27648, 152064, False),
    }
    for f in rows.values():
        assert (f["vision.depth"], f["vision.hidden_size"], f["vision.intermediate_size"], f["vision.num_heads"],
                f["vision.window_size"], f["vision.fullatt_block_indexes"]) == (32, 1280, 3420, 16, 112,
                                                                                 [7, 15, 23, 31])
        assert f["vision.out_hidden_size"] == f["text.hidden_size"]
        assert (f["text.rope_theta"], f["text.mrope_section"], f["text.rms_norm_eps"]) == (1e6, [16, 24, 24], 1e-6)
        assert (f["image_token_id"], f["vision_start_token_id"]) == (151655, 151652)


def test_checkpoint_paths_refuse_incomplete_checkpoints(tmp_path):
    from megatron_vgpo.checkpoint import dist_checkpoint as dc

    root = tmp_path / "ckpt"
    root.mkdir()
    with pytest.raises(dc.CheckpointError, match="neither a checkpoint"):
        dc.resolve_checkpoint(root)
    (root / ".tmp.iter_0000003" / "dist").mkdir(parents=True)  # an interrupted save
    (root / "latest").write_text("iter_0000003\n")
    with pytest.raises(dc.CheckpointError, match="not a complete checkpoint"):
        dc.resolve_checkpoint(root)
    done = root / "iter_0000002"
    done.mkdir()
    (done / dc.META_FILE).write_text(json.dumps({"format_version": 99}))
    (root / "latest").write_text("iter_0000002\n")
    assert dc.resolve_checkpoint(root) == done
    with pytest.raises(dc.CheckpointError, match="format_version 99"):
        dc.read_metadata(root)
    assert dc.checkpoint_name(12) == "iter_0000012"
