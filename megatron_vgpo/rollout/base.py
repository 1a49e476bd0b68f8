"""The rollout-engine interface shared by the transformers and SGLang backends.

Conventions every backend follows (so the trainer never branches on the backend):

* A prompt is given either as text (the chat template already applied) or as token ids in the *raw*
  form: one ``<|image_pad|>`` token per image, exactly what the tokenizer returns for the templated text.
  The engine expands each placeholder to the image's patch count itself (the transformers processor and
  SGLang both do; SGLang rejects already-expanded ids). :attr:`RolloutOutput.prompt_ids` is the raw form.
* :meth:`RolloutEngine.generate` returns one :class:`RolloutOutput` per *sample*, ``len(requests) * n`` of
  them, ordered request-major: request 0 samples 0..n-1, then request 1, ...
* Log-probabilities are float32, one per response token, of the token under the *temperature-scaled*
  distribution ``log_softmax(logits / temperature)`` over the full vocabulary (top-p truncation is not
  applied to them); with greedy decoding (``temperature == 0``) they are ``log_softmax(logits)``. This is
  what SGLang 0.5.23 returns by default, and what the actor must compute to get the same numbers.
* A response ends with the stop token that finished it (``finish_reason == "stop"``) or after
  ``max_new_tokens`` tokens (``"length"``); the stop token is part of the response and has a logprob.
* Weights are pushed as ``(name, tensor)`` pairs with Hugging Face *checkpoint* names (``visual.*``,
  ``model.layers.*``, ``model.embed_tokens.weight``, ``lm_head.weight``) and full (un-sharded) shapes,
  e.g. from ``megatron_vgpo.checkpoint.hf_mapping.iter_hf_weights``. Engines group them into buckets of
  about ``bucket_bytes`` and return :class:`WeightSyncStats`.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024  # 512 MiB: large enough to amortise per-call cost on GPUs


@dataclass
class RolloutRequest:
    """One prompt to sample from.

    Exactly one of ``prompt_text`` / ``prompt_ids`` is set. ``prompt_ids`` are raw (one image placeholder
    token per image, see the module docstring). ``images`` are PIL images in the order of their
    placeholders. ``uid`` groups the samples of this prompt (GRPO groups are formed by uid).
    """

    uid: str
    prompt_text: str | None = None
    prompt_ids: list[int] | None = None
    images: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.prompt_text is None) == (self.prompt_ids is None):
            raise ValueError(f"request {self.uid!r}: set exactly one of prompt_text or prompt_ids")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy (``top_p`` then ignored).

    ``n`` samples per request; a response ends at the model's EOS ids (its generation config) or at any of
    the extra ``stop_token_ids``; ``seed`` makes sampling reproducible where the backend supports it
    (transformers: always; SGLang: the engine's ``random_seed``, per-request seeds only with
    deterministic inference enabled).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """The temperature the returned logprobs are computed under (1 for greedy decoding)."""
        return 1.0 if self.greedy else self.temperature


@dataclass
class RolloutOutput:
    """One sample. ``response_ids``: list of R ints; ``logprobs``: float32 tensor [R] (see module doc)."""

    uid: str
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: torch.Tensor
    finish_reason: FinishReason


def cut_before_tokens(output: RolloutOutput, stop_ids: Collection[int]) -> bool:
    """Truncate ``output`` in place just before its first response token in ``stop_ids``; True if cut.

    What is kept is a prefix of the sampled trajectory, so its log-probs stay on-policy; the sample then
    ends without an end token, like one cut at the length limit (``finish_reason`` becomes ``"length"``).
    Used for vision marker tokens, which a policy can sample but which no response may contain."""
    for position, token in enumerate(output.response_ids):
        if token in stop_ids:
            output.response_ids = output.response_ids[:position]
            output.logprobs = output.logprobs[:position]
            output.finish_reason = "length"
            return True
    return False


@dataclass
class WeightSyncStats:
    """What one weight sync moved: tensors, bytes (sum of ``numel * element_size``), wall seconds of the
    whole sync (including the cache flush), and how many buckets (calls / broadcasts / files) it took."""

    transport: str
    num_tensors: int = 0
    num_bytes: int = 0
    num_buckets: int = 0
    seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else float("nan")


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    *,
    split_on_dtype: bool = False,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs, in order, into lists of at most ``bucket_bytes`` bytes.

    A tensor larger than ``bucket_bytes`` forms a bucket of its own. With ``split_on_dtype`` a bucket
    holds one dtype only (needed when a bucket is flattened into one byte buffer whose views must stay
    aligned). Tensors are yielded as given (no copy); the iterator is consumed lazily, so a generator
    that gathers shards on the fly never holds more than one bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        nbytes = tensor.numel() * tensor.element_size()
        dtype_change = split_on_dtype and bucket and bucket[-1][1].dtype != tensor.dtype
        if bucket and (size + nbytes > bucket_bytes or dtype_change):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def bucket_nbytes(bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
    """Bytes held by the tensors of one bucket."""
    return sum(t.numel() * t.element_size() for _, t in bucket)


class RolloutEngine(abc.ABC):
    """A generator of rollouts whose weights the trainer can replace.

    Lifecycle: construct (loads the model / starts the engine), ``generate`` many times, between steps
    ``update_weights`` with the actor's new weights, finally ``shutdown`` (or use it as a context
    manager). ``pause``/``resume`` bracket a weight update while other threads may still submit requests;
    ``release_memory``/``resume_memory`` give accelerator memory back to the trainer between rollouts
    where the backend supports it, and are logged no-ops otherwise (on CPU).
    """

    @abc.abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[RolloutOutput]:
        """Sample ``params.n`` responses per request; ``len(requests) * n`` outputs, request-major."""

    @abc.abstractmethod
    def score(
        self,
        requests: Sequence[RolloutRequest],
        response_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        """Logprobs (float32 [R_i]) of given responses after their prompts, under
        ``log_softmax(logits / temperature)``: the verify path (engine vs actor on the same tokens)."""

    @abc.abstractmethod
    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> WeightSyncStats:
        """Replace weights by ``(HF checkpoint name, full tensor)`` pairs; later generations use them."""

    def flush_cache(self) -> None:
        """Drop cached prefixes (KV cache) computed with old weights. No-op where nothing is cached."""
        logger.debug("%s.flush_cache: nothing cached", type(self).__name__)

    def pause(self) -> None:
        """Stop serving generation requests (in-flight requests are aborted where supported)."""
        logger.info("%s.pause: nothing to pause (requests are served synchronously)", type(self).__name__)

    def resume(self) -> None:
        """Serve generation requests again after :meth:`pause`."""
        logger.info("%s.resume: nothing to resume", type(self).__name__)

    def release_memory(self) -> None:
        """Free accelerator memory (weights, KV cache) for the trainer; a logged no-op where unsupported."""
        logger.info("%s.release_memory: not supported here, memory stays allocated", type(self).__name__)

    def resume_memory(self) -> None:
        """Re-allocate what :meth:`release_memory` freed; a logged no-op where unsupported."""
        logger.info("%s.resume_memory: not supported here, nothing was released", type(self).__name__)

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release the engine (processes, memory). Idempotent."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
