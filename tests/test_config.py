"""Typed config: YAML + overrides build the dataclass tree; bad keys and values are named in errors."""

from pathlib import Path

import pytest

from megatron_vgpo.config import ConfigError, TrainConfig, apply_overrides, load_config, to_dict
from megatron_vgpo.trainer.metrics import MetricsLogger, read_metrics


def test_yaml_and_overrides_build_typed_config(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\nparallel: {tp: 2}\ndata:\n  synthetic: {num: 50}\n")
    cfg = load_config(path, ["parallel.sp=true", "data.synthetic.test_fraction=0.25", "seed=7",
                             "data.train_files=[a.parquet]", "data.val_files=[b.parquet]"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.parallel.tp, cfg.parallel.sp, cfg.seed) == (2, True, 7)
    assert cfg.data.synthetic.num == 50 and cfg.data.synthetic.test_fraction == 0.25
    assert cfg.data.train_files == ["a.parquet"]
    # ints are accepted where floats are expected, and the dict dump round-trips
    assert load_config(None, ["validation.num_samples=3"]) \
        .validation.num_samples == 3
    from megatron_vgpo.config.loader import build

    assert build(TrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tpp=2"], "unknown key parallel.tpp"),
        (["nope=1"], "unknown key nope"),
        (["parallel.tp=two"], "parallel.tp: expected an integer"),
        (["parallel.sp=yes please"], "parallel.sp: expected true/false"),
        (["parallel.sp=true"], "parallel: sp (sequence parallel) needs tp > 1"),
        (["data.on_bad_row=drop"], "data.on_bad_row: expected one of ['skip', 'raise']"),
        (["data.synthetic.num=1"], "data.synthetic: synthetic.num must be >= 2"),
        (["data.train_files=[a.parquet]"], "give both train_files and val_files"),
        (["parallel=3"], "parallel: expected a mapping"),
        (["parallel.tp.x=3"], "parallel.tp: expected an integer"),
        (["parallel.tp=2", "parallel.tp.x=3"], "parallel.tp is not a section"),
        (["justakey"], "not of the form key=value"),
        (["sft.enabled=true", "sft.lr_schedule=cosine", "sft.max_steps=5"],
         "sft.max_steps (5), which must exceed sft.warmup_steps (50)"),
        (["trainer.collective_timeout_s=0"], "trainer: collective_timeout_s must be > 0 seconds, got 0"),
        (["trainer.collective_timeout_s=-5"], "trainer: collective_timeout_s must be > 0 seconds, got -5"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_cosine_warmup_longer_than_a_short_run_is_capped():
    """``trainer.steps=3`` of a recipe with a 10-update warm-up: the warm-up ends before the last update."""
    cfg = load_config(None, ["optimizer.lr_schedule=cosine", "trainer.steps=3", "trainer.mini_batches=1",
                             "optimizer.warmup_steps=10"])
    assert cfg.optimizer.warmup_steps == 2
    assert load_config(None, ["optimizer.lr_schedule=cosine", "trainer.steps=30",
                              "optimizer.warmup_steps=10"]).optimizer.warmup_steps == 10


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    for text in ("", "# only a comment\n", "---\n"):  # an empty document is a wrong or truncated file
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(ConfigError, match=r"empty\.yaml: the config file is empty"):
            load_config(empty)


def test_overrides_do_not_mutate_input():
    data = {"parallel": {"tp": 1}}
    out = apply_overrides(data, ["parallel.tp=4"])
    assert data == {"parallel": {"tp": 1}} and out == {"parallel": {"tp": 4}}


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path: Path):
    with MetricsLogger(tmp_path, tensorboard=True) as m:
        m.log(0, {"reward/mean": 0.25, "loss": float("nan")})
        m.log(1, {"reward/mean": 0.5})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    assert records[0]["reward/mean"] == 0.25 and records[0]["loss"] is None
    assert any((tmp_path / "tb").iterdir())
    silent = MetricsLogger(tmp_path / "other", enabled=False)
    silent.log(0, {"x": 1.0})
    assert not (tmp_path / "other").exists()
