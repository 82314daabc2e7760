"""PuLID-FLUX modules (IDFormer, identity cross-attention, the PuLIDFluxModel container), configs, checkpoint I/O.

The configs are imported eagerly (plain dataclasses); the torch modules load on first use so that
``import spatialid.models.configs`` (used by the CLI's argument checks) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spatialid._lazy import lazy_exports
from spatialid.models.configs import (
    PULID_FLUX,
    TINY_FLUX,
    TINY_PULID,
    IDFormerConfig,
    PerceiverCAConfig,
    PuLIDFluxConfig,
    TinyFluxConfig,
)

_LAZY: dict[str, str] = {
    "IDFormer": "spatialid.models.idformer",
    "PerceiverAttentionCA": "spatialid.models.perceiver_ca",
    "PuLIDFluxModel": "spatialid.models.pulid_flux",
    "load_pulid_model": "spatialid.models.checkpoint",
    "build_pulid_model": "spatialid.models.checkpoint",
    "load_pulid_checkpoint": "spatialid.models.checkpoint",
    "save_pulid_checkpoint": "spatialid.models.checkpoint",
    "build_pulid_modules": "spatialid.models.checkpoint",
    "expected_pulid_layout": "spatialid.models.checkpoint",
    "resolve_pulid_checkpoint": "spatialid.models.checkpoint",
    "DEFAULT_REPO_ID": "spatialid.models.checkpoint",
    "DEFAULT_FILENAME": "spatialid.models.checkpoint",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, ["IDFormerConfig", "PerceiverCAConfig", "PuLIDFluxConfig", "TinyFluxConfig", "PULID_FLUX", "TINY_FLUX", "TINY_PULID"])

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.models.checkpoint import (
        DEFAULT_FILENAME,
        DEFAULT_REPO_ID,
        build_pulid_model,
        build_pulid_modules,
        expected_pulid_layout,
        load_pulid_checkpoint,
        load_pulid_model,
        resolve_pulid_checkpoint,
        save_pulid_checkpoint,
    )
    from spatialid.models.idformer import IDFormer
    from spatialid.models.perceiver_ca import PerceiverAttentionCA
    from spatialid.models.pulid_flux import PuLIDFluxModel
