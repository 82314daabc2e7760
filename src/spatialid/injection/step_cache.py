"""Step caches (diffusers' cache hooks) that keep the identity: ``--cache NAME[:VALUE]``.

diffusers ships caches that skip work on steps where the transformer's output barely changes.
The identity is added by diffusers hooks registered innermost on the blocks
(:mod:`spatialid.injection.injector`), so the caches and the identity agree by construction:

* ``fbc`` -- First Block Cache (``FirstBlockCacheConfig``). Block 0 always runs; when its
  residual changed by less than the threshold, every other block is skipped and the output is
  block 0's output plus the residual of the last fully computed step, which was measured after
  our hooks ran: it already holds the identity of every injection point of that step. A skipped
  block skips our hook with it (it sits inside the cache's hook), so nothing is injected twice.
  The cached residual carries the mask and phase of the step it was computed at, so the injector
  forces a full step whenever what it does changes (identity switched on at ``start_step``, a new
  schedule phase) by resetting the cache's state (diffusers' ``reset_state``). The state is per
  cache context: cond and uncond (true CFG) keep separate residuals with their own identities.
  This holds for a cache enabled here and for diffusers' own ``transformer.enable_cache(...)``,
  before or after ``load_pulid``.
* ``taylorseer`` -- TaylorSeer (``TaylorSeerCacheConfig``): predicts attention outputs inside
  the blocks for ``cache_interval - 1`` steps out of ``cache_interval``. Every block still runs, so
  every injection point computes its CA and mask on the current image tokens.
* ``pab`` -- Pyramid Attention Broadcast (``PyramidAttentionBroadcastConfig``): reuses the
  blocks' self-attention output for ``VALUE - 1`` of every ``VALUE`` calls in the middle of the
  schedule (t between 0.1 and 0.8); the blocks' outputs, and so the identity, are computed.

Pipelines that set no cache context (img2img, inpainting, Kontext, ControlNet, ...) get one from
the injector for each call (``"cond"``, then ``"uncond"`` with true CFG), which diffusers' caches
need. MagCache and SeaCache need per-checkpoint calibrated ratios; they are not offered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from spatialid.errors import SpatialIDError

__all__ = ["CACHE_NAMES", "CacheSpec", "StepCache", "enable_step_cache", "parse_cache"]

#: name -> (what VALUE means, its default, whether it is an integer)
CACHE_NAMES: dict[str, tuple[str, float, bool]] = {
    "fbc": ("First Block Cache: relative change of block 0's residual below which a step is cached", 0.08, False),
    "taylorseer": ("TaylorSeer: full computation every VALUE steps, Taylor-predicted attention between", 4, True),
    "pab": ("Pyramid Attention Broadcast: self-attention computed every VALUE steps for t in (0.1, 0.8)", 2, True),
}


@dataclass(frozen=True)
class CacheSpec:
    """A parsed ``--cache`` value: the cache's name and its one setting."""

    name: str
    value: float

    def __str__(self) -> str:
        value = int(self.value) if CACHE_NAMES[self.name][2] else self.value
        return f"{self.name}:{value:g}" if isinstance(value, float) else f"{self.name}:{value}"


def parse_cache(text: str | CacheSpec | None) -> CacheSpec | None:
    """``"fbc"``, ``"fbc:0.12"``, ``"taylorseer:4"``, ``"pab:2"`` -> :class:`CacheSpec`; ``None``/"none" -> None.

    Raises:
        SpatialIDError: an unknown name or a bad value (one line that lists the names).
    """
    if text is None or isinstance(text, CacheSpec):
        return text
    raw = str(text).strip().lower()
    if raw in ("", "none", "off"):
        return None
    name, _, value_text = raw.partition(":")
    names = ", ".join(f"{n}[:{'N' if CACHE_NAMES[n][2] else 'X'}]" for n in CACHE_NAMES)
    if name not in CACHE_NAMES:
        raise SpatialIDError(f"unknown --cache {text!r}; use none or one of: {names}")
    _, default, integer = CACHE_NAMES[name]
    if not value_text:
        return CacheSpec(name, float(default))
    try:
        value = float(value_text)
    except ValueError:
        raise SpatialIDError(f"--cache {text!r}: {value_text!r} is not a number; use one of: {names}") from None
    if integer:
        if value != int(value) or value < 1:
            raise SpatialIDError(f"--cache {text!r}: {name} takes a whole number of steps >= 1")
    elif not (math.isfinite(value) and value >= 0.0):
        raise SpatialIDError(f"--cache {text!r}: the threshold must be a number >= 0")
    return CacheSpec(name, value)


class StepCache:
    """A cache enabled on one transformer.

    ``computed`` / ``cached`` count the identity calls since the cache was enabled that ran every
    block / reused the cached residual (First Block Cache; the other caches skip no whole call).
    """

    def __init__(self, transformer: nn.Module, injector: Any, spec: CacheSpec) -> None:
        self.transformer = transformer
        self.injector = injector
        self.spec = spec
        self._calls0 = getattr(injector, "calls", 0)
        self._full0 = getattr(injector, "full_calls", 0)

    @property
    def computed(self) -> int:
        return int(getattr(self.injector, "full_calls", 0) - self._full0)

    @property
    def cached(self) -> int:
        return int(getattr(self.injector, "calls", 0) - self._calls0) - self.computed

    def reset_counts(self) -> None:
        """Count from zero again."""
        self._calls0 = getattr(self.injector, "calls", 0)
        self._full0 = getattr(self.injector, "full_calls", 0)

    def disable(self) -> None:
        """Remove the cache."""
        self.transformer.disable_cache()


def enable_step_cache(
    transformer: nn.Module,
    injector: Any,
    spec: CacheSpec | str,
    current_timestep: Callable[[], Any] | None = None,
) -> StepCache:
    """Enable the cache ``spec`` on ``transformer`` (diffusers' ``enable_cache``); the identity hooks of
    ``injector`` cooperate with it by construction. ``current_timestep`` returns the pipeline's
    current timestep (t * 1000; FluxPipeline's ``current_timestep``), needed by ``pab``.
    """
    parsed = parse_cache(spec)
    if parsed is None:
        raise SpatialIDError("enable_step_cache needs a cache name; see --cache")
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    if parsed.name == "fbc":
        transformer.enable_cache(FirstBlockCacheConfig(threshold=parsed.value))
    elif parsed.name == "taylorseer":
        interval = int(parsed.value)
        transformer.enable_cache(
            TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=min(3, interval))
        )
    else:
        if current_timestep is None:
            raise SpatialIDError("--cache pab needs the pipeline's current timestep")
        transformer.enable_cache(
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=int(parsed.value),
                spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=current_timestep,
            )
        )
    return StepCache(transformer, injector, parsed)
