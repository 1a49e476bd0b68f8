"""Engines and start checkpoints selected by config, in real runs (issue 11 item 10).

* ``rollout.backend=sglang_server``: the job launches its own SGLang HTTP server (127.0.0.1), generates
  through it and syncs weights into it (disk in one run, distributed/gloo in the other).
* ``model.load_checkpoint``: the actor starts from a Megatron checkpoint (imported with
  ``tools/convert_checkpoint.py import``) whose weights differ from the HF folder's.

Reference: a run whose HF folder IS the checkpoint's model. Run B (HF folder = base model, start checkpoint =
the perturbed model) must reproduce run A (HF folder = the perturbed model) step for step: the validation
before RL (greedy decoding by the server after the start sync), the sampled rollouts and every actor metric
of the RL step. Without the checkpoint load (or without the sync into the server) B would train and decode
the base model, whose metrics differ.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMALL = ["sft.enabled=false", "optimizer.lr_schedule=constant", "optimizer.warmup_steps=0", "data.synthetic.num=40",
         "validation.num_samples=4", "validation.max_new_tokens=6", "trainer.prompts_per_step=2",
         "trainer.mini_batches=1", "rollout.n=2", "rollout.max_new_tokens=6", "algorithm.dynamic_sampling=false",
         "optimizer.lr=1e-3", "trainer.val_every=0", "trainer.save_every=0", "trainer.steps=1",
         "parallel.tp=1", "parallel.sp=false", "rollout.backend=sglang_server", "rollout.fallback_to_hf=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "megatron_vgpo.train", str(REPO / "examples/tiny_cpu.yaml"),
               f"run_dir={run_dir}", *SMALL, *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=_env())


def _perturbed_copy(base_dir: Path, out_dir: Path, seed: int) -> Path:
    """``base_dir`` with every weight moved by N(0, 0.05^2) noise; tokenizer and processor files unchanged."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out_dir)
    for item in base_dir.iterdir():
        if item.is_file() and not (out_dir / item.name).exists():
            shutil.copy(item, out_dir / item.name)
    return out_dir


def _import(hf_dir: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, str(REPO / "tools/convert_checkpoint.py"), "import", "--hf-dir",
                           str(hf_dir), "--out", str(out), "--tp", "1"], capture_output=True, text=True,
                          timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _step_record(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if "actor/steps" in r)


@pytest.mark.slow
def test_start_checkpoint_and_launched_sglang_server(tmp_path: Path, tiny_hf_dir: Path, small_hf_dir: Path):
    other = _perturbed_copy(tiny_hf_dir, tmp_path / "other_hf", seed=7)
    ckpt = _import(other, tmp_path / "other_ckpt")

    proc = _train(tmp_path / "a", f"model.hf_dir={other}", "rollout.weight_sync=disk")
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _train(tmp_path / "b", f"model.hf_dir={tiny_hf_dir}", f"model.load_checkpoint={ckpt}",
                  "rollout.weight_sync=distributed")
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("a", "b"))
    assert a["rollout_backend"] == b["rollout_backend"] == "SGLangServerEngine"
    assert a["load_checkpoint"] is None and b["load_checkpoint"].startswith(str(ckpt))
    assert (tmp_path / "a/sglang_server_0.log").is_file() and (tmp_path / "a/weight_sync").is_dir()
    before = [json.loads((tmp_path / r / "val_before.json").read_text())["metrics"] for r in ("a", "b")]
    assert before[0] == before[1]
    step_a, step_b = _step_record(tmp_path / "a"), _step_record(tmp_path / "b")
    compared = [k for k in step_a if k.startswith(("actor/", "rollout/", "vgpo/", "focus/"))
                and k not in ("actor/grad_norm",) and isinstance(step_a[k], float)]
    assert "actor/entropy" in compared or "actor/pg_loss" in compared, sorted(step_a)
    for key in compared:
        assert math.isclose(step_a[key], step_b[key], rel_tol=1e-5, abs_tol=1e-6), (key, step_a[key], step_b[key])
    assert math.isclose(step_a["actor/grad_norm"], step_b["actor/grad_norm"], rel_tol=1e-4)
    # the servers the jobs launched are gone with them
    models = (str(other), str(tiny_hf_dir))
    assert not [p for p in _process_lines() if "sglang.launch_server" in p and any(m in p for m in models)]

    # a checkpoint whose recorded config differs from the model folder's is refused before any model is built
    proc = _train(tmp_path / "c", f"model.hf_dir={small_hf_dir}", f"model.load_checkpoint={ckpt}",
                  "rollout.weight_sync=disk")
    assert proc.returncode != 0 and "refusing model.load_checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "c/val_before.json").exists() and not (tmp_path / "c/summary.json").exists()
    assert not (tmp_path / "c/sglang_server_0.log").exists()


def _process_lines() -> list[str]:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()


def test_config_refuses_what_the_http_engine_cannot_do(tmp_path: Path, tiny_hf_dir: Path):
    from megatron_vgpo.checkpoint.dist_checkpoint import CheckpointError
    from megatron_vgpo.config import ConfigError, load_config
    from megatron_vgpo.trainer.job import check_start_checkpoint

    base = REPO / "examples/tiny_cpu.yaml"
    with pytest.raises(ConfigError, match=r"rollout\.weight_sync=tensor needs a colocated engine"):
        load_config(base, ["rollout.backend=sglang_server", "rollout.weight_sync=tensor"])
    with pytest.raises(ConfigError, match=r"rollout\.server_urls needs rollout\.backend=sglang_server"):
        load_config(base, ["rollout.server_urls=[http://127.0.0.1:1]"])
    cfg = load_config(base, ["rollout.backend=sglang_server", "rollout.weight_sync=disk"])
    assert cfg.rollout.server_urls == [] and cfg.rollout.num_servers == 1
    assert check_start_checkpoint(None, tiny_hf_dir) is None
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        check_start_checkpoint(str(tmp_path), tiny_hf_dir)
