"""Masks for several identities in one image: layout priors, regions and competition.

With K people, every injection point runs the identity CA once per person (same weights) and
derives one schedule mask ``m_k`` per person from that person's own CA response, exactly as the
single-identity schedule does, but with the layout of K people:

* early (``t > early``): a *layout prior* per person, a Gaussian centred at ``(k + 0.5) / K`` of
  the width (people spread left to right in the order given; ``sigma_x = center_sigma / K``), or
  the person's region when regions are given;
* middle: the refined attention mask of the person's own response times the person's
  *territory* (their region, or a soft vertical strip ``[k/K, (k+1)/K]`` widened by a quarter
  strip), so a person's mask cannot wander onto another person's place between steps;
* late (``t <= late``): ``late_floor + (1 - late_floor) * refined``, again times the territory,
  so the relaxation only lifts each person's own region (a global floor would blend everybody
  everywhere); a ``global_floor`` is likewise a floor inside the territory only.

Regions (``[K, rows, cols]`` upper bounds in [0, 1]) multiply every ``m_k``: outside a person's
region their residual is exactly zero. Finally the masks compete per token::

    M_k = m_k * softmax_k(m_k / tau)            (tau = COMPETITION_TAU)

so ``sum_k M_k <= max_k m_k <= 1``: a token gets at most one identity in full, the person whose
mask is clearly higher wins (``M_k ~ m_k``), and where two masks are about equal (the border
between two people) each gets about half, which keeps borders soft instead of a hard argmax seam.

Everything here is tensor code with static shapes: no host reads, no data-dependent Python
branches, so it runs inside ``torch.compile`` graphs. Priors, territories and regions are built
once per session (:func:`layout`), not per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from spatialid.masks.extractor import entropy_mask, norm_mask, refine_mask

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.masks.schedule import SpatialSchedule

__all__ = [
    "COMPETITION_TAU",
    "MAX_PEOPLE",
    "STRIP_MARGIN",
    "STRIP_SOFTNESS",
    "Layout",
    "box_region",
    "compete",
    "layout",
    "layout_priors",
    "multi_masks",
    "region_from_mask",
    "strip_territories",
]

#: Temperature of the per-token softmax between people (masks live in [0, 1]).
COMPETITION_TAU = 0.1
#: Up to this many identities per image.
MAX_PEOPLE = 4
#: A person's default territory is their strip of the width widened by this share of a strip.
STRIP_MARGIN = 0.25
#: Width of the soft strip edges, as a share of a strip.
STRIP_SOFTNESS = 0.05


def _grid_x(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Token centres along the width in [0, 1], ``[rows * cols]`` row-major."""
    x = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols
    return x.repeat(rows)


