"""Vocab-parallel chunked log-probs / entropy (``megatron_vgpo.actor.logprobs``) against float64 references.

One launch of 4 gloo ranks checks TP 4 (all ranks), TP 2 (two groups) and TP 1 (each rank alone): every rank
holds its vocabulary slice of the same global logits (with junk TP-padding columns beyond the real vocab),
and the results must equal ``log_softmax`` / entropy of the gathered real-vocab logits in float64 (to
1e-5), for values and for gradients, at temperatures 1 and 0.7, for any chunk size (chunks change results by
within 1e-6), for bf16 logits, and through ``response_log_probs`` (token p predicted at p - 1).
A dispatch mode records every tensor the ops create: nothing larger than ``chunk x V_local`` appears except
the gradient of the logits itself.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_vgpo.distributed.multiprocess import run_on_ranks

N_TOKENS, VOCAB, PADDED = 37, 50, 52  # real vocab 50, padded to a multiple of 4 (TP padding)
CHUNKS = (1, 5, 1000)


class _LargeTensors(TorchDispatchMode):
    """Records the shapes of NEW op outputs (views and in-place results excluded) above ``limit`` elements."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        existing = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, tuple | list) else (out,):
            if (isinstance(t, torch.Tensor) and t.numel() > self.limit
                    and t.untyped_storage().data_ptr() not in existing):
                self.seen.append((str(func), tuple(t.shape)))
        return out


def _global_logits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(N_TOKENS, PADDED, generator=gen) * 3.0
    logits[:, VOCAB:] = 50.0  # junk in the TP-padding columns: must never count
    targets = torch.randint(0, VOCAB, (N_TOKENS,), generator=gen)
    return logits.to(dtype), targets


def _reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float, w_lp: torch.Tensor,
               w_ent: torch.Tensor) -> dict[str, torch.Tensor]:
    x = logits[:, :VOCAB].double().requires_grad_(True)
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    lp = logp_all.gather(1, targets.unsqueeze(1)).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    (w_lp.double() * lp + w_ent.double() * ent).sum().backward()
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    grad[:, :VOCAB] = x.grad
    return {"lp": lp.detach(), "ent": ent.detach(), "grad": grad}


