"""``megatron-vgpo train CONFIG [key=value ...]`` (also ``python -m megatron_vgpo.train``).

The job today (foundation milestone): prepare the model folder and the data (building the tiny model and
generating synthetic data when the config asks for them), load both through the real components (the
parquet dataset with bad-row accounting, the processor, a rollout engine, the reward grader), check that
the Megatron-Core model at the configured TP/SP/PP layout (its ranks launched here) reproduces
transformers' logits and final-norm hidden states, measure greedy validation accuracy, log it, and write
``RUN_DIR/summary.json``. The RL loop (actor, rollouts,
updates) replaces the middle part as it lands; the contract of ``summary.json`` stays.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from megatron_vgpo.checkpoint.atomic_files import write_file_atomic
from megatron_vgpo.config import ConfigError, TrainConfig, load_config, to_dict

logger = logging.getLogger("megatron_vgpo.train")


def _setup_logging(level: str, run_dir: Path) -> None:
    """Rank 0 logs at ``level`` to stderr and ``RUN_DIR/train.log``; other ranks log warnings to stderr."""
    rank = int(os.environ.get("RANK", "0"))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    prefix = "%(asctime)s" if rank == 0 else f"[rank {rank}]"
    fmt = f"{prefix} %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level) if rank == 0 else logging.WARNING, handlers=handlers,
                        force=True, format=fmt, datefmt="%H:%M:%S")


def launched_by_torchrun() -> bool:
    """True inside a multi-process launch (``torchrun``, NeMo-Run's torchrun launcher, Slurm + torchrun)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def needs_actor(cfg: TrainConfig) -> bool:
    """True when the job trains (SFT warm start or RL steps) or starts from a Megatron checkpoint
    (``model.load_checkpoint``), i.e. needs the Megatron actor's ranks."""
    return cfg.trainer.steps > 0 or cfg.sft.enabled or bool(cfg.model.load_checkpoint)


def _relaunch_under_torchrun(cfg: TrainConfig) -> dict:
    """Run this job under ``torchrun`` with ``tp * pp * dp`` processes on this machine; return its summary.

    The torchrun agent and its ranks end with this process, even when it is killed with ``SIGKILL`` (see
    :mod:`megatron_vgpo.distributed.lifecycle`). ``SIGINT`` / ``SIGTERM`` received here are forwarded to the
    agent, which stops its ranks; once it has exited the signal takes its usual effect here
    (``KeyboardInterrupt`` for Ctrl-C). A second signal kills the agent outright (its ranks follow).
    """
    from megatron_vgpo.distributed.lifecycle import child_env, torchrun_command
    from megatron_vgpo.distributed.multiprocess import find_free_port

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.yaml"
    write_file_atomic(resolved, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp
    command = torchrun_command(["--nproc-per-node", str(world), "--master-port", str(find_free_port()),
                                "-m", "megatron_vgpo.train", str(resolved)])
    logger.info("launching %d ranks: %s", world, " ".join(command))
    env = child_env({**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    status, received = _run_forwarding_signals(command, env)
    if received is not None:
        logger.warning("stopped by %s (the ranks exited with status %s)", signal.Signals(received).name, status)
        signal.raise_signal(received)  # the previous handler is back: default action or KeyboardInterrupt
    if status != 0:
        raise RuntimeError(f"the {world} training ranks failed (exit status {status}); see {run_dir / 'train.log'}")
    return json.loads((run_dir / "summary.json").read_text())


def _run_forwarding_signals(command: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Run ``command`` in a session of its own (so a terminal's Ctrl-C reaches it once, through here) and wait,
    forwarding ``SIGINT``/``SIGTERM`` to it (a repeated signal sends ``SIGKILL``). Returns its exit status and
    the first signal received (None if none); the previous signal handlers are restored before returning."""
    import subprocess
    import threading

    child = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum if len(received) == 1 else signal.SIGKILL)

    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT in a shell's background job
                previous[sig] = signal.signal(sig, forward)
    try:
        status = child.wait()
    except BaseException:
        child.kill()  # e.g. an exception from elsewhere: never leave the agent behind
        child.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status, (received[0] if received else None)


def run(cfg: TrainConfig) -> dict | None:
    """Run the job described by ``cfg``; rank 0 returns the summary (also written to ``RUN_DIR/summary.json``),
    other ranks return None.

    Single process: a training job relaunches itself under ``torchrun`` with ``tp * pp * dp`` ranks once the
    layout has passed :func:`~megatron_vgpo.launch.preflight.check_job_layout` (a layout that cannot run is one
    :class:`~megatron_vgpo.launch.preflight.PreflightError` here, before any rank starts); an evaluation-only
    job runs its Megatron check on ``tp * pp`` ranks of its own. Under ``torchrun`` (world size a multiple of
    ``tp * pp``, equal to ``tp * pp * dp`` unless ``dp`` is 1): rank 0 prepares the model and data while the
    others wait, every rank takes part in the Megatron check at the configured layout (extra ranks are
    data-parallel replicas), and rank 0 validates and writes the summary.
    """
    import torch
    import torch.distributed as dist

    from megatron_vgpo.distributed import comm
    from megatron_vgpo.distributed.process_groups import init_torch_distributed
    from megatron_vgpo.launch.preflight import PreflightError, check_job_layout
    from megatron_vgpo.trainer.prepare import prepare_data, prepare_model

    distributed = launched_by_torchrun()
    par = cfg.parallel
    if needs_actor(cfg) and not distributed and par.tp * par.pp * par.dp > 1:
        check_job_layout(cfg, prepare_model(cfg.model, Path(cfg.run_dir)))  # before any rank starts
        return _relaunch_under_torchrun(cfg)
    started = time.monotonic()
    run_dir = Path(cfg.run_dir)
    if distributed:
        init_torch_distributed(timeout_s=cfg.trainer.collective_timeout_s)
    is_main = not distributed or dist.get_rank() == 0
    torch.manual_seed(cfg.seed)

    prepared: list = [None]
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_file_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        try:
            hf_dir = prepare_model(cfg.model, run_dir)
            if distributed:
                nproc = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
                check_job_layout(cfg, hf_dir, nnodes=dist.get_world_size() // nproc, nproc_per_node=nproc)
            prepared = [(hf_dir, prepare_data(cfg.data, run_dir))]
        except PreflightError as err:
            prepared = [err]
    if distributed:
        comm.broadcast_object_list(prepared, src=0)
    if isinstance(prepared[0], PreflightError):
        raise prepared[0]  # on every rank: nobody is left waiting in a collective
    hf_dir, (train_files, val_files) = prepared[0]
    if cfg.model.load_checkpoint:  # refuse a missing or mismatched start checkpoint before any model is built
        from megatron_vgpo.trainer.job import check_start_checkpoint

        check_start_checkpoint(cfg.model.load_checkpoint, hf_dir)

    parity = megatron_parity_check(hf_dir, cfg, in_process=distributed)
    if needs_actor(cfg):
        from megatron_vgpo.trainer.job import train_job

        init_torch_distributed(timeout_s=cfg.trainer.collective_timeout_s)  # a world of one without torchrun
        return train_job(cfg, hf_dir, train_files, val_files, parity, started)
    if not is_main:
        comm.barrier()  # wait for rank 0's validation, then leave together
        return None
    summary = _validate_and_summarize(cfg, hf_dir, train_files, val_files, parity, started)
    if distributed:
        comm.barrier()
    return summary


def _validate_and_summarize(cfg: TrainConfig, hf_dir: Path, train_files: list[Path], val_files: list[Path],
                            parity: dict, started: float) -> dict:
    """Rank 0: load the datasets (bad rows counted), greedy validation accuracy, metrics, ``summary.json``."""
    from transformers import AutoProcessor

    from megatron_vgpo.reward import RewardGrader
    from megatron_vgpo.trainer.evaluate import evaluate_greedy
    from megatron_vgpo.trainer.job import make_engine, write_summary
    from megatron_vgpo.trainer.metrics import MetricsLogger
    from megatron_vgpo.trainer.prepare import load_datasets

    run_dir = Path(cfg.run_dir)
    processor = AutoProcessor.from_pretrained(hf_dir)
    datasets = load_datasets(cfg.data, processor, train_files, val_files)

    val = datasets["val"]
    val_samples = [val.prompt_inputs(i) for i in range(min(cfg.validation.num_samples, len(val)))]
    engine = make_engine(cfg, hf_dir, backend="hf")
    tokenizer = processor.tokenizer
    with MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                       config=to_dict(cfg)) as metrics, RewardGrader(num_workers=2, timeout_s=10.0) as grader:
        result = evaluate_greedy(engine, val_samples, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                                 grader, max_new_tokens=cfg.validation.max_new_tokens,
                                 batch_size=cfg.validation.batch_size)
        metrics.log(0, result.metrics())
    engine.shutdown()
    logger.info("validation (greedy, %d prompts): accuracy %.3f, boxed %.2f, mean response %.1f tokens",
                result.num_samples, result.accuracy, result.boxed_fraction, result.mean_response_tokens)
    for example in result.examples:
        logger.info("example %s | gold %s | %r", example["source"], example["answer"], example["response"][:120])

    summary = {
        "val_accuracy_before": result.accuracy,
        "val_accuracy_after": result.accuracy,  # trainer.steps = 0: nothing trained
        "steps": 0,
        "val_boxed_fraction": result.boxed_fraction,
    }
    return write_summary(run_dir, summary, started=started, hf_dir=hf_dir, datasets=datasets, parity=parity)


PARITY_TOLERANCE = 1e-4  # fp32 max abs diff of logits and final-norm hidden states


def megatron_parity_check(hf_dir: Path, cfg: TrainConfig, *, in_process: bool = False) -> dict:
    """Load ``hf_dir`` into the Megatron model at the configured layout on ``tp * pp`` ranks (launched here,
    or, with ``in_process``, the ranks of the current torchrun world) and compare its logits and final-norm
    hidden states with transformers' on a batch with images.

    Returns the layout's max abs diffs; raises ``RuntimeError`` above :data:`PARITY_TOLERANCE` (fp32) or
    when the M-RoPE ids differ. Skipped (``{"skipped": ...}``) for bf16 models, where the tolerance means
    nothing.
    """
    from megatron_vgpo.distributed.multiprocess import run_on_ranks
    from megatron_vgpo.models.qwen2_5_vl.parity import parity_rank_body
    from megatron_vgpo.platform import default_backend

    if cfg.model.dtype != "float32":
        return {"skipped": f"model.dtype={cfg.model.dtype}"}
    par = cfg.parallel
    started = time.monotonic()
    layouts = [(par.tp, par.pp, par.sp)]
    if in_process:
        import torch.distributed as dist

        from megatron_vgpo.distributed import comm
        from megatron_vgpo.distributed.process_groups import destroy_model_parallel
        from megatron_vgpo.platform import apply_cpu_patches

        apply_cpu_patches()
        mine = parity_rank_body(dist.get_rank(), dist.get_world_size(), str(hf_dir), layouts)
        destroy_model_parallel()
        results: list = [None] * dist.get_world_size()
        comm.all_gather_object(results, mine)
    else:
        results = run_on_ranks(parity_rank_body, par.tp * par.pp, args=(str(hf_dir), layouts),
                               backend=default_backend(), megatron=True, env={"OMP_NUM_THREADS": "1"})
    (name,) = results[0]["layouts"]
    report = next(r["layouts"][name] for r in results if "logits_max_abs_diff" in r["layouts"][name])
    rope_ok = all(r["layouts"][name]["rope_ids_equal"] for r in results)
    out = {"layout": name, "logits_max_abs_diff": report["logits_max_abs_diff"],
           "final_hidden_max_abs_diff": report["final_hidden_max_abs_diff"], "rope_ids_equal": rope_ok,
           "seconds": round(time.monotonic() - started, 1)}
    logger.info("Megatron %s vs transformers: logits %.2e, final-norm hidden %.2e, M-RoPE ids equal: %s (%.1fs)",
                name, out["logits_max_abs_diff"], out["final_hidden_max_abs_diff"], rope_ok, out["seconds"])
    worst = max(out["logits_max_abs_diff"], out["final_hidden_max_abs_diff"])
    if not rope_ok or worst > PARITY_TOLERANCE:
        raise RuntimeError(f"Megatron model at {name} does not reproduce transformers' outputs: {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``megatron-vgpo train``: load the config, run the job, print the summary (rank 0); returns the exit code."""
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:  # a torchrun worker: never outlive the agent
        from megatron_vgpo.distributed.lifecycle import die_with_parent

        die_with_parent()
    parser = argparse.ArgumentParser(prog="megatron-vgpo train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. examples/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/x parallel.tp=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"megatron-vgpo train: config error: {err}", file=sys.stderr)
        return 2
    _setup_logging(cfg.logging.level, Path(cfg.run_dir))
    from megatron_vgpo.launch.preflight import PreflightError

    try:
        summary = run(cfg)
    except PreflightError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megatron-vgpo train: layout error: {err}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
