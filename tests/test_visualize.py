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
