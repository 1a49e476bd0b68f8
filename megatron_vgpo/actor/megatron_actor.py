"""The RL actor on Megatron-Core: Qwen2.5-VL under DDP + the Megatron optimizer, driven by its schedules.

:class:`MegatronActor` is built on every rank after ``init_model_parallel(tp, pp)``. What each rank does:

* every rank holds its TP/PP shard of the model (``Qwen2_5_VLModel`` wrapped in Megatron DDP) and gets the
  SAME :class:`~megatron_vgpo.actor.rl_batch.RLBatch` as the other ranks of its model-parallel group
  (TP x PP); different DP ranks get different trajectories
  (:func:`~megatron_vgpo.actor.rl_batch.shard_for_data_parallel`).
* :meth:`MegatronActor.compute_log_probs` -- a no-grad pass through Megatron's pipeline schedule
  (``forward_only=True``), micro-batched by a token budget. On the last stage each micro-batch's
  vocab-parallel logits give per-token log-probs and entropy (:mod:`.logprobs`, chunked, reduced over TP),
  and, with ``with_focus``, the captured final-norm states give the VGPO focus cosines
  (``sharded_focus_cosines`` under sequence parallelism, ``focus_cosines`` otherwise; hidden states are never
  gathered). The [B, R] results are broadcast from the last stage over the PP group: EVERY rank returns them.
* :meth:`MegatronActor.train_step` -- for each mini-batch (an optimizer step): micro-batches by token
  budget (:mod:`.batching`), the clipped policy loss (``algo.losses.policy_loss``) normalized by the
  mini-batch's valid tokens summed over ALL DP ranks, multiplied by ``dp`` (DDP averages over DP) and by the
  number of micro-batches (Megatron's schedule divides each micro-batch loss by it), so the gradient is
  exactly that of the token mean over the global mini-batch. After the schedule (which runs DDP's grad
  reduction in ``finalize_model_grads``): vision grads averaged over TP, a world-wide finiteness check of
  all gradients (Megatron's fp32 optimizer would otherwise clip with a NaN norm and write NaN weights: a
  non-finite step is skipped, its grads zeroed and counted), LR schedule, grad clip + Adam step.
* the KL reference (``ActorConfig.reference_hf_dir``): a second, frozen model of the same layout and dtype
  (no DDP, no optimizer, eval mode, ``requires_grad`` False), loaded once from that folder and never saved
  or loaded with checkpoints. ``compute_log_probs`` runs it over the SAME micro-batches in the same no-grad
  call and returns ``ref_log_probs``; ``train_step`` adds ``kl_coef * KL`` to the loss (``actor/kl_ref``).
* :meth:`MegatronActor.save` / :meth:`MegatronActor.load` -- distributed checkpoints (model, optimizer,
  scheduler, RNG states, caller's state) through :mod:`megatron_vgpo.checkpoint.dist_checkpoint`.
* :meth:`MegatronActor.export_hf_weights` -- full HF-named tensors for weight sync.

Schedule: step ``k`` (1-based, non-skipped steps only) uses the LR value of Megatron's
``OptimizerParamScheduler`` at ``num_steps = k``: with ``lr_warmup_steps = W`` the first step already uses
``lr / W`` (not 0), full ``lr`` from step ``W``; ``cosine`` decays to ``min_lr`` at ``lr_decay_steps``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_vgpo.actor.batching import pack_by_token_budget, split_contiguous
from megatron_vgpo.actor.logprobs import DEFAULT_CHUNK_TOKENS, response_log_probs
from megatron_vgpo.actor.rl_batch import RLBatch
from megatron_vgpo.algo.losses import policy_loss, scale_for_dp_average
from megatron_vgpo.distributed import comm

logger = logging.getLogger(__name__)

__all__ = ["ActorConfig", "LogProbResult", "LossConfig", "MegatronActor"]

_METRIC_SUMS = ("pg_loss", "pg_clipfrac_high", "pg_clipfrac_low", "pg_clipfrac_dual", "approx_kl", "entropy",
                "kl_loss")


@dataclass
class ActorConfig:
    """Model, optimizer and batching options of :class:`MegatronActor` (TP/PP come from parallel state).

    ``micro_batch_tokens`` bounds ``sequences x padded length`` of a training micro-batch;
    ``logprob_micro_batch_tokens`` (default: the same) of a no-grad log-prob micro-batch;
    ``logprob_chunk_tokens`` the rows of vocab-parallel logits turned into fp32 at a time.
    ``lr_schedule``: ``"constant"`` or ``"cosine"`` (needs ``lr_decay_steps``), both with linear warmup; the
    scheduler advances once per optimizer update actually taken (skipped non-finite updates do not count).
    ``reference_hf_dir``: an HF folder to build the frozen KL reference from (``None``: no reference).
    ``params_dtype``: float32, or bfloat16 for Megatron's mixed precision (bf16 weights and compute, vision
    tower included; fp32 gradient buffers and fp32 main params + Adam states in the optimizer; log-probs,
    entropy and focus computed in fp32 from the bf16 logits / hidden states). ``recompute``: activation
    recompute of the decoder layers, ``"none"`` | ``"selective"`` | ``"full"``.
    """

    sequence_parallel: bool = False
    params_dtype: torch.dtype = torch.float32
    recompute: str = "none"
    freeze_vision: bool = False
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_decay_steps: int | None = None
    micro_batch_tokens: int = 8192
    logprob_micro_batch_tokens: int | None = None
    logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    reference_hf_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.lr_schedule == "cosine" and not self.lr_decay_steps:
            raise ValueError("lr_schedule='cosine' needs lr_decay_steps")
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.lr_warmup_steps:
            raise ValueError(f"lr_decay_steps ({self.lr_decay_steps}) must exceed lr_warmup_steps "
                             f"({self.lr_warmup_steps})")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr})")
        if self.micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if self.params_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"params_dtype must be torch.float32 or torch.bfloat16, got {self.params_dtype}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {self.recompute!r}")


@dataclass
class LossConfig:
    """Policy-loss options (passed to ``algo.losses.policy_loss``) and the log-prob temperature."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 3.0
    agg: str = "token-mean"
    temperature: float = 1.0
    entropy_coef: float = 0.0
    log_ratio_clamp: float = 20.0
    kl_coef: float = 0.0
    kl_type: str = "k3"


