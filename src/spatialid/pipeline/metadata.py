"""PNG text metadata (generation settings) and atomic file writes.

Every image spatialid writes carries its full settings as a JSON document in the PNG text chunk
``spatialid`` (plus a short human-readable ``parameters`` line, which many image viewers and
web UIs display), so a picture can always be reproduced or audited with ``spatialid info IMAGE``.

Files are written atomically: the bytes go to a hidden temporary file in the destination folder
which is then renamed over the target with :func:`os.replace`, so an interrupted run (Ctrl-C, a
crash, a full disk) never leaves a half-written picture behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from PIL import Image, PngImagePlugin

from spatialid.errors import InputImageError, SpatialIDError

__all__ = [
    "METADATA_KEY",
    "SUMMARY_KEY",
    "OutputPathError",
    "atomic_save_image",
    "atomic_write",
    "check_writable",
    "format_summary",
    "read_png_metadata",
    "save_png_with_metadata",
]

METADATA_KEY = "spatialid"
SUMMARY_KEY = "parameters"


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
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success rename it over ``path``, else delete it.

    The temporary file lives in the same folder so the final :func:`os.replace` is a rename on one
    file system (atomic on POSIX and Windows).
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_name, _default_file_mode(target))
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def atomic_save_image(image: Image.Image, path: str | os.PathLike[str], format: str | None = None, **save_kwargs: Any) -> Path:
    """Save a PIL image atomically (see :func:`atomic_write`); the format follows the suffix."""
    target = Path(path)
    fmt = format or Image.registered_extensions().get(target.suffix.lower(), "PNG")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)  # encode fully before touching the disk
    with atomic_write(target) as handle:
        handle.write(buffer.getvalue())
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def format_summary(settings: Mapping[str, Any]) -> str:
    """A one-paragraph ``key: value`` summary in the style image tools show (prompt first)."""
    prompt = str(settings.get("prompt", ""))
    keys = (
        ("negative_prompt", "Negative prompt"),
        ("steps", "Steps"),
        ("guidance", "Guidance"),
        ("true_cfg", "True CFG"),
        ("seed", "Seed"),
        ("width", None),
        ("preset", "Preset"),
        ("id_weight", "ID weight"),
        ("start_step", "Start step"),
        ("model", "Model"),
        ("pulid", "PuLID"),
        ("version", "spatialid"),
    )
    parts = []
    for key, label in keys:
        if key == "width":
            if "width" in settings and "height" in settings:
                parts.append(f"Size: {settings['width']}x{settings['height']}")
            continue
        if key in settings and settings[key] not in (None, ""):
            parts.append(f"{label}: {settings[key]}")
    return prompt + "\n" + ", ".join(parts)


def save_png_with_metadata(
    image: Image.Image, path: str | os.PathLike[str], settings: Mapping[str, Any]
) -> Path:
    """Write ``image`` as PNG at ``path`` (atomically) with ``settings`` as JSON text metadata.

    ``settings`` must be JSON-serialisable (tensors and paths are converted); it is stored in an
    ``iTXt`` chunk (UTF-8, so prompts in any language survive).
    """
    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(dict(settings), default=_json_default, ensure_ascii=False, sort_keys=True))
    info.add_itxt(SUMMARY_KEY, format_summary(settings))
    software = settings.get("version")
    if software:
        info.add_text("Software", f"spatialid {software}")
    return atomic_save_image(image, path, format="PNG", pnginfo=info)


def read_png_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the settings stored by :func:`save_png_with_metadata` in the PNG at ``path``.

    Raises :class:`~spatialid.errors.InputImageError` (one line) when the file is missing, not an
    image, or has no spatialid metadata.
    """
    p = Path(path)
    if not p.exists():
        raise InputImageError(f"{p}: no such file")
    if p.is_dir():
        raise InputImageError(f"{p}: is a folder, expected a PNG image written by spatialid")
    try:
        with Image.open(p) as img:
            img.load()  # text chunks after the image data are read only by load()
            text = dict(getattr(img, "text", {}) or {})
            fmt = img.format
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputImageError(f"{p}: not a readable image ({' '.join(str(exc).split())})") from None
    raw = text.get(METADATA_KEY)
    if raw is None:
        kind = f"{fmt} image" if fmt else "image"
        raise InputImageError(f"{p}: {kind} without spatialid settings (only PNGs written by spatialid carry them)")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputImageError(f"{p}: spatialid metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise InputImageError(f"{p}: spatialid metadata is not a JSON object")
    return data


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
