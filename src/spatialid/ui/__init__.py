"""The web UI behind ``spatialid serve`` (Gradio; install with ``pip install 'spatialid[ui]'``).

:mod:`spatialid.ui.handlers` holds the logic and needs no Gradio; :mod:`spatialid.ui.app` builds
the page. Names load lazily so ``import spatialid.ui`` does not import Gradio.
"""

from __future__ import annotations

from spatialid._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "build_app": "spatialid.ui.app",
    "launch": "spatialid.ui.app",
    "is_loopback": "spatialid.ui.network",
    "build_request": "spatialid.ui.handlers",
    "run_generation": "spatialid.ui.handlers",
    "IdentityCache": "spatialid.ui.handlers",
    "write_example_photos": "spatialid.ui.examples",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY)
