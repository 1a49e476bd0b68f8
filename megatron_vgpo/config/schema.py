"""The run configuration: one tree of typed dataclasses shared by the CLI, YAML files and recipes.

Load with :func:`megatron_vgpo.config.load_config` (YAML file + ``key=value`` overrides). Field docs are
the reference for every YAML key; ``examples/tiny_cpu.yaml`` is the embedded default job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_vgpo.algo.vgpo import VGPOConfig

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Which Qwen2.5-VL checkpoint to train.

    ``hf_dir``: an existing Hugging Face folder (config, safetensors, tokenizer, processor). When it is
    ``null`` the job builds a randomly initialised tiny model (``tiny_preset``/``tiny_seed``/``tokenizer``)
    under ``RUN_DIR/model`` with ``tools/make_tiny_model.py``'s library function.

    ``load_checkpoint``: a Megatron distributed checkpoint (``tools/convert_checkpoint.py import``, or a
    run's ``checkpoints`` root, whose ``latest`` is followed) whose model weights the actor starts from
    instead of the HF folder's (optimizer, schedule and counters start fresh); the rollout engine gets them
    by a weight sync before the first validation. Its recorded configuration must match the HF folder's
    (the job refuses it before training). The HF folder still gives the config, tokenizer and processor. A
    resumed run (``trainer.resume``) restores its own checkpoint instead.

    ``dtype``: the tiny model's saved dtype, the rollout engine's dtype and the Megatron actor's parameter
    dtype (``bfloat16``: Megatron mixed precision, bf16 weights and compute with fp32 gradient buffers and
    fp32 main params + Adam states in the optimizer; ``summary.json`` records ``actor_params_dtype``).
    """

    hf_dir: str | None = None
    load_checkpoint: str | None = None
    tiny_preset: Literal["tiny", "small"] = "tiny"
    tiny_seed: int = 0
    tokenizer: Literal["bpe", "qwen"] = "bpe"
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class SyntheticDataConfig:
    """Generated visual-reasoning problems (``tools/make_synthetic_data.py``) written to ``RUN_DIR/data``."""

    tasks: list[str] = field(default_factory=lambda: ["bar_count_taller"])
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
    """Megatron layout: tensor (``tp``, with sequence parallel ``sp``) x pipeline (``pp``) x data (``dp``).

    The single-process command (``megatron-vgpo train CONFIG``) launches ``tp * pp * dp`` ranks on this
    machine. Under an outside launcher (``torchrun``, ``cluster/torchrun/launch.sh``, NeMo-Run, Slurm) the
    world size decides: it must be a multiple of ``tp * pp``, the quotient is the data-parallel size, and a
    ``dp`` other than 1 must equal it (a mismatch is refused before any rank builds a model).

    ``recompute``: activation recompute of the decoder layers in the training pass (memory for compute;
    results are unchanged): ``none``; ``selective`` (Megatron's selective recompute: core attention is
    recomputed in the backward); ``full`` (each decoder layer keeps only its input and is recomputed,
    ``recompute_method=uniform``, ``recompute_num_layers=1``).
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sp: bool = False
    recompute: Literal["none", "selective", "full"] = "none"

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.dp < 1:
            raise ValueError(f"tp, pp and dp must be >= 1, got tp={self.tp} pp={self.pp} dp={self.dp}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"parallel.recompute must be 'none', 'selective' or 'full', got {self.recompute!r}")
        if self.sp and self.tp == 1:
            raise ValueError("sp (sequence parallel) needs tp > 1")


@dataclass
class ValidationConfig:
    """Greedy evaluation on the held-out split: accuracy of the last ``\\boxed{}`` answer."""

    num_samples: int = 64
    max_new_tokens: int = 64
    batch_size: int = 16


@dataclass
class RolloutConfig:
    """Rollout engine and sampling. ``backend="sglang"`` runs SGLang (in its worker process on CPU); with
    ``fallback_to_hf`` the transformers backend is used when SGLang cannot start. ``engine_kwargs`` go to
    ``sglang.Engine``. Weights reach the engine after every update by ``weight_sync`` in buckets of
    ``sync_bucket_mb``. ``verify_sync_every`` (0: never) checks every N-th sync: the engine and the actor
    score one fixed held-out probe and the run stops if their log-probs differ by more than
    ``verify_sync_tolerance`` (``null``: 2e-3 for float32 models, 1e-1 for bfloat16); metrics
    ``sync/probe_max_abs_diff`` and ``sync/probe_change_from_start``.

    ``backend="sglang_server"`` drives SGLang HTTP servers (``rollout/sglang_server.py``): the ones at
    ``server_urls`` (``http://host:port``, already running, serving the model the job starts from), or, when
    that list is empty, ``num_servers`` servers the job launches itself on 127.0.0.1 (``engine_kwargs`` are
    their ``sglang.launch_server`` options; logs in ``RUN_DIR/sglang_server_<k>.log``; stopped at the end).
    Over HTTP ``weight_sync`` must be ``disk`` (``RUN_DIR/weight_sync``, a folder every server must read) or
    ``distributed`` (a process group to the servers: gloo on CPU, NCCL on GPUs; the servers connect to
    ``sync_master_address``, this host's address as they see it: keep 127.0.0.1 for servers on this host).
    """

    backend: Literal["sglang", "hf", "sglang_server"] = "sglang"
    fallback_to_hf: bool = True
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 2048
    weight_sync: Literal["tensor", "distributed", "disk"] = "tensor"
    sync_bucket_mb: float = 512.0
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    verify_sync_every: int = 0
    verify_sync_tolerance: float | None = None
    server_urls: list[str] = field(default_factory=list)
    num_servers: int = 1
    sync_master_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.verify_sync_every < 0:
            raise ValueError(f"verify_sync_every must be >= 0 (0: never), got {self.verify_sync_every}")
        if self.verify_sync_tolerance is not None and self.verify_sync_tolerance <= 0:
            raise ValueError(f"verify_sync_tolerance must be > 0, got {self.verify_sync_tolerance}")
        if self.backend == "sglang_server" and self.weight_sync == "tensor":
            raise ValueError("rollout.weight_sync=tensor needs a colocated engine; with "
                             "rollout.backend=sglang_server use rollout.weight_sync=disk or distributed")
        if self.num_servers < 1:
            raise ValueError(f"rollout.num_servers must be >= 1, got {self.num_servers}")
        if self.server_urls and self.backend != "sglang_server":
            raise ValueError("rollout.server_urls needs rollout.backend=sglang_server")
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n ({self.n}) and max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if not 0.0 < self.top_p <= 1.0 or self.temperature < 0.0:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p})")


@dataclass
class AlgorithmConfig:
    """Policy optimisation. ``name``: ``grpo`` (group-normalised outcome advantages, PPO clip), ``dapo``
    (+ dynamic sampling and clip-higher, i.e. the settings below), ``vgpo`` (DAPO + VGPO re-weighting with
    ``vgpo``). Switching ``name`` alone changes nothing else, so ``algorithm.name=grpo`` vs ``vgpo`` is a
    controlled comparison; ``grpo`` turns dynamic sampling off unless ``dynamic_sampling`` is set.
    ``max_sampling_rounds`` bounds the rollout batches drawn per step to fill it (``<= 0``: no limit, as
    in DAPO); ``sampling_exhausted`` says what a step does when the rounds run out before
    ``trainer.prompts_per_step`` groups are kept: ``train`` (default) trains on the groups kept so far,
    ``raise`` stops the run with ``DynamicSamplingExhausted``. The filter reads the RAW task score (the
    grader's 0/1 accuracy, before overlong shaping), as DAPO's ``filter_groups.metric=acc`` does. The kept
    groups of a step are always a multiple of ``dp / gcd(rollout.n, dp)`` (``dp``: the data-parallel size),
    so the trajectories split evenly over the DP ranks (surplus groups are dropped, counted in
    ``rollout/dropped_groups``).

    KL to a reference policy (off at ``kl_coef=0``, then no reference model is built): the loss gains
    ``kl_coef * KL_t`` per token, ``KL_t`` the ``kl_estimator`` (``k1``: ``log pi - log ref``; ``k2``:
    ``0.5 (log pi - log ref)^2``; ``k3``: ``ref/pi - log(ref/pi) - 1``, clamped to [-10, 10]) against the
    frozen STARTING policy (the folder the RL phase starts from: the SFT export when SFT ran, else
    ``model.hf_dir``, also after a resume), at the training layout; logged as ``actor/kl_ref``.

    DAPO overlong reward shaping (off when ``overlong_buffer_len`` or ``overlong_penalty_factor`` is 0): a
    response of ``L`` tokens gets ``max(-(L - (L_max - buffer)) / buffer, -1) * factor`` added to its reward
    when ``L > L_max - buffer``, ``L_max = rollout.max_new_tokens``, before the advantages (metrics
    ``rollout/overlong_penalty_mean``, ``rollout/overlong_fraction``). ``overlong_filter``: responses that
    hit ``rollout.max_new_tokens`` without an end token get zero loss weight (their tokens leave the loss and
    its token count; their rewards still count in their group's advantage statistics)."""

    name: Literal["grpo", "dapo", "vgpo"] = "vgpo"
    estimator: Literal["grpo", "drgrpo"] = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 3.0
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    entropy_coef: float = 0.0
    dynamic_sampling: bool | None = None
    accuracy_bounds: tuple[float, float] = (0.01, 0.99)
    max_sampling_rounds: int = 4
    sampling_exhausted: Literal["train", "raise"] = "train"
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    overlong_buffer_len: int = 0
    overlong_penalty_factor: float = 1.0
    overlong_filter: bool = False
    state_position: Literal["own", "producing"] = "own"
    vgpo: VGPOConfig = field(default_factory=VGPOConfig)

    def __post_init__(self) -> None:
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0 (0: no KL term), got {self.kl_coef}")
        if self.overlong_buffer_len < 0 or self.overlong_penalty_factor < 0:
            raise ValueError(f"overlong_buffer_len ({self.overlong_buffer_len}) and overlong_penalty_factor "
                             f"({self.overlong_penalty_factor}) must be >= 0 (0: no overlong shaping)")

    @property
    def uses_dynamic_sampling(self) -> bool:
        return self.name != "grpo" if self.dynamic_sampling is None else self.dynamic_sampling

    @property
    def uses_overlong_shaping(self) -> bool:
        return self.overlong_buffer_len > 0 and self.overlong_penalty_factor > 0


@dataclass
class OptimizerConfig:
    """Adam through Megatron's optimizer (``distributed`` = distributed optimizer).

    The LR schedule counts the optimizer updates actually taken (one per mini-batch that stepped; a skipped
    non-finite update does not count): ``warmup_steps`` is in updates and ``cosine`` decays to ``min_lr`` over
    the planned ``trainer.steps x trainer.mini_batches`` updates. A step that takes fewer updates (too few
    trajectories for ``trainer.mini_batches`` mini-batches, logged as ``actor/mini_batches``) or none leaves
    the schedule that many updates short of its end (``actor/lr_schedule_step`` logs the count).
    """

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    distributed: bool = True


@dataclass
class SFTConfig:
    """Optional supervised warm start on the training answers, so the model can emit ``\\boxed{}`` answers
    before RL. Stops when greedy validation (every ``eval_every`` steps, on ``eval_samples`` held-out prompts)
    reaches ``target_accuracy`` or answers in ``\\boxed{}`` in ``target_boxed_fraction`` of the responses,
    or after ``max_steps``; the result is saved as ``RUN_DIR/sft_model`` (an HF folder) and reused by later
    runs in the same ``run_dir``. Gate on the format (not on accuracy) to leave the task itself to RL."""

    enabled: bool = False
    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine decays to 0 at max_steps
    warmup_steps: int = 50
    target_accuracy: float = 0.35
    target_boxed_fraction: float | None = None  # None: do not stop on the format
    eval_every: int = 100
    eval_samples: int = 64


@dataclass
class TrainerConfig:
    """The RL loop: ``steps`` rollout steps of ``prompts_per_step`` prompts (x ``rollout.n`` samples), each
    followed by ``mini_batches`` optimizer steps; validation every ``val_every`` steps, a checkpoint every
    ``save_every`` steps (0: never); ``resume`` continues from ``RUN_DIR/checkpoints/latest``.
    ``dump_tensors`` writes, every step and on every rank, what the update trained on to
    ``RUN_DIR/dump/step_<k>_rank_<r>.pt`` (rewards, group ids, focus cosines, response mask, advantages):
    for debugging and for the tests that check the loop's wiring; small, but off by default.

    ``collective_timeout_s`` (> 0, seconds): how long any collective may wait before the process groups (the
    default group and Megatron's) abort the job. While rank 0 generates a step's rollouts the other ranks wait
    in one collective for the whole rollout phase, and on the paper's scale (up to 8 dynamic-sampling rounds of
    512 prompts x 8 samples x 2048 tokens) that outlasts torch's and Megatron's 30 minutes; the default, 4 hours,
    covers such a step with room to spare while a truly hung job still ends the same day."""

    steps: int = 0
    prompts_per_step: int = 512
    mini_batches: int = 4
    micro_batch_tokens: int = 16384
    val_every: int = 5
    save_every: int = 5
    resume: bool = True
    dump_tensors: bool = False
    collective_timeout_s: float = 14400.0

    def __post_init__(self) -> None:
        if not self.collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}")


@dataclass
class LoggingConfig:
    """Metrics go to TensorBoard (``RUN_DIR/tb``) and, when ``wandb_project`` is set, to W&B.
    ``rollout_dump``: rank 0 appends each step's kept groups (uid, prompt index, raw scores, shaped rewards,
    response lengths, truncation) as one JSON line to ``RUN_DIR/rollouts.jsonl`` (a debugging aid)."""

    tensorboard: bool = True
    wandb_project: str | None = None
    rollout_dump: bool = False
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
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        """Checks that span sections (each section checks its own fields)."""
        opt, sft = self.optimizer, self.sft
        updates = self.trainer.steps * self.trainer.mini_batches
        if opt.lr_schedule == "cosine" and 0 < updates <= opt.warmup_steps:
            # a short run of a long recipe (e.g. trainer.steps=3 for a smoke test): warm up over all but the
            # last update instead of refusing; the resolved value is what RUN_DIR/config.yaml records
            capped = updates - 1
            logger.warning("optimizer.warmup_steps=%d capped at %d: the cosine schedule has only trainer.steps x "
                           "trainer.mini_batches = %d updates", opt.warmup_steps, capped, updates)
            opt.warmup_steps = capped
        if self.algorithm.overlong_buffer_len > self.rollout.max_new_tokens:
            raise ValueError(f"algorithm.overlong_buffer_len ({self.algorithm.overlong_buffer_len}) must be <= "
                             f"rollout.max_new_tokens ({self.rollout.max_new_tokens})")
        if sft.enabled and sft.lr_schedule == "cosine" and sft.max_steps <= sft.warmup_steps:
            raise ValueError(f"sft.lr_schedule=cosine decays over sft.max_steps ({sft.max_steps}), which must "
                             f"exceed sft.warmup_steps ({sft.warmup_steps})")
