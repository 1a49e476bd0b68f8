"""``collect_rollouts`` with the real transformers engine, grader and synthetic data (one process).

The tiny random policy never answers correctly, so the accuracy bounds choose the path: ``(0.99, 1.0)``
keeps no group (the rounds run out), ``(-1, 2)`` keeps every group (the filter runs and passes all).
Covered: both ``algorithm.sampling_exhausted`` paths, group ids unique by construction,
an odd ``rollout.n`` with an even data-parallel size (whole groups, trajectories divisible by dp), and the
up-front refusal of a batch too small to split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

UID_STRIDE = 1 << 32


@pytest.fixture(scope="module")
def parts(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoProcessor

    from megatron_vgpo.data import PromptDataset
    from megatron_vgpo.data.synthetic import make_synthetic_splits
    from megatron_vgpo.reward import RewardGrader
    from megatron_vgpo.rollout.hf_backend import HFRolloutEngine

    paths = make_synthetic_splits(tmp_path_factory.mktemp("data"), 24, seed=3, test_fraction=0.5)
    processor = AutoProcessor.from_pretrained(tiny_hf_dir)
    grader = RewardGrader(num_workers=0, timeout_s=10.0)
    yield {"dataset": PromptDataset([paths["train"]], processor), "engine": HFRolloutEngine(tiny_hf_dir),
           "grader": grader,
           "decode": lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True)}
    grader.close()


def _collect(parts: dict[str, Any], overrides: list[str], *, step: int = 0, dp: int = 1) -> Any:
    from megatron_vgpo.config import load_config
    from megatron_vgpo.data import PromptSampler
    from megatron_vgpo.trainer.rl_step import collect_rollouts

    cfg = load_config(None, ["rollout.max_new_tokens=2", "rollout.n=2", *overrides])
    dataset = parts["dataset"]
    sampler = PromptSampler(len(dataset), cfg.trainer.prompts_per_step, seed=0, drop_last=False)
    drawn: list[list[int]] = []

    def next_prompts() -> list[int]:  # a batch may be larger than the dataset: indices repeat
        batch: list[int] = []
        while len(batch) < cfg.trainer.prompts_per_step:
            batch += sampler.next_batch()
        drawn.append(batch[: cfg.trainer.prompts_per_step])
        return drawn[-1]

    out = collect_rollouts(parts["engine"], dataset, next_prompts, parts["grader"], parts["decode"], cfg, step,
                           dp=dp)
    out.drawn = drawn
    return out


def test_rounds_run_out_train_on_partial_or_raise(parts):
    from megatron_vgpo.algo.dynamic_sampling import DynamicSamplingExhausted

    never = ["algorithm.dynamic_sampling=true", "algorithm.accuracy_bounds=[0.99,1.0]",
             "algorithm.max_sampling_rounds=2", "trainer.prompts_per_step=2"]
    out = _collect(parts, never)  # default sampling_exhausted=train: an empty step, counted
    assert len(out) == 0 and out.uid == [] and len(out.drawn) == 2
    m = out.metrics
    assert (m["rollout/rounds"], m["rollout/kept_groups"], m["rollout/groups_seen"]) == (2, 0, 4)
    assert m["rollout/filtered_groups"] == 4 and m["rollout/exhausted"] == 1.0
    assert m["rollout/reward_mean"] == 0.0
    with pytest.raises(DynamicSamplingExhausted, match="max_rounds=2"):
        _collect(parts, [*never, "algorithm.sampling_exhausted=raise"])


def test_group_ids_are_step_stride_plus_arrival_index(parts):
    """uid = step * 2**32 + the group's arrival index in the step (the buffer test checks that index stays
    unique over rounds of 1,500 groups; at 1,100 prompts a step here takes 2 minutes on 2 cores)."""
    out = _collect(parts, ["trainer.prompts_per_step=40", "rollout.n=1", "rollout.max_new_tokens=1",
                           "algorithm.dynamic_sampling=false"], step=3)
    assert len(out) == 40 and len(set(out.uid)) == 40
    assert out.uid == [3 * UID_STRIDE + k for k in range(40)]
    assert out.prompt_index == out.drawn[0]  # indices repeat (12 training rows): still 40 distinct groups
    assert out.metrics["rollout/kept_groups"] == 40 and out.metrics["rollout/filtered_groups"] == 0


def test_odd_n_with_even_dp_keeps_whole_groups_divisible_by_dp(parts):
    from megatron_vgpo.config import load_config
    from megatron_vgpo.trainer.rl_step import check_group_layout

    for mode in (["algorithm.dynamic_sampling=false"],
                 ["algorithm.dynamic_sampling=true", "algorithm.accuracy_bounds=[-1.0,2.0]",
                  "algorithm.max_sampling_rounds=0"]):
        out = _collect(parts, ["rollout.n=3", "trainer.prompts_per_step=3", *mode], dp=2)
        assert len(out) == 6 and len(out) % 2 == 0, mode  # 2 of the 3 groups: 3 x 2 trajectories
        assert out.uid == [0] * 3 + [1] * 3 and out.prompt_index == [out.drawn[0][0]] * 3 + [out.drawn[0][1]] * 3
        assert out.metrics["rollout/kept_groups"] == 2 and out.metrics["rollout/dropped_groups"] == 1, mode
        assert len(out.drawn) == 1
    # 1 prompt of 3 samples cannot be split over 2 ranks at all: refused before any step
    with pytest.raises(ValueError, match=r"trainer\.prompts_per_step=1 with rollout\.n=3 cannot be split over 2"):
        check_group_layout(load_config(None, ["rollout.n=3", "trainer.prompts_per_step=1"]), 2)
    check_group_layout(load_config(None, ["rollout.n=4", "trainer.prompts_per_step=1"]), 2)  # 4 split evenly


@pytest.mark.parametrize(("overrides", "message"), [
    (["algorithm.kl_coef=-0.1"], "algorithm: kl_coef must be >= 0"),
    (["algorithm.kl_estimator=k4"], "algorithm.kl_estimator: expected one of ['k1', 'k2', 'k3']"),
    (["algorithm.overlong_buffer_len=-1"], "overlong_buffer_len (-1) and overlong_penalty_factor"),
    (["rollout.max_new_tokens=16", "algorithm.overlong_buffer_len=32"],
     "algorithm.overlong_buffer_len (32) must be <= rollout.max_new_tokens (16)"),
    (["algorithm.sampling_exhausted=stop"], "algorithm.sampling_exhausted: expected one of ['train', 'raise']"),
])
def test_algorithm_keys_refuse_bad_values(overrides: list[str], message: str) -> None:
    from megatron_vgpo.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    cfg = load_config(None, ["algorithm.overlong_buffer_len=8", "algorithm.overlong_penalty_factor=0"])
    assert not cfg.algorithm.uses_overlong_shaping and cfg.algorithm.kl_coef == 0.0  # the defaults: off
