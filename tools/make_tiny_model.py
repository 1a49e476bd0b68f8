"""Write a randomly initialised Qwen2.5-VL Hugging Face checkpoint folder (real architecture, tiny sizes).

    python tools/make_tiny_model.py --out /tmp/tiny_qwen2_5_vl [--preset tiny|small] [--seed N]
        [--tokenizer bpe|qwen] [--dtype float32|bfloat16|float16] [--overwrite]

The folder loads offline with ``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor``;
see ``megatron_vgpo.models.tiny_qwen2_5_vl`` for the presets.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from megatron_vgpo.models.tiny_qwen2_5_vl import BUILD_INFO_FILE, PRESETS, build_tiny_checkpoint
from megatron_vgpo.models.tokenizers import TOKENIZER_KINDS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the weights (same seed -> identical files)"
    )
    parser.add_argument("--tokenizer", default="bpe", choices=TOKENIZER_KINDS)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--vocab-size", type=int, default=None, help="embedding rows (default: see module)")
    parser.add_argument("--overwrite", action="store_true", help="replace checkpoint files in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the checkpoint and print a one-screen summary."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        out_dir = build_tiny_checkpoint(
            args.out,
            preset=args.preset,
            seed=args.seed,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            vocab_size=args.vocab_size,
            overwrite=args.overwrite,
        )
    except (FileExistsError, NotADirectoryError, ValueError) as error:
        raise SystemExit(f"make_tiny_model: {error}") from error
    info = json.loads((out_dir / BUILD_INFO_FILE).read_text())
    print(f"wrote {out_dir} in {time.perf_counter() - started:.2f} s")
    for key in ("preset", "seed", "tokenizer", "dtype", "num_parameters", "tokenizer_length", "vocab_size"):
        print(f"  {key:<17} {info[key]}")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path.name:<26} {path.stat().st_size:>12,d} bytes")


if __name__ == "__main__":
    main()