def _body(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from megatron_vgpo.actor.logprobs import response_log_probs, vocab_parallel_log_probs

    groups = {4: dist.new_group([0, 1, 2, 3]), 2: None, 1: None}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups[2] = pairs[rank // 2]
    singles = [dist.new_group([r]) for r in range(4)]
    groups[1] = singles[rank]
    gen = torch.Generator().manual_seed(11)
    w_lp, w_ent = torch.randn(N_TOKENS, generator=gen), torch.randn(N_TOKENS, generator=gen)
    out: dict = {"max_err": {}, "grad_err_over_tol": {}, "chunk_diff": 0.0, "large": []}
    for tp, group in groups.items():
        tp_rank = dist.get_rank(group)
        width = PADDED // tp
        start = tp_rank * width
        valid_local = max(0, min(VOCAB - start, width))
        for dtype in (torch.float32, torch.bfloat16):
            logits, targets = _global_logits(dtype)
            rows = torch.randperm(N_TOKENS, generator=torch.Generator().manual_seed(5))
            for temperature in (1.0, 0.7):
                ref = _reference(logits, targets, temperature, w_lp, w_ent)
                results = []
                for chunk in CHUNKS:
                    local = logits[:, start:start + width].clone().requires_grad_(True)
                    # allowed: [C, V_local] chunk buffers and per-token [N] vectors
                    mode = _LargeTensors(limit=max(min(chunk, N_TOKENS) * width, N_TOKENS))
                    with mode:
                        lp, ent = vocab_parallel_log_probs(
                            local, rows, targets[rows], temperature=temperature, group=group,
                            vocab_start=start, valid_vocab_local=valid_local, chunk_tokens=chunk)
                        (w_lp[rows] * lp + w_ent[rows] * ent).sum().backward()
                    # only the gradient buffer of the logits (and its fill) may exceed chunk x V_local
                    out["large"] += [s for s in mode.seen if s[1] != tuple(local.shape)]
                    results.append((lp.detach(), ent.detach(), local.grad.clone()))
                    key = f"tp{tp}_{str(dtype).split('.')[-1]}_T{temperature}_chunk{chunk}"
                    grad_ref = ref["grad"][:, start:start + width]
                    out["max_err"][key] = max(
                        float((lp.detach().double() - ref["lp"][rows]).abs().max()),
                        float((ent.detach().double() - ref["ent"][rows]).abs().max()),
                    )
                    # the gradient comes back in the logits' dtype: allow its rounding (bf16: 2^-8 relative)
                    grad_tol = 1e-5 + (2.0**-8 * float(grad_ref.abs().max()) if dtype == torch.bfloat16 else 0.0)
                    out["grad_err_over_tol"][key] = float((local.grad.double() - grad_ref).abs().max()) / grad_tol
                for other in results[1:]:
                    diff = max(float((a.double() - b.double()).abs().max())
                               for a, b in zip(results[0], other, strict=True))
                    out["chunk_diff"] = max(out["chunk_diff"], diff)

        # response_log_probs on a [b, s, V_local] layout: token at p predicted by logits at p - 1
        logits, _ = _global_logits()
        b, s = 3, 12
        full = logits[: b * s].reshape(b, s, PADDED)
        ids = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(2))
        starts, lengths = torch.tensor([3, 5, 1]), torch.tensor([4, 7, 0])
        lp, ent = response_log_probs(full[..., start:start + width], ids, starts, lengths, 8, group=group,
                                     vocab_start=start, valid_vocab_local=valid_local, chunk_tokens=2)
        ref_all = torch.log_softmax(full[..., :VOCAB].double(), dim=-1)
        err = 0.0
        for i in range(b):
            for t in range(8):
                if t < lengths[i]:
                    p = int(starts[i]) + t
                    want = ref_all[i, p - 1, ids[i, p]]
                    want_ent = -(ref_all[i, p - 1].exp() * ref_all[i, p - 1]).sum()
                    err = max(err, abs(float(lp[i, t]) - float(want)), abs(float(ent[i, t]) - float(want_ent)))
                else:
                    err = max(err, abs(float(lp[i, t])), abs(float(ent[i, t])))
        out["max_err"][f"tp{tp}_response_layout"] = err
    return out


@pytest.mark.multirank
def test_vocab_parallel_log_probs_match_float64():
    results = run_on_ranks(_body, world_size=4, megatron=False, env={"OMP_NUM_THREADS": "1"}, timeout_s=300)
    for rank, r in enumerate(results):
        # chunks change at most the last bits (vectorized exp/sum tails fall on other elements)
        assert r["chunk_diff"] < 1e-6, (rank, r["chunk_diff"])
        assert not r["large"], f"rank {rank}: tensors larger than chunk x V_local: {r['large'][:5]}"
        assert len(r["max_err"]) == 3 * (2 * 2 * len(CHUNKS) + 1)
        for key, err in r["max_err"].items():
            assert err < 1e-5, (rank, key, err)
        for key, ratio in r["grad_err_over_tol"].items():
            assert ratio < 1.0, (rank, key, ratio)


def test_arguments_are_checked():
    from megatron_vgpo.actor.logprobs import prediction_rows, vocab_parallel_log_probs

    logits = torch.randn(4, 8)
    rows, targets = torch.arange(4), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_log_probs(logits, rows, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        vocab_parallel_log_probs(logits, rows, targets, chunk_tokens=0)
    with pytest.raises(ValueError, match="response_start >= 1"):
        prediction_rows(5, torch.tensor([0]), torch.tensor([2]), 3)
    # single process, no group: equals log_softmax of the full row
    lp, ent = vocab_parallel_log_probs(logits, rows, targets)
    ref = torch.log_softmax(logits.double(), -1)
    assert torch.allclose(lp.double(), ref[:, 0], atol=1e-6)
    assert torch.allclose(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-6)
