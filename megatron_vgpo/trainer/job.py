"""The training job (``trainer.steps > 0`` or ``sft.enabled``): optional SFT warm start, then the RL loop,
with greedy validation before and after. Collective over every rank; rank 0 drives the rollout engine,
grades, logs and writes ``RUN_DIR/summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vgpo.config import TrainConfig, to_dict
from megatron_vgpo.distributed import comm
from megatron_vgpo.trainer.rl_step import broadcast_object, check_group_layout, data_parallel_size, sync_weights

logger = logging.getLogger(__name__)


def _actor_config(cfg: TrainConfig, *, lr: float, warmup: int, schedule: str, decay_steps: int | None) -> Any:
    from megatron_vgpo.actor.megatron_actor import ActorConfig

    opt = cfg.optimizer
    return ActorConfig(sequence_parallel=cfg.parallel.sp, params_dtype=actor_params_dtype(cfg),
                       recompute=cfg.parallel.recompute, lr=lr, min_lr=min(opt.min_lr, lr),
                       weight_decay=opt.weight_decay, betas=tuple(opt.betas), adam_eps=opt.adam_eps,
                       clip_grad=opt.clip_grad, use_distributed_optimizer=opt.distributed, lr_schedule=schedule,
                       lr_warmup_steps=warmup, lr_decay_steps=decay_steps,
                       micro_batch_tokens=cfg.trainer.micro_batch_tokens)


def actor_params_dtype(cfg: TrainConfig) -> torch.dtype:
    """The Megatron actor's parameter dtype for ``model.dtype`` (bfloat16: Megatron mixed precision)."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]


def make_engine(cfg: TrainConfig, model_dir: Path, backend: str | None = None) -> Any:
    """Rank 0's rollout engine: SGLang in its worker (``sglang``), SGLang HTTP servers (``sglang_server``: the
    ones at ``rollout.server_urls`` or ``rollout.num_servers`` the engine launches and owns), falling back to
    transformers when SGLang cannot start and ``rollout.fallback_to_hf``; or the transformers backend."""
    from megatron_vgpo.rollout.hf_backend import HFRolloutEngine

    backend = backend or cfg.rollout.backend
    if backend in ("sglang", "sglang_server"):
        try:
            kwargs = {"dtype": cfg.model.dtype, "random_seed": cfg.seed, "log_level": "error",
                      **cfg.rollout.engine_kwargs}
            if backend == "sglang_server":
                from megatron_vgpo.rollout.sglang_server import SGLangServerEngine, launch_server_engine

                options = {"weight_sync": cfg.rollout.weight_sync, "sync_dir": Path(cfg.run_dir) / "weight_sync",
                           "master_address": cfg.rollout.sync_master_address}
                if cfg.rollout.server_urls:
                    return SGLangServerEngine(cfg.rollout.server_urls, model_path=model_dir, **options)
                return launch_server_engine(model_dir, num_servers=cfg.rollout.num_servers, server_kwargs=kwargs,
                                            log_dir=cfg.run_dir, **options)
            from megatron_vgpo.rollout.sglang_backend import SGLangEngine

            return SGLangEngine(model_dir, engine_kwargs=kwargs, weight_sync=cfg.rollout.weight_sync)
        except Exception as err:  # an engine that cannot start is a set-up problem, reported either way
            if not cfg.rollout.fallback_to_hf:
                raise
            logger.warning("SGLang engine could not start (%s: %s); using the transformers backend",
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "")
    return HFRolloutEngine(model_dir, dtype=torch.float32 if cfg.model.dtype == "float32" else torch.bfloat16)


def write_summary(run_dir: Path, summary: dict[str, Any], *, started: float, hf_dir: Path, datasets: dict,
                  parity: dict) -> dict[str, Any]:
    """Add the fields every run reports (wall time, model, dataset sizes and skipped rows, Megatron parity)
    to ``summary`` and write it to ``RUN_DIR/summary.json``; returns it."""
    summary.update(wall_seconds=round(time.monotonic() - started, 2), model_dir=str(hf_dir),
                   train_prompts=len(datasets["train"]), val_prompts=len(datasets["val"]),
                   skipped_rows={k: dict(v.skipped) for k, v in datasets.items()}, megatron_parity=parity)
    from megatron_vgpo.checkpoint.atomic_files import write_file_atomic

    write_file_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    logger.info("wrote %s", run_dir / "summary.json")
    return summary


