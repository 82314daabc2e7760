"""Five-point face alignment maths: landmark templates, similarity fit and the warp.

PuLID-FLUX feeds EVA-CLIP a 512x512 face aligned by facexlib's ``FaceRestoreHelper``: the five
landmarks (eye centres, nose tip, mouth corners; image-left first) are mapped onto the FFHQ
template below by a similarity transform (rotation, uniform scale, translation) and the photo is
warped with bilinear sampling and a constant grey border. ArcFace (insightface) uses the same kind
of fit onto its own 112x112 template. The dlib fallback reproduces this with the functions here so
that it needs neither OpenCV nor facexlib; the facexlib path keeps OpenCV's own routines for
bit-exactness with PuLID.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FFHQ_TEMPLATE_512",
    "ARCFACE_TEMPLATE_112",
    "FACEXLIB_BORDER_RGB",
    "estimate_similarity",
    "apply_affine",
    "invert_affine",
    "warp_affine",
    "template_for_size",
]

# facexlib's 5-point FFHQ template for a 512x512 crop (left eye, right eye, nose tip, left and right
# mouth corners; "left" = image left). crop_ratio (1, 1) as in PuLID: no extra margin.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)

# insightface's ArcFace template for its 112x112 recognition crop (same landmark order).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

# facexlib fills pixels outside the photo with BGR (135, 133, 132) = RGB (132, 133, 135).
FACEXLIB_BORDER_RGB = (132, 133, 135)


def template_for_size(size: int = 512) -> np.ndarray:
    """The FFHQ template scaled to a ``size`` x ``size`` crop (facexlib scales it linearly)."""
    return FFHQ_TEMPLATE_512 * (size / 512.0)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform mapping ``src`` points onto ``dst`` points.

    The transform ``[[a, -b, tx], [b, a, ty]]`` has 4 unknowns and is linear in them, so the fit
    is one small least-squares solve (no reflection is possible by construction). Two distinct
    points determine it exactly; more points give the least-squares fit.

    Args:
        src, dst: ``[N, 2]`` arrays of (x, y) points, N >= 2.

    Returns:
        ``[2, 3]`` float64 matrix ``M`` with ``dst ~= M @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"need two matching [N>=2, 2] point sets, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks must be finite numbers")
    if np.ptp(src, axis=0).max() < 1e-9 or np.ptp(dst, axis=0).max() < 1e-9:
        raise ValueError("degenerate landmarks: all points coincide")
    n = src.shape[0]
    x, y = src[:, 0], src[:, 1]
    rows = np.zeros((2 * n, 4))
    rows[0::2] = np.stack([x, -y, np.ones(n), np.zeros(n)], axis=1)
    rows[1::2] = np.stack([y, x, np.zeros(n), np.ones(n)], axis=1)
    rhs = dst.reshape(-1)
    (a, b, tx, ty), *_ = np.linalg.lstsq(rows, rhs, rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]], dtype=np.float64)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a ``[2, 3]`` affine matrix to ``[N, 2]`` points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(matrix, dtype=np.float64)[:, :2].T + np.asarray(matrix, dtype=np.float64)[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a ``[2, 3]`` affine matrix."""
    m = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(m)[:2]


def warp_affine(
    image: np.ndarray,
    matrix: np.ndarray,
    size: tuple[int, int],
    border_value: tuple[float, float, float] = FACEXLIB_BORDER_RGB,
) -> np.ndarray:
    """Warp an ``HxWx3`` uint8 image with ``matrix`` (source -> output pixel coordinates).

    Same convention as OpenCV's ``warpAffine``: pixel ``(i, j)`` has coordinates ``x = j``,
    ``y = i``; output pixel ``p`` takes the bilinear sample of the source at ``M^-1 p``; samples
    that fall outside blend with ``border_value`` (a constant border). Returns ``size = (w, h)``
    uint8 RGB.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    out_w, out_h = int(size[0]), int(size[1])
    h, w = img.shape[:2]
    inv = torch.as_tensor(invert_affine(matrix), dtype=torch.float64)
    ys, xs = torch.meshgrid(
        torch.arange(out_h, dtype=torch.float64), torch.arange(out_w, dtype=torch.float64), indexing="ij"
    )
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    # align_corners=True: -1 and +1 are the centres of the first and last pixels.
    gx = 2.0 * sx / max(w - 1, 1) - 1.0
    gy = 2.0 * sy / max(h - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1)[None].to(torch.float32)
    border = torch.tensor(border_value, dtype=torch.float32).view(1, 3, 1, 1)
    src = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)[None] - border
    # zero padding on (image - border) then + border == constant border value outside the photo
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + border
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
