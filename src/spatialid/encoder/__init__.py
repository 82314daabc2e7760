"""Identity encoding: photo(s) of a person -> PuLID-FLUX identity tokens.

``IdentityEncoder`` (real models via ``from_pretrained``, offline toy via ``tiny``) produces an
``IdentityEmbedding`` (tokens, uncond tokens, face box, aligned face, debug images) that can be
saved to / loaded from a small ``.safetensors`` file. Heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spatialid._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "IdentityEncoder": "spatialid.encoder.identity_encoder",
    "FaceAnalysis": "spatialid.encoder.identity_encoder",
    "tiny_pulid_modules": "spatialid.encoder.identity_encoder",
    "MIN_FACE_SIZE": "spatialid.encoder.identity_encoder",
    "IdentityEmbedding": "spatialid.encoder.embedding",
    "EvaVisionConfig": "spatialid.encoder.eva_clip",
    "EvaVisionTower": "spatialid.encoder.eva_clip",
    "EVA02_CLIP_L_336": "spatialid.encoder.eva_clip",
    "TINY_EVA": "spatialid.encoder.eva_clip",
    "DlibFaceAnalyzer": "spatialid.encoder.face_dlib",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from spatialid.encoder.embedding import IdentityEmbedding
    from spatialid.encoder.eva_clip import (
        EVA02_CLIP_L_336,
        TINY_EVA,
        EvaVisionConfig,
        EvaVisionTower,
    )
    from spatialid.encoder.face_dlib import DlibFaceAnalyzer
    from spatialid.encoder.identity_encoder import (
        MIN_FACE_SIZE,
        FaceAnalysis,
        IdentityEncoder,
        tiny_pulid_modules,
    )
