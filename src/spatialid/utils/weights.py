"""Telling a safetensors file from a pickle by its first bytes, without deserialising anything.

Every loader that accepts a weights file from the user (PuLID-FLUX checkpoints, CLIP checkpoints
for the evaluation) calls :func:`sniff_safetensors` first, so a pickle renamed ``.safetensors``
is refused in one line and never reaches a deserialiser.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from spatialid.errors import CheckpointError

__all__ = ["MAX_SAFETENSORS_HEADER", "NEVER_UNPICKLE", "read_safetensors_header", "sniff_safetensors"]

# safetensors itself allows a 100 MB JSON header, parsed whole; the largest real headers (FLUX, T5)
# are well under 1 MB, so a longer one is refused before safetensors reads it (a memory bomb).
MAX_SAFETENSORS_HEADER = 16 * 2**20
NEVER_UNPICKLE = "spatialid never unpickles weight files because that can run arbitrary code"


def sniff_safetensors(path: str | os.PathLike[str], fix: str, *, name: str | None = None) -> None:
    """Raise :class:`CheckpointError` unless ``path`` starts like a complete safetensors file.

    A safetensors file starts with a little-endian u64 header length followed by ``{``. That test
    comes first: the length's low byte may well be 0x80 or 'P', so a lone pickle/zip magic byte
    would misclassify valid files. ``fix`` ends every message (what to do instead); ``name`` is
    how the file is called in messages (default: the path).
    """
    path = Path(path)
    label = name if name is not None else str(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(9)
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    if len(head) == 9 and head[8:9] == b"{" and 0 < header_len <= MAX_SAFETENSORS_HEADER:
        if 8 + header_len > size:
            raise CheckpointError(
                f"{label} is a truncated safetensors file (its header alone needs {8 + header_len} bytes, "
                f"the file has {size}); copy or download it again: {fix}"
            )
        return
    if len(head) == 9 and head[8:9] == b"{" and header_len > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(
            f"{label} declares a safetensors header of {header_len:,} bytes, more than any weights file has "
            f"({MAX_SAFETENSORS_HEADER // 2**20} MB); the file is damaged: {fix}"
        )
    if head[:4] == b"PK\x03\x04":
        raise CheckpointError(
            f"{label} is a PyTorch pickle archive (torch.save zip format), not a safetensors file; {NEVER_UNPICKLE}: {fix}"
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(
            f"{label} is a Python pickle (legacy torch.save / .bin / .pt / .ckpt), not a safetensors file; "
            f"{NEVER_UNPICKLE}: {fix}"
        )
    if head[:4] == b"GGUF":
        raise CheckpointError(f"{label} is a GGUF file, not a safetensors file: {fix}")
    if size < 10:
        raise CheckpointError(f"{label} is empty or truncated ({size} bytes), not a safetensors file: {fix}")
    raise CheckpointError(f"{label} is not a safetensors file (unrecognised first bytes {head[:8].hex()}): {fix}")


def read_safetensors_header(path: str | os.PathLike[str], fix: str, *, name: str | None = None) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype/shape/offsets, plus ``__metadata__``).

    Read with the standard library only (no torch, no tensor data), after :func:`sniff_safetensors`
    bounded its length; a header that is no JSON object raises :class:`CheckpointError`.
    """
    sniff_safetensors(path, fix, name=name)
    label = name if name is not None else str(path)
    with Path(path).open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        try:
            header = json.loads(fh.read(length))
        except (ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{label}: damaged safetensors header; {fix}")
    return header
