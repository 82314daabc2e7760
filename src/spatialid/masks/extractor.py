"""Spatial mask sources for SpatialID: where on the image grid identity features should go.

Every function here works on a row-major token grid (``rows x cols`` image tokens, FLUX's 2x2-packed
latent), per sample, in float32, and without Python loops over tokens or samples. Masks are in
``[0, 1]`` with 1 = "face / inject fully".

Sources
-------
* :func:`norm_mask` -- the default source: per-token L2 norm of the identity cross-attention output
  (before its output projection), min-max normalised per sample. Tokens that respond strongly to the
  identity tokens are where the face is forming.
* :func:`entropy_mask` -- an alternative source: per-token entropy of the softmax over identity
  tokens, averaged over heads, min-max normalised and inverted (a token that attends sharply to a
  few identity tokens, i.e. has low entropy, is treated as face).
* :func:`center_prior` -- a data-free Gaussian centred on the grid, used while the layout is still
  noise.

:func:`refine_mask` turns a raw mask into the smooth, slightly grown region used for injection:
separable Gaussian blur (kernel 5, sigma 1.5), a hard mask (blurred > mean + 0.5 std, per sample)
dilated by a 3x3 max-filter, and ``clamp(0.7 * blurred + 0.3 * hard, 0, 1)``.

Small grids
-----------
Reflect padding needs an axis longer than the padding (2 for a 5-tap kernel). Per axis, the blur
pads by reflection when the axis has more than 2 tokens and by replication otherwise. Replication
keeps the weights summing to 1 over real values, so a length-1 axis is left unchanged (it has no
spatial structure to blur) and a length-2 axis is smoothed towards its nearer edge. For a single
token the unbiased standard deviation is undefined (NaN); it is taken as 0 there.

Caching and cost
----------------
The centre prior, the 1-D blur kernel and the blur matrices are cached per (grid size, sigma,
device, dtype) with :func:`functools.lru_cache`, so a denoising step does not rebuild them at
every injection point. The cached tensors are shared: internal code never modifies them in place,
and the public :func:`center_prior` returns a copy.

The separable blur is applied as two small matrix products, ``B_rows @ grid @ B_cols^T``, where
each ``[L, L]`` matrix holds the 5 Gaussian taps with the padding rule folded in (a reflected tap
adds its weight to the mirrored token). This equals padding + convolution up to float32 rounding
but needs no padded copies and only two kernels (the CPU reflection pad and the 1x5 convolution
were the most expensive steps of the mask). No step reads a tensor value on the host, so
everything here runs without device synchronisation and traces under ``torch.compile``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "BLUR_KERNEL_SIZE",
    "BLUR_SIGMA",
    "HARD_STD_FACTOR",
    "BLEND_SOFT",
    "BLEND_HARD",
    "MINMAX_EPS",
    "norm_mask",
    "entropy_mask",
    "refine_mask",
    "center_prior",
    "gaussian_kernel1d",
    "minmax_normalize",
]

BLUR_KERNEL_SIZE = 5
BLUR_SIGMA = 1.5
HARD_STD_FACTOR = 0.5  # hard mask = blurred > mean + HARD_STD_FACTOR * std
BLEND_SOFT = 0.7  # refined = BLEND_SOFT * blurred + BLEND_HARD * dilated hard mask
BLEND_HARD = 0.3
MINMAX_EPS = 1e-6

_CACHE_SIZE = 64


# ----------------------------------------------------------------------------------------------
# helpers


def _check_grid(rows: int, cols: int) -> None:
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_tokens(n_tokens: int, rows: int, cols: int, what: str) -> None:
    _check_grid(rows, cols)
    if rows * cols != n_tokens:
        raise ValueError(
            f"{what} has {n_tokens} tokens but the grid is {rows}x{cols} = {rows * cols}; "
            "pass the (rows, cols) of the image-token grid (height // 16, width // 16 for FLUX)"
        )


def _check_sigma(sigma: float, name: str) -> float:
    sigma = float(sigma)
    if not (sigma > 0.0 and math.isfinite(sigma)):
        raise ValueError(f"{name} must be a positive finite number, got {sigma!r}")
    return sigma


def _cached(fn, *args):  # type: ignore[no-untyped-def]
    """Call an lru_cache'd builder (centre prior, blur kernel or blur matrix).

    Under torch.compile, dynamo cannot use the cache (it would trace the builder's host-side
    float64 maths and a host-to-device copy into every call); the graph instead builds the same
    tensor in float32 directly on the device (``_DEVICE_BUILDERS``: a few tiny fused kernels, no
    host transfer, results equal to the cached ones up to float32 rounding).
    """
    if torch.compiler.is_compiling():
        return _DEVICE_BUILDERS[fn.__name__](*args)
    return fn(*args)


# Rows of a low-precision CPU activation converted to float32 at a time by norm_mask (about
# 1 MiB of float32 per chunk: stays in cache, and no activation-sized float32 copy is allocated).
_NORM_CHUNK_ELEMENTS = 1 << 18


def minmax_normalize(values: torch.Tensor, eps: float = MINMAX_EPS) -> torch.Tensor:
    """Per-sample ``(v - min) / max(max - min, eps)`` over the last dimension of ``[B, N]`` values.

    The eps keeps a constant map (e.g. a single token) at 0 instead of dividing by zero.
    """
    lo, hi = torch.aminmax(values, dim=-1, keepdim=True)
    return (values - lo) / (hi - lo).clamp_min(eps)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _gaussian_kernel1d_cached(
    size: int, sigma: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2.0 * sigma * sigma))
    weights = weights / weights.sum()
    return weights.to(device=device, dtype=dtype)


def gaussian_kernel1d(
    size: int = BLUR_KERNEL_SIZE,
    sigma: float = BLUR_SIGMA,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Normalised 1-D Gaussian weights ``[size]`` (sum 1) centred on the middle tap; a copy."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size!r}")
    sigma = _check_sigma(sigma, "blur sigma")
    return _gaussian_kernel1d_cached(size, sigma, torch.device(device or "cpu"), dtype).clone()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _center_prior_cached(
    rows: int, cols: int, sigma: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Centre prior as a shared ``[1, rows*cols]`` tensor. Callers must not modify it in place."""
    x = torch.linspace(-1.0, 1.0, cols, dtype=torch.float64)
    y = torch.linspace(-1.0, 1.0, rows, dtype=torch.float64)
    d2 = y[:, None] ** 2 + x[None, :] ** 2
    # exp(-d2 / 2s^2) / max(...) computed as exp(-(d2 - min d2) / 2s^2): identical in exact
    # arithmetic, but cannot underflow to 0/0 for a very small sigma.
    prior = torch.exp(-(d2 - d2.min()) / (2.0 * sigma * sigma))
    return prior.reshape(1, rows * cols).to(device=device, dtype=dtype)


