"""The injection mask in few kernels: the same maths as :meth:`SpatialSchedule.mask`, shaped for fusion.

Why: eager, the mask is about 25 small kernels per injection point (norm, min-max, two blur
matmuls, std/mean, threshold, dilation, blend, schedule), x 20 points per step. On a GPU at
512 px that is launch-bound: the CPU issuing those launches becomes the critical path although
the mask reads one ``[B, N, D]`` tensor (O(N*D) against the blocks' O(N*D^2)).

How: :func:`fused_mask_fn` is a pure tensor function written so that torch.compile (inductor)
fuses it: into one C++ kernel on the CPU (measured: 22 -> 1), and on CUDA into about four
kernels (three reductions and one pointwise pass; counted by ``benchmarks/gpu_check.sh``):

1. the per-token reduction (L2 norm of the CA output, or the attention entropy),
2. the per-sample min/max of that raw map,
3. the per-sample mean/std of the blurred map (min-max normalisation and blur are inlined: the
   blur is written as 5 x 5 weighted *gathers* with the padding rule folded into index tables,
   not as matmuls, so it fuses into whatever reads it),
4. one pointwise pass: blur again, threshold, 3 x 3 dilation, blend, schedule phase, floor, cast.

Every constant (centre prior, tap weights, gather indices, schedule thresholds) comes in as a
tensor cached per (grid, device, dtype), so switching between presets of the same structure
(e.g. ``paper`` / ``relaxed`` / ``global-floor-0.3``) reuses the compiled code. One compiled
callable is built lazily per (source, mode, grid, device, dtype) with static shapes, each with
its own code object so that dynamo's per-frame recompile limit never silently sends a new grid
back to eager.

The eager path of :mod:`spatialid.masks.schedule` stays the reference; ``fused="auto"``
(the default of :meth:`SpatialSchedule.mask`) uses this module only on CUDA, where it is faster.
On the CPU, the compile latency (seconds per structure and grid) outweighs the per-call saving
for a typical generation, so "auto" stays eager there (``fused=True`` forces it; measured in
``benchmarks/step_cost.py``). Inside an already compiled transformer (``--compile``) the
reference path is traced as part of the whole graph, which inductor fuses anyway.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from spatialid.masks.extractor import (
    BLEND_HARD,
    BLEND_SOFT,
    BLUR_KERNEL_SIZE,
    BLUR_SIGMA,
    HARD_STD_FACTOR,
    MINMAX_EPS,
    _center_prior_cached,
    _gaussian_kernel1d_cached,
    _pad_mode,
)

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.masks.schedule import SpatialSchedule

__all__ = ["AUTO_DEVICES", "FUSED_MODES", "FusedMask", "fused_mask", "fused_mask_fn", "use_fused"]

FusedMode = bool | str
#: Values of the ``fused`` switch: True (always), False (eager reference), "auto" (CUDA only).
FUSED_MODES = (True, False, "auto")

_CACHE_SIZE = 64


#: Device types where ``fused="auto"`` takes the fused path (a benchmark may change it to compare).
AUTO_DEVICES: tuple[str, ...] = ("cuda",)


def use_fused(fused: FusedMode, device: torch.device) -> bool:
    """Whether the fused path runs for this switch on ``device`` (never inside a compiled graph)."""
    if fused not in FUSED_MODES:
        raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
    if fused is False or torch.compiler.is_compiling():
        return False
    if fused is True:
        return True
    return device.type in AUTO_DEVICES


# ----------------------------------------------------------------------------------------------
# constants, cached per grid / device / dtype (built once, on the host, then moved)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _gather_table(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [length, taps], weight [taps])``: the 1-D padded blur as a weighted gather.

    ``blur(x)[i] = sum_k weight[k] * x[index[i, k]]``; the index holds the padding rule
    (reflect, or replicate for axes too short to reflect), exactly as the eager blur matrix does.
    """
    size, pad = BLUR_KERNEL_SIZE, BLUR_KERNEL_SIZE // 2
    index = torch.arange(length)[:, None] + torch.arange(size)[None, :] - pad
    if _pad_mode(length, pad) == "reflect":
        index = index.abs()
        index = torch.where(index > length - 1, 2 * (length - 1) - index, index)
    else:
        index = index.clamp(0, length - 1)
    weight = _gaussian_kernel1d_cached(size, BLUR_SIGMA, torch.device("cpu"), torch.float64)
    return index.to(device), weight.to(device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _schedule_constants(
    early: float, late: float, late_floor: float, global_floor: float, device: torch.device, t_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([early, late] in t's dtype, [late_floor, global_floor] in float32)`` as device tensors.

    The thresholds are rounded to t's dtype once, as comparing a tensor with a Python float does
    in the eager path, so both paths pick the same phase at a boundary.
    """
    times = torch.tensor([early, late], dtype=torch.float64).to(t_dtype)
    floors = torch.tensor([late_floor, global_floor], dtype=torch.float32)
    return times.to(device), floors.to(device)


# ----------------------------------------------------------------------------------------------
# the maths


def _blur(grid: torch.Tensor, rows_ix: torch.Tensor, cols_ix: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap blur of ``[B, R, C]`` as gathers: pointwise for inductor, no padded copy."""
    along_cols = (grid[:, :, cols_ix] * weight).sum(-1)  # [B, R, C, taps] -> [B, R, C]
    return (along_cols[:, rows_ix, :] * weight[:, None]).sum(-2)  # [B, R, taps, C] -> [B, R, C]


def fused_mask_fn(
    source: torch.Tensor,
    t: torch.Tensor,
    prior: torch.Tensor,
    rows_ix: torch.Tensor,
    cols_ix: torch.Tensor,
    weight: torch.Tensor,
    times: torch.Tensor,
    floors: torch.Tensor,
    *,
    rows: int,
    cols: int,
    entropy: bool,
    mode: str,
) -> torch.Tensor:
    """The schedule's mask ``[B, N, 1]`` (float32; the caller casts) in fusion-friendly ops.

    ``source`` is the CA's raw output ``[B, N, D]`` (``entropy=False``) or its attention
    probabilities ``[B, heads, N, n_id]``; ``t`` is ``[B]`` or ``[1]`` in its own float dtype;
    ``prior`` ``[1, N]``; ``times`` = ``[early, late]`` in t's dtype; ``floors`` =
    ``[late_floor, global_floor]``. ``mode`` is the schedule's mode (static).
    """
    batch = source.shape[0]
    n_tokens = rows * cols
    tt = t.reshape(-1, 1)
    prior_b = prior.expand(batch, n_tokens)
    if mode == "prior":
        out = prior_b
    else:
        if entropy:
            raw = torch.special.entr(source.float()).sum(dim=-1).mean(dim=1)  # [B, N]
        else:
            raw = torch.linalg.vector_norm(source, ord=2, dim=-1, dtype=torch.float32)  # [B, N]
        lo, hi = torch.aminmax(raw, dim=-1, keepdim=True)
        raw = (raw - lo) / (hi - lo).clamp_min(MINMAX_EPS)
        if entropy:
            raw = 1.0 - raw
        blurred = _blur(raw.reshape(-1, rows, cols), rows_ix, cols_ix, weight).reshape(-1, n_tokens)
        std, mean = torch.std_mean(blurred, dim=1, correction=1 if n_tokens > 1 else 0, keepdim=True)
        hard = (blurred > torch.add(mean, std, alpha=HARD_STD_FACTOR)).to(torch.float32)
        hard = torch.nn.functional.max_pool2d(hard.reshape(-1, 1, rows, cols), kernel_size=3, stride=1, padding=1)
        refined = torch.add(blurred * BLEND_SOFT, hard.reshape(-1, n_tokens), alpha=BLEND_HARD).clamp(0.0, 1.0)
        if mode == "attention":
            out = refined
        else:
            if mode == "scheduled":
                late_floor = floors[0]
                relaxed = late_floor + (1.0 - late_floor) * refined
                refined = torch.where(tt <= times[1], relaxed, refined)
            out = torch.where(tt > times[0], prior_b, refined)
    out = torch.maximum(out, floors[1])  # global floor (0: no change, the mask is >= 0)
    return out.unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# lazily compiled callables


def _compile_options(device: torch.device) -> dict[str, Any]:
    """torch.compile options: inductor, static shapes, one graph (``SPATIALID_FUSED_BACKEND``
    overrides the backend for debugging). The default mode on every device: CUDA graphs
    (``reduce-overhead``) would need static input addresses, which the per-step CA outputs are not."""
    backend = os.environ.get("SPATIALID_FUSED_BACKEND", "inductor")
    return {"backend": backend, "fullgraph": True, "dynamic": False}


class FusedMask:
    """Compiled mask callables, one per (source, mode, grid, device, dtype), built on first use.

    Args:
        compile: False runs :func:`fused_mask_fn` eagerly (the same maths, for tests and
            debugging); True compiles it with :func:`_compile_options` (inductor by default).
        backend: overrides the torch.compile backend (e.g. ``"eager"``, ``"aot_eager"``).
    """

    def __init__(self, compile: bool = True, backend: str | None = None) -> None:
        self.compile = compile
        self.backend = backend
        self._fns: dict[tuple[Any, ...], Callable[..., torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _get(self, key: tuple[Any, ...], device: torch.device) -> Callable[..., torch.Tensor]:
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._fns.get(key)
            if fn is None:
                fn = self._build(key, device)
                self._fns[key] = fn
        return fn

    def _build(self, key: tuple[Any, ...], device: torch.device) -> Callable[..., torch.Tensor]:
        entropy, mode, rows, cols = key[:4]
        statics = {"rows": rows, "cols": cols, "entropy": entropy, "mode": mode}
        if not self.compile:
            return functools.partial(fused_mask_fn, **statics)
        # A code object of its own per key: dynamo counts recompiles per code object (limit 8),
        # and a 9th grid or structure would otherwise run eagerly without a word.
        code = fused_mask_fn.__code__.replace(co_name=f"fused_mask_{len(self._fns)}")
        clone = type(fused_mask_fn)(code, fused_mask_fn.__globals__, code.co_name, fused_mask_fn.__defaults__)
        clone.__kwdefaults__ = fused_mask_fn.__kwdefaults__
        options = _compile_options(device)
        if self.backend is not None:
            options["backend"] = self.backend
        return torch.compile(functools.partial(clone, **statics), **options)

    def __call__(
        self,
        schedule: SpatialSchedule,
        t: torch.Tensor,
        ca_raw: torch.Tensor,
        rows: int,
        cols: int,
        attn_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`SpatialSchedule.mask` for a tensor ``t``, inputs already validated by it."""
        device = ca_raw.device
        entropy = schedule.needs_attention_probs
        source = attn_probs.to(device) if entropy else ca_raw  # type: ignore[union-attr]
        tt = t.detach()
        tt = (tt if tt.is_floating_point() else tt.to(torch.float32)).to(device).reshape(-1)
        prior = _center_prior_cached(rows, cols, schedule.center_sigma, device, torch.float32)
        rows_ix, weight = _gather_table(rows, device)
        cols_ix, _ = _gather_table(cols, device)
        times, floors = _schedule_constants(
            schedule.early, schedule.late, schedule.late_floor, schedule.global_floor, device, tt.dtype
        )
        key = (entropy, schedule.mode, rows, cols, device, source.dtype, tt.dtype, source.shape[0], tt.shape[0])
        fn = self._get(key, device)
        out = fn(source, tt, prior, rows_ix, cols_ix, weight, times, floors)
        return out.to(dtype=ca_raw.dtype)


#: The process-wide compiled masks that :meth:`SpatialSchedule.mask` dispatches to.
fused_mask = FusedMask()
