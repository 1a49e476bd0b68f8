"""VGPO factors against (a) the spec's Appendix B numbers and (b) a float64 per-sequence restatement.

The restatement below is written from the spec text (sections 2.4, 3.1-3.3, 4.1-4.3, 4.5) with plain
Python loops over sequences and tokens; it shares no code with ``megatron_vgpo.algo.vgpo``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from megatron_vgpo.algo.vgpo import (
    VGPOConfig,
    apply_vgpo,
    compute_token_weights,
    compute_vgpo_factors,
    focus_from_cosine,
    trajectory_factors,
)

# ----------------------------------------------------------------------------------------------------------
# Independent float64 restatement (loops).
# ----------------------------------------------------------------------------------------------------------


def ref_focus(cos: np.ndarray, lengths: list[int], norm: str, has_image: list[bool]) -> np.ndarray:
    """rho per spec 2.4; cos is [B, T] with zeros on padding; image-less rows are all-zero cosines."""
    B, T = cos.shape
    c = [[(cos[i][t] if has_image[i] else 0.0) for t in range(T)] for i in range(B)]
    rho = np.zeros((B, T))
    if norm == "batch_minmax":
        flat = [c[i][t] for i in range(B) for t in range(T)]
        lo, hi = min(flat), max(flat)
    for i in range(B):
        for t in range(lengths[i]):
            if norm == "affine":
                rho[i, t] = (c[i][t] + 1.0) / 2.0
            else:
                rho[i, t] = (c[i][t] - lo) / (hi - lo + 1e-8)
    return rho


def ref_comp(t: int, L: int, cfg: VGPOConfig) -> float:
    big_t = L - 1
    if cfg.compensation_scope == "full":
        u = t / (big_t + 1e-8)
    else:  # ramp from the tail start: (t - gamma T) / ((1 - gamma) T), clipped to [0, 1]
        u = (t - cfg.gamma * big_t) / ((1.0 - cfg.gamma) * big_t + 1e-8)
        u = min(max(u, 0.0), 1.0)
    s = cfg.schedule_start
    if u < s:
        return 0.0
    up = (u - s) / (1.0 - s + 1e-8)
    if cfg.schedule == "linear":
        return cfg.beta * up
    if cfg.schedule == "exponential":
        return cfg.beta * min(max(up, 0.0), 1.0) ** cfg.exponent
    return cfg.beta if u >= cfg.step_at else 0.0


def ref_gate(r: list[float], cfg: VGPOConfig) -> list[int]:
    L = len(r)
    s0 = int(L * cfg.gamma)
    tail = [r[t] for t in range(s0, L)]
    if not tail:
        return [0] * L
    k = max(1, int(len(tail) * cfg.kappa))
    tau = sorted(tail, reverse=True)[k - 1]
    return [1 if (t >= s0 and r[t] >= tau) else 0 for t in range(L)]


def ref_minmax(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [(v - lo) / (hi - lo + 1e-8) for v in values]


def ref_vgpo(rho, lengths, group_ids, has_image, cfg: VGPOConfig):
    """Returns (w_hat [B,T], f [B,T], S [B], g [B], gate [B,T] or None) in float64."""
    B, T = rho.shape
    w_hat = np.zeros((B, T))
    f = np.ones((B, T))
    S = np.zeros(B)
    gates = np.zeros((B, T))
    neutral = cfg.imageless == "neutral"
    for i in range(B):
        L = lengths[i]
        if L == 0:
            continue
        r = [float(rho[i, t]) for t in range(L)]
        if cfg.intra and cfg.compensation:
            C = [ref_comp(t, L, cfg) for t in range(L)]
            G = ref_gate(r, cfg) if cfg.gating else [1] * L
            w = [r[t] * (1.0 + G[t] * C[t]) for t in range(L)]
            if cfg.gating:
                gates[i, :L] = G
        else:
            w = r
        wh = ref_minmax(w)
        w_hat[i, :L] = wh
        S[i] = sum(wh)
        if cfg.intra and not (neutral and not has_image[i]):
            mean = sum(wh) / L
            for t in range(L):
                f[i, t] = min(max(1.0 + wh[t] - mean, cfg.token_clamp[0]), cfg.token_clamp[1])
    g = np.ones(B)
    if cfg.inter:
        groups: dict = {}
        if cfg.grouping == "uid":
            for i in range(B):
                groups.setdefault(int(group_ids[i]), []).append(i)
        else:
            n = cfg.rollout_n
            if n > B:
                groups[0] = list(range(B))
            else:
                for b in range(B // n):
                    groups[b] = list(range(b * n, (b + 1) * n))
        for members in groups.values():
            members = [i for i in members if not (neutral and not has_image[i])]
            if not members:
                continue
            s_hat = ref_minmax([S[i] for i in members])
            mean = sum(s_hat) / len(s_hat)
            for j, i in enumerate(members):
                g[i] = min(max(1.0 + s_hat[j] - mean, cfg.traj_clamp[0]), cfg.traj_clamp[1])
    return w_hat, f, S, g, (gates if cfg.intra and cfg.compensation and cfg.gating else None)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def mask_from_lengths(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def random_batch(rng: np.random.Generator, B: int = 14, T: int = 9):
    lengths = [int(x) for x in rng.integers(0, T + 1, size=B)]
    lengths[0], lengths[1], lengths[2] = 1, 0, T  # always a length-1 row, an empty row and a full row
    cos = np.zeros((B, T))
    for i in range(B):
        L = lengths[i]
        if i % 3 == 0:  # ties: a coarse grid of cosines (exactly representable)
            cos[i, :L] = rng.integers(-2, 4, size=L) / 8.0
        else:
            cos[i, :L] = rng.uniform(-0.4, 0.9, size=L)
    has_image = [bool(x) for x in rng.random(B) > 0.25]
    has_image[0] = True
    # Non-contiguous, interleaved prompt ids.
    pool = np.array([1000, -5, 7, 42, 3])
    group_ids = pool[rng.integers(0, len(pool), size=B)]
    return cos, lengths, has_image, group_ids


SWITCHES = list(itertools.product([True, False], repeat=4))


# ----------------------------------------------------------------------------------------------------------
# Appendix B
# ----------------------------------------------------------------------------------------------------------

APPX_COS = [[0.10, 0.40, 0.20, 0.05, 0.50, 0.30], [0.30, 0.10, 0.45, 0.20], [0.25]]
APPX_A = torch.tensor([1.0, -0.5, 0.7])


def appendix_batch() -> tuple[torch.Tensor, torch.Tensor]:
    cos = torch.zeros(3, 6)
    for i, row in enumerate(APPX_COS):
        cos[i, : len(row)] = torch.tensor(row)
    return cos, mask_from_lengths([6, 4, 1], 6)


def test_appendix_b_reference_code_mode() -> None:
    cfg = VGPOConfig(focus_norm="batch_minmax", grouping="reference_blocks", rollout_n=8)
    cos, mask = appendix_batch()
    rho = focus_from_cosine(cos, mask, cfg)
    exp_rho = [[0.2, 0.8, 0.4, 0.1, 1.0, 0.6], [0.6, 0.2, 0.9, 0.4], [0.5]]
    weights = compute_token_weights(rho, mask, cfg)
    factors = compute_vgpo_factors(rho, mask, None, cfg)
    adv = apply_vgpo(APPX_A, factors, mask)
    exp_w_hat = [[0.0877, 0.6140, 0.2632, 0, 1, 0.4386], [0.4545, 0, 1, 0.2273], [0]]
    exp_f = [[0.6871, 1.2135, 0.8626, 0.5994, 1.5994, 1.0380], [1.0341, 0.5795, 1.5795, 0.8068], [1]]
    exp_adv = [[0.9850, 1.7394, 1.2364, 0.8592, 2.2926, 1.4879], [-0.5859, -0.3284, -0.8949, -0.4571], [0.63]]
    for i, L in enumerate([6, 4, 1]):
        np.testing.assert_allclose(rho[i, :L].numpy(), exp_rho[i], atol=1e-4)
        np.testing.assert_allclose(weights.w_hat[i, :L].numpy(), exp_w_hat[i], atol=1e-4)
        np.testing.assert_allclose(factors.token_factor[i, :L].numpy(), exp_f[i], atol=1e-4)
        np.testing.assert_allclose(adv[i, :L].numpy(), exp_adv[i], atol=1e-4)
    np.testing.assert_allclose(factors.trajectory_score.numpy(), [2.4035, 1.6818, 0.0], atol=1e-4)
    np.testing.assert_allclose(factors.traj_factor.numpy(), [1.4334, 1.1332, 0.9], atol=1e-4)
    assert torch.all(factors.token_factor[~mask] == 1) and torch.all(adv[~mask] == 0)
    # Gates of Appendix B, via the diagnostics: G0 = slot 4, G1 = slot 2, G2 = slot 0 -> 3 of 11 tokens.
    assert factors.diagnostics["gating_pass_rate"] == pytest.approx(3 / 11)


def test_appendix_b_paper_mode_and_uid_grouping_agree() -> None:
    cos, mask = appendix_batch()
    for grouping in ("reference_blocks", "uid"):
        cfg = VGPOConfig(focus_norm="affine", grouping=grouping)
        rho = focus_from_cosine(cos, mask, cfg)
        factors = compute_vgpo_factors(rho, mask, torch.tensor([5, 5, 5]), cfg)
        w_hat = compute_token_weights(rho, mask, cfg).w_hat
        np.testing.assert_allclose(w_hat[0].numpy(), [0.0617, 0.4321, 0.1852, 0, 1, 0.3086], atol=1e-4)
        np.testing.assert_allclose(
            factors.token_factor[0].numpy(), [0.7305, 1.1008, 0.8539, 0.6687, 1.6687, 0.9774], atol=1e-4
        )
        np.testing.assert_allclose(factors.traj_factor.numpy(), [1.4204, 1.1593, 0.9], atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Randomized comparison with the restatement, every switch combination.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("focus_norm", ["affine", "batch_minmax"])
@pytest.mark.parametrize("intra,inter,compensation,gating", SWITCHES)
def test_matches_restatement(intra: bool, inter: bool, compensation: bool, gating: bool, focus_norm: str) -> None:
    seed = int(f"{intra:d}{inter:d}{compensation:d}{gating:d}{focus_norm == 'affine':d}", 2)
    rng = np.random.default_rng(seed)
    variants = itertools.product(
        ["linear", "exponential", "step"],
        ["full", "late"],
        ["uid", "reference_blocks"],
        ["neutral", "reference"],
    )
    for schedule, scope, grouping, imageless in variants:
        cos, lengths, has_image, group_ids = random_batch(rng, B=int(rng.choice([5, 14, 19])))
        cfg = VGPOConfig(
            intra=intra,
            inter=inter,
            compensation=compensation,
            gating=gating,
            focus_norm=focus_norm,
            schedule=schedule,
            compensation_scope=scope,
            grouping=grouping,
            imageless=imageless,
            schedule_start=float(rng.choice([0.0, 0.3])),
            exponent=float(rng.choice([2.0, 0.5])),
            step_at=float(rng.choice([0.5, 0.7])),
            gamma=float(rng.choice([0.5, 0.3])),
            kappa=float(rng.choice([0.2, 0.5])),
            beta=float(rng.choice([0.3, 1.0])),
            rollout_n=4,
        )
        T = cos.shape[1]
        mask = mask_from_lengths(lengths, T)
        image_t = torch.tensor(has_image)
        ids_t = torch.tensor(group_ids, dtype=torch.int64)
        rho = focus_from_cosine(torch.tensor(cos, dtype=torch.float64), mask, cfg, image_t)
        exp_rho = ref_focus(cos, lengths, focus_norm, has_image)
        np.testing.assert_allclose(rho.numpy(), exp_rho, atol=1e-12)

        factors = compute_vgpo_factors(rho, mask, ids_t, cfg, image_t)
        weights = compute_token_weights(rho, mask, cfg, image_t)
        w_hat, f, S, g, gates = ref_vgpo(exp_rho, lengths, group_ids, has_image, cfg)
        msg = f"{cfg}"
        np.testing.assert_allclose(weights.w_hat.numpy(), w_hat, atol=1e-10, err_msg=msg)
        np.testing.assert_allclose(factors.token_factor.numpy(), f, atol=1e-10, err_msg=msg)
        np.testing.assert_allclose(factors.trajectory_score.numpy(), S, atol=1e-9, err_msg=msg)
        np.testing.assert_allclose(factors.traj_factor.numpy(), g, atol=1e-9, err_msg=msg)
        adv = rng.normal(size=len(lengths))
        out = apply_vgpo(torch.tensor(adv), factors, mask)
        np.testing.assert_allclose(out.numpy(), adv[:, None] * g[:, None] * f * mask.numpy(), atol=1e-10)
        if gates is not None:
            valid = mask.numpy()
            assert factors.diagnostics["gating_pass_rate"] == pytest.approx(gates[valid].mean(), abs=1e-12)
        assert factors.diagnostics["advantage_weighting_factor_mean"] == pytest.approx(f[mask.numpy()].mean(), abs=1e-9)
        assert factors.diagnostics["trajectory_weighting_factor_min"] == pytest.approx(g.min(), abs=1e-9)


def test_restatement_self_check_gate_ties_and_edges() -> None:
    """Hand-made rows so the restatement itself is pinned to spec 3.2 (ties admitted, s0, k)."""
    cfg = VGPOConfig(kappa=0.2, gamma=0.5)
    assert ref_gate([0.5], cfg) == [1]  # L=1: tail = {0}, k = 1
    assert ref_gate([0.9, 0.1, 0.3, 0.3, 0.3], cfg) == [0, 0, 1, 1, 1]  # s0=2, ties at tau all pass
    assert ref_gate([0.1, 0.2, 0.9, 0.4], cfg) == [0, 0, 1, 0]


# ----------------------------------------------------------------------------------------------------------
# Targeted behaviour
# ----------------------------------------------------------------------------------------------------------


def test_ties_admitted_by_the_gate() -> None:
    rho = torch.tensor([[0.9, 0.1, 0.3, 0.3, 0.3, 0.3]])
    mask = torch.ones_like(rho, dtype=torch.bool)
    cfg = VGPOConfig(kappa=0.2)  # tail = slots 3..5, k = max(1, floor(0.6)) = 1, but 3 tied tokens
    weights = compute_token_weights(rho, mask, cfg)
    assert weights.diagnostics["gating_pass_rate"] == pytest.approx(3 / 6)


def test_imageless_neutral_vs_reference_artifact() -> None:
    """Spec 4.5: in batch_minmax mode an image-less row becomes a constant > 0 when some cosine is negative;
    'reference' then up-weights its late tokens, 'neutral' gives f = g = 1."""
    cos = torch.tensor([[0.5, -0.4, 0.2, 0.1, 0.3, 0.0], [0.0] * 6, [0.2, 0.1, 0.4, 0.3, 0.2, 0.1]])
    mask = torch.ones_like(cos, dtype=torch.bool)
    has_image = torch.tensor([True, False, True])
    ids = torch.tensor([3, 3, 3])
    ref_cfg = VGPOConfig(focus_norm="batch_minmax", imageless="reference", gating=False)
    neutral_cfg = VGPOConfig(focus_norm="batch_minmax", imageless="neutral", gating=False)
    rho = focus_from_cosine(cos, mask, ref_cfg, has_image)
    assert torch.allclose(rho[1], torch.full((6,), 0.4 / 0.9), atol=1e-6)
    ref_f = compute_vgpo_factors(rho, mask, ids, ref_cfg, has_image)
    assert ref_f.token_factor[1, -1] > ref_f.token_factor[1, 0]  # the late ramp artifact
    neu_f = compute_vgpo_factors(rho, mask, ids, neutral_cfg, has_image)
    assert torch.all(neu_f.token_factor[1] == 1) and neu_f.traj_factor[1] == 1
    # The image rows alone form the group: their g equals that of a batch without the image-less row.
    alone = compute_vgpo_factors(rho[[0, 2]], mask[[0, 2]], ids[[0, 2]], neutral_cfg)
    assert torch.allclose(neu_f.traj_factor[[0, 2]], alone.traj_factor)


def test_uid_grouping_is_permutation_equivariant() -> None:
    rng = np.random.default_rng(3)
    cos, lengths, _has_image, group_ids = random_batch(rng, B=16)
    mask = mask_from_lengths(lengths, cos.shape[1])
    cfg = VGPOConfig()
    rho = focus_from_cosine(torch.tensor(cos), mask, cfg)
    ids = torch.tensor(group_ids)
    base = compute_vgpo_factors(rho, mask, ids, cfg)
    perm = torch.tensor(rng.permutation(16))
    permuted = compute_vgpo_factors(rho[perm], mask[perm], ids[perm] * 97 + 11, cfg)
    assert torch.allclose(permuted.traj_factor, base.traj_factor[perm])
    assert torch.allclose(permuted.token_factor, base.token_factor[perm])


def test_reference_blocks_leftovers_and_small_batch() -> None:
    score = torch.arange(10, dtype=torch.float64)
    cfg = VGPOConfig(grouping="reference_blocks", rollout_n=4)
    g = trajectory_factors(score, None, cfg)
    assert torch.all(g[8:] == 1)  # B mod n leftovers
    block = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    expected = (1 + block - block.mean()).clamp(0.9, 2.0).double()
    assert torch.allclose(g[:4], expected) and torch.allclose(g[4:8], expected)
    small = trajectory_factors(torch.tensor([1.0, 3.0]), None, VGPOConfig(grouping="reference_blocks"))
    assert torch.allclose(small, torch.tensor([0.9, 1.5]))


def test_bf16_focus_quantizes_and_empty_batch() -> None:
    cos = torch.tensor([[0.1234567, 0.7654321, 0.0]])
    mask = torch.tensor([[True, True, False]])
    rho = focus_from_cosine(cos, mask, VGPOConfig(bf16_focus=True))
    assert torch.equal(rho, rho.to(torch.bfloat16).float())
    expected = ((cos.to(torch.bfloat16).float() + 1) / 2).to(torch.bfloat16).float() * mask
    assert torch.equal(rho, expected)
    empty = compute_vgpo_factors(
        torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), torch.zeros(0).long(), VGPOConfig()
    )
    assert empty.token_factor.shape == (0, 5) and empty.traj_factor.shape == (0,)


def test_no_nan_on_all_empty_rows() -> None:
    mask = torch.zeros(3, 4, dtype=torch.bool)
    f = compute_vgpo_factors(torch.zeros(3, 4), mask, torch.tensor([1, 1, 2]), VGPOConfig())
    assert torch.all(f.token_factor == 1) and torch.all(f.traj_factor == 1)
    assert all(math.isfinite(v) for v in f.diagnostics.values())


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"schedule": "cosine"}, "schedule"),
        ({"focus_norm": "softmax"}, "focus_norm"),
        ({"grouping": "blocks"}, "grouping"),
        ({"imageless": "drop"}, "imageless"),
        ({"compensation_scope": "tail"}, "compensation_scope"),
        ({"gamma": 1.5}, "gamma"),
        ({"kappa": 0.0}, "kappa"),
        ({"beta": -0.1}, "beta"),
        ({"token_clamp": (2.0, 0.1)}, "token_clamp"),
        ({"rollout_n": 0}, "rollout_n"),
        ({"schedule_start": 1.0}, "schedule_start"),
    ],
)
def test_config_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        VGPOConfig(**kwargs)


def test_shape_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="response_mask"):
        compute_token_weights(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), VGPOConfig())
    with pytest.raises(ValueError, match="has_image"):
        focus_from_cosine(torch.zeros(2, 3), torch.ones(2, 3), VGPOConfig(), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="group_ids"):
        trajectory_factors(torch.zeros(3), torch.zeros(2).long(), VGPOConfig())


@pytest.mark.parametrize("block_elements", [1, 20, 64])
def test_cpu_row_blocks_do_not_change_results(monkeypatch: pytest.MonkeyPatch, block_elements: int) -> None:
    import megatron_vgpo.algo.vgpo as vgpo_module

    rng = np.random.default_rng(5)
    cos, lengths, has_image, group_ids = random_batch(rng, B=19)
    mask = mask_from_lengths(lengths, cos.shape[1])
    cfg = VGPOConfig(focus_norm="batch_minmax", imageless="reference")
    rho = focus_from_cosine(torch.tensor(cos), mask, cfg, torch.tensor(has_image))
    whole = compute_vgpo_factors(rho, mask, torch.tensor(group_ids), cfg, torch.tensor(has_image))
    monkeypatch.setattr(vgpo_module, "CPU_BLOCK_ELEMENTS", block_elements)
    blocked = compute_vgpo_factors(rho, mask, torch.tensor(group_ids), cfg, torch.tensor(has_image))
    assert torch.equal(whole.token_factor, blocked.token_factor)
    assert torch.equal(whole.traj_factor, blocked.traj_factor)
    assert whole.diagnostics.keys() == blocked.diagnostics.keys()
    for key, value in whole.diagnostics.items():
        assert blocked.diagnostics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_diagnostics_match_restatement_on_appendix_b() -> None:
    """Spec 7.2 metrics recomputed by hand-written loops on the Appendix B batch."""
    cfg = VGPOConfig(focus_norm="batch_minmax", grouping="reference_blocks")
    cos, mask = appendix_batch()
    rho = focus_from_cosine(cos.double(), mask, cfg)
    d = compute_vgpo_factors(rho, mask, None, cfg).diagnostics
    lengths = [6, 4, 1]
    w_hat, f, _, g, gates = ref_vgpo(rho.numpy(), lengths, None, [True] * 3, cfg)
    valid = mask.numpy()
    assert d["intra_weight_mean"] == pytest.approx(w_hat[valid].mean())
    assert d["intra_weight_std"] == pytest.approx(w_hat[valid].std())
    assert d["advantage_weighting_factor_min"] == pytest.approx(f[valid].min())
    assert d["trajectory_weighting_factor_max"] == pytest.approx(g.max())
    early = [gates[i, t] for i, L in enumerate(lengths) for t in range(L // 3)]
    late = [gates[i, t] for i, L in enumerate(lengths) for t in range(L - L // 3, L)]
    assert d["gating_pass_rate_early"] == pytest.approx(np.mean(early))
    assert d["gating_pass_rate_late"] == pytest.approx(np.mean(late))
    comp_late = [1 + gates[i, t] * ref_comp(t, L, cfg) for i, L in enumerate(lengths) for t in range(L - L // 3, L)]
    assert d["visual_compensation_late_mean"] == pytest.approx(np.mean(comp_late))
    first, second = [], []
    for i, L in enumerate(lengths):
        r = rho[i, :L].tolist()
        tau = sorted(r, reverse=True)[max(1, int(0.4 * L)) - 1]
        marked = [1 if v >= tau else 0 for v in r]
        first.append(sum(marked[: L // 2]) / L)
        second.append(sum(marked[L // 2 :]) / L)
    assert d["visual_token_percentage_first_half"] == pytest.approx(np.mean(first))
    assert d["visual_token_percentage_second_half"] == pytest.approx(np.mean(second))
    assert d["visual_token_percentage_late_early_ratio"] == pytest.approx(np.mean(second) / (np.mean(first) + 1e-8))


def test_apply_vgpo_accepts_per_token_advantages() -> None:
    cos, mask = appendix_batch()
    cfg = VGPOConfig(focus_norm="batch_minmax", grouping="reference_blocks")
    factors = compute_vgpo_factors(focus_from_cosine(cos, mask, cfg), mask, None, cfg)
    per_token = torch.randn(3, 6)
    out = apply_vgpo(per_token, factors, mask)
    expected = per_token * factors.traj_factor[:, None] * factors.token_factor * mask
    assert torch.allclose(out, expected) and torch.all(out[~mask] == 0)
    with pytest.raises(ValueError, match="advantages"):
        apply_vgpo(torch.zeros(4), factors, mask)
