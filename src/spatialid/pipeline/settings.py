"""Validation of generation settings, shared by the pipeline and the CLI.

Kept free of torch/diffusers imports so the CLI can reject bad numbers instantly, before any model
is loaded. Every failure is a :class:`GenerationSettingsError` with a one-line message that names
the setting, the bad value and the allowed range.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from spatialid.errors import SpatialIDError

__all__ = [
    "DEFAULT_GUIDANCE",
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
DEFAULT_GUIDANCE = 4.0  # PuLID-FLUX's default embedded guidance for FLUX.1-dev
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
        if v % SIZE_MULTIPLE:
            lower = max(MIN_SIZE, v - v % SIZE_MULTIPLE)
            raise GenerationSettingsError(
                f"{name} must be a multiple of {SIZE_MULTIPLE} (FLUX packs 16x16-pixel patches), got {v}; "
                f"try {lower} or {lower + SIZE_MULTIPLE}"
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
