"""Comparison grids and mask heat-map pictures (Pillow only)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from spatialid.app.pictures import (
    MaskFrame,
    colorize,
    comparison_grid,
    heatmap_overlay,
    mask_schedule_picture,
    pick_steps,
)


def _img(w=64, h=64, value=128):
    return Image.new("RGB", (w, h), (value, value, value))


def test_colorize_endpoints_and_monotonic_lightness():
    rgb = colorize(np.linspace(0, 1, 11))
    assert rgb.shape == (11, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0]) == (12, 7, 60) and tuple(rgb[-1]) == (252, 245, 160)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luma) > 0)
    # out-of-range and NaN are clamped, not wrapped
    assert np.array_equal(colorize(np.array([-1.0, 2.0, np.nan])), colorize(np.array([0.0, 1.0, 0.0])))


def test_heatmap_overlay_puts_heat_where_the_mask_is():
    mask = np.zeros((4, 4), dtype=np.float32)
    mask[:2, :2] = 1.0  # top-left quadrant
    out = np.asarray(heatmap_overlay(_img(), mask), dtype=np.float32)
    assert out.shape == (64, 64, 3)
    hot, cold = out[4:12, 4:12].mean(), out[-12:-4, -12:-4].mean()
    assert hot > cold + 50


def test_heatmap_overlay_validates():
    with pytest.raises(ValueError, match="2-D"):
        heatmap_overlay(_img(), np.zeros(16))
    with pytest.raises(ValueError, match="alpha"):
        heatmap_overlay(_img(), np.zeros((2, 2)), alpha=1.5)


def test_comparison_grid_layout_and_labels():
    tiles = [_img(value=v) for v in (0, 100, 200)]
    grid = comparison_grid(tiles, ["pulid", "paper\nsecond line", "relaxed"], title="a title")
    w, h = grid.size
    assert w > 3 * 64 and h > 64
    arr = np.asarray(grid)
    # the three tiles are pasted unchanged, left to right
    row = arr[h // 2]
    assert (row == 0).all(axis=1).sum() >= 60 and (row == 200).all(axis=1).sum() >= 60
    # caption pixels (dark text on white) exist below the tiles
    below = arr[h - 30 :]
    assert (below.mean(axis=2) < 100).any()


def test_comparison_grid_resizes_and_wraps():
    grid = comparison_grid(
        [_img(64, 64), _img(32, 48)],
        ["a very long label that certainly does not fit in sixty four pixels", "b"],
        columns=1,
        footer="footer text",
    )
    assert grid.size[0] < 100  # one column
    with pytest.raises(ValueError, match="labels"):
        comparison_grid([_img()], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        comparison_grid([], [])


def test_pick_steps():
    assert pick_steps(range(20)) == [0, 10, 19]
    assert pick_steps([3, 4]) == [3, 4]
    assert pick_steps([5, 1, 1, 9, 7], 2) == [1, 9]
    assert pick_steps([]) == []


def test_mask_schedule_picture():
    frames = [
        MaskFrame(step=0, num_steps=8, t=1.0, phase="prior", mask=np.eye(4)),
        MaskFrame(step=4, num_steps=8, t=0.5, phase="attention", mask=np.ones((4, 4)) * 0.5),
    ]
    assert frames[0].label == "step 1/8  t=1.00\nprior"
    pic = mask_schedule_picture(_img(), frames, title="title")
    assert isinstance(pic, Image.Image)
    assert pic.size[0] > 3 * 64
    with pytest.raises(ValueError):
        mask_schedule_picture(_img(), [])


def test_small_mask_picture_footer_is_not_cut():
    """A 128-px picture with a long footer: the colour-bar strip grows for the wrapped lines."""
    frames = [MaskFrame(step=i, num_steps=8, t=1 - i / 8, phase="attention", mask=np.ones((8, 8)) * 0.5) for i in (1, 5, 7)]
    footer = "identity mask, averaged over the injection points (4): 0 = none, 1 = full | tiny model: noise image"
    pic = np.asarray(mask_schedule_picture(_img(128, 128), frames, footer=footer))
    short = np.asarray(mask_schedule_picture(_img(128, 128), frames, footer="mask"))
    assert pic.shape[0] > short.shape[0]  # more lines, more room
    assert (pic[-3:] == 255).all()  # the last line ends inside the picture (white margin below it)


def _step_masks(step, phase, value, points=2):
    import torch

    from spatialid.pipeline.pipeline_spatialid import StepMasks

    return StepMasks(step=step, t=1 - step / 8, phase=phase, masks=torch.full((points, 1, 4, 4), value, dtype=torch.float16))


def test_preset_comparison_picture_has_a_mask_row_per_step():
    from spatialid.app.pictures import (
        PresetPanel,
        plain_preset_caption,
        preset_comparison_picture,
    )

    spatial = [_step_masks(s, "prior" if s < 2 else ("attention" if s < 6 else "relaxed"), 0.3) for s in range(8)]
    uniform = [_step_masks(s, "uniform", 1.0) for s in range(8)]
    panels = [PresetPanel("paper", _img(128, 128, 50), spatial), PresetPanel("pulid", _img(128, 128, 200), uniform)]
    pic = preset_comparison_picture(panels, reference=_img(300, 200, 0), title="t", num_steps=8)
    w, h = pic.size
    assert w >= 3 * 256 and h >= 4 * 256  # photo + 2 presets; image row + 3 mask rows, tiles at 256 px
    assert plain_preset_caption("pulid") == "PuLID: identity everywhere"
    assert plain_preset_caption("relaxed") == "SpatialID relaxed: face first, whole head late"
    assert plain_preset_caption("my-schedule") == "my-schedule"
    # without masks (no identity): the image row alone, the parameters in the footer
    bare = preset_comparison_picture([PresetPanel("pulid", _img(), None)], title="t")
    assert bare.size[1] < 2 * 256
