"""Parameters and memory per GPU of Qwen2.5-VL on a TP x PP x DP layout, on paper and on the meta device.

Two independent routes to the same numbers:

* :func:`plan_layout` -- arithmetic from the HF config alone (no torch modules): parameters of one GPU on
  each pipeline stage, split into TP-sharded and TP-replicated parts, and the memory they need in mixed
  precision (bf16 weights, fp32 grads, fp32 main params, Adam m and v), with and without Megatron's
  distributed optimizer, plus an optional activation / logits estimate for a micro-batch of N tokens.
* :func:`build_rank_on_meta` -- builds ONE rank's real Megatron model (the project's ``Qwen2_5_VLModel``)
  on the meta device (no memory) inside a simulated process group of the layout's size (torch's ``fake``
  backend: every rank can be built in one process, one after another) and counts what is there. The
  scale-on-paper tests check that both routes agree on every rank and that the per-rank counts add up to the
  HF model's parameter count.

Bytes per parameter used (Megatron mixed precision with fp32 gradient accumulation): weights 2 (bf16),
grads 4, main params 4, Adam 8 -> 18 without the distributed optimizer; 2 + 4 + 12 / DP with it (main
params and Adam states sharded over the data-parallel group).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_vgpo.checkpoint.config_check import ConfigMismatchError, as_hf_config, check_model_matches_hf

logger = logging.getLogger(__name__)

GiB = 1024**3
BYTES_WEIGHT_BF16 = 2
BYTES_GRAD_FP32 = 4
BYTES_MAIN_PARAM_FP32 = 4
BYTES_ADAM_FP32 = 8
#: Activation bytes per token per hidden unit per layer with TP + sequence parallel and flash attention
#: (Korthikanti et al. 2022, 34 s b h / t; the 5 a s / h attention-score term vanishes with flash attention).
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34
#: With full recompute (``parallel.recompute=full``) a decoder layer keeps only its bf16 input (2 bytes per
#: token per hidden unit, SP-sharded); the layer being recomputed holds its full activations once.
FULL_RECOMPUTE_BYTES_PER_TOKEN_HIDDEN = 2


class LayoutError(ValueError):
    """The model cannot be laid out at this TP / PP / DP (the message names the field and the sizes)."""


@dataclass(frozen=True)
class StagePlan:
    """One GPU of pipeline stage ``stage`` (all TP ranks of a stage hold the same number of parameters)."""

    stage: int
    layers: tuple[int, int]
    vision: int
    embedding: int
    decoder: int
    final_norm: int
    output_layer: int
    replicated: int
    weights_bytes: int
    grads_bytes: int
    main_params_bytes: int
    adam_bytes: int
    total_bytes: int
    total_bytes_distributed_optimizer: int
    activation_bytes: int | None = None
    logits_bytes: int | None = None

    @property
    def params(self) -> int:
        """Parameters on one GPU of this stage."""
        return self.vision + self.embedding + self.decoder + self.final_norm + self.output_layer

    @property
    def sharded(self) -> int:
        """Parameters of this GPU that are a TP shard (the rest are full replicas on every TP rank)."""
        return self.params - self.replicated


@dataclass(frozen=True)
class LayoutPlan:
    """The plan of a layout: per-stage GPUs plus the totals that reconcile them with the HF model."""

    name: str
    tp: int
    pp: int
    dp: int
    hf_vocab_size: int
    megatron_vocab_size: int
    hidden_size: int
    tied_embeddings: bool
    hf_total_params: int
    stages: list[StagePlan] = field(default_factory=list)
    micro_batch_tokens: int | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def vocab_padding_params(self) -> int:
        """Extra rows Megatron holds beyond the HF vocabulary (embedding, plus output layer if untied)."""
        matrices = 1 if self.tied_embeddings else 2
        return (self.megatron_vocab_size - self.hf_vocab_size) * self.hidden_size * matrices

    @property
    def duplicated_tied_output(self) -> int:
        """Under tying with PP > 1 the last stage holds its own copy of the embedding (Megatron syncs it)."""
        return self.megatron_vocab_size * self.hidden_size if (self.tied_embeddings and self.pp > 1) else 0

    def params_over_one_replica(self) -> int:
        """Sum of the parameters of all TP x PP GPUs of one data-parallel replica."""
        return sum(self.tp * s.params for s in self.stages)

    def unique_params(self) -> int:
        """One replica's parameters with TP replicas, vocab padding and the tied copy removed (= HF count)."""
        replicated_extra = sum((self.tp - 1) * s.replicated for s in self.stages)
        return (self.params_over_one_replica() - replicated_extra - self.vocab_padding_params
                - self.duplicated_tied_output)

    def max_bytes(self, distributed_optimizer: bool = True) -> int:
        """The largest per-GPU total over the stages (weights + grads + optimizer, plus activations)."""
        out = 0
        for s in self.stages:
            static = s.total_bytes_distributed_optimizer if distributed_optimizer else s.total_bytes
            out = max(out, static + (s.activation_bytes or 0) + (s.logits_bytes or 0))
        return out


