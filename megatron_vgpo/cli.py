"""The ``megatron-vgpo`` command.

    megatron-vgpo train CONFIG.yaml [key=value ...]     run a job (also: python -m megatron_vgpo.train)
    megatron-vgpo plan-memory --model NAME --tp T --pp P --dp D
                                                       parameters and memory per GPU for a layout
    megatron-vgpo plan --model NAME --nodes N --gpus-per-node G --gpu-mem-gib M
                                                       every feasible layout of a cluster, recommended one
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="megatron-vgpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "plan-memory", "plan"])
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from megatron_vgpo.train import main as train_main

        return train_main(rest)
    if command == "plan-memory":
        from megatron_vgpo.checkpoint.plan_memory_cli import main as plan_main

        return plan_main(rest)
    if command == "plan":
        from megatron_vgpo.launch.planner import main as cluster_plan_main

        return cluster_plan_main(rest)
    parser.parse_args([command])  # prints the usage error for an unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
