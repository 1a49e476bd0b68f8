"""The main job end to end (the README's first command, shrunk), and the evaluator against a direct
transformers + reward reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EVAL_ONLY = ["sft.enabled=false", "trainer.steps=0"]  # the default job's evaluation-only form (no actor)


def test_default_job_runs_and_writes_summary(tmp_path: Path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "megatron_vgpo.train", str(REPO / "examples/tiny_cpu.yaml"),
               f"run_dir={run_dir}", "data.synthetic.num=40", "validation.num_samples=6",
               "validation.max_new_tokens=6", "validation.batch_size=4", *EVAL_ONLY]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("val_accuracy_before", "val_accuracy_after", "steps", "wall_seconds"):
        assert key in summary
    assert 0.0 <= summary["val_accuracy_before"] <= 1.0
    assert summary["train_prompts"] == 36 and summary["val_prompts"] == 4
    assert summary["skipped_rows"] == {"train": {}, "val": {}}
    parity = summary["megatron_parity"]  # the default layout (TP2 + SP) against transformers
    assert parity["layout"] == "tp2_pp1_sp" and parity["rope_ids_equal"]
    assert parity["logits_max_abs_diff"] < 1e-4 and parity["final_hidden_max_abs_diff"] < 1e-4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["val/accuracy"] == summary["val_accuracy_before"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "model/config.json").is_file()

    # a second run reuses the model and data, and a bad override is refused naming the key
    bad = subprocess.run([*command[:4], f"run_dir={run_dir}", "validation.num_sample=3"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode != 0 and "unknown key validation.num_sample" in bad.stderr


def test_job_under_torchrun_two_ranks(tmp_path: Path):
    """``torchrun --nproc-per-node 2``: rank 0 prepares, both ranks run the TP2 check, rank 0 summarizes."""
    run_dir = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m",
               "megatron_vgpo.train", str(REPO / "examples/tiny_cpu.yaml"), f"run_dir={run_dir}",
               "data.synthetic.num=20", "validation.num_samples=2", "validation.max_new_tokens=3", *EVAL_ONLY]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["megatron_parity"]["layout"] == "tp2_pp1_sp"
    assert summary["megatron_parity"]["logits_max_abs_diff"] < 1e-4
    assert summary["val_prompts"] == 2 and summary["train_prompts"] == 18


def _free_port() -> int:
    from megatron_vgpo.distributed.multiprocess import find_free_port

    return find_free_port()


def test_job_reports_skipped_rows(tmp_path: Path):
    from megatron_vgpo.config import load_config
    from megatron_vgpo.data.synthetic import make_synthetic_splits
    from megatron_vgpo.train import run

    paths = make_synthetic_splits(tmp_path / "data", 30, seed=3, test_fraction=0.2)
    table = pq.read_table(paths["train"]).to_pylist()
    table[0]["images"] = [{"bytes": b"not an image", "path": None}]
    table[1]["problem"] = table[1]["problem"] + " <image>"  # two placeholders, one image
    import pyarrow as pa

    broken = tmp_path / "data/broken.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(paths["train"])), broken)
    cfg = load_config(REPO / "examples/tiny_cpu.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.train_files=[{broken}]", f"data.val_files=[{paths['test']}]",
        "validation.num_samples=2", "validation.max_new_tokens=4", "parallel.tp=1", "parallel.sp=false", *EVAL_ONLY])
    summary = run(cfg)
    assert summary["train_prompts"] == len(table) - 2
    assert sum(summary["skipped_rows"]["train"].values()) == 2


def test_evaluator_matches_direct_generate_and_grading(tiny_hf_dir: Path, tmp_path: Path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from megatron_vgpo.data import PromptDataset
    from megatron_vgpo.data.synthetic import make_synthetic_splits
    from megatron_vgpo.reward import RewardGrader, score
    from megatron_vgpo.rollout.hf_backend import HFRolloutEngine
    from megatron_vgpo.trainer.evaluate import evaluate_greedy

    paths = make_synthetic_splits(tmp_path, 12, seed=5, test_fraction=0.5)
    processor = AutoProcessor.from_pretrained(tiny_hf_dir)
    samples = [s for s in PromptDataset([paths["test"]], processor)]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    texts = []
    for s in samples:
        inputs = processor(text=[s.prompt_text], images=s.images, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=5)
        response_ids = out[0, inputs["input_ids"].shape[1] :]
        texts.append(processor.tokenizer.decode(response_ids, skip_special_tokens=True))
    expected = sum(score(t, s.answer) for t, s in zip(texts, samples)) / len(samples)

    engine = HFRolloutEngine(tiny_hf_dir)
    with RewardGrader(num_workers=1, timeout_s=10.0) as grader:
        decode = lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        result = evaluate_greedy(engine, samples, decode, grader, max_new_tokens=5, batch_size=4)
    assert result.num_samples == len(samples)
    assert result.accuracy == pytest.approx(expected)
    assert result.responses == texts
    assert result.rewards == [score(t, s.answer) for t, s in zip(texts, samples)]
