"""Single-process focus cosines (megatron_vgpo.algo.focus) against a direct per-sample reference.

The reference walks the samples one by one, takes the image rows of ``hidden[:, i]`` in float64, averages
them and calls ``torch.cosine_similarity`` on the response rows: nothing of the module under test is used.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vgpo.algo.focus import (
    cosine_from_parts,
    focus_cosines,
    gather_response_states,
    image_token_mask,
    prototype_from_partials,
    prototype_partials,
    response_partials,
    response_positions,
    row_lookup_from_positions,
)

IMAGE_ID, VSTART, VEND, PAD = 7, 5, 6, 0


def reference_cosines(hidden, image_mask, starts, lengths, T, shift):
    """float64 [b, T] cosines and [b] has_image, one sample at a time."""
    _, batch, _ = hidden.shape
    h = hidden.double()
    out = torch.zeros(batch, T, dtype=torch.float64)
    has = torch.zeros(batch, dtype=torch.bool)
    for i in range(batch):
        img = h[:, i][image_mask[i]]
        if img.shape[0] == 0:
            continue
        has[i] = True
        proto = img.mean(dim=0)
        n = int(lengths[i])
        rows = h[int(starts[i]) - shift + torch.arange(n), i]
        out[i, :n] = torch.cosine_similarity(rows, proto.unsqueeze(0), dim=-1)
    return out, has


def left_padded_batch(seed: int, batch: int = 5, prompt: int = 12, T: int = 7, width: int = 16):
    """Left-padded prompts of length ``prompt`` then T response slots; sample 3 has no image."""
    g = torch.Generator().manual_seed(seed)
    seq = prompt + T
    ids = torch.randint(10, 50, (batch, seq), generator=g)
    ids[:, :3] = PAD
    for i in range(batch):
        if i == 3:
            continue
        n_img = 2 + i
        ids[i, 3] = VSTART
        ids[i, 4:4 + n_img] = IMAGE_ID
        ids[i, 4 + n_img] = VEND
    lengths = torch.tensor([T, 1, 4, 6, 0])[:batch]
    hidden = torch.randn(seq, batch, width, generator=g) + 0.3
    return hidden, image_token_mask(ids, IMAGE_ID), prompt, lengths, T


def packed_batch(seed: int, width: int = 16):
    """Right-padded prompt+response with per-sample starts; two images pooled in sample 0."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.tensor([6, 9, 4, 11])
    lengths = torch.tensor([5, 2, 8, 3])
    seq, T = 20, 8
    batch = starts.numel()
    ids = torch.randint(10, 50, (batch, seq), generator=g)
    ids[0, 1:3] = IMAGE_ID
    ids[0, 4:6] = IMAGE_ID
    ids[1, 2:8] = IMAGE_ID
    ids[2, 0:1] = IMAGE_ID
    ids[3, 5:10] = IMAGE_ID
    for i in range(batch):
        ids[i, int(starts[i] + lengths[i]):] = PAD
    hidden = torch.randn(seq, batch, width, generator=g) - 0.2
    return hidden, image_token_mask(ids, IMAGE_ID), starts, lengths, T


@pytest.mark.parametrize("state_position,shift", [("own", 0), ("producing", 1)])
def test_left_padded_fixed_start_matches_reference(state_position, shift):
    hidden, mask, prompt, lengths, T = left_padded_batch(0)
    cos, has = focus_cosines(hidden, mask, prompt, lengths, T, state_position)
    ref, ref_has = reference_cosines(hidden, mask, torch.full((5,), prompt), lengths, T, shift)
    assert cos.dtype == torch.float32 and cos.shape == (5, T)
    assert torch.equal(has, ref_has) and has.tolist() == [True, True, True, False, True]
    torch.testing.assert_close(cos.double(), ref, atol=1e-5, rtol=0)
    assert (cos[3] == 0).all() and (cos[4] == 0).all() and (cos[1, 1:] == 0).all()
    assert cos[0].abs().min() > 0  # real values on every valid slot