def layout_priors(count: int, rows: int, cols: int, sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """One Gaussian prior per person ``[K, rows * cols]`` (float32, max 1), left to right in order.

    Person k is centred at ``(k + 0.5) / K`` of the width and half the height, ``sigma`` (on the
    [-1, 1] grid, as the centre prior) along y and ``sigma / K`` along x so neighbours overlap
    little. With K = 1 this is the single-identity centre prior.
    """
    _check_count(count)
    device = torch.device(device)
    x = torch.linspace(-1.0, 1.0, cols, dtype=torch.float64)
    y = torch.linspace(-1.0, 1.0, rows, dtype=torch.float64)
    centres = -1.0 + 2.0 * (torch.arange(count, dtype=torch.float64) + 0.5) / count  # [K]
    sx, sy = sigma / count, sigma
    dx2 = (x[None, :] - centres[:, None]) ** 2 / (2.0 * sx * sx)  # [K, cols]
    dy2 = y**2 / (2.0 * sy * sy)  # [rows]
    d = dy2[None, :, None] + dx2[:, None, :]  # [K, rows, cols]
    d = d - d.flatten(1).amin(dim=1)[:, None, None]  # max exactly 1, no underflow for small sigma
    return torch.exp(-d).reshape(count, rows * cols).to(device=device, dtype=torch.float32)


def strip_territories(count: int, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Soft vertical strips ``[K, rows * cols]`` in [0, 1]: where person k may be without a region.

    Strip k covers ``[k/K, (k+1)/K]`` of the width widened by ``STRIP_MARGIN`` of a strip on each
    side, with sigmoid edges ``STRIP_SOFTNESS`` of a strip wide.
    """
    _check_count(count)
    x = _grid_x(rows, cols, torch.device(device))  # [N]
    k = torch.arange(count, device=x.device, dtype=torch.float32)[:, None]
    width = 1.0 / count
    left = k * width - STRIP_MARGIN * width
    right = (k + 1) * width + STRIP_MARGIN * width
    soft = STRIP_SOFTNESS * width
    return torch.sigmoid((x[None, :] - left) / soft) * torch.sigmoid((right - x[None, :]) / soft)


def box_region(box: Sequence[float], rows: int, cols: int) -> torch.Tensor:
    """A fractional box ``(x0, y0, x1, y1)`` as an upper bound ``[rows, cols]`` in [0, 1].

    Each token gets the share of its cell covered by the box: 1 inside, 0 outside, fractions on
    the box edge (so a box need not align with the 16-pixel token grid).
    """
    if len(box) != 4:
        raise ValueError(f"a region box needs four fractions x0,y0,x1,y1, got {list(box)!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(
            f"region box {x0:g},{y0:g},{x1:g},{y1:g} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
            "(fractions of width and height)"
        )

    def cover(lo: float, hi: float, n: int) -> torch.Tensor:
        edges = torch.arange(n + 1, dtype=torch.float64) / n
        inside = (torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))).clamp_min(0)
        return inside * n

    return (cover(y0, y1, rows)[:, None] * cover(x0, x1, cols)[None, :]).clamp(0, 1).to(torch.float32)


def region_from_mask(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A painted mask ``[H, W]`` (values in [0, 1], any size) resized to the token grid by area."""
    if mask.dim() != 2:
        raise ValueError(f"a region mask must be one 2-D picture [H, W], got shape {tuple(mask.shape)}")
    values = mask.to(torch.float32).clamp(0, 1)[None, None]
    return F.adaptive_avg_pool2d(values, (rows, cols))[0, 0] if values.shape[-2:] != (rows, cols) else values[0, 0]


class Layout:
    """The per-session masks of K people on one grid: priors, territories and region bounds.

    All ``[K, 1, N]`` float32 on one device (the middle axis broadcasts over the batch).
    """

    def __init__(self, priors: torch.Tensor, territories: torch.Tensor, bounds: torch.Tensor | None) -> None:
        self.priors = priors
        self.territories = territories
        self.bounds = bounds

    @property
    def count(self) -> int:
        return int(self.priors.shape[0])


def layout(
    count: int,
    rows: int,
    cols: int,
    sigma: float,
    regions: torch.Tensor | None,
    device: torch.device | str,
) -> Layout:
    """Build the :class:`Layout` of ``count`` people (host work, once per session and grid).

    With ``regions`` ``[K, rows, cols]`` each person's prior, territory and bound are their region;
    without, the Gaussian layout priors and the soft strips, and no bound.
    """
    _check_count(count)
    device = torch.device(device)
    n = rows * cols
    if regions is not None:
        if tuple(regions.shape) != (count, rows, cols):
            raise ValueError(
                f"regions must be [{count}, {rows}, {cols}] (one per person on the token grid), got {tuple(regions.shape)}"
            )
        bounds = regions.to(device=device, dtype=torch.float32).clamp(0, 1).reshape(count, 1, n)
        return Layout(bounds, bounds, bounds)
    priors = layout_priors(count, rows, cols, sigma, device).reshape(count, 1, n)
    territories = strip_territories(count, rows, cols, device).reshape(count, 1, n)
    return Layout(priors, territories, None)


def compete(masks: torch.Tensor, tau: float = COMPETITION_TAU) -> torch.Tensor:
    """``M_k = m_k * softmax_k(m_k / tau)`` over the first axis: ``sum_k M_k <= max_k m_k``."""
    return masks * torch.softmax(masks / tau, dim=0)


def multi_masks(
    schedule: SpatialSchedule | None,
    t: torch.Tensor,
    ca_raw: torch.Tensor,
    rows: int,
    cols: int,
    people: Layout,
    *,
    attn_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Competing masks ``[K, B, N]`` (float32) of K people at per-sample time ``t`` ``[B]``.

    ``ca_raw`` is ``[K, B, N, D]``, each person's raw CA output (``attn_probs``
    ``[K, B, heads, N, n_id]`` for the entropy source). ``schedule=None`` (uniform PuLID) gives
    each person their territory at every step, then the competition.
    """
    count, batch, n_tokens = ca_raw.shape[:3]
    if count != people.count:
        raise ValueError(f"{count} identities but the layout was built for {people.count}")
    if schedule is None:
        return compete(people.territories.expand(count, batch, n_tokens).clone())
    flat = ca_raw.reshape(count * batch, n_tokens, ca_raw.shape[-1])
    if schedule.mode == "prior":
        m = people.priors.expand(count, batch, n_tokens)
    else:
        if schedule.source == "entropy":
            if attn_probs is None:
                raise ValueError("the entropy mask source needs attn_probs [K, B, heads, N, n_id]")
            raw = entropy_mask(attn_probs.reshape(count * batch, *attn_probs.shape[2:]), rows, cols)
        else:
            raw = norm_mask(flat)
        refined = refine_mask(raw, rows, cols).reshape(count, batch, n_tokens)
        attention = refined * people.territories
        if schedule.mode == "attention":
            m = attention
        else:
            tt = t.detach().float().reshape(1, -1, 1)  # [1, B|1, 1]
            if schedule.mode == "scheduled":
                relaxed = (schedule.late_floor + (1.0 - schedule.late_floor) * refined) * people.territories
                attention = torch.where(tt <= schedule.late, relaxed, attention)
            m = torch.where(tt > schedule.early, people.priors, attention)
    if schedule.global_floor > 0.0:
        m = torch.maximum(m, schedule.global_floor * people.territories)
    if people.bounds is not None:
        m = m * people.bounds
    return compete(m.expand(count, batch, n_tokens))


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_PEOPLE:
        raise ValueError(f"between 1 and {MAX_PEOPLE} identities per image, got {count!r}")
