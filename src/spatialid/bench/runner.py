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
* One run per folder: the folder is locked for the whole run (:mod:`spatialid.bench.lock`); a
  second run on it stops at once naming the PID that holds it. Holding it exclusively, a run
  removes the temporary files a killed run left.
* A recorded image that is no longer a whole PNG is generated again (:mod:`spatialid.bench.integrity`).
* A generated image that is constant or non-finite (NaN identity tokens, NaN latents) is a failed
  item; cached identity tokens that are not finite are encoded again.
* A full disk (ENOSPC) stops the run at the first failed write with an
  :class:`~spatialid.utils.io.OutputPathError` saying how much space the rest needs; every results
  file on disk then matches the images that were written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from spatialid import defaults as D
from spatialid.bench.datasets import Identity
from spatialid.bench.grid import BASELINE_PRESET, BenchItem
from spatialid.bench.integrity import (
    check_embedding,
    check_generated_image,
    damaged_images,
    png_decode_problem,
    png_header_problem,
)
from spatialid.bench.lock import bench_lock
from spatialid.bench.results import PresetResults
from spatialid.pipeline.settings import GenerationSettings
from spatialid.utils.io import OutputPathError, remove_temp_files

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


_BENCH = D.size_steps("bench", tiny=False)


@dataclass(frozen=True)
class BenchSettings:
    """Everything besides the grid that decides an image; stored in ``bench.json`` and checked on resume.

    ``generation`` is the one settings record (prompt, seed and preset are filled per item).
    """

    model: str = D.DEFAULT_FLUX_MODEL
    pulid: str | None = None
    generation: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(width=_BENCH.width, height=_BENCH.height, steps=_BENCH.steps)
    )
    dtype: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Flat keys (the layout of ``bench.json`` since 0.1.0, so older runs still resume)."""
        g = self.generation
        return {
            "model": self.model,
            "pulid": self.pulid,
            "steps": g.steps,
            "width": g.width,
            "height": g.height,
            "guidance": g.guidance,
            "id_weight": g.id_weight,
            "true_cfg": g.true_cfg,
            "start_step": g.start_step,
            "negative_prompt": g.negative_prompt,
            "dtype": self.dtype,
            "extra": dict(self.extra),
            # added after 0.1.0: written only when set, so earlier runs keep resuming
            **({"schedule_overrides": dict(g.schedule_overrides)} if g.schedule_overrides else {}),
            **({"noise": g.noise} if g.noise != D.DEFAULT_NOISE else {}),
        }

    def for_item(self, item: BenchItem) -> GenerationSettings:
        """The settings record of one item (a baseline has no identity: weight 0)."""
        return self.generation.replace(
            prompt=item.prompt_text,
            seed=item.seed,
            preset=item.preset,
            id_weight=0.0 if item.is_baseline else self.generation.id_weight,
        )


@dataclass
class BenchSummary:
    """What one call of :func:`run_bench` did (this process only)."""

    total: int = 0  # items assigned to this process
    already_done: int = 0
    generated: int = 0
    reused: int = 0  # baseline copies and adopted orphan images
    failed: int = 0
    damaged: int = 0  # recorded images that were no longer whole PNGs (generated again)
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
        repaired = f", {self.damaged} damaged images redone" if self.damaged else ""
        return (
            f"bench {state}: {self.generated} generated, {self.reused} reused, {self.already_done} already done, "
            f"{self.failed} failed of {self.total} items{timing}{repaired} ({self.wall_seconds:.1f} s)"
        )


# ------------------------------------------------------------------------------- embedding cache


def _save_tensor(obj: Any, path: Path) -> None:
    import torch
    from safetensors.torch import save

    from spatialid.utils.io import atomic_write_bytes

    if hasattr(obj, "save") and not isinstance(obj, torch.Tensor):
        obj.save(path)
        return
    atomic_write_bytes(path, save({"embedding": obj.detach().to("cpu").contiguous()}))


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
    another encoder never reuses a stale embedding. A photo under several keys (XVerseBench gives each
    item its own) is encoded once per run; an encoding error is remembered too, so a photo without a
    face fails each of its items at once instead of being re-encoded for every item.
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
        self._digests: dict[Path, str] = {}
        self._by_photo: dict[str, Any] = {}  # photo digest -> embedding or the error its encoding raised
        self.encoded = 0
        self.loaded = 0

    def _digest(self, identity: Identity) -> str:
        """Hash of the photo's bytes and the encoder (read once per photo path and run)."""
        digest = self._digests.get(identity.path)
        if digest is None:
            digest = hashlib.sha256(f"{file_sha256(identity.path)}|{self.encoder_name}".encode()).hexdigest()[:16]
            self._digests[identity.path] = digest
        return digest

    def path_for(self, identity: Identity) -> Path:
        return self.folder / f"{identity.key}-{self._digest(identity)}.safetensors"

    def get(self, identity: Identity) -> Any:
        """The identity's embedding; for a group of people, the list of its members' embeddings."""
        if identity.is_group:
            return [self.get(member) for member in identity.members]
        if identity.key in self._memory:
            return self._memory[identity.key]
        if identity.key in self._errors:
            raise self._errors[identity.key]
        try:
            path = self.path_for(identity)
            known = self._by_photo.get(self._digest(identity))
            if isinstance(known, BaseException):  # the same photo failed under another key
                raise known
            if known is not None:
                self._memory[identity.key] = known
                return known
            if path.is_file():
                try:
                    value = self.load_fn(path)
                    check_embedding(value)  # NaN/Inf tokens would give black images recorded as results
                    self.loaded += 1
                except Exception as exc:  # damaged cache file: encode again
                    log.warning("embedding cache %s unusable (%s); encoding again", path.name, exc)
                    value = self._encode(identity, path)
            else:
                value = self._encode(identity, path)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            self._errors[identity.key] = exc
            if identity.path in self._digests:
                self._by_photo[self._digests[identity.path]] = exc
            raise
        self._memory[identity.key] = value
        self._by_photo[self._digest(identity)] = value
        return value

    def _encode(self, identity: Identity, path: Path) -> Any:
        value = self.encode_fn(identity.path)
        self.encoded += 1
        try:
            check_embedding(value)
        except ValueError as exc:  # never cached: a later run encodes again
            raise ValueError(f"encoding {identity.path.name} gave unusable tokens: {exc}") from None
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
        **settings.for_item(item).to_dict(),
        "model": settings.model,
        "pulid": settings.pulid,
        "version": __version__,
        "bench_key": item.key,
        "identity": None if item.is_baseline else item.identity.id,
        "baseline_for": item.identity.id if item.is_baseline else None,
    }
    if item.identity.is_group and not item.is_baseline:
        meta["people"] = [m.id for m in item.identity.members]
        if item.identity.regions:
            meta["regions"] = [list(r) if r is not None else None for r in item.identity.regions]
    schedule = _schedule_dict(item.preset, settings.generation.schedule_overrides)
    if schedule is not None:
        meta["schedule"] = schedule
    return meta


