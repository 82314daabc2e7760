"""Evaluation of benchmark outputs with IBench's metrics, plus background contamination.

Submodules: ``clip_metrics`` (CLIP-T, CLIP-I, CLIP-ref), ``face_metrics`` (FaceSim, AntiFaceSim),
``quality`` (IQ, IQ-01), ``aesthetic``, ``fid``, ``contamination`` (metric models), ``paper`` (the
paper's quoted numbers), ``stats`` (mean/std/CI), ``report`` (JSON/Markdown/CSV/plots), ``inputs``
(sources and files checked before any model loads; damaged images read without crashing),
``sources`` (the items of bench folders and IBench files), ``gt_photos`` (other photos of a person:
``--gt``), ``metric_models`` (which model gives which column), ``columns`` (the report's columns),
``multi_metrics`` (count accuracy, ID-Conf, CP, Sim(GT)), ``face_geometry`` (LandmarkDiff, PoseDiv,
ExprDiv), ``scoring`` (one image's row), ``fid_sets`` (FID per preset), ``group_report`` (per group
size) and ``evaluate`` (the driver).
Model-heavy modules import torch/open_clip on use; importing this package stays light.
"""

from __future__ import annotations

from spatialid._lazy import lazy_exports

_LAZY = {
    "ClipScorer": "spatialid.evaluation.clip_metrics",
    "DlibFaceEmbedder": "spatialid.evaluation.face_metrics",
    "ArcFaceEmbedder": "spatialid.evaluation.face_metrics",
    "QualityScorer": "spatialid.evaluation.quality",
    "AestheticScorer": "spatialid.evaluation.aesthetic",
    "FidExtractor": "spatialid.evaluation.fid",
    "fid_from_features": "spatialid.evaluation.fid",
    "load_quality": "spatialid.evaluation.quality",
    "LpipsDistance": "spatialid.evaluation.contamination",
    "background_change": "spatialid.evaluation.contamination",
    "face_region_mask": "spatialid.evaluation.contamination",
    "Summary": "spatialid.evaluation.stats",
    "summarize": "spatialid.evaluation.stats",
    "write_report": "spatialid.evaluation.report",
    "MetricModels": "spatialid.evaluation.metric_models",
    "evaluate": "spatialid.evaluation.evaluate",
    "check_source": "spatialid.evaluation.inputs",
    "load_rgb": "spatialid.evaluation.inputs",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY)
