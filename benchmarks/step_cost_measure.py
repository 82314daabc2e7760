"""The measurements of ``benchmarks/step_cost.py``: whole steps, single injection points, masks, kernels.

Every function takes the models and inputs of :mod:`step_cost_setup` and returns plain numbers
(seconds, bytes, kernel names); :mod:`step_cost` turns them into the result file.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree
from step_cost_setup import VIT_TOKENS, SizeSpec, _materialise, _ms, _RSSSampler, _rss_mb, _summary, _sync
from torch.utils._python_dispatch import TorchDispatchMode

from spatialid.injection import IdentityInjector
from spatialid.masks import PRESETS, SpatialSchedule
from spatialid.models import IDFormer, PerceiverAttentionCA

# "plain" (no injection) and every preset, in the presets' order.
ALL_VARIANTS: tuple[str, ...] = ("plain", *PRESETS)


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


def time_words(
    models: dict[bool, Callable[..., Any]],
    injector: IdentityInjector,
    inputs: dict[str, Any],
    embeds: torch.Tensor,
    grid: tuple[int, int],
    preset: str,
    repeats: int,
    warmup: int,
    device: torch.device,
    timer: str,
    t: float = 0.9,
) -> dict[str, Any]:
    """Steps with 2 people bound to words against the same 2 people unbound (issue 22).

    Bound people add the word capture (the image queries and a few text keys of the middle
    double blocks' attention, softmax over the image) and the layout from the accumulated maps.
    Timed at ``t`` (default 0.9: a layout step, where the maps are gathered), interleaved round
    by round; each person is bound to two text tokens, as "the boy".
    """
    gen = torch.Generator(device="cpu").manual_seed(6)
    other = torch.randn(embeds.shape, generator=gen).to(device=device, dtype=embeds.dtype)
    people = [embeds, other]
    n_text = int(inputs["encoder_hidden_states"].shape[1])
    words = [[1 % n_text, 2 % n_text], [4 % n_text, 5 % n_text]]
    step_inputs = {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}
    schedule = PRESETS[preset]
    model = models[False]
    clock = time.perf_counter if timer == "wall" else time.process_time
    times: dict[str, list[float]] = {"unbound": [], "words": []}
    for r in range(warmup + repeats):
        order = ["unbound", "words"] if r % 2 == 0 else ["words", "unbound"]
        for name in order:
            with injector.active(people, 1.0, schedule, grid, word_tokens=words if name == "words" else None):
                model(**step_inputs)  # the first call of a session (its word maps start empty)
                _sync(device)
                start = clock()
                model(**step_inputs)
                _sync(device)
                elapsed = clock() - start
            if r >= warmup:
                times[name].append(elapsed)
    step_ms = {k: _ms(_summary(v)) for k, v in times.items()}
    extra = _words_extra_ms(model, injector, step_inputs, words, grid, repeats, device, clock)
    blocks = len(getattr(injector, "_word_attns", []))
    unbound = step_ms["unbound"]["median"]
    return {
        "preset": preset,
        "t": t,
        "capture_blocks": blocks,
        "step_ms": step_ms,
        "ratio": step_ms["words"]["median"] / unbound,
        "paired_ratio": statistics.median(a / b for a, b in zip(times["words"], times["unbound"])),
        "capture_ms_per_block": extra["capture"],
        "layout_ms_per_call": extra["layout"],
        # the extra work timed alone (far less noisy than whole steps on a shared machine)
        "estimated_ratio": (unbound + blocks * extra["capture"]["median"] + extra["layout"]["median"]) / unbound,
    }


def _words_extra_ms(
    model: Any, injector: IdentityInjector, inputs: dict[str, Any], words: list[list[int]], grid: tuple[int, int],
    repeats: int, device: torch.device, clock: Callable[[], float],
) -> dict[str, dict[str, float]]:
    """The two pieces people bound to words add, timed alone: one block's capture (image queries,
    a few text keys, softmax over the image, accumulation) and one call's layout from the maps."""
    from spatialid.injection.words import word_maps, word_table
    from spatialid.masks.compute import bind_words, build_layout

    attn = injector._word_attns[0]
    batch, n = inputs["hidden_states"].shape[:2]
    width = attn.to_q.in_features if hasattr(attn, "to_q") else attn.to_qkv.in_features
    dtype = next(attn.parameters()).dtype
    gen = torch.Generator().manual_seed(13)
    image = torch.randn(batch, n, width, generator=gen).to(device=device, dtype=dtype)
    text = torch.randn(batch, inputs["encoder_hidden_states"].shape[1], width, generator=gen).to(device=device, dtype=dtype)
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]], dim=0)
    rotary = model.pos_embed(ids)
    index, weight, bound, _ = word_table(words, 2)
    index, weight = index.to(device).expand(batch, -1), weight.to(device).expand(batch, -1, -1)
    acc = torch.zeros(2, batch, n, device=device)
    gate = torch.ones(batch, device=device)
    base = build_layout(2, grid[0], grid[1], 0.3, None, device)

    def capture() -> None:
        acc.add_(word_maps(attn, image, text, rotary, index, weight) * gate[None, :, None])

    def layout() -> None:
        bind_words(base, acc, bound, grid[0], grid[1], 0.3)

    out = {}
    for name, fn in (("capture", capture), ("layout", layout)):
        fn()
        samples = []
        for _ in range(max(repeats, 10)):
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            samples.append(clock() - start)
        out[name] = _ms(_summary(samples))
    return out
