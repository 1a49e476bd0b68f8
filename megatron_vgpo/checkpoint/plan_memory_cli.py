"""Parameters and memory per GPU of Qwen2.5-VL at a TP x PP x DP layout, per pipeline stage.

Examples::

    megatron-vgpo plan-memory --model qwen2.5-vl-7b --tp 4 --pp 4 --dp 2
    megatron-vgpo plan-memory --model qwen2.5-vl-32b --tp 8 --pp 2 --dp 4 --micro-batch-tokens 8192
    python tools/plan_memory.py --model /path/to/hf_folder --tp 2 --pp 1 --verify-meta   (same CLI)

``--model`` takes a known name (qwen2.5-vl-3b, qwen2.5-vl-7b, qwen2.5-vl-32b) or an HF folder. The numbers
come from arithmetic on the config (no weights, no GPU); ``--verify-meta`` also builds every rank's Megatron
model on the meta device and checks the counts against the plan and the HF model (a few seconds).
Exit status: 0 ok, 2 bad arguments or a layout that cannot hold the model, 1 verification failure.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (module docstring)."""
    parser = argparse.ArgumentParser(prog="megatron-vgpo plan-memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="qwen2.5-vl-3b | qwen2.5-vl-7b | qwen2.5-vl-32b | HF folder")
    parser.add_argument("--tp", type=_positive, required=True, help="tensor-parallel size")
    parser.add_argument("--pp", type=_positive, required=True, help="pipeline-parallel size")
    parser.add_argument("--dp", type=_positive, default=1, help="data-parallel size (distributed optimizer)")
    parser.add_argument("--micro-batch-tokens", type=_positive, default=None,
                        help="tokens per micro-batch: adds an activation and fp32-logits estimate")
    parser.add_argument("--verify-meta", action="store_true",
                        help="build every rank on the meta device and reconcile with the plan and HF")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the plan (and with ``--verify-meta`` reconcile it with meta-device models); exit status."""
    args = parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)  # Megatron's "no apex / TE" notices; the table is the output
    from megatron_vgpo.checkpoint import memory_plan as mp
    from megatron_vgpo.models.known_configs import load_hf_config

    try:
        cfg = load_hf_config(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        plan = mp.plan_layout(cfg, args.tp, args.pp, args.dp, micro_batch_tokens=args.micro_batch_tokens,
                              name=str(args.model))
    except mp.LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(mp.format_plan(plan))
    if not args.verify_meta:
        return 0
    hf_meta = mp.hf_param_count_meta(cfg)
    ranks = mp.meta_rank_models(cfg, args.tp, args.pp)
    bad = [r for r in ranks if (r.params, r.replicated) !=
           (plan.stages[r.pp_rank].params, plan.stages[r.pp_rank].replicated)]
    unique = plan.unique_params()
    print(f"meta device: {len(ranks)} rank models built; HF model on meta: {hf_meta:,} parameters; "
          f"plan reconciles to {unique:,}")
    mapping = [f"tp_rank {r.tp_rank} pp_rank {r.pp_rank}: {m}" for r in ranks for m in r.mapping_problems]
    mapping += [r.config_problem for r in ranks if r.config_problem]
    print(f"HF -> Megatron mapping: {sum(r.mapped_tensors for r in ranks):,} tensors mapped over the ranks, "
          f"{len(mapping)} problem(s)")
    for line in mapping[:20]:
        print(f"  {line}")
    for r in bad:
        s = plan.stages[r.pp_rank]
        print(f"  MISMATCH tp_rank {r.tp_rank} pp_rank {r.pp_rank}: built {r.params:,} "
              f"(replicated {r.replicated:,}) vs plan {s.params:,} (replicated {s.replicated:,})")
    if bad or mapping or unique != hf_meta:
        print("verification FAILED")
        return 1
    print("verification ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
