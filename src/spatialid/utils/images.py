"""Loading user images robustly: one function that turns whatever a user hands us into RGB.

Identity photos come from phones, scanners and the web, so :func:`load_image` accepts paths,
``PIL.Image`` objects and numpy arrays and normalises them to an 8-bit RGB ``PIL.Image``:

* EXIF orientation is applied (phone photos are often stored sideways with a rotation tag);
* grayscale, palette, CMYK and 1-bit images are converted to RGB;
* images with transparency (RGBA, LA, palette + transparency) are composited on white, so that
  transparent areas do not turn into arbitrary (often black) colours;
* 16-bit and 32-bit integer images are rescaled to 8 bits (not clipped), float images are read as
  values in [0, 1];
* animated images (GIF, APNG, WebP with several frames) and images above :data:`MAX_IMAGE_PIXELS`
  are refused rather than guessed at or decoded into gigabytes of memory.

Every failure raises :class:`spatialid.errors.InputImageError` with a one-line message that names the
input and says what to do.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spatialid.errors import InputImageError

__all__ = ["MAX_IMAGE_PIXELS", "ImageInput", "load_image", "describe_source"]

# 64 megapixels: larger than any phone photo; anything bigger is refused before decoding. Pillow's
# own bomb guard (~89 MP warning, ~179 MP error) is applied too but is looser than this.
MAX_IMAGE_PIXELS = 64_000_000
# Key in ``PIL.Image.info`` under which load_image records the file an image came from.
SOURCE_KEY = "spatialid.source"

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def describe_source(source: Any) -> str:
    """Short name of an image input for messages (a path, or the kind of object)."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Image.Image):
        if SOURCE_KEY in source.info:
            return str(source.info[SOURCE_KEY])
        return f"PIL image {source.size[0]}x{source.size[1]} {source.mode}"
    if isinstance(source, np.ndarray):
        return f"array {tuple(source.shape)} {source.dtype}"
    return type(source).__name__


def load_image(source: ImageInput, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load ``source`` as an 8-bit RGB ``PIL.Image`` (fully decoded, no open file handle kept).

    Args:
        source: a file path, a ``PIL.Image`` or a numpy array (``HxW``, ``HxWx1``, ``HxWx3`` or
            ``HxWx4``; uint8, uint16, bool, or float in [0, 1]).
        max_pixels: refuse images with more pixels than this (decompression-bomb guard).

    Raises:
        InputImageError: missing file, a directory, not an image, damaged file, animated image,
            too many pixels, or an array of unsupported shape/dtype.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, describe_source(source))
        _check_single_frame(source, describe_source(source))
        return _to_rgb(_exif_transpose(source, describe_source(source)), describe_source(source))
    if isinstance(source, (str, os.PathLike)):
        image = _from_path(Path(os.fspath(source)), max_pixels)
        image.info[SOURCE_KEY] = os.fspath(source)  # so later messages can name the file
        return image
    raise InputImageError(
        f"cannot read an image from a {type(source).__name__}; give a file path, a PIL image or a numpy array"
    )


# ----------------------------------------------------------------------------- files


def _from_path(path: Path, max_pixels: int) -> Image.Image:
    name = str(path)
    if not path.exists():
        raise InputImageError(f"image not found: {name}; check the path")
    if path.is_dir():
        raise InputImageError(f"{name} is a directory, not an image file; give the path of a photo")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputImageError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if not data:
        raise InputImageError(f"{name} is an empty file, not an image")
    with warnings.catch_warnings():
        # Pillow warns (and later raises) on huge images; turn the warning into an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                _check_pixels(im.size, max_pixels, name)  # header only: nothing decoded yet
                _check_single_frame(im, name)
                im.load()
                out = _exif_transpose(im, name)
                return _to_rgb(out, name)
        except InputImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputImageError(
                f"{name} is too large to decode safely (decompression-bomb guard: {exc}); "
                f"resize it below {max_pixels:,} pixels"
            ) from exc
        except UnidentifiedImageError as exc:
            raise InputImageError(
                f"{name} is not an image file Pillow can read; give a JPEG, PNG or WebP photo"
            ) from exc
        except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError) as exc:
            # truncated / corrupt data: Pillow's plugins raise all of these (a TIFF without sizes: TypeError)
            raise InputImageError(f"{name} is damaged or truncated and cannot be decoded ({exc})") from exc


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InputImageError(f"{name} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InputImageError(
            f"{name} has {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
            "(decompression-bomb guard); resize the photo first"
        )


def _check_single_frame(im: Image.Image, name: str) -> None:
    frames = int(getattr(im, "n_frames", 1) or 1)
    if getattr(im, "is_animated", False) or frames > 1:
        raise InputImageError(
            f"{name} is an animated image with {frames} frames; give a single still photo "
            "(export one frame as PNG or JPEG)"
        )


def _exif_transpose(im: Image.Image, name: str) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not make an otherwise fine photo unusable
        return im
    return out if out is not None else im


# ----------------------------------------------------------------------------- modes


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping high bit depths."""
    mode = im.mode
    if mode == "RGB":
        return im.copy() if im.readonly else im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        return _composite_on_white(im.convert("RGBA"))
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _array_to_rgb(np.asarray(im), name)
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputImageError(f"{name} uses the image mode {mode!r}, which cannot be converted to RGB") from exc


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    name = describe_source(arr)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InputImageError(
            f"cannot use an {name} as an image; expected HxW, HxWx1, HxWx3 or HxWx4"
        )
    _check_pixels((arr.shape[1], arr.shape[0]), max_pixels, name)
    return _array_to_rgb(arr, name)


def _array_to_rgb(arr: np.ndarray, name: str) -> Image.Image:
    """uint8/uint16/int/bool/float arrays (gray, gray+alpha-free, RGB, RGBA) -> 8-bit RGB image."""
    a = np.asarray(arr)
    if a.dtype == np.bool_:
        a8 = a.astype(np.uint8) * 255
    elif a.dtype == np.uint8:
        a8 = a
    elif a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.dtype.itemsize >= 2):
        a = a.astype(np.int64)
        if a.min(initial=0) < 0:
            raise InputImageError(f"{name} has negative pixel values; expected an unsigned image")
        # 16-bit range (images from PNG/TIFF "I" mode are 16-bit values stored as int32).
        top = 65535 if a.max(initial=0) <= 65535 else int(a.max())
        a8 = np.round(a * (255.0 / top)).astype(np.uint8)
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise InputImageError(f"{name} contains NaN or infinite values")
        a8 = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise InputImageError(f"cannot use an {name} as an image; unsupported dtype {a.dtype}")
    if a8.ndim == 3 and a8.shape[2] == 1:
        a8 = a8[:, :, 0]
    if a8.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a8)).convert("RGB")
    if a8.shape[2] == 4:
        return _composite_on_white(Image.fromarray(np.ascontiguousarray(a8)))
    return Image.fromarray(np.ascontiguousarray(a8))
