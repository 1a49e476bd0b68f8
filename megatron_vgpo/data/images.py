"""Decoding images stored in parquet rows, and resizing them into a pixel-count range.

A stored image is one of: the Hugging Face image struct ``{"bytes": b"...", "path": "..."}`` (bytes win when
present), raw encoded bytes, or a file path (relative paths are resolved against the parquet file's folder).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from PIL import Image


class ImageDecodeError(ValueError):
    """A stored image value that is missing, unreadable or not an image; ``kind`` says which."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def load_image(value: Any, base_dir: Path) -> Image.Image:
    """Decode one stored image value into an RGB PIL image (pixels fully loaded).

    Raises ``ImageDecodeError`` with ``kind`` "missing_image" (null value, struct without bytes or path,
    file not found) or "undecodable_image" (bytes or file that PIL cannot read).
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            value = data
        elif path:
            value = path
        else:
            raise ImageDecodeError("image struct has neither bytes nor path", "missing_image")
    if value is None:
        raise ImageDecodeError("image is null", "missing_image")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise ImageDecodeError("image bytes are empty", "missing_image")
        source: Any = io.BytesIO(bytes(value))
        described = f"{len(value)} bytes"
    elif isinstance(value, str):
        file_path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not file_path.is_file():
            raise ImageDecodeError(f"image file not found: {file_path}", "missing_image")
        source = file_path
        described = str(file_path)
    else:
        raise ImageDecodeError(f"unsupported image value of type {type(value).__name__}", "missing_image")
    try:
        with Image.open(source) as opened:
            opened.load()
            return opened.convert("RGB")
    except Exception as error:  # PIL raises several unrelated types for corrupt data
        raise ImageDecodeError(
            f"cannot decode image ({described}): {type(error).__name__}: {error}", "undecodable_image"
        ) from error


def resize_to_pixel_bounds(image: Image.Image, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
    """Scale ``image`` (aspect ratio kept) so that width*height lies within [min_pixels, max_pixels].

    Images already inside the range (or with a bound of None) are returned unchanged. Bicubic resampling.
    """
    width, height = image.size
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        factor = math.sqrt(max_pixels / pixels)
        new_size = (max(1, math.floor(width * factor)), max(1, math.floor(height * factor)))
    elif min_pixels is not None and pixels < min_pixels:
        factor = math.sqrt(min_pixels / pixels)
        new_size = (math.ceil(width * factor), math.ceil(height * factor))
    else:
        return image
    return image.resize(new_size, Image.Resampling.BICUBIC)
