"""Image quality: IBench's ImagingQuality (``IQ``) and the same network on its intended input (``IQ-01``).

IBench (typemovie/IBench, ``ibench/metrics/t2i/imaging_quality.py``, ``ImagingQuality``) builds
pyiqa's MUSIQ architecture with the SPAQ checkpoint (``MUSIQ(pretrained_model_path=
musiq_spaq_ckpt-358bb6af.pth)``), reads every ``imagewithid`` as ``np.array(PIL RGB).astype(uint8)``
turned into a float tensor, i.e. **0-255 values at full resolution**, and feeds that to the network.
Its ``transform(..., preprocess_mode='longer')`` (resize to 512 and ``/255``) is computed but its
result is never used. The score is the network's output divided by 100, averaged over images.

pyiqa's MUSIQ expects [0, 1] input: its ``forward`` maps ``x`` to ``(x - 0.5) * 2`` (the [-1, 1] of
the official MUSIQ code), so IBench's input reaches the network as roughly [-1, 509]. The stem's
weight-standardised convolution and GroupNorm absorb much of that scale, so the numbers stay in a
plausible range, but they are not MUSIQ-SPAQ's scores. Hence two columns from one network:

* ``iq`` (``IQ``): IBench's computation, 0-255 input, /100: the number to put beside IBench tables;
* ``iq_01`` (``IQ-01``): the same network on [0, 1] input (what ``pyiqa.create_metric("musiq-spaq")``
  gives for a loaded image), /100: MUSIQ-SPAQ as its authors define it.

Other pyiqa no-reference metrics can be named (``--iq-metric clipiqa`` ...); both columns then use
that network (IBench has no such variant; the labels say so).

pyiqa is optional (it pulls in many packages), so:

* real evaluation without pyiqa: a one-line error saying how to install it, or to pass
  ``--iq-metric none`` (the IQ columns are then omitted and the report says so);
* offline tests (``random_weights=True``): pyiqa's MUSIQ with random weights when pyiqa is
  installed, else a small random-weight CNN stand-in. Both are labelled RANDOM WEIGHTS in every
  report: their numbers exercise the plumbing only.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from spatialid.errors import ModelFilesMissingError, SpatialIDError

__all__ = [
    "DEFAULT_IQ_METRIC",
    "IBENCH_VALUE_RANGE",
    "MUSIQ_SPAQ_FILE",
    "MUSIQ_WEIGHTS_REPO",
    "QualityScorer",
    "image_tensor",
    "load_quality",
]

DEFAULT_IQ_METRIC = "musiq-spaq"
IBENCH_VALUE_RANGE = 255.0  # imaging_quality.py feeds torch.Tensor(np.array(uint8 image)), never /255
# pyiqa's weights store (pyiqa/archs/arch_util.py get_url_from_name; musiq_arch.py default_model_urls)
MUSIQ_WEIGHTS_REPO = "chaofengc/IQA-PyTorch-Weights"
MUSIQ_SPAQ_FILE = "musiq_spaq_ckpt-358bb6af.pth"


def image_tensor(image: Image.Image, value_range: float = 1.0) -> torch.Tensor:
    """``[1, 3, H, W]`` float32 of the RGB pixels: 0-255 integers (``value_range=255``, IBench) or /255."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32)
    if value_range != IBENCH_VALUE_RANGE:
        arr = arr / np.float32(255.0 / value_range)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


