"""Training orchestration: the job, the RL loop and step, SFT warm start, evaluation, metrics and plots.

The Megatron actor itself (model, optimizer, log-prob passes, batching, weight export) is
:mod:`megatron_vgpo.actor`. Modules here (imported explicitly; this package imports nothing heavy):

* :mod:`.job` -- the training job: SFT warm start, RL loop, validation before/after, ``summary.json``.
* :mod:`.loop` / :mod:`.rl_step` -- the RL loop and the pieces of one step (rollouts, update, weight sync).
* :mod:`.sft` -- the supervised warm start.
* :mod:`.weight_sync_check` -- actor -> engine sync verified by logprobs (``tools/check_weight_sync.py``).
* :mod:`.prepare` -- the model folder and parquet data a run needs (tiny model / synthetic data on demand).
* :mod:`.evaluate` -- greedy held-out accuracy through any rollout engine.
* :mod:`.metrics` -- the one metrics logger (TensorBoard, optional W&B, ``metrics.jsonl``).
* :mod:`.plots` -- PNG curves from ``metrics.jsonl``.
"""
