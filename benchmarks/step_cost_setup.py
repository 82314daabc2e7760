"""Sizes, random-weight models, inputs and clocks of ``benchmarks/step_cost.py`` (and ``cache_drift.py``).

A size is the project's own records: the FLUX transformer's shape as a
:class:`~spatialid.models.configs.TinyFluxConfig` (the tiny size *is* ``TINY_FLUX``, the record
the offline tiny preset is built from) and the PuLID modules as a
:class:`~spatialid.models.configs.PuLIDFluxConfig` (``TINY_PULID`` / ``PULID_FLUX``). The
transformer is built by :func:`spatialid.pipeline.tiny.build_tiny_transformer` from that record,
so the benchmark's tiny model is the tiny preset's, not a copy of it.
"""

from __future__ import annotations

import math
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spatialid.models import PerceiverAttentionCA
from spatialid.models.configs import (
    PULID_FLUX,
    TINY_FLUX,
    TINY_PULID,
    IDFormerConfig,
    PerceiverCAConfig,
    PuLIDFluxConfig,
    TinyFluxConfig,
)
from spatialid.pipeline.tiny import build_tiny_transformer

__all__ = ["SIZES", "VIT_TOKENS", "SizeSpec", "build_models", "make_inputs", "random_init_"]

VIT_TOKENS = 577  # EVA02-CLIP-L/14 at 336 px: 24 x 24 patches + class token


# ----------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class SizeSpec:
    """One benchmarked size: the transformer (``flux``), its PuLID modules (``pulid``), the default image side.

    The properties name the numbers the benchmark uses, read from the two records.
    """

    name: str
    flux: TinyFluxConfig  # the transformer's shape (text tokens: its text_max_length)
    pulid: PuLIDFluxConfig  # CA modules, IDFormer and the injection intervals
    default_resolution: int

    @property
    def num_layers(self) -> int:
        return self.flux.num_layers

    @property
    def num_single_layers(self) -> int:
        return self.flux.num_single_layers

    @property
    def num_attention_heads(self) -> int:
        return self.flux.num_attention_heads

    @property
    def attention_head_dim(self) -> int:
        return self.flux.attention_head_dim

    @property
    def axes_dims_rope(self) -> tuple[int, int, int]:
        return tuple(self.flux.axes_dims_rope)

    @property
    def joint_attention_dim(self) -> int:
        return self.flux.joint_attention_dim

    @property
    def pooled_projection_dim(self) -> int:
        return self.flux.pooled_projection_dim

    @property
    def in_channels(self) -> int:
        return self.flux.latent_channels * 4  # VAE latent channels packed 2x2

    @property
    def text_tokens(self) -> int:
        return self.flux.text_max_length

    @property
    def width(self) -> int:
        return self.flux.inner_dim

    @property
    def ca(self) -> PerceiverCAConfig:
        return self.pulid.ca

    @property
    def idformer(self) -> IDFormerConfig:
        return self.pulid.idformer

    @property
    def num_id_tokens(self) -> int:
        return self.pulid.idformer.num_queries

    @property
    def double_interval(self) -> int:
        return self.pulid.double_interval

    @property
    def single_interval(self) -> int:
        return self.pulid.single_interval

    def record(self) -> dict[str, Any]:
        """The size as result files record it (``"spec"``: one flat dict, the same keys as ever)."""
        return {
            "name": self.name, "num_layers": self.num_layers, "num_single_layers": self.num_single_layers,
            "num_attention_heads": self.num_attention_heads, "attention_head_dim": self.attention_head_dim,
            "axes_dims_rope": self.axes_dims_rope, "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim, "in_channels": self.in_channels,
            "ca": self.ca.to_dict(), "num_id_tokens": self.num_id_tokens, "idformer": self.idformer.to_dict(),
            "text_tokens": self.text_tokens, "default_resolution": self.default_resolution,
            "double_interval": self.double_interval, "single_interval": self.single_interval,
        }