def _schedule_dict(preset: str, overrides: Mapping[str, float] | None = None) -> dict[str, Any] | None:
    """The schedule an item's image was made with (its preset plus the run's overrides)."""
    if preset == BASELINE_PRESET:
        return None
    from spatialid.masks import PRESETS, apply_overrides

    sched = PRESETS.get(preset)
    if sched is None:
        return None
    return apply_overrides(sched, overrides).to_dict()


def _adoptable(path: Path, item: BenchItem, settings: BenchSettings) -> bool:
    """An image on disk that a killed run wrote for exactly this item and these settings, whole."""
    if not path.is_file():
        return False
    try:
        from spatialid.app.metadata import read_png_metadata

        meta = read_png_metadata(path)
    except Exception:
        return False
    expected = image_metadata(item, settings)
    keys = ("bench_key", "prompt", "seed", "steps", "width", "height", "model", "pulid", "guidance", "id_weight")
    if not all(meta.get(k) == expected.get(k) for k in keys):
        return False
    # the text chunks come before the pixels: a file cut short can still carry its metadata
    return png_header_problem(path) is None and png_decode_problem(path) is None


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
    paths: str = "absolute",
    progress: bool = True,
    desc: str = "bench",
) -> BenchSummary:
    """Generate the missing ``items`` into ``out_dir`` (see the module docstring for guarantees).

    ``part``: None for a single process; the process index under ``accelerate launch`` (each
    process then writes its own results part file). ``paths``: how the results write image paths
    for IBench (``absolute`` or ``relative`` to the current folder). Raises KeyboardInterrupt after
    saving state when interrupted; the summary of work done is logged. Raises
    :class:`~spatialid.bench.lock.FolderInUseError` when another run holds the folder and
    :class:`~spatialid.utils.io.OutputPathError` when the disk is full.
    """
    out = Path(out_dir)
    with bench_lock(out, part) as lock:
        if lock.exclusive and lock.depth == 1:  # a caller holding the lock has cleaned already
            clean_temp_files(out)
        return _run_locked(
            items, out, settings=settings, generate_fn=generate_fn, encode_fn=encode_fn, embeddings=embeddings,
            encoder_name=encoder_name, part=part, paths=paths, progress=progress, desc=desc,
        )


