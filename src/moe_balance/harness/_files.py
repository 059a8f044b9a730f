"""Atomic file writes and run-directory locks, shared by the cache, the checkpoints, the report
and the trainer (imports nothing of ours)."""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked: busy, or not empty without resume/overwrite."""


def temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path``, unique across processes."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    os.replace is atomic on POSIX within one file system, so readers see the old file or the
    new one, never a partial one. The temporary file is removed if ``write`` raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def exclusive_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/.lock`` for the with-block, or raise
    ``RunDirectoryError`` naming the process that holds it.

    ``flock`` locks belong to the open file: the kernel releases them when the process exits,
    however it exits, so a run killed with SIGKILL leaves no stale lock behind.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirectoryError(
                f"{directory} is in use by another process (pid {holder}); wait for it to finish "
                "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_if_unused(directory: Path) -> None:
    """Remove ``directory`` if it holds nothing but its lock file (a run that failed early)."""
    try:
        if {e.name for e in directory.iterdir()} <= {LOCK_NAME}:
            (directory / LOCK_NAME).unlink(missing_ok=True)
            directory.rmdir()
    except OSError:
        pass  # not ours to clean after all (another writer, permissions): leave it
