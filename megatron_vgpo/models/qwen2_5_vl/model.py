"""Qwen2.5-VL on Megatron-Core: transformers' vision tower + a Megatron ``GPTModel`` with M-RoPE.

Which rank holds what:

* ``vision_model`` -- transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (patch embedding, vision
  blocks with windowed/full attention, patch merger), reused as is. Only on the first pipeline stage; a full
  replica on every TP rank (it is not tensor-parallel). Every TP rank computes the same image features, and
  the gradient reaching them is the same on every TP rank (the decoder's first column-parallel layer, or the
  SP gather, all-reduces it), so the vision grads are equal across TP: :func:`allreduce_vision_grads`
  averages them over TP to keep replicas bit-identical, and their params carry no ``tensor_model_parallel``
  / ``sequence_parallel`` attribute (Megatron treats them as TP-duplicates: counted once in grad norms, never
  summed over TP).
* ``language_model`` -- Megatron ``GPTModel`` (RMSNorm, SwiGLU, GQA with QKV bias, ``mrope``), with the
  stage's share of the decoder layers; embedding on the first stage, final norm + output layer on the last.

Sequence layouts: inputs are batch-major ([b, s]); inside the decoder Megatron is sequence-major [s, b, h];
with sequence parallel each TP rank holds [s/tp, b, h] between layers. Outputs follow ``GPTModel``: logits
[b, s, vocab/TP] (vocab-parallel, full sequence even with SP) on the last stage, the hidden states
[s(/tp), b, h] on the others; a loss [b, s] when ``labels`` are given.

Padding: batches must be right-padded. Attention is causal, so a valid (non-pad) query never attends to a
pad key (all pads come after it); outputs at pad positions are meaningless and must be masked by callers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from megatron_vgpo.models.qwen2_5_vl.config import (
    layer_spec,
    megatron_vocab_size,
    text_rope,
    transformer_config_from_hf,
)
from megatron_vgpo.models.qwen2_5_vl.rope_index import mrope_position_ids

try:  # megatron is a hard dependency of this module; imported here for the base class
    from megatron.core.transformer.module import MegatronModule
except ImportError as exc:  # pragma: no cover - environment problem, not a code path
    raise ImportError("megatron_vgpo.models.qwen2_5_vl needs megatron-core") from exc

logger = logging.getLogger(__name__)


class ImageTokenMismatchError(ValueError):
    """The ``<|image_pad|>`` tokens of a sample and the features of its images differ in number."""


def check_right_padded(attention_mask: Tensor) -> None:
    """Raise ``ValueError`` unless every row of ``attention_mask`` [b, s] is ones followed by zeros."""
    mask = attention_mask.to(torch.int64)
    bad = (mask[:, 1:] > mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"attention_mask rows {bad} are not right-padded (a 1 follows a 0); pad on the right")


def image_features_per_sample(
    input_ids: Tensor, image_token_id: int, image_grid_thw: Tensor | None, spatial_merge_size: int
) -> list[int]:
    """Images per sample, checked: sample i takes the next images (in ``image_grid_thw`` order) until their
    merged-patch counts add up to its ``<|image_pad|>`` count. Raises :class:`ImageTokenMismatchError` naming
    the first sample whose count cannot be matched, or the images left over."""
    tokens = (input_ids == image_token_id).sum(dim=1).tolist()
    features = [] if image_grid_thw is None else (image_grid_thw.prod(-1) // spatial_merge_size**2).tolist()
    images_per_sample: list[int] = []
    cursor = 0
    for sample, need in enumerate(tokens):
        have, start = 0, cursor
        while have < need and cursor < len(features):
            have += features[cursor]
            cursor += 1
        if have != need:
            raise ImageTokenMismatchError(
                f"sample {sample}: {need} <|image_pad|> tokens but its images (#{start}..#{cursor - 1} of "
                f"{len(features)}) give {have} features (per image: {features[start:cursor]})"
            )
        images_per_sample.append(cursor - start)
    if cursor != len(features):
        raise ImageTokenMismatchError(
            f"{len(features) - cursor} image(s) left over after all {len(tokens)} samples' <|image_pad|> "
            f"tokens were matched (features per unused image: {features[cursor:]})"
        )
    return images_per_sample


class Qwen2_5_VLModel(MegatronModule):  # noqa: N801 (the model's name, as in transformers)
    """Qwen2.5-VL for Megatron-Core (see the module docstring for what each rank holds).

    Attributes:
        vision_model: transformers' vision tower (first stage only, else ``None``).
        language_model: Megatron ``GPTModel`` of this stage.
        hf_config: the HF ``Qwen2_5_VLConfig``; ``hf_vocab_size``: the HF vocabulary (logit columns beyond it,
            if TP forced padding, must be ignored).
        captured_final_hidden: after each forward on the last stage, the output of
            ``language_model.decoder.final_layernorm`` (= input of the output layer), detached, sequence-major
            [s, b, h] (with sequence parallel: this TP rank's shard [s/tp, b, h], rank r holding positions
            ``r*s/tp .. (r+1)*s/tp - 1``); ``None`` elsewhere or when ``capture_final_hidden`` is False.
            Each forward (each micro-batch of a pipeline schedule) overwrites it: read it in the schedule's
            loss function of that micro-batch. It costs no extra compute (a forward hook keeps a reference).
    """

    def __init__(
        self,
        hf_config: Any,
        config: Any,
        *,
        pre_process: bool,
        post_process: bool,
        freeze_vision: bool = False,
    ) -> None:
        super().__init__(config=config)
        from megatron.core import parallel_state as ps
        from megatron.core.enums import ModelType
        from megatron.core.models.gpt import GPTModel

        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        self.hf_config = hf_config
        self.hf_vocab_size = int(hf_config.text_config.vocab_size)
        self.pre_process = pre_process
        self.post_process = post_process
        self.capture_final_hidden = True
        self.captured_final_hidden: Tensor | None = None
        self.vision_model: torch.nn.Module | None = None
        if pre_process:
            self.vision_model = _build_vision_tower(hf_config, config.params_dtype)
            if freeze_vision:
                self.vision_model.requires_grad_(False)
        theta, _, _ = text_rope(hf_config)
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(),
            vocab_size=megatron_vocab_size(self.hf_vocab_size, ps.get_tensor_model_parallel_world_size()),
            max_sequence_length=int(hf_config.text_config.max_position_embeddings),
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type="mrope",
            rotary_base=theta,
            # image features are scattered into the full [s, b, h] embeddings before the SP split
            scatter_embedding_sequence_parallel=False,
        )
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights
        if post_process:
            self.language_model.decoder.final_layernorm.register_forward_hook(self._capture_hook)

    # ----------------------------------------------------------------------------------------------------
    # Megatron conventions (pipeline schedules, finalize_model_grads)
    # ----------------------------------------------------------------------------------------------------

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        """Hidden states [s(/tp), b, h] received from the previous pipeline stage."""
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> Tensor | None:
        """The word-embedding (first stage) or output-layer (last stage) weight shared under tying."""
        return self.language_model.shared_embedding_or_output_weight()

    def _capture_hook(self, _module: torch.nn.Module, _inputs: Any, output: Tensor) -> None:
        self.captured_final_hidden = output.detach() if self.capture_final_hidden else None

    # ----------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
        """First stage: token embeddings with image features at ``<|image_pad|>`` positions.

        ``input_ids`` [b, s]; ``pixel_values`` [num_patches, C*T*P*P] and ``image_grid_thw`` [num_images, 3]
        as the Qwen2.5-VL processor makes them. Returns the decoder input [s, b, h] (with SP: this rank's
        [s/tp, b, h] shard).
        """
        from megatron.core import tensor_parallel

        vision_cfg = self.hf_config.vision_config
        image_token_id = self.hf_config.image_token_id
        images_per_sample = image_features_per_sample(
            input_ids,
            image_token_id,
            image_grid_thw if pixel_values is not None else None,
            vision_cfg.spatial_merge_size,
        )
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if sum(images_per_sample):
            features = self.vision_model(pixel_values.to(self.config.params_dtype), grid_thw=image_grid_thw)
            features = features.pooler_output.to(embeddings.dtype)  # [num_image_tokens, h]
            # image-token positions in batch-major order (sample 0's first), the order of the features
            b_idx, s_idx = (input_ids == image_token_id).nonzero(as_tuple=True)
            embeddings = embeddings.index_put((s_idx, b_idx), features)
        if self.config.sequence_parallel:
            seq = embeddings.shape[0]
            tp = self.config.tensor_model_parallel_size
            if seq % tp:
                raise ValueError(f"sequence parallel needs the sequence length ({seq}) divisible by TP ({tp})")
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        mm_token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_input: Tensor | None = None,
    ) -> Tensor:
        """Run this stage.

        Args:
            input_ids: [b, s] int64, right-padded; needed on EVERY stage (M-RoPE positions come from it).
            position_ids: [3, b, s] M-RoPE ids; computed from the ids/grid/mask when ``None``.
            attention_mask: [b, s] (1 = token, right padding only); used for positions and checked.
            pixel_values, image_grid_thw: processor outputs (first stage uses them; all stages use the grid
                for positions).
            mm_token_type_ids: [b, s] (0 text, 1 image); derived from the ids when ``None``.
            labels: [b, s] -> returns the per-token vocab-parallel cross-entropy [b, s] (last stage).
            decoder_input: [s(/tp), b, h] to skip the first stage's embedding (e.g. precomputed).

        Returns:
            last stage: logits [b, s, padded_vocab/TP] (or the loss [b, s]);
            other stages: hidden [s(/tp), b, h].
        """
        if attention_mask is not None:
            check_right_padded(attention_mask)
        if position_ids is None:
            position_ids = mrope_position_ids(
                input_ids,
                self.hf_config,
                image_grid_thw=image_grid_thw,
                attention_mask=attention_mask,
                mm_token_type_ids=mm_token_type_ids,
            )
        if self.pre_process and decoder_input is None:
            decoder_input = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
        return self.language_model(input_ids, position_ids, None, decoder_input=decoder_input, labels=labels)


def _build_vision_tower(hf_config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' Qwen2.5-VL vision tower for ``hf_config.vision_config`` on this rank's device (left on
    the meta device when built under ``torch.device("meta")``, e.g. by the memory planner)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from megatron_vgpo.platform import compute_device

    vision_cfg = hf_config.vision_config
    attn = getattr(hf_config, "_attn_implementation", None) or "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_cfg, attn_implementation=attn, dtype=dtype)
    if any(p.is_meta for p in tower.parameters()):
        return tower
    device = compute_device(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    # parameters only: the fp32 rotary ``inv_freq`` buffers stay fp32, as transformers keeps them in bf16
    # (bf16 positions would round beyond 256 patches)
    return cast_parameters(tower.to(device=device), dtype)


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast every floating parameter of ``module`` to ``dtype`` in place (buffers untouched); returns it.

    Megatron's local layer spec builds its norms with torch's ``RMSNorm`` in fp32 whatever
    ``params_dtype`` (TE builds them in ``params_dtype``), and Megatron-LM's ``Float16Module`` then casts the
    whole model. That wrapper also turns the last stage's logits to fp32, a [b, s, V/TP] fp32 copy the
    chunked log-prob path avoids, so the parameters are cast here instead. Parameter attributes
    (``sequence_parallel``, ``tensor_model_parallel``, ...) are kept: only ``.data`` is replaced.
    """
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return module


