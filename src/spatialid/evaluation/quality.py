"""Image quality (IQ) with pyiqa, the maintained IQA toolbox (optional: ``pip install pyiqa``).

The default metric is ``musiq-spaq`` divided by 100, i.e. MUSIQ trained on SPAQ mapped to [0, 1]:
the "imaging quality" convention of VBench-style suites, which IBench's IQ column follows. Any
pyiqa no-reference metric can be named instead (``clipiqa``, ``musiq``, ``topiq_nr``, ...); the
report names the metric and whether it was rescaled.

pyiqa is optional (it pulls in many packages), so:

* real evaluation without pyiqa: a one-line error saying how to install it, or to pass
  ``--iq-metric none`` (the IQ column is then omitted and the report says so);
* offline tests (``random_weights=True``): pyiqa's own network with random weights
  (``pretrained=False``) when pyiqa is installed, else a small random-weight CNN stand-in. Both are
  labelled RANDOM WEIGHTS in every report: their numbers exercise the plumbing only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from spatialid.errors import ModelFilesMissingError, SpatialIDError

__all__ = ["DEFAULT_IQ_METRIC", "QualityScorer", "load_quality"]

DEFAULT_IQ_METRIC = "musiq-spaq"


def _to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
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
    """A no-reference quality metric: ``score(images) -> np.ndarray`` (one value per image)."""

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
    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        values = []
        for image in images:
            out = self.net(_to_tensor(image).to(self.device))
            values.append(float(torch.as_tensor(out).float().mean()) * self.scale)
        return np.asarray(values, dtype=np.float64)


def _pyiqa_available() -> bool:
    return importlib.util.find_spec("pyiqa") is not None


def load_quality(
    metric: str = DEFAULT_IQ_METRIC,
    *,
    device: torch.device | str | None = None,
    random_weights: bool = False,
) -> QualityScorer | None:
    """Build the IQ scorer; ``metric="none"`` -> None (no IQ column)."""
    name = (metric or "none").strip().lower()
    if name == "none":
        return None
    scale = 0.01 if name.startswith("musiq") else 1.0
    if not _pyiqa_available():
        if random_weights:
            return QualityScorer(
                _StandInIQNet().to(device or "cpu").eval(),
                name="stand-in CNN",
                random_weights=True,
                device=device,
                note=f"pyiqa not installed; stands in for {name}",
            )
        raise SpatialIDError(
            f"image quality metric {name!r} needs pyiqa: `pip install pyiqa` (optional, large), "
            "or pass --iq-metric none to leave the IQ column out"
        )
    import pyiqa

    known = set(pyiqa.list_models(metric_mode="NR"))
    if name not in known:
        raise SpatialIDError(f"{name!r} is not a pyiqa no-reference metric; e.g. musiq-spaq, musiq, clipiqa, topiq_nr")
    dev = torch.device(device or "cpu")
    if random_weights:
        try:
            net = pyiqa.create_metric(name, device=dev, as_loss=False, pretrained=False)
        except Exception:
            # this metric cannot be built without downloads: use the plain stand-in instead
            return QualityScorer(
                _StandInIQNet().to(dev).eval(), name="stand-in CNN", random_weights=True, device=dev,
                note=f"pyiqa's {name} cannot be built offline",
            )
        return QualityScorer(net, name=f"pyiqa {name}", scale=scale, higher_is_better=not net.lower_better,
                             random_weights=True, device=dev)
    try:
        net = pyiqa.create_metric(name, device=dev, as_loss=False)
    except Exception as exc:
        from torch.hub import get_dir

        raise ModelFilesMissingError(
            f"pyiqa metric {name} could not load its weights ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
            f"run once online so pyiqa caches them under {get_dir()}/pyiqa, or pass --iq-metric none"
        ) from None
    return QualityScorer(net, name=f"pyiqa {name}", scale=scale, higher_is_better=not net.lower_better, device=dev)
