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

People bound to words of the prompt (``people=[(photo, "the boy"), ...]``) take their prior and
territory from FLUX's own attention between the image tokens and those words' text tokens,
accumulated over the layout steps (:func:`word_layout`): the territories are a soft competition
between the bound people's smoothed maps, the priors the maps themselves; people without words
share what the bound people leave with the strip rule.

This module builds the pieces (priors, territories, region bounds, the competition); the one
mask function that combines them with the schedule is :func:`spatialid.masks.compute.identity_masks`
(one person is its case K = 1). Tensor code with static shapes, no host reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "COMPETITION_TAU",
    "MAX_PEOPLE",
    "STRIP_MARGIN",
    "STRIP_SOFTNESS",
    "WORD_LAYOUT_UNTIL",
    "WORD_LEVEL",
    "WORD_TAU",
    "box_region",
    "compete",
    "layout_priors",
    "region_from_mask",
    "strip_territories",
    "word_layout",
]

#: Temperature of the per-token softmax between people (masks live in [0, 1]).
COMPETITION_TAU = 0.1
#: Up to this many identities per image.
MAX_PEOPLE = 4
#: A person's default territory is their strip of the width widened by this share of a strip.
STRIP_MARGIN = 0.25
#: Width of the soft strip edges, as a share of a strip.
STRIP_SOFTNESS = 0.05
#: Temperature of the competition between bound people's normalised word maps (in [0, 1]).
WORD_TAU = 0.1
#: A bound person's territory is full where their word map is above this share of its peak.
WORD_LEVEL = 0.5
#: Without a schedule (uniform PuLID) the word maps are gathered while t > this (the paper's ``early``).
WORD_LAYOUT_UNTIL = 0.7


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
        # float64 throughout: a float32 bound next to float64 cell edges left ~1e-6 of mask in the
        # next token row when a box edge fell on a token boundary.
        edges = torch.arange(n + 1, dtype=torch.float64) / n
        hi_t, lo_t = torch.tensor(hi, dtype=torch.float64), torch.tensor(lo, dtype=torch.float64)
        inside = (torch.minimum(edges[1:], hi_t) - torch.maximum(edges[:-1], lo_t)).clamp_min(0)
        return inside * n

    return (cover(y0, y1, rows)[:, None] * cover(x0, x1, cols)[None, :]).clamp(0, 1).to(torch.float32)


def region_from_mask(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A painted mask ``[H, W]`` (values in [0, 1], any size) resized to the token grid by area."""
    if mask.dim() != 2:
        raise ValueError(f"a region mask must be one 2-D picture [H, W], got shape {tuple(mask.shape)}")
    values = mask.to(torch.float32).clamp(0, 1)[None, None]
    return F.adaptive_avg_pool2d(values, (rows, cols))[0, 0] if values.shape[-2:] != (rows, cols) else values[0, 0]


def compete(masks: torch.Tensor, tau: float = COMPETITION_TAU) -> torch.Tensor:
    """``M_k = m_k * softmax_k(m_k / tau)`` over the first axis: ``sum_k M_k <= max_k m_k``."""
    return masks * torch.softmax(masks / tau, dim=0)


def _smooth(maps: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A 3x3 box blur of ``[K, B, rows * cols]`` maps on their grid (borders average what they have)."""
    k, b, n = maps.shape
    grid = maps.reshape(k * b, 1, rows, cols)
    return F.avg_pool2d(grid, 3, stride=1, padding=1, count_include_pad=False).reshape(k, b, n)


def word_layout(
    maps: torch.Tensor, bound: Sequence[bool], rows: int, cols: int, sigma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Priors and territories ``[K, B, N]`` of people bound to words, and whether the maps exist ``[1, B, 1]``.

    ``maps`` are each person's accumulated attention to their words ``[K, B, rows * cols]``
    (zeros for people without words, and for everybody before the first layout step);
    ``bound[k]`` says whether person k has words. A bound person's map is smoothed and scaled to
    a peak of 1 (``a_k``): their prior is ``a_k``, their territory ``min(a_k / WORD_LEVEL, 1) *
    softmax_bound(a / WORD_TAU)_k`` (the bound people share each token by how strongly each one's
    words look at it). People without words share what is left, ``1 - sum of the bound
    territories``, by the strip rule among themselves (left to right, in order). Tensor code, no
    host reads; the caller falls back to the strip rule where ``ready`` is False.
    """
    count = maps.shape[0]
    if len(bound) != count or not any(bound):
        raise ValueError(f"bound must name {count} people, at least one of them bound to words")
    bound_ix = [k for k in range(count) if bound[k]]
    free_ix = [k for k in range(count) if not bound[k]]
    smooth = _smooth(maps[bound_ix].float(), rows, cols)
    peak = smooth.amax(dim=-1, keepdim=True)
    ready = (peak > 0).all(dim=0, keepdim=True)  # [1, B, 1]
    level = smooth / peak.clamp_min(torch.finfo(torch.float32).tiny)
    share = torch.softmax(level / WORD_TAU, dim=0)
    territory = (level / WORD_LEVEL).clamp(max=1.0) * share
    priors = [torch.empty(0)] * count
    territories = [torch.empty(0)] * count
    for j, k in enumerate(bound_ix):
        priors[k], territories[k] = level[j], territory[j]
    if free_ix:
        rest = (1.0 - territory.sum(dim=0)).clamp(0.0, 1.0)  # [B, N]
        strips = strip_territories(len(free_ix), rows, cols, maps.device)
        gauss = layout_priors(len(free_ix), rows, cols, sigma, maps.device)
        for j, k in enumerate(free_ix):
            priors[k], territories[k] = gauss[j] * rest, strips[j] * rest
    return torch.stack(priors), torch.stack(territories), ready


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_PEOPLE:
        raise ValueError(f"between 1 and {MAX_PEOPLE} identities per image, got {count!r}")
