"""The injection mask in few kernels: :func:`~spatialid.masks.compute.identity_masks`, compiled.

Why: eager, the mask is about 25 small kernels per injection point (norm, min-max, two blur
matmuls, std/mean, threshold, dilation, blend, schedule), x 20 points per step. On a GPU at
512 px that is launch-bound: the CPU issuing those launches becomes the critical path although
the mask reads one ``[B, N, D]`` tensor (O(N*D) against the blocks' O(N*D^2)).

How: the very function the eager path calls is compiled with inductor (static shapes, one graph),
so there is one mask function and the fused path cannot drift from it. One compiled callable is
kept per (schedule structure, grid, people, device, dtypes): switching between presets of the same
structure recompiles only for their numbers, which dynamo guards on.

``fused="auto"`` (the default of :meth:`SpatialSchedule.mask` and of the injector) uses it only
on CUDA, where launches dominate; on the CPU the compile latency (seconds per structure and grid)
outweighs the saving for a typical generation (``fused=True`` forces it; measured in
``benchmarks/step_cost.py``). Inside an already compiled transformer (``--compile``) the eager
function is traced as part of the whole graph. A compile or kernel error falls back to the eager
function with one warning: never a lost run.
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from spatialid.masks.compute import Layout, identity_masks

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.masks.schedule import SpatialSchedule

__all__ = ["AUTO_DEVICES", "FUSED_MODES", "FusedMask", "fused_identity_masks", "use_fused"]

#: Values of the ``fused`` switch: True (always), False (eager), "auto" (on AUTO_DEVICES only).
FUSED_MODES = (True, False, "auto")
#: Device types where ``fused="auto"`` takes the compiled path (a benchmark may change it to compare).
AUTO_DEVICES: tuple[str, ...] = ("cuda",)


def use_fused(fused: bool | str, device: torch.device) -> bool:
    """Whether the compiled path runs for this switch on ``device`` (never inside a compiled graph)."""
    if fused not in FUSED_MODES:
        raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
    if fused is False or torch.compiler.is_compiling():
        return False
    if fused is True:
        return True
    return device.type in AUTO_DEVICES


_CLONES = itertools.count()


class FusedMask:
    """:func:`identity_masks` compiled, one callable per static structure, built on first use.

    Args:
        compile: False runs :func:`identity_masks` as is (for tests); True compiles it.
        backend: the torch.compile backend (default inductor; ``SPATIALID_FUSED_BACKEND`` overrides).
    """

    def __init__(self, compile: bool = True, backend: str | None = None) -> None:
        self.compile = compile
        self.backend = backend
        self.failed: str | None = None  # why the compiled path was given up, if it was
        self._fns: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._lock = threading.Lock()

    def _build(self, key: tuple[Any, ...]) -> Callable[..., Any]:
        if not self.compile:
            return identity_masks
        backend = self.backend or os.environ.get("SPATIALID_FUSED_BACKEND", "inductor")
        # A code object of its own per structure: dynamo counts recompiles per code object, and a
        # 9th grid or preset would otherwise run eagerly without a word.
        code = identity_masks.__code__.replace(co_name=f"identity_masks_{next(_CLONES)}")
        clone = type(identity_masks)(code, identity_masks.__globals__, code.co_name, identity_masks.__defaults__)
        clone.__kwdefaults__ = identity_masks.__kwdefaults__
        # the function itself, not a functools.partial: dynamo runs partials through one shared
        # wrapper frame, whose recompile limit all structures would then share
        return torch.compile(clone, backend=backend, fullgraph=True, dynamic=False)

    def __call__(
        self,
        schedule: SpatialSchedule | None,
        t: torch.Tensor,
        ca_raw: torch.Tensor,
        rows: int,
        cols: int,
        layout: Layout,
        *,
        attn_probs: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """:func:`identity_masks` with the same arguments, compiled (eager after a compile failure)."""
        if self.failed is not None:
            return identity_masks(schedule, t, ca_raw, rows, cols, layout, attn_probs=attn_probs)
        key = (
            schedule, rows, cols, ca_raw.shape, ca_raw.device, ca_raw.dtype, t.dtype, tuple(t.shape),
            layout.territories is None, layout.bounds is None,
        )
        try:
            fn = self._fns.get(key)
            if fn is None:
                with self._lock:
                    fn = self._fns.setdefault(key, self._build(key))
            return fn(schedule, t, ca_raw, rows, cols, layout, attn_probs=attn_probs)
        except Exception as exc:  # noqa: BLE001 - any compile/kernel error: keep the run going, eagerly
            if not self.compile:
                raise
            self.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            warnings.warn(
                f"the compiled identity mask failed ({self.failed}); using the eager mask from now on",
                RuntimeWarning,
                stacklevel=2,
            )
            return identity_masks(schedule, t, ca_raw, rows, cols, layout, attn_probs=attn_probs)


#: The process-wide compiled masks.
fused_identity_masks = FusedMask()
