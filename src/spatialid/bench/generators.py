"""``generate_fn`` / ``encode_fn`` for the bench loop, backed by :class:`~spatialid.SpatialIDPipeline`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from spatialid.bench.grid import BenchItem
from spatialid.bench.runner import BenchSettings

__all__ = ["PipelineGenerator", "embedding_io"]


class PipelineGenerator:
    """Calls the pipeline for one bench item.

    Seeds go through the pipeline's ``seed`` argument (a CPU ``torch.Generator``), so an item's
    starting noise is the same on every machine, GPU and shard; the baseline (preset ``"none"``)
    is the same call without identity, which the pipeline guarantees to equal plain FLUX.
    """

    def __init__(self, pipe: Any, settings: BenchSettings, *, max_sequence_length: int | None = None) -> None:
        self.pipe = pipe
        self.settings = settings
        self.max_sequence_length = max_sequence_length

    @property
    def encoder_name(self) -> str:
        info = getattr(self.pipe, "model_info", None) or {}
        return f"{info.get('model', self.settings.model)}|{info.get('pulid', self.settings.pulid)}"

    def encode(self, photo: Path) -> Any:
        """Photo -> ``IdentityEmbedding`` with the pipeline's identity encoder."""
        return self.pipe.encode_identity(str(photo))

    def __call__(self, item: BenchItem, embedding: Any) -> Image.Image:
        settings = self.settings.for_item(item)
        if self.max_sequence_length is not None:
            settings = settings.replace(max_sequence_length=self.max_sequence_length)
        kwargs = settings.pipeline_kwargs()
        if item.is_baseline:
            kwargs["preset"] = None  # no identity: the plain FLUX path
            kwargs["schedule_overrides"] = None
        out = self.pipe(id_embeds=None if item.is_baseline else embedding, **kwargs)
        return out.images[0]


def embedding_io() -> tuple[Any, Any]:
    """``(save_fn, load_fn)`` for :class:`~spatialid.encoder.IdentityEmbedding` cache files."""
    from spatialid.encoder.embedding import IdentityEmbedding

    def save(obj: Any, path: Path) -> None:
        obj.save(path)

    def load(path: Path) -> Any:
        return IdentityEmbedding.load(path)

    return save, load