SIZES: dict[str, SizeSpec] = {
    # the offline tiny preset's own transformer and PuLID modules
    "tiny": SizeSpec("tiny", TINY_FLUX, TINY_PULID, default_resolution=512),
    # FLUX's layout at reduced size: half the blocks (same intervals -> 10 CA modules), 256 wide; the
    # encoder is timed at its real size
    "mid": SizeSpec(
        "mid",
        TinyFluxConfig(
            num_layers=10, num_single_layers=19, attention_head_dim=32, num_attention_heads=8,
            axes_dims_rope=(4, 14, 14), latent_channels=16, joint_attention_dim=512, pooled_projection_dim=96,
            text_max_length=128,
        ),
        PuLIDFluxConfig(
            idformer=PULID_FLUX.idformer, ca=PerceiverCAConfig(dim=256, dim_head=32, heads=8, kv_dim=256), num_ca=10,
        ),
        default_resolution=256,
    ),
    # FLUX.1-dev's architecture with the published PuLID-FLUX modules
    "full": SizeSpec(
        "full",
        TinyFluxConfig(
            num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
            axes_dims_rope=(16, 56, 56), latent_channels=16, joint_attention_dim=4096, pooled_projection_dim=768,
            text_max_length=512,
        ),
        PULID_FLUX,
        default_resolution=1024,
    ),
}


# ----------------------------------------------------------------------------------------------
# model construction


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter in place, on its own device (12B values would take minutes to draw on
    the host): matrices ~ N(0, 1/fan_in) (keeps activations O(1), so no overflow, NaN or denormal
    slows a kernel down), 1-D ``*weight`` (norm scales) = 1, biases = 0."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.normal_(0.0, math.prod(param.shape[1:]) ** -0.5, generator=gen)
        elif name.endswith("weight"):
            param.fill_(1.0)
        else:
            param.zero_()


def _materialise(build: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        module = build()
    # nn.Module.to (not diffusers' override, which warns about dtype casts): free on meta, so
    # to_empty then allocates the parameters directly in the target dtype.
    module = torch.nn.Module.to(module, dtype=dtype).to_empty(device=device)
    if any(True for _ in module.buffers()):
        raise RuntimeError(f"{type(module).__name__} has buffers; meta construction would leave them empty")
    random_init_(module, seed)
    return module.eval().requires_grad_(False)


def build_models(spec: SizeSpec, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The FLUX transformer and its CA modules (random weights) on ``device`` in ``dtype``."""
    transformer = _materialise(lambda: build_tiny_transformer(spec.flux), device, dtype, seed)
    num_ca = len(range(0, spec.num_layers, spec.double_interval)) + len(range(0, spec.num_single_layers, spec.single_interval))
    ca_modules = _materialise(
        lambda: torch.nn.ModuleList(PerceiverAttentionCA.from_config(spec.ca) for _ in range(num_ca)), device, dtype, seed + 1
    )
    return transformer, ca_modules


def make_inputs(spec: SizeSpec, resolution: int, batch: int, device: torch.device, dtype: torch.dtype, t: float, seed: int = 2) -> dict[str, Any]:
    """Transformer kwargs as FluxPipeline builds them (timestep = sigma in [0, 1], model dtype)."""
    side = resolution // 16
    n_img = side * side
    gen = torch.Generator(device="cpu").manual_seed(seed)
    img_ids = torch.zeros(n_img, 3)
    img_ids[:, 1] = torch.arange(side).repeat_interleave(side).float()
    img_ids[:, 2] = torch.arange(side).repeat(side).float()

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return dict(
        hidden_states=rand(batch, n_img, spec.in_channels),
        encoder_hidden_states=rand(batch, spec.text_tokens, spec.joint_attention_dim),
        pooled_projections=rand(batch, spec.pooled_projection_dim),
        timestep=torch.full((batch,), t, device=device, dtype=dtype),
        img_ids=img_ids.to(device=device, dtype=dtype),
        txt_ids=torch.zeros(spec.text_tokens, 3, device=device, dtype=dtype),
        guidance=torch.full((batch,), 3.5, device=device, dtype=torch.float32),
        return_dict=False,
    )


# ----------------------------------------------------------------------------------------------
# timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(values: Sequence[float]) -> dict[str, float]:
    vals = sorted(values)
    if len(vals) >= 4:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1, q3 = vals[0], vals[-1]
    return {
        "median": statistics.median(vals),
        "q1": q1,
        "q3": q3,
        "min": vals[0],
        "max": vals[-1],
        "n": len(vals),
    }


def _ms(summary: dict[str, float]) -> dict[str, float]:
    return {k: (v * 1e3 if k != "n" else v) for k, v in summary.items()}


def _rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil is optional
        return None


def _max_rss_mb() -> float:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class _RSSSampler:
    """Poll the process RSS in a thread while a forward runs (CPU peak memory per variant)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak: float = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _rss_mb()
            if rss is not None:
                self.peak = max(self.peak, rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> _RSSSampler:
        self.peak = _rss_mb() or 0.0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        rss = _rss_mb()
        if rss is not None:
            self.peak = max(self.peak, rss)
