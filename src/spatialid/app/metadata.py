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
    "StoredFile",
    "format_summary",
    "IMAGE_FORMATS",
    "pipeline_record",
    "read_image_metadata",
    "read_png_metadata",
    "save_image_with_metadata",
    "save_png_with_metadata",
    "stored_inputs",
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


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def save_png_with_metadata(
    image: Image.Image, path: str | os.PathLike[str], settings: Mapping[str, Any]
) -> Path:
    """Write ``image`` as PNG at ``path`` (atomically) with ``settings`` as JSON text metadata.

    ``settings`` must be JSON-serialisable (tensors and paths are converted); it is stored in an
    ``iTXt`` chunk (UTF-8, so prompts in any language survive).
    """
    info = PngImagePlugin.PngInfo()
    text = json.dumps(dict(settings), default=_json_default, ensure_ascii=False, sort_keys=True)
    if not _utf8(text):  # a lone surrogate (a prompt typed into a JSON API): escaped, so it reads back exactly
        text = json.dumps(dict(settings), default=_json_default, ensure_ascii=True, sort_keys=True)
    info.add_itxt(METADATA_KEY, text)
    summary = format_summary(settings)
    info.add_itxt(SUMMARY_KEY, summary if _utf8(summary) else summary.encode("utf-8", "replace").decode("utf-8"))
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
_MAX_TEXT = 4 * 2**20  # settings are a few kB; a larger text chunk is not ours (skipped, never read)
# Inflated text is capped like Pillow's own MAX_TEXT_CHUNK: a zlib bomb (1000:1) must not inflate unbounded.
MAX_INFLATED_TEXT = 2**20


