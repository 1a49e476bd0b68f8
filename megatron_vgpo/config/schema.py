"""The run configuration: one tree of typed dataclasses shared by the CLI, YAML files and recipes.

Load with :func:`megatron_vgpo.config.load_config` (YAML file + ``key=value`` overrides). Field docs are
the reference for every YAML key; ``examples/tiny_cpu.yaml`` is the embedded default job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """Which Qwen2.5-VL checkpoint to train.

    ``hf_dir``: an existing Hugging Face folder (config, safetensors, tokenizer, processor). When it is
    ``null`` the job builds a randomly initialised tiny model (``tiny_preset``/``tiny_seed``/``tokenizer``)
    under ``RUN_DIR/model`` with ``tools/make_tiny_model.py``'s library function.
    """

    hf_dir: str | None = None
    tiny_preset: Literal["tiny", "small"] = "tiny"
    tiny_seed: int = 0
    tokenizer: Literal["bpe", "qwen"] = "bpe"
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class SyntheticDataConfig:
    """Generated visual-reasoning problems (``tools/make_synthetic_data.py``) written to ``RUN_DIR/data``."""

    tasks: list[str] = field(default_factory=lambda: ["count_red"])
    num: int = 2000
    test_fraction: float = 0.1
    seed: int = 0
    difficulty: Literal["easy", "medium", "hard"] = "medium"
    image_size: int = 84

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("synthetic.tasks must name at least one task")
        if self.num < 2:
            raise ValueError(f"synthetic.num must be >= 2, got {self.num}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"synthetic.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class DataConfig:
    """Parquet datasets (ViRL39K/Geo3K/MMK12 schema) or generated data.

    ``train_files``/``val_files`` are parquet paths; when both are empty, ``synthetic`` data is generated.
    Column names are configurable; bad rows are skipped (and counted) or raise, per ``on_bad_row``.
    ``min_pixels``/``max_pixels`` bound each image's pixel count before the processor sees it (``null``: the
    processor's own bounds, from the model folder). ``max_prompt_length`` counts tokens after image
    expansion.
    """

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    max_prompt_length: int = 512
    min_pixels: int | None = None
    max_pixels: int | None = None
    on_bad_row: Literal["skip", "raise"] = "skip"

    def __post_init__(self) -> None:
        if bool(self.train_files) != bool(self.val_files):
            raise ValueError("give both train_files and val_files, or neither (then synthetic data is used)")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")


@dataclass
class ParallelConfig:
    """Megatron layout: tensor (``tp``, with sequence parallel ``sp``) x pipeline (``pp``) x data (rest)."""

    tp: int = 1
    pp: int = 1
    sp: bool = False

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")
        if self.sp and self.tp == 1:
            raise ValueError("sp (sequence parallel) needs tp > 1")


@dataclass
class ValidationConfig:
    """Greedy evaluation on the held-out split: accuracy of the last ``\\boxed{}`` answer."""

    num_samples: int = 64
    max_new_tokens: int = 64
    batch_size: int = 16


@dataclass
class LoggingConfig:
    """Metrics go to TensorBoard (``RUN_DIR/tb``) and, when ``wandb_project`` is set, to W&B."""

    tensorboard: bool = True
    wandb_project: str | None = None
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@dataclass
class TrainConfig:
    """A run. ``run_dir`` receives the model, data, logs, checkpoints and ``summary.json``."""

    run_dir: str = "runs/default"
    seed: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
