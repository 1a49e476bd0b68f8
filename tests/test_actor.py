"""MegatronActor against transformers and against itself across parallel layouts (tiny preset, fp32, gloo).

ONE launch of 4 ranks. The batch: 8 trajectories of 4 prompts (one image, another image size, two images,
text only), two ragged responses each, right-padded. For each layout -- TP1 (DP4), TP2+SP (DP2, distributed
optimizer), PP2 (DP2), TP2xPP2 (DP1) -- a fresh actor is built from the HF folder and

* ``compute_log_probs(with_focus=True)`` on the whole batch is compared (in the test process) with
  transformers' ``Qwen2_5_VLForConditionalGeneration`` on the same sequences: float64 ``log_softmax`` of its
  logits at the predicting positions, its entropy, and the focus cosines computed by
  ``megatron_vgpo.algo.focus.focus_cosines`` from its final hidden states (``output_hidden_states`` last
  element = final-norm output), to 1e-4; results are identical on every rank;
* ``train_step`` (2 mini-batches = 2 Adam steps, micro-batches by a small token budget, DP shards from
  ``shard_for_data_parallel``) gives the same losses and the same updated weights (full HF tensors from
  ``export_hf_weights``) as TP1, and TP1's weights equal the same two updates restated with transformers'
  model, ``policy_loss`` on its log-probs, ``clip_grad_norm_`` and torch ``AdamW``.

Also: at TP2xPP2 (DP1) one micro-batch per mini-batch instead of several gives the same update; at TP1 a NaN
advantage in ONE DP rank's shard makes every rank skip the step (counted) and leaves the weights as loaded.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from megatron_vgpo.distributed.multiprocess import run_on_ranks

LR = 1e-3
# Adam eps far above the per-element grads: the update is ~linear in the gradient, so fp32 reduction-order
# noise is not amplified by the per-element normalization (with eps=1e-8 a few near-cancelling elements
# differ by up to 7% of LR between layouts) while any real gradient difference still shows.
ADAM_EPS = 1e-2
LAYOUTS = [("tp1", 1, 1, False, False), ("tp2_sp", 2, 1, True, True), ("pp2", 1, 2, False, False),
           ("tp2_pp2", 2, 2, False, False)]  # name, tp, pp, sequence parallel, distributed optimizer
IMAGE_SIZES = [[(84, 84)], [(56, 84)], [(56, 56), (84, 56)], []]
TEXTS = ["How many red shapes?", "Count the circles, please.", "Compare both pictures.", "What is 2 + 3?"]
RESPONSE_LENGTHS = [[5, 9], [3, 12], [7, 1], [10, 4]]
MICRO_TOKENS = 100  # small: several micro-batches of different shapes per mini-batch


def _image(size: tuple[int, int], seed: int) -> Any:
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = (int(torch.randint(0, max(1, s - 16), (1,), generator=gen)) for s in size)
        draw.ellipse((x, y, x + 14, y + 14), fill=tuple(int(c) for c in torch.randint(0, 256, (3,), generator=gen)))
    return image


def make_batch(hf_dir: str) -> Any:
    """The 8-trajectory RLBatch (identical in every process), with old log-probs and advantages unset."""
    from transformers import AutoProcessor

    from megatron_vgpo.actor.rl_batch import build_rl_batch

    processor = AutoProcessor.from_pretrained(hf_dir)
    prompts, responses, uids = [], [], []
    gen = torch.Generator().manual_seed(0)
    for p, (sizes, text) in enumerate(zip(IMAGE_SIZES, TEXTS, strict=True)):
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": text}]
        chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        images = [_image(s, 10 * p + i) for i, s in enumerate(sizes)] or None
        enc = processor(text=[chat], images=images, return_tensors="pt")
        prompt = SimpleNamespace(input_ids=enc["input_ids"][0], pixel_values=enc.get("pixel_values"),
                                 image_grid_thw=enc.get("image_grid_thw"),
                                 mm_token_type_ids=enc["mm_token_type_ids"][0] if "mm_token_type_ids" in enc else None)
        for length in RESPONSE_LENGTHS[p]:
            prompts.append(prompt)
            responses.append(torch.randint(10, 250, (length,), generator=gen))
            uids.append(p)
    config = processor.tokenizer
    return build_rl_batch(prompts, responses, pad_token_id=config.pad_token_id,
                          image_token_id=config.convert_tokens_to_ids("<|image_pad|>"), uids=uids,
                          rewards=torch.tensor([1.0, 0.0] * 4), response_pad_to=14)


def with_training_inputs(batch: Any, old_log_probs: torch.Tensor) -> Any:
    """Old log-probs = the policy's own + noise (so ratios leave the clip range), advantages +-1 per sample."""
    import dataclasses

    gen = torch.Generator().manual_seed(1)
    mask = batch.response_mask.float()
    noise = 0.3 * torch.randn(old_log_probs.shape, generator=gen)
    adv = torch.tensor([1.0, -1.0, -0.5, 1.5, 0.7, -1.2, 1.0, -0.8]).unsqueeze(1) * mask
    return dataclasses.replace(batch, old_log_probs=(old_log_probs + noise) * mask, advantages=adv)


