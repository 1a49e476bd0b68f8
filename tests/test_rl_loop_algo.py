"""The algorithm switches of issue 11 in real runs of the loop, 4 launches in all (~3 minutes on 2 cores):

* TP2 + SP (2 gloo ranks under torchrun), ONE launch of 2 steps: KL to the frozen starting policy in the
  loss, DAPO overlong shaping, a step that shrinks its mini-batch count under a cosine LR schedule,
  group ids and the rollout dump;
* TP1, one step: the overlong filter takes truncated responses out of the loss;
* TP1, one step then a resume to two: the KL reference is still the starting folder after the resume.

References are restatements in this file: Megatron's cosine formula at the update count, DAPO's
overlong rule, the loss = policy term + kl_coef x KL identity of ``policy_loss``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_rl_loop import _metrics, _train

UID_STRIDE = 1 << 32


def _dump(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]


def _dapo_penalty(length: int, max_len: int, buffer: int, factor: float) -> float:
    if length <= max_len - buffer:
        return 0.0
    return max(-(length - (max_len - buffer)) / buffer, -1.0) * factor


def test_kl_overlong_shaping_and_shrunk_mini_batches_in_a_run(tmp_path: Path):
    """n=3, 2 prompts: 6 trajectories do not split into trainer.mini_batches=4, so each step takes 3 updates
    (logged), and the cosine schedule counts exactly those: the LR of update k is Megatron's cosine at k
    over the planned 2 x 4 = 8 updates."""
    run_dir = tmp_path / "kl"
    lr, decay, factor, buffer, max_len, kl_coef, ent_coef = 1e-3, 8, 0.5, 4, 6, 0.1, 0.01
    _train(run_dir, "trainer.steps=2", "rollout.n=3", "trainer.mini_batches=4", "optimizer.lr_schedule=cosine",
           "algorithm.kl_coef=0.1", "algorithm.kl_estimator=k2", "algorithm.overlong_buffer_len=4",
           "algorithm.overlong_penalty_factor=0.5", "algorithm.entropy_coef=0.01", "logging.rollout_dump=true",
           "trainer.save_every=0", "trainer.val_every=0")
    steps = [r for r in _metrics(run_dir) if "actor/steps" in r]
    assert [r["step"] for r in steps] == [1, 2]
    dump = _dump(run_dir)
    assert [d["step"] for d in dump] == [1, 2]
    taken = 0
    for r, d in zip(steps, dump, strict=True):
        # the shrunk step: 3 mini-batches of 2, counted by the schedule (no update skipped here)
        assert r["actor/mini_batches"] == 3 and r["actor/steps"] == 3 and r["actor/skipped_steps"] == 0
        updates = range(taken + 1, taken + 4)
        taken += 3
        assert r["actor/lr_schedule_step"] == taken
        expected_lr = sum(0.5 * lr * (1 + math.cos(math.pi * k / decay)) for k in updates) / 3
        assert r["actor/lr"] == pytest.approx(expected_lr, rel=1e-6)
        # KL in the loss: loss = pg + kl_coef * KL - ent_coef * entropy (token means, same mini-batches)
        assert math.isfinite(r["actor/kl_ref"]) and r["actor/kl_ref"] >= 0.0
        expected_loss = r["actor/pg_loss"] + kl_coef * r["actor/kl_ref"] - ent_coef * r["actor/entropy"]
        assert r["actor/loss"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-9)
        # overlong shaping: reward = raw score + DAPO penalty; filter off, so every sampled group is kept
        groups = d["groups"]
        assert len(groups) == 2 and r["rollout/kept_groups"] == 2 and r["rollout/filtered_groups"] == 0
        assert [g["uid"] for g in groups] == [(r["step"] - 1) * UID_STRIDE + k for k in range(2)]
        penalties, truncated = [], []
        for g in groups:
            assert len(g["scores"]) == 3
            for score, reward, length, cut in zip(g["scores"], g["rewards"], g["lengths"], g["truncated"],
                                                  strict=True):
                penalty = _dapo_penalty(length, max_len, buffer, factor)
                assert reward == pytest.approx(score + penalty, abs=1e-6)
                penalties.append(penalty)
                truncated.append(cut)
                assert length == max_len or not cut  # truncated: max_new_tokens long, no end token
        assert r["rollout/overlong_penalty_mean"] == pytest.approx(sum(penalties) / 6, abs=1e-6)
        assert r["rollout/overlong_fraction"] == pytest.approx(sum(truncated) / 6)
        assert r["actor/tokens"] == sum(sum(g["lengths"]) for g in groups)  # no overlong filter
    assert steps[1]["actor/kl_ref"] > 1e-7  # the policy moved away from the reference
    assert any(p < 0 for d in dump for g in d["groups"] for p in
               [_dapo_penalty(n, max_len, buffer, factor) for n in g["lengths"]])  # the shaping is exercised


def test_overlong_filter_drops_truncated_tokens_from_the_loss(tmp_path: Path):
    run_dir = tmp_path / "filter"
    _train(run_dir, "trainer.steps=1", "parallel.tp=1", "parallel.sp=false", "rollout.max_new_tokens=8",
           "algorithm.overlong_filter=true", "logging.rollout_dump=true", "trainer.save_every=0",
           "trainer.val_every=0")
    (r,) = [r for r in _metrics(run_dir) if "actor/steps" in r]
    (d,) = _dump(run_dir)
    kept_tokens = sum(n for g in d["groups"] for n, cut in zip(g["lengths"], g["truncated"], strict=True)
                      if not cut)
    all_tokens = sum(sum(g["lengths"]) for g in d["groups"])
    assert all_tokens > kept_tokens  # some responses were truncated (the random policy rarely ends early)
    assert r["actor/tokens"] == kept_tokens
    cuts = [c for g in d["groups"] for c in g["truncated"]]
    assert r["rollout/overlong_fraction"] == pytest.approx(sum(cuts) / len(cuts))
    assert "rollout/overlong_penalty_mean" not in r  # shaping off by default


def test_kl_reference_stays_the_starting_policy_after_a_resume(tmp_path: Path):
    """One update per step (mini_batches=1): the KL of a step's only mini-batch is taken before its update,
    so at step 1 it is 0 (policy == reference) and after the resume at step 2 it is > 0 only if the
    reference is still the starting folder (a reference rebuilt from the step-1 checkpoint would give 0)."""
    run_dir = tmp_path / "kl_resume"
    # the entropy bonus moves the policy even when every reward (so every advantage) is 0
    common = ["parallel.tp=1", "parallel.sp=false", "algorithm.kl_coef=0.1", "algorithm.entropy_coef=0.01",
              "trainer.val_every=0"]
    _train(run_dir, "trainer.steps=1", *common)
    summary = _train(run_dir, "trainer.steps=2", *common)
    assert summary["resumed_from_step"] == 1
    steps = [r for r in _metrics(run_dir) if "actor/steps" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["actor/mini_batches"] == 1 for r in steps)
    assert steps[0]["actor/kl_ref"] == pytest.approx(0.0, abs=1e-9)
    assert steps[1]["actor/kl_ref"] > 1e-7
