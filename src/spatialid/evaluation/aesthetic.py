"""Aesthetic score as IBench computes it: the LAION aesthetic linear head on CLIP ViT-L/14, / 10.

IBench (typemovie/IBench, ``ibench/metrics/t2i/aesthetic.py``, ``AestheticScore``):

1. ``clip.load("ViT-L-14.pt", device="cuda", jit=False)`` (OpenAI's ViT-L/14, fp16 weights on the
   GPU) and ``nn.Linear(768, 1)`` loaded from ``weights/sa_0_4_vit_l_14_linear.pth``;
2. per image, ``clip_transform(224)``: the uint8 pixels as 0-255 floats, ``Resize(224, BICUBIC,
   antialias=False)``, ``CenterCrop(224)``, ``/255``, OpenAI's ``Normalize``
   (:func:`spatialid.evaluation.clip_metrics.aesthetic_clip_input`);
3. ``encode_image(...).to(float32)``, ``F.normalize(p=2)``, the linear head, ``/ 10``; the mean over
   images is the reported number.

The head file in IBench's repository is byte-identical (same git blob, sha256 below) to
``sa_0_4_vit_l_14_linear.pth`` of LAION-AI/aesthetic-predictor, where it comes from. It is
downloaded from there on first use into ``<models_dir>/laion-aesthetic/`` and checked against that
hash. The offline tiny evaluation uses a random-weight head on the tiny CLIP instead (labelled).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spatialid.errors import ModelFilesMissingError, SpatialIDError
from spatialid.evaluation.clip_metrics import ClipScorer, aesthetic_clip_input

__all__ = ["AESTHETIC_HEAD_SHA256", "AESTHETIC_HEAD_URL", "AestheticScorer", "aesthetic_head_file", "load_aesthetic"]

AESTHETIC_HEAD_FILE = "sa_0_4_vit_l_14_linear.pth"
# LAION-AI/aesthetic-predictor at its last commit (2022-08-15); the blob IBench ships as well.
AESTHETIC_HEAD_URL = (
    "https://github.com/LAION-AI/aesthetic-predictor/raw/6d122adad522ab246644d9dc1c6d7a3810ee255f/"
    + AESTHETIC_HEAD_FILE
)
AESTHETIC_HEAD_SHA256 = "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba"
AESTHETIC_SCALE = 0.1  # aesthetic.py: normalized_aesthetic_scores = aesthetic_scores / 10
HEAD_DIM = 768  # ViT-L/14's image embedding size, nn.Linear(768, 1)


class AestheticScorer:
    """LAION's linear aesthetic head on normalised CLIP image embeddings (IBench's AestheticScore)."""

    def __init__(self, clip: ClipScorer, head: torch.nn.Linear, *, name: str, random_weights: bool = False) -> None:
        if head.in_features != clip.embed_dim:
            raise SpatialIDError(
                f"the aesthetic head takes {head.in_features}-d CLIP features but {clip.name} gives {clip.embed_dim}-d"
            )
        self.clip = clip
        self.head = head.to(clip.device).float().eval()
        self.name = name
        self.random_weights = random_weights or clip.random_weights

    @property
    def label(self) -> str:
        text = f"{self.name} on {self.clip.name} ({self.clip.precision}), IBench preprocessing (0-255 bicubic resize, antialias off), / 10"
        return f"{text} [RANDOM WEIGHTS: test stand-in, numbers are meaningless]" if self.random_weights else text

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Aesthetic score / 10 of each image."""
        out = []
        for image in images:
            x = aesthetic_clip_input(image, self.clip.image_size, self.clip.mean, self.clip.std).unsqueeze(0)
            feats = torch.nn.functional.normalize(self.clip.encode_tensors(x), p=2, dim=-1).to(self.clip.device)
            out.append(float(self.head(feats).squeeze(-1)[0]) * AESTHETIC_SCALE)
        return np.asarray(out, dtype=np.float64)

    @classmethod
    def tiny(cls, clip: ClipScorer, seed: int = 0) -> AestheticScorer:
        """A random-weight head sized to ``clip`` (offline tests only)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = torch.nn.Linear(clip.embed_dim, 1)
        return cls(clip, head, name="random linear aesthetic head", random_weights=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def aesthetic_head_file(models_dir: str | os.PathLike[str] | None = None, *, offline: bool | None = None) -> Path:
    """The LAION head file: found locally, or downloaded once (checked against its sha256)."""
    from spatialid.encoder.model_files import (
        ModelFile,
        default_models_dir,
        fetch,
        find_local,
    )
    from spatialid.utils.offline import is_offline

    spec = ModelFile("laion_aesthetic", AESTHETIC_HEAD_FILE, "laion-aesthetic", "4 KB", url=AESTHETIC_HEAD_URL)
    folder = Path(models_dir).expanduser() if models_dir else default_models_dir()
    off = is_offline(offline)
    path = find_local(spec, folder) or (None if off else fetch(spec, folder))
    if path is None:
        why = "downloading is off (offline mode)" if off else "it could not be downloaded"
        raise ModelFilesMissingError(
            f"Aesthetic needs LAION's head {AESTHETIC_HEAD_FILE} (~4 KB) in {folder / spec.subdir} and {why}; "
            f"download {AESTHETIC_HEAD_URL} there, or pass --no-aesthetic"
        )
    digest = _sha256(Path(path))
    if digest != AESTHETIC_HEAD_SHA256:
        raise SpatialIDError(
            f"{path} is not LAION's {AESTHETIC_HEAD_FILE} (sha256 {digest[:12]}..., expected {AESTHETIC_HEAD_SHA256[:12]}...); "
            f"delete it and run again to download it from {AESTHETIC_HEAD_URL}"
        )
    return Path(path)


def load_aesthetic(
    clip: ClipScorer, *, models_dir: str | os.PathLike[str] | None = None, offline: bool | None = None
) -> AestheticScorer:
    """IBench's AestheticScore on ``clip`` (which must be OpenAI's ViT-L/14: the head is 768-d)."""
    if clip.embed_dim != HEAD_DIM:
        raise SpatialIDError(f"Aesthetic needs CLIP ViT-L/14 features ({HEAD_DIM}-d); {clip.name} gives {clip.embed_dim}-d")
    path = aesthetic_head_file(models_dir, offline=offline)
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = torch.nn.Linear(HEAD_DIM, 1)
    try:
        head.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise SpatialIDError(f"{path} does not hold a Linear({HEAD_DIM}, 1) state dict: {' '.join(str(exc).split())[:200]}") from None
    return AestheticScorer(clip, head, name=f"LAION aesthetic head {AESTHETIC_HEAD_FILE}")
