"""Offline face analysis with dlib: HOG detector, landmarks, alignment and a 128-d descriptor.

This is the fallback face stack of the identity encoder. It needs only ``dlib-bin`` and the model
files shipped inside the ``face-recognition-models`` wheel (no download, no OpenCV), so it always
works offline. It is used by the tiny preset and, with a warning, by the real encoder when
facexlib (or its weights) is not installed.

* Detection: dlib's frontal-face HOG + linear SVM detector, image upsampled once for photos up to
  :data:`UPSAMPLE_MAX_SIDE` pixels so faces down to ~40 px are found. Detections scoring below
  ``min_score`` (0.5) are dropped: on skimage's astronaut photo the mission patch scores ~0.12 while
  the face scores ~1.2.
* CNN fallback (``cnn_fallback=True``, what the identity encoder and ``eval --face-model dlib`` use,
  both through :func:`shared_dlib_analyzer`, the one detector rule): when HOG accepts no face,
  dlib's MMOD CNN detector (:data:`DLIB_CNN_DETECTOR`) runs instead. HOG misses clear but slightly
  turned faces (5 of IBench's 100 ``chineseid`` photos); the CNN finds all 100 but costs seconds per
  photo on a CPU, hence fallback only. It is loaded once per process on first use and runs at the
  photo's own size (it finds faces from ~70-80 px); in photos up to :data:`CNN_UPSAMPLE_MAX_SIDE` px
  where that finds nothing, once more upsampled x2 (faces from ~40 px, like HOG), which costs about
  what one pass on a 1024 px photo does.
* Landmarks: the 68-point predictor gives the same five points insightface/facexlib use (eye centres
  = mean of the six eye-contour points, nose tip = point 30, mouth corners = points 48 and 54), so
  the alignment onto facexlib's FFHQ template is a true 5-point similarity fit. When only the
  5-point predictor file is available (two corners per eye and the nose base), the similarity is
  fitted on the two eye centres alone (exactly determined).
* Descriptor: dlib's ResNet face descriptor (128-d, 0.6 Euclidean distance = same person), used as
  the identity vector of the tiny preset in place of ArcFace's 512-d embedding.

The model files are located without importing ``face_recognition_models`` (its ``__init__`` needs
``pkg_resources``, which recent setuptools no longer ship).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spatialid.encoder.align import FACEXLIB_BORDER_RGB, apply_affine, estimate_similarity, template_for_size, warp_affine
from spatialid.errors import ModelFilesMissingError

__all__ = [
    "DLIB_LANDMARKS_68",
    "DLIB_LANDMARKS_5",
    "DLIB_DESCRIPTOR",
    "DLIB_CNN_DETECTOR",
    "UPSAMPLE_MAX_SIDE",
    "CNN_UPSAMPLE_MAX_SIDE",
    "FaceDetection",
    "DlibFaceAnalyzer",
    "center_face",
    "dlib_models_dir",
    "five_points_from_68",
    "largest_face",
    "shared_dlib_analyzer",
]

logger = logging.getLogger(__name__)

DLIB_LANDMARKS_68 = "shape_predictor_68_face_landmarks.dat"
DLIB_LANDMARKS_5 = "shape_predictor_5_face_landmarks.dat"
DLIB_DESCRIPTOR = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_CNN_DETECTOR = "mmod_human_face_detector.dat"
UPSAMPLE_MAX_SIDE = 1600  # upsample the image once for detection when its longer side is <= this
CNN_UPSAMPLE_MAX_SIDE = 400  # CNN: a 2nd, upsampled pass up to this side (about a 1024 px photo's cost)


@dataclass
class FaceDetection:
    """One detected face in image pixel coordinates.

    ``landmarks5`` are (x, y) of the image-left eye, image-right eye, nose tip, image-left and
    image-right mouth corners (insightface/facexlib order); ``landmarks68`` dlib's full set when the
    68-point predictor was used.
    """

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    landmarks5: np.ndarray
    landmarks68: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def side(self) -> float:
        """Shorter side of the box, the number compared with the minimum face size."""
        return min(self.width, self.height)

    @property
    def center(self) -> tuple[float, float]:
        return (0.5 * (self.box[0] + self.box[2]), 0.5 * (self.box[1] + self.box[3]))


def largest_face(faces: Sequence[FaceDetection]) -> FaceDetection:
    """The face with the largest box area: PuLID-FLUX's choice for the ArcFace identity vector.

    (PuLID sorts insightface's faces by box area and keeps the last; the first of equal areas here.)
    """
    if not faces:
        raise ValueError("no faces to choose from")
    return max(faces, key=lambda f: f.area)


def center_face(faces: Sequence[FaceDetection], width: float, height: float) -> FaceDetection:
    """The face whose box centre is nearest the photo centre: PuLID-FLUX's choice for alignment.

    That is facexlib's ``get_face_landmarks_5(only_center_face=True)`` (Euclidean distance of the
    box centre to ``(width / 2, height / 2)``), the face PuLID aligns, parses and feeds to EVA-CLIP.
    """
    if not faces:
        raise ValueError("no faces to choose from")
    cx, cy = 0.5 * width, 0.5 * height
    return min(faces, key=lambda f: float(np.hypot(f.center[0] - cx, f.center[1] - cy)))


def dlib_models_dir() -> Path | None:
    """Folder holding the ``face-recognition-models`` .dat files, or None if not installed."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "models"
        if folder.is_dir():
            return folder
    return None


