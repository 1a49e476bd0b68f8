#!/usr/bin/env python
"""PNG learning curves and the focus-over-generation plot of a run (see :mod:`megatron_vgpo.trainer.plots`).

    python tools/plot_run.py RUN_DIR [--out DIR]

Reads ``RUN_DIR/metrics.jsonl``, writes the PNGs into ``--out`` (default ``RUN_DIR/plots``) and prints their
paths, one per line. Exit status 2 when the run has no metrics to plot.
"""

from __future__ import annotations

import argparse
import sys

from megatron_vgpo.trainer.plots import PlotError, plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="run folder holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        result = plot_run(args.run_dir, args.out)
    except PlotError as err:
        print(f"plot_run: {err}", file=sys.stderr)
        return 2
    for path in result.paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
