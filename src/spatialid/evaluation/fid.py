"""FID between the images with identity and the images without identity, as IBench computes it.

IBench (typemovie/IBench, ``ibench/metrics/t2i/fid.py``, ``FIDScore``; config ``dims=2048``):

1. every ``imagewithid`` is copied into one folder and every ``imagewithoutid`` into another
   (``shutil.copy`` by file name: two entries with the same file name leave one file, the last
   copied); each folder is then read back in full;
2. per image: ``PIL RGB -> ToTensor()`` ([0, 1], full resolution) into pytorch-fid's
   ``InceptionV3([3])`` (``fid_inception.py``: the TF-FID Inception, weights
   ``pt_inception-2015-12-05-6726825d.pth``; input resized to 299x299 bilinear,
   ``align_corners=False``, scaled to [-1, 1]), the 2048-d pool3 features;
3. ``mu = mean(act)``, ``sigma = np.cov(act, rowvar=False)`` per set and the Fréchet distance
   ``|mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2))`` (``calculate_frechet_distance``: scipy
   ``sqrtm``; ``1e-6`` added to the diagonals if the product is singular; a small imaginary part
   dropped).

IBench's two folders are fixed paths that are never emptied, so images of an earlier run stay in
them; we compute on exactly the images of the run at hand (IBench's number on fresh folders).

The real feature extractor is pytorch-fid's (``pip install pytorch-fid``; IBench's ``requirements``
list it and its ``fid_inception.py`` is that module), which downloads the weights into the torch hub
cache on first use. :meth:`FidExtractor.tiny` is a random-weight CNN stand-in for offline tests.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spatialid.errors import ModelFilesMissingError, SpatialIDError

__all__ = [
    "FID_DIMS",
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_URL",
    "FidExtractor",
    "fid_from_features",
    "frechet_distance",
    "ibench_fid_files",
]

FID_DIMS = 2048
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
FID_EPS = 1e-6


class _TinyInception(torch.nn.Module):
    """Random-weight CNN with pytorch-fid's calling convention. NOT Inception: a test stand-in."""

    def __init__(self, dims: int = 16, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
                torch.nn.ReLU(),
                torch.nn.Conv2d(8, dims, 3, stride=2, padding=1),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1),
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        return [self.net(2 * x - 1)]


class FidExtractor:
    """Per-image FID features (``features(images) -> [N, dims]`` float32), real Inception or stand-in."""

    def __init__(self, net: torch.nn.Module, *, name: str, dims: int, random_weights: bool = False,
                 device: torch.device | str | None = None) -> None:
        self.device = torch.device(device or "cpu")
        self.net = net.to(self.device).eval()
        self.name = name
        self.dims = dims
        self.random_weights = random_weights

    @property
    def label(self) -> str:
        text = f"{self.name} ({self.dims}-d), full-resolution [0, 1] input"
        return f"{text} [RANDOM WEIGHTS: test stand-in, numbers are meaningless]" if self.random_weights else text

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """pool3 activations of each image alone (IBench batches equal-size images: same numbers)."""
        import torchvision.transforms.functional as TF

        out = np.empty((len(images), self.dims), dtype=np.float32)
        for i, image in enumerate(images):
            pred = self.net(TF.to_tensor(image.convert("RGB")).unsqueeze(0).to(self.device))[0]
            if pred.shape[2] != 1 or pred.shape[3] != 1:
                pred = torch.nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
            out[i] = pred.reshape(-1).float().cpu().numpy()
        return out

    @classmethod
    def tiny(cls, *, seed: int = 0, device: torch.device | str | None = None) -> FidExtractor:
        """Random-weight stand-in (16-d), offline."""
        return cls(_TinyInception(16, seed), name="random CNN stand-in for FID Inception", dims=16,
                   random_weights=True, device=device)

    @classmethod
    def real(cls, *, device: torch.device | str | None = None, offline: bool | None = None) -> FidExtractor:
        """pytorch-fid's TF-FID InceptionV3 (pool3, 2048-d), the network IBench's FIDScore builds."""
        from spatialid.utils.offline import is_offline

        try:
            from pytorch_fid.inception import InceptionV3
        except ImportError:
            raise SpatialIDError("FID needs pytorch-fid: `pip install pytorch-fid` (or pass --no-fid)") from None
        from torch.hub import get_dir

        cached = Path(get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
        if is_offline(offline) and not cached.is_file():
            raise ModelFilesMissingError(
                f"FID needs the Inception weights {FID_WEIGHTS_FILE} in {cached.parent} and downloading is off "
                f"(offline mode); download {FID_WEIGHTS_URL} there, or pass --no-fid"
            )
        try:
            with warnings.catch_warnings():  # torchvision deprecation noise from inside pytorch-fid
                warnings.simplefilter("ignore")
                net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FID_DIMS]])
        except OSError as exc:  # URLError and friends
            raise ModelFilesMissingError(
                f"FID could not download the Inception weights {FID_WEIGHTS_FILE} ({type(exc).__name__}); "
                f"download {FID_WEIGHTS_URL} into {cached.parent}, or pass --no-fid"
            ) from None
        return cls(net, name="pytorch-fid InceptionV3 (TF-FID weights, pool3)", dims=FID_DIMS, device=device)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer scipy: `disp` deprecation; older: "singular matrix"
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = FID_EPS) -> float:
    """Fréchet distance of two Gaussians, with pytorch-fid's (and IBench's) numerical safeguards.

    NaN where the square root keeps a large imaginary part (IBench raises there).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise SpatialIDError(f"FID statistics of different sizes ({mu1.shape} vs {mu2.shape})")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            return float("nan")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets ``[N, D]`` (float64 statistics, as pytorch-fid); NaN below 2 images."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise SpatialIDError(f"FID needs two [N, D] feature sets of the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False), b.mean(axis=0), np.cov(b, rowvar=False))


def ibench_fid_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files IBench's copy-into-one-folder step leaves: one per file name, the last one given."""
    by_name: dict[str, Path] = {}
    for p in paths:
        path = Path(p)
        by_name.pop(path.name, None)
        by_name[path.name] = path
    return list(by_name.values())
