"""The application layer: what the front-ends (CLI, web UI, bench, evaluation) share.

It sits between the library (models, masks, encoder, injection, pipeline) and the front-ends and
never imports a front-end: model loading once per process (:mod:`.loading`), one generation job
with its output files (:mod:`.job`), PNG metadata (:mod:`.metadata`) and the pictures
(:mod:`.pictures`). Names load lazily so ``import spatialid.app`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spatialid._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "ModelSpec": "spatialid.app.loading",
    "Models": "spatialid.app.loading",
    "load_pipeline": "spatialid.app.loading",
    "resolve_device": "spatialid.app.loading",
    "resolve_dtype": "spatialid.app.loading",
    "GenerationJob": "spatialid.app.job",
    "JobResult": "spatialid.app.job",
    "run_job": "spatialid.app.job",
    "read_png_metadata": "spatialid.app.metadata",
    "save_png_with_metadata": "spatialid.app.metadata",
    "comparison_grid": "spatialid.app.pictures",
    "mask_schedule_picture": "spatialid.app.pictures",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.app.job import GenerationJob, JobResult, run_job
    from spatialid.app.loading import (
        Models,
        ModelSpec,
        load_pipeline,
        resolve_device,
        resolve_dtype,
    )
    from spatialid.app.metadata import read_png_metadata, save_png_with_metadata
    from spatialid.app.pictures import comparison_grid, mask_schedule_picture
