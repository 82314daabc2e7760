"""Metrics for images with several people: per-person FaceSim, identity leakage, mask placement.

IBench scores one identity per image (``faces[0]``). With several people in a picture the face
that belongs to person ``k`` is not known in advance, so the detected faces are first matched to
the identities: the assignment that maximises the total cosine similarity (the Hungarian method,
``scipy.optimize.linear_sum_assignment``), one face per identity at most. Then, per person:

* ``facesim``: cosine of the matched face to that person's reference embedding (NaN when fewer
  faces than people were detected and this person got none);
* ``leakage``: the mean cosine of that same face to the *other* people's references. A method that
  blends identities scores high here; a clean one scores as low as two strangers;
* ``mask_inside``: the share of the person's recorded injection mask that lies inside their
  region (from a ``--save-masks`` file), i.e. whether the identity went where it was asked to.

Matching by similarity rather than by position makes ``facesim`` an upper bound when the faces
swapped places; ``swapped`` reports whether the matched faces' left-to-right order differs from
the people's order (their layout priors run left to right by default), so a swap is visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from spatialid.errors import SpatialIDError

__all__ = ["PersonScores", "mask_share_inside", "match_faces", "score_people"]


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2:
        raise SpatialIDError(f"embeddings must be a 2-D array [count, dim], got shape {rows.shape}")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def match_faces(faces: np.ndarray, identities: np.ndarray) -> list[int | None]:
    """For each identity, the index of its face (or None): the assignment of maximal total cosine.

    ``faces`` is ``[F, d]`` (detected faces' embeddings), ``identities`` ``[K, d]``; with F < K some
    identities get no face, with F > K some faces stay unmatched (an extra person, or a duplicate).
    """
    if len(faces) == 0 or len(identities) == 0:
        return [None] * len(identities)
    f, k = _unit(faces), _unit(identities)
    if f.shape[1] != k.shape[1]:
        raise SpatialIDError(
            f"face embeddings have {f.shape[1]} values but identity embeddings {k.shape[1]}; "
            "embed both with the same face model"
        )
    from scipy.optimize import linear_sum_assignment

    sim = k @ f.T  # [K, F]
    rows, cols = linear_sum_assignment(sim, maximize=True)
    out: list[int | None] = [None] * len(identities)
    for r, c in zip(rows, cols):
        out[int(r)] = int(c)
    return out


@dataclass
class PersonScores:
    """Per-person scores of one image (lists in the people's order)."""

    facesim: list[float]
    leakage: list[float]
    face_index: list[int | None]
    faces_detected: int
    swapped: bool
    mask_inside: list[float] = field(default_factory=list)

    @property
    def mean_facesim(self) -> float:
        vals = [v for v in self.facesim if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan

    @property
    def mean_leakage(self) -> float:
        vals = [v for v in self.leakage if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan

    def to_dict(self) -> dict[str, object]:
        return {
            "facesim": self.facesim,
            "leakage": self.leakage,
            "face_index": self.face_index,
            "faces_detected": self.faces_detected,
            "swapped": self.swapped,
            "mask_inside": self.mask_inside,
            "mean_facesim": self.mean_facesim,
            "mean_leakage": self.mean_leakage,
        }


def score_people(
    faces: np.ndarray,
    identities: np.ndarray,
    boxes: Sequence[Sequence[float]] | None = None,
) -> PersonScores:
    """Match ``faces`` [F, d] to ``identities`` [K, d] and score each person (see the module text).

    ``boxes`` (one ``(x0, y0, x1, y1)`` per face) gives the faces' positions for ``swapped``.
    """
    identities = np.asarray(identities)
    k_count = len(identities)
    if k_count == 0:
        raise SpatialIDError("no identities to score; give one reference embedding per person")
    faces = np.asarray(faces).reshape(-1, identities.shape[1]) if len(faces) else np.zeros((0, identities.shape[1]))
    index = match_faces(faces, identities)
    f, k = _unit(faces) if len(faces) else faces, _unit(identities)
    facesim, leakage = [], []
    for person, face in enumerate(index):
        if face is None:
            facesim.append(math.nan)
            leakage.append(math.nan)
            continue
        sims = k @ f[face]
        facesim.append(float(sims[person]))
        others = [float(sims[j]) for j in range(k_count) if j != person]
        leakage.append(float(np.mean(others)) if others else math.nan)
    swapped = False
    if boxes is not None:
        if len(boxes) != len(faces):
            raise SpatialIDError(f"{len(boxes)} face boxes for {len(faces)} faces; give one box per face")
        centres = [(float(boxes[i][0]) + float(boxes[i][2])) / 2 for i in index if i is not None]
        swapped = any(b < a for a, b in zip(centres, centres[1:]))
    return PersonScores(facesim, leakage, index, len(faces), swapped)


def mask_share_inside(masks: np.ndarray, regions: np.ndarray, threshold: float = 0.5) -> list[float]:
    """Share of each person's mask mass inside their region.

    ``masks``: a ``--save-masks`` tensor ``[steps, points, persons, batch, rows, cols]``;
    ``regions``: ``[persons, rows, cols]`` in [0, 1] (a token is inside when > ``threshold``).
    NaN for a person whose mask is zero everywhere.
    """
    masks = np.asarray(masks, dtype=np.float64)
    regions = np.asarray(regions, dtype=np.float64)
    if masks.ndim != 6:
        raise SpatialIDError(
            f"masks must be [steps, points, persons, batch, rows, cols], got shape {masks.shape}"
        )
    persons, rows, cols = masks.shape[2], masks.shape[4], masks.shape[5]
    if regions.shape != (persons, rows, cols):
        raise SpatialIDError(
            f"regions must be [persons, rows, cols] = {(persons, rows, cols)} to match the masks, got {regions.shape}"
        )
    inside = regions > threshold
    out = []
    for p in range(persons):
        per = masks[:, :, p]  # [steps, points, batch, rows, cols]
        total = per.sum()
        out.append(float(per[..., inside[p]].sum() / total) if total > 0 else math.nan)
    return out
