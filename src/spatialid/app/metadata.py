"""Image metadata: the generation settings stored in every image spatialid writes.

Every image spatialid writes carries its full settings as a JSON document, so a picture can
always be reproduced or audited with ``spatialid info IMAGE``. PNG keeps it in the text chunk
``spatialid`` (plus a short human-readable ``parameters`` line, which many image viewers and web
UIs display); JPEG and WebP, which have no text chunks, keep the same JSON in the EXIF
``UserComment`` tag (ASCII JSON, so any EXIF reader shows it unchanged).

Files are written atomically through :mod:`spatialid.utils.io`, so an interrupted run never
leaves a half-written picture behind.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from spatialid.errors import InputImageError
from spatialid.utils.io import atomic_save_image

__all__ = [
    "METADATA_KEY",
    "SUMMARY_KEY",
    "format_summary",
    "IMAGE_FORMATS",
    "pipeline_record",
    "read_image_metadata",
    "read_png_metadata",
    "save_image_with_metadata",
    "save_png_with_metadata",
]

# Output formats by suffix (Pillow's names); any other suffix is no image file of ours.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_SOFTWARE = 0x0131
_ASCII_PREFIX = b"ASCII\0\0\0"  # EXIF UserComment character code

METADATA_KEY = "spatialid"
SUMMARY_KEY = "parameters"


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
        ("people", "People"),
        ("regions", "Regions"),
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


def save_image_with_metadata(
    image: Image.Image, path: str | os.PathLike[str], settings: Mapping[str, Any], format: str | None = None
) -> Path:
    """Write ``image`` as PNG, JPEG or WebP (from ``format`` or the suffix) with ``settings`` embedded.

    PNG goes through :func:`save_png_with_metadata`; JPEG/WebP store the JSON (ASCII-escaped, so
    prompts in any language survive) in EXIF ``UserComment``, at quality 95.
    """
    fmt = (format or IMAGE_FORMATS.get(Path(path).suffix.lower(), "PNG")).upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt == "PNG":
        return save_png_with_metadata(image, path, settings)
    exif = Image.Exif()
    software = settings.get("version")
    if software:
        exif[_SOFTWARE] = f"spatialid {software}"
    text = json.dumps(dict(settings), default=_json_default, ensure_ascii=True, sort_keys=True)
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _ASCII_PREFIX + text.encode("ascii")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return atomic_save_image(rgb, path, format=fmt, exif=exif.tobytes(), quality=95)


def _exif_text(img: Image.Image) -> str | None:
    """The spatialid JSON from EXIF UserComment (or XMP, as other tools may move it), else None."""
    comment = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes):
        head, body = comment[:8], comment[8:]
        if head.startswith(b"UNICODE"):
            text = body.decode("utf-16-be" if body[:1] == b"\0" else "utf-16-le", errors="replace")  # "{" first
        else:
            text = body.decode("utf-8", errors="replace")
        comment = text
    if isinstance(comment, str) and comment.lstrip("\0 ").startswith("{"):
        return comment.strip("\0 ")
    xmp = img.info.get("xmp")
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", errors="replace")
    if isinstance(xmp, str):
        import html
        import re

        found = re.search(r'spatialid:settings="([^"]*)"', xmp) or re.search(r"<spatialid:settings>(.*?)</spatialid:settings>", xmp, re.DOTALL)
        if found:
            return html.unescape(found.group(1))
    return None


class _NotPNG(Exception):
    pass


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_TEXT = 64 * 2**20  # settings are a few kB; a larger text chunk is not ours


def _png_text(path: Path, keyword: str) -> str | None:
    """The text of chunk ``keyword`` (tEXt, zTXt or iTXt), read chunk by chunk without decoding pixels.

    Pillow's ``load()`` would decode the whole image first (slow for big files, and refused for
    decompression bombs); the settings only need the text chunks.
    """
    with path.open("rb") as fh:
        if fh.read(8) != _PNG_SIGNATURE:
            raise _NotPNG
        wanted = keyword.encode("latin-1")
        while True:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("truncated file (no IEND chunk)")
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"tEXt", b"zTXt", b"iTXt"):
                if length > _MAX_TEXT:
                    fh.seek(length + 4, 1)
                    continue
                data = fh.read(length)
                fh.seek(4, 1)  # CRC
                name, sep, rest = data.partition(b"\0")
                if not sep or name != wanted:
                    continue
                if kind == b"tEXt":
                    return rest.decode("latin-1")
                if kind == b"zTXt":
                    return zlib.decompress(rest[1:], bufsize=1 << 16).decode("latin-1")
                compressed, rest = rest[0], rest[2:]  # flag, method
                _lang, _, rest = rest.partition(b"\0")
                _translated, _, text = rest.partition(b"\0")
                return (zlib.decompress(text) if compressed else text).decode("utf-8")
            if kind == b"IEND":
                return None
            fh.seek(length + 4, 1)


def read_image_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the settings stored by :func:`save_image_with_metadata` in the PNG/JPEG/WebP at ``path``.

    Raises :class:`~spatialid.errors.InputImageError` (one line) when the file is missing, not an
    image, or has no spatialid metadata.
    """
    p = Path(path)
    if not p.exists():
        raise InputImageError(f"{p}: no such file")
    if p.is_dir():
        raise InputImageError(f"{p}: is a folder, expected an image written by spatialid")
    fmt = "PNG"
    try:
        raw = _png_text(p, METADATA_KEY)
    except _NotPNG:
        # Not a PNG: JPEG/WebP keep the settings in EXIF; Image.open reads headers only, no pixels
        # (a decompression bomb stays harmless).
        try:
            with Image.open(p) as img:
                fmt = img.format
                raw = _exif_text(img) if fmt in ("JPEG", "WEBP") else None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InputImageError(f"{p}: not a readable image ({' '.join(str(exc).split())})") from None
    except (OSError, ValueError, zlib.error) as exc:
        raise InputImageError(f"{p}: not a readable PNG ({' '.join(str(exc).split())})") from None
    if raw is None:
        kind = f"{fmt} image" if fmt else "image"
        raise InputImageError(f"{p}: {kind} without spatialid settings (only PNG, JPEG and WebP files written by spatialid carry them)")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputImageError(f"{p}: spatialid metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise InputImageError(f"{p}: spatialid metadata is not a JSON object")
    return data


read_png_metadata = read_image_metadata  # the former name, kept for callers of the PNG-only days


def pipeline_record(settings: Any) -> dict[str, Any]:
    """The pipeline fields of ``settings`` as an image's metadata shows them: file names, LoRAs as NAME:SCALE.

    Shared by ``spatialid generate`` and the web UI, so both write the same keys.
    """
    from pathlib import Path

    from spatialid.loaders.names import parse_lora

    def name(path: str | None) -> str | None:
        return Path(path).name if path else None

    loras = None
    if settings.loras:
        loras = [f"{name(src) if Path(src).expanduser().is_file() else src}:{scale:g}"
                 for src, scale in map(parse_lora, settings.loras)]
    return {
        "pipeline": settings.pipeline,
        "init_image": name(settings.init_image),
        "inpaint_mask": name(settings.inpaint_mask),
        "control_image": name(settings.control_image),
        "controlnet": settings.controlnet,
        "loras": loras,
    }
