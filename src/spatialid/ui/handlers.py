"""What the web UI does, as plain functions: check the form and build the outputs.

Nothing here imports Gradio, so every rule (limits, messages, file names, metadata) is unit-tested
without a server; :mod:`spatialid.ui.app` only wires these functions to components and turns
:class:`~spatialid.errors.SpatialIDError` into ``gr.Error`` popups. The pieces every input box
shares (the error, the limits, the identity photos) are in :mod:`spatialid.ui.inputs`, the run of
a checked request in :mod:`spatialid.ui.generation`; their names are importable from here too.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spatialid import defaults as D
from spatialid.errors import SpatialIDError
from spatialid.pipeline.settings import GenerationSettings

# Used here, and importable from here as before they moved (the page, the tests and API users import them from handlers).
from spatialid.ui.generation import (  # noqa: F401
    GenerationRequest,
    GenerationResult,
    GenerationStopped,
    ProgressFn,
    run_generation,
)
from spatialid.ui.inputs import (  # noqa: F401
    DEFAULT_MAX_COST,
    PHOTO_SUFFIXES,
    IdentityCache,
    UIInputError,
    UILimits,
    _path_of,
    _short,
    collect_photos,
    photo_set,
    preview_identity,
)

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

log = logging.getLogger("spatialid.serve")

_UI_REAL = D.size_steps("ui", tiny=False)

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


def defaults_for(pipe: Any) -> tuple[GenerationSettings, UILimits]:
    """The form's initial settings and the limits for ``pipe``.

    The tiny model gets the UI's small size and step count (:mod:`spatialid.defaults`) so a click
    takes seconds; a real model starts from the pipeline's own defaults. The true CFG starts at the
    model family's default (on for Chroma, which has no guidance embedding; off for FLUX.1).
    """
    true_cfg = D.default_true_cfg(str(getattr(pipe, "family", "flux")))
    if getattr(pipe, "is_tiny", False):
        small = D.size_steps("ui", tiny=True)
        return (
            GenerationSettings(width=small.width, height=small.height, steps=small.steps, true_cfg=true_cfg),
            UILimits(max_side=512, max_steps=50, unit_steps=small.steps, unit_width=small.width, unit_height=small.height),
        )
    real = D.size_steps("ui", tiny=False)
    width = int(getattr(pipe, "default_width", real.width) or real.width)
    height = int(getattr(pipe, "default_height", real.height) or real.height)
    steps = int(getattr(pipe, "default_num_inference_steps", real.steps) or real.steps)
    limits = UILimits(unit_steps=steps, unit_width=width, unit_height=height)
    return GenerationSettings(width=width, height=height, steps=steps, true_cfg=true_cfg), limits


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

    Returns ``(None, message)`` when the file carries no usable spatialid settings: the file is
    outside data, so every stored field must have its type (:meth:`GenerationSettings.from_dict`:
    a list as prompt, text as steps are refused) and nothing it holds ever reaches the visitor as an
    exception's text or the server's log as a traceback. Values over this server's caps are lowered
    to the cap (and the message says so), so the form stays usable.
    """
    try:
        where = _path_of(path)
    except SpatialIDError:
        return None, "**No settings loaded**: the file did not arrive; drop it again"
    try:
        return _settings_from_file(where, limits)
    except SpatialIDError as exc:
        return None, f"**No settings loaded**: {_short(str(exc), [where])}"
    except Exception as exc:  # a reader's bug must not show its text, nor a traceback, for a visitor's file
        log.warning("settings of an uploaded image not loaded (%s: %s)", type(exc).__name__, _short(str(exc), [where])[:200])
        return None, f"**No settings loaded**: {where.name} holds damaged spatialid settings; load another image"


def _settings_from_file(where: Path, limits: UILimits) -> tuple[dict[str, Any] | None, str]:
    from spatialid.app.metadata import read_image_metadata

    data = read_image_metadata(where)
    if not isinstance(data, Mapping):
        return None, f"**No settings loaded**: {where.name} holds damaged spatialid settings; load another image"
    try:
        stored = GenerationSettings.from_dict(data)  # every field typed, or one line
    except SpatialIDError as exc:
        return None, f"**No settings loaded**: {where.name}: {_short(str(exc), [where])}"
    values = {key: getattr(stored, key) if key in data else None for key in _RESTORED}
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
        values["start_step"] = max(0, min(int(values["start_step"]), int(values["steps"]) - 1))
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
