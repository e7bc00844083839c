"""One build of a run folder at a time.

`python -m pipeline locked --config FILE -- make -f pipeline.mk ...` takes an
exclusive lock on `<run>/.lock` and then becomes the command (exec), which
keeps the lock for its whole life, and so do the stages it starts: a stage
orphaned by a killed `make` still holds it until it ends, so a new `make`
cannot start a second writer beside it. A second `make` on the same run folder
waits, saying who holds the lock, and then finds what the first one built up
to date; `--no-wait` refuses instead. The lock is an flock(2): the kernel
releases it when its last holder exits, however it exits, so there is no
stale lock to clean up after a crash or a kill -9.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import PipelineError

LOCK_NAME = ".lock"
HELD_ENV = "AGIASI_RUN_LOCK_HELD"


class RunLockedError(PipelineError):
    """The run folder is being built by another process."""

    exit_code = 4


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not said who it is yet"


def acquire(run_dir: Path, *, wait: bool = True, what: str = "") -> int:
    """Lock `run_dir` for this process; return the lock's file descriptor (inheritable).

    Prints one line to stderr when it has to wait. Raises RunLockedError when the
    lock is held and `wait` is False.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        if not wait:
            os.close(fd)
            raise RunLockedError(f"{run_dir} is being built by another process ({holder}); "
                                 f"not waiting (--no-wait). Lock: {path}") from None
        print(f"==> waiting for {path}: {run_dir} is being built by another process ({holder}); "
              "this build continues when that one ends", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} since {stamp}: {what}\n".encode(), 0)
    os.set_inheritable(fd, True)
    os.environ[HELD_ENV] = str(run_dir.resolve())  # tells the stages below that they hold it
    return fd


def held_here(run_dir: Path) -> bool:
    """True when this process (or the make that started it) holds the run's lock."""
    return os.environ.get(HELD_ENV) == str(run_dir.resolve())


@contextlib.contextmanager
def unless_busy(run_dir: Path) -> Iterator[bool]:
    """Yield True when nobody else is building the run (this process holds the lock or could
    take it without waiting; it is then held for the block), else False."""
    if held_here(run_dir):
        yield True
        return
    path = run_dir / LOCK_NAME
    if not run_dir.is_dir():
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def exec_locked(run_dir: Path, command: list[str], *, wait: bool = True) -> None:
    """Take the run's lock, then replace this process with `command` (which inherits the lock)."""
    if not command:
        raise PipelineError("locked: no command given after --")
    acquire(run_dir, wait=wait, what=" ".join(command))
    try:
        os.execvp(command[0], command)
    except OSError as e:
        raise PipelineError(f"locked: cannot run {command[0]!r}: {e}") from None
