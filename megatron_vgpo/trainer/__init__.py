"""Training: the Megatron actor, the RL loop, evaluation, run preparation and metrics.

Modules (imported explicitly; this package imports nothing heavy by itself):

* :mod:`.prepare` -- the model folder and parquet data a run needs (tiny model / synthetic data on demand).
* :mod:`.evaluate` -- greedy held-out accuracy through any rollout engine.
* :mod:`.metrics` -- the one metrics logger (TensorBoard, optional W&B, ``metrics.jsonl``).
"""
