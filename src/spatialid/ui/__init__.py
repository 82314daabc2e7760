"""The web UI behind ``spatialid serve`` (Gradio; install with ``pip install 'spatialid[ui]'``).

:mod:`spatialid.ui.handlers` holds the logic and needs no Gradio; :mod:`spatialid.ui.app` builds
the page. Names load lazily so ``import spatialid.ui`` does not import Gradio.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "build_app": "spatialid.ui.app",
    "launch": "spatialid.ui.app",
    "load_pipeline": "spatialid.ui.app",
    "build_request": "spatialid.ui.handlers",
    "run_generation": "spatialid.ui.handlers",
    "IdentityCache": "spatialid.ui.handlers",
    "write_example_photos": "spatialid.ui.examples",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spatialid.ui' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
