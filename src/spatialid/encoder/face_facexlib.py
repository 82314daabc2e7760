"""facexlib face detection, 5-point alignment and BiSeNet parsing (optional ``[face]`` extra).

Reproduces what PuLID-FLUX does with ``FaceRestoreHelper(upscale_factor=1, face_size=512,
crop_ratio=(1, 1), det_model='retinaface_resnet50')``:

* RetinaFace-ResNet50 on the BGR photo at its original size, score threshold 0.97;
* the five landmarks of the chosen face mapped onto the FFHQ 512 template with OpenCV's
  ``estimateAffinePartial2D(..., method=LMEDS)`` and warped with ``warpAffine`` (bilinear,
  constant border BGR (135, 133, 132));
* BiSeNet (19 classes) on the RGB aligned crop scaled to [0, 1] and ImageNet-normalised; argmax.

Which face: as PuLID (``get_face_landmarks_5(only_center_face=True)``), the face whose box centre
is nearest the photo centre, while ArcFace takes insightface's *largest* face; on a photo with
several people those can be different persons (the encoder warns then). The choice is made by
:func:`spatialid.encoder.face_dlib.center_face` in the encoder, for facexlib and dlib alike.

The networks are facexlib's classes; their weights are loaded by us with
``torch.load(weights_only=True)`` (facexlib's own loader unpickles without that restriction and
downloads on its own).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from spatialid.encoder.align import FFHQ_TEMPLATE_512
from spatialid.encoder.face_dlib import FaceDetection
from spatialid.encoder.face_insightface import require_face_extra
from spatialid.encoder.parsing import IMAGENET_MEAN, IMAGENET_STD, normalize
from spatialid.errors import CheckpointError

__all__ = ["FACEXLIB_DET_THRESHOLD", "FacexlibFace", "load_pth_weights_only", "box_iou"]

logger = logging.getLogger(__name__)

FACEXLIB_DET_THRESHOLD = 0.97
_BORDER_BGR = (135, 133, 132)


def load_pth_weights_only(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` state dict read with ``weights_only=True`` (refuses arbitrary pickled objects)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} could not be read as a tensors-only checkpoint ({type(exc).__name__}: {exc}); "
            "re-download it from the facexlib releases"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("params"), dict):
        obj = obj["params"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FacexlibFace:
    """RetinaFace-R50 + BiSeNet from facexlib, run on ``device`` in float32."""

    name = "facexlib"

    def __init__(self, detector_path: str | Path, parser_path: str | Path, device: str | torch.device = "cpu") -> None:
        require_face_extra("facexlib")
        require_face_extra("cv2")
        from facexlib.detection.retinaface import RetinaFace
        from facexlib.parsing.bisenet import BiSeNet

        self.device = torch.device(device)
        det = RetinaFace(network_name="resnet50", half=False, device=self.device)
        det.load_state_dict(load_pth_weights_only(detector_path), strict=True)
        self.detector = det.to(self.device).eval()
        parser = BiSeNet(num_class=19)
        parser.load_state_dict(load_pth_weights_only(parser_path), strict=True)
        self.parser = parser.to(self.device).eval()

    def to(self, device: str | torch.device) -> FacexlibFace:
        self.device = torch.device(device)
        self.detector.to(self.device)
        self.detector.device = self.device
        self.detector.mean_tensor = self.detector.mean_tensor.to(self.device)
        self.parser.to(self.device)
        return self

    @torch.no_grad()
    def detect(self, rgb: np.ndarray) -> list[FaceDetection]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        dets = self.detector.detect_faces(bgr, FACEXLIB_DET_THRESHOLD)
        faces = []
        for row in np.asarray(dets):
            x0, y0, x1, y1, score = (float(v) for v in row[:5])
            kps = np.asarray(row[5:15], dtype=np.float64).reshape(5, 2)
            faces.append(FaceDetection(box=(x0, y0, x1, y1), score=score, landmarks5=kps))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def align(self, rgb: np.ndarray, face: FaceDetection, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """facexlib's ``align_warp_face`` (OpenCV LMEDS similarity + warpAffine), RGB in and out."""
        import cv2

        template = FFHQ_TEMPLATE_512 * (size / 512.0)
        matrix = cv2.estimateAffinePartial2D(face.landmarks5.astype(np.float64), template, method=cv2.LMEDS)[0]
        if matrix is None:
            matrix = cv2.estimateAffinePartial2D(face.landmarks5.astype(np.float64), template)[0]
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        out = cv2.warpAffine(bgr, matrix, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=_BORDER_BGR)
        return np.ascontiguousarray(out[:, :, ::-1]), matrix

    @torch.no_grad()
    def parse(self, face01: torch.Tensor) -> torch.Tensor:
        """Label map ``[B,1,H,W]`` (long) of an RGB ``[B,3,H,W]`` crop in [0, 1]."""
        x = normalize(face01.to(self.device, torch.float32), IMAGENET_MEAN, IMAGENET_STD)
        logits = self.parser(x)[0]
        return logits.argmax(dim=1, keepdim=True)
