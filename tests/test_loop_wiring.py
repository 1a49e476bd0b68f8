"""The loop uses what the math tests test: real runs of a few RL steps on gloo ranks, checked against the
pure functions of ``megatron_vgpo.algo`` recomputed here from what the run recorded.

Each check would fail if the loop (a) trained on plain GRPO advantages instead of ``apply_vgpo``'s,
(b) kept every group instead of DAPO's dynamic-sampling filter, (c) never pushed the new weights into the
rollout engine. The runs start from a short SFT warm start (built once for the module) so that sampled
groups have mixed rewards, and run at DP=2 (TP1) and TP2 x DP2 with dynamic sampling on, including a
checkpoint and an exact resume at DP=2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_rl_loop import run_job

REPO = Path(__file__).resolve().parents[1]
TINY = ["optimizer.lr_schedule=constant", "optimizer.warmup_steps=0", "data.synthetic.num=200",
        "validation.num_samples=8", "validation.max_new_tokens=12", "rollout.max_new_tokens=12",
        "rollout.backend=hf", "logging.tensorboard=false"]
RL = ["sft.enabled=false", "trainer.prompts_per_step=4", "rollout.n=4", "trainer.mini_batches=2",
      "optimizer.lr=1e-3", "trainer.val_every=0", "trainer.dump_tensors=true", "rollout.verify_sync_every=1",
      "algorithm.name=vgpo", "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=6"]


def _train(run_dir: Path, *overrides: str) -> dict:
    return run_job(run_dir, *TINY, *overrides)


def _step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "actor/steps" in r]


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SFT-only job (120 steps of 32, 1 rank): its export answers in ``\\boxed{}``, right for some of the
    images (10-40% greedy), so sampled groups have mixed rewards."""
    run_dir = tmp_path_factory.mktemp("wiring") / "sft"
    _train(run_dir, "parallel.tp=1", "parallel.sp=false", "trainer.steps=0", "sft.max_steps=120",
           "sft.batch_size=32", "sft.eval_every=120", "sft.eval_samples=8", "sft.warmup_steps=10")
    assert (run_dir / "sft_model" / "config.json").is_file()
    return run_dir / "sft_model"


def _dumps(run_dir: Path, step: int, ranks: int) -> list[dict]:
    return [torch.load(run_dir / "dump" / f"step_{step:06d}_rank_{r}.pt") for r in range(ranks)]


def _concat(parts: list[dict], key: str) -> torch.Tensor:
    """Rank-order concatenation; per-token fields are right-padded with 0 to the widest rank's R."""
    tensors = [p[key] for p in parts]
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


def _check_vgpo_step(parts: list[dict], cfg_vgpo: object) -> None:
    """(a) + (b): the advantages trained on equal ``apply_vgpo`` of the step's inputs, recomputed in float64 on
    the whole step (all DP ranks), and differ from GRPO's; every kept group has mixed rewards."""
    from megatron_vgpo.algo.advantages import compute_outcome_advantages
    from megatron_vgpo.algo.vgpo import apply_vgpo, compute_vgpo_factors, focus_from_cosine

    uids, rewards = _concat(parts, "uids"), _concat(parts, "rewards").double()
    mask, trained = _concat(parts, "response_mask").bool(), _concat(parts, "advantages").double()
    cos, has_image = _concat(parts, "focus_cos").double(), _concat(parts, "has_image")
    for uid in uids.unique():
        group = rewards[uids == uid]
        assert 0 < group.mean() < 1, f"group {int(uid)} kept by dynamic sampling has rewards {group.tolist()}"
    outcome = compute_outcome_advantages(rewards, uids, estimator="grpo")
    rho = focus_from_cosine(cos, mask, cfg_vgpo, has_image)
    factors = compute_vgpo_factors(rho, mask, uids, cfg_vgpo, has_image)
    expected = apply_vgpo(outcome, factors, mask)
    torch.testing.assert_close(trained, expected, atol=1e-5, rtol=1e-4)
    grpo = outcome[:, None] * mask
    assert (trained - grpo).abs().max() > 1e-3, "VGPO trained on the plain GRPO advantages"