def train_job(cfg: TrainConfig, hf_dir: Path, train_files: list[Path], val_files: list[Path], parity: dict,
              started: float) -> dict | None:
    """SFT (optional) + RL on the already-initialised torch.distributed world; rank 0 returns the summary."""
    from transformers import AutoProcessor

    from megatron_vgpo.actor.megatron_actor import MegatronActor
    from megatron_vgpo.data import PromptSampler
    from megatron_vgpo.distributed.process_groups import init_model_parallel
    from megatron_vgpo.models.tokenizers import special_token_ids
    from megatron_vgpo.reward import RewardGrader
    from megatron_vgpo.trainer.evaluate import evaluate_greedy
    from megatron_vgpo.trainer.loop import rl_loop
    from megatron_vgpo.trainer.metrics import MetricsLogger
    from megatron_vgpo.trainer.prepare import load_datasets
    from megatron_vgpo.trainer.sft import run_sft

    run_dir = Path(cfg.run_dir)
    rank0 = dist.get_rank() == 0
    start_ckpt = check_start_checkpoint(cfg.model.load_checkpoint, hf_dir)
    init_model_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.seed,
                        timeout_s=cfg.trainer.collective_timeout_s)
    _log_collective_timeouts()
    processor = AutoProcessor.from_pretrained(hf_dir)
    tokenizer = processor.tokenizer
    ids = special_token_ids(tokenizer)
    datasets = load_datasets(cfg.data, processor, train_files, val_files)
    train_ds, val_ds = datasets["train"], datasets["val"]
    # rank 0's engine reads prompt text + raw images only: no image processor, no copies on other ranks
    val_samples = ([val_ds.prompt_inputs(i) for i in range(min(cfg.validation.num_samples, len(val_ds)))]
                   if rank0 else [])
    token_ids = {"pad_token_id": ids.pad, "image_token_id": ids.image_pad}

    def decode(token_list: list[int]) -> str:
        return tokenizer.decode(token_list, skip_special_tokens=True)

    grader = RewardGrader(num_workers=2, timeout_s=10.0) if rank0 else None
    metrics = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                            enabled=rank0, config=to_dict(cfg))
    engine = None

    def validate(samples: list[Any] = val_samples) -> dict[str, float]:
        """Greedy validation (collective): ``val/accuracy``, ``val/boxed_fraction``, ``val/response_tokens``
        on every rank."""
        result = (evaluate_greedy(engine, samples, decode, grader, max_new_tokens=cfg.validation.max_new_tokens,
                                  batch_size=cfg.validation.batch_size).metrics() if rank0 else None)
        return broadcast_object(result)

    summary: dict[str, Any] = {}
    try:
        sft_dir = run_dir / "sft_model"
        if rank0:  # an export interrupted between its renames left the previous folder as sft_model.old
            from megatron_vgpo.checkpoint.atomic_files import restore_replaced_dir

            restore_replaced_dir(sft_dir, _previous_dir(sft_dir))
        comm.barrier()
        resuming = cfg.trainer.resume and (run_dir / "checkpoints" / "latest").is_file()
        if cfg.sft.enabled and not (sft_dir / "config.json").is_file() and not resuming:
            cosine = cfg.sft.lr_schedule == "cosine"
            actor = MegatronActor(hf_dir, _actor_config(cfg, lr=cfg.sft.lr, warmup=cfg.sft.warmup_steps,
                                                       schedule=cfg.sft.lr_schedule,
                                                       decay_steps=cfg.sft.max_steps if cosine else None))
            if start_ckpt is not None:
                actor.load_weights(start_ckpt)
            engine = make_engine(cfg, hf_dir, backend="hf") if rank0 else None
            sampler = PromptSampler(len(train_ds), cfg.sft.batch_size, seed=cfg.seed)

            def evaluate_sft() -> dict[str, float]:
                sync_weights(actor, engine, cfg)
                return validate(val_samples[: cfg.sft.eval_samples])

            summary.update(run_sft(actor, train_ds, sampler.next_batch, evaluate_sft, tokenizer, cfg,
                                   lambda step, m: metrics.log(step, m), eos_token_id=ids.eos, **token_ids))
            _export_hf(actor, hf_dir, sft_dir, rank0)
            if engine is not None:
                engine.shutdown()
            engine, actor = None, None
        if (sft_dir / "config.json").is_file():
            hf_dir, start_ckpt = sft_dir, None  # the warm start began from the checkpoint

        cosine = cfg.optimizer.lr_schedule == "cosine" and cfg.trainer.steps > 0  # steps=0: SFT / evaluation only
        rl_actor_config = _actor_config(
            cfg, lr=cfg.optimizer.lr, warmup=cfg.optimizer.warmup_steps if cfg.trainer.steps > 0 else 0,
            schedule="cosine" if cosine else "constant",
            decay_steps=cfg.trainer.steps * cfg.trainer.mini_batches if cosine else None)
        # KL reference: the frozen starting policy (this folder, also after a resume), only when used
        check_group_layout(cfg, data_parallel_size())
        if cfg.algorithm.kl_coef > 0:
            rl_actor_config.reference_hf_dir = str(hf_dir)
        actor = MegatronActor(hf_dir, rl_actor_config)
        engine = make_engine(cfg, hf_dir) if rank0 else None
        if start_ckpt is not None:  # a resumed policy comes from its own checkpoint; the KL reference never
            actor.load_weights(start_ckpt, policy=not resuming)
            sync_weights(actor, engine, cfg)  # the engine started from the HF folder
        before_path = run_dir / "val_before.json"
        if resuming and before_path.is_file():
            stored = json.loads(before_path.read_text())  # runs from before 2026-11-24 kept the accuracy only
            before = stored.get("metrics", {"val/accuracy": stored["accuracy"]})
        else:
            before = validate()
            if rank0:  # atomic: a kill mid-write must not leave a file that breaks the resume
                from megatron_vgpo.checkpoint.atomic_files import write_file_atomic

                write_file_atomic(before_path, json.dumps({"accuracy": before["val/accuracy"], "metrics": before,
                                                           "model_dir": str(hf_dir)}))
        metrics.log(0, before)
        val_before = before["val/accuracy"]
        logger.info("validation before RL: accuracy %.3f, boxed answers %.3f", val_before,
                    before.get("val/boxed_fraction", float("nan")))
        sampler = PromptSampler(len(train_ds), cfg.trainer.prompts_per_step, seed=cfg.seed)
        counters = rl_loop(cfg, actor, engine, grader, train_ds, sampler, validate, metrics.log, decode=decode,
                           vision_token_ids=ids.vision_markers, sync_probe=_sync_probe(cfg, val_ds, tokenizer, actor),
                           **token_ids)
        after = validate()
        val_after = after["val/accuracy"]
        logger.info("validation after RL: accuracy %.3f (before %.3f), boxed answers %.3f", val_after, val_before,
                    after["val/boxed_fraction"])
        if rank0:
            summary["plots"] = _write_plots(run_dir)
        summary.update(val_accuracy_before=val_before, val_accuracy_after=val_after,
                       val_boxed_fraction_before=before.get("val/boxed_fraction"),
                       val_boxed_fraction_after=after["val/boxed_fraction"], steps=counters["steps"],
                       resumed_from_step=counters["resumed_from_step"], algorithm=cfg.algorithm.name,
                       rollout_backend=type(engine).__name__ if engine is not None else None,
                       load_checkpoint=str(start_ckpt) if start_ckpt is not None else None,
                       actor_params_dtype=str(actor.config.params_dtype).replace("torch.", ""),
                       recompute=actor.config.recompute)
    finally:
        if engine is not None:
            engine.shutdown()
        if grader is not None:
            grader.close()
        metrics.close()
    if not rank0:
        return None
    return write_summary(run_dir, summary, started=started, hf_dir=hf_dir, datasets=datasets, parity=parity)


