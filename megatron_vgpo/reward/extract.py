"""Answer extraction from model responses: the content of the last ``\\boxed{...}``.

Pure string functions, no dependency beyond the standard library.
"""

from __future__ import annotations

import re

# `\boxed` as a whole command (not `\boxedfoo`), followed by optional whitespace and the opening brace.
_BOXED_OPEN = re.compile(r"\\boxed(?![A-Za-z])\s*\{")
# Whitespace around `<`, `>` and `/` (so `< /think >` reads `</think>`, `1 / 2` reads `1/2`).
_SPACES_AROUND_MARKUP = re.compile(r"\s*([<>/])\s*")


def squeeze_markup_whitespace(response: str) -> str:
    """Remove whitespace around ``<``, ``>`` and ``/``.

    This is the only normalization the reference reward applies to a response before extracting the box.
    """
    return _SPACES_AROUND_MARKUP.sub(r"\1", response)


def _matching_brace_end(text: str, content_start: int) -> int | None:
    """Index of the ``}`` closing the group whose content begins at ``content_start``, or None.

    Escaped braces (``\\{``, ``\\}``) are literal characters and do not change the depth.
    """
    depth = 0
    position = content_start
    while position < len(text):
        char = text[position]
        if char == "\\" and position + 1 < len(text) and text[position + 1] in "{}":
            position += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return position
            depth -= 1
        position += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Return the stripped content of the LAST ``\\boxed{...}`` in ``text``.

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``), whitespace between
    ``\\boxed`` and ``{`` is allowed, and "last" means the occurrence that starts last, so for a nested box
    ``\\boxed{\\boxed{3}}`` the inner ``3`` is returned. Returns None when there is no ``\\boxed{`` or when
    the last one is never closed (unbalanced braces); an earlier, balanced box does not stand in for it.
    """
    last_match = None
    for match in _BOXED_OPEN.finditer(text):
        last_match = match
    if last_match is None:
        return None
    content_start = last_match.end()
    content_end = _matching_brace_end(text, content_start)
    if content_end is None:
        return None
    return text[content_start:content_end].strip()
