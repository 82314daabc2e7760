"""``generate_fn`` / ``encode_fn`` for the bench loop, backed by :class:`~spatialid.SpatialIDPipeline`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from spatialid.bench.datasets import region_boxes
from spatialid.bench.grid import BenchItem
from spatialid.bench.results import masks_file
from spatialid.bench.runner import BenchSettings

__all__ = ["PipelineGenerator", "embedding_io"]


class PipelineGenerator:
    """Calls the pipeline for one bench item.

    Seeds go through the pipeline's ``seed`` argument (a CPU ``torch.Generator``), so an item's
    starting noise is the same on every machine, GPU and shard; the baseline (preset ``"none"``)
    is the same call without identity, which the pipeline guarantees to equal plain FLUX.
    """

    def __init__(
        self,
        pipe: Any,
        settings: BenchSettings,
        *,
        max_sequence_length: int | None = None,
        out_dir: str | Path | None = None,
    ) -> None:
        self.pipe = pipe
        self.settings = settings
        self.max_sequence_length = max_sequence_length
        self.out_dir = Path(out_dir) if out_dir is not None else None
        from spatialid.pipeline.generate import TruncationNotice

        # one warning per run, not per image, with advice the bench accepts (it has no T5-length flag)
        self.truncation = TruncationNotice(
            "the bench has no T5-length option: it keeps the protocol's length, 128 with FLUX.1 as in the authors' "
            "script; shorten the prompts"
        )

    def masks_path(self, item: BenchItem) -> Path | None:
        """Where a group item with regions keeps its people's masks (eval's "mask in region" column)."""
        if self.out_dir is None or not item.identity.is_group or region_boxes(item.identity.regions) is None:
            return None
        return masks_file(self.out_dir / item.preset / "images" / item.image_name)

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
        with self.truncation:
            return self._generate(item, embedding, kwargs)

    def _generate(self, item: BenchItem, embedding: Any, kwargs: dict[str, Any]) -> Image.Image:
        words = list(getattr(item, "people_words", ()) or ())
        if any(words) and not item.is_baseline:  # XVerseBench's use_words: (embedding, "man#2") per bound person
            people = embedding if isinstance(embedding, list) else [embedding]
            embedding = [(e, f"{w[0]}#{w[1]}") if w else e for e, w in zip(people, words)]
        if isinstance(embedding, list) and not item.is_baseline:  # a group: one embedding per person
            regions = region_boxes(item.identity.regions)
            target = self.masks_path(item)
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
            out = self.pipe(people=embedding, regions=regions, save_masks=target, **kwargs)
        else:
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