def _full_weights(actor: Any) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in actor.export_hf_weights()}


def _actor_body(rank: int, world_size: int, hf_dir: str) -> dict[str, Any]:
    import dataclasses

    from megatron_vgpo.actor.megatron_actor import ActorConfig, LossConfig, MegatronActor
    from megatron_vgpo.actor.rl_batch import shard_for_data_parallel
    from megatron_vgpo.distributed.process_groups import init_model_parallel

    batch = make_batch(hf_dir)
    # an entropy bonus too: its gradient goes through the vocab-parallel entropy backward at every layout
    loss_cfg = LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, entropy_coef=0.01)
    out: dict[str, Any] = {"logprobs": {}, "metrics": {}, "weights": {}, "seconds": {}}
    train_batch = None
    for name, tp, pp, sp, dist_opt in LAYOUTS:
        t0 = time.perf_counter()
        layout = init_model_parallel(tp=tp, pp=pp, seed=1234)
        cfg = ActorConfig(sequence_parallel=sp, use_distributed_optimizer=dist_opt, lr=LR, weight_decay=0.01,
                          clip_grad=1.0, micro_batch_tokens=MICRO_TOKENS, logprob_micro_batch_tokens=150,
                          logprob_chunk_tokens=7, adam_eps=ADAM_EPS)
        actor = MegatronActor(hf_dir, cfg)
        res = actor.compute_log_probs(batch, with_focus=True)
        out["logprobs"][name] = dataclasses.asdict(res)
        if train_batch is None:
            train_batch = with_training_inputs(batch, res.log_probs)
        local = shard_for_data_parallel(train_batch, layout.dp_rank, layout.dp, mini_batches=2)
        out["metrics"][name] = actor.train_step(local, mini_batches=2, loss_cfg=loss_cfg)
        weights = _full_weights(actor)
        if layout.dp_rank == 0 and layout.tp_rank == 0:
            out["weights"][name] = weights
        if name == "tp2_pp2":  # DP1: the same mini-batches as one micro-batch each
            actor = MegatronActor(hf_dir, cfg)
            m = actor.train_step(local, mini_batches=2, loss_cfg=loss_cfg, micro_batch_tokens=10_000)
            out["metrics"]["tp2_pp2_one_micro"] = m
            weights = _full_weights(actor)
            if layout.tp_rank == 0:
                out["weights"]["tp2_pp2_one_micro"] = weights
        if name == "tp1":  # NaN in one DP rank's data: every rank skips, weights stay as loaded
            actor = MegatronActor(hf_dir, cfg)
            bad = local
            if layout.dp_rank == 1:
                adv = local.advantages.clone()
                adv[0, 0] = float("nan")
                bad = dataclasses.replace(local, advantages=adv)
            out["metrics"]["tp1_nan"] = actor.train_step(bad, mini_batches=1, loss_cfg=loss_cfg)
            if rank == 0:
                out["weights"]["tp1_nan"] = _full_weights(actor)
            out["nan_actor_counters"] = (actor.steps, actor.skipped_steps)
        out["seconds"][name] = time.perf_counter() - t0
    return out