def build_model(
    hf_config: Any,
    *,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    freeze_vision: bool = False,
    recompute: str = "none",
) -> Qwen2_5_VLModel:
    """Build this rank's :class:`Qwen2_5_VLModel` from an HF ``Qwen2_5_VLConfig`` (randomly initialized;
    load weights with :func:`megatron_vgpo.checkpoint.hf_mapping.load_hf_weights`).

    Uses Megatron's current parallel state (``init_model_parallel`` first); ``pre_process`` /
    ``post_process`` default to whether this rank is the first / last pipeline stage. Every parameter,
    vision tower included, is in ``params_dtype`` (bf16: Megatron's mixed precision, the optimizer keeps
    fp32 main params); ``recompute``: activation recompute of the decoder (``none`` | ``selective`` |
    ``full``, see :func:`~megatron_vgpo.models.qwen2_5_vl.config.recompute_kwargs`). Options are
    keyword-only, so callers building a second model (e.g. a frozen reference) pass the same ones.
    """
    from megatron.core import parallel_state as ps

    config = transformer_config_from_hf(hf_config, sequence_parallel=sequence_parallel, params_dtype=params_dtype,
                                        recompute=recompute)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    model = Qwen2_5_VLModel(
        hf_config, config, pre_process=pre_process, post_process=post_process, freeze_vision=freeze_vision
    )
    cast_parameters(model, params_dtype)  # the torch-norm fallback's fp32 weights too (see cast_parameters)
    logger.debug(
        "built Qwen2_5_VLModel stage pre=%s post=%s sp=%s",
        pre_process,
        post_process,
        config.sequence_parallel,
    )
    return model


def allreduce_vision_grads(model: torch.nn.Module) -> None:
    """Average the vision tower's gradients over the TP group (in place; ``main_grad`` when DDP made one,
    else ``.grad``). A no-op at TP 1, on stages without a vision tower, and for frozen parameters.
    Call after backward, before the optimizer step, on every TP rank of the first stage."""
    from megatron.core import parallel_state as ps

    from megatron_vgpo.checkpoint.config_check import unwrap_model

    vision = getattr(unwrap_model(model), "vision_model", None)
    tp = ps.get_tensor_model_parallel_world_size()
    if vision is None or tp == 1:
        return
    group = ps.get_tensor_model_parallel_group()
    grads = []
    for param in vision.parameters():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if param.requires_grad and grad is not None:
            grads.append(grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    from megatron_vgpo.distributed import comm

    comm.all_reduce(flat, group=group)
    flat /= tp
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


__all__ = [
    "ImageTokenMismatchError",
    "Qwen2_5_VLModel",
    "allreduce_vision_grads",
    "build_model",
    "cast_parameters",
    "check_right_padded",
    "image_features_per_sample",
]
