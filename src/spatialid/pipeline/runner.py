"""One generation job as the CLI (and the demo) runs it: images, mask pictures, comparison grid.

The command-line modules parse arguments; this module decides the output file names, checks that
they can be written *before* any model runs, calls the pipeline, and writes every file atomically
with its settings as PNG metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from spatialid.pipeline.metadata import OutputPathError, check_writable, save_png_with_metadata

__all__ = [
    "GenerationJob",
    "JobResult",
    "compare_path",
    "default_output_path",
    "image_paths",
    "masks_path",
    "preset_caption",
    "run_job",
]


@dataclass
class GenerationJob:
    """Everything a ``spatialid generate`` call asks for (already validated)."""

    prompt: str
    out: Path
    preset: str = "paper"
    id_weight: float = 1.0
    start_step: int = 0
    true_cfg: float = 1.0
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float = 4.0
    width: int | None = None
    height: int | None = None
    seed: int = 0
    num_images: int = 1
    cfg_start_step: int = 1
    max_sequence_length: int | None = None
    masks: bool = False
    compare: list[str] | None = None
    identity_files: list[str] = field(default_factory=list)
    identity_source: str | None = None  # "image" | "embeds" | None
    reference_image: Image.Image | None = None  # shown first in the comparison grid


@dataclass
class JobResult:
    images: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)
    compare: Path | None = None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [*self.images, *self.masks, *([self.compare] if self.compare else [])]


def default_output_path(seed: int, folder: str | Path = "outputs") -> Path:
    """``outputs/spatialid-YYYYmmdd-HHMMSS-s<seed>.png``: never overwrites an earlier run by accident."""
    return Path(folder) / f"spatialid-{datetime.now():%Y%m%d-%H%M%S}-s{seed}.png"


def image_paths(out: Path, num_images: int) -> list[Path]:
    """``out`` itself for one image; ``stem-0.png, stem-1.png, ...`` for several."""
    if num_images == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(num_images)]


def masks_path(image_path: Path) -> Path:
    return image_path.with_name(f"{image_path.stem}_masks.png")


def compare_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_compare.png")


def planned_paths(job: GenerationJob) -> list[Path]:
    paths = image_paths(job.out, job.num_images)
    if job.masks:
        paths += [masks_path(p) for p in image_paths(job.out, job.num_images)]
    if job.compare:
        paths.append(compare_path(job.out))
    return paths


def check_outputs(job: GenerationJob) -> list[Path]:
    """Refuse a non-PNG target and prove every planned file can be written (before generating)."""
    if job.out.suffix.lower() != ".png":
        raise OutputPathError(f"{job.out}: output must be a .png file (settings are stored as PNG metadata)")
    paths = planned_paths(job)
    for p in paths:
        check_writable(p)
    return paths


def preset_caption(name: str, schedule: Any) -> str:
    """Two short lines describing a preset for grid labels."""
    if schedule is None:
        return f"{name}\nuniform (PuLID)"
    d = schedule.to_dict() if hasattr(schedule, "to_dict") else dict(schedule)
    mode = d.get("mode", "scheduled")
    bits = []
    if mode == "scheduled":
        bits.append(f"early {d.get('early', 0):g} late {d.get('late', 0):g}")
    else:
        bits.append(str(mode))
    bits.append(f"floor {d.get('late_floor', 0):g} sigma {d.get('center_sigma', 0):g}")
    if d.get("global_floor"):
        bits[-1] += f" min {d['global_floor']:g}"
    if d.get("source", "norm") != "norm":
        bits[-1] += f" {d['source']}"
    return f"{name}\n" + ", ".join(bits)


def _fit_reference(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre-crop the identity photo to the tile's aspect ratio and resize it."""
    w, h = photo.size
    tw, th = size
    scale = max(tw / w, th / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = photo.convert("RGB").resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return resized.crop((left, top, left + tw, top + th))


def _call(pipe: Any, job: GenerationJob, identity: Any, preset: str, num_images: int, masks: bool) -> Any:
    return pipe(
        job.prompt,
        id_embeds=identity,
        preset=preset,
        id_weight=job.id_weight,
        start_step=job.start_step,
        true_cfg=job.true_cfg,
        negative_prompt=job.negative_prompt,
        guidance_scale=job.guidance,
        num_inference_steps=job.steps,
        height=job.height,
        width=job.width,
        seed=job.seed,
        num_images_per_prompt=num_images,
        return_masks=masks,
        cfg_start_step=job.cfg_start_step,
        max_sequence_length=job.max_sequence_length,
    )


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
    return s


def choose_mask_steps(masks: Sequence[Any], count: int = 3) -> list[int]:
    """Steps to draw: the middle step of each schedule phase (prior, attention, relaxed) in order of
    appearance, topped up with early/mid/late steps when the schedule has fewer phases."""
    from spatialid.pipeline.visualize import pick_steps

    groups: dict[str, list[int]] = {}
    for m in sorted(masks, key=lambda m: m.step):
        groups.setdefault(m.phase, []).append(m.step)
    chosen = {steps[(len(steps) - 1) // 2] for steps in groups.values()} if len(groups) > 1 else set()
    for step in pick_steps([m.step for m in masks], count):
        if len(chosen) >= count:
            break
        chosen.add(step)
    return sorted(chosen)[: max(count, len(groups))]


def mask_picture_for(image: Image.Image, masks: Sequence[Any], index: int, settings: dict[str, Any]) -> Image.Image:
    """Early/mid/late heat maps of image ``index`` of the batch (mean over injection points)."""
    from spatialid.pipeline.visualize import MaskFrame, mask_schedule_picture

    steps_total = int(settings.get("steps", 0))
    by_step = {m.step: m for m in masks}
    chosen = choose_mask_steps(masks)
    frames = []
    for step in chosen:
        m = by_step[step]
        points = int(m.masks.shape[0])
        frames.append(
            MaskFrame(
                step=step,
                num_steps=steps_total,
                t=m.t,
                phase=m.phase,
                mask=m.mean()[index].numpy(),
            )
        )
    title = f"where identity goes: preset {settings.get('preset')}, id weight {settings.get('id_weight'):g}"
    footer = f"identity mask (mean over {points} injection points): 0 = none, 1 = full"
    if settings.get("note"):
        footer += " | tiny model: noise image"
    return mask_schedule_picture(image, frames, title=title, footer=footer)


def run_job(
    pipe: Any,
    job: GenerationJob,
    identity: Any = None,
    *,
    log: Callable[[str], None] = print,
    extra_settings: dict[str, Any] | None = None,
) -> JobResult:
    """Generate, then write images (+ mask pictures, + comparison grid) with their settings."""
    from spatialid.masks import resolve_preset

    check_outputs(job)
    started = time.perf_counter()
    result = JobResult()
    want_masks = job.masks and identity is not None
    if job.masks and identity is None:
        log("no identity given: skipping the mask picture (nothing is injected)")

    out = _call(pipe, job, identity, job.preset, job.num_images, want_masks)
    base = {**out.settings, **(extra_settings or {})}
    result.settings = base
    for i, (img, path) in enumerate(zip(out.images, image_paths(job.out, job.num_images))):
        save_png_with_metadata(img, path, _file_settings(job, base, i))
        result.images.append(path)
        if want_masks:
            if not out.masks:
                log("no injected steps were recorded: skipping the mask picture")
            else:
                picture = mask_picture_for(img, out.masks, i, base)
                mp = masks_path(path)
                save_png_with_metadata(picture, mp, {**_file_settings(job, base, i), "kind": "mask schedule"})
                result.masks.append(mp)

    if job.compare:
        tiles: list[Image.Image] = []
        labels: list[str] = []
        if job.reference_image is not None:
            tiles.append(_fit_reference(job.reference_image, out.images[0].size))
            labels.append("identity photo\n" + (job.identity_files[0] if job.identity_files else ""))
        for name in job.compare:
            if name == job.preset:
                img = out.images[0]
            else:
                img = _call(pipe, job, identity, name, 1, False).images[0]
            tiles.append(img)
            labels.append(preset_caption(name, resolve_preset(name)))
        from spatialid.pipeline.visualize import comparison_grid

        title = f"\u201c{job.prompt}\u201d  seed {job.seed}, id weight {job.id_weight:g}, {base.get('steps')} steps"
        footer = base.get("note")
        grid = comparison_grid(tiles, labels, title=title, footer=footer)
        cp = compare_path(job.out)
        save_png_with_metadata(
            grid, cp, {**_file_settings(job, base, 0), "kind": "preset comparison", "compare": list(job.compare)}
        )
        result.compare = cp
    result.seconds = time.perf_counter() - started
    return result