def _hf_reference(hf_dir: str, batch: Any) -> dict[str, torch.Tensor]:
    """transformers' float64 log-probs / entropy and focus cosines of the batch's responses."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vgpo.algo.focus import focus_cosines, image_token_mask

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        o = model(**batch.model_inputs(), output_hidden_states=True)
    logp_all = torch.log_softmax(o.logits.double(), dim=-1)  # [B, S, V]
    b, width = batch.batch_size, batch.responses.shape[1]
    lp, ent = torch.zeros(b, width, dtype=torch.float64), torch.zeros(b, width, dtype=torch.float64)
    for i in range(b):
        for t in range(int(batch.response_length[i])):
            p = int(batch.response_start[i]) + t
            lp[i, t] = logp_all[i, p - 1, batch.input_ids[i, p]]
            ent[i, t] = -(logp_all[i, p - 1].exp() * logp_all[i, p - 1]).sum()
    hidden = o.hidden_states[-1].double().transpose(0, 1)  # [S, B, h]
    mask = image_token_mask(batch.input_ids, model.config.image_token_id)
    cos, has = focus_cosines(hidden, mask, batch.response_start, batch.response_length, width)
    return {"log_probs": lp, "entropy": ent, "focus_cos": cos, "has_image": has}


def _hf_reference_update(hf_dir: str, train_batch: Any, tmp_dir: Path) -> dict[str, torch.Tensor]:
    """The same 2 policy updates done with transformers + torch: per mini-batch the token-mean policy loss
    (``policy_loss`` on transformers' log-probs/entropy), grad-norm clip 1.0, AdamW with Megatron's weight
    decay rule (none on biases and 1-D params). Returns the updated weights under checkpoint names."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vgpo.algo.losses import policy_loss
    from megatron_vgpo.checkpoint.hf_mapping import read_hf_state_dict

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if p.dim() > 1 and not n.endswith(".bias")], "weight_decay": 0.01},
              {"params": [p for n, p in named if p.dim() == 1 or n.endswith(".bias")], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=ADAM_EPS)
    width = train_batch.responses.shape[1]
    for k in range(2):
        mb = train_batch.select(range(4 * k, 4 * k + 4))
        optimizer.zero_grad()
        logp_all = torch.log_softmax(model(**mb.model_inputs()).logits.float(), dim=-1)  # [b, s, V]
        lp = torch.zeros(mb.batch_size, width)
        ent = torch.zeros(mb.batch_size, width)
        for i in range(mb.batch_size):
            start, n = int(mb.response_start[i]), int(mb.response_length[i])
            rows = logp_all[i, start - 1:start + n - 1]  # position p is predicted at p - 1
            lp[i, :n] = rows.gather(1, mb.input_ids[i, start:start + n].unsqueeze(1)).squeeze(1)
            ent[i, :n] = -(rows.exp() * rows).sum(-1)
        loss, _ = policy_loss(lp, mb.old_log_probs, mb.advantages, mb.response_mask, clip_low=0.2, clip_high=0.28,
                              dual_clip=3.0, global_tokens=mb.num_response_tokens, entropy=ent, entropy_coef=0.01)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
    model.save_pretrained(tmp_dir)
    return {k: v.float() for k, v in read_hf_state_dict(str(tmp_dir)).items()}


