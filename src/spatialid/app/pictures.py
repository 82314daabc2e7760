"""Pictures for people: labelled comparison grids and mask-schedule heat maps.

Only Pillow and NumPy are used (no plotting library), so the pictures can be made wherever the
pipeline runs. Labels are drawn with Pillow's built-in scalable font, sized from the tile width so
they stay readable from 64-pixel test images to 1024-pixel FLUX outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "PLAIN_PRESET_CAPTIONS",
    "MaskFrame",
    "PresetPanel",
    "choose_mask_steps",
    "plain_preset_caption",
    "preset_comparison_picture",
    "fit_reference",
    "mask_picture_for",
    "preset_caption",
    "colorize",
    "comparison_grid",
    "heatmap_overlay",
    "mask_schedule_picture",
    "pick_steps",
]

# Colour stops of the heat map (value -> RGB): dark blue-violet for "no identity", through red
# and orange, to pale yellow for "full identity". Monotonic in lightness so it also reads in grey.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLORS = np.array(
    [
        [12, 7, 60],
        [100, 20, 120],
        [200, 50, 80],
        [245, 140, 30],
        [252, 245, 160],
    ],
    dtype=np.float64,
)

_BG = (255, 255, 255)
_FG = (20, 20, 20)
_SUB = (90, 90, 90)


@dataclass
class MaskFrame:
    """One panel of the mask-schedule picture: a denoising step and its averaged mask."""

    step: int  # 0-based denoising step
    num_steps: int
    t: float  # flow-matching time (FLUX sigma) of the step
    phase: str  # schedule phase at t ("prior", "attention", "relaxed", "uniform", ...)
    mask: np.ndarray  # [rows, cols] in [0, 1], averaged over injection points

    @property
    def label(self) -> str:
        return f"step {self.step + 1}/{self.num_steps}  t={self.t:.2f}\n{self.phase}"


#: Smallest font size in pixels: Pillow's built-in font loses the space after a digit below it
#: (a 128-px picture once read "4injection").
MIN_FONT = 13


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(MIN_FONT, int(size))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return right - left, bottom - top


def _fit_text(text: str, max_width: int, font: ImageFont.ImageFont) -> str:
    """Wrap each line at spaces (or cut with an ellipsis) so it fits ``max_width`` pixels."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out: list[str] = []
    for line in text.split("\n"):
        words = line.split(" ")
        current = ""
        for word in words:
            candidate = word if not current else f"{current} {word}"
            if _text_size(probe, candidate, font)[0] <= max_width or not current:
                current = candidate
            else:
                out.append(current)
                current = word
        while current and _text_size(probe, current, font)[0] > max_width and len(current) > 1:
            current = current[:-2] + "…"
        out.append(current)
    return "\n".join(out)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB with the heat-map colour stops."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _STOPS, _COLORS[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def heatmap_overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """Draw ``mask`` ([rows, cols], values in [0, 1]) as a heat map over ``image``.

    The mask is upsampled bilinearly to the image size (each token covers a 16x16 pixel patch in
    FLUX); the photo underneath is shown in dimmed grey so the colours stay unambiguous.
    """
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [rows, cols], got shape {mask.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w, h = image.size
    up = Image.fromarray(np.clip(mask, 0.0, 1.0), mode="F").resize((w, h), Image.Resampling.BILINEAR)
    heat = colorize(np.asarray(up))
    base = np.asarray(image.convert("L").convert("RGB"), dtype=np.float32) * 0.85
    out = (1.0 - alpha) * base + alpha * heat.astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="RGB")


def _colorbar(width: int, font: ImageFont.ImageFont, label: str) -> Image.Image:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, text_h = _text_size(probe, "0", font)
    bar_h = max(8, text_h)
    pad = max(4, text_h // 2)
    label = _fit_text(label, width - 2 * pad, font)
    _, label_h = _text_size(probe, label, font)  # several lines when the picture is narrow
    strip = Image.new("RGB", (width, bar_h + 2 * pad + label_h + pad), _BG)
    draw = ImageDraw.Draw(strip)
    low_w, _ = _text_size(draw, "0", font)
    high_w, _ = _text_size(draw, "1", font)
    bar_w = max(16, width // 2)
    x0 = (width - bar_w) // 2
    gradient = colorize(np.linspace(0.0, 1.0, bar_w)[None, :].repeat(bar_h, axis=0))
    strip.paste(Image.fromarray(gradient, mode="RGB"), (x0, pad))
    draw.text((x0 - low_w - pad, pad), "0", fill=_FG, font=font)
    draw.text((x0 + bar_w + pad, pad), "1", fill=_FG, font=font)
    lw, _ = _text_size(draw, label, font)
    draw.multiline_text(((width - lw) // 2, pad + bar_h + pad // 2), label, fill=_SUB, font=font, spacing=2)
    return strip


def comparison_grid(
    images: Sequence[Image.Image | None],
    labels: Sequence[str],
    *,
    title: str | None = None,
    columns: int | None = None,
    gap: int | None = None,
    footer: str | None = None,
) -> Image.Image:
    """Tile ``images`` side by side (``columns`` per row) with a caption under each.

    All tiles are shown at the size of the first image (others are resized; ``None`` leaves the
    cell empty). Captions may hold
    several lines ("\\n"); long lines are wrapped to the tile width. ``title`` goes on top,
    ``footer`` (for example the seed and prompt) at the bottom, both wrapped to the grid width.
    """
    if not images:
        raise ValueError("comparison_grid needs at least one image")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    n = len(images)
    cols = max(1, min(columns or n, n))
    rows = -(-n // cols)
    first = next((img for img in images if img is not None), None)
    if first is None:
        raise ValueError("comparison_grid needs at least one image")
    tile_w, tile_h = first.size
    gap = max(4, tile_w // 40) if gap is None else gap
    font = _font(tile_w // 16)
    title_font = _font(max(MIN_FONT + 1, tile_w // 13))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    captions = [_fit_text(str(lbl), tile_w - 2, font) for lbl in labels]
    caption_h = max(_text_size(probe, c, font)[1] for c in captions) + 2 * gap
    grid_w = cols * tile_w + (cols + 1) * gap

    title_txt = _fit_text(title, grid_w - 2 * gap, title_font) if title else ""
    title_h = _text_size(probe, title_txt, title_font)[1] + 2 * gap if title else 0
    footer_txt = _fit_text(footer, grid_w - 2 * gap, font) if footer else ""
    footer_h = _text_size(probe, footer_txt, font)[1] + 2 * gap if footer else 0

    grid_h = title_h + rows * (tile_h + caption_h) + gap + footer_h
    canvas = Image.new("RGB", (grid_w, grid_h), _BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        tw, _ = _text_size(draw, title_txt, title_font)
        draw.multiline_text(((grid_w - tw) // 2, gap), title_txt, fill=_FG, font=title_font, spacing=2)
    for i, (img, caption) in enumerate(zip(images, captions)):
        r, c = divmod(i, cols)
        x = gap + c * (tile_w + gap)
        y = title_h + gap + r * (tile_h + caption_h)
        if img is None:  # an empty cell (e.g. under the identity photo of a comparison)
            continue
        tile = img.convert("RGB")
        if tile.size != (tile_w, tile_h):
            tile = tile.resize((tile_w, tile_h), Image.Resampling.LANCZOS)
        canvas.paste(tile, (x, y))
        cw, _ = _text_size(draw, caption, font)
        draw.multiline_text(
            (x + (tile_w - cw) // 2, y + tile_h + gap // 2), caption, fill=_FG, font=font, spacing=2, align="center"
        )
    if footer:
        draw.multiline_text((gap, grid_h - footer_h + gap // 2), footer_txt, fill=_SUB, font=font, spacing=2)
    return canvas


def pick_steps(steps: Sequence[int], count: int = 3) -> list[int]:
    """Choose ``count`` steps spread from first to last (early, mid, late), without repeats."""
    ordered = sorted(set(int(s) for s in steps))
    if len(ordered) <= count:
        return ordered
    picks = np.linspace(0, len(ordered) - 1, count)
    return sorted({ordered[int(round(p))] for p in picks})


def mask_schedule_picture(
    image: Image.Image,
    frames: Sequence[MaskFrame],
    *,
    title: str | None = None,
    footer: str | None = None,
    alpha: float = 0.6,
) -> Image.Image:
    """The final image, then one heat map of the identity mask per chosen step over it.

    Each frame's caption gives the step, its time ``t`` (1 = pure noise) and the schedule phase,
    so the picture shows when and where identity was injected.
    """
    if not frames:
        raise ValueError("mask_schedule_picture needs at least one mask frame")
    tiles = [image.convert("RGB")] + [heatmap_overlay(image, f.mask, alpha=alpha) for f in frames]
    labels = ["final image\n"] + [f.label for f in frames]
    grid = comparison_grid(tiles, labels, title=title)
    font = _font(max(11, image.size[0] // 16))
    bar = _colorbar(grid.size[0], font, footer or "identity mask (mean over injection points)")
    out = Image.new("RGB", (grid.size[0], grid.size[1] + bar.size[1]), _BG)
    out.paste(grid, (0, 0))
    out.paste(bar, (0, grid.size[1]))
    return out


# ----------------------------------------------------------------------------- pictures of a generation


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


def fit_reference(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre-crop the identity photo to the tile's aspect ratio and resize it."""
    w, h = photo.size
    tw, th = size
    scale = max(tw / w, th / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = photo.convert("RGB").resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return resized.crop((left, top, left + tw, top + th))


def choose_mask_steps(masks: Sequence[Any], count: int = 3) -> list[int]:
    """Steps to draw: the middle step of each schedule phase (prior, attention, relaxed) in order of
    appearance, topped up with early/mid/late steps when the schedule has fewer phases."""
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
    footer = f"identity mask, averaged over the injection points ({points}): 0 = none, 1 = full"
    if settings.get("note"):
        footer += " | tiny model: noise image"
    return mask_schedule_picture(image, frames, title=title, footer=footer)


# ----------------------------------------------------------------------------- preset comparison

#: What each preset does, in words a visitor reads under its picture (the numbers go in the footer).
PLAIN_PRESET_CAPTIONS: dict[str, str] = {
    "pulid": "PuLID: identity everywhere",
    "paper": "SpatialID: centre first, then the face only",
    "relaxed": "SpatialID relaxed: face first, whole head late",
    "late-floor-0.7": "SpatialID, wider start, more identity late",
    "global-floor-0.3": "SpatialID, 30% identity everywhere",
    "global-floor-0.5": "SpatialID, 50% identity everywhere",
    "prior-only": "centre of the picture only",
    "attention-only": "where the model looks, every step",
    "no-relax": "SpatialID, the face only to the end",
    "entropy": "SpatialID, face found by attention focus",
}


def plain_preset_caption(name: str) -> str:
    """The one-line plain caption of a preset (its name for a custom schedule)."""
    return PLAIN_PRESET_CAPTIONS.get(name, name)


@dataclass
class PresetPanel:
    """One preset of a comparison: its image and the masks recorded while drawing it."""

    name: str
    image: Image.Image
    masks: Sequence[Any] | None = None  # the pipeline's StepMasks, or None when nothing was injected
    schedule: Any = None
    index: int = 0  # the image's position in its batch (masks hold the whole batch)


def _nearest(masks: Sequence[Any], step: int) -> Any:
    return min(masks, key=lambda m: (abs(m.step - step), m.step))


def _resized(img: Image.Image, width: int) -> Image.Image:
    if img.size[0] == width:
        return img.convert("RGB")
    height = max(1, round(img.size[1] * width / img.size[0]))
    return img.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)


