#!/usr/bin/env python
"""Run the megatron-vgpo job through NeMo-Run on this machine (LocalExecutor, torchrun launcher).

    python cluster/nemo_run/local.py CONFIG.yaml [key=value ...] [--nproc-per-node 2]
    python cluster/nemo_run/local.py CONFIG.yaml [key=value ...] --chain --hf-dir HF --ckpt CKPT --export-dir OUT

The first form runs training on ``--nproc-per-node`` ranks (gloo on a CPU, NCCL on GPUs). ``--chain`` runs
checkpoint import (HF -> Megatron) -> training -> export (Megatron -> HF) in order. The command of every task
comes from the typed config (``megatron_vgpo.launch.recipes``). NeMo-Run does not raise when a job fails, so
the states are read after the experiment and printed as the last line (``states: {...}`` JSON); the exit
status is 0 only when every task SUCCEEDED.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the job's YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--title", default="megatron-vgpo-local")
    p.add_argument("--base-dir", default=None, help="NeMo-Run experiment folder (default: RUN_DIR/nemo_run)")
    p.add_argument("--chain", action="store_true", help="import -> train -> export")
    p.add_argument("--hf-dir", help="--chain: source HF folder")
    p.add_argument("--ckpt", help="--chain: Megatron checkpoint folder to write")
    p.add_argument("--export-dir", help="--chain: HF folder to export to")
    p.add_argument("--import-tp", type=int, default=1)
    p.add_argument("--import-pp", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import dataclasses

    import nemo_run as run

    from megatron_vgpo.launch import recipes

    args = parse_args(argv)
    base = Path(args.config).resolve()
    cfg = recipes.load_job_config(base, args.overrides)
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))  # tasks run in their own folders
    recipes.check_world(cfg, 1, args.nproc_per_node)
    base_dir = args.base_dir or str(Path(cfg.run_dir) / "nemo_run")
    if args.chain:
        missing = [n for n in ("hf_dir", "ckpt", "export_dir") if not getattr(args, n)]
        if missing:
            print(f"--chain needs {', '.join('--' + m.replace('_', '-') for m in missing)}", file=sys.stderr)
            return 2
        paths = recipes.ChainPaths(str(Path(args.hf_dir).resolve()), str(Path(args.ckpt).resolve()),
                                   str(Path(args.export_dir).resolve()))
        tasks = recipes.chain_tasks(cfg, base, paths, import_tp=args.import_tp, import_pp=args.import_pp)
    else:
        tasks = [("train", recipes.train_script(cfg, base))]
    with run.Experiment(args.title, base_dir=base_dir, log_level="WARN") as exp:
        for name, script in tasks:
            torchrun = name == "train"
            exp.add(script, executor=recipes.local_executor(args.nproc_per_node, torchrun=torchrun), name=name)
        exp.run(sequential=True, tail_logs=False)
    states = recipes.experiment_states(exp)
    print("states: " + json.dumps(states))
    return 0 if states and all(s == "SUCCEEDED" for s in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
