"""The one identity-mask function: phase rule, priors, territories, regions and competition.

Every path that needs an injection mask calls :func:`identity_masks`: one person or several,
with or without regions, eager or compiled (:mod:`spatialid.masks.fused` compiles this very
function), inside the injector's hooks or through :meth:`SpatialSchedule.mask`. One person
without a region is the case ``K = 1`` of several people: its layout has the centre prior, no
territory and no bound, and no competition (a softmax over one person is exactly 1).

The phase rule lives in :func:`phase_index` only::

    mode "prior":       prior at every t
    mode "attention":   attention mask at every t
    t >  early          -> prior
    early >= t > late   -> attention (refined mask of the person's own CA response)
    t <= late           -> relaxed  = late_floor + (1 - late_floor) * refined   (mode "scheduled")
                           attention                                           (mode "no-relax")
    then global_floor as a lower bound (inside the person's territory)

Everything is tensor code with static shapes: no host reads and no branch on tensor data, so
it runs inside ``torch.compile(fullgraph=True)`` graphs. Times are compared in their own dtype
(a bf16 timestep compares with thresholds rounded to bf16), as comparing a tensor with a Python
float does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from spatialid.masks.extractor import _cached, _center_prior_cached, entropy_mask, norm_mask, refine_mask
from spatialid.masks.multi import compete, layout_priors, strip_territories, word_layout

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.masks.schedule import SpatialSchedule

__all__ = [
    "ATTENTION", "PHASES", "PRIOR", "RELAXED", "Layout", "bind_words", "build_layout", "identity_masks", "phase_index",
    "time_column",
]

PRIOR, ATTENTION, RELAXED = 0, 1, 2
#: Labels of :func:`phase_index`'s values.
PHASES = ("prior", "attention", "relaxed")


class Layout:
    """Where K people may be, on one token grid: ``[K, 1, N]`` float32 tensors on one device.

    ``priors`` is each person's early mask; ``territories`` bounds each person's attention mask
    (None: everywhere, the one-person case); ``bounds`` are hard upper bounds from regions (None:
    no region). The middle axis broadcasts over the batch.
    """

    def __init__(self, priors: torch.Tensor, territories: torch.Tensor | None, bounds: torch.Tensor | None) -> None:
        self.priors = priors
        self.territories = territories
        self.bounds = bounds

    @property
    def count(self) -> int:
        return int(self.priors.shape[0])


def build_layout(
    count: int, rows: int, cols: int, sigma: float, regions: torch.Tensor | None, device: torch.device | str
) -> Layout:
    """The :class:`Layout` of ``count`` people.

    With ``regions`` ``[K, rows, cols]`` in [0, 1] each person's prior, territory and bound are
    their region. Without: one person gets the centre prior (SpatialID's single-identity rule);
    several get Gaussian priors spread left to right and soft vertical strips as territories
    (:mod:`spatialid.masks.multi`).
    """
    device = torch.device(device)
    n = rows * cols
    if regions is not None:
        if tuple(regions.shape) != (count, rows, cols):
            raise ValueError(
                f"regions must be [{count}, {rows}, {cols}] (one per person on the token grid), got {tuple(regions.shape)}"
            )
        bounds = regions.to(device=device, dtype=torch.float32).clamp(0, 1).reshape(count, 1, n)
        return Layout(bounds, bounds, bounds)
    if count == 1:
        prior = _cached(_center_prior_cached, rows, cols, float(sigma), device, torch.float32)
        return Layout(prior.reshape(1, 1, n), None, None)
    priors = layout_priors(count, rows, cols, sigma, device).reshape(count, 1, n)
    territories = strip_territories(count, rows, cols, device).reshape(count, 1, n)
    return Layout(priors, territories, None)


def bind_words(
    layout: Layout, maps: torch.Tensor, bound: tuple[bool, ...], rows: int, cols: int, sigma: float
) -> Layout:
    """``layout`` (from :func:`build_layout`, without regions) with the priors and territories of
    people bound to words taken from their accumulated word maps ``[K, B, N]``
    (:func:`spatialid.masks.multi.word_layout`).

    Where the maps do not exist yet (zeros: the first step) each sample keeps ``layout``'s own
    rule (centre prior or strips), per sample, without a host read. The result is ``[K, B, N]``;
    ``layout.bounds`` (one bound for everybody, e.g. an inpainting mask) is kept.
    """
    priors, territories, ready = word_layout(maps, bound, rows, cols, sigma)
    base_territories = layout.territories if layout.territories is not None else torch.ones_like(layout.priors)
    return Layout(
        torch.where(ready, priors, layout.priors.to(priors.device)),
        torch.where(ready, territories, base_territories.to(priors.device)),
        layout.bounds,
    )


def time_column(t: torch.Tensor | float) -> torch.Tensor:
    """``t`` as ``[B|1, 1]`` in its own float dtype (a Python number becomes float64, so that it
    compares with the thresholds as Python floats do)."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), dtype=torch.float64)
    t = t.detach()
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t.reshape(-1, 1)


def phase_index(schedule: SpatialSchedule, t: torch.Tensor) -> torch.Tensor:
    """The schedule phase (:data:`PRIOR`, :data:`ATTENTION`, :data:`RELAXED`) of each time in ``t``.

    The one place the phase rule is written; ``t`` keeps its dtype and shape.
    """
    if schedule.mode == "prior":
        return torch.zeros_like(t, dtype=torch.int64)
    if schedule.mode == "attention":
        return torch.ones_like(t, dtype=torch.int64)
    before_early = t > schedule.early
    if schedule.mode == "no-relax":
        return torch.where(before_early, PRIOR, ATTENTION)
    return torch.where(before_early, PRIOR, torch.where(t > schedule.late, ATTENTION, RELAXED))


def _refined(
    schedule: SpatialSchedule, ca_raw: torch.Tensor, rows: int, cols: int, attn_probs: torch.Tensor | None
) -> torch.Tensor:
    """Each person's refined attention mask ``[K, B, N]`` (float32) from their own CA response."""
    count, batch, n_tokens = ca_raw.shape[:3]
    if schedule.source == "entropy":
        if attn_probs is None:
            raise ValueError(
                "SpatialSchedule(source='entropy') needs the CA attention probabilities; pass attn_probs or use source='norm'"
            )
        probs = attn_probs.to(ca_raw.device)
        raw = entropy_mask(probs.reshape(count * batch, *probs.shape[2:]), rows, cols)
    else:
        raw = norm_mask(ca_raw.reshape(count * batch, n_tokens, ca_raw.shape[-1]))
    return refine_mask(raw, rows, cols).reshape(count, batch, n_tokens)


def identity_masks(
    schedule: SpatialSchedule | None,
    t: torch.Tensor | float,
    ca_raw: torch.Tensor,
    rows: int,
    cols: int,
    layout: Layout,
    *,
    attn_probs: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Each person's injection mask ``[K, B, N]`` (float32), or None for "no mask" (uniform, one person).

    Args:
        schedule: the temporal-spatial schedule, or None for uniform PuLID injection (then only
            several people or regions give a mask: each person's territory, competing).
        t: flow time per sample ``[B]`` / ``[1]`` (or a number), 1 = noise.
        ca_raw: each person's raw CA output ``[K, B, N, D]`` (before its output projection).
        rows, cols: the image-token grid (``N = rows * cols``, row-major).
        layout: from :func:`build_layout` for these K people and this grid.
        attn_probs: ``[K, B, heads, N, n_id]`` for the entropy source.

    With several people the masks compete per token, ``M_k = m_k * softmax_k(m_k / tau)``, so a
    token gets at most one identity in full.
    """
    count, batch, n_tokens = ca_raw.shape[:3]
    if count != layout.count:
        raise ValueError(f"{count} identities but the layout was built for {layout.count}")
    territories = layout.territories
    if schedule is None:
        if territories is None:
            return None
        return compete(territories.expand(count, batch, n_tokens).clone())
    if schedule.mode == "prior":
        masks = layout.priors.expand(count, batch, n_tokens).clone()  # never hand out the cached prior itself
    else:
        refined = _refined(schedule, ca_raw, rows, cols, attn_probs)
        attention = refined if territories is None else refined * territories
        if schedule.mode == "attention":
            masks = attention
        else:
            phase = phase_index(schedule, time_column(t).to(ca_raw.device)).reshape(1, -1, 1)  # [1, B|1, 1]
            if schedule.mode == "scheduled":
                relaxed = schedule.late_floor + (1.0 - schedule.late_floor) * refined
                if territories is not None:
                    relaxed = relaxed * territories
                attention = torch.where(phase == RELAXED, relaxed, attention)
            masks = torch.where(phase == PRIOR, layout.priors, attention)
    if schedule.global_floor > 0.0:
        if territories is None:
            masks = masks.clamp_min(schedule.global_floor)
        else:
            masks = torch.maximum(masks, schedule.global_floor * territories)
    if layout.bounds is not None:
        masks = masks * layout.bounds
    masks = masks.expand(count, batch, n_tokens)
    return compete(masks) if count > 1 else masks