PROBE_RESPONSE = "The answer is \\boxed{1}."


def _sync_probe(cfg: TrainConfig, val_ds: Any, tokenizer: Any, actor: Any) -> Any:
    """The fixed probe of ``rollout.verify_sync_every`` (None when off): the first held-out prompt and
    :data:`PROBE_RESPONSE`."""
    if not cfg.rollout.verify_sync_every:
        return None
    from megatron_vgpo.models.tokenizers import special_token_ids
    from megatron_vgpo.trainer.sync_probe import SyncProbe

    ids = special_token_ids(tokenizer)
    tolerance = cfg.rollout.verify_sync_tolerance or (2e-3 if cfg.model.dtype == "float32" else 1e-1)
    return SyncProbe(val_ds[0], tokenizer.encode(PROBE_RESPONSE, add_special_tokens=False), tolerance=tolerance,
                     pad_token_id=ids.pad, image_token_id=ids.image_pad, seq_multiple=actor.seq_multiple)


def check_start_checkpoint(path: str | None, hf_dir: Path) -> Path | None:
    """``model.load_checkpoint`` resolved to its checkpoint folder (``None`` when unset), refused (raises
    ``CheckpointError`` / ``ConfigMismatchError``) before any model is built when it is missing or its
    recorded HF config differs from ``hf_dir``'s in an architecture field. Reads metadata only."""
    if not path:
        return None
    from transformers import AutoConfig

    from megatron_vgpo.checkpoint.config_check import check_hf_configs_match
    from megatron_vgpo.checkpoint.dist_checkpoint import read_metadata, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    check_hf_configs_match(read_metadata(ckpt).hf_config, AutoConfig.from_pretrained(str(hf_dir)),
                           expected_name="model.load_checkpoint's HF config", actual_name=f"{hf_dir}",
                           context=f"refusing model.load_checkpoint={path}")
    return ckpt


