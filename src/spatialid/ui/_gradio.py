"""Gradio, imported once for the whole ``ui`` package with the offline environment set first.

Gradio reads these variables at import and launch time, so every module of the page imports
``gr`` from here (never ``gradio`` directly): whichever of them loads first, the environment is
already set.
"""

from __future__ import annotations

import os

_OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SHARE": "False",
}

for _key, _value in _OFFLINE_ENV.items():
    os.environ[_key] = _value  # forced: a server that may run offline must never phone home

import gradio as gr  # noqa: E402  (after the environment above)

__all__ = ["gr"]
