"""Generation: ``SpatialIDPipeline`` (diffusers FluxPipeline + PuLID-FLUX + SpatialID masks), the
offline tiny model, PNG metadata and pictures.

Names load lazily: ``spatialid.pipeline.settings`` and ``.metadata`` (used by the CLI's argument
checks) must not pull in torch or diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spatialid._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "SpatialIDPipeline": "spatialid.pipeline.pipeline_spatialid",
    "SpatialIDPipelineOutput": "spatialid.pipeline.pipeline_spatialid",
    "StepMasks": "spatialid.pipeline.pipeline_spatialid",
    "TINY_NOTE": "spatialid.pipeline.pipeline_spatialid",
    "build_tiny_flux_components": "spatialid.pipeline.tiny",
    "save_png_with_metadata": "spatialid.pipeline.metadata",
    "read_png_metadata": "spatialid.pipeline.metadata",
    "comparison_grid": "spatialid.pipeline.visualize",
    "mask_schedule_picture": "spatialid.pipeline.visualize",
    "load_flux_transformer": "spatialid.pipeline.loading",
    "GenerationSettingsError": "spatialid.pipeline.settings",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.pipeline.loading import load_flux_transformer
    from spatialid.pipeline.metadata import read_png_metadata, save_png_with_metadata
    from spatialid.pipeline.pipeline_spatialid import (
        TINY_NOTE,
        SpatialIDPipeline,
        SpatialIDPipelineOutput,
        StepMasks,
    )
    from spatialid.pipeline.settings import GenerationSettingsError
    from spatialid.pipeline.tiny import build_tiny_flux_components
    from spatialid.pipeline.visualize import comparison_grid, mask_schedule_picture