def preset_comparison_picture(
    panels: Sequence[PresetPanel],
    *,
    reference: Image.Image | None = None,
    reference_label: str = "identity photo",
    title: str | None = None,
    footer: str | None = None,
    num_steps: int | None = None,
    count: int = 3,
) -> Image.Image:
    """One column per preset: its image, then its identity mask at the same early/mid/late steps.

    The same steps are drawn for every preset (chosen from the preset with the most schedule
    phases), so a row compares where the identity went at one moment. Tiles are scaled to 256-512
    pixels wide so the captions stay readable for the tiny model's 128-px images and the file
    stays small for 1024-px ones. ``reference`` (the identity photo) leads in its own column.
    """
    if not panels:
        raise ValueError("preset_comparison_picture needs at least one preset")
    width = min(512, max(256, panels[0].image.size[0]))
    recorded = [p for p in panels if p.masks]
    steps: list[int] = []
    if recorded:
        richest = max(recorded, key=lambda p: len({m.phase for m in p.masks}))
        steps = choose_mask_steps(richest.masks, count)
    lead = 1 if reference is not None else 0
    cols = lead + len(panels)
    size = _resized(panels[0].image, width).size
    tiles: list[Image.Image | None] = [None] * (cols * (1 + len(steps)))
    labels = [""] * len(tiles)
    if reference is not None:
        tiles[0] = fit_reference(reference, size)
        labels[0] = reference_label
    for c, panel in enumerate(panels, start=lead):
        image = _resized(panel.image, width)
        tiles[c] = image
        labels[c] = plain_preset_caption(panel.name)
        for r, step in enumerate(steps, start=1):
            if not panel.masks:
                labels[r * cols + c] = "no mask recorded"
                continue
            m = _nearest(panel.masks, step)
            tiles[r * cols + c] = heatmap_overlay(image, m.mean()[panel.index].numpy())
            total = num_steps or (max(x.step for x in panel.masks) + 1)
            labels[r * cols + c] = f"step {m.step + 1}/{total}: {m.phase}"
    if all(t is None for t in tiles[cols:]):  # no masks at all: the image row alone
        tiles, labels = tiles[:cols], labels[:cols]
    grid = comparison_grid(tiles, labels, title=title, columns=cols)
    parts = [f"{p.name}: {preset_caption(p.name, p.schedule).split(chr(10), 1)[-1]}" for p in panels]
    note = "; ".join(parts) + (f" | {footer}" if footer else "")
    if len(tiles) == cols:
        return comparison_grid(tiles, labels, title=title, columns=cols, footer=note)
    bar = _colorbar(grid.size[0], _font(width // 16), "identity mask: 0 = none, 1 = full. Settings: " + note)
    out = Image.new("RGB", (grid.size[0], grid.size[1] + bar.size[1]), _BG)
    out.paste(grid, (0, 0))
    out.paste(bar, (0, grid.size[1]))
    return out