class _StandInIQNet(torch.nn.Module):
    """Random-weight convolutional scorer in (0, 1). NOT an image-quality model: a test stand-in."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
                torch.nn.ReLU(),
                torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1),
            )
            self.head = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # standardised features so that the score varies visibly between images
        f = self.features(x).flatten(1)
        f = (f - f.mean(dim=1, keepdim=True)) / (f.std(dim=1, keepdim=True) + 1e-6)
        return torch.sigmoid(self.head(f))


class QualityScorer:
    """A no-reference quality network: ``score(images, value_range=...) -> np.ndarray`` (one per image).

    ``scale`` maps the network's output to the reported number (MUSIQ: 0.01, IBench's ``/ 100``).
    """

    def __init__(
        self,
        net: Any,
        *,
        name: str,
        scale: float = 1.0,
        higher_is_better: bool = True,
        random_weights: bool = False,
        device: torch.device | str | None = None,
        note: str = "",
    ) -> None:
        self.net = net
        self.name = name
        self.scale = scale
        self.higher_is_better = higher_is_better
        self.random_weights = random_weights
        self.device = torch.device(device or "cpu")
        self.note = note

    @property
    def label(self) -> str:
        scaled = f" / {1 / self.scale:g}" if self.scale != 1.0 else ""
        base = f"{self.name}{scaled}"
        if self.note:
            base = f"{base} ({self.note})"
        return f"{base} [RANDOM WEIGHTS: test stand-in, numbers are meaningless]" if self.random_weights else base

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], *, value_range: float = 1.0) -> np.ndarray:
        """One score per image, each image alone at full resolution (IBench's config uses batch size 1)."""
        values = []
        for image in images:
            out = self.net(image_tensor(image, value_range).to(self.device))
            values.append(float(torch.as_tensor(out).float().mean()) * self.scale)
        return np.asarray(values, dtype=np.float64)


def _pyiqa_available() -> bool:
    return importlib.util.find_spec("pyiqa") is not None


def _musiq_spaq_checkpoint(offline: bool) -> Path:
    """The SPAQ checkpoint IBench loads (``config.yaml``: ``musiq_spaq_ckpt-358bb6af.pth``)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(MUSIQ_WEIGHTS_REPO, MUSIQ_SPAQ_FILE, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - any hub/network failure means "weights not available"
        why = "downloading is off (offline mode)" if offline else f"it could not be downloaded ({type(exc).__name__})"
        raise ModelFilesMissingError(
            f"IQ needs MUSIQ-SPAQ's weights {MUSIQ_SPAQ_FILE} and {why}; run once online or "
            f"`huggingface-cli download {MUSIQ_WEIGHTS_REPO} {MUSIQ_SPAQ_FILE}`, or pass --iq-metric none"
        ) from None


def load_quality(
    metric: str = DEFAULT_IQ_METRIC,
    *,
    device: torch.device | str | None = None,
    random_weights: bool = False,
    offline: bool | None = None,
) -> QualityScorer | None:
    """Build the IQ network; ``metric="none"`` -> None (no IQ columns)."""
    from spatialid.utils.offline import is_offline

    name = (metric or "none").strip().lower()
    if name == "none":
        return None
    scale = 0.01 if name.startswith("musiq") else 1.0
    dev = torch.device(device or "cpu")
    if not _pyiqa_available():
        if random_weights:
            return QualityScorer(
                _StandInIQNet().to(dev).eval(), name="stand-in CNN", scale=1.0, random_weights=True, device=dev,
                note=f"pyiqa not installed; stands in for {name}",
            )
        raise SpatialIDError(
            f"image quality metric {name!r} needs pyiqa: `pip install pyiqa` (optional, large), "
            "or pass --iq-metric none to leave the IQ columns out"
        )
    import pyiqa

    known = set(pyiqa.list_models(metric_mode="NR"))
    if name not in known:
        raise SpatialIDError(f"{name!r} is not a pyiqa no-reference metric; e.g. musiq-spaq, musiq, clipiqa, topiq_nr")
    if name == "musiq-spaq":
        from pyiqa.archs.musiq_arch import MUSIQ

        if random_weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net = MUSIQ(pretrained=False)
        else:
            ckpt = _musiq_spaq_checkpoint(is_offline(offline))
            net = MUSIQ(pretrained_model_path=os.fspath(ckpt))  # IBench's ImagingQuality.load_model
        name = "pyiqa MUSIQ (random init, stands in for the SPAQ checkpoint)" if random_weights else "pyiqa MUSIQ (SPAQ checkpoint)"
        return QualityScorer(net.to(dev).eval(), name=name, scale=scale, random_weights=random_weights, device=dev)
    try:
        net = pyiqa.create_metric(name, device=dev, as_loss=False, pretrained=not random_weights)
    except Exception as exc:  # noqa: BLE001 - pyiqa raises many kinds when it cannot fetch weights
        if random_weights:
            # this metric cannot be built without downloads: use the plain stand-in instead
            return QualityScorer(
                _StandInIQNet().to(dev).eval(), name="stand-in CNN", random_weights=True, device=dev,
                note=f"pyiqa's {name} cannot be built offline",
            )
        from torch.hub import get_dir

        raise ModelFilesMissingError(
            f"pyiqa metric {name} could not load its weights ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
            f"run once online so pyiqa caches them under {get_dir()}/pyiqa, or pass --iq-metric none"
        ) from None
    return QualityScorer(net, name=f"pyiqa {name}", scale=scale, higher_is_better=not net.lower_better,
                         random_weights=random_weights, device=dev, note="not IBench's MUSIQ-SPAQ")
