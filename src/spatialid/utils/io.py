"""Writing files so that nothing already produced is lost: one atomic-write mechanism.

Every file spatialid writes (PNGs, identity files, results JSON, checkpoints, embedding caches)
goes through :func:`atomic_write`: the bytes go to a hidden temporary file in the destination
folder, are flushed to disk, and the file is renamed over the target with :func:`os.replace`.
An interrupted run (Ctrl-C, a crash, a full disk) never leaves a half-written file under the
final name, and the result gets the mode a plain ``open()`` would give it (0666 minus the umask,
or the mode of the file it replaces), not ``mkstemp``'s owner-only 0600.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from spatialid.errors import SpatialIDError

__all__ = [
    "OutputPathError",
    "PART_SUFFIX",
    "atomic_path",
    "atomic_save_image",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_writable",
    "is_temp_name",
    "read_bounded",
    "remove_temp_files",
]

PART_SUFFIX = ".part"  # temporary files are ``.<name>.<random>.part`` next to their target
PROBE_PREFIX = ".spatialid-write-test."  # check_writable's probe file

# Temporary names spatialid writes or wrote (a kill between create and rename leaves them):
# ``.<name>.<random>.part`` (atomic_path), ``.<name>.part`` and ``.<name>.<random>.tmp`` /
# ``.<name>.<pid>.<hex>.tmp`` (earlier versions), and check_writable's probe.
_TEMP_NAME = re.compile(r"^\.(?P<target>[^/\\]+?)(?:\.[A-Za-z0-9_-]+)?(?:\.[A-Za-z0-9_-]+)?\.(?:part|tmp)$")
_PROBE_NAME = re.compile(r"^" + re.escape(PROBE_PREFIX) + r"[A-Za-z0-9_]+$")


class OutputPathError(SpatialIDError, OSError):
    """An output file or folder cannot be written."""


def _default_file_mode(target: Path) -> int:
    """Keep an existing file's mode; otherwise 0666 minus the process umask."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that wants a file name (e.g.
    ``safetensors.torch.save_file``); on success it replaces ``path``, on failure it is deleted.

    The temporary file lives in the same folder so the final :func:`os.replace` is a rename on one
    file system (atomic on POSIX and Windows). The parent folder is created when missing.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PART_SUFFIX, dir=folder)
    os.close(fd)
    try:
        yield Path(tmp_name)
        os.chmod(tmp_name, _default_file_mode(target))  # mkstemp made it 0600
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` (see :func:`atomic_path`); on success it is flushed
    to disk and renamed over ``path``, else deleted."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically."""
    payload = json.dumps(data, indent=2, ensure_ascii=False, default=str).encode("utf-8")
    return atomic_write_bytes(path, payload)


def atomic_save_image(image: Any, path: str | os.PathLike[str], format: str | None = None, **save_kwargs: Any) -> Path:
    """Save a PIL image atomically; the format follows the suffix unless given.

    The image is encoded fully in memory first, so an encoder error never touches the disk.
    """
    from PIL import Image

    target = Path(path)
    fmt = format or Image.registered_extensions().get(target.suffix.lower(), "PNG")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return atomic_write_bytes(target, buffer.getvalue())


def check_writable(path: str | os.PathLike[str], *, create_parent: bool = True) -> Path:
    """Fail early (before minutes of generation) if ``path`` cannot be written.

    Creates the parent folder when asked, refuses an existing folder as a file target, and proves
    write permission by creating and removing a temporary file there.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputPathError(f"{target}: is a folder; give a file name ending in .png")
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"{target}: {parent} is not a folder")
    if not parent.exists():
        if not create_parent:
            raise OutputPathError(f"{target}: folder {parent} does not exist")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"cannot create output folder {parent}: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".spatialid-write-test.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(
            f"cannot write to {parent}: {exc.strerror or exc}; choose another --out location"
        ) from None
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"{target}: file exists and is not writable; choose another --out location")
    return target


def is_temp_name(name: str, targets: Iterable[str] = (".png", ".json", ".safetensors")) -> bool:
    """Whether ``name`` is one of spatialid's temporary-file names for a file ending in ``targets``.

    Strict on purpose: a leading dot, our suffix, and a target name of ours inside, so that a
    clean-up never takes a file that some other program left.
    """
    if _PROBE_NAME.match(name):
        return True
    m = _TEMP_NAME.match(name)
    if m is None:
        return False
    stem = name[1:].rsplit(".", 1)[0]  # ".<target>[.<rand>[.<rand>]].part" -> "<target>[...]"
    return any(f"{suffix}." in f"{stem}." for suffix in targets)


def remove_temp_files(folders: Iterable[str | os.PathLike[str]], targets: Iterable[str] = (".png", ".json", ".safetensors")) -> tuple[int, int]:
    """Delete leftover temporary files (see :func:`is_temp_name`) directly inside ``folders``.

    Only safe while no other process writes there (the caller holds the folder's lock). Returns
    ``(files, bytes)`` removed; unreadable folders and files that vanish meanwhile are skipped.
    """
    targets = tuple(targets)
    count = size = 0
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not entry.name.startswith(".") or not is_temp_name(entry.name, targets):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                n = entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
            except OSError:
                continue
            count += 1
            size += n
    return count, size


def read_bounded(path: str | os.PathLike[str], limit: int, *, text: bool = False) -> bytes:
    """The bytes of ``path`` when it holds at most ``limit``; ``ValueError`` (the reason) otherwise.

    For the readers of outside files (results, identities, prompts, identity files): a regular
    file's size is checked before anything is read, then it is read in one piece; a device or a
    pipe (``/dev/zero``, a fifo) is read in 1 MB pieces up to ``min(limit, 16 MB)``, and with
    ``text`` a NUL byte stops the read at once (no text file holds one). ``OSError`` passes
    through; callers wrap both in their one-line error ("PATH {reason}").
    """
    with open(path, "rb") as fh:
        info = os.fstat(fh.fileno())
        if stat.S_ISREG(info.st_mode):
            if info.st_size > limit:
                raise ValueError(f"is larger than {limit / 2**20:g} MB ({info.st_size / 2**20:.1f} MB)")
            data = fh.read(limit + 1)  # the file may have grown since
            if text and b"\0" in data:
                raise ValueError("holds NUL bytes, so it is no text file")
        else:
            limit = min(limit, _STREAM_LIMIT)
            buffer = bytearray()
            while len(buffer) <= limit:
                piece = fh.read(min(2**20, limit + 1 - len(buffer)))
                if not piece:
                    break
                if text and b"\0" in piece:
                    raise ValueError("holds NUL bytes, so it is no text file")
                buffer += piece
            data = bytes(buffer)
    if len(data) > limit:
        raise ValueError(f"is larger than {limit / 2**20:g} MB")
    return data


_STREAM_LIMIT = 16 * 2**20  # what read_bounded takes from a device or a pipe
