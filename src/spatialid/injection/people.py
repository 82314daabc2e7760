"""Several people in one image: parsing ``people`` / ``regions`` and the mask file format.

An identity call (:class:`~spatialid.injection.identity.PuLIDIdentity`) holds one token tensor per
person and, optionally, one region per person (an upper bound of that person's mask on the token grid, see :mod:`spatialid.masks.multi`).
Recorded masks are written as one safetensors file so a run can be inspected, edited and
replayed (``masks_from``):

* tensor ``masks``: float32 ``[steps, injection_points, persons, batch, rows, cols]``, the mask
  each person got at each injected step of the positive branch (true CFG's negative branch
  computes its own masks and is left out);
* metadata (strings): ``format`` = ``"spatialid-masks/1"``, ``steps`` (JSON list of the 0-based
  denoising steps, one per first axis entry), ``times`` (their sigmas), ``phases`` (schedule
  phase per step), ``persons``, ``grid`` (``"rows x cols"``);
* with people bound to words, tensor ``layout_maps``: float32 ``[steps, persons, batch, rows,
  cols]``, the accumulated word attention each step's layout came from (zeros for people without
  words), and metadata ``words`` (JSON list, null for people without words); replayed with the
  masks (:func:`spatialid.injection.words.layout_replay_table`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spatialid import defaults as D
from spatialid.errors import SpatialIDError
from spatialid.masks.multi import MAX_PEOPLE, box_region, region_from_mask

__all__ = [
    "MASK_FILE_FORMAT",
    "MaskFileError",
    "RegionError",
    "check_people_count",
    "describe_region",
    "load_mask_file",
    "check_replay",
    "mask_replay_table",
    "masks_tensor",
    "parse_box",
    "region_list",
    "regions_tensor",
    "save_mask_file",
    "split_person",
]

MASK_FILE_FORMAT = "spatialid-masks/1"
_BOX = re.compile(r"^\s*[-+0-9.eE]+\s*(,\s*[-+0-9.eE]+\s*){3}$")


class RegionError(SpatialIDError, ValueError):
    """A region is malformed (box numbers, mask picture, count)."""


class MaskFileError(SpatialIDError, ValueError):
    """A mask file cannot be used for this run (missing, damaged, or of another shape)."""


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """``"x0,y0,x1,y1"`` -> four fractions (validated), or None when ``text`` is not a box."""
    if not _BOX.match(str(text)):
        return None
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        return None
    try:
        box_region(values, 1, 1)  # raises on a bad box (1e999 is inf: out of range too)
    except ValueError as exc:
        raise RegionError(str(exc)) from None
    return values  # type: ignore[return-value]


def split_person(entry: Any) -> tuple[Any, Any]:
    """One ``people`` entry -> ``(id_image, id_embeds)``: photos, or an encoded identity.

    A ``.safetensors`` path, an ``IdentityEmbedding`` (anything with ``tokens``) or a tensor is
    an encoded identity; anything else (a photo path, a PIL image, an array, a list of photos of
    that person) is photos.
    """
    if isinstance(entry, torch.Tensor) or hasattr(entry, "tokens"):
        return None, entry
    if isinstance(entry, (str, os.PathLike)) and str(entry).lower().endswith(".safetensors"):
        return None, entry
    return entry, None


def describe_region(region: Any) -> Any:
    """A JSON-ready description of one region for the settings record (box, file name, or kind)."""
    if isinstance(region, str) and parse_box(region) is not None:
        return [float(v) for v in region.split(",")]
    if isinstance(region, (list, tuple)) and len(region) == 4 and all(isinstance(v, (int, float)) for v in region):
        return [float(v) for v in region]
    if isinstance(region, (str, os.PathLike)):
        return Path(region).name
    if isinstance(region, torch.Tensor):
        return f"<tensor {tuple(region.shape)}>"
    filename = getattr(region, "filename", "")
    return Path(filename).name if filename else f"<{type(region).__name__}>"


def _region_grid(region: Any, rows: int, cols: int, index: int) -> torch.Tensor:
    what = f"region {index + 1}"
    if isinstance(region, str) and parse_box(region) is not None:
        return box_region(parse_box(region), rows, cols)  # type: ignore[arg-type]
    if isinstance(region, (list, tuple)):
        try:
            return box_region([float(v) for v in region], rows, cols)
        except (TypeError, ValueError) as exc:
            raise RegionError(f"{what}: {exc}") from None
    if isinstance(region, torch.Tensor):
        values = region.detach().float().cpu()
    else:
        from spatialid.utils.images import load_image

        picture = load_image(region).convert("L")
        values = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
    if values.dim() != 2:
        raise RegionError(f"{what}: a region mask must be one 2-D picture, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()) or float(values.min()) < 0 or float(values.max()) > 1:
        raise RegionError(f"{what}: mask values must be in [0, 1] (white = the person's place)")
    grid = region_from_mask(values, rows, cols)
    if float(grid.max()) <= 0:
        raise RegionError(f"{what}: the mask is black everywhere; paint the person's place white")
    return grid


def region_list(regions: Any) -> list[Any]:
    """``regions`` as a list of one entry per person (a lone box, picture or tensor is one region)."""
    if isinstance(regions, (str, os.PathLike)) or not isinstance(regions, Sequence):
        return [regions]
    if len(regions) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in regions):
        return [regions]
    return list(regions)


def regions_tensor(regions: Any, count: int, rows: int, cols: int) -> torch.Tensor:
    """``[count, rows, cols]`` upper bounds from boxes (``"x0,y0,x1,y1"`` or four numbers), mask
    pictures (path, PIL) or ``[H, W]`` tensors, one per person in order."""
    regions = region_list(regions)
    if len(regions) != count:
        raise RegionError(f"{len(regions)} region(s) for {count} person(s); give one region per person, in order")
    try:
        return torch.stack([_region_grid(r, rows, cols, i) for i, r in enumerate(regions)])
    except ValueError as exc:
        if isinstance(exc, SpatialIDError):
            raise
        raise RegionError(str(exc)) from None


def check_people_count(count: int) -> None:
    if not 1 <= count <= MAX_PEOPLE:
        raise SpatialIDError(f"{count} people given; between 1 and {MAX_PEOPLE} people per image are supported")


def masks_tensor(records: Sequence[Any], rows: int, cols: int) -> tuple[torch.Tensor, list[int], list[float], list[str]]:
    """The positive branch's records as ``[steps, points, persons, batch, rows, cols]`` float32."""
    by_step: dict[int, list[Any]] = {}
    for rec in records:
        if rec.branch != "uncond":
            by_step.setdefault(rec.step, []).append(rec)
    steps = sorted(by_step)
    stacks, times, phases = [], [], []
    for step in steps:
        recs = sorted(by_step[step], key=lambda r: r.point)
        per_point = [r.mask.float() if r.mask.dim() == 3 else r.mask.float().unsqueeze(0) for r in recs]
        stack = torch.stack(per_point)  # [P, K, B, N]
        stacks.append(stack.reshape(*stack.shape[:3], rows, cols))
        times.append(float(recs[0].t))
        phases.append(str(recs[0].phase))
    if not stacks:
        return torch.zeros(0, 0, 0, 0, rows, cols), [], [], []
    return torch.stack(stacks), steps, times, phases


