"""``benchmarks/gpu_check.py --smoke`` on the CPU: the GPU check (bf16 actor train step, log-prob pass, VGPO
factors, weight export) runs end to end on tiny shapes, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_on_cpu(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bf16 train step" in proc.stdout and "weight export" in proc.stdout and "MFU" in proc.stdout
    r = json.loads(out.read_text())
    assert r["smoke"] and r["device"] == "cpu"
    for key in ("train", "logprob"):
        assert r[key]["tokens_per_s"] > 0 and math.isfinite(r[key]["mfu"])
    assert r["tokens"] == 4 * 32 and r["train"]["micro_batches"] == 2
    assert r["vgpo"]["fraction_of_step"] > 0 and r["export"]["gb_per_s"] > 0
    # the exported bytes are the bf16 weights: 2 bytes per HF parameter
    assert round(r["export"]["gbytes"] * 1e9) == 2 * r["hf_params"]
