"""Generation: ``SpatialIDPipeline`` (diffusers FluxPipeline + PuLID-FLUX + SpatialID masks), its
weight loading, the offline tiny model, and the settings record with its validation.

Names load lazily: ``spatialid.pipeline.settings`` (used by the CLI's argument checks) must not
pull in torch or diffusers. Output files and pictures belong to :mod:`spatialid.app`.
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
    "load_flux_transformer": "spatialid.pipeline.loading",
    "GenerationSettingsError": "spatialid.pipeline.settings",
    "GenerationSettings": "spatialid.pipeline.settings",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.pipeline.loading import load_flux_transformer
    from spatialid.pipeline.pipeline_spatialid import (
        TINY_NOTE,
        SpatialIDPipeline,
        SpatialIDPipelineOutput,
        StepMasks,
    )
    from spatialid.pipeline.settings import GenerationSettings, GenerationSettingsError
    from spatialid.pipeline.tiny import build_tiny_flux_components