@pytest.mark.multirank
def test_actor_layouts_match_transformers_and_each_other(tiny_hf_dir: Path, tmp_path: Path):
    hf_dir = str(tiny_hf_dir)
    t0 = time.perf_counter()
    results = run_on_ranks(_actor_body, world_size=4, args=(hf_dir,), megatron=True,
                           env={"OMP_NUM_THREADS": "1"}, timeout_s=900)
    launch_s = time.perf_counter() - t0
    batch = make_batch(hf_dir)
    ref = _hf_reference(hf_dir, batch)
    assert ref["has_image"].tolist() == [True] * 6 + [False] * 2
    report: dict[str, Any] = {"launch_s": round(launch_s, 1), "seconds": results[0]["seconds"]}

    # compute_log_probs: transformers parity on every rank of every layout
    for rank, r in enumerate(results):
        for name, res in r["logprobs"].items():
            for key in ("log_probs", "entropy", "focus_cos"):
                diff = float((res[key].double() - ref[key]).abs().max())
                report[f"{name}_{key}_diff"] = max(diff, report.get(f"{name}_{key}_diff", 0.0))
                assert diff < 1e-4, (rank, name, key, diff)
            assert res["has_image"].tolist() == ref["has_image"].tolist(), (rank, name)
            assert torch.equal(res["log_probs"], results[0]["logprobs"][name]["log_probs"]), (rank, name)

    # train_step: identical losses and weights at every layout
    metrics = {name: m for r in results for name, m in r["metrics"].items()}
    ref_m = results[0]["metrics"]["tp1"]
    assert ref_m["steps"] == 2 and ref_m["skipped_steps"] == 0 and ref_m["tokens"] == float(batch.num_response_tokens)
    assert 0.0 < ref_m["pg_clipfrac_high"] + ref_m["pg_clipfrac_low"] < 1.0  # the clip is exercised
    assert math.isfinite(ref_m["grad_norm"]) and ref_m["grad_norm"] > 0
    assert ref_m["lr"] == pytest.approx(LR)
    for r in results:
        for name in ("tp1", "tp2_sp", "pp2", "tp2_pp2", "tp2_pp2_one_micro"):
            if name in r["metrics"]:
                for key in ("loss", "pg_clipfrac_high", "pg_clipfrac_low", "approx_kl", "entropy"):
                    assert r["metrics"][name][key] == pytest.approx(ref_m[key], rel=1e-5, abs=1e-6), (name, key)
                assert r["metrics"][name]["grad_norm"] == pytest.approx(ref_m["grad_norm"], rel=1e-4), name
    assert metrics["tp2_pp2_one_micro"]["micro_batches"] == 2 < metrics["tp2_pp2"]["micro_batches"]
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for r in results:  # each pipeline stage reports its own tensors
        for name, w in r["weights"].items():
            weights.setdefault(name, {}).update(w)
    from megatron_vgpo.checkpoint.hf_mapping import read_hf_state_dict

    initial = {k: v.float() for k, v in read_hf_state_dict(hf_dir).items()}
    assert set(weights["tp1"]) == set(initial)
    moved = max(float((weights["tp1"][k] - initial[k]).abs().max()) for k in initial)
    report["weights_moved_max"] = moved
    assert moved > 0.5 * LR
    for name in ("tp2_sp", "pp2", "tp2_pp2", "tp2_pp2_one_micro"):
        assert set(weights[name]) == set(initial), name
        diff = max(float((weights[name][k] - weights["tp1"][k]).abs().max()) for k in initial)
        report[f"{name}_weight_diff"] = diff
        assert diff < 1e-3 * LR, (name, diff)  # measured: 1 fp32 ulp (1.2e-7 on weights near 1.0)

    # an independent restatement of the update with transformers + torch AdamW
    train_batch = with_training_inputs(batch, results[0]["logprobs"]["tp1"]["log_probs"])
    hf_updated = _hf_reference_update(hf_dir, train_batch, tmp_path / "hf_updated")
    assert set(hf_updated) == set(initial)
    diff = max(float((hf_updated[k] - weights["tp1"][k]).abs().max()) for k in initial)
    report["transformers_torch_adamw_weight_diff"] = diff
    assert diff < 1e-3 * LR, diff  # measured 6e-8

    # NaN: skipped on every rank, counted, weights unchanged
    for r in results:
        assert r["metrics"]["tp1_nan"]["skipped_steps"] == 1 and r["metrics"]["tp1_nan"]["steps"] == 0
        assert r["nan_actor_counters"] == (0, 1)
    assert all(torch.equal(weights["tp1_nan"][k], initial[k]) for k in initial)
    print("actor test report:", report)


# ------------------------------------------------------------------------------------------------------
# single-process checks of the batch container and the micro-batch packing
# ------------------------------------------------------------------------------------------------------


