"""Crash-safe file-system steps shared by checkpoints and exported folders (POSIX rename semantics).

* :func:`write_file_atomic` -- a small text file replaced via ``.tmp`` + fsync + rename.
* :func:`publish_dir` -- the one rename that makes a complete folder visible under its final name.
* :func:`replace_dir` / :func:`restore_replaced_dir` -- swap a complete folder in place of an existing one
  so that a crash at any point leaves one complete folder (the previous one kept as ``old`` meanwhile).

Single process: callers in a distributed job run these on one rank.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["fsync_dir", "publish_dir", "replace_dir", "restore_replaced_dir", "write_file_atomic"]


def fsync_dir(path: Path) -> None:
    """fsync a directory (so a rename inside it is durable); silently skipped where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via ``path.tmp`` + fsync + rename: a crash leaves the old file or the new."""
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_dir(tmp: Path, final: Path) -> None:
    """The one step that makes a complete folder visible under its final name (atomic on POSIX)."""
    os.rename(tmp, final)
    fsync_dir(final.parent)


def restore_replaced_dir(final: Path, old: Path) -> bool:
    """Undo a :func:`replace_dir` that stopped between its two renames: when ``final`` is missing and ``old``
    (the previous folder, complete) exists, rename ``old`` back to ``final``. Returns whether it did."""
    if final.exists() or not old.is_dir():
        return False
    os.rename(old, final)
    fsync_dir(final.parent)
    logger.warning("restored %s from %s (a replacement was interrupted)", final, old.name)
    return True


def replace_dir(new: Path, final: Path, old: Path) -> None:
    """Put the complete folder ``new`` in place of ``final`` so that a crash at any point leaves one complete
    folder: ``final`` is renamed to ``old``, ``new`` to ``final``, then ``old`` is removed.

    A crash between the two renames leaves ``final`` missing and ``old`` complete; the next call (or
    :func:`restore_replaced_dir`) renames it back first. A leftover ``old`` next to a ``final`` (a crash
    before the removal) is removed. Single process: call it on one rank.
    """
    restore_replaced_dir(final, old)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    publish_dir(new, final)
    shutil.rmtree(old, ignore_errors=True)
