"""Crash safety of a run: ``kill -9`` of ``megatron-vgpo train`` leaves no process behind and a checkpoint
that the next run resumes from; the parent-death and signal-forwarding helpers behind that; and the folder
swap that keeps an HF export (or an overwritten checkpoint) whole when a crash hits between its renames."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
# As tests/test_rl_loop.py (TP2 + SP, relaunched under torchrun), a checkpoint after every step.
SMALL = ["sft.enabled=false", "optimizer.lr_schedule=constant", "optimizer.warmup_steps=0",
         "data.synthetic.num=40",
         "validation.num_samples=4", "validation.max_new_tokens=6", "trainer.prompts_per_step=2",
         "trainer.mini_batches=1", "rollout.n=4", "rollout.max_new_tokens=6", "rollout.backend=hf",
         "algorithm.dynamic_sampling=false", "optimizer.lr=1e-3", "trainer.val_every=3", "trainer.save_every=1",
         f"trainer.steps={STEPS}", "logging.tensorboard=false"]


# ------------------------------------------------------------------------------------------------------------
# /proc helpers (Linux)
# ------------------------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), fields[0], int(fields[19])


def _alive(pid: int, started: int) -> bool:
    """The same process (pid and start time) still runs (a zombie counts as ended)."""
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[1] != "Z"


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[1] != "Z":
            children.setdefault(stat[0], []).append((int(entry.name), stat[2]))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, started in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def _mentioning(text: str) -> list[int]:
    """Pids of live processes (not zombies) whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        stat = _stat(int(entry.name))
        if text in cmdline and stat is not None and stat[1] != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_until(condition: Callable[[], object], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``condition`` until it is true or ``timeout_s`` has passed; returns its last truth value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return bool(condition())


def _latest_step(run_dir: Path) -> int:
    from megatron_vgpo.checkpoint.dist_checkpoint import read_latest

    name = read_latest(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    return int(name.removeprefix("iter_")) if name else 0


# ------------------------------------------------------------------------------------------------------------
# kill -9 of the real job, then resume
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals and /proc are Linux-only")
def test_kill_9_leaves_no_orphans_and_resumes(tmp_path: Path):
    from megatron_vgpo.checkpoint.dist_checkpoint import read_metadata

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "megatron_vgpo.train", str(REPO / "examples/tiny_cpu.yaml"),
               f"run_dir={run_dir}", *SMALL]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    family: dict[int, int] = {}
    try:
        assert _wait_until(lambda: _latest_step(run_dir) >= 2 or proc.poll() is not None, 240), "no checkpoint"
        family = _descendants(proc.pid)  # torchrun's agent, the 2 ranks, their helpers
        seen = _latest_step(run_dir)
        assert proc.poll() is None and seen < STEPS, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the parent only
        proc.wait()
        assert len(family) >= 3, family
        gone = _wait_until(lambda: not _mentioning(str(run_dir)) and not any(
            _alive(pid, started) for pid, started in family.items()), 20)
        assert gone, f"orphans: {_mentioning(str(run_dir))} {[p for p, s in family.items() if _alive(p, s)]}"
    finally:
        log.close()
        for pid, started in family.items():  # whatever the outcome, leave nothing running
            if _alive(pid, started):
                os.kill(pid, signal.SIGKILL)

    # the checkpoint that `latest` names is complete, and at least as new as the one seen before the kill
    killed_at = _latest_step(run_dir)
    assert killed_at >= seen >= 2
    meta = read_metadata(run_dir / "checkpoints")
    assert meta.iteration == killed_at
    assert (run_dir / "checkpoints" / f"iter_{killed_at:07d}" / "dist" / ".metadata").is_file()
    val_before = (run_dir / "val_before.json").read_text()
    first_records = _metrics(run_dir)

    # the same command again: resumes from that checkpoint and finishes
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from_step"] == killed_at
    assert _latest_step(run_dir) == STEPS
    assert (run_dir / "val_before.json").read_text() == val_before  # not re-measured on resume
    assert summary["val_accuracy_before"] == json.loads(val_before)["accuracy"]

    # metrics.jsonl: the first run's records untouched, then the resumed run's from killed_at + 1 on. The
    # step after the checkpoint may have been logged before the kill (logged, not yet saved): it appears twice.
    records = _metrics(run_dir)
    assert records[: len(first_records)] == first_records
    first_steps = [r["step"] for r in first_records if "actor/steps" in r]
    second = records[len(first_records):]
    assert first_steps == list(range(1, len(first_steps) + 1))
    assert killed_at <= len(first_steps) <= killed_at + 1
    assert second[0] == {"step": 0, "time": second[0]["time"], **json.loads(val_before)["metrics"]}
    assert [r["step"] for r in second if "actor/steps" in r] == list(range(killed_at + 1, STEPS + 1))
    val_steps = [s for s in range(killed_at + 1, STEPS + 1) if s % 3 == 0 or s == STEPS]  # trainer.val_every=3
    assert [r["step"] for r in second if "val/accuracy" in r] == [0, *val_steps]
    assert second[-1]["step"] == STEPS and second[-1]["val/accuracy"] is not None


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------------
# the helpers behind it
# ------------------------------------------------------------------------------------------------------------

_SLEEPER = """
import sys, time
from megatron_vgpo.distributed.lifecycle import die_with_parent
print("armed" if die_with_parent() else "not armed", flush=True)
time.sleep(120)
"""

_MIDDLE = """
import subprocess, sys, time
from megatron_vgpo.distributed.lifecycle import child_env
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=child_env())
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")
def test_die_with_parent(tmp_path: Path):
    from megatron_vgpo.distributed.lifecycle import PARENT_PID_ENV

    # a process armed with die_with_parent() ends when its parent is SIGKILLed
    out = (tmp_path / "out").open("w")
    middle = subprocess.Popen([sys.executable, "-c", _MIDDLE, _SLEEPER], stdout=out, cwd=REPO)
    grandchild = 0
    try:
        assert _wait_until(lambda: Path(out.name).read_text().count("\n") >= 2, 60), Path(out.name).read_text()
        pid_line, status = Path(out.name).read_text().splitlines()[:2]
        grandchild = int(pid_line)
        assert status == "armed"
        started = _stat(grandchild)[2]
        os.kill(middle.pid, signal.SIGKILL)
        middle.wait()
        assert _wait_until(lambda: not _alive(grandchild, started), 10)
    finally:
        out.close()
        if grandchild and _stat(grandchild) is not None and _stat(grandchild)[1] != "Z":
            os.kill(grandchild, signal.SIGKILL)

    # a parent already gone when the child arms its death signal: the child stops at once
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    late = subprocess.run([sys.executable, "-c", _SLEEPER], env={**os.environ, PARENT_PID_ENV: str(gone.pid)},
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert late.returncode == -signal.SIGTERM


_FORWARDER = """
import os, sys
from megatron_vgpo.train import _run_forwarding_signals
child = ("import signal, sys, time\\n"
         "signal.signal(signal.SIGINT, lambda s, f: (print('child got', s, flush=True), sys.exit(3)))\\n"
         "print('ready', flush=True)\\n"
         "time.sleep(60)\\n")
status, received = _run_forwarding_signals([sys.executable, "-c", child], dict(os.environ))
print("status", status, "received", received, flush=True)
"""


def test_signals_are_forwarded_to_the_child(tmp_path: Path):
    """Ctrl-C (SIGINT) of the launcher reaches its torchrun child once, and the launcher waits for it."""
    out = tmp_path / "out"
    with out.open("w") as f:
        launcher = subprocess.Popen([sys.executable, "-c", _FORWARDER], stdout=f, stderr=subprocess.STDOUT,
                                    cwd=REPO)
        try:
            assert _wait_until(lambda: "ready" in out.read_text(), 60), out.read_text()
            launcher.send_signal(signal.SIGINT)
            assert launcher.wait(timeout=30) == 0, out.read_text()
        finally:
            if launcher.poll() is None:
                launcher.kill()
    lines = out.read_text().splitlines()
    assert lines[-2:] == [f"child got {int(signal.SIGINT)}", f"status 3 received {int(signal.SIGINT)}"], lines


def test_replace_dir_survives_a_crash_between_the_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from megatron_vgpo.checkpoint import atomic_files as dc

    final, old, new = tmp_path / "sft_model", tmp_path / "sft_model.old", tmp_path / "sft_model.tmp"
    final.mkdir()
    (final / "weights").write_text("v1")
    new.mkdir()
    (new / "weights").write_text("v2")

    def crash(tmp: Path, target: Path) -> None:
        raise OSError("injected crash before the second rename")

    monkeypatch.setattr(dc, "publish_dir", crash)
    with pytest.raises(OSError, match="injected"):
        dc.replace_dir(new, final, old)
    assert not final.exists() and (old / "weights").read_text() == "v1"  # the crash window

    assert dc.restore_replaced_dir(final, old)  # what a later run does first
    assert (final / "weights").read_text() == "v1" and not old.exists()
    assert not dc.restore_replaced_dir(final, old)

    monkeypatch.undo()
    (old / "stale").parent.mkdir()
    (old / "stale").write_text("left by a crash after the second rename")
    dc.replace_dir(new, final, old)
    assert (final / "weights").read_text() == "v2" and not old.exists() and not new.exists()

    # the crash window again, and the next replace_dir restores the previous folder before swapping
    new.mkdir()
    (new / "weights").write_text("v3")
    final.rename(old)
    dc.replace_dir(new, final, old)
    assert (final / "weights").read_text() == "v3" and not old.exists()
