"""Policy loss vs a float64 per-token loop restatement, and the global token-mean split invariance."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from megatron_vgpo.algo.losses import policy_loss, scale_for_dp_average


def ref_token_loss(lp, old, adv, ref, ent, clip_low, clip_high, dual, clamp, kl_coef, kl_type, ent_coef):
    """Per-token loss and flags, written from the DAPO / EasyR1 definitions (spec 5.3)."""
    d = min(max(lp - old, -clamp), clamp)
    ratio = math.exp(d)
    clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
    pg = max(-adv * ratio, -adv * clipped)
    dual_hit = False
    if dual is not None and adv < 0 and pg > -adv * dual:
        pg, dual_hit = -adv * dual, True
    loss = pg
    if ref is not None:
        x = lp - ref
        if kl_type in ("k1", "kl"):
            kl = x
        elif kl_type == "abs":
            kl = abs(x)
        elif kl_type in ("k2", "mse"):
            kl = 0.5 * x * x
        else:
            kl = min(max(math.exp(-x) + x - 1.0, -10.0), 10.0)
        loss += kl_coef * kl
    if ent is not None:
        loss -= ent_coef * ent
    return loss, pg, ratio, d, dual_hit


def make_batch(rng: np.random.Generator, B: int, T: int, spread: float = 0.5):
    lengths = rng.integers(0, T + 1, size=B)
    lengths[0] = T
    mask = np.arange(T)[None, :] < lengths[:, None]
    lp = rng.normal(-1.0, 0.5, size=(B, T))
    old = lp + rng.normal(0.0, spread, size=(B, T))
    adv = np.repeat(rng.normal(size=(B, 1)), T, axis=1) * (0.5 + rng.random((B, T)))
    ref = lp + rng.normal(0.0, 0.3, size=(B, T))
    ent = rng.random((B, T))
    return mask, lp, old, adv, ref, ent


def ref_aggregate(per_token: np.ndarray, mask: np.ndarray, agg: str) -> float:
    if agg == "token-mean":
        return float((per_token * mask).sum() / max(mask.sum(), 1))
    seq_vals = []
    for i in range(mask.shape[0]):
        L = int(mask[i].sum())
        if L == 0:
            continue
        s = sum(per_token[i, t] for t in range(mask.shape[1]) if mask[i, t])
        seq_vals.append(s / L if agg == "seq-mean-token-mean" else s)
    return sum(seq_vals) / max(len(seq_vals), 1)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("kl_type", ["k1", "abs", "mse", "low_var_kl"])
def test_matches_restatement(agg: str, kl_type: str) -> None:
    rng = np.random.default_rng(len(agg) * 10 + len(kl_type))
    B, T = 10, 8
    mask, lp, old, adv, ref, ent = make_batch(rng, B, T, spread=1.0)
    lp[1, 0], old[1, 0] = 30.0, 0.0  # exercises the log-ratio clamp
    # Row 0 is full length: force one high-clipped, one low-clipped and one dual-clipped token.
    old[0, 1:4] = lp[0, 1:4] - np.array([0.5, -0.5, 2.0])
    adv[0, 1:4] = [1.0, -1.0, -1.0]
    kw = dict(clip_low=0.2, clip_high=0.28, dual=3.0, clamp=20.0, kl_coef=0.05, kl_type=kl_type, ent_coef=0.01)
    per_token = np.zeros((B, T))
    flags = {"high": [], "low": [], "dual": [], "approx_kl": [], "pg": []}
    for i in range(B):
        for t in range(T):
            loss, pg, ratio, d, dual_hit = ref_token_loss(
                lp[i, t], old[i, t], adv[i, t], ref[i, t], ent[i, t], kw["clip_low"], kw["clip_high"],
                kw["dual"], kw["clamp"], kw["kl_coef"], kw["kl_type"], kw["ent_coef"],
            )  # fmt: skip
            per_token[i, t] = loss
            if mask[i, t]:
                flags["high"].append(adv[i, t] > 0 and ratio > 1.28)
                flags["low"].append(adv[i, t] < 0 and ratio < 0.8)
                flags["dual"].append(dual_hit)
                flags["approx_kl"].append(math.exp(d) - 1 - d)
                flags["pg"].append(pg)
    lp_t = torch.tensor(lp, requires_grad=True)
    loss, metrics = policy_loss(
        lp_t, torch.tensor(old), torch.tensor(adv), torch.tensor(mask), agg=agg,
        ref_log_probs=torch.tensor(ref), kl_coef=0.05, kl_type=kl_type,
        entropy=torch.tensor(ent), entropy_coef=0.01,
    )  # fmt: skip
    assert float(loss.detach()) == pytest.approx(ref_aggregate(per_token, mask, agg), rel=1e-10, abs=1e-12)
    assert float(metrics["pg_clipfrac_high"]) == pytest.approx(np.mean(flags["high"]))
    assert float(metrics["pg_clipfrac_low"]) == pytest.approx(np.mean(flags["low"]))
    assert float(metrics["pg_clipfrac_dual"]) == pytest.approx(np.mean(flags["dual"]))
    assert float(metrics["approx_kl"]) == pytest.approx(np.mean(flags["approx_kl"]), rel=1e-10)
    assert float(metrics["pg_loss"]) == pytest.approx(np.mean(flags["pg"]), rel=1e-10)
    assert float(metrics["entropy"]) == pytest.approx(ent[mask].mean(), rel=1e-10)
    assert sum(flags["high"]) > 0 and sum(flags["low"]) > 0 and sum(flags["dual"]) > 0  # cases covered
    loss.backward()
    assert torch.all(torch.isfinite(lp_t.grad)) and torch.all(lp_t.grad[~torch.tensor(mask)] == 0)


def test_gradient_zero_where_clipped_and_dual_clipped() -> None:
    # A>0, ratio above 1+eps_high: clipped -> no gradient; A<0, ratio huge: dual cap -> no gradient;
    # A<0, ratio in range: gradient -A * ratio.
    lp = torch.tensor([[0.5, 2.0, 0.05]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, metrics = policy_loss(lp, old, adv, torch.ones(1, 3, dtype=torch.bool), agg="token-mean")
    loss.backward()
    np.testing.assert_allclose(lp.grad.numpy(), [[0.0, 0.0, math.exp(0.05) / 3]], rtol=1e-12)
    assert float(loss.detach()) == pytest.approx((-1.28 + 3.0 + math.exp(0.05)) / 3)
    assert float(metrics["pg_clipfrac_dual"]) == pytest.approx(1 / 3)


def _split_sum(lp, old, adv, mask, rows_per_rank, micro_sizes, agg, norm_key, norm_value):
    total = torch.zeros((), dtype=torch.float64)
    for rows in rows_per_rank:
        start = 0
        for size in micro_sizes(len(rows)):
            idx = rows[start : start + size]
            start += size
            loss, _ = policy_loss(lp[idx], old[idx], adv[idx], mask[idx], agg=agg, **{norm_key: norm_value})
            total = total + loss
    return total


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batch_and_dp_splits_sum_to_full_batch(agg: str) -> None:
    rng = np.random.default_rng(11)
    mask, lp, old, adv, _, _ = make_batch(rng, B=24, T=9)
    lp_t, old_t, adv_t, mask_t = (torch.tensor(x) for x in (lp, old, adv, mask))
    full, _ = policy_loss(lp_t, old_t, adv_t, mask_t, agg=agg)
    if agg == "token-mean":
        key, value = "global_tokens", int(mask.sum())
    else:
        key, value = "global_sequences", int((mask.sum(-1) > 0).sum())

    def random_sizes(n: int) -> list[int]:
        cuts = sorted(rng.choice(np.arange(1, n), size=min(2, n - 1), replace=False).tolist()) if n > 1 else []
        bounds = [0, *cuts, n]
        return [b - a for a, b in itertools.pairwise(bounds)]

    for dp in (1, 2, 3):
        for _ in range(3):
            perm = rng.permutation(24)
            ranks = [perm[r::dp].tolist() for r in range(dp)]
            summed = _split_sum(lp_t, old_t, adv_t, mask_t, ranks, random_sizes, agg, key, value)
            assert float(summed) == pytest.approx(float(full), rel=1e-12)
            # Gradient view: DDP averages over ranks, so each rank scales its summed loss by dp.
            averaged = (
                sum(
                    scale_for_dp_average(_split_sum(lp_t, old_t, adv_t, mask_t, [r], random_sizes, agg, key, value), dp)
                    for r in ranks
                )
                / dp
            )
            assert float(averaged) == pytest.approx(float(full), rel=1e-12)


def test_local_token_mean_of_micro_batches_is_not_the_global_mean() -> None:
    """Sanity: without global_tokens, uneven micro-batches do not reproduce the full mean (the test above
    is therefore not vacuous)."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    lp = torch.zeros(2, 4, dtype=torch.float64)
    adv = torch.tensor([[1.0] * 4, [-2.0] * 4], dtype=torch.float64)
    full, _ = policy_loss(lp, lp, adv, mask)
    parts = sum(policy_loss(lp[i : i + 1], lp[i : i + 1], adv[i : i + 1], mask[i : i + 1])[0] for i in range(2))
    assert not math.isclose(float(full), float(parts) / 2)


def test_argument_errors() -> None:
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(x, x, x, m, agg="sum")
    with pytest.raises(ValueError, match="kl_type"):
        policy_loss(x, x, x, m, ref_log_probs=x, kl_type="k9")
    with pytest.raises(ValueError, match="ref_log_probs"):
        policy_loss(x, x, x, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, x, m, dual_clip=0.5)
    with pytest.raises(ValueError, match="global_tokens"):
        policy_loss(x, x, x, m, global_tokens=0)