@pytest.mark.parametrize("state_position,shift", [("own", 0), ("producing", 1)])
def test_packed_per_sample_start_matches_reference(state_position, shift):
    hidden, mask, starts, lengths, T = packed_batch(1)
    cos, has = focus_cosines(hidden, mask, starts, lengths, T, state_position)
    ref, _ = reference_cosines(hidden, mask, starts, lengths, T, shift)
    assert has.all()
    torch.testing.assert_close(cos.double(), ref, atol=1e-5, rtol=0)


def test_bf16_input_is_computed_in_fp32_and_fp64_stays_fp64():
    hidden, mask, starts, lengths, T = packed_batch(2, width=64)
    hb = hidden.to(torch.bfloat16)
    cos, _ = focus_cosines(hb, mask, starts, lengths, T)
    ref, _ = reference_cosines(hb, mask, starts, lengths, T, 0)  # reference on the same bf16 values
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), ref, atol=1e-5, rtol=0)
    # naive bf16 arithmetic would be off by ~1e-3: make sure we are far closer than that
    assert (cos.double() - ref).abs().max() < 1e-6

    cos64, _ = focus_cosines(hidden.double(), mask, starts, lengths, T, "producing")
    ref64, _ = reference_cosines(hidden, mask, starts, lengths, T, 1)
    assert cos64.dtype == torch.float64
    torch.testing.assert_close(cos64, ref64, atol=1e-12, rtol=0)


def test_image_mask_excludes_vision_markers_and_padding_states_are_ignored():
    hidden, mask, prompt, lengths, T = left_padded_batch(3)
    ids = torch.full((1, 6), 11)
    ids[0, 1], ids[0, 2], ids[0, 3], ids[0, 4] = VSTART, IMAGE_ID, IMAGE_ID, VEND
    assert image_token_mask(ids, IMAGE_ID).tolist() == [[False, False, True, True, False, False]]
    # whatever sits in padding slots (here huge values) must not leak into cos or the prototype
    noisy = hidden.clone()
    for i in range(hidden.shape[1]):
        noisy[prompt + int(lengths[i]):, i] = 1e4
    cos_a, _ = focus_cosines(hidden, mask, prompt, lengths, T)
    cos_b, _ = focus_cosines(noisy, mask, prompt, lengths, T)
    assert torch.equal(cos_a, cos_b)


def test_building_blocks_add_up_over_row_and_column_shards():
    """Partials of disjoint row sets / column slices sum to the full quantities (the distributed algebra)."""
    hidden, mask, starts, lengths, T = packed_batch(4, width=12)
    seq = hidden.shape[0]
    positions, valid = response_positions(starts, lengths, T, "producing", seq_len=seq)
    total, count = prototype_partials(hidden, mask)
    proto, _ = prototype_from_partials(total, count)
    full = response_partials(hidden, proto, positions, valid)

    # rows in an arbitrary non-contiguous split (zig-zag like context parallel)
    perm = torch.randperm(seq, generator=torch.Generator().manual_seed(0))
    parts_rows = [perm[:7], perm[7:]]
    tot = sum(prototype_partials(hidden[r], mask[:, r])[0] for r in parts_rows)
    cnt = sum(prototype_partials(hidden[r], mask[:, r])[1] for r in parts_rows)
    torch.testing.assert_close(tot, total)
    torch.testing.assert_close(cnt, count)
    dots, sqs, helds = [], [], []
    for r in parts_rows:
        lookup = row_lookup_from_positions(r, seq)
        p = response_partials(hidden[r], proto, positions, valid, row_lookup=lookup)
        dots.append(p.dot)
        sqs.append(p.sq_norm)
        helds.append(p.held)
    assert not (helds[0] & helds[1]).any() and torch.equal(helds[0] | helds[1], valid)
    torch.testing.assert_close(dots[0] + dots[1], full.dot)
    torch.testing.assert_close(sqs[0] + sqs[1], full.sq_norm)

    # columns
    cols = [slice(0, 5), slice(5, 12)]
    dot = sum(response_partials(hidden[:, :, c], proto[:, c], positions, valid).dot for c in cols)
    torch.testing.assert_close(dot, full.dot)

    states, held = gather_response_states(hidden, positions, valid)
    assert torch.equal(held, valid)
    for i in range(hidden.shape[1]):
        for t in range(int(lengths[i])):
            assert torch.equal(states[i, t], hidden[int(starts[i]) + t - 1, i])
    assert (states[~valid] == 0).all()
    # chunked upcasting (3 rows at a time) gives the same partials
    tot3, _ = prototype_partials(hidden, mask, chunk_rows=3)
    torch.testing.assert_close(tot3, total, atol=1e-6, rtol=0)
    part3 = response_partials(hidden, proto, positions, valid, chunk_rows=3)
    torch.testing.assert_close(part3.dot, full.dot, atol=1e-6, rtol=0)
    torch.testing.assert_close(part3.sq_norm, full.sq_norm, atol=1e-6, rtol=0)
    assert torch.equal(part3.held, full.held)
    cos = cosine_from_parts(full.dot, full.sq_norm, proto.square().sum(-1))
    ref, _ = reference_cosines(hidden, mask, starts, lengths, T, 1)
    torch.testing.assert_close((cos * valid).double(), ref, atol=1e-5, rtol=0)


