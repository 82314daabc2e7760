"""spatialid: identity-preserving FLUX.1 generation with spatially scheduled PuLID injection.

Public names are imported lazily so that ``import spatialid`` (and the CLI's argument checks) stay
fast: torch, diffusers and transformers load only when a name that needs them is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spatialid._lazy import lazy_exports
from spatialid._version import __version__

# public name -> module that defines it
_LAZY: dict[str, str] = {
    # errors
    "SpatialIDError": "spatialid.errors",
    "CheckpointError": "spatialid.errors",
    "FaceNotFoundError": "spatialid.errors",
    "ModelFilesMissingError": "spatialid.errors",
    "InputImageError": "spatialid.errors",
    # PuLID-FLUX modules and weights
    "IDFormer": "spatialid.models.idformer",
    "PerceiverAttentionCA": "spatialid.models.perceiver_ca",
    "load_pulid_checkpoint": "spatialid.models.checkpoint",
    "save_pulid_checkpoint": "spatialid.models.checkpoint",
    # masks and schedule
    "SpatialSchedule": "spatialid.masks.schedule",
    "PRESETS": "spatialid.masks.schedule",
    "PRESET_DESCRIPTIONS": "spatialid.masks.schedule",
    "resolve_preset": "spatialid.masks.schedule",
    # injection and the one loader
    "IdentityInjector": "spatialid.injection.injector",
    "PuLIDIdentity": "spatialid.injection.identity",
    "PuLIDFluxModel": "spatialid.models.pulid_flux",
    "PuLIDLoaderMixin": "spatialid.loaders.pulid",
    "load_pulid": "spatialid.loaders.pulid",
    "unload_pulid": "spatialid.loaders.pulid",
    "set_pulid_scale": "spatialid.loaders.pulid",
    # identity encoding
    "IdentityEncoder": "spatialid.encoder.identity_encoder",
    "IdentityEmbedding": "spatialid.encoder.embedding",
    # pipeline
    "SpatialIDPipeline": "spatialid.pipeline.pipeline_spatialid",
    "SpatialIDPipelineOutput": "spatialid.pipeline.pipeline_spatialid",
    "StepMasks": "spatialid.pipeline.pipeline_spatialid",
    "GenerationSettings": "spatialid.pipeline.settings",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, ["__version__"])

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.encoder.embedding import IdentityEmbedding
    from spatialid.encoder.identity_encoder import IdentityEncoder
    from spatialid.errors import (
        CheckpointError,
        FaceNotFoundError,
        InputImageError,
        ModelFilesMissingError,
        SpatialIDError,
    )
    from spatialid.injection.identity import PuLIDIdentity
    from spatialid.injection.injector import IdentityInjector
    from spatialid.loaders.pulid import PuLIDLoaderMixin, load_pulid, set_pulid_scale, unload_pulid
    from spatialid.models.pulid_flux import PuLIDFluxModel
    from spatialid.masks.schedule import (
        PRESET_DESCRIPTIONS,
        PRESETS,
        SpatialSchedule,
        resolve_preset,
    )
    from spatialid.models.checkpoint import load_pulid_checkpoint, save_pulid_checkpoint
    from spatialid.models.idformer import IDFormer
    from spatialid.models.perceiver_ca import PerceiverAttentionCA
    from spatialid.pipeline.pipeline_spatialid import (
        SpatialIDPipeline,
        SpatialIDPipelineOutput,
        StepMasks,
    )
    from spatialid.pipeline.settings import GenerationSettings