def test_rl_batch_select_keeps_images_with_samples(tiny_hf_dir: Path):
    from megatron_vgpo.actor.rl_batch import RLBatch, build_rl_batch, shard_for_data_parallel

    batch = make_batch(str(tiny_hf_dir))
    assert batch.images_per_sample.tolist() == [1, 1, 1, 1, 2, 2, 0, 0]
    assert batch.attention_mask.sum(1).tolist() == batch.seq_lengths.tolist()
    for i in range(batch.batch_size):  # prompt then response, right-padded
        s, n = int(batch.response_start[i]), int(batch.response_length[i])
        assert torch.equal(batch.input_ids[i, s:s + n], batch.responses[i, :n])
        assert int(batch.mm_token_type_ids[i, s:].sum()) == 0
    order = [5, 0, 7, 2]
    picked = batch.select(order, seq_multiple=4)
    assert picked.input_ids.shape[1] % 4 == 0 and picked.input_ids.shape[1] >= int(picked.seq_lengths.max())
    # an independent rebuild from the same prompts/responses gives the same images and tokens
    patch_offsets = torch.cumsum(batch.patches_per_sample, 0) - batch.patches_per_sample
    image_offsets = torch.cumsum(batch.images_per_sample, 0) - batch.images_per_sample
    prompts, responses = [], []
    for i in order:
        p0, np_ = int(patch_offsets[i]), int(batch.patches_per_sample[i])
        i0, ni = int(image_offsets[i]), int(batch.images_per_sample[i])
        s = int(batch.response_start[i])
        prompts.append(SimpleNamespace(
            input_ids=batch.input_ids[i, :s], mm_token_type_ids=batch.mm_token_type_ids[i, :s],
            pixel_values=batch.pixel_values[p0:p0 + np_] if np_ else None,
            image_grid_thw=batch.image_grid_thw[i0:i0 + ni] if ni else None))
        responses.append(batch.responses[i, :int(batch.response_length[i])])
    rebuilt = build_rl_batch(prompts, responses, pad_token_id=batch.pad_token_id, image_token_id=-1,
                             uids=batch.uids[order], rewards=batch.rewards[order], response_pad_to=14, seq_multiple=4)
    for field in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                  "responses", "response_mask", "uids", "rewards"):
        assert torch.equal(getattr(picked, field), getattr(rebuilt, field)), field
    # concat undoes a split
    joined = RLBatch.concat([batch.select([0, 1, 2]), batch.select([3, 4, 5, 6, 7])])
    assert torch.equal(joined.pixel_values, batch.pixel_values) and torch.equal(joined.input_ids, batch.input_ids)
    # DP shards: global mini-batch k is the same set of trajectories at every DP size (response lengths
    # are distinct here, so they identify the trajectories)
    for dp in (1, 2, 4):
        shards = [shard_for_data_parallel(batch, d, dp, mini_batches=2) for d in range(dp)]
        for k in range(2):
            got = []
            for sh in shards:
                half = sh.batch_size // 2
                got += sh.response_length[k * half:(k + 1) * half].tolist()
            assert sorted(got) == sorted(batch.response_length[k * 4:(k + 1) * 4].tolist()), (dp, k)
    with pytest.raises(ValueError, match="not divisible"):
        shard_for_data_parallel(batch, 0, 3)
    with pytest.raises(ValueError, match="prompts but"):
        build_rl_batch(prompts, responses[:1], pad_token_id=0, image_token_id=1)


def test_pack_by_token_budget():
    from megatron_vgpo.actor.batching import pack_by_token_budget, padded_tokens

    lengths = [30, 10, 50, 20, 20, 200, 5, 5, 5]
    groups = pack_by_token_budget(lengths, 100)
    assert groups == pack_by_token_budget(torch.tensor(lengths), 100)  # deterministic, tensor or list
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # stable: original order
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 100 or len(g) == 1
    assert [5] in groups  # the 200-token sequence alone
    assert groups == [[0, 1], [2, 3], [4], [5], [6, 7, 8]]  # 2 x 50 fits exactly
    assert padded_tokens(lengths, groups) == 60 + 100 + 20 + 200 + 15
    assert pack_by_token_budget([7, 7, 7], 16, seq_multiple=4) == [[0, 1], [2]]  # 7 -> 8 per sequence
    assert pack_by_token_budget([1] * 5, 1000, max_sequences=2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        pack_by_token_budget(lengths, 0)
