"""Process lifetimes: no training process outlives the command that started it.

``megatron-vgpo train`` relaunches itself under ``torchrun`` when the layout needs several ranks. Killing the
launcher with ``SIGKILL`` (an OOM killer, ``kill -9``, a scheduler) gives it no chance to stop its children,
and ``torchrun`` puts every worker in a session of its own (``start_new_session``), so neither a process
group signal nor the death of ``torchrun`` reaches the ranks. Without help they keep training and writing the
run directory. Two links close the gap, both with Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``):

* launcher -> torchrun: the launcher starts ``python -m megatron_vgpo.distributed.lifecycle TORCHRUN_ARGS``
  (see :func:`torchrun_command`), which arms ``SIGTERM`` on its parent's death and then runs torchrun's own
  ``main`` in the same process. torchrun's agent answers ``SIGTERM`` by terminating its workers.
* torchrun -> ranks: torch's elastic agent does not arm a death signal for its workers (it only starts
  them with ``start_new_session=True``), so every rank calls :func:`die_with_parent` first thing; a rank then
  gets ``SIGTERM`` if the agent dies, even by ``SIGKILL``.

The parent's pid travels in :data:`PARENT_PID_ENV` so that a process whose parent died *before* the death
signal was armed (a race the kernel does not cover) notices and stops at once.

Everything here is a no-op outside Linux.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)

PARENT_PID_ENV = "MEGATRON_VGPO_PARENT_PID"
"""Pid of the process whose death should end this one (set by the launcher and by the torchrun wrapper)."""

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (the thread that started it) dies.

    Returns True when armed, False outside Linux or when ``prctl`` fails (logged). The setting survives
    ``exec`` but is not inherited by children.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        status = libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError) as err:
        logger.warning("cannot set a parent-death signal: %s", err)
        return False
    if status != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def _alive(pid: int) -> bool:
    """True while a process ``pid`` exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Arm ``sig`` on the parent's death; if :data:`PARENT_PID_ENV` names a parent that is already gone,
    deliver ``sig`` to this process now. Returns whether the death signal is armed (False off Linux)."""
    armed = set_parent_death_signal(sig)
    expected = os.environ.get(PARENT_PID_ENV, "")
    if armed and expected.isdigit() and not _alive(int(expected)):
        logger.warning("parent process %s is gone; stopping", expected)
        os.kill(os.getpid(), sig)
    return armed


def torchrun_command(torchrun_args: Sequence[str]) -> list[str]:
    """``torchrun TORCHRUN_ARGS`` as a command that ends (with its workers) when the calling process dies.

    Start it with :data:`PARENT_PID_ENV` set to the caller's pid (see :func:`child_env`).
    """
    return [sys.executable, "-m", "megatron_vgpo.distributed.lifecycle", *torchrun_args]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with :data:`PARENT_PID_ENV` set to this process's pid."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}


def _torchrun_main(argv: Sequence[str]) -> None:
    """Die with the launcher, tell the workers whose death to follow (this pid), then run torchrun."""
    die_with_parent(signal.SIGTERM)
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # the workers inherit the agent's environment
    from torch.distributed.run import main as torchrun_main

    sys.argv = ["torchrun", *argv]
    torchrun_main(list(argv))


if __name__ == "__main__":
    _torchrun_main(sys.argv[1:])
