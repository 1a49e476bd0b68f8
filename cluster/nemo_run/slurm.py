#!/usr/bin/env python
"""Submit (or dry-run) the megatron-vgpo job on Slurm through NeMo-Run (pyxis container, torchrun per node).

    python cluster/nemo_run/slurm.py CONFIG.yaml [key=value ...] --nodes 4 --gpus-per-node 8 \
        --account ACCT --partition PART --time 04:00:00 --image IMAGE --mount /lustre/models:/models \
        --job-dir /lustre/nemo_run [--container-config /workspace/megatron_vgpo/examples/x.yaml] \
        [--plan-model qwen2.5-vl-32b --gpu-mem-gib 80] [--chain --hf-dir ... --ckpt ... --export-dir ...] \
        [--dryrun]

The job command comes from the typed config (``megatron_vgpo.launch.recipes``): the config file path as the
container sees it (``--container-config``, default the given path) plus the overrides that differ from it.
Before anything is rendered, the world size is checked against ``parallel.tp x parallel.pp`` and, with
``--plan-model``/``--gpu-mem-gib``, the layout is checked against the planner's memory per GPU. ``--dryrun``
prints each task's sbatch script (between ``=== sbatch TASK ===`` lines) and submits nothing. NeMo-Run
shell-quotes arguments in the ``srun`` line, so list and spaced values survive.
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
    p.add_argument("config", help="the job's YAML config (read here to build the overrides)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--account", required=True)
    p.add_argument("--partition", required=True)
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--image", required=True, help="container image with megatron_vgpo installed")
    p.add_argument("--mount", action="append", default=[], help="HOST:CONTAINER (repeatable)")
    p.add_argument("--job-dir", required=True, help="shared folder for NeMo-Run job files and logs")
    p.add_argument("--container-config", default=None, help="the config's path inside the container")
    p.add_argument("--repo-dir", default="/workspace/megatron_vgpo", help="the repository inside the container")
    p.add_argument("--title", default="megatron-vgpo")
    p.add_argument("--plan-model", default=None, help="model name / HF folder to check the layout's memory")
    p.add_argument("--gpu-mem-gib", type=float, default=None)
    p.add_argument("--chain", action="store_true", help="import -> train -> export")
    p.add_argument("--hf-dir")
    p.add_argument("--ckpt")
    p.add_argument("--export-dir")
    p.add_argument("--import-tp", type=int, default=1)
    p.add_argument("--import-pp", type=int, default=1)
    p.add_argument("--dryrun", action="store_true", help="print the sbatch scripts, submit nothing")
    return p.parse_args(argv)


def check_memory(cfg, args: argparse.Namespace) -> str | None:
    """With --plan-model and --gpu-mem-gib: the planner's verdict on the config's layout (with its
    ``trainer.micro_batch_tokens`` and colocated SGLang share), or None."""
    if not (args.plan_model and args.gpu_mem_gib):
        return None
    from megatron_vgpo.launch.planner import plan_cluster, resolve_model
    from megatron_vgpo.launch.preflight import sglang_fraction

    hf_cfg, label = resolve_model(args.plan_model)
    plan = plan_cluster(hf_cfg, args.nodes, args.gpus_per_node, args.gpu_mem_gib, name=label,
                        micro_batch_tokens=cfg.trainer.micro_batch_tokens,
                        colocate_sglang_fraction=sglang_fraction(cfg, None))
    option = plan.option(cfg.parallel.tp, cfg.parallel.pp)
    if not option.fits_distributed:
        raise SystemExit(f"TP{option.tp} x PP{option.pp} x DP{option.dp} needs "
                         f"{option.need_bytes_distributed / 1024**3:.1f} GiB per GPU, more than "
                         f"{args.gpu_mem_gib} GiB (see megatron-vgpo plan)")
    return f"TP{option.tp} x PP{option.pp} x DP{option.dp}: {option.need_bytes_distributed / 1024**3:.1f} GiB/GPU"


def main(argv: list[str] | None = None) -> int:
    import nemo_run as run

    from megatron_vgpo.launch import recipes

    args = parse_args(argv)
    base = Path(args.config).resolve()
    cfg = recipes.load_job_config(base, args.overrides)
    recipes.check_world(cfg, args.nodes, args.gpus_per_node)
    verdict = check_memory(cfg, args)
    if verdict:
        print(f"plan: {verdict}")
    common = dict(account=args.account, partition=args.partition, time=args.time, container_image=args.image,
                  container_mounts=args.mount, job_dir=args.job_dir)
    if args.chain:
        missing = [n for n in ("hf_dir", "ckpt", "export_dir") if not getattr(args, n)]
        if missing:
            print(f"--chain needs {', '.join('--' + m.replace('_', '-') for m in missing)}", file=sys.stderr)
            return 2
        paths = recipes.ChainPaths(args.hf_dir, args.ckpt, args.export_dir)
        tasks = recipes.chain_tasks(cfg, base, paths, import_tp=args.import_tp, import_pp=args.import_pp,
                                    config_path=args.container_config, repo_dir=args.repo_dir)
    else:
        tasks = [("train", recipes.train_script(cfg, base, config_path=args.container_config))]
    with run.Experiment(args.title, base_dir=args.job_dir, log_level="WARN") as exp:
        for name, script in tasks:
            if name == "train":
                executor = recipes.slurm_executor(nodes=args.nodes, gpus_per_node=args.gpus_per_node, **common)
            else:  # conversions launch their own ranks on one node
                executor = recipes.slurm_executor(nodes=1, gpus_per_node=args.gpus_per_node, torchrun=False,
                                                  **common)
            exp.add(script, executor=executor, name=name)
        if args.dryrun:
            for name, script in recipes.render_sbatch(exp).items():
                print(f"=== sbatch {name} ===\n{script}\n=== end {name} ===")
            return 0
        exp.run(sequential=True, detach=True)
    print("states: " + json.dumps(recipes.experiment_states(exp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
