"""Check that the Megatron Qwen2.5-VL model at a TP/SP/PP layout reproduces transformers' model (fp32, eval).

    python tools/check_parity.py --hf-dir DIR --tp T --pp P [--sp] [--seed S] [--tolerance 1e-4]

Launches T*P ranks itself (``run_on_ranks``; gloo on CPU, NCCL with CUDA), loads the HF checkpoint into the
Megatron model through the HF->Megatron mapping, and runs both models on the same batch: 3 right-padded
chat prompts of different lengths with 1-2 images each, made by the folder's own processor. The Megatron
forward goes through Megatron's pipeline schedule (``get_forward_backward_func``, ``forward_only=True``).
The last stage gathers the vocab-parallel logits (and, with SP, the sequence-sharded final-norm hidden
states) over TP; the max abs differences at valid positions are printed, with whether every stage fed the
decoder the same M-RoPE ids as transformers' ``get_rope_index``. Exit status 1 above the tolerance or on
any M-RoPE mismatch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from megatron_vgpo.distributed.multiprocess import RankFailure, run_on_ranks
from megatron_vgpo.models.qwen2_5_vl.parity import parity_rank_body
from megatron_vgpo.platform import default_backend


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hf-dir", required=True, type=Path, help="HF Qwen2.5-VL checkpoint folder")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--sp", action="store_true", help="sequence parallel (needs --tp > 1)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the batch's images")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff allowed (fp32)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole launch")
    args = parser.parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        parser.error("--tp and --pp must be >= 1")
    if args.sp and args.tp == 1:
        parser.error("--sp needs --tp > 1")
    if not (args.hf_dir / "config.json").is_file():
        parser.error(f"--hf-dir {args.hf_dir}: no config.json")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the process exit status (0 = parity holds)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    world = args.tp * args.pp
    started = time.perf_counter()
    try:
        results = run_on_ranks(
            parity_rank_body,
            world,
            args=(str(args.hf_dir), [(args.tp, args.pp, args.sp)], args.seed),
            backend=default_backend(),
            megatron=True,
            env={"OMP_NUM_THREADS": "1"},
            timeout_s=args.timeout,
        )
    except RankFailure as failure:
        print(f"check_parity: the ranks failed:\n{failure}", file=sys.stderr)
        return 2
    (name,) = results[0]["layouts"]
    entries = [r["layouts"][name] for r in results]
    report = next(e for e in entries if "logits_max_abs_diff" in e)
    rope_ok = all(e["rope_ids_equal"] for e in entries)
    logits_diff, hidden_diff = report["logits_max_abs_diff"], report["final_hidden_max_abs_diff"]
    print(
        f"layout {name}: world {world}, batch 3 x {results[0]['seq_len']} tokens, "
        f"{results[0]['num_images']} images, {time.perf_counter() - started:.1f} s"
    )
    print(f"  logits            max abs diff {logits_diff:.3e}")
    shard = report["captured_hidden_shape"]
    print(f"  final-norm hidden max abs diff {hidden_diff:.3e}  (captured [s(/tp), b, h] = {shard})")
    print(f"  M-RoPE ids equal to transformers' on every stage: {rope_ok}")
    ok = rope_ok and logits_diff <= args.tolerance and hidden_diff <= args.tolerance
    print("PASS" if ok else f"FAIL (tolerance {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
