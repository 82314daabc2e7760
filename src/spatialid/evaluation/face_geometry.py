"""Pose and expression of a face from its 68 landmarks: LandmarkDiff, PoseDiv and ExprDiv.

The SpatialID authors' evaluator config (``config_spatialid.py``) runs IBench's ``LandmarkDiff``,
``PoseDiv`` and ``ExprDiv`` (typemovie/IBench, ``ibench/metrics/imageid/``). Each compares the
reference photo ``id`` with the generated ``imagewithid``:

* ``LandmarkDiff`` (``landmarkdiff.py``): MTCNN's five keypoints of the first face (eyes, nose,
  mouth corners), each set centred on its mean and divided by the diagonal of its bounding box;
  the mean Euclidean distance of corresponding points. Ours: the same formula on the same five
  points taken from dlib's 68 landmarks (eye centres, nose tip, mouth corners:
  :func:`spatialid.encoder.face_dlib.five_points_from_68`).
* ``PoseDiv`` (``posediv.py``): HopeNet's yaw, pitch and roll (degrees) of both faces;
  ``|Δyaw|``, ``|Δpitch|``, ``|Δroll|`` averaged over items (three numbers). Ours: the same
  differences, the angles from a head-pose solve of six landmarks against a generic 3-D face
  (``cv2.solvePnP`` when OpenCV is installed, else a scaled-orthographic least-squares fit in
  numpy: :func:`head_pose`). No HopeNet weights install offline, so the angles are not HopeNet's.
* ``ExprDiv`` (``exprdiv.py``): a FER VGG19 classifies both faces into 7 expressions; the share of
  items whose classes differ. No such classifier installs offline; ours classifies from landmark
  ratios (:func:`expression_class`: eyes closed by the eye aspect ratio of Soukupová & Čech 2016,
  mouth open by the inner-lip aspect ratio, smile by the mouth corners raised above the lip centre
  and a wide mouth, else neutral) and reports the same share. Coarser than 7 classes: it sees
  "smile vs neutral vs open mouth", which is the lock-in users complain about.

Higher PoseDiv / ExprDiv / LandmarkDiff = the generated face is less locked to the reference's pose
and expression.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "EXPRESSIONS",
    "FaceGeometry",
    "expression_class",
    "expression_features",
    "face_geometry",
    "geometry_of",
    "head_pose",
    "landmark_diff",
    "pose_difference",
]

EXPRESSIONS = ("neutral", "smile", "mouth-open", "eyes-closed")
EAR_CLOSED = 0.18  # eye aspect ratio below this: eyes closed (Soukupová & Čech 2016 use ~0.2 for blinks)
MAR_OPEN = 0.30  # inner-lip opening / mouth width above this: mouth open
SMILE_LIFT = 0.08  # mouth corners above the lip centre by this share of the interocular distance
SMILE_WIDTH = 0.70  # and mouth width / interocular distance (outer eye corners) at least this

# A generic head (units ~ 0.1 mm) for six of dlib's 68 points, in the camera frame (x right, y down,
# z away from the camera): nose tip 30, chin 8, outer eye corners 36 / 45, mouth corners 48 / 54. The
# widely used model of the OpenCV head-pose tutorials, with y and z turned into OpenCV's frame.
_MODEL_INDEX = (30, 8, 36, 45, 48, 54)
_MODEL_3D = np.array(
    [
        (0.0, 0.0, 0.0),
        (0.0, 330.0, 65.0),
        (-225.0, -170.0, 135.0),
        (225.0, -170.0, 135.0),
        (-150.0, 150.0, 125.0),
        (150.0, 150.0, 125.0),
    ],
    dtype=np.float64,
)


def _five(pts: np.ndarray) -> np.ndarray:
    from spatialid.encoder.face_dlib import five_points_from_68

    pts = np.asarray(pts, dtype=np.float64)
    return five_points_from_68(pts) if pts.shape[0] == 68 else pts.reshape(5, 2)


def landmark_diff(a: np.ndarray, b: np.ndarray) -> float:
    """IBench's ``compute_normalized_landmark_difference`` of two faces' five points (or 68 landmarks)."""

    def norm(p: np.ndarray) -> np.ndarray:
        p = _five(p)
        scale = float(np.linalg.norm(p.max(0) - p.min(0))) or 1.0
        return (p - p.mean(0)) / scale

    return float(np.linalg.norm(norm(a) - norm(b), axis=1).mean())


def _euler(r: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of a camera-frame rotation; a mirrored face flips yaw and roll."""
    yaw = math.degrees(math.atan2(-r[2, 0], math.hypot(r[0, 0], r[1, 0])))
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    roll = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return yaw, pitch, roll


def _pose_numpy(image_pts: np.ndarray) -> np.ndarray:
    """Rotation of a scaled-orthographic camera fitted by least squares (closed form, no iterations)."""
    x = np.hstack([_MODEL_3D - _MODEL_3D.mean(0), np.ones((len(_MODEL_3D), 1))])
    sol, *_ = np.linalg.lstsq(x, image_pts - image_pts.mean(0), rcond=None)
    affine = sol[:3].T  # [2, 3]: s * (first two rows of R)
    u, _, vt = np.linalg.svd(affine, full_matrices=False)
    rows = u @ vt  # nearest pair of orthonormal rows
    return np.vstack([rows, np.cross(rows[0], rows[1])])


