"""The VGPO prompt: problem text, a blank line, then the reasoning / answer-format instruction.

This file is the one place that holds the instruction wording. ``build_messages`` turns a problem into
chat messages for ``processor.apply_chat_template``: every ``<image>`` placeholder becomes an image content
item at that spot; when the problem has no placeholder but the row has images, the images come first.
"""

from __future__ import annotations

from typing import Any

IMAGE_PLACEHOLDER = "<image>"

# Appended to every problem after a blank line (VGPO_SPEC.md section 5.1).
# Kept short: with the tiny job's small BPE vocabulary every word costs tokens on each rollout.
REASONING_INSTRUCTION = "Reason step by step in <think> </think> and then put the final answer in \\boxed{}."
PROMPT_TEMPLATE = "{problem}\n\n{instruction}"


def format_problem(problem: str, instruction: str = REASONING_INSTRUCTION) -> str:
    """Problem text followed by a blank line and ``instruction`` (placeholders are left in place)."""
    return PROMPT_TEMPLATE.format(problem=problem.strip(), instruction=instruction)


def build_messages(prompt: str, num_images: int) -> list[dict[str, Any]]:
    """One user message whose content interleaves text and ``{"type": "image"}`` items.

    ``prompt`` must hold either exactly ``num_images`` ``<image>`` placeholders or none; with none, the
    ``num_images`` image items are put before the text. Empty text pieces are dropped.
    """
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    num_placeholders = len(pieces) - 1
    content: list[dict[str, Any]] = []
    if num_placeholders == 0:
        content.extend({"type": "image"} for _ in range(num_images))
        content.append({"type": "text", "text": prompt})
    elif num_placeholders == num_images:
        for position, piece in enumerate(pieces):
            if position > 0:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
    else:
        raise ValueError(
            f"prompt has {num_placeholders} {IMAGE_PLACEHOLDER} placeholders but {num_images} images"
        )
    return [{"role": "user", "content": content}]
