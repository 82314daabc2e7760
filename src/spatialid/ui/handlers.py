"""What the web UI does, as plain functions: check the form, run one generation, build the outputs.

Nothing here imports Gradio, so every rule (limits, messages, file names, metadata) is unit-tested
without a server; :mod:`spatialid.ui.app` only wires these functions to components and turns
:class:`~spatialid.errors.SpatialIDError` into ``gr.Error`` popups. Generation goes through the
same :func:`spatialid.app.job.run_job` as ``spatialid generate``, so the PNGs a visitor
downloads carry exactly the CLI's metadata (readable with ``spatialid info``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from spatialid import defaults as D
from spatialid.errors import FaceNotFoundError, InputImageError, SpatialIDError
from spatialid.pipeline.settings import GenerationSettings

__all__ = [
    "ASPECT_RATIOS",
    "HISTORY_SIZE",
    "PLAIN_PRESET_TEXT",
    "TINY_NOTICE",
    "GenerationRequest",
    "IdentityCache",
    "GenerationResult",
    "GenerationStopped",
    "ProgressFn",
    "UIInputError",
    "UILimits",
    "add_to_history",
    "aspect_size",
    "build_request",
    "collect_photos",
    "compare_list",
    "defaults_for",
    "MAX_SEED",
    "parse_seed",
    "photo_set",
    "preset_choices",
    "preset_help",
    "preview_identity",
    "request_cost",
    "run_generation",
    "seed_for_run",
    "settings_from_file",
    "settings_text",
]

_UI_REAL = D.size_steps("ui", tiny=False)

#: ``progress(done, total, description)``; ``done``/``total`` count denoising steps.
ProgressFn = Callable[[int, int, str], None]

#: Image suffixes accepted as identity photos (what Pillow reads for photos in practice).
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".avif")

TINY_NOTICE = (
    "**Tiny demo model.** This server runs `--model tiny`: the real architecture at toy size with "
    "*random weights*, so the generated images are coloured noise **by design**. It exercises the whole "
    "path (face detection -> identity tokens -> masked injection -> image, masks, metadata) on any CPU. "
    "Start the server with a FLUX.1 model (`spatialid serve --model black-forest-labs/FLUX.1-dev`) for real pictures."
)

# One plain sentence per preset for visitors (the technical line from PRESET_DESCRIPTIONS follows it).
PLAIN_PRESET_TEXT: dict[str, str] = {
    "pulid": "The original PuLID: the identity is pushed into every part of the picture at every step.",
    "paper": "SpatialID: the identity goes mostly where the face is, so hair, clothes and background follow the prompt more freely.",
    "relaxed": "SpatialID as the authors ran it for their paper (the default): the face gets most of the identity, the rest of the picture still gets some.",
    "prior-only": "Experiment: the identity goes to the centre of the picture, wherever the face actually ends up.",
    "attention-only": "Experiment: only where the model itself looks at the identity, from the first step to the last.",
    "no-relax": "Experiment: like SpatialID, but the identity stays confined to the face until the very end.",
    "entropy": "Variant of SpatialID that finds the face region from how focused the model's attention is.",
    "late-floor-0.7": "Experiment (the authors' config C): like SpatialID, with more identity left everywhere late on and a wider start.",
    "global-floor-0.3": "Experiment (the authors' config D): like SpatialID, but every part of the picture keeps at least 30% identity.",
    "global-floor-0.5": "Experiment (the authors' config E): like SpatialID, but every part of the picture keeps at least 50% identity.",
}


class UIInputError(SpatialIDError, ValueError):
    """A form value in the web UI is missing or out of range (shown as a one-line popup)."""


class GenerationStopped(SpatialIDError):
    """The visitor pressed Stop: the run ended between two denoising steps and wrote nothing."""


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

    def replace(self, **changes: Any) -> UILimits:
        """A copy with ``changes`` (``None`` values keep the current one: unset CLI flags)."""
        from dataclasses import replace

        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def defaults_for(pipe: Any) -> tuple[GenerationSettings, UILimits]:
    """The form's initial settings and the limits for ``pipe``.

    The tiny model gets the UI's small size and step count (:mod:`spatialid.defaults`) so a click
    takes seconds; a real model starts from the pipeline's own defaults.
    """
    if getattr(pipe, "is_tiny", False):
        small = D.size_steps("ui", tiny=True)
        return (
            GenerationSettings(width=small.width, height=small.height, steps=small.steps),
            UILimits(max_side=512, max_steps=50, unit_steps=small.steps, unit_width=small.width, unit_height=small.height),
        )
    real = D.size_steps("ui", tiny=False)
    width = int(getattr(pipe, "default_width", real.width) or real.width)
    height = int(getattr(pipe, "default_height", real.height) or real.height)
    steps = int(getattr(pipe, "default_num_inference_steps", real.steps) or real.steps)
    limits = UILimits(unit_steps=steps, unit_width=width, unit_height=height)
    return GenerationSettings(width=width, height=height, steps=steps), limits


# ----------------------------------------------------------------------------- presets


def preset_choices() -> list[str]:
    """Preset names in the order of :data:`spatialid.masks.PRESETS` (pulid first, then paper, ...)."""
    from spatialid.masks import PRESETS

    return list(PRESETS)


def preset_help(name: str | None) -> str:
    """Markdown shown under the preset menu: a plain sentence, then the precise rule."""
    from spatialid.masks import PRESET_DESCRIPTIONS, PRESETS

    if not name or name not in PRESETS:
        return "Pick a preset to see what it does."
    plain = PLAIN_PRESET_TEXT.get(name, "")
    technical = PRESET_DESCRIPTIONS.get(name, "")
    parts = [f"**{name}**: {plain}" if plain else f"**{name}**"]
    if technical:
        parts.append(f"<small>{technical}</small>")
    return "<br>".join(parts)


def compare_list(preset: str, chosen: Sequence[str] | None) -> list[str]:
    """The presets of a comparison: those ticked (in menu order), else PuLID vs the chosen preset.

    Always at least two distinct presets, so "compare" shows a difference: ticking one preset adds
    the selected one (or ``paper`` / ``pulid`` when that is the same).
    """
    order = preset_choices()
    picked = [p for p in order if p in set(chosen or [])]
    unknown = [p for p in (chosen or []) if p not in order]
    if unknown:
        raise UIInputError(f"unknown preset {unknown[0]!r} to compare; valid presets: {', '.join(order)}")
    if len(picked) >= 2:
        return picked
    base = picked or ["pulid"]
    other = preset if preset not in base else ("paper" if base[0] != "paper" else "pulid")
    return [p for p in order if p in {*base, other}]


# ----------------------------------------------------------------------------- form values


#: Largest seed, the same as ``spatialid generate --seed`` (a 64-bit signed generator seed).
MAX_SEED = 2**63 - 1
#: Drawn seeds stay below this (short enough to read and type back), like the CLI's.
RANDOM_SEED_BELOW = 2**32
_RANDOM_WORDS = {"", "random", "rand", "-1", "-1.0"}


def parse_seed(value: Any) -> int:
    """A whole number in [0, 2**63 - 1] (the CLI's range), or ``random`` / empty / -1 for a fresh seed.

    Parsed as an integer, never through float, so 64-bit seeds such as PuLID's 2680261499100305976
    survive exactly.
    """
    if value is None:
        return secrets.randbelow(RANDOM_SEED_BELOW)
    if isinstance(value, bool):
        raise UIInputError(f"seed must be a whole number or 'random', got {value!r}")
    text = str(value).strip()
    if text.lower() in _RANDOM_WORDS:
        return secrets.randbelow(RANDOM_SEED_BELOW)
    seed: int | None = None
    if isinstance(value, int):
        seed = int(value)
    elif isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            seed = int(value)
    elif re.fullmatch(r"[+-]?\d+(\.0*)?", text):
        seed = int(text.split(".")[0])
    if seed is None:
        raise UIInputError(f"seed must be a whole number or 'random', got {text!r}")
    if not 0 <= seed <= MAX_SEED:
        raise UIInputError(f"seed must be between 0 and {MAX_SEED} (2**63 - 1) or 'random', got {seed}")
    return seed


def seed_for_run(seed: Any, randomize: Any) -> str:
    """What the seed box holds when a run starts: ``random`` with "randomize" on, else the box as typed.

    The form sends the seed box to the server (the API takes the same value), so randomizing is
    done by writing ``random`` there rather than by an extra input.
    """
    return "random" if randomize else ("" if seed is None else str(seed).strip())


#: The aspect-ratio buttons, width:height.
ASPECT_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")


def aspect_size(ratio: str, base_width: int, base_height: int, *, max_side: int | None = None) -> tuple[int, int]:
    """Width and height for ``ratio`` ("3:4") with about the pixels of the model's default size.

    Keeping the pixel count keeps the cost (and FLUX's sweet spot) of the default; both sides are
    multiples of 16 (FLUX's patch), at least 64 and at most ``max_side``.
    """
    from spatialid.pipeline.settings import MIN_SIZE, SIZE_MULTIPLE

    try:
        a, b = (float(x) for x in str(ratio).split(":"))
        if a <= 0 or b <= 0:
            raise ValueError
    except ValueError:
        raise UIInputError(f"aspect ratio must look like 3:4, got {ratio!r}") from None
    area = float(base_width) * float(base_height)
    width, height = math.sqrt(area * a / b), math.sqrt(area * b / a)
    top = max_side or max(width, height)

    def snap(v: float) -> int:
        v = min(v, top)
        return int(max(MIN_SIZE, SIZE_MULTIPLE * round(v / SIZE_MULTIPLE)))

    return snap(width), snap(height)


#: The form fields a PNG's settings fill in, in the order of :func:`settings_from_file`'s dict.
_RESTORED = ("prompt", "negative_prompt", "preset", "id_weight", "start_step", "true_cfg", "guidance", "steps", "width", "height", "seed")


def settings_from_file(path: Any, limits: UILimits = UILimits()) -> tuple[dict[str, Any] | None, str]:
    """The form values stored in one of our images, and a one-line message for the page.

    Returns ``(None, message)`` when the file carries no spatialid settings. Values over this
    server's caps are lowered to the cap (and the message says so), so the form stays usable.
    """
    from spatialid.app.metadata import read_image_metadata

    where = _path_of(path)
    try:
        data = read_image_metadata(where)
    except SpatialIDError as exc:
        return None, f"**No settings loaded**: {_short(str(exc), [where])}"
    values = {key: data.get(key) for key in _RESTORED}
    if not values["prompt"] or values["seed"] is None:
        return None, f"**No settings loaded**: {where.name} has spatialid metadata but no prompt or seed"
    if values["preset"] not in preset_choices():
        values["preset"] = D.DEFAULT_PRESET
    values["negative_prompt"] = values["negative_prompt"] or ""
    lowered = []
    for key, cap in (("steps", limits.max_steps), ("width", limits.max_side), ("height", limits.max_side)):
        if values[key] is not None and int(values[key]) > cap:
            lowered.append(f"{key} {values[key]} -> {cap}")
            values[key] = cap
    if values["start_step"] is not None and values["steps"] is not None:
        values["start_step"] = min(int(values["start_step"]), int(values["steps"]) - 1)
    values["seed"] = str(values["seed"])
    line = f"Loaded the settings of {where.name}: preset {values['preset']}, seed {values['seed']}"
    if lowered:
        line += f" (over this server's caps, lowered: {', '.join(lowered)})"
    return values, line + "."


#: How many results the session history keeps (newest first).
HISTORY_SIZE = 8


def add_to_history(history: Sequence[tuple[str, str]], image_files: Sequence[Path], settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The tab's last results, newest first: ``(image path, "seed N, preset P")``, at most :data:`HISTORY_SIZE`."""
    seeds = settings.get("seeds") or [settings.get("seed")] * len(image_files)
    new = [(str(p), f"seed {s}, {settings.get('preset')}") for p, s in zip(image_files, seeds)]
    return (new[::-1] + list(history))[:HISTORY_SIZE]


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


def _over_cap(name: str, value: float, cap: float, flag: str, unit: str = "") -> UIInputError:
    """The one-line refusal of a value over a server cap: the cap, and how the operator raises it."""
    return UIInputError(
        f"{name} {value:g} is over this server's cap of {cap:g}{unit}; use {cap:g} or less "
        f"(the operator can raise the cap: spatialid serve {flag} N)"
    )


def _number(
    name: str, value: Any, low: float, high: float, *, integer: bool = False, cap_flag: str | None = None, unit: str = ""
) -> float:
    if value is None or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise UIInputError(f"{name} is empty; enter a number between {low:g} and {high:g}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UIInputError(f"{name} must be a number between {low:g} and {high:g}, got {value!r}") from None
    if not math.isfinite(number):
        raise UIInputError(f"{name} must be a number between {low:g} and {high:g}, got {value!r}")
    if integer and not number.is_integer():
        raise UIInputError(f"{name} must be a whole number, got {value!r}")
    if cap_flag is not None and number > high:
        raise _over_cap(name, number, high, cap_flag, unit)
    if not low <= number <= high:
        raise UIInputError(f"{name} must be between {low:g} and {high:g}, got {number:g}")
    return number


@dataclass(frozen=True)
class GenerationRequest:
    """A checked form: the identity photos, the settings record and the presets to compare."""

    photos: tuple[Path, ...]
    settings: GenerationSettings
    compare: tuple[str, ...] = ()
    # several people, an init image / inpainting mask, LoRAs (spatialid.ui.people.PictureInputs); None = one person
    extras: Any = None

    @property
    def total_steps(self) -> int:
        """Denoising steps of the whole request (the comparison reruns only presets not yet drawn)."""
        extra = sum(1 for name in self.compare if name != self.settings.preset)
        return int(self.settings.steps or 0) * (1 + extra)


def request_cost(settings: GenerationSettings, compare: Sequence[str], limits: UILimits) -> float:
    """What a request costs the GPU, in default requests (the form's default steps and size, 1 image).

    Denoising passes (steps x (images + extra compared presets)) x pixels, doubled by true CFG
    (> 1 runs the transformer twice per step); relative to ``limits.unit_*``.
    """
    extra = sum(1 for name in compare if name != settings.preset)
    passes = int(settings.steps or 0) * (int(settings.num_images or 1) + extra)
    cfg = 2 if float(settings.true_cfg or 1) > 1 else 1
    pixels = int(settings.width or 0) * int(settings.height or 0)
    unit = max(1, limits.unit_steps) * max(1, limits.unit_width) * max(1, limits.unit_height)
    return passes * pixels * cfg / unit


def _check_cost(settings: GenerationSettings, compare: Sequence[str], limits: UILimits) -> None:
    cost = request_cost(settings, compare, limits)
    if cost <= limits.max_cost * (1 + 1e-9):
        return
    extra = sum(1 for name in compare if name != settings.preset)
    what = f"{settings.steps} steps x {settings.num_images} image{'s' if settings.num_images != 1 else ''}"
    if extra:
        what += f" + {extra} compared preset{'s' if extra != 1 else ''}"
    what += f" at {settings.width}x{settings.height}"
    if float(settings.true_cfg or 1) > 1:
        what += ", doubled by true CFG"
    raise UIInputError(
        f"this request costs {cost:.3g} default requests ({what}), over this server's cap of {limits.max_cost:g}; "
        "ask for fewer steps, images, compared presets or pixels (the operator can raise the cap: spatialid serve --max-cost N)"
    )


def build_request(
    photos: Any,
    prompt: Any,
    negative_prompt: Any = "",
    preset: Any = D.DEFAULT_PRESET,
    id_weight: Any = D.DEFAULT_ID_WEIGHT,
    start_step: Any = D.DEFAULT_START_STEP,
    true_cfg: Any = D.DEFAULT_TRUE_CFG,
    steps: Any = _UI_REAL.steps,
    guidance: Any = D.DEFAULT_GUIDANCE,
    width: Any = _UI_REAL.width,
    height: Any = _UI_REAL.height,
    seed: Any = "random",
    num_images: Any = 1,
    compare: bool = False,
    compare_presets: Sequence[str] | None = None,
    *,
    limits: UILimits = UILimits(),
) -> GenerationRequest:
    """Validate the form in the order a visitor fills it; the first problem raises one line."""
    from spatialid.pipeline.settings import (
        MAX_GUIDANCE,
        MAX_ID_WEIGHT,
        MAX_TRUE_CFG,
        MIN_SIZE,
        SIZE_MULTIPLE,
    )

    paths = collect_photos(photos, limits)
    text = "" if prompt is None else str(prompt).strip()
    if not text:
        raise UIInputError("the prompt is empty; describe the picture you want, e.g. 'portrait, oil painting'")
    choices = preset_choices()
    if preset not in choices:
        raise UIInputError(f"unknown preset {preset!r}; choose one of: {', '.join(choices)}")
    n_steps = int(_number("steps", steps, 1, limits.max_steps, integer=True, cap_flag="--max-steps"))
    start = int(_number("start step", start_step, 0, n_steps - 1, integer=True))
    sizes = []
    for name, value in (("width", width), ("height", height)):
        v = int(_number(name, value, MIN_SIZE, limits.max_side, integer=True, cap_flag="--max-side", unit=" px"))
        if v % SIZE_MULTIPLE:
            raise UIInputError(f"{name} must be a multiple of {SIZE_MULTIPLE} (FLUX draws 16x16-pixel patches), got {v}")
        sizes.append(v)
    settings = GenerationSettings(
        prompt=text,
        negative_prompt="" if negative_prompt is None else str(negative_prompt).strip(),
        preset=str(preset),
        id_weight=_number("id weight", id_weight, 0.0, MAX_ID_WEIGHT),
        start_step=start,
        true_cfg=_number("true CFG", true_cfg, 1.0, MAX_TRUE_CFG),
        steps=n_steps,
        guidance=_number("guidance", guidance, 0.0, MAX_GUIDANCE),
        width=sizes[0],
        height=sizes[1],
        seed=parse_seed(seed),
        num_images=int(_number("number of images", num_images, 1, limits.max_images, integer=True, cap_flag="--max-images")),
    )
    if settings.seed is not None and settings.seed + settings.num_images - 1 > MAX_SEED:  # image i uses seed + i
        raise UIInputError(
            f"seed {settings.seed} with {settings.num_images} images would go past {MAX_SEED}; "
            f"use a seed of at most {MAX_SEED - settings.num_images + 1}"
        )
    presets = tuple(compare_list(str(preset), compare_presets)) if compare else ()
    _check_cost(settings, presets, limits)
    return GenerationRequest(photos=tuple(paths), settings=settings, compare=presets)


# ----------------------------------------------------------------------------- generation


@dataclass
class GenerationResult:
    """Everything the page shows after one click."""

    images: list[Image.Image]
    image_files: list[Path]
    mask_picture: Image.Image | None
    comparison: Image.Image | None
    aligned_face: Image.Image | None
    files: list[Path]  # every PNG offered for download (images, mask pictures, comparison)
    settings: dict[str, Any] = field(default_factory=dict)  # metadata of the first PNG
    messages: list[str] = field(default_factory=list)  # notes from the run (e.g. no masks recorded)
    seconds: float = 0.0

    @property
    def captions(self) -> list[str]:
        seeds = self.settings.get("seeds") or [self.settings.get("seed")] * len(self.images)
        return [f"seed {s}" for s in seeds[: len(self.images)]]

    @property
    def status(self) -> str:
        n = len(self.images)
        what = f"{n} image{'s' if n != 1 else ''}"
        if self.comparison is not None:
            what += " + preset comparison"
        line = f"Done: {what} in {self.seconds:.1f} s, seed {self.settings.get('seed')}, preset {self.settings.get('preset')}."
        if self.settings.get("note"):
            line += " Tiny model: the images are noise by design."
        for message in self.messages:
            line += f" Note: {message}."
        return line


class _StepCounter:
    """Wraps the pipeline so each call reports its denoising steps to ``progress``.

    :func:`run_job` makes one pipeline call for the images and one per extra compared preset;
    the counter keeps a running total over all of them so the bar moves from 0 to 100 % once.
    """

    def __init__(
        self,
        pipe: Any,
        progress: ProgressFn | None,
        total: int,
        *,
        calls: int = 1,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.pipe = pipe
        self.progress = progress
        self.total = max(1, total)
        self.expected_calls = max(1, calls)
        self.should_stop = should_stop
        self.done = 0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        call_no = self.calls
        steps = int(kwargs.get("num_inference_steps") or 0)
        if self.progress is not None or self.should_stop is not None:
            def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
                # raising here ends the run between two steps (diffusers calls this after each one)
                if self.should_stop is not None and self.should_stop():
                    raise GenerationStopped("stopped by the visitor")
                self.done = min(self.total, self.done + 1)
                label = f"denoising step {step + 1}/{steps or '?'}"
                if self.expected_calls > 1:  # one bar over the whole comparison, named by preset
                    label = f"preset {min(call_no, self.expected_calls)}/{self.expected_calls} ({kwargs.get('preset')}): {label}"
                if self.progress is not None:
                    self.progress(self.done, self.total, label)
                return callback_kwargs

            kwargs["callback_on_step_end"] = on_step_end
        return self.pipe(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else: the real pipeline
        return getattr(self.pipe, name)


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


def _pipe_device(pipe: Any) -> str:
    device = getattr(pipe, "_execution_device", None)
    return str(device) if device is not None else "cpu"


def run_generation(
    pipe: Any,
    request: GenerationRequest,
    out_root: str | os.PathLike[str],
    *,
    progress: ProgressFn | None = None,
    lock: threading.Lock | None = None,
    identity_cache: IdentityCache | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Encode the photos, generate, write PNGs (with the CLI's metadata) and the pictures.

    Files go to a fresh folder under ``out_root`` per request, so two visitors never overwrite each
    other's downloads. ``lock`` serialises pipeline use when several events share one model;
    ``identity_cache`` skips the encoder when the same photos come again. ``should_stop`` is
    asked after every denoising step: when it says yes the run raises :class:`GenerationStopped`
    and its folder is deleted (no half-finished set of files is left).
    """
    import shutil

    from spatialid.utils.images import load_image

    started = time.perf_counter()
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root))
    out = folder / f"spatialid-s{request.settings.seed}.png"
    names = [p.name for p in request.photos]
    reference = load_image(request.photos[0])

    guard = lock if lock is not None else threading.Lock()
    try:
        result, identity, messages = _generate_locked(
            pipe, request, out, names, reference, guard, progress, identity_cache, should_stop
        )
    except GenerationStopped:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return _result(result, identity, messages, started)


def _generate_locked(
    pipe: Any,
    request: GenerationRequest,
    out: Path,
    names: list[str],
    reference: Image.Image,
    guard: threading.Lock,
    progress: ProgressFn | None,
    identity_cache: IdentityCache | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[Any, Any, list[str]]:
    """The part of a run that holds the GPU lock: encode (or reuse) the identity, then run the job."""
    from spatialid.app.job import GenerationJob, run_job

    with guard:
        if should_stop is not None and should_stop():
            raise GenerationStopped("stopped by the visitor")
        if progress is not None:
            progress(0, request.total_steps, "finding the face")
        from spatialid.ui import people

        extras = request.extras if request.extras is not None else people.PictureInputs()
        cache = identity_cache if identity_cache is not None else IdentityCache(maxsize=1)
        identity = people.identity_for(pipe, request.photos, extras, cache)
        job = GenerationJob(
            settings=request.settings,
            out=out,
            masks=True,
            compare=list(request.compare) or None,
            identity_files=names,
            identity_source="people" if extras.several else "image",
            reference_image=reference,
            people_files=[list(n) for n in extras.names] if extras.several else None,
        )
        model_info = getattr(pipe, "model_info", None) or {}
        extra = {"device": _pipe_device(pipe), "quantization": model_info.get("quantization"), "interface": "web",
                 **people.extra_metadata(request.settings)}
        calls = 1 + sum(1 for name in request.compare if name != request.settings.preset)
        runner = people.pipeline_for(pipe, extras)  # img2img / inpainting on the same components
        counter = _StepCounter(runner, progress, request.total_steps, calls=calls, should_stop=should_stop)
        messages: list[str] = []
        with people.loras_loaded(pipe, extras.loras):  # for this run only
            result = run_job(counter, job, identity, log=messages.append, extra_settings=extra)
    return result, identity, messages


def _result(result: Any, identity: Any, messages: list[str], started: float) -> GenerationResult:
    from spatialid.app.metadata import read_png_metadata

    images = [_open(p) for p in result.images]
    try:
        file_settings = read_png_metadata(result.images[0])  # exactly what the download carries
    except SpatialIDError:  # pragma: no cover - run_job always writes it
        file_settings = dict(result.settings)
    mask_picture = _open(result.masks[0]) if result.masks else None
    comparison = _open(result.compare) if result.compare else None
    return GenerationResult(
        images=images,
        image_files=list(result.images),
        mask_picture=mask_picture,
        comparison=comparison,
        aligned_face=getattr(identity, "aligned_face", None),
        files=list(result.files),
        settings=file_settings,
        messages=messages,
        seconds=time.perf_counter() - started,
    )


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()


def settings_text(settings: Mapping[str, Any]) -> str:
    """The settings as the PNG stores them: the summary line, then the JSON (encoder internals left
    out for readability; the downloaded PNG keeps them)."""
    from spatialid.app.metadata import format_summary

    shown = dict(settings)
    identity = shown.get("identity")
    if isinstance(identity, Mapping) and "embedding" in identity:
        shown["identity"] = {k: v for k, v in identity.items() if k != "embedding"}
    body = json.dumps(shown, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    return f"{format_summary(settings)}\n\n{body}"
