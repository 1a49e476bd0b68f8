"""End-to-end weight-sync check: Megatron actor at TP x PP -> a real rollout engine, verified by logprobs.

Used by ``tools/check_weight_sync.py`` (and its test). On ``tp * pp`` ranks launched with
:func:`megatron_vgpo.distributed.multiprocess.run_on_ranks`:

1. every rank builds the :class:`~megatron_vgpo.actor.megatron_actor.MegatronActor` from the HF folder; rank 0 also
   starts the engine (SGLang in its worker process, or the transformers backend) from the same folder;
2. for each transport: the actor's weights are perturbed (deterministic noise, a fresh seed per transport,
   so the engine is stale again), rank 0 generates greedily for a prompt with an image and a text-only
   prompt, and the actor scores those exact sequences: the gap BEFORE the sync must be large (the engine
   still has the old weights);
3. the weights are streamed to rank 0 (:func:`iter_model_weights_to_rank`) and pushed with the transport;
4. rank 0 generates again, the actor scores the new sequences, and the gap AFTER the sync must be within
   the tolerance: 1e-4 for text, 2e-3 with an image (SGLang's own vision code differs from transformers'
   by up to ~8e-4 on the tiny model).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from megatron_vgpo.distributed import comm

TEXT_TOLERANCE = 1e-4
IMAGE_TOLERANCE = 2e-3
STALE_FACTOR = 10.0  # the pre-sync gap must exceed STALE_FACTOR x tolerance, or the check proves nothing
MAX_NEW_TOKENS = 8


@dataclass
class _PromptTensors:
    """The prompt fields :func:`build_rl_batch` reads (see its ``PromptLike``)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    mm_token_type_ids: torch.Tensor | None


def _test_image() -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (84, 84), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 36, 36), fill=(220, 30, 30))
    draw.rectangle((48, 44, 76, 72), fill=(255, 160, 0))
    return image


def _prompts(processor: Any) -> tuple[list[Any], list[_PromptTensors]]:
    """(rollout requests, actor prompt tensors) for one image prompt and one text-only prompt."""
    from megatron_vgpo.rollout.base import RolloutRequest

    image = _test_image()
    contents = [
        [{"type": "image"}, {"type": "text", "text": "How many red shapes are in the image?"}],
        [{"type": "text", "text": "Count from one to five."}],
    ]
    requests, tensors = [], []
    for index, content in enumerate(contents):
        images = [image] if any(item["type"] == "image" for item in content) else []
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        requests.append(RolloutRequest(uid=str(index), prompt_text=text, images=images))
        enc = processor(text=[text], images=images or None, return_tensors="pt")
        tensors.append(_PromptTensors(
            input_ids=enc["input_ids"][0], pixel_values=enc.get("pixel_values"),
            image_grid_thw=enc.get("image_grid_thw"),
            mm_token_type_ids=enc["mm_token_type_ids"][0] if "mm_token_type_ids" in enc else None))
    return requests, tensors


