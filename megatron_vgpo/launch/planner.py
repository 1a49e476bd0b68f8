"""Cluster planner: every feasible TP x PP x DP layout of a cluster, its memory per GPU, and a recommendation.

    megatron-vgpo plan --model qwen2.5-vl-32b --nodes 4 --gpus-per-node 8 --gpu-mem-gib 80 \
        [--micro-batch-tokens 4096] [--colocate-sglang-fraction 0.5] [--reserve-gib 2] [--json]

``--model`` takes a known name (qwen2.5-vl-3b / -7b / -32b), an HF folder, or a run config (``*.yaml``:
its ``model.hf_dir``, or the tiny model the job built under ``RUN_DIR/model``).

Candidates: TP divides the GPUs of one node (a TP group never spans nodes), world = nodes x GPUs per node,
PP x TP divides the world, DP = world / (TP x PP). A candidate the model cannot take (query or KV heads, MLP
width or decoder layers not divisible) is listed as excluded with the reason.

Memory per GPU comes from :func:`megatron_vgpo.checkpoint.memory_plan.plan_layout` (bf16 weights, fp32
grads, fp32 main params + Adam; the distributed optimizer shards the last two over DP; activations of one
micro-batch with TP + SP, flash attention, 1F1B in-flight micro-batches, plus fp32 logits on the last
stage). The worst pipeline stage decides. With colocated SGLang engines (fraction F of each GPU, their
weights and KV cache), the training state stays resident while the engine generates, and the engine
releases its memory while the actor trains, so::

    need = weights + grads + optimizer + max(activations, F x GPU memory) + reserve

A layout fits when ``need <= GPU memory``. Recommendation rule: among the layouts that fit WITH the
distributed optimizer, (1) the smallest TP x PP (the most data-parallel replicas: the highest rollout and
training throughput and the least model-parallel communication), then (2) the smallest PP (fewer pipeline
bubbles; TP stays inside a node's NVLink domain), then (3) the most free memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_vgpo.checkpoint.memory_plan import GiB, LayoutError, LayoutPlan, check_layout, plan_layout

logger = logging.getLogger(__name__)

DEFAULT_MICRO_BATCH_TOKENS = 4096
DEFAULT_RESERVE_GIB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation

RECOMMENDATION_RULE = (
    "fits with the distributed optimizer; then smallest TP x PP (most data-parallel replicas); "
    "then smallest PP (fewest pipeline bubbles); then most free memory"
)


@dataclass(frozen=True)
class LayoutOption:
    """One feasible layout and the memory of its worst GPU (bytes)."""

    tp: int
    pp: int
    dp: int
    worst_stage: int
    params_per_gpu: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    optimizer_bytes_distributed: int
    activation_bytes: int
    sglang_bytes: int
    reserve_bytes: int
    need_bytes: int
    need_bytes_distributed: int
    gpu_bytes: int
    recommended: bool = False

    @property
    def fits(self) -> bool:
        """Fits with the plain (replicated) optimizer."""
        return self.need_bytes <= self.gpu_bytes

    @property
    def fits_distributed(self) -> bool:
        """Fits with Megatron's distributed optimizer (main params and Adam sharded over DP)."""
        return self.need_bytes_distributed <= self.gpu_bytes

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(fits=self.fits, fits_distributed=self.fits_distributed)
        return out


@dataclass(frozen=True)
class ExcludedLayout:
    """A TP x PP combination that cannot be used, and why."""

    tp: int
    pp: int
    reason: str


