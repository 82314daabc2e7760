"""Evaluation of benchmark outputs: CLIP-T/CLIP-I, FaceSim, image quality, background contamination.

Submodules: ``clip_metrics``, ``face_metrics``, ``quality``, ``contamination`` (metric models),
``stats`` (mean/std/CI), ``report`` (JSON/Markdown/CSV/plots) and ``evaluate`` (the driver).
Model-heavy modules import torch/open_clip on use; importing this package stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ClipScorer": "spatialid.evaluation.clip_metrics",
    "DlibFaceEmbedder": "spatialid.evaluation.face_metrics",
    "ArcFaceEmbedder": "spatialid.evaluation.face_metrics",
    "QualityScorer": "spatialid.evaluation.quality",
    "load_quality": "spatialid.evaluation.quality",
    "LpipsDistance": "spatialid.evaluation.contamination",
    "background_change": "spatialid.evaluation.contamination",
    "face_region_mask": "spatialid.evaluation.contamination",
    "Summary": "spatialid.evaluation.stats",
    "summarize": "spatialid.evaluation.stats",
    "write_report": "spatialid.evaluation.report",
    "MetricModels": "spatialid.evaluation.evaluate",
    "evaluate": "spatialid.evaluation.evaluate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spatialid.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