def _previous_dir(out_dir: Path) -> Path:
    """Where :func:`_export_hf` keeps the previous ``out_dir`` while the new one is renamed into place."""
    return out_dir.with_name(out_dir.name + ".old")


def _write_plots(run_dir: Path) -> list[str]:
    """Rank 0: the run's PNG curves (``tools/plot_run.py``'s function) into ``RUN_DIR/plots``; returns the file
    names. A plotting failure is logged, never fatal: the run's results are already on disk."""
    from megatron_vgpo.trainer.plots import plot_run

    try:
        result = plot_run(run_dir)
    except Exception as err:  # matplotlib or an odd metrics file must not fail a finished run
        logger.warning("could not write the PNG curves (%s: %s)", type(err).__name__, err)
        return []
    logger.info("wrote %d PNG curves to %s", len(result.paths), run_dir / "plots")
    return [path.name for path in result.paths]


def _log_collective_timeouts() -> None:
    """Log the timeouts torch stores for the default group and Megatron's TP and DP groups (read back)."""
    from megatron.core import parallel_state as ps

    from megatron_vgpo.distributed.process_groups import group_timeout_s

    logger.info("collective timeouts (s): default group %s, Megatron TP group %s, DP group %s",
                group_timeout_s(), group_timeout_s(ps.get_tensor_model_parallel_group()),
                group_timeout_s(ps.get_data_parallel_group()))


def _export_hf(actor: Any, template_dir: Path, out_dir: Path, rank0: bool) -> None:
    """Write the actor's weights as an HF folder (tokenizer/processor copied from ``template_dir``), atomically:
    into ``out_dir.tmp``, then swapped in with ``out_dir.old`` holding the previous folder until the new one is
    in place, so a crash always leaves one complete folder (collective)."""
    import shutil

    from megatron_vgpo.actor.weight_export import iter_model_weights_to_rank
    from megatron_vgpo.checkpoint.atomic_files import replace_dir
    from megatron_vgpo.rollout.sync_disk import write_hf_weights_folder

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    weights = iter_model_weights_to_rank(actor.model, actor.hf_config, dst=0)
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        write_hf_weights_folder(weights, tmp, template_dir=template_dir, bucket_bytes=1 << 30)
        replace_dir(tmp, out_dir, _previous_dir(out_dir))
    else:
        for _ in weights:
            pass
    comm.barrier()