def _inflate(data: bytes) -> bytes:
    """``data`` inflated, at most :data:`MAX_INFLATED_TEXT` bytes (a larger text is refused, never built)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_INFLATED_TEXT)
    if inflater.unconsumed_tail or (len(out) >= MAX_INFLATED_TEXT and not inflater.eof):
        raise ValueError(f"text chunk inflates beyond {MAX_INFLATED_TEXT // 2**20} MB (a settings text is a few kB)")
    return out


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
                    return _inflate(rest[1:]).decode("latin-1")
                if len(rest) < 2:
                    raise ValueError("iTXt chunk holds only its keyword")
                compressed, rest = rest[0], rest[2:]  # flag, method
                _lang, _, rest = rest.partition(b"\0")
                _translated, _, text = rest.partition(b"\0")
                return (_inflate(text) if compressed else text).decode("utf-8")
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
    except (RecursionError, ValueError) as exc:  # nesting thousands deep, an integer of 5000 digits
        what = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())[:80]
        raise InputImageError(f"{p}: spatialid metadata is not usable settings ({what})") from None
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
        loras = [f"{name(src) if Path(os.path.expanduser(src)).is_file() else src}:{scale:g}"
                 for src, scale in map(parse_lora, settings.loras)]
    return {
        "pipeline": settings.pipeline,
        "init_image": name(settings.init_image),
        "inpaint_mask": name(settings.inpaint_mask),
        "control_image": name(settings.control_image),
        "controlnet": settings.controlnet,
        "loras": loras,
    }


# ----------------------------------------------------------------------------- input files of a stored image


class StoredFile:
    """One input file an image's settings name: its recorded absolute path (newer images) and its name.

    :meth:`locate` finds it again: at the recorded path, else the same name next to the image,
    else in the current folder.
    """

    __slots__ = ("path", "name")

    def __init__(self, path: str | None, name: str) -> None:
        self.path = path
        self.name = name

    @classmethod
    def of(cls, path: Any = None, name: Any = None) -> StoredFile | None:
        """From a recorded path and/or name (None when neither is a usable string)."""
        path = path if isinstance(path, str) and path.strip() else None
        if not (isinstance(name, str) and name.strip()) or name.startswith("<"):
            name = None  # "<Image>": an in-memory picture, no file to find
        if path is None and name is None:
            return None
        return cls(path, name or Path(path).name)  # type: ignore[arg-type]

    def candidates(self, image: str | os.PathLike[str] | None = None) -> list[Path]:
        found = [Path(self.path)] if self.path else []
        name = Path(self.name).name  # a stored name is a name: never a path out of the folders below
        if name and name not in (".", ".."):
            if image is not None:
                found.append(Path(os.path.abspath(os.path.expanduser(image))).parent / name)
            found.append(Path.cwd() / name)
        return found

    def locate(self, image: str | os.PathLike[str] | None = None) -> Path | None:
        """The first existing file among :meth:`candidates` (None when there is none)."""
        for candidate in self.candidates(image):
            if candidate.is_file():
                return candidate
        return None

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"StoredFile(path={self.path!r}, name={self.name!r})"


def _is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )


def _name_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def stored_inputs(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The input files of an image's settings, as ``generate``'s flags name them, newest layout first.

    Returns a dict with the keys present in the record: ``id_images`` (list of
    :class:`StoredFile`), ``id_embeds`` (one), ``people`` (one list of photos per person),
    ``people_embeds`` (list), ``regions`` (a box as four floats, or a :class:`StoredFile` mask
    picture, per person), ``init_image``, ``inpaint_mask``, ``control_image`` (one each).
    Images written before ``input_paths`` existed carry file names only; they are read the same
    way (identity by ``identity.source``/``identity.files``, people whose file ends in
    ``.safetensors`` as identity files), so :meth:`StoredFile.locate` looks next to the image and
    in the current folder.
    """
    paths = meta.get("input_paths")
    paths = paths if isinstance(paths, Mapping) else {}
    out: dict[str, Any] = {}

    def files(recorded: Any, names: Any) -> list[StoredFile]:
        recorded, names = _name_list(recorded), _name_list(names)
        items = []
        for i in range(max(len(recorded), len(names))):
            item = StoredFile.of(recorded[i] if i < len(recorded) else None, names[i] if i < len(names) else None)
            if item is not None:
                items.append(item)
        return items

    # one identity (--id / --id-embeds)
    identity = meta.get("identity") if isinstance(meta.get("identity"), Mapping) else {}
    names = _name_list(identity.get("files"))
    if paths.get("id_images") or paths.get("id_embeds"):
        if paths.get("id_images"):
            out["id_images"] = files(paths["id_images"], None)
        if paths.get("id_embeds"):
            out["id_embeds"] = StoredFile.of(paths["id_embeds"])
    elif names and identity.get("source") == "image":
        out["id_images"] = files(None, names)
    elif names and identity.get("source") == "embeds":
        out["id_embeds"] = StoredFile.of(None, names[0])

    # several people (--person photos first, then --person-embeds, as generate orders them)
    if paths.get("people") or paths.get("people_embeds"):
        recorded = paths.get("people") if isinstance(paths.get("people"), (list, tuple)) else []
        people = [files(p, None) for p in recorded if isinstance(p, (list, tuple, str))]
        if any(people):
            out["people"] = [p for p in people if p]
        embeds = files(paths.get("people_embeds"), None)
        if embeds:
            out["people_embeds"] = embeds
    elif isinstance(meta.get("people"), (list, tuple)) and meta.get("people"):
        photos, embeds = [], []
        for person in meta["people"]:
            person_names = _name_list(person)
            if len(person_names) == 1 and person_names[0].lower().endswith(".safetensors"):
                embeds.append(StoredFile(None, person_names[0]))
            elif person_names:
                photos.append(files(None, person_names))
        if photos:
            out["people"] = photos
        if embeds:
            out["people_embeds"] = embeds

    # regions: the recorded paths when present, else the record's boxes and mask names
    recorded_regions = paths.get("regions") if isinstance(paths.get("regions"), (list, tuple)) else None
    regions = recorded_regions if recorded_regions is not None else meta.get("regions")
    if isinstance(regions, (list, tuple)) and regions:
        parsed: list[Any] = []
        for region in regions:
            if _is_box(region):
                parsed.append(tuple(float(v) for v in region))
            elif isinstance(region, str):
                item = StoredFile.of(region, None) if recorded_regions is not None else StoredFile.of(None, region)
                if item is None:
                    break
                parsed.append(item)
            else:
                break
        else:
            out["regions"] = parsed

    # the pipeline's input pictures
    for key in ("init_image", "inpaint_mask", "control_image"):
        item = StoredFile.of(paths.get(key), meta.get(key) if isinstance(meta.get(key), str) else None)
        if item is not None:
            out[key] = item
    return out