def _check_sync(records: list[dict]) -> None:
    """(c): after every sync the engine scores the probe as the actor does, and the policy has moved."""
    for r in records:
        assert r["sync/probe_max_abs_diff"] <= 1e-5, r
    assert records[-1]["sync/probe_change_from_start"] > 1e-4


def test_dp2_vgpo_dynamic_sampling_wiring_and_exact_resume(warm_start: Path, tmp_path: Path):
    """DP=2 (TP1): wiring checks (a), (b), (c) on every step; a checkpoint at step 2, a resume to step 3 that
    repeats step 3 of an uninterrupted run exactly (same kept groups, same advantages)."""
    from megatron_vgpo.config import load_config

    layout = ["parallel.tp=1", "parallel.sp=false", "parallel.dp=2", f"model.hf_dir={warm_start}"]
    full = tmp_path / "full"
    summary = _train(full, *layout, *RL, "trainer.steps=3", "trainer.save_every=2")
    assert summary["steps"] == 3
    records = _step_records(full)
    assert [r["step"] for r in records] == [1, 2, 3]
    vgpo_cfg = load_config(REPO / "examples/tiny_cpu.yaml", []).algorithm.vgpo
    for r in records:
        assert 1 <= r["rollout/kept_groups"] <= 4
        assert r["rollout/groups_seen"] == (r["rollout/kept_groups"] + r["rollout/filtered_groups"]
                                            + r["rollout/dropped_groups"])
        _check_vgpo_step(_dumps(full, r["step"], 2), vgpo_cfg)
    assert sum(r["rollout/filtered_groups"] for r in records) > 0  # the filter had groups to drop, and said so
    _check_sync(records)

    resumed = tmp_path / "resumed"
    _train(resumed, *layout, *RL, "trainer.steps=2", "trainer.save_every=2")
    summary = _train(resumed, *layout, *RL, "trainer.steps=3", "trainer.save_every=2")
    assert summary["resumed_from_step"] == 2
    again, first = _dumps(resumed, 3, 2), _dumps(full, 3, 2)
    for a, b in zip(again, first):
        for key in ("uids", "rewards", "advantages", "old_log_probs"):
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_tp2_dp2_vgpo_dynamic_sampling_wiring(warm_start: Path, tmp_path: Path):
    """TP2 + SP x DP2 (4 ranks): the same wiring checks on 2 steps."""
    from megatron_vgpo.config import load_config

    run_dir = tmp_path / "tp2dp2"
    _train(run_dir, "parallel.tp=2", "parallel.sp=true", "parallel.dp=2", f"model.hf_dir={warm_start}", *RL,
           "trainer.steps=2", "trainer.save_every=0")
    records = _step_records(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    vgpo_cfg = load_config(REPO / "examples/tiny_cpu.yaml", []).algorithm.vgpo
    for r in records:
        # Megatron's rank order is tp-cp-dp-pp: ranks 0, 1 are DP rank 0's TP pair, ranks 2, 3 DP rank 1's
        parts = _dumps(run_dir, r["step"], 4)
        _check_vgpo_step([parts[0], parts[2]], vgpo_cfg)
        torch.testing.assert_close(parts[0]["advantages"], parts[1]["advantages"])  # TP peers agree
    _check_sync(records)


def test_invalid_layout_is_one_line_before_any_rank_starts(tmp_path: Path):
    command = [sys.executable, "-m", "megatron_vgpo.train", str(REPO / "examples/tiny_cpu.yaml"),
               f"run_dir={tmp_path / 'bad'}", "parallel.tp=3", "sft.enabled=false", "trainer.steps=1",
               "optimizer.lr_schedule=constant", "data.synthetic.num=20"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "layout error" in line]
    assert len(errors) == 1 and "num_attention_heads=4 not divisible by TP=3" in errors[0]
    assert "Traceback" not in proc.stderr and "torchrun" not in proc.stderr
