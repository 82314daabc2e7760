"""FaceSim, AntiFaceSim and face detection, as IBench computes them.

IBench (typemovie/IBench, ``ibench/metrics/imageid/facesim.py``):

* ``FaceModelLoader.load_model``: insightface ``FaceAnalysis(name="antelopev2")`` prepared with
  ``det_size=(640, 640)`` (detection threshold 0.5, insightface's default);
* ``get_face_embedding``: ``cv2.imread(path)`` (BGR, EXIF orientation applied by OpenCV), then
  ``faces = model.get(img)`` and ``faces[0].embedding`` (the raw 512-d ArcFace vector), ``None``
  without a face. insightface returns faces in the detector's order, highest detection score
  first (SCRFD sorts by score before NMS; ``max_num=0`` means no re-ordering by size), so this is
  the most confident face, not the largest;
* ``cosine_similarity``: ``dot(a / |a|, b / |b|)``;
* ``FaceSim.evaluate``: the mean over items of cos(photo ``id``, ``imagewithid``); an item whose
  photo or image has no face raises inside the ``try`` and is skipped, so it is left out of the
  mean (not counted as 0). ``AntiFaceSim.evaluate``: the same with ``imagewithoutid``.

We compute the same per image (NaN where a face is missing, left out of the mean) and report the
share of images with a detected face as its own column. The antelopev2 pack's detector and
recognizer (``scrfd_10g_bnkps.onnx``, ``glintr100.onnx``) are the only two of its five models that
``.embedding`` depends on; we run those two through insightface's model zoo and ``norm_crop``,
which is what ``FaceAnalysis.get`` does with them.

Two backends:

* ``antelopev2`` (default, the number papers report; ``arcface`` is the same): the above. Needs
  the optional ``[face]`` extra (insightface, onnxruntime, OpenCV) and the two ONNX files
  (see :mod:`spatialid.encoder.model_files`).
* ``dlib`` (offline alternative, always installed): dlib's real recognition model from
  ``face-recognition-models``: the encoder's own detector rule (HOG, else the CNN detector:
  :func:`spatialid.encoder.face_dlib.shared_dlib_analyzer`, so eval finds every reference face that
  encode found), 68-point landmarks and the 128-d ResNet descriptor, with the same face choice
  (highest score). Its cosine similarities are on another scale than ArcFace's (two strangers
  score about 0.8), so reports name the backend next to the column and its numbers are never to be
  compared with ArcFace numbers in papers.

With ``fallback="center"`` (used by the offline tiny evaluation, whose generated images are noise)
a centred box stands in for a missing face so that every column gets a value; such values are
flagged per image (``face_source = "center-fallback"``). IBench has no such fallback.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from spatialid.errors import SpatialIDError

__all__ = [
    "FACE_MODELS",
    "ArcFaceEmbedder",
    "DlibFaceEmbedder",
    "FaceResult",
    "center_box",
    "cosine",
    "first_face_index",
    "load_face_embedder",
]

FALLBACKS = ("none", "center")
DETECTIONS_KEPT = 256  # DlibFaceEmbedder: images whose detections are kept (a few KB each)
FACE_MODELS = ("antelopev2", "dlib")  # --face-model; "arcface" is accepted for antelopev2
T = TypeVar("T")


@dataclass
class FaceResult:
    """The face IBench would use: box ``(x0, y0, x1, y1)`` in pixels, its embedding and score."""

    box: tuple[float, float, float, float]
    embedding: np.ndarray
    detected: bool  # False: the centre fallback box, not a detection
    score: float = math.nan
    landmarks: np.ndarray | None = None  # dlib's [68, 2] landmarks or a detector's 5 keypoints

    @property
    def source(self) -> str:
        return "detected" if self.detected else "center-fallback"


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """IBench's ``cosine_similarity`` (dot of the L2-normalised vectors); NaN when either is missing."""
    if a is None or b is None:
        return float("nan")
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float((a / na) @ (b / nb))


def first_face_index(scores: Sequence[float]) -> int | None:
    """Index of IBench's ``faces[0]``: the highest detection score (the first one on ties)."""
    if len(scores) == 0:
        return None
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))


def center_box(width: int, height: int) -> tuple[float, float, float, float]:
    """Where a portrait's face usually is: a square of half the short side, centred a bit high."""
    side = 0.5 * min(width, height)
    cx, cy = width / 2, height * 0.45
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _check_fallback(fallback: str) -> None:
    if fallback not in FALLBACKS:
        raise SpatialIDError(f"face fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")


