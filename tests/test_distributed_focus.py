"""Sharded focus cosines (megatron_vgpo.distributed.focus) on 2 and 4 gloo ranks vs the unsharded reference.

One launch per world size runs every case: sequence / hidden sharding, own / producing state, left-padded
and packed layouts, fp32 and bf16, TP only and TP x CP grids, an arbitrary disjoint row split. The shards
are cut in the test itself (``chunk`` in rank order; CP zig-zag written out), the reference is a per-sample
float64 ``torch.cosine_similarity`` computed in the parent process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_vgpo.distributed.focus import CommStats, focus_comm_payload_bytes, sharded_focus_cosines
from megatron_vgpo.distributed.multiprocess import run_on_ranks

pytestmark = pytest.mark.multirank

SEQ, BATCH, WIDTH, T = 24, 5, 16, 7
IMAGE_ID = 7
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_case(layout: str, dtype: str, seed: int = 0) -> dict:
    """Full (unsharded) inputs; identical in every process for the same arguments."""
    g = torch.Generator().manual_seed(seed + (0 if layout == "left" else 100))
    ids = torch.randint(10, 50, (BATCH, SEQ), generator=g)
    if layout == "left":  # left-padded prompts of SEQ - T tokens, response right after
        start = SEQ - T
        lengths = torch.tensor([7, 1, 4, 6, 0])
        image_rows = {0: (2, 5), 1: (4, 6), 2: (1, 9), 4: (3, 16)}  # sample 3: no image
    else:  # packed prompt+response, per-sample starts on / next to shard boundaries (6, 12, 18, 3, 9)
        start = torch.tensor([6, 12, 3, 17, 9])
        lengths = torch.tensor([6, 2, 7, 7, 0])
        image_rows = {0: (0, 4), 1: (5, 11), 3: (2, 14), 4: (1, 2)}  # sample 2: no image
    for i, (lo, hi) in image_rows.items():
        ids[i, lo:hi] = IMAGE_ID
    hidden = (torch.randn(SEQ, BATCH, WIDTH, generator=g) + 0.25).to(DTYPES[dtype])
    return {"hidden": hidden, "image_mask": ids == IMAGE_ID, "start": start, "lengths": lengths}


def reference(case: dict, state_position: str) -> tuple[torch.Tensor, torch.Tensor]:
    h = case["hidden"].double()
    start = case["start"]
    starts = start if isinstance(start, torch.Tensor) else torch.full((BATCH,), start)
    shift = 1 if state_position == "producing" else 0
    cos = torch.zeros(BATCH, T, dtype=torch.float64)
    has = torch.zeros(BATCH, dtype=torch.bool)
    for i in range(BATCH):
        img = h[:, i][case["image_mask"][i]]
        if img.shape[0] == 0:
            continue
        has[i] = True
        n = int(case["lengths"][i])
        rows = h[int(starts[i]) - shift + torch.arange(n), i]
        cos[i, :n] = torch.cosine_similarity(rows, img.mean(0, keepdim=True), dim=-1)
    return cos, has


def shard_rows(x: torch.Tensor, tp_rank: int, tp: int, cp_rank: int, cp: int, shard: str) -> torch.Tensor:
    """This rank's piece of [s, b, h], cut independently of the module under test."""
    if cp > 1:  # Megatron load-balanced CP: chunks c and 2cp-1-c of 2cp
        pieces = x.chunk(2 * cp, dim=0)
        x = torch.cat([pieces[cp_rank], pieces[2 * cp - 1 - cp_rank]], dim=0)
    if shard == "sequence":
        return x.chunk(tp, dim=0)[tp_rank].contiguous()
    return x.chunk(tp, dim=2)[tp_rank].contiguous()


