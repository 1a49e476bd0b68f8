"""Checkpoints: HF <-> Megatron weight mapping and Megatron distributed checkpoints.

Modules (imported explicitly; this package imports nothing heavy by itself):

* :mod:`.hf_mapping` -- in-memory HF <-> Megatron mapping for Qwen2.5-VL: ``hf_to_megatron_shard``,
  ``megatron_shards_to_hf``, ``iter_hf_weights`` (streaming TP-gathered export for weight sync),
  ``load_hf_weights`` (``read_hf_state_dict`` / ``LazyHFCheckpoint`` re-exported from :mod:`.hf_files`).
* :mod:`.hf_files` -- reading HF safetensors folders, eagerly or lazily (per-tensor, headers for shapes).
* :mod:`.config_check` -- field-by-field checks between HF configs, Megatron models and checkpoint metadata.
* :mod:`.dist_checkpoint` -- crash-safe Megatron distributed checkpoints (model, optimizer, extra state).
* :mod:`.atomic_files` -- the crash-safe file steps it uses (atomic file write, folder publish and swap),
  also used for the exported HF folders.
"""