@dataclass
class ClusterPlan:
    """Every candidate layout of a cluster for one model."""

    model: str
    nodes: int
    gpus_per_node: int
    gpu_bytes: int
    micro_batch_tokens: int | None
    colocate_sglang_fraction: float
    reserve_bytes: int
    hf_params: int
    options: list[LayoutOption] = field(default_factory=list)
    excluded: list[ExcludedLayout] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def recommended(self) -> LayoutOption | None:
        return next((o for o in self.options if o.recommended), None)

    def option(self, tp: int, pp: int) -> LayoutOption:
        """The option at ``tp`` x ``pp`` (``KeyError`` if it is not a feasible layout)."""
        for o in self.options:
            if (o.tp, o.pp) == (tp, pp):
                return o
        raise KeyError(f"TP{tp} x PP{pp} is not a feasible layout of this cluster")

    def as_dict(self) -> dict[str, Any]:
        rec = self.recommended
        return {
            "model": self.model, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
            "world_size": self.world_size, "gpu_bytes": self.gpu_bytes,
            "micro_batch_tokens": self.micro_batch_tokens,
            "colocate_sglang_fraction": self.colocate_sglang_fraction, "reserve_bytes": self.reserve_bytes,
            "hf_params": self.hf_params, "rule": RECOMMENDATION_RULE,
            "recommended": None if rec is None else {"tp": rec.tp, "pp": rec.pp, "dp": rec.dp},
            "options": [o.as_dict() for o in self.options],
            "excluded": [asdict(e) for e in self.excluded],
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def option_from_plan(plan: LayoutPlan, gpu_bytes: int, sglang_bytes: int, reserve_bytes: int) -> LayoutOption:
    """Memory of the worst GPU of ``plan`` (the stage with the largest need under the distributed optimizer)."""

    def need(stage: Any, distributed: bool) -> int:
        static = stage.total_bytes_distributed_optimizer if distributed else stage.total_bytes
        transient = (stage.activation_bytes or 0) + (stage.logits_bytes or 0)
        return static + max(transient, sglang_bytes) + reserve_bytes

    worst = max(plan.stages, key=lambda s: need(s, True))
    optimizer = worst.main_params_bytes + worst.adam_bytes
    return LayoutOption(
        tp=plan.tp, pp=plan.pp, dp=plan.dp, worst_stage=worst.stage, params_per_gpu=worst.params,
        weights_bytes=worst.weights_bytes, grads_bytes=worst.grads_bytes, optimizer_bytes=optimizer,
        optimizer_bytes_distributed=worst.total_bytes_distributed_optimizer - worst.weights_bytes
        - worst.grads_bytes,
        activation_bytes=(worst.activation_bytes or 0) + (worst.logits_bytes or 0), sglang_bytes=sglang_bytes,
        reserve_bytes=reserve_bytes, need_bytes=max(need(s, False) for s in plan.stages),
        need_bytes_distributed=need(worst, True), gpu_bytes=gpu_bytes,
    )


def plan_cluster(
    hf_config: Any,
    nodes: int,
    gpus_per_node: int,
    gpu_mem_gib: float,
    *,
    micro_batch_tokens: int | None = DEFAULT_MICRO_BATCH_TOKENS,
    colocate_sglang_fraction: float = 0.0,
    reserve_gib: float = DEFAULT_RESERVE_GIB,
    name: str = "",
) -> ClusterPlan:
    """Enumerate every TP x PP x DP layout of ``nodes`` x ``gpus_per_node`` GPUs and mark the recommended one.

    Raises:
        ValueError: a size below 1, or a colocated SGLang fraction outside [0, 1).
    """
    if nodes < 1 or gpus_per_node < 1 or gpu_mem_gib <= 0:
        raise ValueError(f"nodes ({nodes}), gpus_per_node ({gpus_per_node}) and gpu_mem_gib ({gpu_mem_gib}) "
                         "must be positive")
    if not 0.0 <= colocate_sglang_fraction < 1.0:
        raise ValueError(f"colocate_sglang_fraction must be in [0, 1), got {colocate_sglang_fraction}")
    gpu_bytes = int(gpu_mem_gib * GiB)
    sglang_bytes = int(colocate_sglang_fraction * gpu_bytes)
    reserve_bytes = int(reserve_gib * GiB)
    world = nodes * gpus_per_node
    out = ClusterPlan(model=name or "qwen2.5-vl", nodes=nodes, gpus_per_node=gpus_per_node, gpu_bytes=gpu_bytes,
                      micro_batch_tokens=micro_batch_tokens, colocate_sglang_fraction=colocate_sglang_fraction,
                      reserve_bytes=reserve_bytes, hf_params=0)
    for tp in _divisors(world):
        if gpus_per_node % tp:
            out.excluded.append(ExcludedLayout(tp, 0, f"TP{tp} does not divide the {gpus_per_node} GPUs of a node "
                                                      "(a TP group must stay inside one node)"))
            continue
        for pp in _divisors(world // tp):
            try:
                check_layout(hf_config, tp, pp, world // (tp * pp))
            except LayoutError as e:
                out.excluded.append(ExcludedLayout(tp, pp, str(e)))
                continue
            plan = plan_layout(hf_config, tp, pp, world // (tp * pp), micro_batch_tokens=micro_batch_tokens,
                               name=name)
            out.hf_params = plan.hf_total_params
            out.options.append(option_from_plan(plan, gpu_bytes, sglang_bytes, reserve_bytes))
    fitting = [o for o in out.options if o.fits_distributed]
    if fitting:
        best = min(fitting, key=lambda o: (o.model_parallel, o.pp, o.need_bytes_distributed))
        out.options = [LayoutOption(**{**asdict(o), "recommended": o is best}) for o in out.options]
    return out


# ------------------------------------------------------------------------------------------------
# Model resolution and output
# ------------------------------------------------------------------------------------------------


def resolve_model(model: str) -> tuple[Any, str]:
    """``(HF config, label)`` from a known name, an HF folder, or a run config (``.yaml``/``.yml``).
    (:func:`job_micro_batch_tokens` reads a run config's ``trainer.micro_batch_tokens``.)

    Raises:
        FileNotFoundError: the model cannot be found (the message says what was tried).
        ValueError: the folder is not a Qwen2.5-VL model.
    """
    from megatron_vgpo.models.known_configs import load_hf_config

    if model.endswith((".yaml", ".yml")):
        from megatron_vgpo.config import load_config

        cfg = load_config(model)
        folder = Path(cfg.model.hf_dir) if cfg.model.hf_dir else Path(cfg.run_dir) / "model"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{model}: model.hf_dir is {cfg.model.hf_dir!r} and {folder}/config.json does not exist "
                "(the tiny model is built by the job at run time: run the job once, or pass --model with a "
                "known name or an HF folder)")
        return load_hf_config(folder), f"{model} ({folder})"
    return load_hf_config(model), model


def job_micro_batch_tokens(model: str) -> int:
    """``trainer.micro_batch_tokens`` of a run config, else :data:`DEFAULT_MICRO_BATCH_TOKENS`."""
    if model.endswith((".yaml", ".yml")):
        from megatron_vgpo.config import load_config

        return load_config(model).trainer.micro_batch_tokens
    return DEFAULT_MICRO_BATCH_TOKENS


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def format_cluster_plan(plan: ClusterPlan) -> str:
    """Plain-text table: one row per feasible layout, worst GPU's memory in GiB, fit marks, recommendation."""
    lines = [
        f"{plan.model}: {plan.hf_params:,} parameters; {plan.nodes} node(s) x {plan.gpus_per_node} GPUs "
        f"= {plan.world_size} GPUs of {_gib(plan.gpu_bytes)} GiB",
        f"activations: {'not counted' if plan.micro_batch_tokens is None else f'{plan.micro_batch_tokens} tokens per micro-batch'}; "  # noqa: E501
        f"colocated SGLang: {plan.colocate_sglang_fraction:.0%} of each GPU; reserve {_gib(plan.reserve_bytes)} GiB",
    ]
    cols = ["TP", "PP", "DP", "params/GPU", "weights", "grads", "optim", "optim(dist)", "activ", "sglang",
            "need", "need(dist)", "fits", ""]
    rows = []
    for o in sorted(plan.options, key=lambda o: (o.model_parallel, o.pp)):
        fit = "yes" if o.fits else ("dist-opt" if o.fits_distributed else "NO")
        rows.append([str(o.tp), str(o.pp), str(o.dp), f"{o.params_per_gpu:,}", _gib(o.weights_bytes),
                     _gib(o.grads_bytes), _gib(o.optimizer_bytes), _gib(o.optimizer_bytes_distributed),
                     _gib(o.activation_bytes), _gib(o.sglang_bytes), _gib(o.need_bytes),
                     _gib(o.need_bytes_distributed), fit, "<- recommended" if o.recommended else ""])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)).rstrip())
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("memory in GiB of the worst GPU; fits: yes (plain optimizer), dist-opt (only with the "
                 "distributed optimizer), NO (does not fit)")
    rec = plan.recommended
    if rec is not None:
        lines.append(f"recommended: TP{rec.tp} x PP{rec.pp} x DP{rec.dp} "
                     f"(parallel.tp={rec.tp} parallel.pp={rec.pp}{' parallel.sp=true' if rec.tp > 1 else ''}, "
                     f"distributed optimizer); rule: {RECOMMENDATION_RULE}")
    else:
        lines.append("recommended: none -- no layout fits; add nodes, use GPUs with more memory, lower "
                     "--micro-batch-tokens or the colocated SGLang fraction")
    if plan.excluded:
        lines.append("excluded:")
        lines += [f"  {e.reason}" for e in plan.excluded]
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="megatron-vgpo plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="qwen2.5-vl-3b|7b|32b, an HF folder, or a run CONFIG.yaml")
    parser.add_argument("--nodes", type=_positive_int, required=True)
    parser.add_argument("--gpus-per-node", type=_positive_int, required=True)
    parser.add_argument("--gpu-mem-gib", type=float, required=True, help="memory of one GPU in GiB")
    parser.add_argument("--micro-batch-tokens", type=_positive_int, default=None,
                        help=f"tokens per micro-batch for the activation estimate (default: a run config's "
                             f"trainer.micro_batch_tokens, else {DEFAULT_MICRO_BATCH_TOKENS})")
    parser.add_argument("--colocate-sglang-fraction", type=float, default=0.0,
                        help="fraction of each GPU held by a colocated SGLang engine (0: engines elsewhere)")
    parser.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                        help=f"per-GPU reserve for CUDA context / NCCL / fragmentation (default "
                             f"{DEFAULT_RESERVE_GIB})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan. Exit status: 0 a layout is recommended, 1 none fits, 2 bad arguments / model."""
    args = parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    try:
        hf_config, label = resolve_model(args.model)
        plan = plan_cluster(hf_config, args.nodes, args.gpus_per_node, args.gpu_mem_gib,
                            micro_batch_tokens=args.micro_batch_tokens or job_micro_batch_tokens(args.model),
                            colocate_sglang_fraction=args.colocate_sglang_fraction, reserve_gib=args.reserve_gib,
                            name=label)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_cluster_plan(plan))
    return 0 if plan.recommended is not None else 1


if __name__ == "__main__":
    sys.exit(main())
