"""Weight sync from the Megatron actor into real engines (the contract tool ``tools/check_weight_sync.py``).

One launch with SGLang (worker process) and a TP2 actor runs every transport on the same engine; one launch
with the transformers engine and a TP2xPP2 actor covers streaming the stages to rank 0. Each transport is
checked both ways: before the sync the engine's logprobs on its own greedy tokens are far from the
perturbed actor's, after the sync they match (1e-4 text, 2e-3 with an image).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_vgpo.trainer.weight_sync_check import IMAGE_TOLERANCE, STALE_FACTOR, TEXT_TOLERANCE

TOOL = Path(__file__).resolve().parents[1] / "tools" / "check_weight_sync.py"


def _tool_main():
    spec = importlib.util.spec_from_file_location("check_weight_sync", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _check(report: dict, transports: list[str]) -> None:
    assert list(report["transports"]) == transports
    for name, entry in report["transports"].items():
        assert entry["gap_after"]["text"] < TEXT_TOLERANCE, (name, entry)
        assert entry["gap_after"]["image"] < IMAGE_TOLERANCE, (name, entry)
        assert entry["gap_before"]["text"] > STALE_FACTOR * TEXT_TOLERANCE, (name, entry)
        assert entry["gap_before"]["image"] > STALE_FACTOR * IMAGE_TOLERANCE, (name, entry)
        assert entry["bytes"] > 2_000_000  # the whole tiny model (0.57M fp32 parameters) moved


@pytest.mark.slow
@pytest.mark.multirank
def test_sglang_every_transport_from_tp2_actor(tiny_hf_dir: Path, tmp_path: Path):
    out = tmp_path / "report.json"
    status = _tool_main()(["--hf-dir", str(tiny_hf_dir), "--engine", "sglang", "--tp", "2", "--pp", "1",
                           "--transport", "tensor,distributed,disk", "--bucket-mb", "0.5", "--json", str(out)])
    assert status == 0
    _check(json.loads(out.read_text()), ["tensor", "distributed", "disk"])


@pytest.mark.multirank
def test_hf_engine_from_tp2_pp2_actor(tiny_hf_dir: Path, tmp_path: Path):
    out = tmp_path / "report.json"
    status = _tool_main()(["--hf-dir", str(tiny_hf_dir), "--engine", "hf", "--tp", "2", "--pp", "2",
                           "--json", str(out)])
    assert status == 0
    _check(json.loads(out.read_text()), ["in-process"])
