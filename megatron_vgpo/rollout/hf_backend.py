"""Rollouts with transformers' ``generate`` in the calling process (no SGLang needed).

:class:`HFRolloutEngine` loads ``Qwen2_5_VLForConditionalGeneration`` and the folder's processor, and
implements :class:`~megatron_vgpo.rollout.base.RolloutEngine`: batched, left-padded prompts with images,
``n`` samples per prompt, greedy or temperature / top-p sampling.

Logprobs come from ``generate(output_logits=True)``: the *raw* logits of every step (before any logits
processor), turned into ``log_softmax(logits / temperature)`` for the sampled token (temperature 1 when
greedy), as in the conventions of :mod:`megatron_vgpo.rollout.base`. Those are the logits the tokens were
drawn from, so no second forward pass is needed; :meth:`HFRolloutEngine.score` is that second pass
(prompt + response in one forward) and is what the tests hold the generation logprobs against.

Weights: :meth:`HFRolloutEngine.update_weights` takes Hugging Face *checkpoint* names (``visual.*``,
``model.layers.*``, ``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``) and maps them
to transformers 5's in-memory names (``model.visual.*``, ``model.language_model.*``, ``lm_head.*``). The
transformers 5.23 conversion registry has no entry for ``qwen2_5_vl`` (its renaming is implicit in the
module tree), so the mapping is the small table :data:`CHECKPOINT_TO_MODULE_PREFIXES`; an in-memory name
is accepted as is. A name that matches no parameter is an error that names it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_vgpo.rollout.base import (
    DEFAULT_BUCKET_BYTES,
    RolloutEngine,
    RolloutOutput,
    RolloutRequest,
    SamplingParams,
    WeightSyncStats,
    bucket_nbytes,
    iter_buckets,
)

logger = logging.getLogger(__name__)

# (checkpoint-name pattern, replacement) tried in order; first match wins.
CHECKPOINT_TO_MODULE_PREFIXES: tuple[tuple[str, str], ...] = (
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!visual\.|language_model\.)", "model.language_model."),
)


def checkpoint_name_to_module_name(name: str, module_names: set[str] | dict[str, object]) -> str:
    """In-memory (transformers 5) name of a Qwen2.5-VL checkpoint tensor name.

    Raises:
        KeyError: when neither ``name`` nor its mapped form is a parameter/buffer of the model.
    """
    if name in module_names:
        return name
    for pattern, replacement in CHECKPOINT_TO_MODULE_PREFIXES:
        mapped = re.sub(pattern, replacement, name, count=1)
        if mapped != name and mapped in module_names:
            return mapped
    example = next(iter(sorted(module_names)), "")
    raise KeyError(
        f"weight {name!r} matches no tensor of the model (tried checkpoint->module prefixes "
        f"{[p for p, _ in CHECKPOINT_TO_MODULE_PREFIXES]}); expected HF checkpoint names such as "
        f"'model.layers.0.mlp.down_proj.weight' or in-memory names such as {example!r}"
    )


@dataclass
class _PreparedPrompt:
    """One request after image preprocessing. ``expanded_ids`` / ``mm_token_type_ids``: [L] int64
    (1 marks image tokens); ``pixel_values``: [num_patches, C*T*P*P] or None; ``image_grid_thw``: [I, 3]."""

    raw_ids: list[int]
    expanded_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


class HFRolloutEngine(RolloutEngine):
    """transformers ``generate`` as a rollout engine, in this process, on ``device``.

    Args:
        model_dir: a Hugging Face Qwen2.5-VL folder (config, weights, tokenizer, processor).
        dtype: parameter dtype (float32 for exact parity checks).
        device: where the model runs.
        max_batch_rows: at most this many sequences (prompts x samples) per ``generate`` call.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_batch_rows: int = 64,
    ) -> None:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.max_batch_rows = max_batch_rows
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        self.tokenizer = self.processor.tokenizer
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model_dir, dtype=dtype)
        self.model.to(self.device).eval()
        config = self.model.config
        self.image_token_id = int(config.image_token_id)
        self.merge_size = int(self.processor.image_processor.merge_size)
        eos = self.model.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not eos_ids and self.tokenizer.eos_token_id is not None:
            eos_ids = [int(self.tokenizer.eos_token_id)]
        self.default_stop_token_ids: tuple[int, ...] = tuple(int(t) for t in eos_ids)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.default_stop_token_ids[0])
        self._tensors_by_name: dict[str, torch.Tensor] = self.model.state_dict(keep_vars=True)

    # ------------------------------------------------------------------ prompts
    def _prepare(self, request: RolloutRequest) -> _PreparedPrompt:
        if request.prompt_ids is not None:
            raw_ids = [int(t) for t in request.prompt_ids]
        else:
            raw_ids = list(self.tokenizer(request.prompt_text, add_special_tokens=False)["input_ids"])
        placeholders = [i for i, t in enumerate(raw_ids) if t == self.image_token_id]
        if len(placeholders) != len(request.images):
            raise ValueError(
                f"request {request.uid!r}: {len(placeholders)} image placeholder token(s) "
                f"(id {self.image_token_id}) but {len(request.images)} image(s); prompt ids must be raw "
                "(one placeholder per image, not expanded to patch tokens)"
            )
        if not request.images:
            ids = torch.tensor(raw_ids, dtype=torch.long)
            return _PreparedPrompt(raw_ids, ids, torch.zeros_like(ids), None, None)
        image_inputs = self.processor.image_processor(images=list(request.images), return_tensors="pt")
        grid_thw = image_inputs["image_grid_thw"]
        counts = (grid_thw.prod(dim=-1) // (self.merge_size**2)).tolist()
        expanded: list[int] = []
        types: list[int] = []
        image_index = 0
        for token in raw_ids:
            if token == self.image_token_id:
                expanded.extend([token] * int(counts[image_index]))
                types.extend([1] * int(counts[image_index]))
                image_index += 1
            else:
                expanded.append(token)
                types.append(0)
        return _PreparedPrompt(
            raw_ids,
            torch.tensor(expanded, dtype=torch.long),
            torch.tensor(types, dtype=torch.long),
            image_inputs["pixel_values"],
            grid_thw,
        )

    def _batch_inputs(self, prompts: Sequence[_PreparedPrompt]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for several prompts ([B, L_max] ids / mask / type ids + images)."""
        width = max(int(p.expanded_ids.numel()) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        types = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            length = int(p.expanded_ids.numel())
            ids[row, width - length :] = p.expanded_ids
            mask[row, width - length :] = 1
            types[row, width - length :] = p.mm_token_type_ids
        inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
        with_images = [p for p in prompts if p.pixel_values is not None]
        if with_images:
            inputs["pixel_values"] = torch.cat([p.pixel_values for p in with_images]).to(self.model.dtype)
            inputs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images])
        return {k: v.to(self.device) for k, v in inputs.items()}

    # ------------------------------------------------------------------ generate
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[RolloutOutput]:
        """See :meth:`RolloutEngine.generate`. Rows are processed in chunks of ``max_batch_rows``."""
        prepared = [self._prepare(r) for r in requests]
        rows = [(i, j) for i in range(len(requests)) for j in range(params.n)]
        stop_ids = tuple(dict.fromkeys(self.default_stop_token_ids + tuple(params.stop_token_ids)))
        outputs: list[RolloutOutput] = []
        with torch.random.fork_rng(devices=[]):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(rows), self.max_batch_rows):
                chunk = rows[start : start + self.max_batch_rows]
                outputs.extend(self._generate_rows(requests, prepared, chunk, params, stop_ids))
        return outputs

    @torch.no_grad()
    def _generate_rows(
        self,
        requests: Sequence[RolloutRequest],
        prepared: Sequence[_PreparedPrompt],
        rows: Sequence[tuple[int, int]],
        params: SamplingParams,
        stop_ids: Sequence[int],
    ) -> list[RolloutOutput]:
        inputs = self._batch_inputs([prepared[i] for i, _ in rows])
        sampling = (
            {"do_sample": False}
            if params.greedy
            else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        )
        result = self.model.generate(
            **inputs,
            **sampling,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        prompt_width = inputs["input_ids"].shape[1]
        new_tokens = result.sequences[:, prompt_width:].cpu()  # [rows, steps]
        # [rows, steps, vocab] raw logits -> logprobs of the drawn tokens under the logprob temperature
        logits = torch.stack(result.logits, dim=1).float().cpu()
        logprobs = torch.log_softmax(logits / params.logprob_temperature, dim=-1)
        token_logprobs = logprobs.gather(-1, new_tokens[..., None])[..., 0]
        stop_set = set(int(t) for t in stop_ids)
        outputs = []
        for row, (i, j) in enumerate(rows):
            tokens = new_tokens[row].tolist()
            end = next((k + 1 for k, t in enumerate(tokens) if t in stop_set), None)
            finish = "stop" if end is not None else "length"
            length = end if end is not None else len(tokens)
            outputs.append(
                RolloutOutput(
                    uid=requests[i].uid,
                    sample_index=j,
                    prompt_ids=list(prepared[i].raw_ids),
                    response_ids=tokens[:length],
                    logprobs=token_logprobs[row, :length].to(torch.float32).clone(),
                    finish_reason=finish,
                )
            )
        return outputs

    # ------------------------------------------------------------------ score
    @torch.no_grad()
    def score(
        self,
        requests: Sequence[RolloutRequest],
        response_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        """One forward pass per request over prompt + response; float32 [R_i] logprobs."""
        if len(requests) != len(response_ids):
            raise ValueError(f"{len(requests)} requests but {len(response_ids)} responses")
        results = []
        for request, response in zip(requests, response_ids):
            p = self._prepare(request)
            response_t = torch.tensor(list(response), dtype=torch.long)
            ids = torch.cat([p.expanded_ids, response_t])[None]
            types = torch.cat([p.mm_token_type_ids, torch.zeros_like(response_t)])[None]
            extra = {}
            if p.pixel_values is not None:
                extra = {"pixel_values": p.pixel_values.to(self.model.dtype), "image_grid_thw": p.image_grid_thw}
            extra = {k: v.to(self.device) for k, v in extra.items()}
            logits = (
                self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=torch.ones_like(ids, device=self.device),
                    mm_token_type_ids=types.to(self.device),
                    **extra,
                )
                .logits[0]
                .float()
                .cpu()
            )
            prompt_len = int(p.expanded_ids.numel())
            step_logprobs = torch.log_softmax(logits[prompt_len - 1 : -1] / temperature, dim=-1)
            results.append(step_logprobs.gather(-1, response_t[:, None])[:, 0].clone())
        return results

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> WeightSyncStats:
        """Copy ``(checkpoint name, tensor)`` pairs into the model (cast to the parameter's dtype/device).

        Raises:
            KeyError: a name matching no tensor of the model.
            ValueError: a shape different from the parameter's.
        """
        stats = WeightSyncStats(transport="hf_in_process")
        start = time.perf_counter()
        for bucket in tqdm(iter_buckets(named_tensors, bucket_bytes), desc="hf weight update", leave=False,
                           delay=2.0):
            for name, tensor in bucket:
                target = self._tensors_by_name[checkpoint_name_to_module_name(name, self._tensors_by_name)]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"weight {name!r}: shape {tuple(tensor.shape)} but the model holds {tuple(target.shape)}"
                    )
                target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
            stats.num_tensors += len(bucket)
            stats.num_bytes += bucket_nbytes(bucket)
            stats.num_buckets += 1
        stats.seconds = time.perf_counter() - start
        logger.debug("hf engine: loaded %d tensors (%.1f MB)", stats.num_tensors, stats.num_bytes / 1e6)
        return stats

    def shutdown(self) -> None:
        """Drops nothing explicitly: the model is freed with the engine object."""
