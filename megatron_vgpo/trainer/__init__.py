"""Training: the Megatron actor, weight export for sync, evaluation, run preparation and metrics.

Modules (imported explicitly; this package imports nothing heavy by itself):

* :mod:`.actor` -- ``MegatronActor``: no-grad log-probs / entropy / VGPO focus pass, PPO train step
  (token budget micro-batches, global token-mean, DDP + distributed optimizer, non-finite steps skipped),
  save / load through distributed checkpoints.
* :mod:`.rl_batch` -- ``RLBatch``: right-padded prompt + response trajectories with their images.
* :mod:`.batching` -- token-budget micro-batch packing.
* :mod:`.logprobs` -- chunked vocab-parallel log-probs and entropy (no full-vocabulary fp32 buffer).
* :mod:`.weight_export` -- every stage's weights streamed, as HF tensors, to the rank that drives the engine.
* :mod:`.weight_sync_check` -- actor -> engine sync verified by logprobs (``tools/check_weight_sync.py``).
* :mod:`.prepare` -- the model folder and parquet data a run needs (tiny model / synthetic data on demand).
* :mod:`.evaluate` -- greedy held-out accuracy through any rollout engine.
* :mod:`.metrics` -- the one metrics logger (TensorBoard, optional W&B, ``metrics.jsonl``).
"""
