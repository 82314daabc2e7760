"""What every input box of the web UI shares: the one-line error, the server's limits, the photos.

Identity photos come in through the main photo box (person 1, :mod:`spatialid.ui.handlers`) and
through each added person's box (:mod:`spatialid.ui.people`); both check them with
:func:`collect_photos`, encode them through one :class:`IdentityCache` and show the face check of
:func:`preview_identity`. Kept below both modules so neither has to import the other for them.
No Gradio here.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spatialid.errors import FaceNotFoundError, InputImageError, SpatialIDError

__all__ = [
    "DEFAULT_MAX_COST",
    "MAX_UPLOAD_PIXELS",
    "PHOTO_SUFFIXES",
    "IdentityCache",
    "UIInputError",
    "UILimits",
    "check_upload_pixels",
    "collect_photos",
    "photo_set",
    "preview_identity",
    "visitor_text",
]

#: Image suffixes accepted as identity photos (what Pillow reads for photos in practice).
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".avif")


class UIInputError(SpatialIDError, ValueError):
    """A form value in the web UI is missing or out of range (shown as a one-line popup)."""


#: Most pixels of a picture the page's image boxes (person 1's photo, the init image, its painted
#: layers, the mask) accept: checked from the file's header before Gradio decodes or re-saves it, so
#: a 97 KB 10000x10000 PNG costs nothing (4096x4096; a phone photo is about 12 megapixels).
MAX_UPLOAD_PIXELS = 4096 * 4096

#: Default ``--max-cost``: one request may cost this many default requests (the full comparison of
#: every preset at the default settings costs 10).
DEFAULT_MAX_COST = 10.0


@dataclass(frozen=True)
class UILimits:
    """What one visitor may ask of the shared GPU (enforced here, mirrored by the sliders).

    Enforced in :func:`build_request` because the HTTP API never sees a slider. Each cap alone is
    not enough: steps, images, compared presets and size multiply, so ``max_cost`` caps their
    product, in "default requests" (``unit_*``: the form's default steps and size, one image).
    """

    max_upload_mb: float = 20.0
    max_photos: int = 4
    max_side: int = 2048
    max_steps: int = 50
    max_images: int = 4
    max_cost: float = DEFAULT_MAX_COST
    unit_steps: int = 20
    unit_width: int = 1024
    unit_height: int = 1024
    lora_dir: str | None = None  # serve --lora-dir: the only LoRA files visitors may name (None: LoRAs off)
    visitor_upload_mb: float | None = None  # uploads one visitor may keep on the server (None: 5 x max_upload_mb)
    total_upload_mb: float | None = None  # uploads of all visitors together (None: 50 x max_upload_mb)

    @property
    def visitor_upload_bytes(self) -> int:
        """Bytes of uploads one visitor (a login, or an address without login) may have stored at once."""
        mb = self.visitor_upload_mb if self.visitor_upload_mb is not None else 5 * self.max_upload_mb
        return int(mb * 2**20)

    @property
    def total_upload_bytes(self) -> int:
        """Bytes of uploads all visitors together may have stored at once."""
        mb = self.total_upload_mb if self.total_upload_mb is not None else 50 * self.max_upload_mb
        return int(mb * 2**20)

    def replace(self, **changes: Any) -> UILimits:
        """A copy with ``changes`` (``None`` values keep the current one: unset CLI flags)."""
        from dataclasses import replace

        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def photo_set(current: Any, new: Any, *, add: bool) -> list[str]:
    """The identity photos after an upload: ``new`` alone (replace), or appended when ``add``.

    Replacing is the default because a new photo is usually a new person; adding is only for
    more photos of the same person (averaged into one identity).
    """
    kept = [str(_path_of(item)) for item in (current or [])] if add else []
    added = [str(_path_of(item)) for item in (new if isinstance(new, (list, tuple)) else [new]) if item]
    return kept + added


def preview_identity(
    pipe: Any,
    photos: Any,
    *,
    cache: IdentityCache,
    limits: UILimits = UILimits(),
    lock: threading.Lock | None = None,
) -> tuple[list[tuple[Any, str]], str]:
    """Thumbnails of the photos plus the aligned face the encoder finds, and a one-line verdict.

    Runs the same face detection as a generation (through ``cache``, so Generate reuses it), right
    after upload: a visitor sees at once whether the right face was found, before waiting for an
    image. Problems (no face, bad file, too many photos) are the line, not an exception.
    """
    if not photos:
        return [], ""
    try:
        paths = collect_photos(photos, limits)
    except SpatialIDError as exc:
        return [], f"**Cannot use these photos**: {' '.join(str(exc).split())}"
    thumbs: list[tuple[Any, str]] = [(str(p), p.name) for p in paths]
    guard = lock if lock is not None else threading.Lock()
    try:
        with guard:
            identity = cache.get_or_encode(pipe, paths)
    except SpatialIDError as exc:
        return thumbs, f"**No usable face**: {' '.join(str(exc).split())}"
    face = getattr(identity, "aligned_face", None)
    if face is not None:
        thumbs.append((face, "face found"))
    n = len(paths)
    what = "1 photo" if n == 1 else f"{n} photos of one person (averaged)"
    return thumbs, f"Face found: {what}. The last thumbnail is the aligned face the encoder will use."


def _path_of(item: Any) -> Path:
    """Gradio hands files over as str paths, ``NamedString`` / tempfile objects or dicts."""
    if isinstance(item, (str, os.PathLike)):
        return Path(os.fspath(item))
    if isinstance(item, Mapping):
        for key in ("path", "name"):
            if item.get(key):
                return Path(str(item[key]))
    for attr in ("path", "name"):
        value = getattr(item, attr, None)
        if isinstance(value, (str, os.PathLike)) and str(value):
            return Path(os.fspath(value))
    if isinstance(item, tuple) and item:  # gallery (path, caption)
        return _path_of(item[0])
    raise UIInputError(f"cannot read an uploaded file from a {type(item).__name__}; upload the photo again")


def check_upload_pixels(source: str | os.PathLike[str] | bytes, name: str, max_pixels: int = MAX_UPLOAD_PIXELS) -> tuple[int, int]:
    """The (width, height) in an uploaded picture's header; one line if it is not a picture or too large.

    Only the header is read (Pillow's ``open`` is lazy): nothing is decoded and nothing written, so
    a small file that claims 10000x10000 pixels is refused before it costs any memory.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in our words
            with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        raise UIInputError(
            f"{name} has over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels, over this server's limit of "
            f"{max_pixels / 1e6:.1f} megapixels; scale it down (at most 4096x4096) and upload it again"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UIInputError(f"{name} is not a readable picture; upload a PNG, JPEG or WebP image") from None
    if width * height > max_pixels:
        raise UIInputError(
            f"{name} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), over this server's "
            f"limit of {max_pixels / 1e6:.1f} megapixels; scale it down (at most 4096x4096) and upload it again"
        )
    return width, height


def visitor_text(message: str, *folders: str | os.PathLike[str] | None) -> str:
    """``message`` on one line, every path inside ``folders`` (the server's private folder, its
    ``--lora-dir``) replaced by its file name: a visitor never learns where the server keeps files,
    nor the random name of anyone's session folder."""
    text = " ".join(str(message).split())
    for folder in sorted({str(f).rstrip(os.sep) for f in folders if f}, key=len, reverse=True):
        if not folder:
            continue
        pattern = re.escape(folder) + r"(?:" + re.escape(os.sep) + r"[^\s'\"(),:]*)?"
        text = re.sub(pattern, lambda m: Path(m.group(0)).name if m.group(0) != folder else "the server's folder", text)
    return text


def _short(message: str, paths: Sequence[Path]) -> str:
    """Replace server-side temp paths in a message by the file names the visitor knows."""
    for p in sorted(paths, key=lambda q: len(str(q)), reverse=True):
        message = message.replace(str(p), p.name)
    return " ".join(message.split())


def collect_photos(files: Any, limits: UILimits = UILimits()) -> list[Path]:
    """Check the uploaded identity photos and return their paths (in upload order).

    Refuses: no photo, too many, a file that is not an image (by name or by content), a file over
    the upload limit, and anything :func:`spatialid.utils.images.load_image` refuses (animated,
    damaged, decompression bomb). Messages name the file as the visitor uploaded it.
    """
    from spatialid.utils.images import load_image

    if files is None or (isinstance(files, (list, tuple)) and not files):
        raise UIInputError("no identity photo: upload one or more photos of the same person (JPEG, PNG or WebP)")
    items = list(files) if isinstance(files, (list, tuple)) else [files]
    paths = [_path_of(item) for item in items]
    if len(paths) > limits.max_photos:
        raise UIInputError(
            f"{len(paths)} photos uploaded; use at most {limits.max_photos} photos of the same person"
        )
    limit_bytes = int(limits.max_upload_mb * 1024 * 1024)
    for path in paths:
        if path.suffix.lower() not in PHOTO_SUFFIXES:
            raise UIInputError(
                f"{path.name} is not a photo (wrong file type); upload a JPEG, PNG or WebP image of a face"
            )
        try:
            size = path.stat().st_size
        except OSError:
            raise UIInputError(f"{path.name}: the upload is missing on the server; upload the photo again") from None
        if size > limit_bytes:
            raise UIInputError(
                f"{path.name} is {size / 2**20:.1f} MB, over the {limits.max_upload_mb:g} MB limit; "
                "upload a smaller photo (a face needs only about 1000 px)"
            )
        try:
            load_image(path)
        except InputImageError as exc:
            raise InputImageError(_short(str(exc), [path])) from None
    return paths


class IdentityCache:
    """The last few identity embeddings, keyed by the photos' bytes.

    Visitors usually keep their photo and change the prompt or the settings; the face detector and
    encoder then run once per photo set instead of once per click. Keyed by content (SHA-256), not
    by upload path: every upload gets a fresh temp path even for the same file.
    """

    def __init__(self, maxsize: int = 8) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(pipe: Any, photos: Sequence[Path]) -> tuple:
        digests = tuple(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in photos)
        return (id(pipe), digests)

    def get_or_encode(self, pipe: Any, photos: Sequence[Path]) -> Any:
        key = self.key(pipe, photos)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        paths = [str(p) for p in photos]
        try:
            embedding = pipe.encode_identity(paths if len(paths) > 1 else paths[0])
        except (FaceNotFoundError, InputImageError) as exc:
            raise type(exc)(_short(str(exc), list(photos))) from None
        with self._lock:
            self.misses += 1
            self._items[key] = embedding
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return embedding
