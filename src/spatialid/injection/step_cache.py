"""Step caches (diffusers' cache hooks) that keep the identity: ``--cache NAME[:VALUE]``.

diffusers ships caches that skip work on steps where the transformer's output barely changes.
Our identity is added by forward hooks on the blocks (:mod:`spatialid.injection.injector`), so a
cache must agree with them on what a skipped block means:

* ``fbc`` -- First Block Cache (``FirstBlockCacheConfig``). Block 0 always runs; when its
  residual changed by less than the threshold (relative mean absolute difference), every other
  block is skipped and the output is block 0's output plus the *cached* residual of the last
  fully computed step (last block minus block 0, per CFG branch). That residual was measured
  after our hooks ran, so it already holds the identity of every injection point of that step:
  on a cached step the injector must not add it again. Without care it would: the skipped blocks
  return their inputs and our forward hooks still fire (20 extra CA residuals on FLUX), and block
  0's own hook would add a second one. So a cached step skips every point except one on the last
  block (whose hook runs after the residual is taken; FLUX has none there). The cached residual
  carries the *mask and phase of the step it was computed at*, so a full step is forced whenever
  what the injector does changes: identity switched on (``start_step``), a new schedule phase
  (prior -> attention -> relaxed). The state is per cache context, so cond and uncond (true CFG)
  keep separate residuals with their own identities (zero-identity for uncond).
* ``taylorseer`` -- TaylorSeer (``TaylorSeerCacheConfig``): predicts attention outputs inside
  the blocks for ``cache_interval - 1`` steps out of ``cache_interval``. Every block still runs, so
  every injection point computes its CA and mask on the current image tokens: nothing to change.
* ``pab`` -- Pyramid Attention Broadcast (``PyramidAttentionBroadcastConfig``): reuses the
  blocks' self-attention output for ``VALUE - 1`` of every ``VALUE`` calls in the middle of the
  schedule (t between 0.1 and 0.8). Like TaylorSeer it leaves the blocks' outputs to be
  computed, so the identity is injected on every step.

MagCache and SeaCache (also in diffusers 0.42) need per-checkpoint calibrated ratios or
spectral callbacks fitted to a model and a step count; they are not offered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
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
    """A cache enabled on one transformer, and how the injector cooperates with it.

    ``computed`` / ``cached`` count the transformer calls that ran every block / reused the
    cached residual (First Block Cache only; the other caches do not skip whole calls).
    """

    def __init__(self, transformer: nn.Module, injector: Any, spec: CacheSpec) -> None:
        self.transformer = transformer
        self.injector = injector
        self.spec = spec
        self.computed = 0
        self.cached = 0
        self._leader: Any = None
        self._tail_point: int | None = None

    # -------------------------------------------------------------- First Block Cache
    def _install_fbc(self) -> None:
        from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

        blocks = [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]
        self._leader = blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
        original: Callable[[torch.Tensor], bool] = self._leader._should_compute_remaining_blocks
        injector = self.injector
        if injector is not None:
            last = ("single", len(self.transformer.single_transformer_blocks) - 1)
            self._tail_point = injector.points.index(last) if last in injector.points else None
            injector.skip_point = self._skip_point

        @torch.compiler.disable
        def should_compute(residual: torch.Tensor) -> bool:
            state = self._leader.state_manager.get_state()
            signature = self._signature()
            decision = original(residual)
            if getattr(state, "spatialid_signature", None) != signature:
                decision = True  # the cached residual holds another phase or no identity
            if decision:
                state.spatialid_signature = signature
                self.computed += 1
            else:
                self.cached += 1
            return decision

        self._leader._should_compute_remaining_blocks = should_compute

    def _signature(self) -> tuple[Any, ...]:
        """What the injection does in this call: off, or on with which schedule phase."""
        injector = self.injector
        session = getattr(injector, "session", None)
        if session is None or session._embeds is None:
            return ("off",)
        schedule = session.schedule
        if schedule is None or session._t is None:
            return ("on", "uniform")
        return ("on", schedule.phase(float(session._t.reshape(-1)[0])))  # FBC syncs here anyway

    def _skip_point(self, point: int) -> bool:
        if point == self._tail_point:
            return False  # its hook runs after the cached residual was taken: inject as usual
        return not self._leader.state_manager.get_state().should_compute

    # -------------------------------------------------------------- all
    def disable(self) -> None:
        """Remove the cache and the injector's gate."""
        if self.injector is not None and getattr(self.injector, "skip_point", None) == self._skip_point:
            self.injector.skip_point = None
        self.transformer.disable_cache()


def enable_step_cache(
    transformer: nn.Module,
    injector: Any,
    spec: CacheSpec | str,
    current_timestep: Callable[[], Any] | None = None,
) -> StepCache:
    """Enable the cache ``spec`` on ``transformer`` so that it keeps ``injector``'s identity.

    ``current_timestep`` returns the pipeline's current timestep (t * 1000; FluxPipeline's
    ``current_timestep``), needed by ``pab``.
    """
    parsed = parse_cache(spec)
    if parsed is None:
        raise SpatialIDError("enable_step_cache needs a cache name; see --cache")
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    cache = StepCache(transformer, injector, parsed)
    if parsed.name == "fbc":
        transformer.enable_cache(FirstBlockCacheConfig(threshold=parsed.value))
        cache._install_fbc()
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
    return cache
