"""Checks that a bench folder's files are what they claim to be, cheaply enough to run on every resume.

A recorded image counts as done only while it is a whole PNG: a file cut short by a copy, a disk
error or an editor would otherwise be counted as done forever and never regenerated. Every image
gets a header check (PNG signature, an IHDR chunk with a valid CRC and a non-zero size, the IEND
chunk at the end: two small reads per file); the few most recently written images, where damage
from a crash or a full disk would be, are decoded fully. Generated images and identity tokens are
checked too: NaN/Inf tokens or latents decode to a constant (usually black) picture, which must be
a failure, not a result.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "FULL_DECODE",
    "check_embedding",
    "check_generated_image",
    "damaged_images",
    "png_decode_problem",
    "png_header_problem",
]

log = logging.getLogger("spatialid.bench")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_MIN_PNG = 8 + 25 + 12 + 12  # signature, IHDR, one IDAT, IEND
FULL_DECODE = 3  # most recent images decoded fully on resume


def png_header_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a whole PNG by its header and trailer, or None when it looks whole."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(33)
            size = os.fstat(fh.fileno()).st_size
            if size < _MIN_PNG:
                return f"{size} bytes, too short for a PNG"
            fh.seek(-12, os.SEEK_END)
            tail = fh.read(12)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head[:8] != PNG_SIGNATURE:
        return "not a PNG (no PNG signature)"
    length, kind = struct.unpack(">I4s", head[8:16])
    if kind != b"IHDR" or length != 13:
        return "no IHDR chunk"
    width, height = struct.unpack(">II", head[16:24])
    if zlib.crc32(head[12:29]) != struct.unpack(">I", head[29:33])[0]:
        return "IHDR chunk damaged (CRC mismatch)"
    if width == 0 or height == 0:
        return f"image size {width}x{height}"
    if tail != _IEND:
        return "cut short (no IEND chunk at the end)"
    return None


def png_decode_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the pixels of ``path`` do not decode, or None when they do (reads the whole image)."""
    from PIL import Image

    from spatialid.pipeline.settings import MAX_SIZE

    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_SIZE * MAX_SIZE:  # by the header: a bomb is never decoded
                return f"{img.width}x{img.height} pixels, larger than any generated image ({MAX_SIZE}x{MAX_SIZE} at most)"
            img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        return f"pixels do not decode ({' '.join(str(exc).split()) or type(exc).__name__})"
    return None


def damaged_images(paths: Iterable[Path], full_decode: int = FULL_DECODE) -> dict[Path, str]:
    """``{path: reason}`` for the images of ``paths`` that are not whole PNGs.

    Header and trailer of every file; full decode of the ``full_decode`` most recently modified
    of those that pass (a kill or a full disk damages the latest writes).
    """
    damaged: dict[Path, str] = {}
    whole: list[tuple[float, Path]] = []
    for path in paths:
        problem = png_header_problem(path)
        if problem is not None:
            damaged[path] = problem
            continue
        try:
            whole.append((os.stat(path).st_mtime, path))
        except OSError as exc:
            damaged[path] = f"unreadable ({exc.strerror or exc})"
    if full_decode > 0:
        whole.sort(key=lambda mp: mp[0], reverse=True)
        for _, path in whole[:full_decode]:
            problem = png_decode_problem(path)
            if problem is not None:
                damaged[path] = problem
    return damaged


def check_generated_image(image: Any) -> None:
    """Refuse a generated image that carries no picture: non-finite values, or one constant colour.

    NaN/Inf in the identity tokens or the latents decodes to such an image (black, mostly); as
    a "success" it would be scored as a real result. Raises ValueError with the reason.
    """
    import numpy as np

    if image.mode in ("F", "I", "I;16"):
        arr = np.asarray(image)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError("generated image holds NaN/Inf values (non-finite latents or identity tokens)")
    extrema = image.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    if any(isinstance(v, float) and not math.isfinite(v) for band in bands for v in band):
        raise ValueError("generated image holds NaN/Inf values (non-finite latents or identity tokens)")
    if all(lo == hi for lo, hi in bands):
        value = bands[0][0]
        raise ValueError(
            f"generated image is one constant colour (every pixel {value}): the model produced no picture, "
            "usually NaN/Inf in the latents or the identity tokens"
        )


def check_embedding(value: Any) -> None:
    """Refuse identity tokens that are not finite float ``[1, tokens, dim]`` tensors (ValueError).

    Checks a tensor, or the ``tokens`` / ``uncond_tokens`` of an identity-embedding object; other
    values (a custom cache format) pass unchecked.
    """
    import torch

    tensors = [("embedding", value)] if isinstance(value, torch.Tensor) else [
        (name, getattr(value, name)) for name in ("tokens", "uncond_tokens") if isinstance(getattr(value, name, None), torch.Tensor)
    ]
    for name, t in tensors:
        if t.ndim != 3 or t.shape[0] != 1 or 0 in t.shape:
            raise ValueError(f"identity {name} has shape {tuple(t.shape)}, expected [1, tokens, dim]")
        if not t.is_floating_point():
            raise ValueError(f"identity {name} is {str(t.dtype).replace('torch.', '')}, expected floating point")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"identity {name} holds NaN/Inf values")