def save_mask_file(
    path: str | os.PathLike[str], records: Sequence[Any], rows: int, cols: int,
    layout_maps: dict[int, torch.Tensor] | None = None, words: Sequence[str | None] | None = None,
) -> Path:
    """Write the recorded masks (and the word maps of people bound to words; see the module
    docstring) atomically; returns the path."""
    from safetensors.torch import save

    from spatialid.utils.io import atomic_write_bytes

    masks, steps, times, phases = masks_tensor(records, rows, cols)
    meta = {
        "format": MASK_FILE_FORMAT,
        "steps": json.dumps(steps),
        "times": json.dumps(times),
        "phases": json.dumps(phases),
        "persons": str(int(masks.shape[2])),
        "grid": f"{rows}x{cols}",
    }
    tensors = {"masks": masks.contiguous()}
    if layout_maps and steps:
        shape = (int(masks.shape[2]), int(masks.shape[3]), rows, cols)
        tensors["layout_maps"] = torch.stack([layout_maps[s].float().reshape(shape) for s in steps]).contiguous()
        meta["words"] = json.dumps(list(words or []))
    return atomic_write_bytes(path, save(tensors, metadata=meta))


_MAX_MASK_HEADER = 2**20  # a mask file's header (tensor names, steps, times, phases) is a few kB
_MAX_MASK_STEP = 10_000  # denoising steps are at most settings.MAX_STEPS (1000); the replay table has one row per step


