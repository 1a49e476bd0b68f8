"""In-memory weight mapping between a Hugging Face Qwen2.5-VL checkpoint and :class:`Qwen2_5_VLModel` shards.

HF names are the on-disk checkpoint names (``model.embed_tokens.weight``, ``model.layers.<i>.*``,
``model.norm.weight``, ``lm_head.weight``, ``visual.*``); the in-memory transformers-5 names
(``model.language_model.*``, ``model.visual.*``) are accepted as input too. Megatron names are the keys of
``Qwen2_5_VLModel.state_dict()`` (``vision_model.*``, ``language_model.*``), without the weight-less
``*._extra_state`` entries.

How tensors are transformed (the registry :data:`LAYER_RULES` / :func:`_global_rules`, one rule per
Megatron tensor, each with a :class:`Transform`):

* fused QKV (weight and bias): Megatron's ``linear_qkv`` is grouped per KV head (query group) as
  ``[q heads of group g (nq/nkv * d rows), k_g (d rows), v_g (d rows)]`` for g = 0..nkv-1; column-parallel, so
  TP rank r holds groups ``r*nkv/tp .. (r+1)*nkv/tp - 1`` (contiguous rows).
* ``linear_fc1`` = ``cat(gate_shard_r, up_shard_r)`` on TP rank r (each of gate/up split in TP chunks first).
* column-parallel tensors split dim 0, row-parallel (``linear_proj``, ``linear_fc2``) split dim 1.
* vocab-parallel embedding / output layer: HF rows padded with zero rows up to
  :func:`megatron_vocab_size` (a multiple of TP; usually no padding at all), split dim 0; export drops the
  padded rows.
* norms and the vision tower (``visual.* <-> vision_model.*``) are replicated on every TP rank.
* PP: stage p holds decoder layers ``p*L/pp .. (p+1)*L/pp - 1`` named by their local index; the embedding
  and the vision tower live on the first stage, the final norm and output layer on the last. Tied models
  (``tie_word_embeddings``) have no ``lm_head.weight``; with PP > 1 the last stage's
  ``output_layer.weight`` is a copy of the embedding (Megatron keeps it in sync), exported once from the
  first stage.

Directions: :func:`hf_to_megatron_shard` (one rank's shard), :func:`megatron_shards_to_hf` (merge all
shards), :func:`iter_hf_weights` (collective, streaming export from a live model), :func:`load_hf_weights`
(load into a live model on this rank).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_vgpo.checkpoint.hf_files import LazyHFCheckpoint, read_hf_state_dict
from megatron_vgpo.models.qwen2_5_vl.config import check_supported, head_dim, megatron_vocab_size, use_te_spec

logger = logging.getLogger(__name__)

VISION_HF_PREFIX = "visual."
VISION_MEGATRON_PREFIX = "vision_model."
LM_PREFIX = "language_model."
EXTRA_STATE_SUFFIX = "_extra_state"


class WeightMappingError(ValueError):
    """Tensors are missing, unexpected or mis-shaped; the message lists every offending name."""


@dataclass(frozen=True)
class Sizes:
    """Language-model sizes the transforms need (per model, not per rank)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    layers: int
    tied: bool

    @classmethod
    def from_hf(cls, hf_config: Any) -> Sizes:
        text = hf_config.text_config
        return cls(
            hidden=text.hidden_size,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads,
            head_dim=head_dim(hf_config),
            ffn=text.intermediate_size,
            vocab=text.vocab_size,
            layers=text.num_hidden_layers,
            tied=bool(hf_config.tie_word_embeddings),
        )


# ------------------------------------------------------------------------------------------------------------
# Transforms: HF tensors (full) <-> one TP shard of one Megatron tensor
# ------------------------------------------------------------------------------------------------------------


class Transform:
    """How one Megatron tensor is made from its HF tensors, and back. Subclasses set ``kind``."""

    kind = "replicated"

    def to_shard(self, hf: list[Tensor], sizes: Sizes, tp_rank: int, tp: int) -> Tensor:
        return hf[0]

    def from_shards(self, shards: list[Tensor], sizes: Sizes) -> list[Tensor]:
        return [shards[0]]


