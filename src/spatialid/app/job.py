"""One generation job, as ``spatialid generate``, the demo and the web UI run it.

A :class:`GenerationJob` is the settings record (:class:`~spatialid.pipeline.settings.GenerationSettings`)
plus what to write: the output file names, the mask pictures, the comparison grid. :func:`run_job`
checks that every file can be written *before* any model runs, calls the pipeline, and writes each
file atomically with its settings as PNG metadata.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from spatialid.app.metadata import IMAGE_FORMATS, save_image_with_metadata, save_png_with_metadata
from spatialid.errors import SpatialIDError
from spatialid.pipeline.settings import GenerationSettings
from spatialid.utils.io import OutputPathError, check_writable

__all__ = [
    "GenerationFailedError",
    "GenerationJob",
    "JobResult",
    "check_outputs",
    "claim_output",
    "compare_order",
    "compare_path",
    "default_output_path",
    "image_paths",
    "masks_path",
    "planned_paths",
    "record_input_paths",
    "release_outputs",
    "run_job",
]


class GenerationFailedError(SpatialIDError, RuntimeError):
    """The pipeline ran but its result is unusable (e.g. NaN/Inf turned the image into one colour)."""


@dataclass
class GenerationJob:
    """Everything one generation asks for (already validated): settings plus outputs."""

    settings: GenerationSettings
    out: Path
    masks: bool = False
    compare: list[str] | None = None
    identity_files: list[str] = field(default_factory=list)
    identity_source: str | None = None  # "image" | "embeds" | None
    reference_image: Image.Image | None = None  # shown first in the comparison grid
    overwrite: bool = False  # replace existing files instead of picking a free numbered name
    reserved: list[Path] = field(default_factory=list, repr=False)  # placeholders this job created
    # several people: each person's photo / identity file names, in order (the identity passed to
    # run_job is then a list with one IdentityEmbedding per person)
    people_files: list[list[str]] | None = None
    save_masks: Path | None = None  # write every person's recorded masks here (.safetensors)
    masks_from: Path | None = None  # replay the masks of such a file instead of computing them
    # where the input files were, so that ``--from-png`` finds them again (see record_input_paths);
    # None (front-ends without files on disk, e.g. uploads) writes no ``input_paths`` key
    input_paths: dict[str, Any] | None = None
    # the input files of this job's command: no output may replace one, even with ``overwrite``
    protected: tuple[Path, ...] = ()


@dataclass
class JobResult:
    images: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)
    compare: Path | None = None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    mask_file: Path | None = None  # the job's ``save_masks`` file, under the name it got

    @property
    def files(self) -> list[Path]:
        return [*self.images, *self.masks, *([self.compare] if self.compare else []),
                *([self.mask_file] if self.mask_file else [])]


def default_output_path(seed: int, folder: str | Path = "outputs", suffix: str = ".png") -> Path:
    """``outputs/spatialid-YYYYmmdd-HHMMSS-s<seed>.png``: never overwrites an earlier run by accident."""
    return Path(folder) / f"spatialid-{datetime.now():%Y%m%d-%H%M%S}-s{seed}{suffix}"


def image_paths(out: Path, num_images: int) -> list[Path]:
    """``out`` itself for one image; ``stem_0.png, stem_1.png, ...`` for several.

    An underscore, as ``_masks`` and ``_compare``: parts of one run. A dash and a number
    (``stem-2.png``) only ever means another run that found the name taken (see :func:`check_outputs`),
    so ``-n 2`` and a name collision can never be told apart wrongly.
    """
    if num_images == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(num_images)]


def masks_path(image_path: Path) -> Path:
    return image_path.with_name(f"{image_path.stem}_masks.png")


def compare_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_compare.png")


def planned_paths(job: GenerationJob) -> list[Path]:
    paths = image_paths(job.out, job.settings.num_images)
    if job.masks:
        paths += [masks_path(p) for p in image_paths(job.out, job.settings.num_images)]
    if job.compare:
        paths.append(compare_path(job.out))
    return paths


def check_outputs(job: GenerationJob, *, reserve: bool = True) -> list[Path]:
    """Refuse a target that is no PNG/JPEG/WebP name, prove every planned file can be written, and claim the names.

    Without ``overwrite`` the names are reserved create-exclusively (an empty placeholder per
    file, replaced by the atomic write later), so two runs started in the same second with the
    same seed, or an existing file, never lose an image: the job moves to the first free
    ``stem-2``, ``stem-3``, ... Called again for the same job, it returns the same names.
    ``reserve=False`` only checks (front-ends call that before loading models; :func:`run_job`
    reserves, and releases what it did not write when it fails).
    """
    if job.out.suffix.lower() not in IMAGE_FORMATS:
        raise OutputPathError(
            f"{job.out}: output must be a .png, .jpg, .jpeg or .webp file (the settings are stored in the image)"
        )
    if job.reserved:
        return planned_paths(job)
    for p in planned_paths(job) + ([job.save_masks] if job.save_masks else []):
        check_writable(p)
        _refuse_input(job, p)
    if job.overwrite or not reserve:
        return planned_paths(job)
    paths = _reserve_images(job)
    if job.save_masks is not None:
        job.save_masks = _reserve_one(job, job.save_masks)
    return paths


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _refuse_input(job: GenerationJob, path: Path) -> None:
    """An output that is one of the command's inputs is refused, ``overwrite`` or not (an identity photo is no output)."""
    for source in job.protected:
        if _same_file(Path(path), Path(source)):
            raise OutputPathError(
                f"{path} is also an input of this command; an output never replaces an input: choose another name"
            )