def _perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Add ``scale * std(p) * N(0, 1)`` to every parameter; identical on the TP ranks of a replicated param.

    With tied embeddings and PP > 1 the last stage's output-layer copy is then re-synchronised from the
    first stage's embedding by Megatron's own ``setup_embeddings_and_output_layer`` (collective)."""
    from megatron.core import parallel_state as ps

    from megatron_vgpo.checkpoint.config_check import unwrap_model

    tp_rank = ps.get_tensor_model_parallel_rank()
    module = unwrap_model(model)
    with torch.no_grad():
        for name, param in module.named_parameters():
            sharded = getattr(param, "tensor_model_parallel", False)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode())
                                                      + (tp_rank if sharded else 0))
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((noise * scale * float(param.float().std().clamp(min=1e-3))).to(param.dtype))
        module.language_model.setup_embeddings_and_output_layer()


def _engine_pass(engine: Any, requests: list[Any]) -> tuple[list[list[int]], list[torch.Tensor]]:
    from megatron_vgpo.rollout.base import SamplingParams

    outputs = engine.generate(requests, SamplingParams(n=1, temperature=0.0, max_new_tokens=MAX_NEW_TOKENS))
    return [list(o.response_ids) for o in outputs], [o.logprobs.float() for o in outputs]


def _actor_log_probs(actor: Any, prompts: list[_PromptTensors], responses: list[list[int]],
                     processor: Any) -> list[torch.Tensor]:
    from megatron_vgpo.actor.rl_batch import build_rl_batch
    from megatron_vgpo.models.tokenizers import special_token_ids

    ids = special_token_ids(processor.tokenizer)
    batch = build_rl_batch(prompts, responses, pad_token_id=ids.pad, image_token_id=ids.image_pad,
                           seq_multiple=actor.tp if actor.config.sequence_parallel else 1)
    result = actor.compute_log_probs(batch, temperature=1.0)
    return [result.log_probs[i, : len(r)] for i, r in enumerate(responses)]


def _gaps(engine_lp: list[torch.Tensor], actor_lp: list[torch.Tensor]) -> list[float]:
    return [float((e - a).abs().max()) for e, a in zip(engine_lp, actor_lp)]


def weight_sync_rank_body(rank: int, world_size: int, hf_dir: str, tp: int, pp: int, engine_kind: str,
                          transports: list[str], bucket_bytes: int, perturb_scale: float = 0.5) -> dict:
    """Per-rank body for ``run_on_ranks(..., megatron=True)``; rank 0 returns the report (see module doc)."""
    from transformers import AutoProcessor

    from megatron_vgpo.actor.megatron_actor import ActorConfig, MegatronActor
    from megatron_vgpo.actor.weight_export import iter_model_weights_to_rank
    from megatron_vgpo.distributed.process_groups import init_model_parallel

    init_model_parallel(tp=tp, pp=pp, seed=1234)
    actor = MegatronActor(hf_dir, ActorConfig())
    processor = AutoProcessor.from_pretrained(hf_dir)
    requests, prompt_tensors = _prompts(processor)
    engine = None
    if rank == 0:
        if engine_kind == "sglang":
            from megatron_vgpo.rollout.sglang_backend import SGLangEngine

            engine = SGLangEngine(hf_dir, engine_kwargs={"dtype": "float32", "random_seed": 0, "log_level": "error"})
        else:
            from megatron_vgpo.rollout.hf_backend import HFRolloutEngine

            engine = HFRolloutEngine(hf_dir)
    report: dict[str, Any] = {"transports": {}}
    try:
        for index, transport in enumerate(transports):
            _perturb(actor.model, seed=index + 1, scale=perturb_scale)
            box: list[Any] = [_engine_pass(engine, requests) if rank == 0 else None]
            comm.broadcast_object_list(box, src=0)
            responses, engine_lp = box[0]
            before = _gaps(engine_lp, _actor_log_probs(actor, prompt_tensors, responses, processor))

            started = time.perf_counter()
            weights = iter_model_weights_to_rank(actor.model, actor.hf_config, dst=0)
            if rank == 0:
                kwargs = {"transport": transport} if engine_kind == "sglang" else {}
                stats = engine.update_weights(weights, bucket_bytes=bucket_bytes, **kwargs)
            else:
                for _ in weights:
                    pass
                stats = None
            seconds = time.perf_counter() - started

            box = [_engine_pass(engine, requests) if rank == 0 else None]
            comm.broadcast_object_list(box, src=0)
            responses, engine_lp = box[0]
            after = _gaps(engine_lp, _actor_log_probs(actor, prompt_tensors, responses, processor))
            report["transports"][transport] = {
                "gap_before": {"image": before[0], "text": before[1]},
                "gap_after": {"image": after[0], "text": after[1]},
                "seconds": seconds,
                "bytes": stats.num_bytes if stats is not None else None,
                "buckets": stats.num_buckets if stats is not None else None,
                "tensors": stats.num_tensors if stats is not None else None,
            }
    finally:
        if engine is not None:
            engine.shutdown()
    return report


def judge(report: dict) -> list[str]:
    """Problems with a report (empty when every transport synced and matched within tolerance)."""
    problems = []
    for transport, entry in report["transports"].items():
        for kind, tol in (("image", IMAGE_TOLERANCE), ("text", TEXT_TOLERANCE)):
            if entry["gap_after"][kind] > tol:
                problems.append(f"{transport}: {kind} logprob gap after sync {entry['gap_after'][kind]:.2e} > {tol:g}")
            if entry["gap_before"][kind] <= STALE_FACTOR * tol:
                problems.append(f"{transport}: the engine already matched the perturbed actor before the sync "
                                f"({kind} gap {entry['gap_before'][kind]:.2e}): the check cannot see a sync")
    return problems
