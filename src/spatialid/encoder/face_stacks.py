"""The face stage of the identity encoder: which face of a photo is used, aligned and parsed.

Two stacks share one rule (PuLID-FLUX's, see :mod:`spatialid.encoder.identity_encoder`): the
identity vector from the largest face, alignment and parsing from the face nearest the centre.
:class:`_DlibStack` is the tiny preset's (dlib only), :class:`_PuLIDStack` the real one (insightface
ArcFace + facexlib, or dlib for alignment when facexlib is absent). Logs under the encoder's logger
name, so its warnings read and filter as before this module was split off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spatialid.encoder.face_dlib import DlibFaceAnalyzer, FaceDetection, center_face, largest_face
from spatialid.encoder.parsing import landmark_parsing_map
from spatialid.errors import FaceNotFoundError

__all__ = ["ALIGNED_SIZE", "DLIB_ID_DIM", "MIN_FACE_SIZE", "FaceAnalysis"]

logger = logging.getLogger("spatialid.encoder.identity_encoder")

MIN_FACE_SIZE = 64  # px, shorter side of the face box; smaller faces are used with a warning
ALIGNED_SIZE = 512  # facexlib's face_size in PuLID
DLIB_ID_DIM = 128  # dlib face descriptor size (tiny preset's identity vector)


@dataclass
class FaceAnalysis:
    """What the face stage produced for one photo."""

    id_vector: np.ndarray  # float32 [id_dim]
    box: tuple[float, float, float, float]
    score: float
    num_faces: int
    aligned: np.ndarray  # uint8 [512, 512, 3] RGB
    labels: torch.Tensor  # long [1, 1, 512, 512] parsing map
    landmarks5: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- face stacks


class _DlibStack:
    """Tiny preset: dlib detection/alignment, landmark parsing, dlib descriptor."""

    def __init__(self, analyzer: DlibFaceAnalyzer, min_face_size: int) -> None:
        self.analyzer = analyzer
        self.min_face_size = min_face_size
        self.id_dim = DLIB_ID_DIM
        self.name = "dlib"
        self.id_name = "dlib-resnet-128"

    def analyze(self, rgb: np.ndarray, name: str) -> FaceAnalysis:
        faces = self.analyzer.detect(rgb)
        id_face, face, notes = _pick_faces(name, rgb.shape, faces, "dlib", faces, "dlib", self.min_face_size)
        assert id_face is not None  # same list: no alignment face without an identity face
        aligned, matrix = self.analyzer.align(rgb, face, ALIGNED_SIZE)
        labels = _landmark_labels(self.analyzer, face, matrix)
        vec = self.analyzer.descriptor(rgb, id_face)
        return FaceAnalysis(vec, id_face.box, id_face.score, len(faces), aligned, labels, face.landmarks5, notes)


class _PuLIDStack:
    """Real path: insightface ArcFace + facexlib (or the dlib fallback) alignment and parsing."""

    def __init__(self, arcface: Any, facexlib: Any | None, dlib: DlibFaceAnalyzer | None, min_face_size: int) -> None:
        if facexlib is None and dlib is None:
            raise ValueError("need facexlib or dlib for alignment")
        self.arcface = arcface
        self.facexlib = facexlib
        self.dlib = dlib
        self.min_face_size = min_face_size
        self.id_dim = 512
        self.name = "insightface+facexlib" if facexlib is not None else "insightface+dlib"
        self.id_name = "arcface-antelopev2-glintr100-512"

    def analyze(self, rgb: np.ndarray, name: str) -> FaceAnalysis:
        id_faces = self.arcface.detect(rgb)
        aligner = self.facexlib if self.facexlib is not None else self.dlib
        faces = aligner.detect(rgb)
        id_face, face, notes = _pick_faces(name, rgb.shape, id_faces, getattr(self.arcface, "name", "insightface"),
                                           faces, aligner.name, self.min_face_size)
        if self.facexlib is not None:
            aligned, _ = self.facexlib.align(rgb, face, ALIGNED_SIZE)
            labels = self.facexlib.parse(torch.from_numpy(aligned).permute(2, 0, 1)[None].float() / 255.0).cpu()
        else:
            aligned, matrix = self.dlib.align(rgb, face, ALIGNED_SIZE)
            labels = _landmark_labels(self.dlib, face, matrix)
        if id_face is not None:
            vec = self.arcface.embed(rgb, id_face)
            box, score, count = id_face.box, id_face.score, len(id_faces)
        else:
            logger.info("insightface found no face in %s: ArcFace runs on the aligned crop (as PuLID does)", name)
            notes.append("arcface_on_aligned_crop")
            vec = self.arcface.embed_aligned(aligned)
            box, score, count = face.box, face.score, len(faces)
        return FaceAnalysis(vec, box, score, count, aligned, labels, face.landmarks5, notes)


def _no_face_message(name: str, min_face_size: int = MIN_FACE_SIZE) -> str:
    return (
        f"no face found in {name}; use a photo where one face is clearly visible, frontal and well lit "
        f"(at least {min_face_size} px tall)"
    )


def _same_face(a: FaceDetection, b: FaceDetection) -> bool:
    """Two detectors' boxes of one face overlap well; two people's hardly at all."""
    from spatialid.encoder.face_facexlib import box_iou

    return a is b or box_iou(a.box, b.box) >= 0.3


def _describe(face: FaceDetection) -> str:
    return f"{face.width:.0f}x{face.height:.0f} px at x={face.box[0]:.0f}, y={face.box[1]:.0f}"


def _pick_faces(
    name: str,
    shape: tuple[int, ...],
    id_faces: Sequence[FaceDetection],
    id_detector: str,
    faces: Sequence[FaceDetection],
    detector: str,
    min_face_size: int,
) -> tuple[FaceDetection | None, FaceDetection, list[str]]:
    """PuLID-FLUX's choice: ``(identity face, alignment face, notes)`` (see the module docstring).

    identity face: the largest of ``id_faces`` (None when there are none, then ArcFace runs on the
    aligned crop); alignment face: the one of ``faces`` nearest the photo centre. Small faces are
    kept with a warning. Raises FaceNotFoundError only when ``faces`` is empty.
    """
    id_face = largest_face(id_faces) if id_faces else None
    if not faces:
        if id_face is None:
            raise FaceNotFoundError(_no_face_message(name, min_face_size))
        raise FaceNotFoundError(
            f"no face found in {name} by the alignment detector ({detector}); "
            "use a frontal, well-lit photo where the face is clearly visible"
        )
    face = center_face(faces, shape[1], shape[0])
    notes: list[str] = []
    same = id_face is not None and _same_face(id_face, face)
    if id_face is not None and not same:
        notes.append("identity_and_aligned_faces_differ")
    if len(id_faces) > 1 or len(faces) > 1 or "identity_and_aligned_faces_differ" in notes:
        what = []
        if id_face is not None:
            what.append(f"identity vector from the largest of {len(id_faces)} ({id_detector}): {_describe(id_face)}")
        where = "the same face" if same else _describe(face)
        what.append(f"alignment and EVA-CLIP from the one of {len(faces)} ({detector}) nearest the centre: {where}")
        tail = "" if same or id_face is None else "; these are different faces, as PuLID-FLUX would use them"
        logger.warning("several faces in %s: %s%s", name, "; ".join(what), tail)
    used = [id_face] if same else [f for f in (id_face, face) if f is not None]
    for f in used:
        if f.side < min_face_size:
            notes.append("small_face")
            logger.warning(
                "the face in %s is only %.0fx%.0f px, under %d px: encoded anyway (as PuLID-FLUX does), but "
                "its identity is unreliable; a closer or higher-resolution photo gives a better likeness",
                name, f.width, f.height, min_face_size,
            )
    return id_face, face, notes


def _landmark_labels(analyzer: DlibFaceAnalyzer, face: FaceDetection, matrix: np.ndarray) -> torch.Tensor:
    pts = analyzer.aligned_landmarks68(face, matrix)
    if pts is None:  # 5-point predictor only: keep everything (no parsing possible)
        return torch.ones(1, 1, ALIGNED_SIZE, ALIGNED_SIZE, dtype=torch.long)
    return landmark_parsing_map(pts, ALIGNED_SIZE)
