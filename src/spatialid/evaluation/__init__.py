"""Evaluation of benchmark outputs: CLIP-T/CLIP-I, FaceSim, image quality, background contamination.

Submodules: ``clip_metrics``, ``face_metrics``, ``quality``, ``contamination`` (metric models),
``stats`` (mean/std/CI), ``report`` (JSON/Markdown/CSV/plots) and ``evaluate`` (the driver).
Model-heavy modules import torch/open_clip on use; importing this package stays light.
"""

from __future__ import annotations

from spatialid._lazy import lazy_exports

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

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY)
