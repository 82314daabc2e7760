"""The field's multi-person face metrics: count accuracy, ID-Conf, copy-paste, Sim(GT), per group size.

* **Count accuracy** (MultiHuman-Testbench): 1 when the number of faces found equals the number of
  people asked for, else 0; its mean is the share of such images.
* **ID-Conf** (UMO, ByteDance): for each reference, its cosine similarities to every generated face,
  ``(top1 - top2) / top1``: near 1 when one face clearly is that person, near 0 when two faces are
  equally like them (a duplicated or blended identity). Similarities are clipped at 0 first (a
  negative cosine says "not this person" as much as 0 does), so the value lies in [0, 1]. With one
  face there is no second one to confuse it with: ``top2 = 0`` and ID-Conf is 1; with no face, or
  ``top1 <= 0``, it is undefined (NaN, left out of the mean).
* **CP, copy-paste** (WithAnyone, MultiID-Bench): ``(θ(gen, GT) − θ(gen, ref)) / θ(GT, ref)`` with
  θ the angle (arccos of the cosine) between face embeddings and GT another photo of the same person
  than the reference: 1 when the generated face is the reference copied, −1 when it is the other
  photo, about 0 when it sits between them (the person, not the photo). WithAnyone's ``copy_geo``
  returns 0 when ``θ(GT, ref)`` is below 1e-6; so do we. Only where a second photo exists.
* **Sim(GT)**: the cosine of the generated face to that other photo, beside **Sim(Ref)**, the
  cosine to the reference (WithAnyone reports both).

Faces are matched to people by the Hungarian method (:func:`spatialid.evaluation.multi_person.match_faces`),
as WithAnyone, MultiHuman-Testbench and our Person FaceSim do. Group sizes are bucketed as
MultiID-Bench and MultiHuman-Testbench report them: 1, 2, 3-4, 5+.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "COPY_PASTE_EPS",
    "GROUP_BUCKETS",
    "angle",
    "copy_paste",
    "count_accuracy",
    "group_bucket",
    "id_conf",
    "score_persons",
]

COPY_PASTE_EPS = 1e-6  # WithAnyone's copy_geo: θ(GT, ref) below this -> 0
GROUP_BUCKETS = ("1", "2", "3-4", "5+")


def _unit(v: Any) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).ravel()
    return v / max(float(np.linalg.norm(v)), COPY_PASTE_EPS)  # exact for any norm (dlib's are ~1)


def angle(a: Any, b: Any) -> float:
    """The angle (radians) between two embeddings: ``arccos`` of their clipped cosine."""
    return float(np.arccos(np.clip(_unit(a) @ _unit(b), -1.0, 1.0)))


def copy_paste(gen: Any, gt: Any, ref: Any) -> float:
    """WithAnyone's CP: ``(θ(gen, GT) − θ(gen, ref)) / θ(GT, ref)``; 0 when GT and ref coincide."""
    theta_tr = angle(gt, ref)
    if theta_tr < COPY_PASTE_EPS:
        return 0.0
    return (angle(gen, gt) - angle(gen, ref)) / theta_tr


def id_conf(similarities: Sequence[float]) -> float:
    """UMO's ID-Conf of one reference from its similarities to the generated faces (module text)."""
    sims = sorted((max(float(s), 0.0) for s in similarities if not math.isnan(float(s))), reverse=True)
    if not sims or sims[0] <= 0.0:
        return math.nan
    top2 = sims[1] if len(sims) > 1 else 0.0
    return (sims[0] - top2) / sims[0]


def count_accuracy(faces_found: int, people: int) -> float:
    """1.0 when exactly ``people`` faces were found, else 0.0."""
    return 1.0 if int(faces_found) == int(people) else 0.0


def group_bucket(people: int) -> str:
    """The group-size bucket of an image with ``people`` people: 1, 2, 3-4 or 5+."""
    if people <= 1:
        return "1"
    if people == 2:
        return "2"
    return "3-4" if people <= 4 else "5+"


def _cos(a: Any, b: Any) -> float:
    return float(_unit(a) @ _unit(b))


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def score_persons(
    faces: Sequence[Any],
    refs: Sequence[Any],
    gts: Sequence[Sequence[Any]] = (),
    face_geometry: Sequence[Any] | None = None,
    ref_geometry: Sequence[Any] | None = None,
    faces_found: int | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """``(image columns, one dict per person)`` for the faces found in one generated image.

    ``faces``: the generated image's face embeddings; ``refs``: one reference embedding per person;
    ``gts``: per person, embeddings of other photos of that person (may be empty); ``face_geometry``
    / ``ref_geometry``: :class:`~spatialid.evaluation.face_geometry.FaceGeometry` (or None) per face
    and per person, for LandmarkDiff / PoseDiv / ExprDiv. Per-person values are averaged into the
    image's columns (NaN ones left out). ``faces_found``: the faces detected, for count accuracy, when
    ``faces`` holds a stand-in (the tiny evaluation's centre box); default ``len(faces)``.
    """
    from spatialid.evaluation.multi_person import match_faces

    k = len(refs)
    faces_arr = np.stack([np.asarray(f, dtype=np.float64).ravel() for f in faces]) if len(faces) else np.zeros((0, 1))
    refs_arr = np.stack([np.asarray(r, dtype=np.float64).ravel() for r in refs])
    index = match_faces(faces_arr, refs_arr) if len(faces) else [None] * k
    people: list[dict[str, Any]] = []
    for j in range(k):
        i = index[j]
        person: dict[str, Any] = {
            "face_index": i,
            "id_conf": id_conf([_cos(refs_arr[j], f) for f in faces_arr]) if len(faces) else math.nan,
            "sim_ref": math.nan,
        }
        person_gts = list(gts[j]) if j < len(gts) else []
        if person_gts:  # Sim(GT) and CP exist only where another photo of the person does
            person["sim_gt"] = person["copy_paste"] = math.nan
        if i is not None:
            person["sim_ref"] = _cos(faces_arr[i], refs_arr[j])
            if person_gts:
                person["sim_gt"] = _nanmean([_cos(faces_arr[i], g) for g in person_gts])
                person["copy_paste"] = _nanmean([copy_paste(faces_arr[i], g, refs_arr[j]) for g in person_gts])
            ref_geo = ref_geometry[j] if ref_geometry is not None and j < len(ref_geometry) else None
            gen_geo = face_geometry[i] if face_geometry is not None and i < len(face_geometry) else None
            if ref_geo is not None and gen_geo is not None:
                person.update(ref_geo.compare(gen_geo))
        people.append(person)
    columns: dict[str, float] = {
        "count_acc": count_accuracy(len(faces) if faces_found is None else faces_found, k),
        "faces_found": float(len(faces) if faces_found is None else faces_found),
    }
    keys = ("sim_ref", "sim_gt", "copy_paste", "id_conf", "landmark_diff", "pose_div_yaw", "pose_div_pitch",
            "pose_div_roll", "expr_div")
    for key in keys:
        vals = [p[key] for p in people if key in p]
        if vals:
            columns[key] = _nanmean(vals)
    return columns, people
