"""FaceSim and face detection: cosine similarity of face embeddings of the largest faces.

Two backends:

* ``arcface`` (default, the number papers report): insightface's antelopev2 models, SCRFD-10G
  detection and the glintr100 ArcFace recognizer (512-d), as PuLID itself uses them. Needs the
  optional ``[face]`` extra and the two ONNX files (see :mod:`spatialid.encoder.model_files`).
* ``dlib`` (offline alternative, always installed): dlib's HOG detector and its 128-d ResNet face
  descriptor from ``face-recognition-models``. Its cosine similarities are on another scale than
  ArcFace's (dlib descriptors of different people are still far from orthogonal), so reports name
  the backend next to the column and the two are never to be compared with each other.

An image in which no face is detected gets no FaceSim (NaN, left out of the mean) and counts as a
miss in the detection rate. With ``fallback="center"`` (used by the offline tiny evaluation, whose
generated images are noise) a centred box stands in for the face so that every column gets a value;
such values are flagged per image (``face_source = "center-fallback"``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spatialid.errors import SpatialIDError

__all__ = ["ArcFaceEmbedder", "DlibFaceEmbedder", "FaceResult", "center_box", "cosine", "load_face_embedder"]

FALLBACKS = ("none", "center")


@dataclass
class FaceResult:
    """The largest face of an image: box ``(x0, y0, x1, y1)`` in pixels and its embedding."""

    box: tuple[float, float, float, float]
    embedding: np.ndarray
    detected: bool  # False: the centre fallback box, not a detection

    @property
    def source(self) -> str:
        return "detected" if self.detected else "center-fallback"


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Cosine similarity of two vectors (NaN when either is missing)."""
    if a is None or b is None:
        return float("nan")
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(a @ b / (na * nb))


def center_box(width: int, height: int) -> tuple[float, float, float, float]:
    """Where a portrait's face usually is: a square of half the short side, centred a bit high."""
    side = 0.5 * min(width, height)
    cx, cy = width / 2, height * 0.45
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


class DlibFaceEmbedder:
    """Offline FaceSim backend: dlib HOG detection + 128-d ResNet descriptor (labelled as such)."""

    name = "dlib-resnet-128"
    random_weights = False

    def __init__(self, *, fallback: str = "none", min_score: float = 0.5) -> None:
        from spatialid.encoder.face_dlib import DlibFaceAnalyzer

        if fallback not in FALLBACKS:
            raise SpatialIDError(f"face fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        self.analyzer = DlibFaceAnalyzer(min_score=min_score, with_descriptor=True)
        self.fallback = fallback

    @property
    def label(self) -> str:
        return "dlib HOG detector + 128-d face descriptor (offline alternative to ArcFace; FaceSim not comparable to papers')"

    def analyze(self, rgb: np.ndarray) -> FaceResult | None:
        import dlib

        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        faces = self.analyzer.detect(img)
        if faces:
            face = faces[0]
            return FaceResult(face.box, self.analyzer.descriptor(img, face), True)
        if self.fallback != "center":
            return None
        h, w = img.shape[:2]
        box = center_box(w, h)
        rect = dlib.rectangle(int(box[0]), int(box[1]), int(box[2]) - 1, int(box[3]) - 1)
        shape = self.analyzer.predictor(img, rect)
        vec = np.asarray(self.analyzer.descriptor_net.compute_face_descriptor(img, shape), dtype=np.float32)
        return FaceResult(box, vec, False)


class ArcFaceEmbedder:
    """insightface antelopev2 (SCRFD + glintr100 ArcFace), the FaceSim of PuLID-style papers."""

    name = "arcface-antelopev2-glintr100"
    random_weights = False

    def __init__(
        self,
        *,
        device: str | None = None,
        models_dir: str | os.PathLike[str] | None = None,
        offline: bool | None = None,
        fallback: str = "none",
    ) -> None:
        from spatialid.encoder.face_insightface import InsightFaceArcFace, require_face_extra
        from spatialid.encoder.model_files import (
            ANTELOPE_DETECTOR,
            ANTELOPE_RECOGNIZER,
            default_models_dir,
            fetch,
            find_local,
            missing_files_error,
            offline_mode,
        )

        if fallback not in FALLBACKS:
            raise SpatialIDError(f"face fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        try:
            require_face_extra("insightface")
            require_face_extra("onnxruntime")
        except SpatialIDError as exc:
            raise SpatialIDError(f"{exc} (FaceSim with ArcFace), or use --face-model dlib (offline, labelled alternative)") from None
        folder = Path(models_dir).expanduser() if models_dir else default_models_dir()
        off = offline_mode(offline)
        paths, missing = [], []
        for spec in (ANTELOPE_DETECTOR, ANTELOPE_RECOGNIZER):
            path = find_local(spec, folder) or (None if off else fetch(spec, folder))
            (paths.append(path) if path is not None else missing.append(spec))
        if missing:
            err = missing_files_error(missing, folder, off)
            raise type(err)(f"FaceSim (ArcFace): {err}; or use --face-model dlib") from None
        self.model = InsightFaceArcFace(paths[0], paths[1], device=device)
        self.fallback = fallback

    @property
    def label(self) -> str:
        return "ArcFace (insightface antelopev2: SCRFD-10G + glintr100)"

    def analyze(self, rgb: np.ndarray) -> FaceResult | None:
        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        faces = self.model.detect(img)
        if faces:
            face = faces[0]
            return FaceResult(face.box, self.model.embed(img, face), True)
        if self.fallback != "center":
            return None
        from PIL import Image

        h, w = img.shape[:2]
        box = center_box(w, h)
        crop = Image.fromarray(img).crop(tuple(int(v) for v in box)).resize((112, 112))
        return FaceResult(box, self.model.embed_aligned(np.asarray(crop)), False)


def load_face_embedder(
    kind: str = "arcface",
    *,
    device: str | None = None,
    fallback: str = "none",
    models_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
) -> Any:
    """``"arcface"`` (insightface) or ``"dlib"`` (offline alternative)."""
    if kind == "arcface":
        return ArcFaceEmbedder(device=device, models_dir=models_dir, offline=offline, fallback=fallback)
    if kind == "dlib":
        return DlibFaceEmbedder(fallback=fallback)
    raise SpatialIDError(f"unknown face model {kind!r}; use arcface (insightface) or dlib (offline alternative)")
