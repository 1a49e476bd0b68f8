"""PPO-style policy loss with clip-higher, dual clip, optional KL-to-reference and entropy bonus.

All per-token inputs are ``[B, T]`` (right-padded responses) and only the slots where ``response_mask`` is
true count. Aggregation modes (``agg``), with their global-normalizer argument:

* ``"token-mean"``: ``sum(loss * mask) / N``. ``N = global_tokens`` when given, the total number of valid
  tokens of the WHOLE mini-batch (all micro-batches on all data-parallel ranks); otherwise the local count.
* ``"seq-mean-token-mean"``: each non-empty sequence's token mean, summed, divided by ``S``.
* ``"seq-mean-token-sum"``: each non-empty sequence's token sum, summed, divided by ``S``.
  ``S = global_sequences`` when given (total number of NON-EMPTY sequences of the whole mini-batch),
  otherwise the local number of non-empty sequences.

Distributed convention (read this before wiring it into a trainer): with a global normalizer every
micro-batch loss is that micro-batch's share of a SUM. Summing the returned losses over all micro-batches
and all data-parallel ranks gives exactly the global mean. Gradient accumulation over micro-batches must
therefore SUM (no division by the number of micro-batches), and because DDP / Megatron AVERAGE gradients
over the ``dp_size`` data-parallel ranks, the caller must multiply each local loss by ``dp_size`` before
``backward`` (``scale_for_dp_average``) to undo that average.

Metrics are returned as detached 0-dim tensors (no device sync; call ``float()`` to log them). They are
means over the LOCAL valid tokens of this call, not global means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_vgpo.algo.masked_ops import as_bool_mask, check_same_shape, masked_mean

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "aggregate_loss",
    "kl_penalty",
    "policy_loss",
    "scale_for_dp_average",
]

KL_CLAMP = 10.0


def _kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs - ref_log_probs


def _kl_abs(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return (log_probs - ref_log_probs).abs()


def _kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_probs - ref_log_probs) ** 2


def _kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    # Unbiased, always non-negative estimator of KL(pi || ref) for samples from pi:
    # r = ref/pi, k3 = r - log r - 1, clamped to [-10, 10] for stability (as verl does).
    log_ref_over_pi = ref_log_probs - log_probs
    k3 = torch.exp(log_ref_over_pi) - log_ref_over_pi - 1.0
    return k3.clamp(-KL_CLAMP, KL_CLAMP)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": _kl_k1,
    "kl": _kl_k1,
    "abs": _kl_abs,
    "k2": _kl_k2,
    "mse": _kl_k2,
    "k3": _kl_k3,
    "low_var_kl": _kl_k3,
}

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate ``[B, T]`` between the policy and a reference (see ``KL_ESTIMATORS``)."""
    if kl_type not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_type {kl_type!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kl_type](log_probs, ref_log_probs)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    agg: str = "token-mean",
    global_tokens: float | int | torch.Tensor | None = None,
    global_sequences: float | int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce ``per_token_loss [B, T]`` to a scalar with one of ``AGGREGATIONS`` (module docstring)."""
    mask = as_bool_mask(response_mask)
    maskf = mask.to(per_token_loss.dtype)
    if agg == "token-mean":
        total = (per_token_loss * maskf).sum()
        if global_tokens is None:
            return total / maskf.sum().clamp(min=1)
        return total / _positive_normalizer(global_tokens, "global_tokens")
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        seq_tokens = maskf.sum(dim=-1)
        seq_sum = (per_token_loss * maskf).sum(dim=-1)
        per_seq = seq_sum / seq_tokens.clamp(min=1) if agg == "seq-mean-token-mean" else seq_sum
        if global_sequences is None:
            return per_seq.sum() / (seq_tokens > 0).sum().clamp(min=1)
        return per_seq.sum() / _positive_normalizer(global_sequences, "global_sequences")
    raise ValueError(f"unknown agg {agg!r}; choose one of {AGGREGATIONS}")


def _positive_normalizer(value: float | int | torch.Tensor, name: str) -> float | torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.clamp(min=1)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def scale_for_dp_average(loss: torch.Tensor, dp_size: int) -> torch.Tensor:
    """Multiply a globally-normalized local loss by ``dp_size`` so gradient AVERAGING over DP ranks yields
    the gradient of the global mean (see the module docstring)."""
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    return loss * dp_size


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    global_tokens: float | int | torch.Tensor | None = None,
    global_sequences: float | int | torch.Tensor | None = None,
    log_ratio_clamp: float = 20.0,
    ref_log_probs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate policy loss on ``[B, T]`` float tensors.

    Per token: ``ratio = exp(clamp(log_probs - old_log_probs, -log_ratio_clamp, log_ratio_clamp))``;
    ``pg = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))``; for ``A < 0`` the loss is
    further capped: ``pg = min(pg, -A * dual_clip)`` (``dual_clip=None`` disables it; it must be > 1).
    Then ``loss_t = pg + kl_coef * KL_t - entropy_coef * entropy_t`` (the KL term only with
    ``ref_log_probs``; the entropy bonus only with ``entropy``), aggregated by ``agg`` (module docstring).

    Args:
        log_probs: ``[B, T]`` current-policy log-probs of the sampled tokens (carries the gradient).
        old_log_probs: ``[B, T]`` log-probs under the rollout (old) policy.
        advantages: ``[B, T]`` per-token advantages (already re-weighted, e.g. by VGPO).
        response_mask: ``[B, T]`` bool / 0-1 mask of valid response tokens.

    Returns:
        ``(loss, metrics)``: a 0-dim loss and detached 0-dim metric tensors: ``pg_loss``,
        ``pg_clipfrac_high`` (A > 0 and ratio > 1 + clip_high), ``pg_clipfrac_low`` (A < 0 and
        ratio < 1 - clip_low), ``pg_clipfrac_dual`` (A < 0 and the dual cap binds), ``approx_kl`` (k3
        estimate of KL(old || new)), ``ratio_mean``, and ``kl_loss`` / ``entropy`` when those are given.
    """
    check_same_shape(
        "log_probs",
        log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        response_mask=response_mask,
        ref_log_probs=ref_log_probs,
        entropy=entropy,
    )
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [B, T], got shape {tuple(log_probs.shape)}")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    if log_ratio_clamp <= 0:
        raise ValueError(f"log_ratio_clamp must be > 0, got {log_ratio_clamp}")
    if kl_coef != 0.0 and ref_log_probs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_log_probs")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy")

    mask = as_bool_mask(response_mask)
    log_ratio = (log_probs - old_log_probs).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_active = negative & (pg > cap)
        pg = torch.where(negative, torch.minimum(pg, cap), pg)
    else:
        dual_active = torch.zeros_like(mask)

    per_token = pg
    metrics: dict[str, torch.Tensor] = {}
    if ref_log_probs is not None:
        kl = kl_penalty(log_probs, ref_log_probs, kl_type)
        per_token = per_token + kl_coef * kl
        metrics["kl_loss"] = masked_mean(kl.detach(), mask)
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
        metrics["entropy"] = masked_mean(entropy.detach(), mask)

    loss = aggregate_loss(per_token, mask, agg, global_tokens, global_sequences)

    with torch.no_grad():
        fdtype = log_probs.dtype
        metrics["pg_loss"] = masked_mean(pg.detach(), mask)
        high_clipped = (advantages > 0) & (ratio > 1.0 + clip_high)
        metrics["pg_clipfrac_high"] = masked_mean(high_clipped.to(fdtype), mask)
        metrics["pg_clipfrac_low"] = masked_mean((negative & (ratio < 1.0 - clip_low)).to(fdtype), mask)
        metrics["pg_clipfrac_dual"] = masked_mean(dual_active.to(fdtype), mask)
        # k3 estimate of KL(old || new) from samples of the old policy: r - 1 - log r with r = new/old.
        metrics["approx_kl"] = masked_mean(torch.expm1(log_ratio) - log_ratio, mask).detach()
        metrics["ratio_mean"] = masked_mean(ratio.detach(), mask)
    return loss, metrics