class DlibFaceEmbedder:
    """Offline face backend: the encoder's dlib detector rule + 128-d ResNet descriptor (labelled as such)."""

    name = "dlib-resnet-128"
    random_weights = False

    def __init__(self, *, fallback: str = "none", analyzer: Any = None) -> None:
        from spatialid.encoder.face_dlib import shared_dlib_analyzer

        _check_fallback(fallback)
        self.analyzer = analyzer if analyzer is not None else shared_dlib_analyzer(True)
        self.fallback = fallback
        # detections by image content: analyze() and analyze_all() detect once, and a baseline or a copied
        # image scored again costs nothing (dlib's CNN takes seconds on a faceless image)
        self._seen: OrderedDict[bytes, list[FaceResult]] = OrderedDict()

    @property
    def label(self) -> str:
        return (
            "dlib HOG detector with dlib's CNN detector as fallback (the encoder's rule; face-recognition-models), "
            "68-point landmarks, 128-d ResNet descriptor, highest-score face (offline alternative to ArcFace; "
            "not comparable to ArcFace numbers in papers)"
        )

    def analyze_path(self, path: str | os.PathLike[str]) -> FaceResult | None:
        """The face of an image file (read with PIL: dlib wants RGB)."""
        from PIL import Image

        with Image.open(path) as img:
            return self.analyze(np.asarray(img.convert("RGB")))

    def analyze_all(self, rgb: np.ndarray) -> list[FaceResult]:
        """Every detected face, highest score first (several people in one image; no fallback)."""
        import hashlib

        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        key = hashlib.blake2b(img.tobytes(), digest_size=16).digest() + repr(img.shape).encode()
        if key in self._seen:
            self._seen.move_to_end(key)
            return list(self._seen[key])
        faces = sorted(self.analyzer.detect(img), key=lambda f: -float(f.score))
        out = [
            FaceResult(f.box, self.analyzer.descriptor(img, f), True, float(f.score),
                       f.landmarks68 if f.landmarks68 is not None else f.landmarks5)
            for f in faces
        ]
        self._seen[key] = out
        if len(self._seen) > DETECTIONS_KEPT:
            self._seen.popitem(last=False)
        return list(out)

    def analyze(self, rgb: np.ndarray) -> FaceResult | None:
        """IBench's ``faces[0]`` (the highest score), else the centre fallback when asked for."""
        import dlib

        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        faces = self.analyze_all(img)
        if faces:
            return faces[0]
        if self.fallback != "center":
            return None
        h, w = img.shape[:2]
        box = center_box(w, h)
        rect = dlib.rectangle(int(box[0]), int(box[1]), int(box[2]) - 1, int(box[3]) - 1)
        shape = self.analyzer.predictor(img, rect)
        vec = np.asarray(self.analyzer.descriptor_net.compute_face_descriptor(img, shape), dtype=np.float32)
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        return FaceResult(box, vec, False, landmarks=points)


