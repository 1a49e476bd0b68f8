"""Distributed building blocks (torch.distributed; NCCL with CUDA, gloo on CPU).

Modules (imported explicitly; this package imports nothing heavy by itself):

* :mod:`.comm` -- every collective of the project, run on its group's device (``comm_device``: cuda for NCCL,
  cpu for gloo), and the collective audit (``MEGATRON_VGPO_COLLECTIVE_AUDIT=1``) that enforces it.
* :mod:`.process_groups` -- torch.distributed + Megatron parallel state for a TP x PP x CP x DP grid
  (``init_model_parallel``, ``current_layout``, ``destroy``).
* :mod:`.multiprocess` -- ``run_on_ranks``: one function on N real spawned processes, per-rank tracebacks
  (the multi-rank test harness, also used by tools that launch their own ranks).
* :mod:`.lifecycle` -- no process outlives its launcher: Linux parent-death signals for the torchrun agent
  (``torchrun_command``) and its ranks (``die_with_parent``), even when the launcher is killed with SIGKILL.
* :mod:`.focus` -- VGPO focus cosines from final-norm hidden states sharded as Megatron shards them
  (sequence parallel, hidden split, context parallel): all-reduced partial sums, never an all-gather of
  hidden states.
* :mod:`.group_stats` -- GRPO advantages and VGPO trajectory factors when a prompt's rollouts span
  data-parallel ranks (exact all-gather of per-trajectory scalars).
"""