class SplitDim(Transform):
    """Column-parallel (dim 0) or row-parallel (dim 1) split of a single HF tensor."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.kind = "column" if dim == 0 else "row"

    def to_shard(self, hf: list[Tensor], sizes: Sizes, tp_rank: int, tp: int) -> Tensor:
        return torch.chunk(hf[0], tp, dim=self.dim)[tp_rank]

    def from_shards(self, shards: list[Tensor], sizes: Sizes) -> list[Tensor]:
        return [torch.cat(shards, dim=self.dim)]


class VocabParallel(Transform):
    """Embedding / output rows: zero-pad to the Megatron vocabulary, split dim 0; export drops padding."""

    kind = "vocab"

    def to_shard(self, hf: list[Tensor], sizes: Sizes, tp_rank: int, tp: int) -> Tensor:
        table = hf[0]
        padded = megatron_vocab_size(sizes.vocab, tp)
        if padded > table.shape[0]:
            table = torch.cat([table, table.new_zeros(padded - table.shape[0], *table.shape[1:])])
        return torch.chunk(table, tp, dim=0)[tp_rank]

    def from_shards(self, shards: list[Tensor], sizes: Sizes) -> list[Tensor]:
        return [torch.cat(shards, dim=0)[: sizes.vocab]]


class FusedQKV(Transform):
    """q/k/v (weights [n*d, h] or biases [n*d]) <-> Megatron's per-query-group interleaved ``linear_qkv``."""

    kind = "qkv"

    def _fused(self, hf: list[Tensor], sizes: Sizes) -> Tensor:
        q, k, v = hf
        g, per = sizes.kv_heads, sizes.heads // sizes.kv_heads
        tail = q.shape[1:]
        grouped = torch.cat(
            [
                q.reshape(g, per * sizes.head_dim, *tail),
                k.reshape(g, sizes.head_dim, *tail),
                v.reshape(g, sizes.head_dim, *tail),
            ],
            dim=1,
        )
        return grouped.reshape(-1, *tail)

    def to_shard(self, hf: list[Tensor], sizes: Sizes, tp_rank: int, tp: int) -> Tensor:
        return torch.chunk(self._fused(hf, sizes), tp, dim=0)[tp_rank]

    def from_shards(self, shards: list[Tensor], sizes: Sizes) -> list[Tensor]:
        full = torch.cat(shards, dim=0)
        g, per, d = sizes.kv_heads, sizes.heads // sizes.kv_heads, sizes.head_dim
        grouped = full.reshape(g, (per + 2) * d, *full.shape[1:])
        q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
        return [t.reshape(-1, *full.shape[1:]) for t in (q, k, v)]


class FusedGateUp(Transform):
    """gate/up [F, h] <-> ``linear_fc1`` = cat(gate chunk r, up chunk r) on TP rank r."""

    kind = "gate_up"

    def to_shard(self, hf: list[Tensor], sizes: Sizes, tp_rank: int, tp: int) -> Tensor:
        gate, up = hf
        return torch.cat([torch.chunk(gate, tp, dim=0)[tp_rank], torch.chunk(up, tp, dim=0)[tp_rank]], dim=0)

    def from_shards(self, shards: list[Tensor], sizes: Sizes) -> list[Tensor]:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]


REPLICATED, COLUMN, ROW = Transform(), SplitDim(0), SplitDim(1)
VOCAB, QKV, GATE_UP = VocabParallel(), FusedQKV(), FusedGateUp()


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor (name relative to its prefix) made from HF tensors by ``transform``."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform


def layer_rules(te: bool) -> list[Rule]:
    """Rules of one decoder layer; names relative to ``decoder.layers.<local i>.`` / ``model.layers.<i>.``.
    The TE spec fuses the pre-attention / pre-MLP RMSNorm into the following linear
    (``layer_norm_weight``)."""
    input_norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"
    return [
        Rule(input_norm, ("input_layernorm.weight",), REPLICATED),
        Rule(
            "self_attention.linear_qkv.weight",
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            QKV,
        ),
        Rule(
            "self_attention.linear_qkv.bias",
            ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
            QKV,
        ),
        Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW),
        Rule(mlp_norm, ("post_attention_layernorm.weight",), REPLICATED),
        Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP),
        Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW),
    ]


def _stage_rules(sizes: Sizes, pp_rank: int, pp: int, te: bool) -> list[Rule]:
    """All language-model rules of pipeline stage ``pp_rank`` with full names on both sides."""
    first, last = pp_rank == 0, pp_rank == pp - 1
    rules: list[Rule] = []
    if first:
        rules.append(Rule(LM_PREFIX + "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB))
    per_stage = sizes.layers // pp
    for local in range(per_stage):
        global_index = pp_rank * per_stage + local
        for rule in layer_rules(te):
            rules.append(
                Rule(
                    f"{LM_PREFIX}decoder.layers.{local}.{rule.megatron}",
                    tuple(f"model.layers.{global_index}.{n}" for n in rule.hf),
                    rule.transform,
                )
            )
    if last:
        rules.append(Rule(LM_PREFIX + "decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED))
        if not sizes.tied:
            rules.append(Rule(LM_PREFIX + "output_layer.weight", ("lm_head.weight",), VOCAB))
        elif not first:  # tied + PP>1: the last stage keeps its own copy of the embedding
            rules.append(Rule(LM_PREFIX + "output_layer.weight", ("model.embed_tokens.weight",), VOCAB))
    return rules


def vision_shapes(hf_config: Any) -> dict[str, torch.Size]:
    """HF names (``visual.*``) and shapes of the vision tower's state dict (built on the meta device)."""
    return dict(_vision_shapes_cached(hf_config.vision_config.to_json_string(use_diff=False)))


@functools.lru_cache(maxsize=8)
def _vision_shapes_cached(vision_config_json: str) -> tuple[tuple[str, torch.Size], ...]:
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vision_config = Qwen2_5_VLConfig(vision_config=json.loads(vision_config_json)).vision_config
    with torch.device("meta"):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config)
    return tuple((VISION_HF_PREFIX + k, v.shape) for k, v in tower.state_dict().items())


# ------------------------------------------------------------------------------------------------------------
# Names and shapes
# ------------------------------------------------------------------------------------------------------------


def normalize_hf_name(name: str) -> str:
    """On-disk HF name for an on-disk or in-memory (transformers 5) name."""
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def expected_hf_shapes(hf_config: Any) -> dict[str, torch.Size]:
    """Every tensor of the HF checkpoint (on-disk names) with its shape."""
    s = Sizes.from_hf(hf_config)
    q, kv, h = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden
    shapes: dict[str, torch.Size] = {
        "model.embed_tokens.weight": torch.Size([s.vocab, h]),
        "model.norm.weight": torch.Size([h]),
    }
    if not s.tied:
        shapes["lm_head.weight"] = torch.Size([s.vocab, h])
    per_layer = {
        "input_layernorm.weight": [h],
        "post_attention_layernorm.weight": [h],
        "self_attn.q_proj.weight": [q, h],
        "self_attn.k_proj.weight": [kv, h],
        "self_attn.v_proj.weight": [kv, h],
        "self_attn.q_proj.bias": [q],
        "self_attn.k_proj.bias": [kv],
        "self_attn.v_proj.bias": [kv],
        "self_attn.o_proj.weight": [h, q],
        "mlp.gate_proj.weight": [s.ffn, h],
        "mlp.up_proj.weight": [s.ffn, h],
        "mlp.down_proj.weight": [h, s.ffn],
    }
    for i in range(s.layers):
        shapes.update({f"model.layers.{i}.{k}": torch.Size(v) for k, v in per_layer.items()})
    shapes.update(vision_shapes(hf_config))
    return shapes


def _shard_shape(full: torch.Size, transform: Transform, sizes: Sizes, tp: int) -> torch.Size:
    dims = list(full)
    if transform.kind == "vocab":
        dims[0] = megatron_vocab_size(sizes.vocab, tp) // tp
    elif transform.kind in ("column", "qkv", "gate_up"):
        dims[0] //= tp
    elif transform.kind == "row":
        dims[1] //= tp
    return torch.Size(dims)


def _megatron_full_shape(rule: Rule, hf_shapes: Mapping[str, torch.Size]) -> torch.Size:
    parts = [hf_shapes[n] for n in rule.hf]
    if rule.transform.kind in ("qkv", "gate_up"):
        return torch.Size([sum(p[0] for p in parts), *parts[0][1:]])
    return parts[0]


def expected_shard_shapes(
    hf_config: Any, *, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int, te: bool | None = None
) -> dict[str, torch.Size]:
    """Megatron names and shapes of one rank's weights (its ``state_dict`` minus ``_extra_state``)."""
    del tp_rank  # every TP rank has the same shapes
    sizes, te = Sizes.from_hf(hf_config), use_te_spec() if te is None else te
    hf_shapes = expected_hf_shapes(hf_config)
    out = {
        r.megatron: _shard_shape(_megatron_full_shape(r, hf_shapes), r.transform, sizes, tp_size)
        for r in _stage_rules(sizes, pp_rank, pp_size, te)
    }
    if pp_rank == 0:
        out.update(
            {
                VISION_MEGATRON_PREFIX + k[len(VISION_HF_PREFIX) :]: v
                for k, v in hf_shapes.items()
                if k.startswith(VISION_HF_PREFIX)
            }
        )
    return out


def _problems(kind: str, names: list[str]) -> list[str]:
    return [f"{kind} ({len(names)}): {', '.join(sorted(names))}"] if names else []


class _NormalizedView:
    """On-disk names over any HF mapping, reading a tensor only when asked (``shape`` uses the mapping's own
    ``shape(name)`` when it has one, as :class:`LazyHFCheckpoint` does, so checks read no tensor data)."""

    def __init__(self, source: Mapping[str, Tensor]) -> None:
        self._source = source
        self._names = {normalize_hf_name(k): k for k in source}

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __getitem__(self, name: str) -> Tensor:
        return self._source[self._names[name]]

    def shape(self, name: str) -> torch.Size:
        shape_of = getattr(self._source, "shape", None)
        if callable(shape_of):
            return torch.Size(shape_of(self._names[name]))
        return self._source[self._names[name]].shape


def _check_hf_state(hf: _NormalizedView, hf_config: Any) -> None:
    expected = expected_hf_shapes(hf_config)
    missing = [n for n in expected if n not in hf]
    allowed_extra = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
    unexpected = [n for n in hf if n not in expected and n not in allowed_extra]
    bad = [
        f"{n} {tuple(hf.shape(n))} != {tuple(shape)}"
        for n, shape in expected.items()
        if n in hf and hf.shape(n) != shape
    ]
    problems = _problems("missing", missing) + _problems("unexpected", unexpected) + _problems("mis-shaped", bad)
    if problems:
        raise WeightMappingError("HF state dict does not match the HF config: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------------------
# HF -> Megatron
# ------------------------------------------------------------------------------------------------------------


def hf_to_megatron_shard(
    hf_state_dict: Mapping[str, Tensor],
    hf_config: Any,
    *,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    te: bool | None = None,
) -> dict[str, Tensor]:
    """The weights of Megatron rank (``tp_rank``, ``pp_rank``) from a full HF state dict.

    Returns exactly the tensor keys of that rank's ``Qwen2_5_VLModel.state_dict()`` (no ``_extra_state``),
    contiguous and independent of the input's storage. ``te`` selects the TE layer spec's norm names
    (default: whether TE is in use here). Raises :class:`WeightMappingError` naming every missing,
    unexpected or mis-shaped HF tensor, and :class:`UnsupportedConfigError` for unsupported configs/layouts.
    """
    check_supported(hf_config, tp=tp_size, pp=pp_size)
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"rank (tp {tp_rank}, pp {pp_rank}) outside layout tp={tp_size}, pp={pp_size}")
    hf = _NormalizedView(hf_state_dict)
    _check_hf_state(hf, hf_config)
    sizes, te = Sizes.from_hf(hf_config), use_te_spec() if te is None else te
    shard: dict[str, Tensor] = {}
    for rule in _stage_rules(sizes, pp_rank, pp_size, te):
        tensor = rule.transform.to_shard([hf[n] for n in rule.hf], sizes, tp_rank, tp_size)
        shard[rule.megatron] = tensor.detach().clone().contiguous()
    if pp_rank == 0:
        for name in hf:
            if name.startswith(VISION_HF_PREFIX):
                shard[VISION_MEGATRON_PREFIX + name[len(VISION_HF_PREFIX) :]] = hf[name].detach().clone()
    expected = expected_shard_shapes(
        hf_config, tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size, te=te
    )
    bad = [f"{n} {tuple(shard[n].shape)} != {tuple(s)}" for n, s in expected.items() if shard[n].shape != s]
    if bad or set(shard) != set(expected):
        raise WeightMappingError(f"internal mapping error for tp {tp_rank} pp {pp_rank}: {bad}")
    return shard


def load_hf_weights(model: torch.nn.Module, hf_state_dict: Mapping[str, Tensor], hf_config: Any) -> None:
    """Load a full HF state dict into this rank's (possibly DDP-wrapped) ``Qwen2_5_VLModel``, using
    Megatron's current parallel state for the rank coordinates. Raises :class:`WeightMappingError` when the
    model's own tensors do not match the mapped shard (names or shapes)."""
    from megatron.core import parallel_state as ps

    from megatron_vgpo.checkpoint.config_check import unwrap_model

    module = unwrap_model(model)
    own = {k: v for k, v in module.state_dict().items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    te = any(k.endswith("layer_norm_weight") for k in own)
    shard = hf_to_megatron_shard(
        hf_state_dict,
        hf_config,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        te=te,
    )
    missing = [k for k in own if k not in shard]
    unexpected = [k for k in shard if k not in own]
    bad = [
        f"{k} model {tuple(own[k].shape)} vs mapped {tuple(shard[k].shape)}"
        for k in own
        if k in shard and own[k].shape != shard[k].shape
    ]
    problems = _problems("missing", missing) + _problems("unexpected", unexpected) + _problems("mis-shaped", bad)
    if problems:
        raise WeightMappingError("mapped shard does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(shard[name])


# ------------------------------------------------------------------------------------------------------------
# Megatron -> HF
# ------------------------------------------------------------------------------------------------------------


def megatron_shards_to_hf(shards: Mapping[tuple[int, int], Mapping[str, Tensor]], hf_config: Any) -> dict[str, Tensor]:
    """Merge every rank's weights (``shards[(tp_rank, pp_rank)]``, full TP x PP grid) into HF tensors.

    Each shard must hold exactly its rank's tensors (``_extra_state`` entries are ignored); raises
    :class:`WeightMappingError` naming missing/unexpected/mis-shaped tensors or missing ranks. Tied models
    export no ``lm_head.weight``; padded vocabulary rows are dropped. Vision weights come from (tp 0, pp 0).
    """
    tp = 1 + max(t for t, _ in shards)
    pp = 1 + max(p for _, p in shards)
    missing_ranks = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in shards]
    if missing_ranks:
        raise WeightMappingError(f"missing shards for (tp_rank, pp_rank) {missing_ranks}")
    check_supported(hf_config, tp=tp, pp=pp)
    sizes = Sizes.from_hf(hf_config)
    clean = {key: {k: v for k, v in sd.items() if not k.endswith(EXTRA_STATE_SUFFIX)} for key, sd in shards.items()}
    te = any(k.endswith("layer_norm_weight") for k in clean[(0, 0)])
    problems: list[str] = []
    for (t, p), sd in clean.items():
        want = expected_shard_shapes(hf_config, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, te=te)
        miss = [n for n in want if n not in sd]
        extra = [n for n in sd if n not in want]
        bad = [f"{n} {tuple(sd[n].shape)} != {tuple(s)}" for n, s in want.items() if n in sd and sd[n].shape != s]
        problems += [
            f"shard (tp {t}, pp {p}) {x}"
            for x in _problems("missing", miss) + _problems("unexpected", extra) + _problems("mis-shaped", bad)
        ]
    if problems:
        raise WeightMappingError("Megatron shards do not match the HF config: " + "; ".join(problems))
    hf: dict[str, Tensor] = {}
    for p in range(pp):
        for rule in _stage_rules(sizes, p, pp, te):
            if sizes.tied and rule.megatron.endswith("output_layer.weight"):
                continue  # the last stage's copy of the tied embedding
            tensors = rule.transform.from_shards([clean[(t, p)][rule.megatron] for t in range(tp)], sizes)
            hf.update({n: x.contiguous() for n, x in zip(rule.hf, tensors, strict=True)})
    for name, tensor in clean[(0, 0)].items():
        if name.startswith(VISION_MEGATRON_PREFIX):
            hf[VISION_HF_PREFIX + name[len(VISION_MEGATRON_PREFIX) :]] = tensor
    return hf


def iter_hf_weights(
    model: torch.nn.Module, hf_config: Any, *, yield_on_all_tp_ranks: bool = False
) -> Iterator[tuple[str, Tensor]]:
    """Stream this stage's weights as full HF tensors (collective over the TP group).

    Every TP rank of every stage must consume the iterator to the end (each language-model tensor is
    all-gathered over TP, in the same order on every rank). Which ranks yield what: stage p yields the HF
    tensors it owns -- its decoder layers (global indices), plus the embedding and ``visual.*`` on the first
    stage, and ``model.norm.weight`` and (untied) ``lm_head.weight`` on the last; the tied output copy is
    never yielded. Within a stage only TP rank 0 yields, unless ``yield_on_all_tp_ranks``. The union over
    stages is the whole HF checkpoint, each name exactly once. Tensors are on the model's device, detached.
    """
    from megatron.core import parallel_state as ps

    from megatron_vgpo.checkpoint.config_check import unwrap_model

    module = unwrap_model(model)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    group = ps.get_tensor_model_parallel_group()
    own = {k: v for k, v in module.state_dict().items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    te = any(k.endswith("layer_norm_weight") for k in own)
    sizes = Sizes.from_hf(hf_config)
    emit = yield_on_all_tp_ranks or tp_rank == 0
    for rule in _stage_rules(sizes, pp_rank, pp, te):
        if sizes.tied and rule.megatron.endswith("output_layer.weight"):
            continue
        local = own[rule.megatron].detach().contiguous()
        if tp > 1 and rule.transform.kind != "replicated":
            gathered = [torch.empty_like(local) for _ in range(tp)]
            from megatron_vgpo.distributed import comm

            comm.all_gather(gathered, local, group=group)
        else:
            gathered = [local] * tp
        if emit:
            yield from zip(rule.hf, rule.transform.from_shards(gathered, sizes), strict=True)
    if emit and pp_rank == 0:
        for name, tensor in own.items():
            if name.startswith(VISION_MEGATRON_PREFIX):
                yield VISION_HF_PREFIX + name[len(VISION_MEGATRON_PREFIX) :], tensor.detach()


__all__ = [
    "LM_PREFIX",
    "VISION_HF_PREFIX",
    "VISION_MEGATRON_PREFIX",
    "LazyHFCheckpoint",
    "Rule",
    "Sizes",
    "WeightMappingError",
    "expected_hf_shapes",
    "expected_shard_shapes",
    "hf_to_megatron_shard",
    "iter_hf_weights",
    "layer_rules",
    "load_hf_weights",
    "megatron_shards_to_hf",
    "normalize_hf_name",
    "read_hf_state_dict",
    "vision_shapes",
]
