"""Launching at scale: the cluster layout planner, pre-flight checks, and NeMo-Run recipe builders.

- :mod:`.planner` -- ``megatron-vgpo plan``: every feasible TP x PP x DP layout, memory per GPU, recommendation.
- :mod:`.preflight` -- ``python -m megatron_vgpo.launch.preflight``: fail-fast checks before ``torchrun``.
- :mod:`.recipes` -- the job command from a :class:`~megatron_vgpo.config.TrainConfig`, NeMo-Run executors
  (local torchrun, Slurm) and the import -> train -> export experiment.
"""
