"""The result of encoding a face: identity tokens plus what a user needs to check them.

An :class:`IdentityEmbedding` holds the IDFormer output for one person (``tokens``) and the
"unconditional" tokens PuLID uses for true CFG (``uncond_tokens`` = IDFormer of all-zero inputs),
together with the face box, the aligned face and debug images. It is saved as a small
``.safetensors`` file so a user can encode once (``spatialid encode``) and generate many times
(``generate --id-embeds``) without loading any face model again.

File layout (format ``spatialid.identity_embedding`` version 1):

* tensors ``tokens`` and ``uncond_tokens`` ``[1, num_queries, output_dim]`` (saved in their dtype);
  ``face_box`` float32 ``[4]`` (x0, y0, x1, y1 in the first photo's pixels) when known;
  ``aligned_face`` uint8 ``[H, W, 3]`` when known;
* string metadata: ``format``, ``format_version``, ``num_images``, ``spatialid_version`` and the
  encoder's own entries (encoder name, face backend, model sources, configs as JSON, ...).

Debug images are not stored in the file (``spatialid encode --debug-dir`` writes them as PNGs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spatialid.errors import CheckpointError
from spatialid.utils.io import atomic_write_bytes

__all__ = ["IdentityEmbedding", "EMBEDDING_FORMAT", "EMBEDDING_FORMAT_VERSION"]

EMBEDDING_FORMAT = "spatialid.identity_embedding"
EMBEDDING_FORMAT_VERSION = "1"
# An embedding is ~1.3 MB (PuLID-FLUX's 32x2048 tokens twice, a 512x512 face); a larger file is not one.
MAX_EMBEDDING_BYTES = 16 * 2**20


@dataclass
class IdentityEmbedding:
    """Identity tokens of one person, ready for the FLUX identity cross-attention.

    Attributes:
        tokens: ``[1, num_queries, output_dim]`` (``[1, 32, 2048]`` for PuLID-FLUX); the mean over
            photos when several photos were encoded.
        uncond_tokens: IDFormer output for all-zero inputs, same shape (the negative branch of
            PuLID's true CFG).
        face_box: (x0, y0, x1, y1) of the face used in the first photo, in its pixels.
        aligned_face: the 512x512 aligned face of the first photo.
        debug_images: name -> image (aligned face, parsing-masked face, detection drawing) per photo.
        metadata: strings describing how the embedding was made (saved in the file).
    """

    tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    face_box: tuple[float, float, float, float] | None = None
    aligned_face: Image.Image | None = None
    debug_images: dict[str, Image.Image] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("tokens", "uncond_tokens"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != 1:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"IdentityEmbedding.{name} must be [1, num_queries, dim], got {shape}")
        if self.tokens.shape != self.uncond_tokens.shape:
            raise ValueError(
                f"tokens {tuple(self.tokens.shape)} and uncond_tokens {tuple(self.uncond_tokens.shape)} differ in shape"
            )
        for name in ("tokens", "uncond_tokens"):
            t = getattr(self, name)
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"IdentityEmbedding.{name} holds NaN/Inf or non-float values (a damaged file)")
        if self.face_box is not None:
            self.face_box = tuple(float(v) for v in self.face_box)  # type: ignore[assignment]
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}

    # ------------------------------------------------------------------ properties

    @property
    def num_images(self) -> int:
        """How many photos were averaged into ``tokens``."""
        return int(self.metadata.get("num_images", "1"))

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[2])

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> IdentityEmbedding:
        """A copy with the tensors on ``device`` / in ``dtype`` (images and metadata shared)."""
        return IdentityEmbedding(
            tokens=self.tokens.to(device=device, dtype=dtype),
            uncond_tokens=self.uncond_tokens.to(device=device, dtype=dtype),
            face_box=self.face_box,
            aligned_face=self.aligned_face,
            debug_images=dict(self.debug_images),
            metadata=dict(self.metadata),
        )

    # ------------------------------------------------------------------ file I/O

    def to_bytes(self) -> bytes:
        """The ``.safetensors`` bytes of this embedding (see module docstring for the layout)."""
        from safetensors.torch import save

        from spatialid import __version__

        tensors: dict[str, torch.Tensor] = {
            "tokens": self.tokens.detach().to("cpu").contiguous(),
            "uncond_tokens": self.uncond_tokens.detach().to("cpu").contiguous(),
        }
        if self.face_box is not None:
            tensors["face_box"] = torch.tensor(self.face_box, dtype=torch.float32)
        if self.aligned_face is not None:
            arr = np.asarray(self.aligned_face.convert("RGB"), dtype=np.uint8)
            tensors["aligned_face"] = torch.from_numpy(arr.copy())
        meta = dict(self.metadata)
        meta.update(
            {
                "format": EMBEDDING_FORMAT,
                "format_version": EMBEDDING_FORMAT_VERSION,
                "num_images": str(self.num_images),
                "spatialid_version": meta.get("spatialid_version", __version__),
            }
        )
        return save(tensors, metadata=meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the embedding to ``path`` (``.safetensors``) atomically; returns the path."""
        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> IdentityEmbedding:
        """Read a file written by :meth:`save` (safetensors only; nothing is unpickled).

        Raises:
            CheckpointError: missing file, not a safetensors file, or not an identity embedding.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"identity embedding file not found: {path}; create it with `spatialid encode --id PHOTO --out {path}`"
            )
        from spatialid.utils.io import read_bounded

        try:  # bounded: a huge (or sparse) file is refused, never read whole
            data = read_bounded(path, MAX_EMBEDDING_BYTES)
        except OSError as exc:
            raise CheckpointError(f"cannot read identity embedding file {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise CheckpointError(
                f"{path} {exc}, so it is no identity embedding (about 1 MB); create one with `spatialid encode`"
            ) from None
        return cls.from_bytes(data, source=str(path), device=device, dtype=dtype)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        source: str = "<bytes>",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> IdentityEmbedding:
        from safetensors.torch import load

        meta = _safetensors_metadata(data, source)
        if meta.get("format") != EMBEDDING_FORMAT:
            raise CheckpointError(
                f"{source} is not a spatialid identity embedding (format={meta.get('format')!r}); "
                "create one with `spatialid encode`"
            )
        if meta.get("format_version") != EMBEDDING_FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has identity-embedding format version {meta.get('format_version')!r}, this spatialid "
                f"reads version {EMBEDDING_FORMAT_VERSION}; re-encode the photo with this version"
            )
        try:
            tensors = load(data)
        except Exception as exc:
            raise CheckpointError(f"{source} is damaged: {exc}") from exc
        for key in ("tokens", "uncond_tokens"):
            if key not in tensors:
                raise CheckpointError(f"{source} has no '{key}' tensor; re-encode the photo with `spatialid encode`")
        box = tensors.get("face_box")
        face = tensors.get("aligned_face")
        if face is not None and (face.ndim != 3 or face.shape[-1] != 3 or face.dtype != torch.uint8):
            raise CheckpointError(
                f"{source} is not a valid identity embedding: its aligned face is {tuple(face.shape)} "
                f"{str(face.dtype).replace('torch.', '')}, expected [H, W, 3] uint8; re-encode the photo with `spatialid encode`"
            )
        _check_token_count(tensors["tokens"], meta, source)
        count = meta.get("num_images", "1")
        if not (count.isascii() and count.isdigit() and 1 <= int(count[:6]) and len(count) <= 6):
            raise CheckpointError(f"{source} records {count[:20]!r} photos (num_images), not a count; "
                                  "re-encode the photo with `spatialid encode`")
        try:
            emb = cls(
                tokens=tensors["tokens"].to(device=device, dtype=dtype),
                uncond_tokens=tensors["uncond_tokens"].to(device=device, dtype=dtype),
                face_box=tuple(box.tolist()) if box is not None and box.numel() == 4 else None,
                aligned_face=Image.fromarray(face.numpy()) if face is not None and face.ndim == 3 else None,
                metadata=meta,
            )
        except ValueError as exc:
            raise CheckpointError(f"{source} is not a valid identity embedding: {exc}") from exc
        return emb

    def __repr__(self) -> str:
        return (
            f"IdentityEmbedding(tokens={tuple(self.tokens.shape)} {str(self.tokens.dtype).replace('torch.', '')}, "
            f"num_images={self.num_images}, face_box={self.face_box}, "
            f"encoder={self.metadata.get('encoder', '?')!r})"
        )


def _check_token_count(tokens: torch.Tensor, meta: Mapping[str, str], source: str) -> None:
    """Tokens must number what the recorded IDFormer produces (``num_queries``), when it is recorded."""
    import json

    try:
        expected = int(json.loads(meta.get("idformer_config") or "{}").get("num_queries", 0))
    except (ValueError, TypeError, AttributeError):
        expected = 0
    if expected and tokens.ndim == 3 and tokens.shape[1] != expected:
        raise CheckpointError(
            f"{source} holds {tokens.shape[1]} identity tokens but its IDFormer makes {expected}; the file is "
            "damaged or edited: re-encode the photo with `spatialid encode`"
        )


def _safetensors_metadata(data: bytes, source: str) -> Mapping[str, str]:
    """Parse the safetensors header (8-byte length + JSON) without loading tensors."""
    import json
    import struct

    if len(data) < 8:
        raise CheckpointError(f"{source} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n <= 0 or 8 + n > len(data):
        raise CheckpointError(f"{source} is not a safetensors file (bad header); create it with `spatialid encode`")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError, 5000-digit numbers, deep nesting
        raise CheckpointError(f"{source} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source} is not a safetensors file (bad header)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{source} is not a safetensors file (its metadata is not text); create it with `spatialid encode`")
    return meta
