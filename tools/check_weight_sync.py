#!/usr/bin/env python
"""Sync a Megatron actor's weights into a real rollout engine and verify the engine by logprobs.

    python tools/check_weight_sync.py --hf-dir DIR --engine sglang|hf --tp T --pp P
                                      [--transport tensor|distributed|disk[,...]] [--bucket-mb 64]

Launches T*P ranks (gloo on CPU, NCCL with CUDA), builds the actor from DIR, perturbs its weights, syncs
them into the engine (SGLang started from DIR in its worker process, or the transformers backend),
generates greedily with an image and without, and prints, per transport, the max abs gap between engine and
actor logprobs on the generated tokens before and after the sync. Several transports may be given
(comma-separated): each gets a fresh perturbation on the same engine. Exit status 1 when a gap after the
sync exceeds 1e-4 (text) or 2e-3 (image), or when the engine already matched before the sync (the check
would prove nothing); 2 on bad arguments or a rank failure. See
:mod:`megatron_vgpo.trainer.weight_sync_check`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_vgpo.distributed.multiprocess import RankFailure, run_on_ranks
from megatron_vgpo.platform import default_backend
from megatron_vgpo.trainer.weight_sync_check import judge, weight_sync_rank_body

TRANSPORTS = ("tensor", "distributed", "disk")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, type=Path, help="HF Qwen2.5-VL checkpoint folder")
    parser.add_argument("--engine", choices=["sglang", "hf"], default="sglang")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--transport", default="tensor",
                        help="tensor | distributed | disk, or a comma list (sglang only; hf copies in-process)")
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="weight-sync bucket size in MiB")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        parser.error("--tp and --pp must be >= 1")
    if not (args.hf_dir / "config.json").is_file():
        parser.error(f"--hf-dir {args.hf_dir}: no config.json")
    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    unknown = sorted(set(transports) - set(TRANSPORTS))
    if unknown or not transports:
        parser.error(f"--transport: unknown {unknown}; choose from {TRANSPORTS}")
    args.transports = transports if args.engine == "sglang" else ["in-process"]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check and print the table; returns the exit status."""
    args = parse_args(argv)
    try:
        results = run_on_ranks(
            weight_sync_rank_body, args.tp * args.pp,
            args=(str(args.hf_dir.resolve()), args.tp, args.pp, args.engine, args.transports,
                  int(args.bucket_mb * 2**20)),
            backend=default_backend(), megatron=True, env={"OMP_NUM_THREADS": "1"}, timeout_s=1800)
    except RankFailure as failure:
        print(f"check_weight_sync: the ranks failed:\n{failure}", file=sys.stderr)
        return 2
    report = results[0]
    print(f"engine {args.engine}, actor TP{args.tp} x PP{args.pp}")
    print(f"{'transport':<12} {'gap before (img/text)':>24} {'gap after (img/text)':>24} {'seconds':>8} {'MB':>8}")
    for transport, e in report["transports"].items():
        mb = f"{e['bytes'] / 2**20:.1f}" if e["bytes"] else "-"
        print(f"{transport:<12} {e['gap_before']['image']:>11.2e} / {e['gap_before']['text']:.2e} "
              f"{e['gap_after']['image']:>11.2e} / {e['gap_after']['text']:.2e} {e['seconds']:>8.2f} {mb:>8}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    problems = judge(report)
    for problem in problems:
        print(f"FAIL {problem}")
    if not problems:
        print("PASS")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
