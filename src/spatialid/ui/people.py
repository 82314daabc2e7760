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
from spatialid.ui.inputs import IdentityCache, UIInputError, UILimits, _path_of, collect_photos, preview_identity

__all__ = [
    "MAX_LORAS",
    "MAX_PEOPLE",
    "PictureInputs",
    "build_inputs",
    "editor_mask",
    "extra_metadata",
    "identity_for",
    "loras_loaded",
    "parse_lora_lines",
    "parse_region",
    "people_names",
    "person_check",
    "pipeline_for",
]

#: People per image (the injector's limit, :data:`spatialid.masks.multi.MAX_PEOPLE`).
MAX_PEOPLE = 4
#: LoRAs per request: each one is loaded into the shared transformer for the run, then unloaded.
MAX_LORAS = 4
#: Largest |scale| of a LoRA line; beyond it a LoRA only breaks the image.
MAX_LORA_SCALE = 4.0


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
            if self.inpaint_mask is not None:
                changes["inpaint_mask"] = str(self.inpaint_mask)
        if self.loras:
            changes["loras"] = list(self.loras)
        return settings.replace(**changes) if changes else settings


def parse_region(text: Any, person: int) -> tuple[float, float, float, float] | None:
    """A typed region ``x0,y0,x1,y1`` (fractions of width and height) -> four floats; empty -> None."""
    from spatialid.pipeline.people import parse_box

    value = "" if text is None else str(text).strip()
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


def people_names(people: Sequence[Sequence[Path]]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(Path(p).name for p in photos) for photos in people)


def parse_lora_lines(text: Any, lora_dir: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """One ``NAME[:SCALE]`` per line (blank lines and ``#`` comments skipped), checked like ``--lora``.

    Visitors name LoRA *files of the operator's* ``serve --lora-dir`` only: a path of the server's
    disk or a hub id typed in a browser would let any visitor probe the server's files or make it
    download arbitrary repositories. Without ``lora_dir`` the LoRA list is off. Returns the lines
    with each name replaced by its full path.
    """
    from spatialid.app.loading import check_lora_files
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
        path = (root / name).resolve()
        if not name or "/" in name or "\\" in name or name.startswith(".") or path.parent != root or not path.is_file():
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
            raise UIInputError(f"LoRA {source}: scale must be between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, got {scale:g}")
    try:
        check_lora_files(lines)
    except SpatialIDError as exc:
        raise UIInputError(" ".join(str(exc).replace("--lora ", "LoRA ", 1).split())) from None
    return tuple(lines)


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
    boxes: list[tuple[float, float, float, float] | None] = [parse_region(first_region, 1)]
    for number, (photos, region) in enumerate(list(others)[: count - 1], start=2):
        if not photos:
            raise UIInputError(f"person {number} has no photo: upload one or more photos of that person, or remove them")
        try:
            paths = collect_photos(photos, limits or UILimits())
        except SpatialIDError as exc:
            raise UIInputError(f"person {number}: {' '.join(str(exc).split())}") from None
        people.append(tuple(paths))
        boxes.append(parse_region(region, number))
    given = [i + 1 for i, b in enumerate(boxes) if b is not None]
    if given and len(given) != len(boxes):
        missing = next(i + 1 for i, b in enumerate(boxes) if b is None)
        raise UIInputError(
            f"person {missing} has no region but person {given[0]} has one; give a region (x0,y0,x1,y1) for every person or for none"
        )
    regions = tuple(b for b in boxes if b is not None) if given else None

    background, layers = _editor_parts(init_image)
    init_path = mask_path = None
    value = None
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
    )


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


def identity_for(pipe: Any, photos: Sequence[Path], inputs: PictureInputs, cache: IdentityCache) -> Any:
    """One embedding for one person; a list with one embedding per person (``people=``) for several.

    Each person goes through ``cache`` on their own, so a face checked on upload is not encoded again.
    """
    if not inputs.several:
        return cache.get_or_encode(pipe, photos)
    identities = []
    for number, person in enumerate(inputs.people, start=1):
        try:
            identities.append(cache.get_or_encode(pipe, person))
        except SpatialIDError as exc:
            raise type(exc)(f"person {number}: {' '.join(str(exc).split())}") from None
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
    if not photos:
        return ""
    _, line = preview_identity(pipe, photos, cache=cache, limits=limits or UILimits(), lock=lock)
    if line.startswith("Face found"):
        count = len(photos) if isinstance(photos, (list, tuple)) else 1
        return f"Person {number}: face found ({count} photo{'s' if count != 1 else ''})."
    return f"Person {number}: {line}"


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
