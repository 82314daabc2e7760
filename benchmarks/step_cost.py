#!/usr/bin/env python
"""Per-denoising-step cost of SpatialID against PuLID and plain FLUX (random weights).

Timing does not depend on the weights' values, so every model here has random weights and no
download is needed. One "step" is one forward of diffusers' ``FluxTransformer2DModel`` (what
FluxPipeline runs once per denoising step, twice with true CFG). Variants:

* ``plain``   -- the transformer with the injector attached but no ``active()`` block (the hooks
  return at once; the output is bit-identical to the bare model),
* ``pulid``   -- uniform PuLID injection (schedule ``None``),
* every SpatialID preset (``paper``, ``relaxed``, ``prior-only``, ``attention-only``,
  ``no-relax``, ``entropy``).

Variants are interleaved round by round (the order rotates every round) so that load drift on a
shared machine hits all of them alike. The script reports the median and the inter-quartile range
per variant, the ratios of medians (``ratios["<preset>/pulid"]``, ``ratios["pulid/plain"]``), the
median of the per-round (paired) ratios, peak memory per variant, the cost of the mask computation
alone and of the IDFormer forward.

Sizes (``--size``):

* ``tiny`` -- ``TINY_FLUX`` / ``TINY_PULID`` from ``spatialid.models.configs`` (4 CA modules),
  32 text tokens (``TINY_FLUX.text_max_length``).
* ``mid``  -- FLUX's layout at reduced size, so a CPU run stays under two minutes on two cores:
  10 double + 19 single blocks (half of FLUX's 19 + 38, same injection intervals -> 10 CA
  modules), 8 heads x 32 = 256 wide (FLUX: 24 x 128), rope axes (4, 14, 14), CA modules with
  8 heads x 32 and 256-wide identity tokens, 128 text tokens (FLUX.1-dev's 512 / 4).
* ``full`` -- FLUX.1-dev's architecture: 19 double + 38 single blocks, 24 heads x 128 = 3072
  wide, joint_attention_dim 4096, pooled 768, in_channels 64, rope (16, 56, 56), guidance
  embedding, with the 20 full-size PuLID-FLUX CA modules; 512 text tokens (FLUX.1-dev's
  max_sequence_length).

Image tokens: ``(resolution // 16) ** 2`` (VAE /8, then 2x2 packing). Models are built on the meta
device, moved with ``to_empty`` and initialised in place (fast for the 12B-parameter ``full``).

Clocks: on CUDA the step is timed by wall clock between ``torch.cuda.synchronize`` calls. On a
CPU the default clock is the process CPU time, which a preempted thread does not accumulate;
with ``--threads 1`` it is the most stable measure on a shared machine (with two OpenMP threads a
descheduled worker stalls the other at every barrier and steps vary by 10x). Both clocks are
always recorded. ``point_ms`` times one injection point alone (CA + mask + residual update) and
``estimated_ratios`` rebuild the per-step ratios from it: far less noisy than whole steps.

Examples (see docs/performance.md for the recorded numbers)::

    python benchmarks/step_cost.py --size mid --device cpu --threads 1 --repeats 20 --json mid_cpu.json
    python benchmarks/step_cost.py --size full --device cuda --resolution 1024 --json full_gpu.json
    python benchmarks/step_cost.py --summarize mid_cpu.json full_gpu.json   # markdown rows
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode

# Benchmark the checkout this script belongs to, even when another copy of spatialid is installed.
_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "spatialid").is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from spatialid.injection import IdentityInjector  # noqa: E402
from spatialid.masks import PRESETS, SpatialSchedule  # noqa: E402
from spatialid.models import IDFormer, PerceiverAttentionCA  # noqa: E402
from spatialid.models.configs import PULID_FLUX, TINY_FLUX, TINY_PULID, IDFormerConfig, PerceiverCAConfig  # noqa: E402

# "plain" (no injection) and every preset, in the presets' order.
ALL_VARIANTS: tuple[str, ...] = ("plain", *PRESETS)
VIT_TOKENS = 577  # EVA02-CLIP-L/14 at 336 px: 24 x 24 patches + class token


# ----------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class SizeSpec:
    """Architecture of the benchmarked transformer, its CA modules and the text length."""

    name: str
    num_layers: int
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int
    axes_dims_rope: tuple[int, int, int]
    joint_attention_dim: int
    pooled_projection_dim: int
    in_channels: int
    ca: PerceiverCAConfig
    num_id_tokens: int
    idformer: IDFormerConfig
    text_tokens: int
    default_resolution: int
    double_interval: int = 2
    single_interval: int = 4

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(
        name="tiny",
        num_layers=TINY_FLUX.num_layers,
        num_single_layers=TINY_FLUX.num_single_layers,
        num_attention_heads=TINY_FLUX.num_attention_heads,
        attention_head_dim=TINY_FLUX.attention_head_dim,
        axes_dims_rope=TINY_FLUX.axes_dims_rope,
        joint_attention_dim=TINY_FLUX.joint_attention_dim,
        pooled_projection_dim=TINY_FLUX.pooled_projection_dim,
        in_channels=TINY_FLUX.latent_channels * 4,
        ca=TINY_PULID.ca,
        num_id_tokens=TINY_PULID.idformer.num_queries,
        idformer=TINY_PULID.idformer,
        text_tokens=TINY_FLUX.text_max_length,
        default_resolution=512,
        double_interval=TINY_PULID.double_interval,
        single_interval=TINY_PULID.single_interval,
    ),
    "mid": SizeSpec(
        name="mid",
        num_layers=10,
        num_single_layers=19,
        num_attention_heads=8,
        attention_head_dim=32,
        axes_dims_rope=(4, 14, 14),
        joint_attention_dim=512,
        pooled_projection_dim=96,
        in_channels=64,
        ca=PerceiverCAConfig(dim=256, dim_head=32, heads=8, kv_dim=256),
        num_id_tokens=32,
        idformer=PULID_FLUX.idformer,  # the encoder is timed at its real size
        text_tokens=128,
        default_resolution=256,
    ),
    "full": SizeSpec(
        name="full",
        num_layers=19,
        num_single_layers=38,
        num_attention_heads=24,
        attention_head_dim=128,
        axes_dims_rope=(16, 56, 56),
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        in_channels=64,
        ca=PULID_FLUX.ca,
        num_id_tokens=PULID_FLUX.idformer.num_queries,
        idformer=PULID_FLUX.idformer,
        text_tokens=512,
        default_resolution=1024,
        double_interval=PULID_FLUX.double_interval,
        single_interval=PULID_FLUX.single_interval,
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
    from diffusers import FluxTransformer2DModel

    def flux() -> torch.nn.Module:
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=spec.in_channels,
            num_layers=spec.num_layers,
            num_single_layers=spec.num_single_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            joint_attention_dim=spec.joint_attention_dim,
            pooled_projection_dim=spec.pooled_projection_dim,
            guidance_embeds=True,
            axes_dims_rope=spec.axes_dims_rope,
        )

    transformer = _materialise(flux, device, dtype, seed)
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


# ----------------------------------------------------------------------------------------------
# the benchmark


@dataclass
class Variant:
    name: str  # the preset name (+ modifiers), with COMPILED_SUFFIX for the torch.compile'd model
    schedule: SpatialSchedule | None
    inject: bool
    compiled: bool = False
    people: int = 1  # "+2id": two identities (the multi-identity path), else one
    mask: str = "auto"  # "+fused" / "+eager": force the mask path (spatialid.masks.fused), else the default

    @property
    def base(self) -> str:
        return self.name.removesuffix(COMPILED_SUFFIX)


COMPILED_SUFFIX = "@compiled"
#: Variant modifiers: ``paper+2id`` (two identities), ``paper+fused`` / ``paper+eager`` (mask path).
MODIFIERS = ("2id", "fused", "eager")


def make_variants(names: Sequence[str], compiled: bool = False) -> list[Variant]:
    out = []
    suffix = COMPILED_SUFFIX if compiled else ""
    for name in names:
        base, *mods = name.split("+")
        if any(m not in MODIFIERS for m in mods) or (mods and base == "plain"):
            raise SystemExit(f"unknown variant {name!r}; modifiers of an injected variant: {', '.join('+' + m for m in MODIFIERS)}")
        people = 2 if "2id" in mods else 1
        mask = "fused" if "fused" in mods else "eager" if "eager" in mods else "auto"
        if base == "plain":
            out.append(Variant(name + suffix, None, False, compiled))
        elif base in PRESETS:
            out.append(Variant(name + suffix, PRESETS[base], True, compiled, people, mask))
        else:
            raise SystemExit(f"unknown variant {name!r}; choose from: {', '.join(ALL_VARIANTS)}")
    return out


@contextlib.contextmanager
def mask_path(mode: str):
    """Force the mask path of ``mode`` ("fused", "eager") for ``fused="auto"`` callers, or leave it."""
    from spatialid.masks import fused

    saved = fused.AUTO_DEVICES
    if mode != "auto":
        fused.AUTO_DEVICES = ("cpu", "cuda", "mps") if mode == "fused" else ()
    try:
        yield
    finally:
        fused.AUTO_DEVICES = saved


def session(injector: IdentityInjector, embeds: torch.Tensor, variant: Variant, grid: tuple[int, int]) -> Any:
    """The injector's ``active()`` block for ``variant`` (two identities: a second token set)."""
    if not variant.inject:
        return contextlib.nullcontext()
    tokens: Any = embeds
    if variant.people == 2:
        tokens = [embeds, embeds.flip(1)]  # another identity of the same shape
    return injector.active(tokens, 1.0, variant.schedule, grid)