def clean_temp_files(out_dir: str | Path) -> int:
    """Remove the temporary files a killed run left in the bench folder; returns how many.

    Call only while holding the folder exclusively (another writer's temporary file is in use).
    Looks only where the bench writes: the folder, ``embeddings/``, and each preset folder and its
    ``images/``.
    """
    out = Path(out_dir)
    folders = [out]
    try:
        subdirs = [d for d in out.iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        subdirs = []
    for d in subdirs:
        folders += [d, d / "images"]
    count, size = remove_temp_files(folders)
    if count:
        log.info("removed %d temporary files (%s) left by an interrupted run", count, _size_text(size))
    return count


def _size_text(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception's chain (writers wrap OS errors)."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full_error(
    exc: BaseException, out: Path, *, left: int, written: list[int], recorded: Sequence[Path], settings: BenchSettings
) -> OutputPathError:
    """One line: where the disk filled, how much room the items left need, what to do."""
    import shutil

    sizes = list(written)
    if not sizes:  # nothing written this run: the images already in the folder tell the size
        for p in list(recorded)[-50:]:
            try:
                sizes.append(p.stat().st_size)
            except OSError:
                pass
    g = settings.generation
    per = sum(sizes) / len(sizes) if sizes else g.width * g.height * 3  # uncompressed: an upper bound
    try:
        free = f", {_size_text(shutil.disk_usage(out).free)} free"
    except OSError:
        free = ""
    where = getattr(exc, "filename", None) or out
    return OutputPathError(
        f"no space left on device writing {where}: stopped with {left} items left, which need about "
        f"{_size_text(per * left)} ({_size_text(per)} per image{free}); the results written so far are saved; "
        "free some space (or move --out) and re-run the same command to resume"
    )


def _run_locked(
    items: Sequence[BenchItem],
    out: Path,
    *,
    settings: BenchSettings,
    generate_fn: GenerateFn,
    encode_fn: EncodeFn | None,
    embeddings: EmbeddingCache | None,
    encoder_name: str,
    part: int | None,
    paths: str,
    progress: bool,
    desc: str,
) -> BenchSummary:
    from spatialid.app.metadata import save_png_with_metadata

    started = time.perf_counter()
    summary = BenchSummary(total=len(items))
    if embeddings is None and encode_fn is not None:
        embeddings = EmbeddingCache(out / "embeddings", encode_fn, encoder_name=encoder_name)

    stores: dict[str, PresetResults] = {}

    def store_for(preset: str) -> PresetResults:
        if preset not in stores:
            stores[preset] = PresetResults(out, preset, tags=_tags(preset, settings), part=part, paths=paths)
        return stores[preset]

    # Recorded images must still be whole PNGs to count as done.
    recorded: dict[str, Path] = {}
    for item in items:
        store = store_for(item.preset)
        path = store.recorded_image(item)
        if path is not None and path.is_file():
            recorded[item.key] = path
    damaged = damaged_images(recorded.values())
    if damaged:
        first, reason = next(iter(damaged.items()))
        log.warning(
            "%d of %d recorded images are damaged (first: %s: %s); generating them again",
            len(damaged), len(recorded), first.name, reason,
        )

    # Baseline images already on disk, by (rendered prompt, seed).
    baseline_files: dict[tuple[str, int], Path] = {}
    todo: list[BenchItem] = []
    stale: set[str] = set()  # presets whose results file must be rewritten (today's format, damaged entries)
    for item in items:
        store = store_for(item.preset)
        path = recorded.get(item.key)
        if path is not None and path not in damaged:
            summary.already_done += 1
            if store.refresh(item):
                stale.add(item.preset)
            if item.is_baseline:
                baseline_files.setdefault(item.baseline_group, path)
            continue
        if path is not None:
            summary.damaged += 1
            if store.forget(item):
                stale.add(item.preset)
        todo.append(item)
    for preset in stale:
        stores[preset].write()

    written: list[int] = []  # sizes of the images this run wrote (for the space a full disk needs)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)
    try:
        for index, item in enumerate(todo):
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
                        check_generated_image(image)  # a blank (NaN) picture is a failure, not a result
                        summary.generation_seconds += time.perf_counter() - t0
                        summary.generated += 1
                    save_png_with_metadata(image, path, image_metadata(item, settings))
                    with contextlib.suppress(OSError):
                        written.append(os.stat(path).st_size)
                    store.record_success(item, path)
                if item.is_baseline:
                    baseline_files.setdefault(item.baseline_group, path)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                if _is_disk_full(exc):  # every later item would fail the same way
                    raise _disk_full_error(
                        exc, out, left=len(todo) - index, written=written, recorded=list(recorded.values()), settings=settings
                    ) from None
                try:
                    fail = store.record_failure(item, exc)
                except OSError as write_exc:
                    if _is_disk_full(write_exc):
                        raise _disk_full_error(
                            write_exc, out, left=len(todo) - index, written=written,
                            recorded=list(recorded.values()), settings=settings,
                        ) from None
                    raise
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
        for store in stores.values():  # baselines made in this run, after entries that need them
            if store.link_baselines():
                try:
                    store.write()
                except OSError as exc:  # a full disk: the next run links them (the files are consistent)
                    if not _is_disk_full(exc):
                        raise
                    log.warning("could not update %s: %s", store.path, exc.strerror or exc)
    summary.wall_seconds = time.perf_counter() - started
    return summary


def pending_items(out_dir: str | Path, items: Sequence[BenchItem]) -> list[BenchItem]:
    """Items not finished yet (read-only: no file is written), to decide whether to load a model.

    A recorded image that is no longer a whole PNG is pending (see :func:`damaged_images`).
    """
    from spatialid.bench.results import load_preset_results

    out = Path(out_dir)
    done: dict[str, dict[str, dict]] = {}
    pending = []
    recorded: dict[str, Path] = {}
    for item in items:
        if item.preset not in done:
            folder = out / item.preset
            done[item.preset] = load_preset_results(folder)[0] if folder.is_dir() else {}
        entry = done[item.preset].get(item.key)
        path = out / item.preset / entry.get("image", "") if entry is not None else None
        if entry is None or entry.get("prompt") != item.prompt_text or not path.is_file():
            pending.append(item)
        else:
            recorded[item.key] = path
    damaged = damaged_images(recorded.values())
    if damaged:
        pending = [it for it in items if it.key not in recorded or recorded[it.key] in damaged]
    return pending


def consolidate(
    out_dir: str | Path,
    presets: Sequence[str],
    settings: BenchSettings,
    *,
    paths: str = "absolute",
    items: Sequence[BenchItem] = (),
) -> None:
    """Fold the part files of a finished multi-process run into each preset's ``results.json``.

    Also brings every results file to today's format: the finished ``items`` get their entries
    rewritten (identities-file order, ``id_path``) and every entry its ``imagewithoutid``.
    """
    by_preset: dict[str, list[BenchItem]] = {}
    for item in items:
        by_preset.setdefault(item.preset, []).append(item)
    for preset in presets:
        if (Path(out_dir) / preset).is_dir():
            store = PresetResults(out_dir, preset, tags=_tags(preset, settings), part=None, paths=paths)
            changed = False
            for item in by_preset.get(preset, ()):
                if store.is_done(item):
                    changed = store.refresh(item) or changed
            if store.link_baselines() or changed:
                store.write()