# ------------------------------------------------------------------------------------------------
# Arithmetic
# ------------------------------------------------------------------------------------------------


def vision_params(hf_config: Any) -> int:
    """Parameters of the Qwen2.5-VL vision tower (patch embedding, blocks, patch merger)."""
    v = as_hf_config(hf_config).vision_config
    h, inter = v.hidden_size, v.intermediate_size
    in_ch = getattr(v, "in_channels", getattr(v, "in_chans", 3))
    patch = in_ch * v.temporal_patch_size * v.patch_size * v.patch_size * h  # Conv3d, no bias
    block = (2 * h                      # norm1, norm2 (RMSNorm weights)
             + h * 3 * h + 3 * h        # qkv with bias
             + h * h + h                # proj with bias
             + 2 * (h * inter + inter)  # gate, up with bias
             + inter * h + h)           # down with bias
    merged = h * v.spatial_merge_size**2
    merger = h + merged * merged + merged + merged * v.out_hidden_size + v.out_hidden_size
    return patch + v.depth * block + merger


def decoder_layer_params(hf_config: Any, tp: int) -> tuple[int, int]:
    """``(sharded, replicated)`` parameters of one decoder layer on one TP rank."""
    t = as_hf_config(hf_config).text_config
    h, ffn = t.hidden_size, t.intermediate_size
    d = getattr(t, "head_dim", None) or h // t.num_attention_heads
    qkv_rows = (t.num_attention_heads + 2 * t.num_key_value_heads) * d
    sharded = (qkv_rows * h + qkv_rows) // tp + (t.num_attention_heads * d * h) // tp + 3 * ffn * h // tp
    return sharded, 2 * h