class ArcFaceEmbedder:
    """IBench's FaceSim model: insightface antelopev2 (SCRFD-10G + glintr100 ArcFace), ``faces[0]``.

    Build it with the real files (``ArcFaceEmbedder(models_dir=...)``) or, for tests, from parts
    (:meth:`from_parts`): a detector with insightface's ``detect(bgr, max_num=0, metric="default")
    -> (bboxes [N, 5], kpss [N, 5, 2])``, a recognizer with ``input_size`` and ``get_feat(crop)``,
    an ``align(bgr, landmark=, image_size=)`` (insightface's ``norm_crop``) and an image reader.
    """

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
        import importlib.util

        from spatialid.encoder.face_insightface import (
            FACE_EXTRA_HINT,
            InsightFaceArcFace,
        )
        from spatialid.encoder.model_files import (
            ANTELOPE_DETECTOR,
            ANTELOPE_RECOGNIZER,
            default_models_dir,
            fetch,
            find_local,
            missing_files_error,
            offline_mode,
        )

        _check_fallback(fallback)
        for module, package in (("insightface", "insightface"), ("onnxruntime", "onnxruntime"), ("cv2", "opencv-python-headless")):
            if importlib.util.find_spec(module) is None:
                raise SpatialIDError(
                    f"FaceSim with ArcFace (IBench's) needs the Python package '{package}'; {FACE_EXTRA_HINT}, "
                    "or use --face-model dlib (offline, labelled alternative)"
                )
        folder = Path(models_dir).expanduser() if models_dir else default_models_dir()
        off = offline_mode(offline)
        paths, missing = [], []
        for spec in (ANTELOPE_DETECTOR, ANTELOPE_RECOGNIZER):
            path = find_local(spec, folder) or (None if off else fetch(spec, folder))
            (paths.append(path) if path is not None else missing.append(spec))
        if missing:
            err = missing_files_error(missing, folder, off)
            raise type(err)(f"FaceSim (ArcFace): {err}; or use --face-model dlib") from None
        import cv2
        from insightface.utils import face_align

        model = InsightFaceArcFace(paths[0], paths[1], device=device, det_size=(640, 640), det_thresh=0.5)
        self._setup(model.detector, model.recognizer, face_align.norm_crop, cv2.imread, fallback)

    @classmethod
    def from_parts(
        cls,
        detector: Any,
        recognizer: Any,
        *,
        align: Callable[..., np.ndarray],
        imread: Callable[[str], np.ndarray | None] | None = None,
        fallback: str = "none",
    ) -> ArcFaceEmbedder:
        """An embedder around given models (tests use fakes; see the class docstring)."""
        _check_fallback(fallback)
        obj = cls.__new__(cls)
        obj._setup(detector, recognizer, align, imread, fallback)
        return obj

    def _setup(self, detector: Any, recognizer: Any, align: Callable[..., np.ndarray], imread: Any, fallback: str) -> None:
        self.detector = detector
        self.recognizer = recognizer
        self.align = align
        self.imread = imread
        self.fallback = fallback

    @property
    def label(self) -> str:
        return "ArcFace (insightface antelopev2: SCRFD-10G at 640x640 + glintr100), faces[0] = highest score, OpenCV BGR input"

    def _embed(self, bgr: np.ndarray) -> np.ndarray:
        return np.asarray(self.recognizer.get_feat(bgr), dtype=np.float32).reshape(-1)

    def analyze_bgr(self, bgr: np.ndarray) -> FaceResult | None:
        """``faces[0]`` of ``FaceAnalysis.get``: the top-score detection, aligned and embedded."""
        img = np.ascontiguousarray(bgr, dtype=np.uint8)
        bboxes, kpss = self.detector.detect(img, max_num=0, metric="default")
        bboxes = np.asarray(bboxes).reshape(-1, 5)
        i = first_face_index(bboxes[:, 4].tolist())
        if i is not None:
            size = int(self.recognizer.input_size[0])
            crop = self.align(img, landmark=np.asarray(kpss[i]), image_size=size)
            box = tuple(float(v) for v in bboxes[i, :4])
            return FaceResult(box, self._embed(crop), True, float(bboxes[i, 4]), np.asarray(kpss[i]))  # type: ignore[arg-type]
        if self.fallback != "center":
            return None
        from PIL import Image

        h, w = img.shape[:2]
        box = center_box(w, h)
        crop = Image.fromarray(img).crop(tuple(int(v) for v in box)).resize((112, 112))
        return FaceResult(box, self._embed(np.asarray(crop)), False)

    def analyze_all(self, rgb: np.ndarray) -> list[FaceResult]:
        """Every detected face, highest score first (several people in one image; no fallback)."""
        img = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1], dtype=np.uint8)
        bboxes, kpss = self.detector.detect(img, max_num=0, metric="default")
        bboxes = np.asarray(bboxes).reshape(-1, 5)
        size = int(self.recognizer.input_size[0])
        out = []
        for i in sorted(range(len(bboxes)), key=lambda j: -float(bboxes[j, 4])):
            crop = self.align(img, landmark=np.asarray(kpss[i]), image_size=size)
            box = tuple(float(v) for v in bboxes[i, :4])
            out.append(FaceResult(box, self._embed(crop), True, float(bboxes[i, 4]), np.asarray(kpss[i])))  # type: ignore[arg-type]
        return out

    def analyze_path(self, path: str | os.PathLike[str]) -> FaceResult | None:
        """The face of an image file read as IBench reads it: ``cv2.imread`` (BGR)."""
        if self.imread is None:
            from PIL import Image

            with Image.open(path) as img:
                return self.analyze(np.asarray(img.convert("RGB")))
        bgr = self.imread(os.fspath(path))
        if bgr is None:
            from spatialid.evaluation.inputs import UnreadableImageError

            err = UnreadableImageError(f"OpenCV cannot read {path} (not an image, or a format OpenCV lacks)")
            err.path, err.reason = Path(path), "OpenCV cannot read it (not an image, or a format OpenCV lacks)"
            raise err
        return self.analyze_bgr(bgr)

    def analyze(self, rgb: np.ndarray) -> FaceResult | None:
        """Same as :meth:`analyze_bgr` for an RGB array."""
        return self.analyze_bgr(np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1]))


def load_face_embedder(
    kind: str = "antelopev2",
    *,
    device: str | None = None,
    fallback: str = "none",
    models_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
) -> Any:
    """``"antelopev2"`` (= ``"arcface"``: insightface, IBench's) or ``"dlib"`` (offline alternative)."""
    if kind in ("antelopev2", "arcface"):
        return ArcFaceEmbedder(device=device, models_dir=models_dir, offline=offline, fallback=fallback)
    if kind == "dlib":
        return DlibFaceEmbedder(fallback=fallback)
    raise SpatialIDError(f"unknown face model {kind!r}; use antelopev2 (insightface ArcFace) or dlib (offline alternative)")