def center_prior(
    rows: int,
    cols: int,
    sigma: float = 0.3,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian centre prior ``[rows*cols]``, row-major, scaled so that its maximum is 1.

    ``exp(-(x^2 + y^2) / (2 sigma^2))`` with ``x = linspace(-1, 1, cols)`` and
    ``y = linspace(-1, 1, rows)``. It needs no activations, so it is what the schedule uses in the
    early, noise-dominated steps. Returns a fresh tensor (the cached one stays untouched).
    """
    _check_grid(rows, cols)
    sigma = _check_sigma(sigma, "center_sigma")
    return _center_prior_cached(rows, cols, sigma, torch.device(device or "cpu"), dtype)[0].clone()


# ----------------------------------------------------------------------------------------------
# raw sources


def _token_norms(ca_raw: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norm ``[B, N]`` computed in float32 (float64 for float64 input).

    bf16/fp16 squares are exact in float32, so "convert, square, sum in float32" is the exact
    float32 norm of the stored values. On CUDA (and under torch.compile) the reduction reads the
    low-precision input and accumulates in float32 without a copy. On CPU, torch would first
    convert the whole activation to float32 (an activation-sized allocation whose page faults
    dominate: ~34 ms for [2, 4096, 2048] bf16); instead the rows are converted in cache-sized
    chunks into one reused buffer (~3.4 ms there, bit-identical result).
    """
    acc = torch.promote_types(ca_raw.dtype, torch.float32)  # float32, or float64 for float64 input
    batch, n_tokens, dim = ca_raw.shape
    rows_total = batch * n_tokens
    chunk = max(1, _NORM_CHUNK_ELEMENTS // max(dim, 1))
    if (
        ca_raw.dtype == acc
        or ca_raw.device.type != "cpu"
        or rows_total <= chunk
        or torch.compiler.is_compiling()
    ):
        return torch.linalg.vector_norm(ca_raw, ord=2, dim=-1, dtype=acc)
    flat = ca_raw.reshape(rows_total, dim)
    out = torch.empty(rows_total, dtype=acc, device=ca_raw.device)
    buffer = torch.empty(chunk, dim, dtype=acc, device=ca_raw.device)
    for start in range(0, rows_total, chunk):
        stop = min(start + chunk, rows_total)
        part = buffer[: stop - start]
        part.copy_(flat[start:stop])
        torch.linalg.vector_norm(part, ord=2, dim=-1, out=out[start:stop])
    return out.view(batch, n_tokens)


def norm_mask(ca_raw: torch.Tensor) -> torch.Tensor:
    """Raw mask ``[B, N]`` (float32): per-token L2 norm of ``ca_raw [B, N, D]``, min-max per sample.

    The norm is computed in float32 from the stored values (bf16/fp16 inputs are not rounded
    further), without an activation-sized float32 copy (see :func:`_token_norms`).
    """
    if ca_raw.dim() != 3:
        raise ValueError(f"ca_raw must be [B, N, D], got shape {tuple(ca_raw.shape)}")
    return minmax_normalize(_token_norms(ca_raw).to(torch.float32))


def entropy_mask(attn_probs: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Raw mask ``[B, N]`` (float32) from attention probabilities over identity tokens.

    ``attn_probs`` is ``[B, heads, N, n_id]`` (each row a softmax over the ``n_id`` identity
    tokens). Per token, the entropy ``-sum p log p`` is averaged over heads, min-max normalised per
    sample and inverted, so tokens that focus on few identity tokens (low entropy, typically the
    face) get 1.
    """
    if attn_probs.dim() != 4:
        raise ValueError(
            f"attn_probs must be [B, heads, N, n_id], got shape {tuple(attn_probs.shape)}"
        )
    _check_tokens(attn_probs.shape[2], rows, cols, "attn_probs")
    if attn_probs.shape[-1] < 1 or attn_probs.shape[1] < 1:
        raise ValueError("attn_probs needs at least one head and one identity token")
    # special.entr(p) = -p * log(p), defined as 0 at p = 0.
    entropy = torch.special.entr(attn_probs.float()).sum(dim=-1).mean(dim=1)  # [B, N]
    return 1.0 - minmax_normalize(entropy)


# ----------------------------------------------------------------------------------------------
# refinement


def _pad_mode(length: int, pad: int) -> str:
    # Reflect padding requires length > pad; shorter axes fall back to replication.
    return "reflect" if length > pad else "replicate"


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _blur_matrix_cached(
    length: int, size: int, sigma: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``[length, length]`` matrix ``M`` with ``M @ x`` = the padded 1-D Gaussian blur of ``x``.

    Row ``i`` holds the ``size`` taps centred on ``i``; a tap that falls in the padding adds its
    weight to the token the padding copies (mirrored for reflect, the edge for replicate), so
    every row sums to 1 exactly as the padded convolution does.
    """
    weights = _gaussian_kernel1d_cached(size, sigma, torch.device("cpu"), torch.float64)
    pad = size // 2
    index = torch.arange(length)[:, None] + torch.arange(size)[None, :] - pad  # [L, size]
    if _pad_mode(length, pad) == "reflect":
        index = index.abs()
        index = torch.where(index > length - 1, 2 * (length - 1) - index, index)
    else:
        index = index.clamp(0, length - 1)
    matrix = torch.zeros(length, length, dtype=torch.float64)
    matrix.scatter_add_(1, index, weights.expand(length, size).contiguous())
    return matrix.to(device=device, dtype=dtype)


# Device-side float32 versions of the cached builders, traced by torch.compile (see _cached).


def _kernel_on_device(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    offsets = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    weights = torch.exp(-(offsets * offsets) / (2.0 * sigma * sigma))
    return (weights / weights.sum()).to(dtype)


def _prior_on_device(rows: int, cols: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.linspace(-1.0, 1.0, cols, device=device, dtype=torch.float32)
    y = torch.linspace(-1.0, 1.0, rows, device=device, dtype=torch.float32)
    d2 = y[:, None] ** 2 + x[None, :] ** 2
    prior = torch.exp(-(d2 - d2.min()) / (2.0 * sigma * sigma))
    return prior.reshape(1, rows * cols).to(dtype)


def _blur_matrix_on_device(length: int, size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    weights = _kernel_on_device(size, sigma, device, torch.float32)
    pad = size // 2
    index = torch.arange(length, device=device)[:, None] + torch.arange(size, device=device)[None, :] - pad
    if _pad_mode(length, pad) == "reflect":
        index = index.abs()
        index = torch.where(index > length - 1, 2 * (length - 1) - index, index)
    else:
        index = index.clamp(0, length - 1)
    # One-hot sum instead of scatter_add: elementwise + reduction, trivially fused.
    one_hot = index[:, :, None] == torch.arange(length, device=device)[None, None, :]  # [L, size, L]
    return (one_hot.to(torch.float32) * weights[None, :, None]).sum(dim=1).to(dtype)


_DEVICE_BUILDERS = {
    _gaussian_kernel1d_cached.__name__: _kernel_on_device,
    _center_prior_cached.__name__: _prior_on_device,
    _blur_matrix_cached.__name__: _blur_matrix_on_device,
}


def _separable_blur(grid: torch.Tensor) -> torch.Tensor:
    """Blur ``[B, rows, cols]`` (float32) along columns and rows: ``B_r @ grid @ B_c^T``."""
    rows, cols = grid.shape[-2:]
    along_rows = _cached(_blur_matrix_cached, rows, BLUR_KERNEL_SIZE, BLUR_SIGMA, grid.device, grid.dtype)
    along_cols = _cached(_blur_matrix_cached, cols, BLUR_KERNEL_SIZE, BLUR_SIGMA, grid.device, grid.dtype)
    return torch.matmul(torch.matmul(along_rows, grid), along_cols.mT)


def refine_mask(raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Refined mask ``[B, N]`` (float32) from a raw mask ``[B, N]`` on a ``rows x cols`` grid.

    Blur (5 taps, sigma 1.5) removes token-level speckle; the dilated hard mask (blurred > mean +
    0.5 * std per sample, grown by one token with a 3x3 max-filter) lifts the whole face region
    so its border is not under-injected; ``clamp(0.7 * blurred + 0.3 * hard, 0, 1)`` blends both.
    """
    if raw.dim() != 2:
        raise ValueError(f"raw mask must be [B, N], got shape {tuple(raw.shape)}")
    n_tokens = raw.shape[1]
    _check_tokens(n_tokens, rows, cols, "raw mask")
    batch = raw.shape[0]
    grid = raw.to(torch.float32).reshape(batch, rows, cols)
    blurred = _separable_blur(grid).reshape(batch, n_tokens)

    # Unbiased std (torch's default) is NaN for one token; use 0 there (correction is static).
    std, mean = torch.std_mean(blurred, dim=1, correction=1 if n_tokens > 1 else 0, keepdim=True)
    hard = (blurred > torch.add(mean, std, alpha=HARD_STD_FACTOR)).to(torch.float32)
    # max_pool2d pads with -inf, so border tokens only see real neighbours: a true dilation.
    hard = F.max_pool2d(hard.reshape(batch, 1, rows, cols), kernel_size=3, stride=1, padding=1)
    hard = hard.reshape(batch, n_tokens)
    return torch.add(blurred * BLEND_SOFT, hard, alpha=BLEND_HARD).clamp_(0.0, 1.0)
