"""The settings record of one generation, and its validation.

:class:`GenerationSettings` is the one record of "what to generate" that every front-end fills
(the CLI from argparse, the web UI from its form, the bench from its grid) and that the pipeline
writes into each PNG's metadata. Kept free of torch/diffusers imports so bad numbers are refused
instantly, before any model is loaded. Every failure is a :class:`GenerationSettingsError` with a
one-line message that names the setting, the bad value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spatialid import defaults as D
from spatialid.errors import SpatialIDError

__all__ = [
    "DEFAULT_GUIDANCE",
    "GenerationSettings",
    "GenerationSettingsError",
    "MAX_GUIDANCE",
    "MAX_ID_WEIGHT",
    "MAX_IMAGES",
    "MAX_SIZE",
    "MAX_STEPS",
    "MAX_TRUE_CFG",
    "MIN_SIZE",
    "SIZE_MULTIPLE",
    "check_generation_settings",
    "check_prompt",
    "parse_size",
]

# PuLID-FLUX's own demo offers id_weight in [0, 3] and true CFG in [1, 10]; beyond these the
# identity overwhelms the image or the sampler diverges.
MAX_ID_WEIGHT = 3.0
MAX_TRUE_CFG = 10.0
MAX_GUIDANCE = 30.0
DEFAULT_GUIDANCE = D.DEFAULT_GUIDANCE
MAX_SEQUENCE_LENGTH = 512  # T5-XXL's context
MAX_STEPS = 1000
MAX_IMAGES = 16
# FLUX packs 2x2 latent patches of an 8x VAE: pixel sizes must be multiples of 16. FLUX.1 was
# trained up to about 2 megapixels; 4096 is a hard ceiling against typos such as 10240.
SIZE_MULTIPLE = 16
MIN_SIZE = 64
MAX_SIZE = 4096


class GenerationSettingsError(SpatialIDError, ValueError):
    """A generation setting is out of range or malformed."""


def _finite(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GenerationSettingsError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise GenerationSettingsError(f"{name} must be a finite number, got {value!r}")
    return number


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise GenerationSettingsError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if hasattr(value, "__index__"):  # numpy / torch integer scalars
        return int(value.__index__())
    raise GenerationSettingsError(f"{name} must be a whole number, got {value!r}")


def check_prompt(prompt: str | Sequence[str] | None, name: str = "prompt") -> None:
    """Reject a missing or blank prompt (FLUX would silently draw something arbitrary)."""
    prompts = [prompt] if isinstance(prompt, str) or prompt is None else list(prompt)
    if not prompts:
        raise GenerationSettingsError(f"{name} is empty; describe the image you want, e.g. --prompt \"portrait, oil painting\"")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise GenerationSettingsError(
                f"{name} is empty; describe the image you want, e.g. --prompt \"portrait, oil painting\""
            )


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WxH"`` (or a single number for a square) into ``(width, height)``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×*,]\s*(\d+))?\s*", str(text))
    if not m:
        raise GenerationSettingsError(f"size must look like 1024x768 (width x height), got {text!r}")
    width = int(m.group(1))
    height = int(m.group(2)) if m.group(2) else width
    return width, height


def check_generation_settings(
    *,
    num_inference_steps: int,
    height: int,
    width: int,
    id_weight: float = 1.0,
    start_step: int = 0,
    true_cfg: float = 1.0,
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_images_per_prompt: int = 1,
    seed: int | None = None,
) -> None:
    """Raise :class:`GenerationSettingsError` for the first setting out of its documented range."""
    steps = _integer("steps", num_inference_steps)
    if not 1 <= steps <= MAX_STEPS:
        raise GenerationSettingsError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    for name, value in (("height", height), ("width", width)):
        v = _integer(name, value)
        if not MIN_SIZE <= v <= MAX_SIZE:  # first: a suggestion must itself be in range
            raise GenerationSettingsError(f"{name} must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {v}")
        if v % SIZE_MULTIPLE:
            lower = max(MIN_SIZE, v - v % SIZE_MULTIPLE)
            tries = [n for n in (lower, lower + SIZE_MULTIPLE) if MIN_SIZE <= n <= MAX_SIZE]
            raise GenerationSettingsError(
                f"{name} must be a multiple of {SIZE_MULTIPLE} (FLUX packs 16x16-pixel patches), got {v}; "
                f"try {' or '.join(map(str, tries))}"
            )
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise GenerationSettingsError(f"{name} must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {v}")
    w = _finite("id_weight", id_weight)
    if not 0.0 <= w <= MAX_ID_WEIGHT:
        raise GenerationSettingsError(f"id weight must be between 0 and {MAX_ID_WEIGHT:g}, got {w:g}")
    start = _integer("start_step", start_step)
    if not 0 <= start < steps:
        raise GenerationSettingsError(
            f"start step must be between 0 and steps - 1 = {steps - 1} (the first step with identity), got {start}"
        )
    cfg = _finite("true_cfg", true_cfg)
    if not 1.0 <= cfg <= MAX_TRUE_CFG:
        raise GenerationSettingsError(f"true CFG must be between 1 (off) and {MAX_TRUE_CFG:g}, got {cfg:g}")
    g = _finite("guidance", guidance_scale)
    if not 0.0 <= g <= MAX_GUIDANCE:
        raise GenerationSettingsError(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {g:g}")
    n = _integer("num_images", num_images_per_prompt)
    if not 1 <= n <= MAX_IMAGES:
        raise GenerationSettingsError(f"number of images must be between 1 and {MAX_IMAGES}, got {n}")
    if seed is not None:
        s = _integer("seed", seed)
        if not 0 <= s < 2**63:
            raise GenerationSettingsError(f"seed must be between 0 and 2**63 - 1, got {s}")
        if s + n - 1 >= 2**63:  # image i uses seed + i: every recorded seed must be valid again
            raise GenerationSettingsError(
                f"seed {s} with {n} images would use seeds up to {s + n - 1}, above 2**63 - 1; "
                f"use a seed of at most {2**63 - n}"
            )



@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides a generated image besides the models and the identity.

    ``steps``, ``width`` and ``height`` may be None (= the model's default, resolved with
    :meth:`with_defaults`); ``seed`` None means "draw one" (done by :meth:`with_seed` before a run,
    so the seed that was used is always recorded). Field names are the keys of the PNG metadata.
    """

    prompt: str = ""
    negative_prompt: str = ""
    preset: str = D.DEFAULT_PRESET
    id_weight: float = D.DEFAULT_ID_WEIGHT
    start_step: int = D.DEFAULT_START_STEP
    true_cfg: float = D.DEFAULT_TRUE_CFG
    cfg_start_step: int = D.DEFAULT_CFG_START_STEP
    guidance: float = D.DEFAULT_GUIDANCE
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    num_images: int = 1
    max_sequence_length: int | None = None
    schedule_overrides: Mapping[str, float] | None = None  # --early, --late-floor, ... on top of the preset
    noise: str = D.DEFAULT_NOISE  # "diffusers" or "reference" (BFL/PuLID's initial noise)
    # Several people (docs/multi-identity.md): each person's photo / identity file names, in order
    # (metadata only: the identities themselves travel beside the record), and one region per
    # person (a box [x0, y0, x1, y1] in fractions, or a mask picture's path or name).
    people: Sequence[Sequence[str]] | None = None
    regions: Sequence[Any] | None = None
    # which diffusers FLUX.1 pipeline, and its inputs (docs/pipelines.md): files by path here, by
    # name in the image's metadata; LoRAs (FILE_OR_HUB_ID[:SCALE]) load with the models
    pipeline: str = "text2image"  # text2image, img2img, inpaint, fill, kontext, controlnet, control
    init_image: str | None = None
    strength: float | None = None
    inpaint_mask: str | None = None
    control_image: str | None = None
    controlnet: str | None = None
    controlnet_scale: float | None = None
    loras: Sequence[str] | None = None

    def replace(self, **changes: Any) -> GenerationSettings:
        return dataclasses.replace(self, **changes)

    def with_defaults(self, width: int, height: int, steps: int) -> GenerationSettings:
        """Fill the size and step count the caller left open."""
        return self.replace(
            width=self.width if self.width is not None else int(width),
            height=self.height if self.height is not None else int(height),
            steps=self.steps if self.steps is not None else int(steps),
        )

    def with_seed(self) -> GenerationSettings:
        """Draw a random seed when none is set (the drawn seed is then part of the record)."""
        if self.seed is not None:
            return self
        import secrets

        return self.replace(seed=secrets.randbelow(2**32))

    def check(self, *, prompt: bool = True) -> GenerationSettings:
        """Raise :class:`GenerationSettingsError` for the first value out of range; return self.

        Size and steps are checked once they are set (see :meth:`with_defaults`).
        """
        if prompt:
            check_prompt(self.prompt)
        check_generation_settings(
            num_inference_steps=self.steps if self.steps is not None else 1,
            height=self.height if self.height is not None else MIN_SIZE,
            width=self.width if self.width is not None else MIN_SIZE,
            id_weight=self.id_weight,
            start_step=self.start_step if self.steps is not None else 0,
            true_cfg=self.true_cfg,
            guidance_scale=self.guidance,
            num_images_per_prompt=self.num_images,
            seed=self.seed,
        )
        if _integer("cfg_start_step", self.cfg_start_step) < 0:
            raise GenerationSettingsError(f"cfg start step must be >= 0, got {self.cfg_start_step}")
        n = self.max_sequence_length
        if n is not None and not 1 <= _integer("max_sequence_length", n) <= MAX_SEQUENCE_LENGTH:
            raise GenerationSettingsError(f"max sequence length must be between 1 and {MAX_SEQUENCE_LENGTH}, got {n}")
        if self.noise not in D.NOISE_MODES:
            raise GenerationSettingsError(f"noise must be one of {', '.join(D.NOISE_MODES)}, got {self.noise!r}")
        if self.strength is not None and not 0.0 < _finite("strength", self.strength) <= 1.0:
            raise GenerationSettingsError(f"strength must be in (0, 1] (the share of the input image redrawn), got {self.strength:g}")
        if self.pipeline != "text2image":
            if self.pipeline not in D.PIPELINES:
                raise GenerationSettingsError(f"unknown pipeline {self.pipeline!r}; one of: {', '.join(D.PIPELINES)}")
            if self.pipeline in D.IMAGE_PIPELINES and not self.init_image:
                raise GenerationSettingsError(f"the {self.pipeline} pipeline needs an input image")
        if self.people is not None and not 1 <= len(self.people) <= 4:
            raise GenerationSettingsError(f"between 1 and 4 people per image, got {len(self.people)}")
        if self.regions is not None:
            count = len(self.people) if self.people else 1
            if len(self.regions) != count:
                raise GenerationSettingsError(
                    f"{len(self.regions)} region(s) for {count} person(s); give one --region per person, in order"
                )
        if self.schedule_overrides:
            from spatialid.masks.schedule import apply_overrides, resolve_preset

            apply_overrides(resolve_preset(self.preset), self.schedule_overrides, strict=True, preset=self.preset)
        return self

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`SpatialIDPipeline.__call__` for these settings."""
        return {
            "prompt": self.prompt,
            "preset": self.preset,
            "id_weight": self.id_weight,
            "start_step": self.start_step,
            "true_cfg": self.true_cfg,
            "negative_prompt": self.negative_prompt,
            "cfg_start_step": self.cfg_start_step,
            "guidance_scale": self.guidance,
            "num_inference_steps": self.steps,
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
            "num_images_per_prompt": self.num_images,
            "max_sequence_length": self.max_sequence_length,
            "schedule_overrides": dict(self.schedule_overrides) if self.schedule_overrides else None,
            "noise": self.noise,
            **({"regions": list(self.regions)} if self.regions is not None else {}),
            **self.pipeline_inputs(),
        }

    def pipeline_inputs(self) -> dict[str, Any]:
        """The per-call inputs of a pipeline other than text-to-image (none for text-to-image)."""
        if self.pipeline == "text2image":
            return {}
        names = ("init_image", "strength", "inpaint_mask", "control_image", "controlnet_scale")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The record as PNG-metadata keys (JSON-ready)."""
        data = dataclasses.asdict(self)
        data["schedule_overrides"] = dict(self.schedule_overrides) if self.schedule_overrides else None
        data["loras"] = list(self.loras) if self.loras else None
        # several people only: a one-person record keeps exactly its earlier keys
        for key in ("people", "regions"):
            if data[key] is None:
                del data[key]
        if self.people is not None:
            data["people"] = [list(p) for p in self.people]
        if self.regions is not None:
            data["regions"] = [list(r) if isinstance(r, (list, tuple)) else r for r in self.regions]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationSettings:
        """Read the record back from metadata (unknown keys are ignored, missing ones default).

        A record is outside data (an image's metadata): every field must have its declared type
        (a list as prompt, text as steps, NaN as id weight are refused with one
        :class:`GenerationSettingsError` line), so a record read back is one a front-end could have
        built; ranges are checked by :meth:`check`.
        """
        if not isinstance(data, Mapping):
            raise GenerationSettingsError(f"settings must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _stored_value(k, v) for k, v in data.items() if k in names and v is not None})


# the type of each field of a stored record (GenerationSettings.from_dict); the rest are lists, checked below
_TEXT_FIELDS = ("prompt", "negative_prompt", "preset", "noise", "pipeline", "init_image", "inpaint_mask",
                "control_image", "controlnet")
_WHOLE_FIELDS = ("start_step", "cfg_start_step", "steps", "width", "height", "seed", "num_images", "max_sequence_length")
_NUMBER_FIELDS = ("id_weight", "true_cfg", "guidance", "strength", "controlnet_scale")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stored_value(key: str, value: Any) -> Any:
    """``value`` of field ``key`` if it has the field's type (whole numbers as int), else one line."""

    def refuse(want: str) -> GenerationSettingsError:
        try:
            shown = repr(value)
        except ValueError:  # an integer of more than 4300 digits has no repr
            shown = "a huge number"
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return GenerationSettingsError(f"stored setting {key!r} is {shown} ({type(value).__name__}), expected {want}")

    if key in _TEXT_FIELDS:
        if not isinstance(value, str):
            raise refuse("text")
        return value
    if key in _WHOLE_FIELDS:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**64:
            raise refuse("a whole number")
        return value
    if key in _NUMBER_FIELDS:
        if not _is_number(value):
            raise refuse("a finite number")
        return value
    if key == "schedule_overrides":
        if not (isinstance(value, Mapping) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())):
            raise refuse("an object of numbers")
        return dict(value)
    if key == "people":  # one list of photo / identity file names per person
        if not isinstance(value, list) or not all(
            isinstance(p, str) or (isinstance(p, list) and all(isinstance(n, str) for n in p)) for p in value
        ):
            raise refuse("a list of file-name lists, one per person")
        return [[p] if isinstance(p, str) else list(p) for p in value]
    if key == "regions":  # a box [x0, y0, x1, y1] or a mask picture's name, per person
        if not isinstance(value, list) or not all(
            isinstance(r, str) or (isinstance(r, list) and len(r) == 4 and all(_is_number(v) for v in r)) for r in value
        ):
            raise refuse("a list of boxes [x0, y0, x1, y1] or mask names, one per person")
        return [r if isinstance(r, str) else [float(v) for v in r] for r in value]
    if key == "loras":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise refuse("a list of FILE_OR_HUB_ID[:SCALE] texts")
        return list(value)
    return value