def time_steps(
    models: dict[bool, Callable[..., Any]],
    injector: IdentityInjector,
    inputs: dict[str, Any],
    embeds: torch.Tensor,
    grid: tuple[int, int],
    variants: Sequence[Variant],
    repeats: int,
    warmup: int,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    """Interleaved timing: every round runs each variant once, in an order rotated per round.

    Returns the per-variant wall-clock and process-CPU step times (seconds, in round order) and
    the duration of each variant's first call (includes torch.compile's compilation when the
    model is compiled). Process CPU time is the robust measure on a shared CPU machine with
    ``--threads 1`` (a preempted thread does not accumulate CPU time); on CUDA use wall time.
    """

    def run(variant: Variant) -> tuple[float, float]:
        model = models[variant.compiled]
        with session(injector, embeds, variant, grid), mask_path(variant.mask):
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            model(**inputs)
            _sync(device)
            return time.perf_counter() - start, time.process_time() - start_cpu

    first_call: dict[str, float] = {}
    for w in range(max(warmup, 1)):
        for v in variants:
            elapsed = run(v)[0]
            if w == 0:
                first_call[v.name] = elapsed
                log(f"  first call {v.name:15s} {elapsed * 1e3:10.1f} ms")
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(repeats):
        shift = r % len(variants)
        for v in list(variants[shift:]) + list(variants[:shift]):
            w, c = run(v)
            wall[v.name].append(w)
            cpu[v.name].append(c)
    return wall, cpu, first_call


def measure_memory(
    models: dict[bool, Callable[..., Any]],
    injector: IdentityInjector,
    inputs: dict[str, Any],
    embeds: torch.Tensor,
    grid: tuple[int, int],
    variants: Sequence[Variant],
    device: torch.device,
) -> dict[str, dict[str, float | None]]:
    """Peak memory of one forward per variant: CUDA max allocated, or sampled process RSS."""
    out: dict[str, dict[str, float | None]] = {}
    for v in variants:
        model = models[v.compiled]
        with session(injector, embeds, v, grid), mask_path(v.mask):
            if device.type == "cuda":
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                model(**inputs)
                _sync(device)
                peak = torch.cuda.max_memory_allocated(device)
                out[v.name] = {"peak_mb": peak / 2**20, "resident_mb": before / 2**20, "activation_peak_mb": (peak - before) / 2**20}
            else:
                with _RSSSampler() as sampler:
                    before = _rss_mb()
                    model(**inputs)
                out[v.name] = {
                    "peak_rss_mb": sampler.peak if before is not None else None,
                    "rss_before_mb": before,
                    "activation_peak_mb": (sampler.peak - before) if before is not None else None,
                }
    return out


def reference_style_update(ca: PerceiverAttentionCA, id_tokens: torch.Tensor, image: torch.Tensor, weight: float) -> torch.Tensor:
    """One PuLID update computed the way the published PuLID-FLUX code does it, for comparison.

    Same weights and maths as ``ca`` (our own code): explicit attention with per-head copies of
    q/k/v, both q and k scaled by ``dim_head ** -0.25``, a float32 softmax cast back, then
    ``h + w * out`` as two separate passes. Our module uses the fused SDPA kernel and a fused
    ``addcmul`` instead; ``point_ms["pulid"]`` vs ``point_ms["pulid-reference"]`` compares them.
    """
    heads = ca.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        bsz, length, _ = t.shape
        return t.view(bsz, length, heads, -1).transpose(1, 2).reshape(bsz, heads, length, -1)

    ctx = ca.norm1(id_tokens)
    lat = ca.norm2(image)
    q = split(ca.to_q(lat))
    k, v = (split(part) for part in ca.to_kv(ctx).chunk(2, dim=-1))
    scale = ca.dim_head**-0.25
    scores = (q * scale) @ (k * scale).transpose(-2, -1)
    probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    out = (probs @ v).permute(0, 2, 1, 3).reshape(image.shape[0], image.shape[1], -1)
    return image + weight * ca.to_out(out)


def time_points(
    transformer: torch.nn.Module,
    injector: IdentityInjector,
    inputs: dict[str, Any],
    embeds: torch.Tensor,
    grid: tuple[int, int],
    variants: Sequence[Variant],
    repeats: int,
    device: torch.device,
    timer: str,
    inner: int = 5,
) -> dict[str, list[float]]:
    """Cost of ONE injection point (CA forward + mask + residual update) per injected variant.

    Uses the injector's public per-call set-up and per-point update (``begin_call`` / ``inject``,
    the code path of its hooks) on an image-token tensor of the real shape, interleaved like the steps.
    Short and repeated many times, it resolves differences far below the step-level noise of a
    shared CPU; ``estimated_ratios`` combine it with the measured plain step.
    """
    injected = [v for v in variants if v.inject and not v.compiled]
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    batch, n_tokens = inputs["hidden_states"].shape[:2]
    gen = torch.Generator(device="cpu").manual_seed(11)
    image = torch.randn(batch, n_tokens, width, generator=gen).to(device=device, dtype=embeds.dtype)
    clock = time.perf_counter if timer == "wall" else time.process_time
    samples: dict[str, list[float]] = {v.name: [] for v in injected}
    names: list[str | None] = [v.name for v in injected]
    if any(v.name == "pulid" for v in injected):
        samples["pulid-reference"] = []
        names.append(None)
    by_name = {v.name: v for v in injected}
    ca = injector.ca_modules[0]
    for r in range(repeats + 1):  # round 0 warms up
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            if name is None:  # the reference-style PuLID update
                start = clock()
                for _ in range(inner):
                    reference_style_update(ca, embeds, image, 1.0)
                _sync(device)
                if r:
                    samples["pulid-reference"].append((clock() - start) / inner)
                continue
            with session(injector, embeds, by_name[name], grid), mask_path(by_name[name].mask):
                injector.begin_call(inputs["hidden_states"], inputs["timestep"])
                _sync(device)
                start = clock()
                for _ in range(inner):
                    injector.inject(0, image)
                _sync(device)
                if r:
                    samples[name].append((clock() - start) / inner)
    return samples


def time_people(
    models: dict[bool, Callable[..., Any]],
    injector: IdentityInjector,
    inputs: dict[str, Any],
    embeds: torch.Tensor,
    grid: tuple[int, int],
    counts: Sequence[int],
    preset: str,
    repeats: int,
    warmup: int,
    device: torch.device,
    timer: str,
) -> dict[str, Any]:
    """Steps and single injection points with 1, 2, 4 identities (several people, docs/multi-identity.md).

    K people run the CA once per person (batched into one call with a shared query projection)
    and the competing masks of ``spatialid.masks.multi``; one person is today's single path. The
    counts are interleaved round by round like the variants; ratios are against one identity.
    """
    gen = torch.Generator(device="cpu").manual_seed(5)
    others = [torch.randn(embeds.shape, generator=gen).to(device=device, dtype=embeds.dtype) for _ in range(max(counts) - 1)]
    people = {k: [embeds, *others[: k - 1]] for k in counts}
    schedule = PRESETS[preset]
    model = models[False]
    clock = time.perf_counter if timer == "wall" else time.process_time
    width = injector.ca_modules[0].dim
    batch, n_tokens = inputs["hidden_states"].shape[:2]
    image = torch.randn(batch, n_tokens, width, generator=torch.Generator().manual_seed(12)).to(device=device, dtype=embeds.dtype)
    steps: dict[int, list[float]] = {k: [] for k in counts}
    points: dict[int, list[float]] = {k: [] for k in counts}

    def tokens(k: int) -> Any:
        return people[k][0] if k == 1 else people[k]

    for r in range(warmup + repeats):
        shift = r % len(counts)
        for k in list(counts[shift:]) + list(counts[:shift]):
            with injector.active(tokens(k), 1.0, schedule, grid):
                _sync(device)
                start = clock()
                model(**inputs)
                _sync(device)
                elapsed = clock() - start
            with injector.active(tokens(k), 1.0, schedule, grid):
                injector.begin_call(inputs["hidden_states"], inputs["timestep"])
                _sync(device)
                start_point = clock()
                for _ in range(5):
                    injector.inject(0, image)
                _sync(device)
                point = (clock() - start_point) / 5
            if r >= warmup:
                steps[k].append(elapsed)
                points[k].append(point)
    step_ms = {f"people{k}": _ms(_summary(v)) for k, v in steps.items()}
    point_ms = {f"people{k}": _ms(_summary(v)) for k, v in points.items()}
    base = step_ms[f"people{counts[0]}"]["median"]
    plain_like = base - len(injector.ca_modules) * point_ms[f"people{counts[0]}"]["median"]
    estimated = {
        f"people{k}/people{counts[0]}": (plain_like + len(injector.ca_modules) * point_ms[f"people{k}"]["median"]) / base
        for k in counts
    }
    paired = {
        f"people{k}/people{counts[0]}": statistics.median(a / b for a, b in zip(steps[k], steps[counts[0]]))
        for k in counts
    }
    return {
        "preset": preset,
        "step_ms": step_ms,
        "point_ms": point_ms,
        "ratios": {f"people{k}/people{counts[0]}": step_ms[f"people{k}"]["median"] / base for k in counts},
        "paired_ratios": paired,
        "estimated_ratios": estimated,
    }


def time_masks(
    spec: SizeSpec, resolution: int, batch: int, device: torch.device, dtype: torch.dtype, names: Sequence[str], repeats: int,
    measure_bytes: bool = True,
) -> dict[str, dict[str, float]]:
    """``schedule.mask`` alone on the real raw shape ``[B, tokens, heads * dim_head]`` (tensor t)."""
    side = resolution // 16
    n = side * side
    gen = torch.Generator(device="cpu").manual_seed(5)
    raw = torch.randn(batch, n, spec.ca.heads * spec.ca.dim_head, generator=gen).to(device=device, dtype=dtype)
    probs = torch.softmax(torch.randn(batch, spec.ca.heads, n, spec.num_id_tokens, generator=gen), dim=-1).to(device)
    t = torch.full((batch,), 0.5, device=device, dtype=dtype)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        schedule = PRESETS.get(name)
        if schedule is None:
            continue
        kwargs = {"attn_probs": probs} if schedule.needs_attention_probs else {}
        for _ in range(3):
            schedule.mask(t, raw, side, side, **kwargs)
        new_bytes = _NewBytes()
        if measure_bytes:  # a dispatch mode: not with the compiled (fused) mask
            with new_bytes:
                schedule.mask(t, raw, side, side, **kwargs)
        samples = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            schedule.mask(t, raw, side, side, **kwargs)
            _sync(device)
            samples.append(time.perf_counter() - start)
        out[name] = {k: (v * 1e3 if k != "n" else v) for k, v in _summary(samples).items()}
        out[name]["allocated_kib"] = new_bytes.total / 1024
    return out


# aten ops that launch no kernel (views, metadata, allocation, no-op casts) when they are leaves.
NON_KERNEL_OPS = {
    "aten::view", "aten::reshape", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::mT",
    "aten::transpose", "aten::permute", "aten::as_strided", "aten::alias", "aten::_unsafe_view", "aten::select",
    "aten::slice", "aten::detach", "aten::lift_fresh", "aten::empty", "aten::empty_strided", "aten::resolve_conj",
    "aten::resolve_neg", "aten::promote_types", "aten::to", "aten::result_type", "aten::contiguous", "aten::chunk",
    "aten::split", "aten::unbind", "aten::flip_view",
}


def count_kernels(fn: Callable[[], Any], device: torch.device) -> list[str]:
    """Kernels one call of ``fn`` launches, from the torch profiler.

    CUDA: the device kernels. CPU: the leaf aten ops that compute (views, allocations and no-op
    casts left out) plus inductor's generated C++ kernels (``torch._inductor.config.cpp.
    enable_kernel_profile`` names them in the profile); a compiled region's bookkeeping is not a kernel.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        return [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]

    def is_kernel(name: str) -> bool:
        return "cpp_fused" in name or "cpp_kernel" in name or (name.startswith("aten::") and name not in NON_KERNEL_OPS)

    def computes_below(event: Any) -> bool:
        return any(is_kernel(c.name) or computes_below(c) for c in event.cpu_children)

    # an op that computes and calls no other computing op (mm under matmul, not matmul)
    return [e.name for e in events if is_kernel(e.name) and not computes_below(e)]


def count_point_ops(
    injector: IdentityInjector,
    transformer: torch.nn.Module,
    inputs: dict[str, Any],
    embeds: torch.Tensor,
    grid: tuple[int, int],
    names: Sequence[str],
    device: torch.device,
) -> dict[str, Any]:
    """Kernels per injection point (CA + mask + update) and of the mask alone, eager vs fused.

    ``fused`` compiles the mask with inductor on first use (seconds on a CPU, once per structure).
    """
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    batch, n_tokens = inputs["hidden_states"].shape[:2]
    image = torch.randn(batch, n_tokens, width, generator=torch.Generator().manual_seed(12)).to(device=device, dtype=embeds.dtype)
    ca = injector.ca_modules[0]
    _, raw, probs = ca(embeds.expand(batch, -1, -1), image, return_probs=True)
    t = inputs["timestep"].float()
    out: dict[str, Any] = {}
    for name in ["pulid", *names]:
        schedule = PRESETS.get(name)
        for mode in ("eager", "fused") if schedule is not None else ("eager",):
            variant = Variant(name, schedule, True, mask=mode)
            with session(injector, embeds, variant, grid), mask_path(mode):
                injector.begin_call(inputs["hidden_states"], inputs["timestep"])
                point = count_kernels(lambda: injector.inject(0, image), device)  # noqa: B023
                extra = {"attn_probs": probs} if schedule is not None and schedule.needs_attention_probs else {}
                mask = count_kernels(lambda: schedule.mask(t, raw, *grid, **extra), device) if schedule is not None else []  # noqa: B023
            entry = out.setdefault(name, {})
            entry[f"point_{mode}"] = len(point)
            if schedule is not None:
                entry[f"mask_{mode}"] = len(mask)
                entry[f"mask_{mode}_kernels"] = mask
    return out


class _NewBytes(TorchDispatchMode):
    """Sum of the bytes of every new tensor an operation sequence allocates (views excluded).

    An upper bound on the extra memory the mask needs per injection point (everything it creates
    counted as if alive at once); it should scale with the token count, not the CA width.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.total += t.untyped_storage().nbytes()
        return result


def time_idformer(spec: SizeSpec, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    """IDFormer forward on random inputs of the real shapes (id_cond [1, 1280], 5 x [1, 577, 1024])."""
    cfg = spec.idformer
    model = _materialise(lambda: IDFormer.from_config(cfg), device, dtype, seed=7)
    gen = torch.Generator(device="cpu").manual_seed(8)
    id_cond = torch.randn(1, cfg.id_cond_dim, generator=gen).to(device=device, dtype=dtype)
    vit = [torch.randn(1, VIT_TOKENS, cfg.vit_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(5)]
    model(id_cond, vit)
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model(id_cond, vit)
        _sync(device)
        samples.append(time.perf_counter() - start)
    del model
    result: dict[str, Any] = {k: (v * 1e3 if k != "n" else v) for k, v in _summary(samples).items()}
    result["config"] = cfg.to_dict()
    result["vit_tokens"] = VIT_TOKENS
    return result


def _ratio_block(times: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratios: dict[str, float] = {}
    paired: dict[str, dict[str, float]] = {}

    def add(num: str, den: str) -> None:
        if num in times and den in times:
            key = f"{num}/{den}"
            ratios[key] = medians[num] / medians[den]
            per_round = [a / b for a, b in zip(times[num], times[den])]
            paired[key] = _summary(per_round)

    for suffix in ("", COMPILED_SUFFIX):
        plain, pulid = "plain" + suffix, "pulid" + suffix
        add(pulid, plain)
        for name in times:
            if name.removesuffix(COMPILED_SUFFIX) + suffix == name and name not in (plain, pulid):
                add(name, pulid)
                add(name, plain)
    for name in times:  # compiled / eager, when both ran
        if name.endswith(COMPILED_SUFFIX):
            add(name, name.removesuffix(COMPILED_SUFFIX))
    for name in times:  # a modified variant over its base: paper+2id/paper, paper+fused/paper
        plain_name = name.removesuffix(COMPILED_SUFFIX)
        if "+" in plain_name:
            add(name, plain_name.split("+")[0] + name[len(plain_name):])
    return ratios, paired


def _environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    return env


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    spec = SIZES[args.size]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    resolution = args.resolution or spec.default_resolution
    if resolution % 16:
        raise SystemExit(f"--resolution must be a multiple of 16, got {resolution}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.count_ops:  # before anything compiles: name inductor's generated C++ kernels in the profile
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    side = resolution // 16
    grid = (side, side)
    variants = [] if args.compile_only else make_variants(args.variants)
    if args.compile or args.compile_only:
        variants += make_variants(args.variants, compiled=True)
    result: dict[str, Any] = {
        "size": spec.name,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "resolution": resolution,
        "batch": args.batch,
        "image_tokens": side * side,
        "text_tokens": spec.text_tokens,
        "t": args.t,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "compile": bool(args.compile or args.compile_only),
        "compile_backend": args.compile_backend if (args.compile or args.compile_only) else None,
        "compile_mode": args.compile_mode if (args.compile or args.compile_only) else None,
        "spec": {**asdict(spec), "ca": spec.ca.to_dict(), "idformer": spec.idformer.to_dict()},
        "environment": _environment(device),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
    }
    log(f"step_cost: size={spec.name} device={device} dtype={result['dtype']} resolution={resolution} "
        f"({side * side} image + {spec.text_tokens} text tokens) batch={args.batch} compile={result['compile']}")

    with torch.inference_mode():
        start = time.perf_counter()
        transformer, ca_modules = build_models(spec, device, dtype)
        injector = IdentityInjector(transformer, ca_modules, spec.double_interval, spec.single_interval)
        result["build_s"] = time.perf_counter() - start
        result["num_ca"] = len(ca_modules)
        result["params_transformer_m"] = sum(p.numel() for p in transformer.parameters()) / 1e6
        result["params_ca_m"] = sum(p.numel() for p in ca_modules.parameters()) / 1e6
        log(f"  built in {result['build_s']:.1f} s: transformer {result['params_transformer_m']:.1f} M params, "
            f"{len(ca_modules)} CA modules {result['params_ca_m']:.1f} M params")
        inputs = make_inputs(spec, resolution, args.batch, device, dtype, args.t)
        gen = torch.Generator(device="cpu").manual_seed(3)
        embeds = torch.randn(1, spec.num_id_tokens, spec.ca.kv_dim, generator=gen).to(device=device, dtype=dtype)

        models: dict[bool, Callable[..., Any]] = {False: transformer}
        if result["compile"]:
            from torch import _dynamo

            _dynamo.reset()
            _dynamo.utils.counters.clear()
            # One graph per distinct schedule (its constants are baked in) plus plain/PuLID: more
            # than dynamo's default limit of 8 entries when all variants run.
            limit_name = "recompile_limit" if hasattr(_dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(_dynamo.config, limit_name, max(getattr(_dynamo.config, limit_name), 4 * len(variants)))
            models[True] = torch.compile(transformer, backend=args.compile_backend, mode=args.compile_mode)

        wall, cpu, first_call = time_steps(models, injector, inputs, embeds, grid, variants, args.repeats, args.warmup, device, log)
        timer = args.timer if args.timer != "auto" else ("wall" if device.type == "cuda" else "cpu")
        times, other = (wall, cpu) if timer == "wall" else (cpu, wall)
        result["timer"] = timer
        result["first_call_ms"] = {k: v * 1e3 for k, v in first_call.items()}
        result["step_ms"] = {k: _ms(_summary(v)) for k, v in times.items()}
        result["ratios"], result["paired_ratios"] = _ratio_block(times)
        other_name = "wall" if timer == "cpu" else "cpu"
        result[f"{other_name}_step_ms"] = {k: _ms(_summary(v)) for k, v in other.items()}
        result[f"{other_name}_ratios"], result[f"{other_name}_paired_ratios"] = _ratio_block(other)
        result["samples_ms"] = {"wall": {k: [x * 1e3 for x in v] for k, v in wall.items()},
                                "cpu": {k: [x * 1e3 for x in v] for k, v in cpu.items()}}
        if not args.compile_only and args.point_repeats > 0:
            points = time_points(transformer, injector, inputs, embeds, grid, variants, args.point_repeats, device, timer)
            result["point_ms"] = {k: _ms(_summary(v)) for k, v in points.items()}
            plain = result["step_ms"]["plain"]["median"]
            n_ca = len(ca_modules)
            est = {k: plain + n_ca * v["median"] for k, v in result["point_ms"].items()}
            result["estimated_ratios"] = {"pulid/plain": est["pulid"] / plain}
            for k in est:
                if k not in ("pulid", "pulid-reference"):
                    result["estimated_ratios"][f"{k}/pulid"] = est[k] / est["pulid"]
            if "pulid-reference" in est:
                result["estimated_ratios"]["pulid/pulid-reference"] = est["pulid"] / est["pulid-reference"]
                result["point_ratios"] = {"pulid/pulid-reference": result["point_ms"]["pulid"]["median"] / result["point_ms"]["pulid-reference"]["median"]}
        if args.count_ops:
            names = [v.base for v in variants if v.inject and v.schedule is not None and "+" not in v.base]
            result["kernels"] = count_point_ops(injector, transformer, inputs, embeds, grid, sorted(set(names)), device)
        if result["compile"]:
            from torch._dynamo.utils import counters

            result["compile_stats"] = {
                "graph_breaks": dict(counters["graph_break"]),
                "unique_graphs": counters["stats"].get("unique_graphs", 0),
                "calls_captured": counters["stats"].get("calls_captured", 0),
                "frames_ok": counters["frames"].get("ok", 0),
                "frames_total": counters["frames"].get("total", 0),
                "recompiles": counters["recompiles"] if "recompiles" in counters else {},
            }
        if args.people:
            result["people"] = time_people(
                models, injector, inputs, embeds, grid, args.people, args.people_preset, args.repeats, args.warmup,
                device, timer,
            )
        if not args.skip_memory:
            result["memory"] = measure_memory(models, injector, inputs, embeds, grid, variants, device)
            result["max_rss_mb"] = _max_rss_mb()
        del models, transformer, ca_modules, injector, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()

        mask_names = [v.name for v in variants if v.inject and v.schedule is not None and not v.compiled]
        mask_names = mask_names or [v.base for v in variants if v.inject and v.schedule is not None]
        result["mask_ms"] = time_masks(spec, resolution, args.batch, device, dtype, mask_names, max(args.repeats, 10))
        result["mask_ms_per_step"] = {k: v["median"] * result["num_ca"] for k, v in result["mask_ms"].items()}
        if args.count_ops:  # the fused mask (compiled once per structure above) timed the same way
            with mask_path("fused"):
                result["mask_ms_fused"] = time_masks(
                    spec, resolution, args.batch, device, dtype, mask_names, max(args.repeats, 10), measure_bytes=False
                )
        if not args.skip_idformer:
            result["idformer_ms"] = time_idformer(spec, device, dtype, max(3, min(args.repeats, 10)))
    if hasattr(os, "getloadavg"):
        result["environment"]["loadavg_end"] = list(os.getloadavg())
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"size={result['size']} device={result['device']} dtype={result['dtype']} res={result['resolution']} "
        f"tokens={result['image_tokens']}+{result['text_tokens']} batch={result['batch']} compile={result['compile']} "
        f"repeats={result['repeats']} timer={result['timer']} threads={result['environment']['cpu_threads']}",
        f"{'variant':24s} {'median ms':>10s} {'q1':>9s} {'q3':>9s} {'min':>9s} {'/pulid':>7s} {'paired':>7s} "
        f"{'/plain':>7s} {'/eager':>7s} {'peak MB':>9s}",
    ]
    ratios, paired = result["ratios"], result["paired_ratios"]
    mem = result.get("memory", {})

    def fmt(value: float | None) -> str:
        return f"{value:.4f}" if value else "-"

    for name, s in result["step_ms"].items():
        suffix = COMPILED_SUFFIX if name.endswith(COMPILED_SUFFIX) else ""
        to_pulid = ratios.get(f"{name}/pulid{suffix}")
        to_plain = ratios.get(f"{name}/plain{suffix}")
        to_eager = ratios.get(f"{name}/{name.removesuffix(COMPILED_SUFFIX)}") if suffix else None
        p = paired.get(f"{name}/pulid{suffix}", {}).get("median")
        m = mem.get(name, {})
        peak = m.get("peak_mb", m.get("peak_rss_mb"))
        lines.append(
            f"{name:24s} {s['median']:10.2f} {s['q1']:9.2f} {s['q3']:9.2f} {s['min']:9.2f} "
            f"{fmt(to_pulid):>7s} {fmt(p):>7s} {fmt(to_plain):>7s} {fmt(to_eager):>7s} "
            f"{(f'{peak:.0f}' if peak else '-'):>9s}"
        )
    if result.get("point_ms"):
        est = result["estimated_ratios"]
        lines.append("one injection point (CA + mask + update): " + ", ".join(
            f"{k} {v['median']:.3f} ms" for k, v in result["point_ms"].items()))
        lines.append("estimated per-step ratios from it: " + ", ".join(f"{k} {v:.4f}" for k, v in est.items()))
    if result.get("people"):
        people = result["people"]
        lines.append(f"several people (preset {people['preset']}): " + ", ".join(
            f"{k} step {v['median']:.2f} ms, point {people['point_ms'][k]['median']:.3f} ms"
            for k, v in people["step_ms"].items()))
        lines.append("  step ratios: " + ", ".join(f"{k} {v:.4f}" for k, v in people["ratios"].items())
                     + " | paired: " + ", ".join(f"{k} {v:.4f}" for k, v in people["paired_ratios"].items())
                     + " | estimated from points: " + ", ".join(f"{k} {v:.4f}" for k, v in people["estimated_ratios"].items()))
    if result.get("mask_ms"):
        lines.append("mask alone (schedule.mask, tensor t): " + ", ".join(
            f"{k} {v['median']:.3f} ms / {v['allocated_kib']:.0f} KiB" for k, v in result["mask_ms"].items())
            + f"  (x{result['num_ca']} per step)")
    if result.get("mask_ms_fused"):
        lines.append("mask alone, fused (compiled): " + ", ".join(
            f"{k} {v['median']:.3f} ms" for k, v in result["mask_ms_fused"].items()))
    if result.get("kernels"):
        lines.append("kernels per injection point (CA + mask + update) / of the mask alone, eager -> fused: " + ", ".join(
            f"{k} {v['point_eager']}" + (f" -> {v['point_fused']} / mask {v['mask_eager']} -> {v['mask_fused']}" if "mask_eager" in v else "")
            for k, v in result["kernels"].items()))
    if result.get("idformer_ms"):
        lines.append(f"IDFormer forward: {result['idformer_ms']['median']:.1f} ms (min {result['idformer_ms']['min']:.1f})")
    return "\n".join(lines)


def summarize(paths: Sequence[Path]) -> str:
    """Markdown table rows (as in docs/performance.md) from result JSON files: one row per file and
    mode (eager, compiled)."""
    head = (
        "| size | device | dtype | res | tokens img+txt | mode | plain ms | PuLID ms | paper ms | relaxed ms "
        "| pulid/plain | paper/pulid | paper/pulid paired [IQR] | relaxed/pulid | est. paper/pulid (per point) "
        "| peak MB plain / pulid / paper |\n|" + "---|" * 16
    )
    rows = [head]
    for path in paths:
        r = json.loads(Path(path).read_text())
        step, ratios, paired = r["step_ms"], r["ratios"], r["paired_ratios"]
        mem = r.get("memory", {})
        device = r["environment"].get("gpu", "CUDA") if r["device"].startswith("cuda") else f"CPU x{r['environment']['cpu_threads']} thr"
        for suffix in ("", COMPILED_SUFFIX):
            if "plain" + suffix not in step:
                continue

            def ms(name: str) -> str:
                return f"{step[name + suffix]['median']:.1f}" if name + suffix in step else "-"  # noqa: B023

            def ratio(num: str, den: str) -> str:
                key = f"{num}{suffix}/{den}{suffix}"  # noqa: B023
                return f"{ratios[key]:.4f}" if key in ratios else "-"

            def peak(name: str) -> str:
                m = mem.get(name + suffix, {})  # noqa: B023
                value = m.get("peak_mb", m.get("peak_rss_mb"))
                return f"{value:.0f}" if value else "-"

            pp = paired.get(f"paper{suffix}/pulid{suffix}")
            paired_text = f"{pp['median']:.4f} [{pp['q1']:.4f}, {pp['q3']:.4f}]" if pp else "-"
            est = r.get("estimated_ratios", {}).get("paper/pulid") if not suffix else None
            mode = "eager" if not suffix else f"compiled ({r.get('compile_backend') or 'inductor'})"
            if suffix and f"plain{suffix}/plain" in ratios:
                mode += f", x{1 / ratios[f'plain{suffix}/plain']:.2f} vs eager"
            rows.append(
                f"| {r['size']} | {device} | {r['dtype']} | {r['resolution']} | {r['image_tokens']}+{r['text_tokens']} "
                f"| {mode} | {ms('plain')} | {ms('pulid')} | {ms('paper')} | {ms('relaxed')} "
                f"| {ratio('pulid', 'plain')} | {ratio('paper', 'pulid')} | {paired_text} | {ratio('relaxed', 'pulid')} "
                f"| {f'{est:.4f}' if est else '-'} | {peak('plain')} / {peak('pulid')} / {peak('paper')} |"
            )
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (tokens = (res/16)^2); default per size: tiny 512, mid 256, full 1024")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--t", type=float, default=0.5, help="flow time passed as `timestep` (sigma in [0, 1])")
    parser.add_argument("--variants", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=list(ALL_VARIANTS),
                        help="comma-separated subset of: " + ",".join(ALL_VARIANTS))
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(transformer): every variant runs eager and compiled, interleaved "
                             "(names '<variant>@compiled'; ratios '<v>@compiled/<v>' give the compile speed-up)")
    parser.add_argument("--compile-only", action="store_true", help="time only the compiled model")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    parser.add_argument("--timer", choices=["auto", "wall", "cpu"], default="auto",
                        help="which clock the medians and ratios use; auto: wall on CUDA, process CPU time on CPU "
                             "(both are always recorded)")
    parser.add_argument("--point-repeats", type=int, default=30,
                        help="rounds of the per-injection-point timing (0 skips it; eager only)")
    parser.add_argument("--skip-idformer", action="store_true")
    parser.add_argument("--count-ops", action="store_true",
                        help="count kernels per injection point and of the mask alone (torch profiler), eager vs the "
                             "fused mask (compiled with inductor on first use), and time the fused mask")
    parser.add_argument("--people", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=[1, 2, 4],
                        help="identity counts for the several-people rows, e.g. 1,2,4 (empty string: skip them)")
    parser.add_argument("--people-preset", default="paper", help="schedule of the several-people rows (default paper)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (atomic)")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="RESULT_JSON",
                        help="only print markdown table rows for these result files (no benchmark)")
    args = parser.parse_args(argv)
    if args.summarize:
        return args
    if "plain" not in args.variants or "pulid" not in args.variants:
        parser.error("--variants must include plain and pulid (the ratios are relative to them)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    result = run_benchmark(args)
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
