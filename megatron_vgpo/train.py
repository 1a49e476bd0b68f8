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
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from megatron_vgpo.config import TrainConfig, load_config, to_dict

logger = logging.getLogger("megatron_vgpo.train")


def _setup_logging(level: str, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr),
                                       logging.FileHandler(run_dir / "train.log")]
    logging.basicConfig(level=getattr(logging, level), handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run(cfg: TrainConfig) -> dict:
    """Run the job described by ``cfg``; returns the summary (also written to ``RUN_DIR/summary.json``)."""
    import torch
    from transformers import AutoProcessor

    from megatron_vgpo.data import DatasetColumns, PromptDataset
    from megatron_vgpo.reward import RewardGrader
    from megatron_vgpo.rollout.hf_backend import HFRolloutEngine
    from megatron_vgpo.trainer.evaluate import evaluate_greedy
    from megatron_vgpo.trainer.metrics import MetricsLogger
    from megatron_vgpo.trainer.prepare import prepare_data, prepare_model

    started = time.monotonic()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(cfg.seed)

    hf_dir = prepare_model(cfg.model, run_dir)
    train_files, val_files = prepare_data(cfg.data, run_dir)
    processor = AutoProcessor.from_pretrained(hf_dir)
    columns = DatasetColumns(prompt=cfg.data.prompt_key, answer=cfg.data.answer_key, images=cfg.data.image_key)
    datasets = {
        split: PromptDataset(files, processor, columns, max_prompt_length=cfg.data.max_prompt_length,
                             min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                             on_bad_row=cfg.data.on_bad_row)
        for split, files in (("train", train_files), ("val", val_files))
    }
    for split, ds in datasets.items():
        logger.info("%s: %d usable prompts of %d rows (skipped: %s)", split, len(ds), ds.num_rows_read,
                    dict(ds.skipped) or "none")

    parity = megatron_parity_check(hf_dir, cfg)

    val = datasets["val"]
    val_samples = [val[i] for i in range(min(cfg.validation.num_samples, len(val)))]
    dtype = torch.float32 if cfg.model.dtype == "float32" else torch.bfloat16
    engine = HFRolloutEngine(hf_dir, dtype=dtype)
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
        "val_accuracy_after": result.accuracy,  # no training steps in this release
        "steps": 0,
        "wall_seconds": round(time.monotonic() - started, 2),
        "model_dir": str(hf_dir),
        "train_prompts": len(datasets["train"]),
        "val_prompts": len(val),
        "skipped_rows": {split: dict(ds.skipped) for split, ds in datasets.items()},
        "val_boxed_fraction": result.boxed_fraction,
        "megatron_parity": parity,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("wrote %s", run_dir / "summary.json")
    return summary


PARITY_TOLERANCE = 1e-4  # fp32 max abs diff of logits and final-norm hidden states


def megatron_parity_check(hf_dir: Path, cfg: TrainConfig) -> dict:
    """Launch ``tp * pp`` ranks that load ``hf_dir`` into the Megatron model at the configured layout and
    compare its logits and final-norm hidden states with transformers' on a batch with images.

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
    results = run_on_ranks(parity_rank_body, par.tp * par.pp, args=(str(hf_dir), [(par.tp, par.pp, par.sp)]),
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
    parser = argparse.ArgumentParser(prog="megatron-vgpo train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. examples/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/x parallel.tp=2")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    _setup_logging(cfg.logging.level, Path(cfg.run_dir))
    summary = run(cfg)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