def five_points_from_68(pts68: np.ndarray) -> np.ndarray:
    """insightface-style 5 points from dlib's 68 landmarks (see module docstring)."""
    p = np.asarray(pts68, dtype=np.float64).reshape(68, 2)
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


_CNN_LOCK = threading.Lock()  # one dlib net, shared by every analyzer: its forward pass keeps state


@functools.lru_cache(maxsize=2)
def _cnn_detector(path: str) -> Any:
    """dlib's MMOD CNN face detector, loaded once per process (per file)."""
    import dlib

    return dlib.cnn_face_detection_model_v1(path)


class DlibFaceAnalyzer:
    """dlib detector + landmark predictor + face descriptor (CPU only, thread-compatible per instance).

    Args:
        models_dir: folder with the dlib ``.dat`` files; default: the ``face-recognition-models``
            package's folder.
        min_score: minimum HOG detection score (decision value) to accept a face.
        upsample: times to upsample for detection; None = 1 for images up to
            :data:`UPSAMPLE_MAX_SIDE` px, else 0.
        with_descriptor: load the 128-d descriptor network (needed for the tiny identity vector).
        cnn_fallback: run dlib's CNN detector when HOG accepts no face (slow on a CPU; see the
            module docstring). Off by default so that callers opt into its cost.
        cnn_upsample: times to upsample for the CNN; None = 0, then 1 if that found nothing in an
            image up to :data:`CNN_UPSAMPLE_MAX_SIDE` px.
    """

    name = "dlib"

    def __init__(
        self,
        models_dir: str | Path | None = None,
        *,
        min_score: float = 0.5,
        upsample: int | None = None,
        with_descriptor: bool = True,
        cnn_fallback: bool = False,
        cnn_upsample: int | None = None,
    ) -> None:
        try:
            import dlib
        except ImportError as exc:  # pragma: no cover - dlib-bin is a core dependency
            raise ModelFilesMissingError(
                "dlib is not installed; install it with `pip install dlib-bin face-recognition-models`"
            ) from exc
        self._dlib = dlib
        folder = Path(models_dir) if models_dir is not None else dlib_models_dir()
        if folder is None:
            raise ModelFilesMissingError(
                "dlib face model files not found: install them with `pip install face-recognition-models` "
                f"(provides {DLIB_LANDMARKS_68}, {DLIB_LANDMARKS_5} and {DLIB_DESCRIPTOR})"
            )
        self.models_dir = folder
        self.min_score = float(min_score)
        self.upsample = upsample
        self.detector = dlib.get_frontal_face_detector()
        p68, p5 = folder / DLIB_LANDMARKS_68, folder / DLIB_LANDMARKS_5
        if p68.is_file():
            self.predictor = dlib.shape_predictor(str(p68))
            self.num_landmarks = 68
        elif p5.is_file():
            self.predictor = dlib.shape_predictor(str(p5))
            self.num_landmarks = 5
        else:
            raise ModelFilesMissingError(
                f"dlib landmark model missing: neither {p68} nor {p5} exists; "
                "reinstall them with `pip install --force-reinstall face-recognition-models`"
            )
        self.descriptor_net = None
        if with_descriptor:
            pd = folder / DLIB_DESCRIPTOR
            if not pd.is_file():
                raise ModelFilesMissingError(
                    f"dlib face descriptor model missing: {pd}; "
                    "reinstall it with `pip install --force-reinstall face-recognition-models`"
                )
            self.descriptor_net = dlib.face_recognition_model_v1(str(pd))
        self.cnn_fallback = bool(cnn_fallback)
        self.cnn_upsample = cnn_upsample
        self.cnn_path: Path | None = None
        if self.cnn_fallback:
            pc = folder / DLIB_CNN_DETECTOR
            if not pc.is_file():
                raise ModelFilesMissingError(
                    f"dlib CNN face detector missing: {pc}; "
                    "reinstall it with `pip install --force-reinstall face-recognition-models`"
                )
            self.cnn_path = pc  # loaded on first use (most photos never need it)

    # ------------------------------------------------------------------ detection

    def detect(self, rgb: np.ndarray) -> list[FaceDetection]:
        """All faces, largest first: HOG faces scoring >= ``min_score``, else (``cnn_fallback``) the
        CNN's faces. ``rgb``: HxWx3 uint8. ``extra["detector"]`` says which found each face."""
        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        up = self.upsample
        if up is None:
            up = 1 if max(img.shape[:2]) <= UPSAMPLE_MAX_SIDE else 0
        rects, scores, _ = self.detector.run(img, int(up), 0.0)
        faces = [self._face(img, rect, score, "hog") for rect, score in zip(rects, scores) if score >= self.min_score]
        if not faces and self.cnn_fallback:
            faces = self.detect_cnn(img)
        faces.sort(key=lambda f: (f.area, f.score), reverse=True)
        return faces

    def detect_cnn(self, rgb: np.ndarray) -> list[FaceDetection]:
        """dlib's CNN detector alone (score = its confidence), largest first.

        With ``cnn_upsample=None`` it runs at the photo's size, and once more upsampled x2 when that
        finds nothing in a photo up to :data:`CNN_UPSAMPLE_MAX_SIDE` px (faces of 40-80 px).
        """
        if self.cnn_path is None:
            raise RuntimeError("this DlibFaceAnalyzer was built with cnn_fallback=False")
        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        if self.cnn_upsample is not None:
            passes = [int(self.cnn_upsample)]
        else:
            passes = [0, 1] if max(img.shape[:2]) <= CNN_UPSAMPLE_MAX_SIDE else [0]
        net = _cnn_detector(str(self.cnn_path))
        faces: list[FaceDetection] = []
        for up in passes:
            t0 = time.perf_counter()
            with _CNN_LOCK:
                dets = net(img, up)
            faces = [self._face(img, d.rect, d.confidence, "cnn") for d in dets]
            # INFO when it found a face (why encoding a photo took seconds); an eval of faceless images
            # would otherwise print two lines per image
            logger.log(
                logging.INFO if faces else logging.DEBUG,
                "dlib's CNN face detector found %d face(s) in %.1f s (%dx%d px, upsample %d)",
                len(faces), time.perf_counter() - t0, img.shape[1], img.shape[0], up,
            )
            if faces:
                break
        faces.sort(key=lambda f: (f.area, f.score), reverse=True)
        return faces

    def _face(self, img: np.ndarray, rect: Any, score: float, detector: str) -> FaceDetection:
        """Landmarks and the five points of one detector rectangle."""
        shape = self.predictor(img, rect)
        pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        if self.num_landmarks == 68:
            five, pts68 = five_points_from_68(pts), pts
        else:
            # dlib 5-point order: image-right eye (outer, inner), image-left eye (outer, inner), nose base
            left_eye, right_eye = pts[2:4].mean(0), pts[0:2].mean(0)
            five = np.stack([left_eye, right_eye, pts[4], pts[4], pts[4]])
            pts68 = None
        box = (float(rect.left()), float(rect.top()), float(rect.right() + 1), float(rect.bottom() + 1))
        return FaceDetection(box=box, score=float(score), landmarks5=five, landmarks68=pts68,
                             extra={"rect": rect, "shape": shape, "detector": detector})

    def landmarks_in_box(self, rgb: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """The predictor's landmarks ([68, 2] or [5, 2]) inside a box found by another detector."""
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        shape = self.predictor(np.ascontiguousarray(rgb, dtype=np.uint8), self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    # ------------------------------------------------------------------ alignment

    def alignment_matrix(self, face: FaceDetection, size: int = 512) -> np.ndarray:
        """Similarity transform (``[2,3]``) taking the photo onto facexlib's ``size`` template."""
        template = template_for_size(size)
        if face.landmarks68 is not None:
            return estimate_similarity(face.landmarks5, template)
        return estimate_similarity(face.landmarks5[:2], template[:2])

    def align(self, rgb: np.ndarray, face: FaceDetection, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """``(aligned HxWx3 uint8, matrix)``: the face warped onto the template like facexlib."""
        m = self.alignment_matrix(face, size)
        return warp_affine(rgb, m, (size, size), FACEXLIB_BORDER_RGB), m

    def aligned_landmarks68(self, face: FaceDetection, matrix: np.ndarray) -> np.ndarray | None:
        return None if face.landmarks68 is None else apply_affine(matrix, face.landmarks68)

    # ------------------------------------------------------------------ descriptor

    def descriptor(self, rgb: np.ndarray, face: FaceDetection) -> np.ndarray:
        """dlib's 128-d face descriptor (float32) of ``face``."""
        if self.descriptor_net is None:
            raise RuntimeError("this DlibFaceAnalyzer was built with with_descriptor=False")
        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        vec = self.descriptor_net.compute_face_descriptor(img, face.extra["shape"])
        return np.asarray(vec, dtype=np.float32)


@functools.lru_cache(maxsize=4)
def shared_dlib_analyzer(with_descriptor: bool = True, cnn_fallback: bool = True) -> DlibFaceAnalyzer:
    """The one dlib detector rule (HOG, else the CNN) for the identity encoder and ``eval --face-model
    dlib`` alike, one analyzer per process for the default model files (loading the 68-point model
    takes ~0.5 s); CNN fallback on, so that turned faces HOG misses are not lost: an eval that finds
    fewer reference faces than encode would score fewer identities than were generated.

    The analyzer holds read-only models, so encoders may share it.
    """
    return DlibFaceAnalyzer(with_descriptor=with_descriptor, cnn_fallback=cnn_fallback)