def _grids(rank: int, world_size: int) -> list[tuple[str, object, object]]:
    """(name, tp_group, cp_group) grids; every rank creates every group in the same order."""
    world = dist.group.WORLD
    singles = [dist.new_group([r]) for r in range(world_size)]
    if world_size == 2:
        return [("tp2", world, None), ("tp1xcp2", singles[rank], world)]
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # Megatron order: tp fastest, then cp
    cp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return [("tp4", world, None), ("tp2xcp2", tp_groups[rank // 2], cp_groups[rank % 2])]


def _body(rank: int, world_size: int) -> dict:
    out: dict = {}
    for name, tp_group, cp_group in _grids(rank, world_size):
        tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        cp = dist.get_world_size(cp_group) if cp_group is not None else 1
        cp_rank = dist.get_rank(cp_group) if cp_group is not None else 0
        for layout in ("left", "packed"):
            for dtype in DTYPES:
                case = make_case(layout, dtype)
                for shard in ("sequence", "hidden"):
                    local = shard_rows(case["hidden"], tp_rank, tp, cp_rank, cp, shard)
                    for state in ("own", "producing"):
                        stats = CommStats()
                        cos, has = sharded_focus_cosines(
                            local, case["image_mask"], case["start"], case["lengths"], T,
                            group=tp_group, shard=shard, state_position=state, cp_group=cp_group,
                            comm_stats=stats,
                        )
                        out[(name, layout, dtype, shard, state)] = (
                            cos, has, stats.payload_bytes, stats.collectives, tuple(local.shape), (tp, cp),
                        )
    # an arbitrary disjoint row split over the whole world (explicit local_rows)
    case = make_case("packed", "fp32")
    perm = torch.randperm(SEQ, generator=torch.Generator().manual_seed(3))
    rows = perm[rank::world_size]
    cos, has = sharded_focus_cosines(case["hidden"][rows], case["image_mask"], case["start"], case["lengths"],
                                     T, group=dist.group.WORLD, state_position="producing", local_rows=rows)
    out[("rows", "packed", "fp32", "sequence", "producing")] = (cos, has, None, None, None, None)

    # communication volume on a larger micro-batch: b=2, s=512, h=256, T=128, sequence parallel
    g = torch.Generator().manual_seed(7)
    big = torch.randn(512, 2, 256, generator=g)
    mask = torch.zeros(2, 512, dtype=torch.bool)
    mask[:, 10:200] = True
    stats = CommStats()
    local = big.chunk(world_size, 0)[rank].contiguous()
    sharded_focus_cosines(local, mask, 384, torch.tensor([128, 90]), 128, group=dist.group.WORLD,
                          comm_stats=stats)
    out["volume"] = (stats.payload_bytes, stats.ring_wire_bytes, stats.collectives, big.numel() * 4)
    return out


def _check(results: list[dict], world_size: int) -> None:
    keys = [k for k in results[0] if k != "volume"]
    assert len(keys) == 2 * 2 * 2 * 2 * 2 + 1
    for key in keys:
        _, layout, dtype, shard, state = key
        ref_cos, ref_has = reference(make_case(layout, dtype), state)
        cos0 = results[0][key][0]
        for rank, res in enumerate(results):
            cos, has, payload, collectives, local_shape, sizes = res[key]
            assert cos.dtype == torch.float32, key
            assert torch.equal(has, ref_has), key
            torch.testing.assert_close(cos.double(), ref_cos, atol=1e-5, rtol=0, msg=lambda m, k=key, r=rank:
                                       f"{k} rank {r}: {m}")
            assert torch.equal(cos, cos0), f"{key}: rank {rank} differs from rank 0"
            if payload is None:
                continue
            # volume: exactly the documented O(b h) + O(b T) payload, far below the hidden states' bytes
            tp, cp = sizes
            expected = focus_comm_payload_bytes(BATCH, local_shape[2], T, shard=shard, tp_size=tp, cp_size=cp)
            assert payload == expected, (key, payload, expected)
            assert payload < SEQ * BATCH * WIDTH * 4, key
            row_reductions = int(shard == "sequence" and tp > 1) + int(cp > 1)
            assert collectives == 2 * row_reductions + int(shard == "hidden" and tp > 1), key
    payload, wire, collectives, hidden_bytes = results[0]["volume"]
    assert payload == focus_comm_payload_bytes(2, 256, 128, tp_size=world_size)
    assert collectives == 2 and payload * 100 < hidden_bytes
    print(f"\n[world {world_size}] b=2 s=512 h=256 T=128 fp32, sequence parallel: all-reduce payload "
          f"{payload} B/rank (ring wire ~{wire:.0f} B) vs hidden states {hidden_bytes} B "
          f"({hidden_bytes / payload:.0f}x)")


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_focus_matches_unsharded_reference(world_size):
    _check(run_on_ranks(_body, world_size=world_size, timeout_s=300), world_size)


def test_single_process_fallback_layout_helper_and_errors():
    """Without torch.distributed the wrapper is the plain computation; bad shard shapes are named."""
    from megatron_vgpo.algo.focus import focus_cosines
    from megatron_vgpo.distributed.focus import sequence_shard_rows

    assert not dist.is_initialized()
    case = make_case("packed", "fp32")
    args = (case["image_mask"], case["start"], case["lengths"], T)
    cos, has = sharded_focus_cosines(case["hidden"], *args, group=None, state_position="producing")
    ref_cos, ref_has = focus_cosines(case["hidden"], *args, "producing")
    assert torch.equal(cos, ref_cos) and torch.equal(has, ref_has)
    # Megatron's CP zig-zag then SP chunks: cp=2 rank 1 holds chunks 1 and 2 of 4, tp rank 1 the second half
    assert sequence_shard_rows(16, 1, 2, cp_rank=1, cp_size=2).tolist() == [8, 9, 10, 11]
    assert sequence_shard_rows(16, 0, 2, cp_rank=0, cp_size=2).tolist() == [0, 1, 2, 3]
    assert sequence_shard_rows(16, 1, 2, cp_rank=0, cp_size=2).tolist() == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="hidden_local has 12 rows"):
        sharded_focus_cosines(case["hidden"][:12], *args, group=None)
    with pytest.raises(ValueError, match="divisible"):
        sequence_shard_rows(18, 0, 4)
    with pytest.raises(ValueError, match="shard="):
        sharded_focus_cosines(case["hidden"], *args, group=None, shard="vocab")
