"""One bench run per output folder: ``fcntl.flock`` locks held for the whole run.

Every results file is rewritten whole from the writer's own copy after each image, so two runs
writing one folder lose each other's entries (two ``bench`` processes with other seeds on one
``--out`` lost 35 of 72). The lock makes the second run stop at once with a one-line error naming
the PID that holds the folder, before it loads a model.

* A single-process run (and ``merge`` into a folder) holds ``OUT/.spatialid-bench.lock``
  exclusively: it writes ``results.json``, folds part files and removes them.
* Process ``R`` of an ``accelerate launch`` run holds that lock *shared* and its own
  ``OUT/.spatialid-bench.part<R>.lock`` exclusively: the processes of one launch run side by side
  (each writes only ``results.part<R>.json``), while a single-process run, or the same rank of a
  second launch, is refused. Rank 0 folds the parts after the barrier by taking the lock
  exclusively once every rank has released its own.

Lock files are never renamed or deleted (a lock lives on the inode; a replaced file would let a
second holder in); they hold the holder's PID, host and start time for the error message. Locks
are per process and re-entrant: the CLI takes the lock before loading a model and
:func:`~spatialid.bench.runner.run_bench` takes it again without deadlocking itself. The kernel
releases them when the process dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from spatialid.bench.results import BenchStateError
from spatialid.utils.io import OutputPathError

try:  # POSIX; elsewhere runs are not locked (with a warning)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "BenchLock", "FolderInUseError", "bench_lock", "part_lock_name"]

log = logging.getLogger("spatialid.bench")

LOCK_NAME = ".spatialid-bench.lock"


def part_lock_name(part: int) -> str:
    return f".spatialid-bench.part{part}.lock"


class FolderInUseError(BenchStateError):
    """Another process holds the bench folder (or this process's part of it)."""


@dataclass
class BenchLock:
    """The locks of one holder: ``exclusive`` when it may fold, clean and rewrite everything."""

    out: Path
    part: int | None
    exclusive: bool
    fds: list[int]
    pid: int
    depth: int = 1


_HELD: dict[tuple[str, int | None], BenchLock] = {}


def _key(out: Path, part: int | None) -> tuple[str, int | None]:
    return (os.path.realpath(out), part)


def _holder_text(role: str) -> str:
    return f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')} {role}\n"


def _read_holder(path: Path) -> tuple[int, str, str] | None:
    """``(pid, host, since)`` written by the holder of ``path``, when it is a living process here."""
    try:
        pid_s, host, since, *_ = path.read_text(encoding="utf-8").split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # an earlier holder, long gone
        except PermissionError:
            pass
    return pid, host, since


def _who(out: Path, files: list[Path]) -> str:
    """``PID 123`` / ``PID 123 on host``, from the first of ``files`` whose holder is alive."""
    for path in files:
        holder = _read_holder(path)
        if holder is not None:
            pid, host, since = holder
            where = "" if host == socket.gethostname() else f" on {host}"
            return f"PID {pid}{where}, since {since.replace('T', ' ')}"
    return "another process"


def _busy(out: Path, part: int | None, conflict: Path) -> FolderInUseError:
    # the folder lock is held shared by a launch's processes (their PIDs are in their part files)
    # or exclusively by one run (its PID is in the folder lock file)
    parts = sorted(out.glob(".spatialid-bench.part*.lock"))
    files = [conflict] if conflict.name != LOCK_NAME else [*parts, conflict]
    what = f"process {part} of " if part is not None and conflict.name != LOCK_NAME else ""
    return FolderInUseError(
        f"{what}{out} is in use by another spatialid bench ({_who(out, files)}); wait for it to finish "
        "(two runs on one folder would overwrite each other's results), or use another --out"
    )


def _flock(path: Path, mode: int) -> int | None:
    """Open ``path`` (created, never truncated before locking) and lock it without waiting.

    Returns the descriptor, or None when the lock is held by someone else. A file system without
    locks (some network mounts) is warned about and the run goes on unlocked.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputPathError(f"cannot write to {path.parent}: {exc.strerror or exc}; choose another --out location") from None
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        log.warning("cannot lock %s (%s): two runs on this folder would not be kept apart", path, exc.strerror or exc)
        return -1
    return fd


def _write_holder(fd: int, role: str) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text(role).encode("utf-8"), 0)


def _release(fds: list[int]) -> None:
    for fd in reversed(fds):
        if fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def bench_lock(out_dir: str | os.PathLike[str], part: int | None = None) -> Iterator[BenchLock]:
    """Hold ``out_dir`` for a run: exclusively (``part=None``) or as process ``part`` of a launch.

    Raises :class:`FolderInUseError` (one line, the holder's PID) at once when it is taken. The
    folder is created when missing. Re-entrant within one process for the same ``part``.
    """
    out = Path(out_dir)
    key = _key(out, part)
    held = _HELD.get(key)
    if held is not None and held.pid == os.getpid():
        held.depth += 1
        try:
            yield held
        finally:
            held.depth -= 1
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create output folder {out}: {exc.strerror or exc}; choose another --out location") from None
    if fcntl is None:  # pragma: no cover - Windows
        log.warning("no file locks on this system: do not run two benches on %s at once", out)
        lock = BenchLock(out, part, part is None, [], os.getpid())
    else:
        fds: list[int] = []
        folder = out / LOCK_NAME
        try:
            fd = _flock(folder, fcntl.LOCK_EX if part is None else fcntl.LOCK_SH)
            if fd is None:
                raise _busy(out, part, folder)
            fds.append(fd)
            if part is None:
                _write_holder(fd, "bench")
            else:
                own = out / part_lock_name(part)
                fd = _flock(own, fcntl.LOCK_EX)
                if fd is None:
                    raise _busy(out, part, own)
                fds.append(fd)
                _write_holder(fd, f"process{part}")
        except BaseException:
            _release(fds)
            raise
        lock = BenchLock(out, part, part is None, fds, os.getpid())
    _HELD[key] = lock
    try:
        yield lock
    finally:
        _HELD.pop(key, None)
        _release(lock.fds)


def holds_exclusive(out_dir: str | os.PathLike[str]) -> bool:
    """Whether this process holds ``out_dir`` exclusively (it may fold, clean and rewrite it)."""
    held = _HELD.get(_key(Path(out_dir), None))
    return held is not None and held.pid == os.getpid()
