"""Everything a run needs on disk before training: the model folder and the parquet data.

Both steps are idempotent: a generated tiny model or synthetic dataset is reused when the recorded
parameters match the config, and rebuilt when they do not (so changing ``data.synthetic.num`` never
silently reuses stale data). User-provided folders and files are checked, never modified.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megatron_vgpo.config.schema import DataConfig, ModelConfig

logger = logging.getLogger(__name__)

_SYNTHETIC_RECORD = "synthetic_data.json"


def prepare_model(cfg: ModelConfig, run_dir: Path) -> Path:
    """Return the HF model folder: ``cfg.hf_dir`` (checked) or a tiny model built under ``run_dir/model``."""
    if cfg.hf_dir is not None:
        hf_dir = Path(cfg.hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise FileNotFoundError(f"model.hf_dir={hf_dir}: no config.json there (expected a Hugging Face "
                                    "Qwen2.5-VL folder with config, safetensors, tokenizer and processor)")
        return hf_dir
    from megatron_vgpo.models.tiny_qwen2_5_vl import BUILD_INFO_FILE, build_tiny_checkpoint

    out = run_dir / "model"
    wanted = {"preset": cfg.tiny_preset, "seed": cfg.tiny_seed, "tokenizer": cfg.tokenizer, "dtype": cfg.dtype}
    info_path = out / BUILD_INFO_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if all(info.get(k) == v for k, v in wanted.items()):
            logger.info("reusing tiny model %s (%s)", out, wanted)
            return out
    logger.info("building tiny Qwen2.5-VL model in %s (%s)", out, wanted)
    return build_tiny_checkpoint(out, preset=cfg.tiny_preset, seed=cfg.tiny_seed, tokenizer=cfg.tokenizer,
                                 dtype=cfg.dtype, overwrite=True)


def prepare_data(cfg: DataConfig, run_dir: Path) -> tuple[list[Path], list[Path]]:
    """Return (train parquet files, validation parquet files): the configured files (checked to exist)
    or synthetic splits generated under ``run_dir/data``."""
    if cfg.train_files:
        files = [Path(p) for p in [*cfg.train_files, *cfg.val_files]]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"data files not found: {missing}")
        return [Path(p) for p in cfg.train_files], [Path(p) for p in cfg.val_files]
    from megatron_vgpo.data.synthetic import make_synthetic_splits

    out = run_dir / "data"
    record = asdict(cfg.synthetic)
    record_path = out / _SYNTHETIC_RECORD
    train, test = out / "train.parquet", out / "test.parquet"
    reusable = record_path.is_file() and train.is_file() and test.is_file()
    if reusable and json.loads(record_path.read_text()) == record:
        logger.info("reusing synthetic data in %s", out)
        return [train], [test]
    syn = cfg.synthetic
    logger.info("generating %d synthetic examples (%s, %s) in %s", syn.num, syn.tasks, syn.difficulty, out)
    paths = make_synthetic_splits(out, syn.num, syn.seed, tuple(syn.tasks), syn.difficulty, syn.test_fraction,
                                  syn.image_size)
    record_path.write_text(json.dumps(record, indent=1))
    return [paths["train"]], [paths["test"]]


def load_datasets(cfg: DataConfig, processor: Any, train_files: list[Path], val_files: list[Path]) -> dict:
    """``{"train": PromptDataset, "val": PromptDataset}`` with the configured columns, limits and bad-row
    policy; logs how many rows each kept and why others were skipped."""
    from megatron_vgpo.data import DatasetColumns, PromptDataset

    columns = DatasetColumns(prompt=cfg.prompt_key, answer=cfg.answer_key, images=cfg.image_key)
    datasets = {
        split: PromptDataset(files, processor, columns, max_prompt_length=cfg.max_prompt_length,
                             min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, on_bad_row=cfg.on_bad_row)
        for split, files in (("train", train_files), ("val", val_files))
    }
    for split, ds in datasets.items():
        logger.info("%s: %d usable prompts of %d rows (skipped: %s)", split, len(ds), ds.num_rows_read,
                    dict(ds.skipped) or "none")
    return datasets
