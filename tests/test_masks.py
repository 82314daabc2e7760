"""Mask sources and refinement (spatialid.masks.extractor), checked against independent numpy code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spatialid.masks import (
    center_prior,
    entropy_mask,
    gaussian_kernel1d,
    minmax_normalize,
    norm_mask,
    refine_mask,
)
from spatialid.masks import extractor

# ---------------------------------------------------------------------------------------------
# independent numpy reference of the rules in issue 2 section 2


def np_kernel() -> np.ndarray:
    x = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    w = np.exp(-(x**2) / (2 * 1.5**2))
    return w / w.sum()


def np_index(i: int, n: int) -> int:
    """Padding rule per axis: reflect (no edge repeat) when n > 2, else replicate."""
    if n > 2:
        if i < 0:
            return -i
        if i >= n:
            return 2 * (n - 1) - i
        return i
    return min(max(i, 0), n - 1)


def np_blur(grid: np.ndarray) -> np.ndarray:
    w = np_kernel()
    rows, cols = grid.shape
    tmp = np.zeros_like(grid)
    for r in range(rows):
        for c in range(cols):
            tmp[r, c] = sum(w[k + 2] * grid[r, np_index(c + k, cols)] for k in range(-2, 3))
    out = np.zeros_like(grid)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = sum(w[k + 2] * tmp[np_index(r + k, rows), c] for k in range(-2, 3))
    return out


def np_dilate(hard: np.ndarray) -> np.ndarray:
    rows, cols = hard.shape
    out = np.zeros_like(hard)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = hard[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].max()
    return out


def np_refine(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blurred = np_blur(raw.reshape(rows, cols).astype(np.float64))
    std = blurred.std(ddof=1) if blurred.size > 1 else 0.0
    hard = (blurred > blurred.mean() + 0.5 * std).astype(np.float64)
    dil = np_dilate(hard)
    refined = np.clip(0.7 * blurred + 0.3 * dil, 0.0, 1.0)
    return blurred.ravel(), dil.ravel(), refined.ravel()


def np_minmax(v: np.ndarray) -> np.ndarray:
    return (v - v.min()) / max(v.max() - v.min(), 1e-6)


# ---------------------------------------------------------------------------------------------
# kernel


def test_gaussian_kernel_weights():
    w = gaussian_kernel1d()
    assert w.shape == (5,) and w.dtype == torch.float32
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-7)
    np.testing.assert_allclose(w.numpy(), np_kernel(), rtol=1e-6)
    assert torch.equal(w, w.flip(0))
    assert int(w.argmax()) == 2
    # e^{-1/(2*2.25)} and e^{-4/4.5}: ratios to the centre tap
    assert float(w[1] / w[2]) == pytest.approx(math.exp(-1 / 4.5), rel=1e-6)
    assert float(w[0] / w[2]) == pytest.approx(math.exp(-4 / 4.5), rel=1e-6)


def test_gaussian_kernel_returns_copy_and_rejects_bad_args():
    w = gaussian_kernel1d()
    w.zero_()
    assert float(gaussian_kernel1d().sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel1d(4)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel1d(5, 0.0)


# ---------------------------------------------------------------------------------------------
# raw masks


def test_norm_mask_values_and_per_sample_minmax():
    # token norms: sample 0 -> 5, 0, 10 ; sample 1 -> 2x those (same normalised mask)
    base = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    ca_raw = torch.stack([base, 2 * base])
    m = norm_mask(ca_raw)
    assert m.shape == (2, 3) and m.dtype == torch.float32
    torch.testing.assert_close(m, torch.tensor([[0.5, 0.0, 1.0], [0.5, 0.0, 1.0]]))


def test_norm_mask_constant_map_is_zero_and_bf16_is_accurate():
    assert torch.equal(norm_mask(torch.ones(1, 4, 3)), torch.zeros(1, 4))
    assert torch.equal(norm_mask(torch.ones(1, 1, 3)), torch.zeros(1, 1))
    x = torch.randn(2, 16, 64)
    xb = x.bfloat16()
    m = norm_mask(xb)
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, norm_mask(xb.float()), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        norm_mask(torch.ones(4, 3))


def test_minmax_eps():
    v = torch.tensor([[1.0, 1.0 + 1e-8]])
    out = minmax_normalize(v)
    assert torch.isfinite(out).all() and float(out.max()) <= 1e-2


def test_entropy_mask_low_entropy_is_face():
    n_id = 4
    onehot = torch.tensor([1.0, 0.0, 0.0, 0.0])
    half = torch.tensor([0.5, 0.5, 0.0, 0.0])
    uniform = torch.full((n_id,), 0.25)
    # tokens (1x4 grid): sharp, two-way, uniform, mixed heads (head0 sharp, head1 uniform)
    head0 = torch.stack([onehot, half, uniform, onehot])
    head1 = torch.stack([onehot, half, uniform, uniform])
    probs = torch.stack([head0, head1])[None]  # [1, 2, 4, 4]
    m = entropy_mask(probs, 1, 4)
    # entropies: 0, ln2, ln4, ln4/2 = ln2 -> normalised 0, .5, 1, .5 -> inverted
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.5, 0.0, 0.5]]))
    assert m.dtype == torch.float32
    # exact: entropy_mask's first step is the same .float() of the same bf16 values
    assert torch.equal(entropy_mask(probs.bfloat16(), 2, 2), entropy_mask(probs.bfloat16().float(), 2, 2))


def test_entropy_mask_bad_shapes():
    with pytest.raises(ValueError, match="heads"):
        entropy_mask(torch.rand(1, 4, 4), 2, 2)
    with pytest.raises(ValueError, match="grid is 3x3"):
        entropy_mask(torch.rand(1, 2, 4, 5), 3, 3)


# ---------------------------------------------------------------------------------------------
# refinement


def test_refine_one_hot_5x5_hand_values():
    raw = torch.zeros(1, 25)
    raw[0, 12] = 1.0  # centre of 5x5
    w = np_kernel()
    we, wm, wc = w[0], w[1], w[2]  # edge, middle, centre taps
    blurred, dil, refined = np_refine(raw[0].numpy(), 5, 5)
    b = blurred.reshape(5, 5)
    # Centre: only the centre tap of both passes. Border (0, 2): the one-hot is reached at
    # offset +2 and again through the reflected padding (index -2 -> 2): 2 * w_edge.
    assert b[2, 2] == pytest.approx(wc * wc)
    assert b[0, 2] == pytest.approx(2 * we * wc)
    assert b[1, 2] == pytest.approx(wm * wc)
    assert b[0, 0] == pytest.approx((2 * we) ** 2)
    assert np.allclose(b, b.T) and np.allclose(b, b[::-1, ::-1])
    # Reflection copies the one-hot to the borders of its row and column, so the threshold
    # mean + 0.5 * unbiased std selects the whole centre row and column (values >= w_m * w_c)...
    thr = b.mean() + 0.5 * b.std(ddof=1)
    cross = np.zeros((5, 5))
    cross[2, :] = 1.0
    cross[:, 2] = 1.0
    np.testing.assert_array_equal((b > thr).astype(float), cross)
    # ...and the 3x3 dilation of that cross covers everything but the four corners.
    dil_expected = np.ones((5, 5))
    dil_expected[[0, 0, 4, 4], [0, 4, 0, 4]] = 0.0
    np.testing.assert_array_equal(dil.reshape(5, 5), dil_expected)
    out = refine_mask(raw, 5, 5)
    assert out.shape == (1, 25) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), np.clip(0.7 * blurred + 0.3 * dil, 0, 1), atol=1e-6)
    assert float(out[0, 12]) == pytest.approx(0.7 * wc * wc + 0.3, abs=1e-6)
    assert float(out[0, 0]) == pytest.approx(0.7 * (2 * we) ** 2, abs=1e-6)


def test_refine_one_hot_interior_9x9_dilation_and_clamp():
    raw = torch.zeros(1, 81)
    raw[0, 40] = 1.0  # centre of 9x9: the 5x5 footprint stays inside the grid
    out = refine_mask(raw, 9, 9)[0].reshape(9, 9).numpy()
    w = np_kernel()
    blurred = np.zeros((9, 9))
    blurred[2:7, 2:7] = np.outer(w, w)
    thr = blurred.mean() + 0.5 * blurred.std(ddof=1)
    core = blurred > thr
    dil = np_dilate(core.astype(float))
    assert core.sum() >= 1 and dil.sum() > core.sum()
    np.testing.assert_allclose(out, np.clip(0.7 * blurred + 0.3 * dil, 0, 1), atol=1e-6)
    # outside the dilated region only the blurred part remains; far away it is 0
    assert out[0, 0] == 0.0 and out[8, 8] == 0.0
    # clamp: raw values of 2 would give > 1 before clamping
    big = refine_mask(torch.full((1, 9), 2.0), 3, 3)
    assert float(big.max()) == 1.0


@pytest.mark.parametrize(
    "rows,cols", [(1, 1), (2, 3), (3, 1), (1, 5), (2, 2), (3, 3), (4, 7), (6, 5)]
)
def test_refine_matches_numpy_reference_on_many_grids(rows, cols):
    gen = torch.Generator().manual_seed(rows * 31 + cols)
    raw = torch.rand(3, rows * cols, generator=gen)
    out = refine_mask(raw, rows, cols)
    assert out.shape == (3, rows * cols)
    assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) <= 1
    for i in range(3):
        _, _, expected = np_refine(raw[i].numpy(), rows, cols)
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-5)


def test_refine_single_token_std_is_zero_not_nan():
    out = refine_mask(torch.tensor([[0.8]]), 1, 1)
    # blur of a 1x1 grid is the identity; blurred == mean and std := 0 -> hard mask 0
    assert float(out) == pytest.approx(0.7 * 0.8, abs=1e-7)


def test_refine_length_one_axis_is_not_blurred_along_it():
    raw = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
    col_grid = refine_mask(raw, 5, 1)  # 5 rows x 1 col
    row_grid = refine_mask(raw, 1, 5)
    torch.testing.assert_close(col_grid, row_grid)


def test_refine_per_sample_statistics():
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(2, 20, generator=gen)
    raw[1] *= 0.1
    both = refine_mask(raw, 4, 5)
    torch.testing.assert_close(both[0:1], refine_mask(raw[0:1], 4, 5))
    torch.testing.assert_close(both[1:2], refine_mask(raw[1:2], 4, 5))


def test_refine_bad_arguments():
    with pytest.raises(ValueError, match="grid is 3x3"):
        refine_mask(torch.rand(1, 8), 3, 3)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        refine_mask(torch.rand(8), 2, 4)
    with pytest.raises(ValueError, match="rows"):
        refine_mask(torch.rand(1, 0), 0, 4)


# ---------------------------------------------------------------------------------------------
# centre prior


def test_center_prior_odd_grid_formula_and_symmetry():
    sigma = 0.3
    p = center_prior(5, 7, sigma)
    assert p.shape == (35,) and p.dtype == torch.float32
    x = np.linspace(-1, 1, 7)
    y = np.linspace(-1, 1, 5)
    expected = np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    expected /= expected.max()
    np.testing.assert_allclose(p.numpy(), expected.ravel(), rtol=1e-5, atol=1e-12)
    g = p.reshape(5, 7)
    assert float(g[2, 3]) == 1.0 and int(p.argmax()) == 2 * 7 + 3
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1))


def test_center_prior_even_and_degenerate_grids():
    g = center_prior(4, 4, 0.5).reshape(4, 4)
    assert torch.equal(g[1:3, 1:3], torch.ones(2, 2))
    assert float(g.max()) == 1.0
    assert torch.equal(center_prior(1, 1), torch.ones(1))
    col = center_prior(3, 1, 0.3)
    torch.testing.assert_close(
        col, torch.tensor([math.exp(-1 / 0.18), 1.0, math.exp(-1 / 0.18)]), rtol=1e-5, atol=0
    )
    # a very narrow prior must not underflow into 0/0
    tiny = center_prior(5, 5, 1e-3)
    assert torch.isfinite(tiny).all() and float(tiny[12]) == 1.0 and float(tiny.sum()) == 1.0


def test_center_prior_cache_and_copy_semantics():
    extractor._center_prior_cached.cache_clear()
    a = center_prior(6, 6, 0.4, dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16
    a.zero_()  # the caller owns its copy
    b = center_prior(6, 6, 0.4, dtype=torch.bfloat16)
    assert float(b.max()) == 1.0
    info = extractor._center_prior_cached.cache_info()
    assert info.misses == 1 and info.hits == 1


def test_center_prior_bad_arguments():
    for sigma in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="center_sigma"):
            center_prior(3, 3, sigma)
    with pytest.raises(ValueError, match="rows"):
        center_prior(0, 3)
    with pytest.raises(ValueError, match="cols"):
        center_prior(3, 2.5)  # type: ignore[arg-type]
