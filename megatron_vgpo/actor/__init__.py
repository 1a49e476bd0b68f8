"""The Megatron actor: the policy model of every training rank, and what moves data in and out of it.

The trainer calls this small interface (import the modules explicitly; this package imports nothing heavy):

* :class:`~megatron_vgpo.actor.megatron_actor.MegatronActor` -- built on every rank after
  ``init_model_parallel``; ``compute_log_probs`` (no-grad pass: old log-probs, entropy, VGPO focus cosines),
  ``train_step`` (PPO mini-batches), ``save`` / ``load`` (distributed checkpoints), ``load_weights`` (model
  weights only, ``model.load_checkpoint``), ``steps``.
* :mod:`.rl_batch` -- ``RLBatch``: right-padded prompt + response trajectories with their images;
  ``build_rl_batch`` / ``shard_for_data_parallel``, and ``build_local_rl_batch`` (only this DP rank's rows,
  each prompt processed once; what the RL step uses).
* :mod:`.batching` -- token-budget micro-batch packing.
* :mod:`.logprobs` -- chunked vocab-parallel log-probs and entropy (no full-vocabulary fp32 buffer).
* :mod:`.weight_export` -- every stage's weights streamed, as HF tensors, to the rank that drives an engine.

Extra no-grad passes (a frozen reference policy, corrupted-image passes of the vision-enhanced baselines)
belong here, beside ``compute_log_probs``; rollout engines live in :mod:`megatron_vgpo.rollout`.
"""
