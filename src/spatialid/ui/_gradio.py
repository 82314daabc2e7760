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


# ----------------------------------------------------------------------------- picture boxes with a header guard

from gradio.components.base import server  # noqa: E402

from spatialid.errors import SpatialIDError  # noqa: E402
from spatialid.ui.inputs import MAX_UPLOAD_PIXELS, check_upload_pixels  # noqa: E402

#: Image-editor parts kept in memory between the browser sending them and the event reading them:
#: at most this many bytes for all visitors together (oldest dropped first) and this many layers.
MAX_EDITOR_BLOB_BYTES = 256 * 2**20
MAX_EDITOR_LAYERS = 8


def _check_part(part: object, name: str) -> None:
    """Refuse one uploaded picture from its header (a path, a ``data:`` URL or bytes); nothing decoded."""
    if part is None:
        return
    if isinstance(part, (bytes, bytearray)):
        source: object = bytes(part)
    else:
        url = getattr(part, "url", None)
        path = getattr(part, "path", None)
        if isinstance(url, str) and url.startswith("data:"):
            import base64

            source = base64.b64decode(url.partition(",")[2] or b"", validate=False)
        elif path:
            source = str(path)
        else:
            return
    try:
        check_upload_pixels(source, name, MAX_UPLOAD_PIXELS)  # type: ignore[arg-type]
    except SpatialIDError as exc:
        raise gr.Error(" ".join(str(exc).split()), title="Cannot use this picture", print_exception=False) from None


class GuardedImage(gr.Image):
    """``gr.Image`` whose upload is checked from its header before Gradio decodes or re-saves it.

    Gradio's own ``preprocess`` converts the picture to the box's mode and writes a copy; a 97 KB PNG
    claiming 10000x10000 pixels would take 1.5 GB there. Same component in the page (``is_template``).
    """

    is_template = True

    def preprocess(self, payload: object) -> object:
        _check_part(payload, str(getattr(payload, "orig_name", None) or "the picture"))
        return super().preprocess(payload)  # type: ignore[arg-type]


class GuardedImageEditor(gr.ImageEditor):
    """``gr.ImageEditor`` that checks every part (background, painted layers, composite) from its
    header before decoding, and bounds the parts the browser parks in memory (``accept_blobs``)."""

    is_template = True

    def preprocess(self, payload: object) -> object:
        if payload is not None:
            parts: object = payload
            blob_id = getattr(payload, "id", None)
            if blob_id is not None:
                refused = self._refused().pop(blob_id, None)
                if refused is not None:  # refused on arrival: say so now, do not run without the picture
                    raise gr.Error(refused, title="Cannot use this picture", print_exception=False)
                parts = self.blob_storage.get(blob_id)
            if parts is not None:
                _check_part(getattr(parts, "background", None), "the init image")
                _check_part(getattr(parts, "composite", None), "the init image")
                for layer in getattr(parts, "layers", None) or []:
                    _check_part(layer, "the painted mask")
        return super().preprocess(payload)  # type: ignore[arg-type]

    @server
    def accept_blobs(self, data: object) -> None:
        fields = getattr(data, "data", {}) or {}
        index = fields.get("index")
        if fields.get("type") == "layer" and index not in (None, "null"):
            try:
                number = int(index)
            except (TypeError, ValueError):
                raise gr.Error("a painted layer's number is not a number", print_exception=False) from None
            if not 0 <= number < MAX_EDITOR_LAYERS:
                raise gr.Error(f"at most {MAX_EDITOR_LAYERS} painted layers", print_exception=False)
        files = getattr(data, "files", None) or []
        if files:
            try:
                _check_part(files[0][1], "the init image" if fields.get("type") != "layer" else "the painted mask")
            except gr.Error as exc:
                refused = self._refused()
                refused[str(fields.get("id"))] = exc.message  # the event that follows says it
                while len(refused) > 256:
                    refused.pop(next(iter(refused)))
                self.blob_storage.pop(fields.get("id"), None)  # none of this picture's parts stay
                raise
        super().accept_blobs(data)  # type: ignore[arg-type]
        self._bound_blobs()

    def _refused(self) -> dict[str, str]:
        """Parts refused on arrival, by the id the event then names (a few hundred at most)."""
        if not hasattr(self, "_refused_parts"):
            self._refused_parts: dict[str, str] = {}
        return self._refused_parts

    def _bound_blobs(self) -> None:
        """Drop the oldest parked parts until all fit in :data:`MAX_EDITOR_BLOB_BYTES`."""

        def size(entry: object) -> int:
            parts = [getattr(entry, "background", None), getattr(entry, "composite", None), *(getattr(entry, "layers", None) or [])]
            return sum(len(p) for p in parts if isinstance(p, (bytes, bytearray)))

        while len(self.blob_storage) > 1 and sum(size(e) for e in self.blob_storage.values()) > MAX_EDITOR_BLOB_BYTES:
            self.blob_storage.pop(next(iter(self.blob_storage)))


__all__ += ["GuardedImage", "GuardedImageEditor", "MAX_EDITOR_BLOB_BYTES", "MAX_EDITOR_LAYERS"]
