"""ArcFace identity embedding with insightface's ``antelopev2`` models (optional ``[face]`` extra).

PuLID-FLUX takes the 512-d ``embedding`` (not the L2-normalised one) of the *largest* face that
insightface's ``FaceAnalysis('antelopev2')`` finds at detection size 640x640, and, when it finds
none, runs the recognition model directly on the 512x512 aligned crop (the recognizer resizes it
to 112x112). We use the two models FaceAnalysis would use (SCRFD-10G detector and the glintr100
ArcFace recognizer) through ``insightface.model_zoo`` directly: the numbers are the same as
FaceAnalysis' (detection -> ``norm_crop`` on the five keypoints -> ``get_feat``), without loading
the three unused landmark/attribute models of the pack and without insightface's own downloader.

ONNX Runtime runs on ``CUDAExecutionProvider`` when available and requested, else on the CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from spatialid.encoder.face_dlib import FaceDetection
from spatialid.errors import SpatialIDError

__all__ = ["FACE_EXTRA_HINT", "require_face_extra", "onnx_providers", "InsightFaceArcFace"]

logger = logging.getLogger(__name__)

FACE_EXTRA_HINT = 'install the optional face stack with `pip install "spatialid[face]"`'


def require_face_extra(module: str) -> None:
    """Raise a clear error when an optional face package is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SpatialIDError(f"the real identity encoder needs the Python package '{module}'; {FACE_EXTRA_HINT}")


def onnx_providers(device: str | None) -> list[str]:
    """CUDA first when the device is CUDA and onnxruntime has it, always CPU as the fallback."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    providers = []
    if device is not None and str(device).startswith("cuda") and "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


class InsightFaceArcFace:
    """SCRFD detection + glintr100 ArcFace embedding, like ``FaceAnalysis('antelopev2')``.

    Args:
        detector_path, recognizer_path: the ``scrfd_10g_bnkps.onnx`` and ``glintr100.onnx`` files.
        device: ``"cuda..."`` to use onnxruntime's CUDA provider when installed.
        det_size: detector input size (PuLID: 640x640); det_thresh: score threshold (0.5).
    """

    id_dim = 512
    name = "insightface-antelopev2"

    def __init__(
        self,
        detector_path: str | Path,
        recognizer_path: str | Path,
        device: str | None = None,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
    ) -> None:
        require_face_extra("insightface")
        require_face_extra("onnxruntime")
        from insightface.model_zoo import get_model

        providers = onnx_providers(device)
        ctx_id = 0 if providers[0] == "CUDAExecutionProvider" else -1
        self.providers = providers
        self.detector = get_model(str(detector_path), providers=providers)
        if self.detector is None or getattr(self.detector, "taskname", None) != "detection":
            raise SpatialIDError(f"{detector_path} is not an insightface detection model (expected scrfd_10g_bnkps.onnx)")
        self.detector.prepare(ctx_id=ctx_id, input_size=det_size, det_thresh=det_thresh)
        self.recognizer = get_model(str(recognizer_path), providers=providers)
        if self.recognizer is None or getattr(self.recognizer, "taskname", None) != "recognition":
            raise SpatialIDError(f"{recognizer_path} is not an insightface recognition model (expected glintr100.onnx)")
        self.recognizer.prepare(ctx_id=ctx_id)

    def detect(self, rgb: np.ndarray) -> list[FaceDetection]:
        """Faces largest first (insightface works on BGR; boxes in pixels)."""
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        bboxes, kpss = self.detector.detect(bgr, max_num=0, metric="default")
        faces = []
        for i in range(bboxes.shape[0]):
            x0, y0, x1, y1, score = (float(v) for v in bboxes[i, :5])
            kps = np.asarray(kpss[i], dtype=np.float64) if kpss is not None else None
            faces.append(FaceDetection(box=(x0, y0, x1, y1), score=score, landmarks5=kps))
        # PuLID sorts by box area and keeps the largest.
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def embed(self, rgb: np.ndarray, face: FaceDetection) -> np.ndarray:
        """Raw (un-normalised) 512-d ArcFace embedding of a detected face, as FaceAnalysis gives it."""
        from insightface.utils import face_align

        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        size = int(self.recognizer.input_size[0])
        crop = face_align.norm_crop(bgr, landmark=face.landmarks5, image_size=size)
        return np.asarray(self.recognizer.get_feat(crop), dtype=np.float32).reshape(-1)

    def embed_aligned(self, aligned_rgb: np.ndarray) -> np.ndarray:
        """PuLID's fallback: the recognizer on the whole 512x512 aligned crop (resized to 112)."""
        bgr = np.ascontiguousarray(aligned_rgb[:, :, ::-1])
        return np.asarray(self.recognizer.get_feat(bgr), dtype=np.float32).reshape(-1)