def test_eps_semantics_match_torch_cosine_similarity():
    # both norms 1e-5: their product is below eps but each norm is not (torch clamps each norm)
    a = torch.full((1, 4), 0.5e-5, dtype=torch.float64)
    b = torch.full((4,), 0.5e-5, dtype=torch.float64)
    dot, sa, sb = (a * b).sum(-1, keepdim=True), a.square().sum(-1, keepdim=True), b.square().sum()
    torch.testing.assert_close(cosine_from_parts(dot, sa, sb.reshape(1)).squeeze(),
                               torch.cosine_similarity(a[0], b, dim=0))
    assert cosine_from_parts(dot, sa, sb.reshape(1), clamp="product").item() == pytest.approx(0.01)
    # a tiny state: torch gives 0.01, so do we
    a = torch.full((1, 4), 0.5e-10, dtype=torch.float64)
    b = torch.ones(4, dtype=torch.float64)
    dot, sa, sb = (a * b).sum(-1, keepdim=True), a.square().sum(-1, keepdim=True), b.square().sum()
    torch.testing.assert_close(cosine_from_parts(dot, sa, sb.reshape(1)).squeeze(),
                               torch.cosine_similarity(a[0], b, dim=0))
    # zero state / zero prototype -> exactly 0
    z = cosine_from_parts(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1))
    assert torch.equal(z, torch.zeros(1, 2))


def test_clear_errors():
    hidden, mask, prompt, lengths, T = left_padded_batch(5)
    with pytest.raises(ValueError, match="outside the sequence"):
        focus_cosines(hidden, mask, 0, torch.tensor([1, 0, 0, 0, 0]), T, "producing")
    with pytest.raises(ValueError, match="outside the sequence"):
        focus_cosines(hidden, mask, prompt + 1, lengths, T)
    with pytest.raises(ValueError, match=r"response_length must lie in \[0, T"):
        focus_cosines(hidden, mask, prompt, lengths + T, T)
    with pytest.raises(ValueError, match="image_mask must be"):
        focus_cosines(hidden, mask[:, 1:], prompt, lengths, T)
    with pytest.raises(ValueError, match="sequence-first"):
        focus_cosines(hidden[0], mask, prompt, lengths, T)
    with pytest.raises(ValueError, match="state_position"):
        focus_cosines(hidden, mask, prompt, lengths, T, "previous")
    with pytest.raises(TypeError, match="float"):
        focus_cosines(hidden.long(), mask, prompt, lengths, T)
