"""The example YAMLs: every file loads, the paper numbers are the spec's, and each layout fits its model.

"Spec" is ``/work/shared/VGPO_SPEC.md``; the expected values below are written out from the cited sections
(not read from the YAML files), so a wrong edit to an example fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from megatron_vgpo.checkpoint.memory_plan import LayoutError, check_layout
from megatron_vgpo.config import TrainConfig, build, load_config, read_yaml, to_dict
from megatron_vgpo.models.known_configs import known_config_dict, load_hf_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALL_YAML = sorted(EXAMPLES.glob("*.yaml"))
PAPER_YAML = sorted(p for p in ALL_YAML if p.name != "tiny_cpu.yaml")
VGPO_7B = EXAMPLES / "qwen2_5_vl_7b_virl39k_vgpo.yaml"
BASELINES_7B = [EXAMPLES / f"qwen2_5_vl_7b_virl39k_{name}.yaml" for name in ("grpo", "dapo")]

#: Model named by each paper example (file-name prefix -> known_configs name).
MODEL_OF_PREFIX = {"qwen2_5_vl_3b": "qwen2.5-vl-3b", "qwen2_5_vl_7b": "qwen2.5-vl-7b",
                   "qwen2_5_vl_32b": "qwen2.5-vl-32b"}

# Spec 5.1 (data), 5.3 (DAPO components), 5.4 (rollout and optimisation), 1.3 (VGPO keys), 6 (evaluation).
SPEC_5_1_DATA = {"prompt_key": "problem", "answer_key": "answer", "image_key": "images",
                 "max_prompt_length": 4096, "min_pixels": 262_144, "max_pixels": 4_194_304}
SPEC_5_4_ROLLOUT = {"n": 8, "temperature": 1.0, "top_p": 0.99, "max_new_tokens": 2048}
SPEC_5_4_OPTIMIZER = {"lr": 1e-6, "weight_decay": 0.01, "betas": (0.9, 0.999), "clip_grad": 1.0,
                      "lr_schedule": "constant", "warmup_steps": 0}
SPEC_5_4_TRAINER = {"mini_batches": 4, "val_every": 5, "save_every": 5}
SPEC_5_3_ALGORITHM = {"estimator": "grpo", "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0,
                      "loss_agg": "token-mean", "entropy_coef": 0.0, "accuracy_bounds": (0.01, 0.99)}
SPEC_1_3_VGPO = {"intra": True, "inter": True, "compensation": True, "gating": True, "beta": 0.3, "gamma": 0.5,
                 "kappa": 0.2, "schedule": "linear", "schedule_start": 0.0, "exponent": 2.0, "step_at": 0.5,
                 "rollout_n": 8, "token_clamp": (0.1, 2.0), "traj_clamp": (0.9, 2.0)}
SPEC_5_1_VIRL39K_PROMPTS = 38_900  # "about 38.9k image questions"
SPEC_5_4_PROMPTS_PER_STEP = 512
SPEC_5_4_EPOCHS = 2
SPEC_6_EVAL_MAX_NEW_TOKENS = 2048


def _section(cfg: Any, expected: dict[str, Any]) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in expected}


def _model_of(path: Path) -> str:
    prefix = "_".join(path.stem.split("_")[:4])
    return MODEL_OF_PREFIX[prefix]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def test_the_expected_examples_exist() -> None:
    names = {p.name for p in PAPER_YAML}
    assert {"qwen2_5_vl_7b_virl39k_vgpo.yaml", "qwen2_5_vl_7b_virl39k_grpo.yaml",
            "qwen2_5_vl_7b_virl39k_dapo.yaml", "qwen2_5_vl_3b_virl39k_vgpo.yaml",
            "qwen2_5_vl_32b_virl39k_vgpo.yaml", "qwen2_5_vl_7b_geo3k_vgpo.yaml",
            "qwen2_5_vl_7b_mmk12_vgpo.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_every_example_loads_and_round_trips(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    # the dump of the loaded config builds the same config (what checkpoints and summaries record)
    assert build(TrainConfig, to_dict(cfg)) == cfg
    # every key the file names is a schema key (load_config would have raised) and is not a typo'd duplicate
    assert set(_flatten(read_yaml(path))) <= set(_flatten(to_dict(cfg))) | {"rollout.engine_kwargs.mem_fraction_static"}


@pytest.mark.parametrize("path", PAPER_YAML, ids=lambda p: p.name)
def test_paper_examples_use_the_spec_numbers(path: Path) -> None:
    cfg = load_config(path)
    assert _section(cfg.data, SPEC_5_1_DATA) == SPEC_5_1_DATA
    assert _section(cfg.rollout, SPEC_5_4_ROLLOUT) == SPEC_5_4_ROLLOUT
    assert cfg.rollout.backend == "sglang"
    assert _section(cfg.optimizer, SPEC_5_4_OPTIMIZER) == SPEC_5_4_OPTIMIZER
    assert _section(cfg.trainer, SPEC_5_4_TRAINER) == SPEC_5_4_TRAINER
    assert cfg.validation.max_new_tokens == SPEC_6_EVAL_MAX_NEW_TOKENS  # spec 6: greedy, 2,048 new tokens
    assert cfg.model.dtype == "bfloat16"  # spec 5.4: bf16
    assert cfg.seed == 1  # spec 5.1 / 5.4: seed 1
    assert cfg.algorithm.vgpo.rollout_n == cfg.rollout.n  # spec 1.3: rollout_n is set to rollout.n
    assert bool(cfg.data.train_files) and bool(cfg.data.val_files)
    assert cfg.model.hf_dir is not None and _model_of(path).split("-")[-1] in cfg.model.hf_dir.lower()
    assert not cfg.sft.enabled
    # every VGPO-named file is the spec's VGPO: paper-mode switches and the released hyper-parameters
    if path.stem.endswith("_vgpo"):
        assert cfg.algorithm.name == "vgpo"
        assert _section(cfg.algorithm, SPEC_5_3_ALGORITHM) == SPEC_5_3_ALGORITHM
        assert cfg.algorithm.uses_dynamic_sampling
        assert _section(cfg.algorithm.vgpo, SPEC_1_3_VGPO) == SPEC_1_3_VGPO
        # spec 10: the recommended default is "paper" mode
        assert (cfg.algorithm.vgpo.focus_norm, cfg.algorithm.vgpo.grouping) == ("affine", "uid")


@pytest.mark.parametrize("path", [p for p in PAPER_YAML if "virl39k" in p.name], ids=lambda p: p.name)
def test_virl39k_schedule_is_two_epochs_of_512_prompts(path: Path) -> None:
    cfg = load_config(path)
    # spec 5.4: steps = 2 * floor(N_train / 512), about 150 for N of about 38.9k (spec 5.1)
    assert cfg.trainer.prompts_per_step == SPEC_5_4_PROMPTS_PER_STEP
    assert cfg.trainer.steps == SPEC_5_4_EPOCHS * (SPEC_5_1_VIRL39K_PROMPTS // SPEC_5_4_PROMPTS_PER_STEP) == 150


def test_7b_baselines_differ_from_vgpo_only_in_the_algorithm_section() -> None:
    vgpo_raw = read_yaml(VGPO_7B)
    vgpo_cfg = to_dict(load_config(VGPO_7B))
    for path in BASELINES_7B:
        name = path.stem.rsplit("_", 1)[-1]
        raw = read_yaml(path)
        # run_dir also differs, on purpose: a baseline must not resume from the VGPO run's checkpoints
        assert raw["run_dir"] != vgpo_raw["run_dir"] and name in raw["run_dir"]
        strip = ("algorithm", "run_dir")
        assert {k: v for k, v in raw.items() if k not in strip} == \
            {k: v for k, v in vgpo_raw.items() if k not in strip}
        cfg = to_dict(load_config(path))
        assert {k: v for k, v in cfg.items() if k not in strip} == \
            {k: v for k, v in vgpo_cfg.items() if k not in strip}
        assert cfg["algorithm"]["name"] == name
        # the VGPO block is carried unchanged (ignored unless name: vgpo)
        assert cfg["algorithm"]["vgpo"] == vgpo_cfg["algorithm"]["vgpo"]
        # with the name set back to vgpo, only the documented baseline choices remain different
        diff = {k for k, v in _flatten(cfg["algorithm"]).items() if _flatten(vgpo_cfg["algorithm"])[k] != v}
        expected = {"dapo": {"name"}, "grpo": {"name", "clip_high", "dynamic_sampling", "loss_agg"}}[name]
        assert diff == expected


def test_grpo_and_dapo_mean_what_their_files_say() -> None:
    grpo = load_config(BASELINES_7B[0]).algorithm
    dapo = load_config(BASELINES_7B[1]).algorithm
    # GRPO: symmetric clip, every group trained on; DAPO: the spec 5.3 base of the released run
    assert (grpo.clip_low, grpo.clip_high, grpo.uses_dynamic_sampling) == (0.2, 0.2, False)
    assert _section(dapo, SPEC_5_3_ALGORITHM) == SPEC_5_3_ALGORITHM and dapo.uses_dynamic_sampling


@pytest.mark.parametrize("path", PAPER_YAML, ids=lambda p: p.name)
def test_layout_fits_the_named_model(path: Path) -> None:
    cfg = load_config(path)
    hf = load_hf_config(_model_of(path))
    check_layout(hf, cfg.parallel.tp, cfg.parallel.pp)  # raises LayoutError naming the field otherwise
    raw = known_config_dict(_model_of(path))
    assert raw["num_attention_heads"] % cfg.parallel.tp == 0
    assert raw["num_key_value_heads"] % cfg.parallel.tp == 0
    assert raw["num_hidden_layers"] % cfg.parallel.pp == 0
    # a micro-batch holds at least one full prompt + response
    assert cfg.trainer.micro_batch_tokens >= cfg.data.max_prompt_length + cfg.rollout.max_new_tokens


@pytest.mark.parametrize(("model", "too_wide_tp"), [("qwen2.5-vl-3b", 4), ("qwen2.5-vl-7b", 8),
                                                    ("qwen2.5-vl-32b", 16)])
def test_layout_check_rejects_tp_beyond_the_kv_heads(model: str, too_wide_tp: int) -> None:
    # the check the examples pass is not vacuous: one step wider than the KV heads allow fails
    with pytest.raises(LayoutError, match="num_key_value_heads"):
        check_layout(load_hf_config(model), too_wide_tp, 1)


def _readme_commands() -> list[list[str]]:
    text = (EXAMPLES / "README.md").read_text()
    lines = [line for line in text.splitlines() if re.match(r"^megatron-vgpo train examples/\S+\.yaml", line)]
    return [shlex.split(line)[2:] for line in lines]


ABLATIONS = {  # run_dir -> the VGPO fields the README line must set (spec 1.3, 9 A7, 10)
    "runs/ablate_intra_only": {"intra": True, "inter": False},
    "runs/ablate_inter_only": {"intra": False, "inter": True},
    "runs/ablate_no_compensation": {"compensation": False},
    "runs/ablate_no_gating": {"gating": False, "compensation": True},
    "runs/ablate_schedule_linear": {"schedule": "linear"},
    "runs/ablate_schedule_exponential": {"schedule": "exponential"},
    "runs/ablate_schedule_step": {"schedule": "step"},
    "runs/ablate_scope_full": {"compensation_scope": "full"},
    "runs/ablate_scope_late": {"compensation_scope": "late"},
    "runs/ablate_reference_code": {"focus_norm": "batch_minmax", "grouping": "reference_blocks",
                                   "imageless": "reference", "bf16_focus": True},
}


def test_readme_ablation_commands_load_and_set_what_they_claim() -> None:
    commands = _readme_commands()
    base = load_config(VGPO_7B)
    seen = {}
    for path, *overrides in commands:
        cfg = load_config(EXAMPLES.parent / path, overrides)
        seen[cfg.run_dir] = cfg
        assert cfg.algorithm.name == "vgpo"
        # an ablation touches run_dir and algorithm.vgpo only
        assert all(o.startswith(("run_dir=", "algorithm.vgpo.")) for o in overrides), overrides
        assert _flatten(to_dict(cfg.algorithm.vgpo)) != _flatten(to_dict(base.algorithm.vgpo)) or \
            cfg.run_dir in ("runs/ablate_schedule_linear", "runs/ablate_scope_full")  # the defaults, named
    assert set(seen) == set(ABLATIONS)
    for run_dir, expected in ABLATIONS.items():
        assert _section(seen[run_dir].algorithm.vgpo, expected) == expected, run_dir