def claim_output(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """The name one output file will get: ``path`` itself with ``overwrite``, else ``path`` or the first free
    ``stem-2``, ``stem-3``, ... claimed create-exclusively (an empty placeholder the atomic write replaces).

    The rule of every output of every command (images, mask files, identity files): an existing file is
    kept unless the user said ``--overwrite``.
    """
    target = Path(path)
    check_writable(target)
    if overwrite:
        return target
    job = GenerationJob(settings=GenerationSettings(), out=target)
    return _reserve_one(job, target)


def _reserve_one(job: GenerationJob, path: Path) -> Path:
    """Claim ``path``, or the first free ``stem-2``, ``stem-3``, ... (create-exclusive, as the images' names)."""
    for number in range(1, 10_000):
        candidate = path if number == 1 else path.with_name(f"{path.stem}-{number}{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputPathError(f"cannot write {candidate}: {exc.strerror or exc}") from None
        job.reserved.append(candidate)
        _UNWRITTEN.add(candidate)
        return candidate
    raise OutputPathError(f"{path}: no free name (tried {path.stem}-2 ... {path.stem}-9999); choose another name")


def _reserve_images(job: GenerationJob) -> list[Path]:
    stem, base = job.out.stem, job.out
    for number in range(1, 10_000):
        job.out = base if number == 1 else base.with_name(f"{stem}-{number}{base.suffix}")
        paths = planned_paths(job)
        if any(p.exists() for p in paths):
            continue
        created: list[Path] = []
        try:
            for p in paths:
                os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                created.append(p)
        except FileExistsError:  # another process took one of them just now
            release_outputs(GenerationJob(settings=job.settings, out=job.out, reserved=created))
            continue
        except OSError as exc:
            raise OutputPathError(f"cannot write {paths[0]}: {exc.strerror or exc}") from None
        job.reserved = created
        _UNWRITTEN.update(created)
        return paths
    raise OutputPathError(f"{base}: no free output name (tried {stem}-2 ... {stem}-9999); choose another --out")


# every name reserved in this process and not yet released: a hard exit (a second Ctrl-C) removes the empty ones
_UNWRITTEN: set[Path] = set()


def release_unwritten() -> None:
    """Remove every placeholder this process reserved and never wrote (for an exit that skips clean-up)."""
    for p in list(_UNWRITTEN):
        with contextlib.suppress(OSError):
            if p.stat().st_size == 0:
                p.unlink()
    _UNWRITTEN.clear()


def release_outputs(job: GenerationJob) -> None:
    """Remove the placeholders of names this job reserved but never wrote (empty files only)."""
    for p in job.reserved:
        try:
            if p.stat().st_size == 0:
                p.unlink()
        except OSError:
            pass
    _UNWRITTEN.difference_update(job.reserved)
    job.reserved = []


def compare_order(preset: str, compare: Any) -> list[str]:
    """The presets of a comparison grid, left to right: the run's own preset first, then the others as given."""
    return [preset] + [name for name in compare if name != preset]


def _call(pipe: Any, settings: GenerationSettings, identity: Any, masks: bool, **extra: Any) -> Any:
    who = {"people": list(identity)} if isinstance(identity, (list, tuple)) else {"id_embeds": identity}
    return pipe(**who, return_masks=masks, **extra, **settings.pipeline_kwargs())


def _mask_files(job: GenerationJob) -> dict[str, Any]:
    """The pipeline's ``save_masks`` / ``masks_from`` arguments of this job (none when unset)."""
    files = {"save_masks": job.save_masks, "masks_from": job.masks_from}
    return {k: v for k, v in files.items() if v is not None}


_MISSING = object()


@contextlib.contextmanager
def _progress_label(pipe: Any, label: str | None) -> Any:
    """Name the pipeline's progress bar for one call (``preset 2/3 (pulid): denoising``), then restore it.

    A comparison makes one pipeline call per preset; without this the terminal shows several bars
    all named "denoising". Pipelines without diffusers' bar config are left alone.
    """
    config = getattr(pipe, "_progress_bar_config", None)
    if label is None or not isinstance(config, dict):
        yield
        return
    before = config.get("desc", _MISSING)
    config["desc"] = label
    try:
        yield
    finally:
        if before is _MISSING:
            config.pop("desc", None)
        else:
            config["desc"] = before


def _absolute(path: str | os.PathLike[str]) -> str:
    """The path as given, made absolute against the current folder (``~`` expanded, symlinks kept)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def record_input_paths(
    *,
    id_images: list[str] | None = None,
    id_embeds: str | None = None,
    people: list[list[str]] | None = None,
    people_embeds: list[str] | None = None,
    regions: list[Any] | None = None,
    init_image: str | None = None,
    inpaint_mask: str | None = None,
    control_image: str | None = None,
) -> dict[str, Any]:
    """The image metadata's ``input_paths``: every input file by absolute path, so ``--from-png`` finds it again.

    Keys are the ``generate`` flags' names (``id_images`` = ``--id``, ``id_embeds`` = ``--id-embeds``,
    ``people`` = ``--person`` (one list of photos per person), ``people_embeds`` = ``--person-embeds``,
    ``regions`` = ``--region``, ``init_image``, ``inpaint_mask``, ``control_image``); only the
    given ones are present. A region is a box ``[x0, y0, x1, y1]`` or a mask picture's path. The
    file *names* stay where they always were (``identity.files``, ``people``, ``regions``,
    ``init_image``, ...), so older readers and ``spatialid info`` are unchanged. Models, LoRAs and
    ControlNets are deliberately not recorded here: they are never loaded from an image.
    """
    record: dict[str, Any] = {}
    if id_images:
        record["id_images"] = [_absolute(p) for p in id_images]
    if id_embeds:
        record["id_embeds"] = _absolute(id_embeds)
    if people:
        record["people"] = [[_absolute(p) for p in photos] for photos in people]
    if people_embeds:
        record["people_embeds"] = [_absolute(p) for p in people_embeds]
    if regions:
        from spatialid.pipeline.people import parse_box  # needs torch: only for regions

        boxes = []
        for region in regions:
            if isinstance(region, (list, tuple)):
                boxes.append([float(v) for v in region])
                continue
            try:
                box = parse_box(str(region))
            except ValueError:
                box = None
            boxes.append(list(box) if box is not None else _absolute(str(region)))
        record["regions"] = boxes
    for key, value in (("init_image", init_image), ("inpaint_mask", inpaint_mask), ("control_image", control_image)):
        if value:
            record[key] = _absolute(value)
    return record


def _file_settings(job: GenerationJob, settings: dict[str, Any], index: int) -> dict[str, Any]:
    s = dict(settings)
    seeds = s.get("seeds") or [s.get("seed")]
    s["seed"] = seeds[index] if index < len(seeds) else s.get("seed")
    s["image_index"] = index
    s["identity"] = {
        **(s.get("identity") or {}),
        "source": job.identity_source,
        "files": list(job.identity_files),
    }
    if job.people_files is not None:
        s["people"] = [list(files) for files in job.people_files]
    if job.input_paths:
        s["input_paths"] = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in job.input_paths.items()}
    return s


def run_job(
    pipe: Any,
    job: GenerationJob,
    identity: Any = None,
    *,
    log: Callable[[str], None] = print,
    extra_settings: dict[str, Any] | None = None,
) -> JobResult:
    """Generate, then write images (+ mask pictures, + comparison grid) with their settings."""
    check_outputs(job)
    try:
        result = _run(pipe, job, identity, log, extra_settings)
        _UNWRITTEN.difference_update(job.reserved)  # written now
        return result
    except BaseException:
        release_outputs(job)  # a failed run leaves no empty files behind
        raise


def _check_image(image: Image.Image, what: str) -> None:
    """A generated image of one colour everywhere means broken numbers (NaN/Inf tokens or weights)."""
    import numpy as np

    array = np.asarray(image)
    if array.size and (array == array.reshape(-1, array.shape[-1] if array.ndim == 3 else 1)[0]).all():
        raise GenerationFailedError(
            f"the {what} came out as one flat colour, which means the computation produced NaN or Inf "
            "(damaged identity tokens or weights); nothing was written — re-encode the identity "
            "(`spatialid encode`) or check the model files"
        )


def _run(
    pipe: Any,
    job: GenerationJob,
    identity: Any,
    log: Callable[[str], None],
    extra_settings: dict[str, Any] | None,
) -> JobResult:
    from spatialid.app.pictures import (
        PresetPanel,
        mask_picture_for,
        preset_comparison_picture,
    )
    from spatialid.masks import resolve_preset

    started = time.perf_counter()
    result = JobResult()
    want_masks = job.masks and identity is not None
    if job.masks and identity is None:
        log("no identity given: skipping the mask picture (nothing is injected)")

    record = want_masks or (bool(job.compare) and identity is not None)  # the comparison shows masks too
    shown = compare_order(job.settings.preset, job.compare or [])
    with _progress_label(pipe, f"preset 1/{len(shown)} ({shown[0]}): denoising" if job.compare else None):
        out = _call(pipe, job.settings, identity, record, **_mask_files(job))
    for i, img in enumerate(out.images):
        _check_image(img, f"image {i + 1}" if len(out.images) > 1 else "image")
    base = {**out.settings, **(extra_settings or {})}
    result.settings = base
    result.mask_file = job.save_masks
    for i, (img, path) in enumerate(zip(out.images, image_paths(job.out, job.settings.num_images))):
        save_image_with_metadata(img, path, _file_settings(job, base, i))  # format from the suffix
        result.images.append(path)
        if want_masks:
            if not out.masks:
                log("no injected steps were recorded: skipping the mask picture")
            else:
                if out.masks[0].people is not None:  # several people / regions: one colour per person
                    from spatialid.app.people_pictures import people_mask_picture

                    names = [", ".join(files) for files in (job.people_files or [])]
                    picture = people_mask_picture(img, out.masks, i, base, names)
                else:
                    picture = mask_picture_for(img, out.masks, i, base)
                mp = masks_path(path)
                save_png_with_metadata(picture, mp, {**_file_settings(job, base, i), "kind": "mask schedule"})
                result.masks.append(mp)

    if job.compare:
        # the main preset first (its image is already drawn), then the others, each with its masks
        main = job.settings.preset
        panels = []
        for number, name in enumerate(shown, start=1):
            if name == main:
                panels.append(PresetPanel(name, out.images[0], out.masks if record else None, resolve_preset(name)))
                continue
            with _progress_label(pipe, f"preset {number}/{len(shown)} ({name}): denoising"):
                extra = _call(pipe, job.settings.replace(preset=name, num_images=1), identity, identity is not None)
            panels.append(PresetPanel(name, extra.images[0], extra.masks, resolve_preset(name)))
        s = job.settings
        n_steps = base.get("steps")
        title = f"\u201c{s.prompt}\u201d  seed {s.seed}, id weight {s.id_weight:g}, {n_steps} step{'' if n_steps == 1 else 's'}"
        reference_label = "identity photo" + (f"\n{job.identity_files[0]}" if job.identity_files else "")
        grid = preset_comparison_picture(
            panels, reference=job.reference_image, reference_label=reference_label, title=title,
            footer=base.get("note"), num_steps=int(base.get("steps") or s.steps or 0) or None,
        )
        cp = compare_path(job.out)
        save_png_with_metadata(
            grid, cp,
            {**_file_settings(job, base, 0), "kind": "preset comparison", "compare": list(job.compare), "presets_shown": shown},
        )
        result.compare = cp
    result.seconds = time.perf_counter() - started
    return result