@dataclass
class LogProbResult:
    """Output of :meth:`MegatronActor.compute_log_probs`, on every rank.

    ``log_probs`` / ``entropy`` [B, R] fp32 (0 on padding slots); with focus: ``focus_cos`` [B, R] fp32 and
    ``has_image`` [B] bool, else ``None``; ``ref_log_probs`` [B, R] fp32: the KL reference's log-probs of
    the same tokens when the actor has a reference, else ``None``.
    """

    log_probs: Tensor
    entropy: Tensor
    focus_cos: Tensor | None = None
    has_image: Tensor | None = None
    ref_log_probs: Tensor | None = None


class MegatronActor:
    """Policy model + optimizer of one rank (see the module docstring)."""

    def __init__(self, hf_dir: str | Path, config: ActorConfig | None = None) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from transformers import AutoConfig

        from megatron_vgpo.checkpoint.hf_mapping import load_hf_weights, read_hf_state_dict
        from megatron_vgpo.models.qwen2_5_vl.model import build_model
        from megatron_vgpo.platform import compute_device

        if not ps.model_parallel_is_initialized():
            raise RuntimeError("MegatronActor needs Megatron's parallel state: call init_model_parallel first")
        self.config = cfg = config or ActorConfig()
        self.hf_dir = Path(hf_dir)
        self.hf_config = AutoConfig.from_pretrained(str(hf_dir))
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.dp = ps.get_data_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.device = compute_device(torch.cuda.current_device() if torch.cuda.is_available() else 0)
        self.sequence_parallel = bool(cfg.sequence_parallel and self.tp > 1)

        model = build_model(self.hf_config, sequence_parallel=self.sequence_parallel,
                            params_dtype=cfg.params_dtype, freeze_vision=cfg.freeze_vision,
                            recompute=cfg.recompute)
        load_hf_weights(model, read_hf_state_dict(str(hf_dir), lazy=True), self.hf_config)
        self.module = model
        mcfg = model.config
        self.model = DistributedDataParallel(
            config=mcfg,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                use_distributed_optimizer=cfg.use_distributed_optimizer),
            module=model,
        )
        mcfg.finalize_model_grads_func = finalize_model_grads
        mcfg.no_sync_func = self.model.no_sync
        # each micro-batch has its own [b, s]: PP stages exchange activation shapes before the tensors
        mcfg.variable_seq_lengths = self.pp > 1
        bf16 = cfg.params_dtype == torch.bfloat16
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1], adam_eps=cfg.adam_eps,
                clip_grad=cfg.clip_grad, use_distributed_optimizer=cfg.use_distributed_optimizer,
                params_dtype=cfg.params_dtype, bf16=bf16, fp16=False,
            ),
            [self.model],
        )
        decay_steps = cfg.lr_decay_steps or max(cfg.lr_warmup_steps + 1, 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=cfg.lr_schedule,
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
        )
        self.steps = 0
        self.skipped_steps = 0
        # the frozen KL reference (only with reference_hf_dir): built apart from the trained model
        self.reference: torch.nn.Module | None = None
        if cfg.reference_hf_dir is not None:
            self.reference = self._build_reference(Path(cfg.reference_hf_dir))
        logger.info("MegatronActor tp=%d pp=%d dp=%d sp=%s dist_opt=%s dtype=%s recompute=%s", self.tp, self.pp,
                    self.dp, self.sequence_parallel, cfg.use_distributed_optimizer, cfg.params_dtype, cfg.recompute)

    def _build_reference(self, hf_dir: Path) -> torch.nn.Module:
        """This rank's shard of a frozen copy of ``hf_dir`` at the actor's layout and dtype (eval mode, no
        grads). The RNG states are restored afterwards, so building it changes no later random draw."""
        from megatron_vgpo.checkpoint.hf_mapping import load_hf_weights, read_hf_state_dict
        from megatron_vgpo.models.qwen2_5_vl.model import build_model

        rng = self._rng_state()
        reference = build_model(self.hf_config, sequence_parallel=self.sequence_parallel,
                                params_dtype=self.config.params_dtype, freeze_vision=self.config.freeze_vision)
        self._set_rng_state(rng)
        load_hf_weights(reference, read_hf_state_dict(str(hf_dir), lazy=True), self.hf_config)
        reference.config.variable_seq_lengths = self.pp > 1
        reference.capture_final_hidden = False
        reference.requires_grad_(False)
        reference.eval()
        logger.info("KL reference policy built from %s", hf_dir)
        return reference

    # ------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------

    @property
    def seq_multiple(self) -> int:
        """Packed lengths are rounded up to this (sequence parallelism splits the sequence over TP)."""
        return self.tp if self.sequence_parallel else 1

    def _vocab_args(self, local_vocab: int) -> dict[str, Any]:
        from megatron.core import parallel_state as ps

        start = self.tp_rank * local_vocab
        real = int(self.hf_config.text_config.vocab_size)
        return {
            "group": ps.get_tensor_model_parallel_group() if self.tp > 1 else None,
            "vocab_start": start,
            "valid_vocab_local": max(0, min(real - start, local_vocab)),
        }

    def _micro_batches(self, batch: RLBatch, budget: int) -> tuple[list[list[int]], list[RLBatch]]:
        groups = pack_by_token_budget(batch.seq_lengths, budget, seq_multiple=self.seq_multiple)
        return groups, [batch.select(g, seq_multiple=self.seq_multiple).to(self.device) for g in groups]

    def _run_schedule(self, micro: list[RLBatch], loss_fn: Any, *, forward_only: bool,
                      model: torch.nn.Module | None = None) -> list[Any]:
        """Megatron's schedule over ``micro`` through ``model`` (default: the trained model);
        ``loss_fn(mb, output) -> (loss, reduced)`` on the last stage."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Any, model: Any) -> tuple[Tensor, Any]:
            mb = next(data_iterator)
            output = model(**mb.model_inputs())
            return output, lambda out: loss_fn(mb, out)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=[self.model if model is None else model],
            num_microbatches=len(micro),
            seq_length=max(mb.input_ids.shape[1] for mb in micro),
            micro_batch_size=max(mb.batch_size for mb in micro),
            forward_only=forward_only,
        )

    def _broadcast_from_last_stage(self, tensor: Tensor) -> Tensor:
        from megatron.core import parallel_state as ps

        if self.pp > 1:
            comm.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return tensor

    # ------------------------------------------------------------------------------------------------
    # no-grad pass: old log-probs, entropy, focus cosines
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def compute_log_probs(
        self,
        batch: RLBatch,
        *,
        temperature: float = 1.0,
        with_focus: bool = False,
        state_position: str = "own",
    ) -> LogProbResult:
        """Per-token log-probs / entropy [B, R] (and focus cosines [B, R] + has_image [B]) of ``batch``, and
        with a KL reference its log-probs [B, R] (same micro-batches, same call).

        Collective over the model-parallel group; returns the same tensors (CPU, fp32) on every rank.
        """
        from megatron.core import parallel_state as ps

        from megatron_vgpo.algo.focus import focus_cosines, image_token_mask
        from megatron_vgpo.checkpoint.config_check import unwrap_model
        from megatron_vgpo.distributed.focus import sharded_focus_cosines

        b, width = batch.batch_size, batch.responses.shape[1]
        budget = self.config.logprob_micro_batch_tokens or self.config.micro_batch_tokens
        groups, micro = self._micro_batches(batch, budget)
        image_id = int(self.hf_config.image_token_id)
        module = unwrap_model(self.model)

        def loss_fn(mb: RLBatch, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            lp, ent = response_log_probs(
                logits, mb.input_ids, mb.response_start, mb.response_length, width, temperature=temperature,
                chunk_tokens=self.config.logprob_chunk_tokens, **self._vocab_args(logits.shape[-1]))
            out = {"log_probs": lp, "entropy": ent}
            if with_focus:
                hidden = module.captured_final_hidden  # [s(/tp), b, h] of this micro-batch
                mask = image_token_mask(mb.input_ids, image_id)
                if self.sequence_parallel:
                    cos, has = sharded_focus_cosines(
                        hidden, mask, mb.response_start, mb.response_length, width,
                        group=ps.get_tensor_model_parallel_group(), shard="sequence", state_position=state_position)
                else:
                    cos, has = focus_cosines(hidden, mask, mb.response_start, mb.response_length, width,
                                             state_position=state_position)
                out["focus_cos"], out["has_image"] = cos.float(), has
            return torch.zeros((), device=logits.device), out

        def ref_loss_fn(mb: RLBatch, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            lp, _ = response_log_probs(
                logits, mb.input_ids, mb.response_start, mb.response_length, width, temperature=temperature,
                chunk_tokens=self.config.logprob_chunk_tokens, **self._vocab_args(logits.shape[-1]))
            return torch.zeros((), device=logits.device), {"log_probs": lp}

        was_training = self.model.training
        self.model.eval()
        try:
            stored = self._run_schedule(micro, loss_fn, forward_only=True)
        finally:
            self.model.train(was_training)
        ref_stored = (self._run_schedule(micro, ref_loss_fn, forward_only=True, model=self.reference)
                      if self.reference is not None else None)
        # pack [B, 4R + 1]: log_probs | entropy | focus_cos | ref_log_probs | has_image, broadcast from the
        # last stage
        packed = torch.zeros(b, 4 * width + 1, dtype=torch.float32, device=self.device)
        if self.is_last_stage:
            for k, (idx, out) in enumerate(zip(groups, stored, strict=True)):
                rows = torch.as_tensor(idx, device=self.device)
                packed[rows, :width] = out["log_probs"]
                packed[rows, width:2 * width] = out["entropy"]
                if with_focus:
                    packed[rows, 2 * width:3 * width] = out["focus_cos"]
                    packed[rows, 4 * width] = out["has_image"].float()
                if ref_stored is not None:
                    packed[rows, 3 * width:4 * width] = ref_stored[k]["log_probs"]
        packed = self._broadcast_from_last_stage(packed).cpu()
        return LogProbResult(
            log_probs=packed[:, :width].clone(),
            entropy=packed[:, width:2 * width].clone(),
            focus_cos=packed[:, 2 * width:3 * width].clone() if with_focus else None,
            has_image=packed[:, 4 * width] > 0.5 if with_focus else None,
            ref_log_probs=packed[:, 3 * width:4 * width].clone() if self.reference is not None else None,
        )

    # ------------------------------------------------------------------------------------------------
    # policy update
    # ------------------------------------------------------------------------------------------------

    def _grads_finite(self) -> bool:
        """True when every gradient on every rank is finite (one all-reduce over the world)."""
        bad = torch.zeros(1, dtype=torch.float32, device=self.device)
        for buffer in list(self.model.buffers) + list(getattr(self.model, "expert_parallel_buffers", [])):
            if not bool(torch.isfinite(buffer.grad_data).all()):
                bad.fill_(1.0)
                break
        if dist.is_initialized() and dist.get_world_size() > 1:
            comm.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item() == 0.0)

    def _zero_grads(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def train_step(
        self,
        batch: RLBatch,
        *,
        mini_batches: int = 1,
        loss_cfg: LossConfig | None = None,
        micro_batch_tokens: int | None = None,
    ) -> dict[str, float]:
        """One policy update on this DP rank's ``batch`` (needs ``old_log_probs`` and ``advantages``).

        ``batch`` is cut into ``mini_batches`` contiguous mini-batches (same count on every DP rank), one
        optimizer step each. Collective over the whole world. Returns (on every rank) metrics averaged over
        the mini-batches that stepped: ``loss`` (global token-mean policy loss of each mini-batch, mean over
        mini-batches, skipped ones included), ``pg_loss``, ``pg_clipfrac_high/low/dual``, ``approx_kl``,
        ``entropy`` (global token means), ``grad_norm``, ``lr``, plus ``steps`` / ``skipped_steps`` (this call)
        and ``tokens`` (global loss tokens: ``response_mask`` slots), ``micro_batches`` (this rank),
        ``mini_batches``, ``lr_schedule_step`` (the scheduler's update count after the call). With
        ``loss_cfg.kl_coef > 0`` (needs ``batch.ref_log_probs``): ``kl_ref``, the global token mean of the
        ``kl_type`` estimate of KL(policy || reference) in the loss, mean over mini-batches.

        Tokens outside ``response_mask`` (e.g. responses masked out by overlong filtering) carry no loss and
        do not count in the token-mean normalizer.
        """
        from megatron.core import parallel_state as ps

        from megatron_vgpo.models.qwen2_5_vl.model import allreduce_vision_grads

        if batch.old_log_probs is None or batch.advantages is None:
            raise ValueError("train_step needs batch.old_log_probs and batch.advantages (fill them first)")
        loss_cfg = loss_cfg or LossConfig()
        use_kl = loss_cfg.kl_coef > 0
        if use_kl and batch.ref_log_probs is None:
            raise ValueError(f"kl_coef={loss_cfg.kl_coef} needs batch.ref_log_probs (an actor with a reference)")
        budget = micro_batch_tokens or self.config.micro_batch_tokens
        width = batch.responses.shape[1]
        dp_group = ps.get_data_parallel_group()
        self.model.train()
        totals = {"loss": 0.0, "grad_norm": 0.0, "lr": 0.0, "tokens": 0.0, "steps": 0, "skipped_steps": 0,
                  "micro_batches": 0, **{k: 0.0 for k in _METRIC_SUMS}}
        for indices in split_contiguous(batch.batch_size, mini_batches):
            mini = batch.select(indices)
            # valid tokens and non-empty sequences of the GLOBAL mini-batch (all DP ranks)
            counts = torch.tensor([float(mini.response_mask.sum()), float(mini.response_mask.any(-1).sum())],
                                  device=self.device)
            if self.dp > 1:
                comm.all_reduce(counts, group=dp_group)
            global_tokens = counts[:1]
            normalizer = max(float(counts[0].item()), 1.0)
            sequences = max(float(counts[1].item()), 1.0)
            _, micro = self._micro_batches(mini, budget)
            n_micro = len(micro)

            def loss_fn(mb: RLBatch, logits: Tensor, n_micro: int = n_micro, normalizer: float = normalizer,
                        sequences: float = sequences) -> tuple[Tensor, dict[str, Tensor]]:
                lp, ent = response_log_probs(
                    logits, mb.input_ids, mb.response_start, mb.response_length, width,
                    temperature=loss_cfg.temperature, chunk_tokens=self.config.logprob_chunk_tokens,
                    **self._vocab_args(logits.shape[-1]))
                loss, m = policy_loss(
                    lp, mb.old_log_probs.float(), mb.advantages.float(), mb.response_mask,
                    clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high, dual_clip=loss_cfg.dual_clip,
                    agg=loss_cfg.agg, global_tokens=normalizer, log_ratio_clamp=loss_cfg.log_ratio_clamp,
                    global_sequences=sequences, entropy_coef=loss_cfg.entropy_coef,
                    entropy=ent if loss_cfg.entropy_coef else ent.detach(),
                    ref_log_probs=mb.ref_log_probs.float() if use_kl else None, kl_coef=loss_cfg.kl_coef,
                    kl_type=loss_cfg.kl_type)
                m.setdefault("kl_loss", torch.zeros((), device=lp.device))
                tokens = float(mb.response_mask.sum())
                # local sums (token-weighted means * tokens) -> summed over micro-batches and DP below
                reduced = torch.stack([loss.detach()] + [m[k].detach().float() * tokens for k in _METRIC_SUMS])
                # undo the schedule's division by the number of micro-batches and DDP's DP average
                return scale_for_dp_average(loss, self.dp) * n_micro, {"sums": reduced}

            self._zero_grads()
            stored = self._run_schedule(micro, loss_fn, forward_only=False)
            sums = torch.zeros(1 + len(_METRIC_SUMS), dtype=torch.float32, device=self.device)
            if self.is_last_stage:
                for out in stored:
                    sums += out["sums"]
                if self.dp > 1:
                    comm.all_reduce(sums, group=dp_group)
            sums = self._broadcast_from_last_stage(sums)
            allreduce_vision_grads(self.model)
            totals["loss"] += float(sums[0])
            totals["tokens"] += float(global_tokens.item())
            totals["micro_batches"] += n_micro
            for k, v in zip(_METRIC_SUMS, sums[1:].tolist(), strict=True):
                totals[k] += v / normalizer
            if not self._grads_finite():
                logger.warning("non-finite gradients: optimizer step skipped (grads zeroed)")
                self._zero_grads()
                self.skipped_steps += 1
                totals["skipped_steps"] += 1
                continue
            self.scheduler.step(increment=1)
            ok, grad_norm, _ = self.optimizer.step()
            if not ok:  # only with fp16 loss scaling: the optimizer found inf itself
                self.skipped_steps += 1
                totals["skipped_steps"] += 1
                continue
            self.steps += 1
            totals["steps"] += 1
            totals["grad_norm"] += float(grad_norm) if grad_norm is not None else float("nan")
            totals["lr"] += float(self.optimizer.param_groups[0]["lr"])
        stepped = max(totals["steps"], 1)
        metrics = {k: totals[k] / mini_batches for k in ("loss", *_METRIC_SUMS)}
        metrics.update(
            grad_norm=totals["grad_norm"] / stepped if totals["steps"] else float("nan"),
            lr=totals["lr"] / stepped if totals["steps"] else float(self.optimizer.param_groups[0]["lr"]),
            steps=float(totals["steps"]), skipped_steps=float(totals["skipped_steps"]),
            tokens=totals["tokens"], micro_batches=float(totals["micro_batches"]),
            mini_batches=float(mini_batches), lr_schedule_step=float(self.scheduler.num_steps),
        )
        kl = metrics.pop("kl_loss")
        if use_kl:
            metrics["kl_ref"] = kl
        if not math.isfinite(metrics["loss"]):
            logger.warning("train_step loss is not finite: %s", metrics["loss"])
        return metrics

    # ------------------------------------------------------------------------------------------------
    # checkpoints and weight export
    # ------------------------------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, Any]:
        from megatron.core import tensor_parallel

        state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        from megatron.core import tensor_parallel

        torch.set_rng_state(state["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def save(self, root: str | Path, extra_state: Any = None, *, overwrite: bool = False) -> Path:
        """Checkpoint model, optimizer, LR scheduler, step counters, RNG states and ``extra_state`` (e.g. the
        data position) under ``root/iter_<steps>`` (collective; see ``dist_checkpoint.save_checkpoint``)."""
        from megatron_vgpo.checkpoint.dist_checkpoint import save_checkpoint

        extra = {"caller": extra_state, "scheduler": self.scheduler.state_dict(),
                 "actor": {"steps": self.steps, "skipped_steps": self.skipped_steps}}
        return save_checkpoint(root, self.model, hf_config=self.hf_config, iteration=self.steps,
                               optimizer=self.optimizer, extra_state=extra, rank_state=self._rng_state(),
                               hf_source_dir=self.hf_dir, overwrite=overwrite)

    def load(self, path: str | Path) -> Any:
        """Restore everything :meth:`save` wrote (``path``: a checkpoint folder or a root with ``latest``);
        returns the caller's ``extra_state``. RNG states are restored only at the same layout."""
        from megatron_vgpo.checkpoint.dist_checkpoint import load_checkpoint

        loaded = load_checkpoint(path, self.model, hf_config=self.hf_config, optimizer=self.optimizer)
        extra = loaded.extra_state or {}
        if "scheduler" in extra:
            self.scheduler.load_state_dict(extra["scheduler"])
        counters = extra.get("actor", {})
        self.steps = int(counters.get("steps", 0))
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        if loaded.rank_state is not None:
            self._set_rng_state(loaded.rank_state)
        return extra.get("caller")

    def load_weights(self, path: str | Path, *, policy: bool = True, reference: bool = True) -> Path:
        """Model weights only from a Megatron distributed checkpoint (e.g. ``tools/convert_checkpoint.py
        import``; a folder or a root with ``latest``), at any saved layout; collective. The checkpoint's
        recorded configuration must match this model (``ConfigMismatchError`` on every rank before any
        tensor is read, model untouched). Into the trained model with ``policy`` (the optimizer's main
        parameters are refreshed from the loaded weights; its state, the LR schedule and the step counters
        stay fresh) and into the KL reference, when there is one, with ``reference`` (the checkpoint is then
        the starting policy it stays frozen at). Returns the folder loaded."""
        from megatron_vgpo.checkpoint.dist_checkpoint import load_checkpoint

        loaded = None
        if policy:
            loaded = load_checkpoint(path, self.model, hf_config=self.hf_config, load_rank_state=False)
            self.optimizer.reload_model_params()
        if reference and self.reference is not None:
            loaded = load_checkpoint(path, self.reference, hf_config=self.hf_config, load_rank_state=False)
        if loaded is None:
            return Path(path)
        logger.info("weights loaded from %s (iteration %d; policy %s, reference %s)", loaded.path,
                    loaded.metadata.iteration, policy, reference and self.reference is not None)
        return loaded.path

    def export_hf_weights(self, *, yield_on_all_tp_ranks: bool = False) -> Any:
        """``iter_hf_weights`` over this stage: (HF name, full tensor) pairs; every TP rank must consume it."""
        from megatron_vgpo.checkpoint.hf_mapping import iter_hf_weights

        return iter_hf_weights(self.model, self.hf_config, yield_on_all_tp_ranks=yield_on_all_tp_ranks)
