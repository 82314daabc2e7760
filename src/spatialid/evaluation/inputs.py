"""What ``spatialid eval`` is given, checked before any metric model loads; images read without crashing.

Loading CLIP ViT-L/14, ArcFace and the IQ network takes minutes on a CPU, so a typo in a source
path, a folder that is not a bench output or a JSON file that is not IBench results must fail
first, on one line naming the file and what to give instead. Generated images are another matter:
one damaged PNG among thousands (a killed copy, a full disk) must not cost the whole evaluation, so
:func:`load_rgb` raises :class:`UnreadableImageError`, which the evaluation catches per image and
counts as skipped.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from PIL import Image

from spatialid.bench.results import MANIFEST_NAME, BenchStateError, load_manifest
from spatialid.errors import SpatialIDError

__all__ = [
    "EvalInputError",
    "IncompleteResultsError",
    "NothingScoreableError",
    "UnreadableImageError",
    "check_folder",
    "check_output_folder",
    "check_source",
    "load_rgb",
]


class EvalInputError(BenchStateError):
    """A source, folder or file given to ``eval`` is not what ``eval`` reads."""


class UnreadableImageError(SpatialIDError, ValueError):
    """An image file is truncated, empty or not an image: that image is skipped, not the evaluation."""

    path: Path  # the file
    reason: str  # why it cannot be read, for the report


class NothingScoreableError(SpatialIDError, ValueError):
    """Not one image of the sources could be read, so there is nothing to report."""


class IncompleteResultsError(SpatialIDError, ValueError):
    """Bench results lack items of their grid: their presets would be compared on different items."""


# Errors Pillow raises for damaged files: truncated data (OSError), an unknown format
# (UnidentifiedImageError, an OSError), broken chunks (SyntaxError, struct.error, ValueError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """The fully decoded RGB image of ``path`` (PIL ``convert("RGB")``, as IBench reads it).

    Raises :class:`UnreadableImageError` (``.path``, ``.reason``) for an empty, truncated or
    non-image file, so callers can skip it and say why.
    """
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            reason = "empty file (0 bytes)"
        else:
            with Image.open(p) as img:
                return img.convert("RGB")  # convert decodes every pixel: truncation shows here
    except Image.UnidentifiedImageError:
        reason = "not an image file Pillow can read"
    except _DECODE_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    err = UnreadableImageError(f"cannot read image {p}: {reason}")
    err.path, err.reason = p, reason
    raise err


def check_source(path: str | os.PathLike[str]) -> str:
    """``"bench"`` for a bench output folder, ``"ibench"`` for an IBench results JSON; else a one-line error."""
    p = Path(path)
    if not p.exists():
        raise EvalInputError(f"{p} does not exist (give a `spatialid bench` --out folder or an IBench results .json)")
    if p.is_dir():
        if not (p / MANIFEST_NAME).is_file():
            raise EvalInputError(
                f"{p} is not a spatialid bench output folder (no {MANIFEST_NAME}): give the --out folder of "
                "`spatialid bench`, or an IBench results .json file"
            )
        load_manifest(p)  # a damaged or foreign bench.json: BenchStateError naming it
        return "bench"
    if p.suffix.lower() != ".json":
        raise EvalInputError(
            f"{p} is neither a bench output folder nor an IBench results .json; give a `spatialid bench` --out folder "
            'or a results file {"datas": [...]}'
        )
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalInputError(f"cannot read {p}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise EvalInputError(
            f'{p} is not valid JSON (line {exc.lineno}: {exc.msg}); give an IBench results file {{"datas": [...]}}'
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("datas"), list):
        raise EvalInputError(
            f'{p} does not hold IBench results (no "datas" list); give an IBench results file '
            '{"datas": [{"id", "prompt", "imagewithid", ...}]} or a bench output folder'
        )
    return "ibench"


def check_folder(path: str | os.PathLike[str] | None, flag: str, what: str) -> None:
    """An optional folder argument must name an existing folder (a typo would only show after the models load)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalInputError(f"{flag} {p} does not exist; give {what}")
    if not p.is_dir():
        raise EvalInputError(f"{flag} {p} is not a folder; give {what}")


def check_output_folder(path: str | os.PathLike[str], flag: str = "--out") -> None:
    """The report folder may be new, but not an existing file (it would fail after every image was scored)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise EvalInputError(f"{flag} {p} is a file, not a folder; give a folder for the report files")
