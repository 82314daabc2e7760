"""Face-parsing post-processing and EVA-CLIP pre-processing (pure tensor maths).

PuLID-FLUX does not show EVA-CLIP the raw aligned face: it runs a BiSeNet face parser (19 CelebAMask-HQ
classes) on the 512x512 aligned crop, paints every "background-like" class white and keeps the
remaining face features in grayscale, so that the identity tokens carry facial structure rather
than clothes, background or colour cast. Then the image is resized to EVA's input size and
normalised with CLIP's mean/std. Those steps live here, free of any model, so they can be tested
on synthetic parsing maps.

Labels (CelebAMask-HQ order used by facexlib's BiSeNet): 0 background, 1 skin, 2/3 brows,
4/5 eyes, 6 eyeglasses, 7/8 ears, 9 earring, 10 nose, 11 mouth, 12/13 lips, 14 neck, 15 necklace,
16 cloth, 17 hair, 18 hat. PuLID's background set is {0, 16, 18, 7, 8, 9, 14, 15}: hair, brows,
eyes, glasses, nose and mouth stay.

The landmark parser (:func:`landmark_parsing_map`) is this project's stand-in for BiSeNet in the
offline dlib path: it labels the face region enclosed by dlib's 68 landmarks (raised above the
brows to cover the forehead) as skin and everything else as background. It is an approximation
(hair is dropped) and is only used when facexlib's parser is not available.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BACKGROUND_LABELS",
    "NUM_PARSING_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "EVA_RESIZE_ANTIALIAS",
    "to_gray",
    "background_mask",
    "face_features_image",
    "normalize",
    "eva_preprocess",
    "landmark_parsing_map",
]

BACKGROUND_LABELS: tuple[int, ...] = (0, 16, 18, 7, 8, 9, 14, 15)
NUM_PARSING_CLASSES = 19
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # BiSeNet input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # EVA-CLIP uses OpenAI CLIP's statistics
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PuLID resizes the 512 crop to 336 with torchvision's tensor ``resize(..., BICUBIC)`` under the
# torchvision it pins (0.15.2), where tensors are resized WITHOUT antialiasing (the default only
# became antialias=True in 0.17). We reproduce the pinned behaviour.
EVA_RESIZE_ANTIALIAS = False


def to_gray(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) repeated to 3 channels: ``[B,3,H,W]``."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W], got {tuple(image.shape)}")
    y = 0.299 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3]
    return y.repeat(1, 3, 1, 1)


def background_mask(labels: torch.Tensor, background: Sequence[int] = BACKGROUND_LABELS) -> torch.Tensor:
    """Boolean mask ``[B,1,H,W]`` of pixels whose parsing label is a background class.

    ``labels`` is an integer map ``[B,1,H,W]`` or ``[B,H,W]`` (the argmax of the parser's logits).
    """
    if labels.ndim == 3:
        labels = labels[:, None]
    if labels.ndim != 4 or labels.shape[1] != 1:
        raise ValueError(f"expected a label map [B, 1, H, W] or [B, H, W], got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError("labels must be integer class indices (take argmax over the logits first)")
    bg = torch.tensor(list(background), dtype=labels.dtype, device=labels.device)
    return torch.isin(labels, bg)


def face_features_image(
    image: torch.Tensor, labels: torch.Tensor, background: Sequence[int] = BACKGROUND_LABELS
) -> torch.Tensor:
    """White where the parsing map says background, grayscale face features elsewhere.

    Args:
        image: RGB ``[B,3,H,W]`` with values in [0, 1] (not normalised).
        labels: parsing labels ``[B,1,H,W]`` / ``[B,H,W]`` at the same resolution.
    """
    mask = background_mask(labels, background)
    if mask.shape[-2:] != image.shape[-2:] or mask.shape[0] != image.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match image {tuple(image.shape)}")
    return torch.where(mask, torch.ones_like(image), to_gray(image))


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` on ``[B,3,H,W]``."""
    m = torch.tensor(mean, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    return (image - m) / s


def eva_preprocess(
    image: torch.Tensor,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    antialias: bool = EVA_RESIZE_ANTIALIAS,
) -> torch.Tensor:
    """Bicubic resize of a ``[B,3,H,W]`` [0,1] image to ``size`` x ``size`` then CLIP normalisation.

    No clamping after the bicubic resize (torchvision does not clamp float tensors either).
    """
    x = image.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=antialias)
    return normalize(x, mean, std)


def landmark_parsing_map(landmarks68: np.ndarray, size: int = 512, forehead: float = 0.35) -> torch.Tensor:
    """Approximate parsing map ``[1,1,size,size]`` (1 = face, 0 = background) from 68 landmarks.

    The face region is the polygon through the jaw line (points 0-16) and the eyebrows (17-26)
    lifted upwards by ``forehead`` times the brow-to-chin distance, so that the forehead is kept.
    Coordinates are in the aligned crop's pixels.
    """
    from skimage.draw import polygon

    pts = np.asarray(landmarks68, dtype=np.float64).reshape(-1, 2)
    if pts.shape[0] != 68:
        raise ValueError(f"expected 68 landmarks, got {pts.shape[0]}")
    jaw = pts[0:17]
    brows = pts[17:27].copy()
    chin_y = pts[8, 1]
    brow_y = brows[:, 1].mean()
    brows[:, 1] -= forehead * max(chin_y - brow_y, 0.0)
    outline = np.concatenate([jaw, brows[::-1]], axis=0)  # jaw left->right, brows right->left
    rr, cc = polygon(outline[:, 1], outline[:, 0], shape=(size, size))
    out = torch.zeros(1, 1, size, size, dtype=torch.long)
    out[0, 0, torch.from_numpy(rr.astype(np.int64)), torch.from_numpy(cc.astype(np.int64))] = 1
    return out
