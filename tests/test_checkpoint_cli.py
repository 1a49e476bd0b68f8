"""tools/convert_checkpoint.py end to end: exact roundtrips across layouts, transformers parity, refusals.

The reference for "exact" is the source HF folder itself: every tensor of the exported folder must equal
the source tensor bit for bit (the CLI's own per-tensor table is also checked for its exit status), and the
exported folder must give transformers the same logits as the source folder.

Launch budget: three roundtrips (6 launches of 1-4 ranks). Refusals happen before any rank starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_checkpoint.py"


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _main(*args: str) -> int:
    """The CLI's ``main`` in this process (for refusals, which happen before any rank is launched)."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_exact(source: Path, exported: Path) -> None:
    a, b = _state(source), _state(exported)
    tied = json.loads((source / "config.json").read_text()).get("tie_word_embeddings", False)
    expected_names = set(a) - ({"lm_head.weight"} if tied else set())
    assert set(b) == expected_names, (sorted(set(b) ^ expected_names))
    for name in b:
        assert torch.equal(a[name], b[name]), name


def _roundtrip(source: Path, work: Path, tp: int, pp: int, etp: int, epp: int) -> subprocess.CompletedProcess:
    return _cli("roundtrip", "--hf-dir", str(source), "--tp", str(tp), "--pp", str(pp),
                "--export-tp", str(etp), "--export-pp", str(epp), "--work-dir", str(work))


def _check_roundtrip(res: subprocess.CompletedProcess, source: Path, work: Path, tp: int, pp: int) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "0 problem(s): exact" in res.stdout
    assert "visual.patch_embed.proj.weight" in res.stdout and "model.layers.0.mlp.gate_proj.weight" in res.stdout
    _assert_exact(source, work / "hf_export")
    meta = json.loads((work / "megatron_ckpt" / "iter_0000000" / "vgpo_checkpoint.json").read_text())
    assert (meta["layout"]["tp"], meta["layout"]["pp"]) == (tp, pp)
    assert meta["hf_source_dir"] == str(source.resolve())
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        if (source / name).exists():
            assert (work / "hf_export" / name).read_bytes() == (source / name).read_bytes(), name


TINY_ROUNDTRIPS = [(1, 1, 2, 2), (2, 1, 1, 1)]  # (import tp, pp, export tp, pp): tied embeddings


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("case", TINY_ROUNDTRIPS, ids=[f"tp{a}pp{b}-to-tp{c}pp{d}" for a, b, c, d in TINY_ROUNDTRIPS])
def test_tiny_roundtrip_exact_across_layouts(case, tiny_hf_dir, tmp_path):
    tp, pp, etp, epp = case
    work = tmp_path / "work"
    _check_roundtrip(_roundtrip(tiny_hf_dir, work, tp, pp, etp, epp), tiny_hf_dir, work, tp, pp)


@pytest.fixture(scope="module")
def small_roundtrip(small_hf_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The small (untied, GQA 3) model imported at TP2 x PP2 and exported at TP1 x PP2 (one file per stage
    plus ``model.safetensors.index.json``)."""
    work = tmp_path_factory.mktemp("small_roundtrip")
    return _roundtrip(small_hf_dir, work, 2, 2, 1, 2), work


@pytest.mark.multirank
@pytest.mark.slow
def test_small_roundtrip_exact_and_same_logits_in_transformers(small_roundtrip, small_hf_dir):
    res, work = small_roundtrip
    _check_roundtrip(res, small_hf_dir, work, 2, 2)
    index = json.loads((work / "hf_export" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    _assert_same_logits(small_hf_dir, work / "hf_export")


def _assert_same_logits(source: Path, exported: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(exported)
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    for x in range(20, 60):
        for y in range(30, 90):
            image.putpixel((x, y), (20, 160, 40))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    logits = []
    for folder in (source, exported):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    assert logits[0].shape[1] == inputs["input_ids"].shape[1]
    assert torch.equal(logits[0], logits[1])


def test_import_refuses_folder_whose_tensors_do_not_match_config(tiny_hf_dir, tmp_path, capsys):
    bad = tmp_path / "bad_hf"
    shutil.copytree(tiny_hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    text["intermediate_size"] = text["intermediate_size"] * 2
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ckpt"
    assert _main("import", "--hf-dir", str(bad), "--out", str(out), "--tp", "1", "--pp", "1") == 2
    err = capsys.readouterr().err
    assert "do not match config.json" in err and "mlp.gate_proj.weight" in err, err
    assert not out.exists()


def test_import_refuses_layout_the_model_cannot_take(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    kv = json.loads((tiny_hf_dir / "config.json").read_text())
    kv = kv.get("text_config", kv)["num_key_value_heads"]
    assert _main("import", "--hf-dir", str(tiny_hf_dir), "--out", str(out), "--tp", str(kv * 2), "--pp", "1") == 2
    assert "num_key_value_heads" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.multirank
@pytest.mark.slow
def test_export_refuses_checkpoint_of_another_config(small_roundtrip, tiny_hf_dir, small_hf_dir, tmp_path, capsys):
    res, work = small_roundtrip
    assert res.returncode == 0
    ckpt = work / "megatron_ckpt"
    out = tmp_path / "export"
    assert _main("export", "--ckpt", str(ckpt), "--out", str(out), "--hf-config", str(tiny_hf_dir)) == 2
    err = capsys.readouterr().err
    assert "refusing to export" in err and "text.hidden_size" in err, err
    assert not out.exists()
    assert _main("export", "--ckpt", str(ckpt), "--out", str(out), "--hf-config", str(small_hf_dir),
                 "--tp", "3") == 2
    assert "TP=3" in capsys.readouterr().err
    assert not out.exists()
