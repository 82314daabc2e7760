"""One offline rule for every loader (FLUX, PuLID, EVA, face models, metric models).

``--offline`` (``local_files_only=True``) and the environment variables ``HF_HUB_OFFLINE``,
``TRANSFORMERS_OFFLINE`` and ``SPATIALID_OFFLINE`` all mean the same thing everywhere: use local
files only, never download.
"""

from __future__ import annotations

import os

__all__ = ["OFFLINE_ENV_VARS", "is_offline"]

OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SPATIALID_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_offline(local_files_only: bool | None = None) -> bool:
    """An explicit ``local_files_only`` wins; ``None`` follows the environment variables above."""
    if local_files_only is not None:
        return bool(local_files_only)
    return any(os.environ.get(name, "").strip().upper() in _TRUE for name in OFFLINE_ENV_VARS)
