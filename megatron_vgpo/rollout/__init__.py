"""Rollout engines (transformers in-process, SGLang worker process, SGLang HTTP servers) and weight sync.

Public API:

- :mod:`.base`: :class:`RolloutEngine`, :class:`RolloutRequest`, :class:`SamplingParams`,
  :class:`RolloutOutput`, :class:`WeightSyncStats`, :func:`iter_buckets`.
- :class:`HFRolloutEngine` (:mod:`.hf_backend`): transformers ``generate``; no SGLang needed.
- ``SGLangEngine`` (:mod:`.sglang_backend`) and ``SGLangServerEngine`` (:mod:`.sglang_server`): import
  them from their modules (they pull in SGLang helpers lazily where possible).
- Transports: :mod:`.sync_tensor`, :mod:`.sync_distributed`, :mod:`.sync_disk`.
- :func:`verify_logprobs` (:mod:`.verify`): engine vs actor logprobs on the same sequences.
"""

from megatron_vgpo.rollout.base import (
    DEFAULT_BUCKET_BYTES,
    RolloutEngine,
    RolloutOutput,
    RolloutRequest,
    SamplingParams,
    WeightSyncStats,
    iter_buckets,
)
from megatron_vgpo.rollout.hf_backend import HFRolloutEngine
from megatron_vgpo.rollout.verify import VerifyReport, verify_logprobs

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "HFRolloutEngine",
    "RolloutEngine",
    "RolloutOutput",
    "RolloutRequest",
    "SamplingParams",
    "VerifyReport",
    "WeightSyncStats",
    "iter_buckets",
    "verify_logprobs",
]
