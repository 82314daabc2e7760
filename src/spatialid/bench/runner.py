"""The benchmark loop: generate every missing item, record it atomically, survive failures and Ctrl-C.

The loop does not know about models: it takes ``generate_fn(item, embedding) -> PIL.Image`` and
``encode_fn(photo_path) -> embedding`` (see :mod:`spatialid.bench.generators` for the ones backed by
:class:`~spatialid.SpatialIDPipeline`), so resuming, sharding and atomic writing are tested with a
fake generator in milliseconds, and a different method could be benchmarked with the same loop.

Guarantees:

* Resume: an item whose results entry exists and whose image is on disk is skipped; an image left
  on disk by a run killed between writing the image and the JSON is adopted (its PNG metadata
  names its item key and settings) instead of being generated again.
* Ctrl-C / crash: images and JSON are replaced atomically, so at most the image in progress is lost.
* A failing item (no face in the photo, out of memory, ...) is recorded with its error under
  ``failures`` in its preset's results file and the run goes on; a re-run retries it.
* Identity embeddings are encoded once per photo and cached in ``OUT/embeddings/`` (safetensors),
  keyed by the photo's content hash and the encoder's name.
* Baselines (preset ``"none"``) with the same rendered prompt and seed are one image: it is
  generated once and re-saved for the other identities (with their own metadata).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from spatialid.bench.datasets import Identity
from spatialid.bench.grid import BASELINE_PRESET, BenchItem
from spatialid.bench.results import PresetResults

__all__ = [
    "BenchSettings",
    "BenchSummary",
    "EmbeddingCache",
    "EncodeFn",
    "GenerateFn",
    "consolidate",
    "pending_items",
    "run_bench",
]

log = logging.getLogger("spatialid.bench")

GenerateFn = Callable[[BenchItem, Any], Image.Image]
EncodeFn = Callable[[Path], Any]


@dataclass(frozen=True)
class BenchSettings:
    """Everything besides the grid that decides an image; stored in ``bench.json`` and checked on resume."""

    model: str = "black-forest-labs/FLUX.1-dev"
    pulid: str | None = None
    steps: int = 25
    width: int = 896
    height: int = 1152
    guidance: float = 4.0
    id_weight: float = 1.0
    true_cfg: float = 1.0
    start_step: int = 0
    negative_prompt: str = ""
    dtype: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d


@dataclass
class BenchSummary:
    """What one call of :func:`run_bench` did (this process only)."""

    total: int = 0  # items assigned to this process
    already_done: int = 0
    generated: int = 0
    reused: int = 0  # baseline copies and adopted orphan images
    failed: int = 0
    interrupted: bool = False
    generation_seconds: float = 0.0
    wall_seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float | None:
        return self.generation_seconds / self.generated if self.generated else None

    def line(self) -> str:
        spi = self.seconds_per_image
        timing = f", {spi:.2f} s/image" if spi is not None else ""
        state = "interrupted" if self.interrupted else "done"
        return (
            f"bench {state}: {self.generated} generated, {self.reused} reused, {self.already_done} already done, "
            f"{self.failed} failed of {self.total} items{timing} ({self.wall_seconds:.1f} s)"
        )


# ------------------------------------------------------------------------------- embedding cache


def _save_tensor(obj: Any, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    if hasattr(obj, "save") and not isinstance(obj, torch.Tensor):
        obj.save(path)
        return
    tmp = path.with_name(f".{path.name}.part")
    save_file({"embedding": obj.detach().to("cpu").contiguous()}, str(tmp))
    tmp.replace(path)


def _load_tensor(path: Path) -> Any:
    from safetensors.torch import load_file

    return load_file(str(path))["embedding"]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EmbeddingCache:
    """Encode each identity photo once; keep the result in memory and as safetensors on disk.

    The file name carries a hash of the photo bytes and ``encoder_name``, so a changed photo or
    another encoder never reuses a stale embedding. An encoding error is remembered too, so a photo
    without a face fails each of its items at once instead of being re-encoded for every item.
    """

    def __init__(
        self,
        folder: str | Path,
        encode_fn: EncodeFn,
        *,
        encoder_name: str = "",
        save_fn: Callable[[Any, Path], None] = _save_tensor,
        load_fn: Callable[[Path], Any] = _load_tensor,
    ) -> None:
        self.folder = Path(folder)
        self.encode_fn = encode_fn
        self.encoder_name = encoder_name
        self.save_fn = save_fn
        self.load_fn = load_fn
        self._memory: dict[str, Any] = {}
        self._errors: dict[str, BaseException] = {}
        self.encoded = 0
        self.loaded = 0

    def path_for(self, identity: Identity) -> Path:
        digest = hashlib.sha256(f"{file_sha256(identity.path)}|{self.encoder_name}".encode()).hexdigest()[:16]
        return self.folder / f"{identity.key}-{digest}.safetensors"

    def get(self, identity: Identity) -> Any:
        if identity.key in self._memory:
            return self._memory[identity.key]
        if identity.key in self._errors:
            raise self._errors[identity.key]
        try:
            path = self.path_for(identity)
            if path.is_file():
                try:
                    value = self.load_fn(path)
                    self.loaded += 1
                except Exception as exc:  # damaged cache file: encode again
                    log.warning("embedding cache %s unreadable (%s); encoding again", path.name, exc)
                    value = self._encode(identity, path)
            else:
                value = self._encode(identity, path)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            self._errors[identity.key] = exc
            raise
        self._memory[identity.key] = value
        return value

    def _encode(self, identity: Identity, path: Path) -> Any:
        value = self.encode_fn(identity.path)
        self.encoded += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.save_fn(value, path)
        except OSError as exc:  # cache is an optimisation: a full disk must not fail the item
            log.warning("could not cache embedding %s: %s", path.name, exc)
        return value


# ------------------------------------------------------------------------------------------ loop


def image_metadata(item: BenchItem, settings: BenchSettings) -> dict[str, Any]:
    """PNG text metadata of a bench image: the generation settings plus the item it belongs to.

    Deterministic (no time stamps), so the same item gives byte-identical files in any shard.
    """
    from spatialid import __version__

    meta: dict[str, Any] = {
        "prompt": item.prompt_text,
        "seed": item.seed,
        "preset": item.preset,
        "steps": settings.steps,
        "width": settings.width,
        "height": settings.height,
        "guidance": settings.guidance,
        "id_weight": 0.0 if item.is_baseline else settings.id_weight,
        "true_cfg": settings.true_cfg,
        "start_step": settings.start_step,
        "negative_prompt": settings.negative_prompt,
        "model": settings.model,
        "pulid": settings.pulid,
        "version": __version__,
        "bench_key": item.key,
        "identity": None if item.is_baseline else item.identity.id,
        "baseline_for": item.identity.id if item.is_baseline else None,
    }
    schedule = _schedule_dict(item.preset)
    if schedule is not None:
        meta["schedule"] = schedule
    return meta


def _schedule_dict(preset: str) -> dict[str, Any] | None:
    if preset == BASELINE_PRESET:
        return None
    try:
        from spatialid.masks import PRESETS
    except Exception:  # pragma: no cover - masks are part of the package
        return None
    sched = PRESETS.get(preset)
    return sched.to_dict() if sched is not None and hasattr(sched, "to_dict") else None


def _adoptable(path: Path, item: BenchItem, settings: BenchSettings) -> bool:
    """An image on disk that a killed run wrote for exactly this item and these settings."""
    if not path.is_file():
        return False
    try:
        from spatialid.pipeline.metadata import read_png_metadata

        meta = read_png_metadata(path)
    except Exception:
        return False
    expected = image_metadata(item, settings)
    keys = ("bench_key", "prompt", "seed", "steps", "width", "height", "model", "pulid", "guidance", "id_weight")
    return all(meta.get(k) == expected.get(k) for k in keys)


def _tags(preset: str, settings: BenchSettings) -> dict[str, Any]:
    from spatialid import __version__

    return {
        "category": "imageid",
        "method": "spatialid",
        "preset": preset,
        "identity": preset != BASELINE_PRESET,
        "spatialid_version": __version__,
        "settings": settings.to_dict(),
    }


def run_bench(
    items: Sequence[BenchItem],
    out_dir: str | Path,
    *,
    settings: BenchSettings,
    generate_fn: GenerateFn,
    encode_fn: EncodeFn | None = None,
    embeddings: EmbeddingCache | None = None,
    encoder_name: str = "",
    part: int | None = None,
    progress: bool = True,
    desc: str = "bench",
) -> BenchSummary:
    """Generate the missing ``items`` into ``out_dir`` (see the module docstring for guarantees).

    ``part``: None for a single process; the process index under ``accelerate launch`` (each
    process then writes its own results part file). Raises KeyboardInterrupt after saving state
    when interrupted; the summary of work done is logged.
    """
    from spatialid.pipeline.metadata import save_png_with_metadata

    started = time.perf_counter()
    out = Path(out_dir)
    summary = BenchSummary(total=len(items))
    if embeddings is None and encode_fn is not None:
        embeddings = EmbeddingCache(out / "embeddings", encode_fn, encoder_name=encoder_name)

    stores: dict[str, PresetResults] = {}

    def store_for(preset: str) -> PresetResults:
        if preset not in stores:
            stores[preset] = PresetResults(out, preset, tags=_tags(preset, settings), part=part)
        return stores[preset]

    # Baseline images already on disk, by (rendered prompt, seed).
    baseline_files: dict[tuple[str, int], Path] = {}
    todo: list[BenchItem] = []
    for item in items:
        store = store_for(item.preset)
        if store.is_done(item):
            summary.already_done += 1
            if item.is_baseline:
                baseline_files.setdefault(item.baseline_group, store.image_path(item))
            continue
        todo.append(item)

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)
    try:
        for item in todo:
            store = store_for(item.preset)
            path = store.image_path(item)
            try:
                if _adoptable(path, item, settings):
                    store.record_success(item, path)
                    summary.reused += 1
                else:
                    image = None
                    source = baseline_files.get(item.baseline_group) if item.is_baseline else None
                    if source is not None and source.is_file():
                        with Image.open(source) as img:
                            image = img.convert("RGB")
                        summary.reused += 1
                    else:
                        embedding = None
                        if not item.is_baseline:
                            if embeddings is None:
                                raise RuntimeError("no identity encoder given for a preset with identity")
                            embedding = embeddings.get(item.identity)
                        t0 = time.perf_counter()
                        image = generate_fn(item, embedding)
                        if not isinstance(image, Image.Image):
                            raise TypeError(f"generate_fn returned {type(image).__name__}, expected a PIL image")
                        summary.generation_seconds += time.perf_counter() - t0
                        summary.generated += 1
                    save_png_with_metadata(image, path, image_metadata(item, settings))
                    store.record_success(item, path)
                if item.is_baseline:
                    baseline_files.setdefault(item.baseline_group, path)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                fail = store.record_failure(item, exc)
                summary.failed += 1
                summary.failures.append(fail)
                log.warning("item %s failed: %s", item.key, fail["error"])
            if bar is not None:
                bar.update(1)
                if summary.failed:
                    bar.set_postfix(failed=summary.failed, refresh=False)
    except KeyboardInterrupt:
        summary.interrupted = True
        summary.wall_seconds = time.perf_counter() - started
        log.warning("%s; re-run the same command to resume", summary.line())
        raise
    finally:
        if bar is not None:
            bar.close()
    summary.wall_seconds = time.perf_counter() - started
    return summary


def pending_items(out_dir: str | Path, items: Sequence[BenchItem]) -> list[BenchItem]:
    """Items not finished yet (read-only: no file is written), to decide whether to load a model."""
    from spatialid.bench.results import load_preset_results

    out = Path(out_dir)
    done: dict[str, dict[str, dict]] = {}
    pending = []
    for item in items:
        if item.preset not in done:
            folder = out / item.preset
            done[item.preset] = load_preset_results(folder)[0] if folder.is_dir() else {}
        entry = done[item.preset].get(item.key)
        if entry is None or not (out / item.preset / entry.get("image", "")).is_file():
            pending.append(item)
    return pending


def consolidate(out_dir: str | Path, presets: Sequence[str], settings: BenchSettings) -> None:
    """Fold the part files of a finished multi-process run into each preset's ``results.json``."""
    for preset in presets:
        if (Path(out_dir) / preset).is_dir():
            PresetResults(out_dir, preset, tags=_tags(preset, settings), part=None)