def _mask_steps(p: Path, text: Any) -> list[int]:
    """The ``steps`` metadata of a mask file: a JSON list of whole step numbers (one line otherwise)."""
    if text is None:
        raise MaskFileError(f"{p}: no 'steps' metadata; give a file written by --save-masks")
    try:
        steps = json.loads(text)
    except (ValueError, RecursionError):
        steps = None
    if not isinstance(steps, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and -_MAX_MASK_STEP <= s < _MAX_MASK_STEP for s in steps
    ):
        shown = str(text) if len(str(text)) <= 40 else str(text)[:37] + "..."
        raise MaskFileError(f"{p}: 'steps' metadata {shown!r} is not a list of whole step numbers below {_MAX_MASK_STEP}; "
                            "give a file written by --save-masks")
    return steps


def load_mask_file(path: str | os.PathLike[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a mask file: ``(masks [S, P, K, B, rows, cols] float32, metadata with parsed lists)``."""
    from safetensors import SafetensorError, safe_open

    p = Path(os.path.expanduser(path))  # Path.expanduser raises RuntimeError for "~nosuchuser"
    if not p.is_file():
        raise MaskFileError(f"{p}: mask file not found (write one with --save-masks)")
    try:
        with p.open("rb") as fh:  # the header is parsed whole: a hostile length must not reach safetensors
            head = fh.read(8)
    except OSError as exc:
        raise MaskFileError(f"{p}: cannot read the mask file ({exc.strerror or exc})") from None
    if len(head) == 8 and int.from_bytes(head, "little") > _MAX_MASK_HEADER:
        raise MaskFileError(f"{p}: header of {int.from_bytes(head, 'little'):,} bytes, not a mask file written by "
                            "--save-masks (a few kB)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "masks" not in set(f.keys()):
                raise MaskFileError(f"{p}: no 'masks' tensor; give a file written by --save-masks")
            masks = f.get_tensor("masks")
        steps = _mask_steps(p, meta.get("steps"))
    except MaskFileError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # a damaged or foreign file
        raise MaskFileError(f"{p}: not a mask file written by --save-masks ({type(exc).__name__})") from None
    if masks.dim() != 6 or masks.dtype != torch.float32:
        raise MaskFileError(f"{p}: 'masks' must be float32 [steps, points, persons, batch, rows, cols], got {tuple(masks.shape)}")
    if len(steps) != masks.shape[0]:
        raise MaskFileError(f"{p}: metadata lists {len(steps)} steps but the tensor has {masks.shape[0]}")
    if not bool(torch.isfinite(masks).all()) or (masks.numel() and float(masks.min()) < 0):
        raise MaskFileError(f"{p}: masks must be finite and >= 0")
    if masks.numel() and float(masks.max()) > D.MAX_MASK_VALUE:  # the command line refuses these before loading too
        raise MaskFileError(f"{p}: mask values must be finite and in [0, 1] (0 = no identity, 1 = full)")
    parsed: dict[str, Any] = {**meta, "steps": steps}
    for key in ("times", "phases"):
        try:
            parsed[key] = list(json.loads(meta.get(key, "[]")))
        except (ValueError, TypeError, RecursionError):  # odd metadata of a file from elsewhere
            parsed[key] = []
    return masks, parsed


def mask_replay_table(path: str | os.PathLike[str]) -> tuple[torch.Tensor, list[int]]:
    """``path``'s masks as a replay table ``[last_step + 1, points, persons, batch, rows, cols]`` and its steps.

    Row ``s`` holds the masks of denoising step ``s``, so the injector indexes it with the step
    of each positive-branch call (a tensor index: replay runs inside compiled graphs too). Read
    once, when the identity is made; :func:`check_replay` compares it with a run.
    """
    masks, meta = load_mask_file(path)
    steps = [s for s in meta["steps"] if s >= 0]
    table = torch.zeros(max([*steps, 0]) + 1, *masks.shape[1:], dtype=torch.float32)
    for i, step in enumerate(meta["steps"]):
        if step >= 0:
            table[step] = masks[i]
    return table, steps


def check_replay(
    name: str, table: torch.Tensor, recorded: Sequence[int], *, points: int, persons: int, batch: int, rows: int, cols: int,
    steps: Sequence[int],
) -> None:
    """Refuse a replay table that does not fit this run (people, size, number of images, steps)."""
    want = (points, persons, batch, rows, cols)
    if tuple(table.shape[1:]) != want:
        raise MaskFileError(
            f"{name}: masks are [points, persons, batch, rows, cols] = {tuple(table.shape[1:])} but this run "
            f"needs {want}; use the same people, size, number of images and model"
        )
    missing = sorted(set(steps) - set(recorded))
    if missing:
        raise MaskFileError(
            f"{name}: no masks for step(s) {', '.join(map(str, missing))}; use the same steps and start step"
        )