def layer_ranges(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Megatron's even split of decoder layers over ``pp`` stages as ``[first, end)`` ranges."""
    per = num_layers // pp
    return [(s * per, (s + 1) * per) for s in range(pp)]


def check_layout(hf_config: Any, tp: int, pp: int, dp: int = 1) -> None:
    """Raise :class:`LayoutError` naming every field that forbids this layout (heads, KV heads, layers...)."""
    from megatron_vgpo.models.qwen2_5_vl.config import UnsupportedConfigError, check_supported

    if min(tp, pp, dp) < 1:
        raise LayoutError(f"tp={tp}, pp={pp}, dp={dp}: every size must be >= 1")
    try:
        check_supported(as_hf_config(hf_config), tp=tp, pp=pp)
    except UnsupportedConfigError as e:
        raise LayoutError(f"TP{tp} x PP{pp}: {e}") from e


def plan_layout(
    hf_config: Any,
    tp: int,
    pp: int,
    dp: int = 1,
    *,
    micro_batch_tokens: int | None = None,
    name: str = "",
    recompute: str = "none",
) -> LayoutPlan:
    """Parameters and memory per GPU of each pipeline stage of Qwen2.5-VL at TP x PP x DP.

    Args:
        hf_config: HF ``Qwen2_5_VLConfig`` or its dict.
        tp, pp, dp: tensor-, pipeline- and data-parallel sizes.
        micro_batch_tokens: tokens per micro-batch (sequence x micro-batch size); when given, adds an
            activation estimate (bf16, TP + SP, flash attention, ``recompute`` below, 1F1B: stage s holds pp - s
            micro-batches in flight) and the last stage's fp32 logits [tokens, vocab/TP].
        name: label for tables.
        recompute: ``none`` | ``selective`` | ``full`` (``parallel.recompute``). ``selective`` recomputes
            core attention, whose score term the flash-attention estimate already omits: same estimate as
            ``none``. ``full``: each in-flight layer keeps its input only
            (:data:`FULL_RECOMPUTE_BYTES_PER_TOKEN_HIDDEN`), plus one layer's full activations.

    Raises:
        LayoutError: the layout cannot hold this model (e.g. attention heads not divisible by TP).
    """
    from megatron_vgpo.models.qwen2_5_vl.config import megatron_vocab_size

    cfg = as_hf_config(hf_config)
    check_layout(cfg, tp, pp, dp)
    t = cfg.text_config
    h = t.hidden_size
    tied = bool(cfg.tie_word_embeddings)
    vp = megatron_vocab_size(t.vocab_size, tp)
    per_layer_sharded, per_layer_repl = decoder_layer_params(cfg, tp)
    vis = vision_params(cfg)
    stages = []
    for s, (lo, hi) in enumerate(layer_ranges(t.num_hidden_layers, pp)):
        first, last = s == 0, s == pp - 1
        n_layers = hi - lo
        embedding = vp * h // tp if first else 0
        output = vp * h // tp if (last and not (tied and pp == 1)) else 0
        vision = vis if first else 0
        final_norm = h if last else 0
        replicated = vision + n_layers * per_layer_repl + final_norm
        params = vision + embedding + n_layers * (per_layer_sharded + per_layer_repl) + final_norm + output
        w = BYTES_WEIGHT_BF16 * params
        g = BYTES_GRAD_FP32 * params
        m = BYTES_MAIN_PARAM_FP32 * params
        a = BYTES_ADAM_FP32 * params
        act = logits = None
        if micro_batch_tokens is not None:
            in_flight = pp - s
            per_token_hidden = n_layers * ACTIVATION_BYTES_PER_TOKEN_HIDDEN * in_flight
            if recompute == "full":
                per_token_hidden = (n_layers * FULL_RECOMPUTE_BYTES_PER_TOKEN_HIDDEN * in_flight
                                    + ACTIVATION_BYTES_PER_TOKEN_HIDDEN)
            act = per_token_hidden * micro_batch_tokens * h // tp
            logits = micro_batch_tokens * (vp // tp) * 4 if last else 0
        stages.append(StagePlan(
            stage=s, layers=(lo, hi), vision=vision, embedding=embedding,
            decoder=n_layers * (per_layer_sharded + per_layer_repl), final_norm=final_norm,
            output_layer=output, replicated=replicated, weights_bytes=w, grads_bytes=g,
            main_params_bytes=m, adam_bytes=a, total_bytes=w + g + m + a,
            total_bytes_distributed_optimizer=w + g + (m + a) // dp,
            activation_bytes=act, logits_bytes=logits,
        ))
    return LayoutPlan(
        name=name or f"qwen2.5-vl (hidden {h}, {t.num_hidden_layers} layers)", tp=tp, pp=pp, dp=dp,
        hf_vocab_size=t.vocab_size, megatron_vocab_size=vp, hidden_size=h, tied_embeddings=tied,
        hf_total_params=hf_param_count_arithmetic(cfg), stages=stages, micro_batch_tokens=micro_batch_tokens,
    )


def hf_param_count_arithmetic(hf_config: Any) -> int:
    """Parameters of ``Qwen2_5_VLForConditionalGeneration`` by arithmetic (tied weights counted once)."""
    cfg = as_hf_config(hf_config)
    t = cfg.text_config
    sharded, repl = decoder_layer_params(cfg, 1)
    matrices = 1 if cfg.tie_word_embeddings else 2
    return vision_params(cfg) + t.num_hidden_layers * (sharded + repl) + t.hidden_size + \
        matrices * t.vocab_size * t.hidden_size


def hf_model_on_meta(hf_config: Any) -> torch.nn.Module:
    """``Qwen2_5_VLForConditionalGeneration`` instantiated on the meta device (no memory)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(as_hf_config(hf_config))


def hf_param_count_meta(hf_config: Any) -> int:
    """Parameters of the HF model built on the meta device (tied weights counted once)."""
    return sum(p.numel() for p in hf_model_on_meta(hf_config).parameters())


# ------------------------------------------------------------------------------------------------
# Meta-device models of single ranks
# ------------------------------------------------------------------------------------------------


@dataclass
class RankModel:
    """What one rank's meta-device model holds."""

    tp_rank: int
    pp_rank: int
    params: int
    replicated: int
    shapes: dict[str, tuple[int, ...]]
    mapped_tensors: int = 0
    mapping_problems: list[str] = field(default_factory=list)
    config_problem: str = ""


@contextlib.contextmanager
def simulated_rank(tp: int, pp: int, rank: int) -> Iterator[None]:
    """Megatron parallel state of global ``rank`` in a TP x PP world, simulated in this process.

    Uses torch's ``fake`` process-group backend (collectives are no-ops), so any rank of any layout can be
    stood up in one process. Refuses to run when a real default process group already exists.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_vgpo.platform import apply_cpu_patches

    if dist.is_initialized():
        raise RuntimeError("simulated_rank needs a process without a torch.distributed group (run it apart)")
    apply_cpu_patches()
    dist.init_process_group("fake", rank=rank, world_size=tp * pp, store=FakeStore())
    try:
        ps.initialize_model_parallel(tp, pp, create_gloo_process_groups=False)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        yield
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def build_rank_on_meta(hf_config: Any, params_dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """This (simulated) rank's ``Qwen2_5_VLModel`` on the meta device, uninitialized (no memory used)."""
    from megatron.core import parallel_state as ps

    from megatron_vgpo.models.qwen2_5_vl import Qwen2_5_VLModel, transformer_config_from_hf

    cfg = as_hf_config(hf_config)
    config = transformer_config_from_hf(cfg, params_dtype=params_dtype)
    # Allocate under the meta-device context, not on a GPU. Initialization stays on: on meta tensors it
    # does no work, and it is what tags TP-sharded weights with ``tensor_model_parallel``.
    config.use_cpu_initialization = True
    with torch.device("meta"):
        return Qwen2_5_VLModel(cfg, config, pre_process=ps.is_pipeline_first_stage(),
                               post_process=ps.is_pipeline_last_stage())


def describe_rank_model(model: torch.nn.Module) -> RankModel:
    """Count a built rank model: all parameters, and those replicated over TP (no TP-shard attribute)."""
    from megatron.core import parallel_state as ps

    params = replicated = 0
    shapes = {}
    for name, p in model.named_parameters():
        params += p.numel()
        if not getattr(p, "tensor_model_parallel", False):
            replicated += p.numel()
        shapes[name] = tuple(p.shape)
    return RankModel(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), params,
                     replicated, shapes)


def mapping_problems(
    model: torch.nn.Module, hf_state_dict: dict[str, torch.Tensor], hf_config: Any
) -> tuple[int, list[str]]:
    """Map the HF tensors to this rank with ``hf_to_megatron_shard`` and compare with the model's tensors.

    Works on meta tensors. Returns ``(number of mapped tensors, problems)``; a problem names a tensor the
    model has but the mapping lacks, one the mapping has but the model lacks, or a shape difference.
    """
    from megatron.core import parallel_state as ps

    from megatron_vgpo.checkpoint.hf_mapping import EXTRA_STATE_SUFFIX, hf_to_megatron_shard

    shard = hf_to_megatron_shard(
        hf_state_dict, as_hf_config(hf_config), tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
    )
    own = {k: v for k, v in model.state_dict().items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    problems = [f"model tensor not mapped: {k}" for k in own if k not in shard]
    problems += [f"mapped tensor not in model: {k}" for k in shard if k not in own]
    problems += [f"{k}: model {tuple(own[k].shape)} vs mapped {tuple(shard[k].shape)}"
                 for k in own if k in shard and own[k].shape != shard[k].shape]
    return len(shard), problems


def meta_rank_models(hf_config: Any, tp: int, pp: int, *, check_mapping: bool = True) -> list[RankModel]:
    """Build every (tp_rank, pp_rank) model of a TP x PP layout on the meta device, one at a time.

    With ``check_mapping`` the HF model is also built on the meta device and its state dict mapped to each
    rank (:func:`mapping_problems`); the result lands in ``RankModel.mapping_problems``. Each rank model is
    also passed through :func:`check_model_matches_hf` (``RankModel.config_problem``, empty when it passes).
    """
    hf_state = hf_model_on_meta(hf_config).state_dict() if check_mapping else None
    out = []
    for rank in range(tp * pp):
        with simulated_rank(tp, pp, rank):
            model = build_rank_on_meta(hf_config)
            info = describe_rank_model(model)
            try:  # the built model must pass the same config check as every checkpoint save / load
                check_model_matches_hf(model, hf_config, context=f"rank (tp {info.tp_rank}, pp {info.pp_rank})")
            except ConfigMismatchError as e:
                info.config_problem = str(e)
            if hf_state is not None:
                info.mapped_tensors, info.mapping_problems = mapping_problems(model, hf_state, hf_config)
            out.append(info)
    return out


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:8.2f}"


def format_plan(plan: LayoutPlan) -> str:
    """A plain-text table of the plan (one row per pipeline stage) and the reconciliation with HF."""
    head = (f"{plan.name}: TP{plan.tp} x PP{plan.pp} x DP{plan.dp} = {plan.world_size} GPUs; "
            f"vocab {plan.hf_vocab_size} -> {plan.megatron_vocab_size} rows; "
            f"HF parameters {plan.hf_total_params:,}")
    cols = ["stage", "layers", "params/GPU", "replicated", "bf16 w GiB", "fp32 grad", "fp32 main", "Adam",
            "total GiB", f"dist-opt DP{plan.dp}"]
    if plan.micro_batch_tokens is not None:
        cols += [f"act({plan.micro_batch_tokens} tok)", "logits fp32"]
    rows = []
    for s in plan.stages:
        row = [str(s.stage), f"{s.layers[0]}-{s.layers[1] - 1}", f"{s.params:,}", f"{s.replicated:,}",
               _gib(s.weights_bytes), _gib(s.grads_bytes), _gib(s.main_params_bytes), _gib(s.adam_bytes),
               _gib(s.total_bytes), _gib(s.total_bytes_distributed_optimizer)]
        if plan.micro_batch_tokens is not None:
            row += [_gib(s.activation_bytes), _gib(s.logits_bytes)]
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append(
        f"sum over one replica {plan.params_over_one_replica():,} = HF {plan.hf_total_params:,}"
        f" + TP replicas {sum((plan.tp - 1) * s.replicated for s in plan.stages):,}"
        f" + vocab padding {plan.vocab_padding_params:,} + tied copy {plan.duplicated_tied_output:,}"
    )
    lines.append(f"peak per GPU: {plan.max_bytes(False) / GiB:.2f} GiB (plain optimizer), "
                 f"{plan.max_bytes(True) / GiB:.2f} GiB (distributed optimizer)")
    return "\n".join(lines)


__all__ = [
    "LayoutError",
    "LayoutPlan",
    "RankModel",
    "StagePlan",
    "build_rank_on_meta",
    "check_layout",
    "describe_rank_model",
    "format_plan",
    "hf_model_on_meta",
    "hf_param_count_arithmetic",
    "hf_param_count_meta",
    "layer_ranges",
    "mapping_problems",
    "meta_rank_models",
    "plan_layout",
    "simulated_rank",
    "vision_params",
]
