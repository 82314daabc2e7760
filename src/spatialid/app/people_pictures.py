"""Pictures of several people's masks: one colour per person over the image, one tile per phase.

The pipeline only returns the recorded masks (``StepMasks.people``, ``[points, persons, batch,
rows, cols]``); drawing them is the application's job. Each tile shows the image dimmed to grey
with every person's mask (mean over injection points) painted in that person's colour, so one
can see at a glance who was injected where at the prior, attention and relaxed steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from spatialid.app.pictures import choose_mask_steps, comparison_grid

__all__ = ["PERSON_COLORS", "people_mask_picture", "people_overlay"]

#: Colour of person 1, 2, 3, 4 (distinct in colour and in lightness).
PERSON_COLORS = np.array([[230, 60, 50], [40, 120, 230], [250, 200, 30], [60, 190, 90]], dtype=np.float32)


def people_overlay(image: Image.Image, masks: np.ndarray, alpha: float = 0.75) -> Image.Image:
    """``image`` in dimmed grey with each person's mask (``[K, rows, cols]`` in [0, 1]) in their colour."""
    masks = np.clip(np.asarray(masks, dtype=np.float32), 0.0, 1.0)
    if masks.ndim != 3 or not 1 <= masks.shape[0] <= len(PERSON_COLORS):
        raise ValueError(f"masks must be [persons (1-{len(PERSON_COLORS)}), rows, cols], got shape {masks.shape}")
    w, h = image.size
    up = np.stack(
        [np.asarray(Image.fromarray(m, mode="F").resize((w, h), Image.Resampling.BILINEAR)) for m in masks]
    )  # [K, h, w]
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None] * 0.5 + 40.0
    total = np.clip(up.sum(axis=0), 0.0, 1.0)[..., None]
    colour = np.einsum("khw,kc->hwc", up, PERSON_COLORS[: masks.shape[0]]) / np.maximum(total, 1e-6)
    out = grey * (1.0 - alpha * total) + colour * (alpha * total)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), mode="RGB")


def people_mask_picture(
    image: Image.Image, masks: Sequence[Any], index: int, settings: dict[str, Any], names: Sequence[str] | None = None
) -> Image.Image:
    """Image ``index`` of the batch, then one tile per phase with every person's mask in colour."""
    steps_total = int(settings.get("steps", 0) or 0)
    by_step = {m.step: m for m in masks}
    tiles = [image.convert("RGB")]
    labels = ["final image\n"]
    persons = 0
    for step in choose_mask_steps(masks):
        m = by_step[step]
        people = m.people if m.people is not None else m.masks.float().unsqueeze(1)  # [P, K, B, r, c]
        persons = int(people.shape[1])
        tiles.append(people_overlay(image, people.float().mean(dim=0)[:, index].numpy()))
        labels.append(f"step {step + 1}/{steps_total}  t={m.t:.2f}\n{m.phase}")
    colours = ["red", "blue", "yellow", "green"]
    who = [
        f"{colours[k]} = {names[k] if names and k < len(names) and names[k] else f'person {k + 1}'}"
        for k in range(persons)
    ]
    title = f"who goes where: preset {settings.get('preset')}, id weight {settings.get('id_weight', 0):g}"
    footer = ", ".join(who) + " (mask mean over injection points)"
    if settings.get("note"):
        footer += " | tiny model: noise image"
    return comparison_grid(tiles, labels, title=title, footer=footer)
