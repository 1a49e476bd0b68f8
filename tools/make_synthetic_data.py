"""Write generated visual-reasoning problems as ``train.parquet`` / ``test.parquet``.

The files follow the RL schema of ViRL39K / Geo3K / MMK12 (``problem`` with an ``<image>`` placeholder,
``answer``, ``images`` as a list of ``{"bytes", "path"}`` structs) and are read by
``megatron_vgpo.data.PromptDataset``. Answers can only be read from the drawn images.

Example::

    python tools/make_synthetic_data.py --out data/bar_count_taller --num 4000 --seed 0
    python tools/make_synthetic_data.py --out data/mix --num 2000 --seed 1 \\
        --task count_red,bar_tallest,angle_choice --difficulty hard --test-fraction 0.2
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys

import pyarrow.parquet as pq

from megatron_vgpo.data.synthetic import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_TASK,
    DIFFICULTIES,
    SYNTHETIC_TASKS,
    make_synthetic_splits,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--num", type=int, required=True, help="total number of examples (train + test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--task",
        default=DEFAULT_TASK,
        help=f"task, comma-separated tasks (mixed round-robin) or 'all'; tasks: {sorted(SYNTHETIC_TASKS)}",
    )
    parser.add_argument("--difficulty", default="medium", choices=DIFFICULTIES)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument(
        "--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="square image side, pixels"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    tasks = tuple(sorted(SYNTHETIC_TASKS)) if args.task == "all" else tuple(args.task.split(","))
    try:
        paths = make_synthetic_splits(
            args.out,
            num_examples=args.num,
            seed=args.seed,
            tasks=tasks,
            difficulty=args.difficulty,
            test_fraction=args.test_fraction,
            image_size=args.image_size,
        )
    except (ValueError, RuntimeError) as error:
        print(f"make_synthetic_data: {error}", file=sys.stderr)
        return 2
    for split, path in paths.items():
        table = pq.read_table(path, columns=["task", "answer"])
        counts = collections.Counter(
            zip(table.column("task").to_pylist(), table.column("answer").to_pylist())
        )
        print(f"{split}: {table.num_rows} rows -> {path}")
        for task in tasks:
            histogram = {answer: n for (name, answer), n in sorted(counts.items()) if name == task}
            print(f"  {task}: answers {histogram}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