def _pose_opencv(image_pts: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    import cv2

    w, h = size
    camera = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], dtype=np.float64)
    ok, rvec, _ = cv2.solvePnP(_MODEL_3D, image_pts, camera, np.zeros(4), flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return None
    return cv2.Rodrigues(rvec)[0]


def head_pose(pts68: np.ndarray, size: tuple[int, int] | None = None) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from dlib's 68 landmarks (see the module text).

    ``size`` (width, height) is the image's, for OpenCV's pinhole camera (focal length = width);
    without it, or without OpenCV, the numpy fit is used.
    """
    pts = np.asarray(pts68, dtype=np.float64).reshape(68, 2)[list(_MODEL_INDEX)]
    r = None
    if size is not None and importlib.util.find_spec("cv2") is not None:
        r = _pose_opencv(pts, size)
    if r is None:
        r = _pose_numpy(pts)
    return _euler(r)


def pose_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """IBench PoseDiv's per-item errors: ``|Δyaw|``, ``|Δpitch|``, ``|Δroll|`` in degrees."""
    return {k: abs(float(x) - float(y)) for k, x, y in zip(("yaw", "pitch", "roll"), a, b)}


def expression_features(pts68: np.ndarray) -> dict[str, float]:
    """Landmark ratios: eye aspect ratio, inner-mouth aspect ratio, mouth-corner lift and mouth width."""
    p = np.asarray(pts68, dtype=np.float64).reshape(68, 2)
    d = lambda i, j: float(np.linalg.norm(p[i] - p[j]))  # noqa: E731

    def ear(e: int) -> float:  # p1..p6 = e..e+5
        return (d(e + 1, e + 5) + d(e + 2, e + 4)) / (2.0 * max(d(e, e + 3), 1e-6))

    interocular = max(d(36, 45), 1e-6)
    width = max(d(60, 64), 1e-6)
    # in the face's own frame (eye line horizontal), y grows downwards
    ex, ey = (p[45] - p[36]) / interocular
    rot = np.array([[ex, ey], [-ey, ex]])
    q = p @ rot.T
    centre_y = (q[62, 1] + q[66, 1] + q[51, 1] + q[57, 1]) / 4.0
    lift = (centre_y - (q[48, 1] + q[54, 1]) / 2.0) / interocular
    return {
        "ear": (ear(36) + ear(42)) / 2.0,
        "mar": (d(61, 67) + d(62, 66) + d(63, 65)) / (3.0 * width),
        "lift": float(lift),
        "width": d(48, 54) / interocular,
    }


def expression_class(pts68: np.ndarray) -> str:
    """One of :data:`EXPRESSIONS` from the landmark ratios (thresholds in the module constants)."""
    f = expression_features(pts68)
    if f["mar"] > MAR_OPEN:
        return "mouth-open"
    if f["lift"] > SMILE_LIFT and f["width"] >= SMILE_WIDTH:
        return "smile"
    if f["ear"] < EAR_CLOSED:
        return "eyes-closed"
    return "neutral"


@dataclass(frozen=True)
class FaceGeometry:
    """What LandmarkDiff / PoseDiv / ExprDiv need of one face."""

    landmarks68: np.ndarray
    pose: tuple[float, float, float]  # yaw, pitch, roll (degrees)
    expression: str

    def compare(self, generated: FaceGeometry) -> dict[str, float]:
        """This (reference) face against a generated one: the per-item values of the three metrics."""
        pose = pose_difference(self.pose, generated.pose)
        return {
            "landmark_diff": landmark_diff(self.landmarks68, generated.landmarks68),
            "pose_div_yaw": pose["yaw"],
            "pose_div_pitch": pose["pitch"],
            "pose_div_roll": pose["roll"],
            "expr_div": 0.0 if self.expression == generated.expression else 1.0,
        }


def face_geometry(pts68: np.ndarray | None, size: tuple[int, int] | None = None) -> FaceGeometry | None:
    """The geometry of a face with 68 landmarks (None without them)."""
    if pts68 is None:
        return None
    pts = np.asarray(pts68, dtype=np.float64).reshape(68, 2)
    return FaceGeometry(pts, head_pose(pts, size), expression_class(pts))


def geometry_of(face: Any, rgb: np.ndarray) -> FaceGeometry | None:
    """The geometry of a detected face (a ``FaceResult``) in ``rgb``: its own 68 landmarks (dlib), or
    dlib's 68-point predictor run in its box (a detector with five keypoints, e.g. antelopev2's, or the
    tiny evaluation's centre box, flagged as such by its ``face_source``)."""
    if face is None:
        return None
    pts = face.landmarks
    if pts is None or len(pts) != 68:
        from spatialid.encoder.face_dlib import shared_dlib_analyzer

        analyzer = shared_dlib_analyzer(False)
        if analyzer.num_landmarks != 68:
            return None
        pts = analyzer.landmarks_in_box(rgb, face.box)
    h, w = rgb.shape[:2]
    return face_geometry(pts, (w, h))
