"""The web UI's several people, picture editing and LoRA inputs, as plain functions (no Gradio).

The form gives person 1's photos (the page's main photo box) plus up to three more people, each
with photos and an optional region typed as ``x0,y0,x1,y1`` fractions; an init image (img2img)
with a strength, an inpainting mask painted on it (identity repair) and a LoRA list. This module
turns those form values into what :func:`spatialid.app.job.run_job` and the pipelines take, the
same way ``spatialid generate --person/--region/--init-image/--inpaint-mask/--lora`` does, so the
PNG metadata of a web run is the CLI's. Every problem is one line (:class:`UIInputError`).

Why a separate module: :mod:`spatialid.ui.handlers` stays the single-person path, untouched when
none of these inputs is used (one person, no region, no init image, no LoRA run exactly as before).
The photo checks it shares with that path are in :mod:`spatialid.ui.inputs`; the run
(:mod:`spatialid.ui.generation`) uses this module, and nothing here imports either of those two.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spatialid import defaults as D
from spatialid.errors import SpatialIDError
from spatialid.pipeline.settings import GenerationSettings
from spatialid.ui.inputs import (
    IdentityCache,
    UIInputError,
    UILimits,
    _path_of,
    collect_photos,
    preview_identity,
    visitor_text,
)

__all__ = [
    "ActiveModes",
    "MAX_LORAS",
    "MAX_PEOPLE",
    "PictureInputs",
    "build_inputs",
    "editor_mask",
    "extra_metadata",
    "identity_for",
    "active_modes",
    "init_size",
    "lora_choices",
    "lora_lines",
    "loras_loaded",
    "parse_lora_lines",
    "parse_region",
    "people_names",
    "person_check",
    "person_preview",
    "pipeline_for",
    "restore_inputs",
]

#: People per image (the injector's limit, :data:`spatialid.masks.multi.MAX_PEOPLE`).
MAX_PEOPLE = 4
#: LoRAs per request: each one is loaded into the shared transformer for the run, then unloaded.
MAX_LORAS = 4
#: Largest |scale| of a LoRA line; beyond it a LoRA only breaks the image.
MAX_LORA_SCALE = D.MAX_LORA_SCALE  # the CLI's --lora bound too (defaults.py)


@dataclass(frozen=True)
class PictureInputs:
    """The checked extra inputs of one request (empty = the single-person text-to-image path)."""

    people: tuple[tuple[Path, ...], ...] = ()  # every person's photos, person 1 first (only with 2+ people)
    regions: tuple[tuple[float, float, float, float], ...] | None = None  # one box per person, or none
    init_image: Path | None = None
    inpaint_mask: Path | None = None
    strength: float | None = None
    loras: tuple[str, ...] = ()
    names: tuple[tuple[str, ...], ...] = field(default=(), compare=False)  # the photos' names as uploaded
    size: tuple[int, int] | None = None  # the output size an init image sets (multiples of 16, within the cap)
    words: tuple[str | None, ...] = ()  # each person's words of the prompt (typed in the region field), or none

    @property
    def several(self) -> bool:
        return len(self.people) > 1

    @property
    def mode(self) -> str:
        """The pipeline that runs: text2image, img2img (init image) or inpaint (init image + mask)."""
        if self.init_image is None:
            return "text2image"
        return "inpaint" if self.inpaint_mask is not None else "img2img"

    def apply(self, settings: GenerationSettings) -> GenerationSettings:
        """``settings`` with the people, regions, pipeline inputs and LoRAs of this form."""
        changes: dict[str, Any] = {}
        if self.several:
            changes["people"] = [list(n) for n in self.names]
        if self.regions is not None:
            changes["regions"] = [list(r) for r in self.regions]
        if self.init_image is not None:
            changes.update(pipeline=self.mode, init_image=str(self.init_image), strength=self.strength)
            if self.size is not None:  # the init image's size, as `generate --init-image` without --size
                changes.update(width=self.size[0], height=self.size[1])
            if self.inpaint_mask is not None:
                changes["inpaint_mask"] = str(self.inpaint_mask)
        if self.loras:
            changes["loras"] = list(self.loras)
        return settings.replace(**changes) if changes else settings


def parse_region(text: Any, person: int) -> tuple[float, float, float, float] | None:
    """A typed region ``x0,y0,x1,y1`` (fractions of width and height) -> four floats; empty -> None."""
    from spatialid.pipeline.people import parse_box

    value = "" if text is None else " ".join(str(text).split())  # shown in one line
    if not value:
        return None
    try:
        box = parse_box(value)
    except ValueError as exc:
        raise UIInputError(f"region of person {person} ({value}): {' '.join(str(exc).split())}") from None
    if box is None:
        raise UIInputError(
            f"region of person {person} ({value}): give four fractions x0,y0,x1,y1, e.g. 0,0,0.5,1 for the left half"
        )
    return box


def parse_place(text: Any, person: int) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """A region field: a box (:func:`parse_region`) or words of the prompt (text with a letter) -> ``(box, words)``."""
    value = "" if text is None else " ".join(str(text).split())
    if any(c.isalpha() for c in value.replace("e", "").replace("E", "")):  # (1e-1 is a number)
        return None, value.lstrip("@").strip()[:200] or None
    return parse_region(value, person), None


def people_names(people: Sequence[Sequence[Path]]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(Path(p).name for p in photos) for photos in people)


def parse_lora_lines(text: Any, lora_dir: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """One ``NAME[:SCALE]`` per line (blank lines and ``#`` comments skipped), checked like ``--lora``.

    Visitors name LoRA *files of the operator's* ``serve --lora-dir`` only: a path of the server's
    disk or a hub id typed in a browser would let any visitor probe the server's files or make it
    download arbitrary repositories. Without ``lora_dir`` the LoRA list is off. Returns the lines
    with each name replaced by its full path.
    """
    from spatialid.app.sources import check_lora_files
    from spatialid.loaders.names import parse_lora

    lines = [line.strip() for line in str(text or "").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        return ()
    if lora_dir is None:
        raise UIInputError("LoRAs are off on this server (its operator can offer the files of a folder with serve --lora-dir DIR)")
    root = Path(lora_dir).expanduser().resolve()
    resolved = []
    for line in lines:
        source, scale = parse_lora(line)
        name = source.strip()
        try:
            path = (root / name).resolve()
        except (OSError, ValueError):  # a NUL byte or a lone surrogate names no file of the folder
            path = root
        if name and not path.is_file() and (root / f"{name}.safetensors").is_file():
            path = (root / f"{name}.safetensors").resolve()  # named without the suffix, as the menu shows it
        if (not name or "/" in name or "\\" in name or name.startswith(".") or path.parent != root or not path.is_file()
                or path.suffix != ".safetensors"):  # only the .safetensors files directly in --lora-dir
            offered = ", ".join(sorted(p.name for p in root.glob("*.safetensors"))[:8]) or "none"
            raise UIInputError(f"LoRA {name!r} is not one of this server's LoRA files (offered: {offered})")
        resolved.append(f"{path}:{scale:g}" if ":" in line else str(path))
    lines = resolved
    if len(lines) > MAX_LORAS:
        raise UIInputError(f"{len(lines)} LoRAs listed; use at most {MAX_LORAS} (one FILE_OR_HUB_ID[:SCALE] per line)")
    for line in lines:
        source, scale = parse_lora(line)
        if not source.strip():
            raise UIInputError(f"LoRA line {line!r}: give a .safetensors file or a hub id before the scale")
        if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
            raise UIInputError(f"LoRA {Path(source).name}: scale must be between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, got {scale:g}")
    try:
        check_lora_files(lines)
    except SpatialIDError as exc:
        raise UIInputError(visitor_text(str(exc).replace("--lora ", "LoRA ", 1), root)) from None  # names, not the folder
    return tuple(lines)


def lora_choices(lora_dir: str | os.PathLike[str] | None) -> list[str]:
    """The LoRA files of ``serve --lora-dir``, named as the menu shows them (without ``.safetensors``)."""
    if not lora_dir:
        return []
    return sorted(p.stem for p in Path(lora_dir).glob("*.safetensors") if p.is_file())


def lora_lines(names: Any, weight: Any) -> str:
    """The menu's picked LoRAs and the weight slider as ``NAME:WEIGHT`` lines (what :func:`parse_lora_lines` reads)."""
    picked = [names] if isinstance(names, str) else list(names or [])
    try:
        scale = float(weight if weight is not None else 1.0)
    except (TypeError, ValueError):
        raise UIInputError(f"LoRA weight must be a number, got {weight!r}") from None
    return "\n".join(f"{name}:{scale:g}" for name in picked if str(name).strip())


def _as_array(value: Any) -> np.ndarray | None:
    """An editor part (array, PIL image or file path) as an array; None when empty."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Image.Image):
        return np.asarray(value)
    if isinstance(value, Mapping):
        value = value.get("path") or value.get("url")
        if value is None:
            return None
    with Image.open(str(value)) as im:
        return np.asarray(im.convert("RGBA"))


def editor_mask(layers: Any, size: tuple[int, int]) -> Image.Image | None:
    """The brush strokes of an image editor's layers as an inpainting mask (white = painted), or None.

    Painted means any layer pixel that is not fully transparent; a layer without alpha counts
    where it is not black. ``size`` is the init image's (width, height): layers of another size
    are resized to it.
    """
    painted: np.ndarray | None = None
    for layer in layers or []:
        array = _as_array(layer)
        if array is None or array.size == 0:
            continue
        if array.ndim == 3 and array.shape[-1] == 4:
            hit = array[..., 3] > 0
        else:
            hit = (array.reshape(*array.shape[:2], -1).max(axis=-1) if array.ndim == 3 else array) > 0
        picture = Image.fromarray(hit.astype(np.uint8) * 255, mode="L")
        if picture.size != size:
            picture = picture.resize(size, Image.Resampling.NEAREST)
        hit = np.asarray(picture) > 0
        painted = hit if painted is None else (painted | hit)
    if painted is None or not painted.any():
        return None
    return Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def _editor_parts(value: Any) -> tuple[Any, Any]:
    """``(background, layers)`` of a ``gr.ImageEditor`` value, or of a plain image / path (no layers)."""
    if value is None:
        return None, []
    if isinstance(value, Mapping):
        return value.get("background"), list(value.get("layers") or [])
    return value, []


def _save_png(picture: Image.Image, path: Path) -> Path:
    from spatialid.utils.io import atomic_save_image

    atomic_save_image(picture, path, format="PNG")
    return path


def build_inputs(
    first_photos: Sequence[Path],
    *,
    first_region: Any = "",
    people_count: Any = 1,
    others: Sequence[tuple[Any, Any]] = (),
    init_image: Any = None,
    mask_upload: Any = None,
    strength: Any = None,
    loras: Any = "",
    folder: Path | None = None,
    limits: UILimits | None = None,
) -> PictureInputs:
    """Check the people, regions, init image / mask, strength and LoRAs of the form (one line per problem).

    ``first_photos`` are person 1's (already checked by :func:`~spatialid.ui.inputs.collect_photos`);
    ``others`` holds ``(photos, region)`` of persons 2-4, of which the first ``people_count - 1``
    are on the page. ``init_image`` is an image editor value (its brush layers become the
    inpainting mask) or a picture; ``mask_upload`` an optional mask picture (white = redraw). The
    pictures are written as PNGs into ``folder`` (the click's folder) so their names reach the metadata.
    """
    try:
        count = int(people_count or 1)
    except (TypeError, ValueError):
        raise UIInputError(f"number of people must be 1 to {MAX_PEOPLE}, got {people_count!r}") from None
    if not 1 <= count <= MAX_PEOPLE:
        raise UIInputError(f"{count} people; between 1 and {MAX_PEOPLE} people per image are supported")
    people: list[tuple[Path, ...]] = [tuple(first_photos)]
    first_box, first_words = parse_place(first_region, 1)
    boxes: list[tuple[float, float, float, float] | None] = [first_box]
    words: list[str | None] = [first_words]
    for number, (photos, region) in enumerate(list(others)[: count - 1], start=2):
        if not photos:
            raise UIInputError(f"person {number} has no photo: upload one or more photos of that person, or remove them")
        try:
            paths = collect_photos(photos, limits or UILimits())
        except SpatialIDError as exc:
            raise UIInputError(f"person {number}: {' '.join(str(exc).split())}") from None
        people.append(tuple(paths))
        box, person_words = parse_place(region, number)
        boxes, words = [*boxes, box], [*words, person_words]
    given = [i + 1 for i, b in enumerate(boxes) if b is not None]
    if given and any(words):
        raise UIInputError("give every person a region, or bind people to words of the prompt, not both")
    if given and len(given) != len(boxes):
        missing = next(i + 1 for i, b in enumerate(boxes) if b is None)
        raise UIInputError(
            f"person {missing} has no region but person {given[0]} has one; give a region (x0,y0,x1,y1) for every person or for none"
        )
    regions = tuple(b for b in boxes if b is not None) if given else None

    background, layers = _editor_parts(init_image)
    init_path = mask_path = None
    value = None
    size: tuple[int, int] | None = None
    if background is not None:
        array = _as_array(background)
        if array is None or array.size == 0:
            background = None
        else:
            init = Image.fromarray(array).convert("RGB")
            mask = editor_mask(layers, init.size)
            if mask_upload is not None:
                from spatialid.utils.images import load_image

                uploaded = load_image(_path_of(mask_upload)).convert("L")
                if uploaded.size != init.size:
                    (mw, mh), (iw, ih) = uploaded.size, init.size
                    raise UIInputError(f"the inpainting mask is {mw}x{mh} but the init image is {iw}x{ih}; give a mask of the same size")
                if not (np.asarray(uploaded) > 0).any():
                    raise UIInputError("the inpainting mask is black everywhere; paint the place to redraw white")
                mask = uploaded if mask is None else Image.fromarray(np.maximum(np.asarray(mask), np.asarray(uploaded)))
            where = folder if folder is not None else Path(".")
            where.mkdir(parents=True, exist_ok=True)
            init_path = _save_png(init, where / "init-image.png")
            if mask is not None:
                mask_path = _save_png(mask, where / "inpaint-mask.png")
            default = D.DEFAULT_INPAINT_STRENGTH if mask is not None else D.DEFAULT_IMG2IMG_STRENGTH
            value = _strength(strength, default)
            size = init_size(init.size, (limits or UILimits()).max_side)
    elif mask_upload is not None:
        raise UIInputError("an inpainting mask needs an init image: upload the picture to repair first")
    return PictureInputs(
        people=tuple(people) if len(people) > 1 else (),
        regions=regions,
        init_image=init_path,
        inpaint_mask=mask_path,
        strength=value,
        loras=parse_lora_lines(loras, (limits or UILimits()).lora_dir),
        names=people_names(people) if len(people) > 1 else (),
        size=size,
        words=tuple(words) if any(words) else (),
    )


def init_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The output size for an init image of ``size``: as ``generate --init-image`` without ``--size``
    (each side down to a multiple of 16, at least 64), scaled down to fit this server's ``max_side``."""
    width, height = size
    scale = min(1.0, max_side / max(width, height, 1))
    return tuple(max(64, int(v * scale) // 16 * 16) for v in (width, height))  # type: ignore[return-value]


def _strength(value: Any, default: float) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UIInputError(f"strength must be a number in (0, 1], got {value!r}") from None
    if not math.isfinite(number) or not 0.0 < number <= 1.0:
        raise UIInputError(f"strength must be in (0, 1] (the share of the init image redrawn), got {value!r}")
    return number


@dataclass(frozen=True)
class ActiveModes:
    """What the form's folded sections make Generate do, for the status line and the section headers."""

    parts: tuple[str, ...] = ()  # e.g. ("img2img, strength 0.6", "2 people", "regions", "LoRA style:0.8")
    people_header: str = f"Several people (up to {MAX_PEOPLE})"
    edit_header: str = "Edit a picture / LoRA"

    @property
    def line(self) -> str:
        """One line for the page: ``Active: img2img, strength 0.6 · 2 people`` or the plain mode."""
        if not self.parts:
            return "Mode: text to image, one person (nothing in the folded sections)."
        return "**Active**: " + " · ".join(self.parts) + " (each folded section has its **Clear**)."


def _has_picture(value: Any) -> bool:
    background, _ = _editor_parts(value)
    return background is not None


def _painted(value: Any) -> bool:
    _, layers = _editor_parts(value)
    for layer in layers:
        with contextlib.suppress(OSError, ValueError):
            array = _as_array(layer)
            if array is not None and array.size and (array[..., 3] > 0 if array.ndim == 3 and array.shape[-1] == 4 else array > 0).any():
                return True
    return False


def active_modes(
    *,
    init_image: Any = None,
    mask_upload: Any = None,
    strength: Any = None,
    people_count: Any = 1,
    regions: Sequence[Any] = (),
    loras: Any = None,
    lora_weight: Any = None,
) -> ActiveModes:
    """Which non-default inputs are set, so leftovers in a folded section never change a run silently.

    ``regions`` are the typed regions of person 1 to 4 (only the first ``people_count`` count).
    """
    try:
        count = max(1, min(MAX_PEOPLE, int(people_count or 1)))
    except (TypeError, ValueError):
        count = 1
    people_parts, edit_parts = [], []
    if count > 1:
        people_parts.append(f"{count} people")
    typed = [" ".join(str(r or "").split()) for r in list(regions)[:count]]
    if any(t and not any(c.isalpha() for c in t) for t in typed):
        people_parts.append("regions" if count > 1 else "a region for person 1")
    people_parts += ["people bound to words"] if any(any(c.isalpha() for c in t) for t in typed) else []
    if _has_picture(init_image):
        mode = "inpainting" if mask_upload is not None or _painted(init_image) else "img2img"
        try:
            edit_parts.append(f"{mode}, strength {float(strength):g}" if strength is not None else mode)
        except (TypeError, ValueError):
            edit_parts.append(mode)
    elif mask_upload is not None:
        edit_parts.append("an inpainting mask without an init image")
    picked = [loras] if isinstance(loras, str) and loras else list(loras or [])
    if picked:
        weight = "" if lora_weight is None else f":{float(lora_weight):g}"
        edit_parts.append("LoRA " + ", ".join(f"{name}{weight}" for name in picked))
    people_header = f"Several people (up to {MAX_PEOPLE})"
    if people_parts:
        people_header += ": ON, " + ", ".join(people_parts)
    edit_header = "Edit a picture / LoRA"
    if edit_parts:
        edit_header += ": ON, " + ", ".join(edit_parts)
    return ActiveModes(tuple(people_parts + edit_parts), people_header, edit_header)


def input_record(inputs: PictureInputs) -> dict[str, Any]:
    """The files and values of one run's extra inputs, kept by the server with its history entry so a
    click on that entry can put them back (never read from an image's metadata: a dropped file must
    not make the server open paths it names)."""
    return {
        "people": [[str(p) for p in person] for person in inputs.people[1:]],
        "init_image": str(inputs.init_image) if inputs.init_image else None,
        "inpaint_mask": str(inputs.inpaint_mask) if inputs.inpaint_mask else None,
    }


def _is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)


def restore_inputs(
    data: Mapping[str, Any], record: Mapping[str, Any] | None = None, *, lora_dir: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The people, regions, init image, mask, strength and LoRAs of an image's settings, for the form.

    ``record`` is the server's own :func:`input_record` of that run (a history click); without it
    (a dropped PNG) the files cannot come back, only the values. Returns the form values (keys
    ``count``, ``photos`` (persons 2-4), ``regions`` (persons 1-4), ``init_image``, ``inpaint_mask``,
    ``strength``, ``loras``, ``lora_weight``) and what could not be restored, one short phrase each.
    """
    record = record or {}
    missing: list[str] = []
    people = [list(p) for p in data.get("people") or [] if isinstance(p, (list, tuple))]
    count = max(1, min(MAX_PEOPLE, len(people)))
    kept = list(record.get("people") or [])
    photos: list[Any] = [None] * (MAX_PEOPLE - 1)
    for number in range(2, count + 1):
        files = kept[number - 2] if number - 2 < len(kept) else None
        if files and all(Path(f).is_file() for f in files):
            photos[number - 2] = list(files)
        else:
            missing.append(f"the photos of person {number} ({', '.join(map(str, people[number - 1])) or '?'}): upload them")
    if len(people) > MAX_PEOPLE:
        missing.append(f"people {MAX_PEOPLE + 1}-{len(people)} (at most {MAX_PEOPLE} here)")
    boxes = data.get("regions") or []
    regions = [",".join(f"{float(v):g}" for v in b) if _is_box(b) else "" for b in list(boxes)[:MAX_PEOPLE]]
    if any(isinstance(b, str) for b in boxes):
        missing.append("mask-picture regions (type boxes instead)")
    regions += [""] * (MAX_PEOPLE - len(regions))
    stored = (data.get("identity") or {}).get("people") if isinstance(data.get("identity"), Mapping) else None
    for k, entry in enumerate(stored[:MAX_PEOPLE] if isinstance(stored, list) else []):  # words back in their field
        if isinstance(entry, Mapping) and isinstance(entry.get("words"), str) and not regions[k]:
            regions[k] = " ".join(entry["words"].split())[:200]
    init = mask = None
    if data.get("pipeline") in ("img2img", "inpaint"):
        init = record.get("init_image") if record.get("init_image") and Path(record["init_image"]).is_file() else None
        if init is None:
            missing.append(f"the init image ({data.get('init_image') or '?'}): upload it")
        if data.get("pipeline") == "inpaint":
            mask = record.get("inpaint_mask") if record.get("inpaint_mask") and Path(record["inpaint_mask"]).is_file() else None
            if mask is None:
                missing.append(f"the inpainting mask ({data.get('inpaint_mask') or '?'}): upload it")
    elif data.get("pipeline") not in (None, "text2image"):
        missing.append(f"the {data.get('pipeline')} pipeline (command line only)")
    offered = set(lora_choices(lora_dir))
    names, weight = [], None
    for item in data.get("loras") or []:
        source, _, scale = str(item).rpartition(":") if ":" in str(item) else (str(item), "", "1")
        stem = Path(source).stem
        if stem in offered:
            names.append(stem)
            with contextlib.suppress(ValueError):
                weight = float(scale) if weight is None else weight
        else:
            missing.append(f"LoRA {Path(source).name} (not offered by this server)")
    strength = data.get("strength") if isinstance(data.get("strength"), (int, float)) else None
    values = dict(count=count, photos=photos, regions=regions, init_image=init, inpaint_mask=mask,
                  strength=strength, loras=names, lora_weight=weight)
    return values, missing


def identity_for(pipe: Any, photos: Sequence[Path], inputs: PictureInputs, cache: IdentityCache) -> Any:
    """One embedding for one person; a list with one embedding per person (``people=``) for several.

    Each person goes through ``cache`` on their own, so a face checked on upload is not encoded again.
    """
    if not inputs.several:
        identity = cache.get_or_encode(pipe, photos)
        return [(identity, inputs.words[0])] if inputs.words and inputs.words[0] else identity
    identities: list[Any] = []
    for number, person in enumerate(inputs.people, start=1):
        try:
            identities.append(cache.get_or_encode(pipe, person))
        except SpatialIDError as exc:
            raise type(exc)(f"person {number}: {' '.join(str(exc).split())}") from None
    if inputs.words:  # (identity, words): placed where FLUX's attention puts those words
        return [(identity, w) if w else identity for identity, w in zip(identities, inputs.words)]
    return identities


def person_check(
    pipe: Any,
    photos: Any,
    number: int,
    *,
    cache: IdentityCache,
    limits: UILimits | None = None,
    lock: threading.Lock | None = None,
) -> str:
    """The face check of person ``number`` right after their upload: one line (found, or why not)."""
    return person_preview(pipe, photos, number, cache=cache, limits=limits, lock=lock)[1]


def person_preview(
    pipe: Any,
    photos: Any,
    number: int,
    *,
    cache: IdentityCache,
    limits: UILimits | None = None,
    lock: threading.Lock | None = None,
) -> tuple[list[tuple[Any, str]], str]:
    """Person ``number``'s thumbnails with the aligned face found (as person 1's box shows them) and the line."""
    if not photos:
        return [], ""
    thumbs, line = preview_identity(pipe, photos, cache=cache, limits=limits or UILimits(), lock=lock)
    if line.startswith("Face found"):
        count = len(photos) if isinstance(photos, (list, tuple)) else 1
        return thumbs, f"Person {number}: face found ({count} photo{'s' if count != 1 else ''})."
    return thumbs, f"Person {number}: {line}"


_VARIANTS_LOCK = threading.Lock()


def pipeline_for(pipe: Any, inputs: PictureInputs) -> Any:
    """The pipeline that runs ``inputs``: ``pipe`` for text-to-image, else diffusers' img2img / inpainting
    pipeline on ``pipe``'s components (built once per mode and kept: FLUX's weights are shared, not copied)."""
    mode = inputs.mode
    if mode == "text2image":
        return pipe
    base = getattr(pipe, "base", pipe)  # a server started on another pipeline still shares its base
    with _VARIANTS_LOCK:
        variants: dict[str, Any] = base.__dict__.setdefault("_spatialid_ui_variants", {})
        if mode not in variants:
            from spatialid.pipeline.variants import (
                IdentityPipelineRunner,
                variant_pipeline,
            )

            runner = IdentityPipelineRunner(variant_pipeline(base, mode), base, mode)
            config = getattr(base, "_progress_bar_config", None)
            if isinstance(config, dict):
                runner.set_progress_bar_config(**config)  # the terminal shows what the server's pipeline shows
            variants[mode] = runner
        return variants[mode]


@contextlib.contextmanager
def loras_loaded(pipe: Any, loras: Sequence[str]) -> Iterator[None]:
    """Load ``loras`` into the shared transformer for one run, and take them out again afterwards.

    The server's pipeline serves every visitor, so a visitor's LoRA must not stay for the next one.
    """
    if not loras:
        yield
        return
    from spatialid.pipeline.variants import load_loras
    from spatialid.utils.offline import is_offline

    base = getattr(pipe, "base", pipe)
    try:
        load_loras(base, list(loras), local_files_only=is_offline())
    except SpatialIDError as exc:
        with contextlib.suppress(Exception):
            base.unload_lora_weights()
        raise UIInputError(" ".join(str(exc).replace("--lora", "LoRA").split())) from None
    try:
        yield
    finally:
        base.unload_lora_weights()


def extra_metadata(settings: GenerationSettings) -> dict[str, Any]:
    """The pipeline fields as the PNG shows them (``app.metadata.pipeline_record``, as ``generate`` writes them); none for plain text-to-image."""
    from spatialid.app.metadata import pipeline_record

    if settings.pipeline == "text2image" and not settings.loras:
        return {}
    return pipeline_record(settings)
