"""Background contamination: how much the identity changes the picture outside the face.

SpatialID's claim is that uniform identity injection (PuLID) leaks the reference photo into the
whole image, and that masking confines it to the face. This is measured directly. For every item
the bench also generates the same prompt and seed *without* identity (preset ``"none"``). Both
images start from the same noise, so where they differ the identity is responsible. The face is
segmented (the face FaceSim uses, IBench's ``faces[0]``, in the identity image, plus the baseline's
own face when one is found: the union, so that only background remains), and outside that region
we report:

* ``bg_lpips`` (lower is better): LPIPS distance map (``lpips`` package, AlexNet) averaged over the
  background pixels;
* ``bg_clip_dist`` (lower is better): 1 - cosine of the CLIP image embeddings of both images with
  the face region greyed out;
* ``bg_mae`` (lower is better): mean absolute pixel change over background pixels, in [0, 1];
* ``bg_clip_t`` (higher is better): CLIP-T of the face-greyed identity image against the prompt,
  i.e. whether the background still follows the text.

The face region is an ellipse around the face box, enlarged (``scale``) and shifted up to cover
forehead and hair. This is a geometric approximation of a face parser; it is the same for every
preset, so comparisons between presets are fair even where it is loose.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from spatialid.errors import ModelFilesMissingError, SpatialIDError

__all__ = ["FACE_REGION_SCALE", "LpipsDistance", "apply_mask", "background_change", "face_region_mask"]

FACE_REGION_SCALE = 1.6  # ellipse semi-axes = scale x half the face box (x1.25 vertically)
GREY = (128, 128, 128)


def face_region_mask(
    width: int,
    height: int,
    boxes: Sequence[tuple[float, float, float, float]],
    scale: float = FACE_REGION_SCALE,
) -> np.ndarray:
    """Boolean ``[height, width]`` mask, True inside the union of the faces' ellipses."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    yy += 0.5
    xx += 0.5
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - 0.1 * h
        a, b = scale * w / 2, scale * 1.25 * h / 2
        mask |= ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0
    return mask


def apply_mask(image: Image.Image, mask: np.ndarray, fill: tuple[int, int, int] = GREY) -> Image.Image:
    """A copy of ``image`` with the masked (face) pixels replaced by ``fill``."""
    arr = np.array(image.convert("RGB"))
    arr[mask] = fill
    return Image.fromarray(arr)


class LpipsDistance:
    """LPIPS distance maps with the ``lpips`` package (optional dependency).

    ``random_backbone=True`` builds AlexNet with random weights (``pnet_rand``; the LPIPS linear
    heads ship inside the package), which needs no download: for offline tests only. Those weights
    are drawn from ``seed`` (without one, each run drew another network, so a resumed evaluation
    mixed the BG LPIPS values of two networks in one column).
    """

    def __init__(
        self, net: str = "alex", *, random_backbone: bool = False, device: torch.device | str | None = None, seed: int = 0
    ) -> None:
        try:
            import lpips
        except ImportError:
            raise SpatialIDError("LPIPS needs the lpips package: `pip install lpips` (or --no-lpips)") from None
        self.device = torch.device(device or "cpu")
        self.random_weights = random_backbone
        self.name = f"LPIPS-{net}"
        self.seed = int(seed)
        try:
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
                warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained is deprecated" from inside lpips
                torch.manual_seed(self.seed)
                self.model = lpips.LPIPS(net=net, spatial=True, pnet_rand=random_backbone, verbose=False).to(self.device).eval()
        except OSError as exc:  # URLError: torchvision could not download the backbone
            from torch.hub import get_dir

            raise ModelFilesMissingError(
                f"LPIPS needs torchvision's pretrained {net} weights (e.g. alexnet-owt-7be5be79.pth) in "
                f"{get_dir()}/checkpoints and could not download them ({exc}); run once online or pass --no-lpips"
            ) from None

    @property
    def label(self) -> str:
        if self.random_weights:
            return f"{self.name} (RANDOM backbone, seed {self.seed}: test stand-in, numbers are meaningless)"
        return self.name

    @torch.no_grad()
    def distance_map(self, a: Image.Image, b: Image.Image) -> np.ndarray:
        """Per-pixel LPIPS ``[H, W]`` between two same-size images."""

        def t(img: Image.Image) -> torch.Tensor:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(self.device)

        out = self.model(t(a), t(b))
        return out[0, 0].float().cpu().numpy()


def background_change(
    with_id: Image.Image,
    baseline: Image.Image,
    face_mask: np.ndarray,
    *,
    clip: Any = None,
    lpips_model: LpipsDistance | None = None,
    prompt: str | None = None,
) -> dict[str, float]:
    """The four background metrics (module docstring) for one image pair; NaN where not computable."""
    if with_id.size != baseline.size:
        raise SpatialIDError(f"image and baseline sizes differ ({with_id.size} vs {baseline.size}); regenerate the baseline")
    bg = ~face_mask
    result = {"bg_fraction": float(bg.mean()), "bg_mae": math.nan, "bg_lpips": math.nan, "bg_clip_dist": math.nan, "bg_clip_t": math.nan}
    if not bg.any():
        return result
    a = np.asarray(with_id.convert("RGB"), dtype=np.float32) / 255.0
    b = np.asarray(baseline.convert("RGB"), dtype=np.float32) / 255.0
    result["bg_mae"] = float(np.abs(a - b).mean(axis=-1)[bg].mean())
    if lpips_model is not None:
        result["bg_lpips"] = float(lpips_model.distance_map(with_id, baseline)[bg].mean())
    if clip is not None:
        ma, mb = apply_mask(with_id, face_mask), apply_mask(baseline, face_mask)
        feats = clip.image_features([ma, mb])
        result["bg_clip_dist"] = float(1.0 - (feats[0] * feats[1]).sum())
        if prompt is not None:
            result["bg_clip_t"] = float((feats[0] * clip.text_features([prompt])[0]).sum())
    return result
