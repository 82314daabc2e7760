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

* ``tiny`` -- the offline tiny preset's own transformer and PuLID modules: ``TINY_FLUX`` /
  ``TINY_PULID`` from ``spatialid.models.configs``, the transformer built by
  ``spatialid.pipeline.tiny.build_tiny_transformer`` (4 CA modules), 32 text tokens
  (``TINY_FLUX.text_max_length``).
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

The sizes, models, inputs and clocks are in ``step_cost_setup.py``, the measurements in
``step_cost_measure.py`` beside this file; this script runs them and writes the result file.

Examples (see docs/performance.md for the recorded numbers)::

    python benchmarks/step_cost.py --size mid --device cpu --threads 1 --repeats 20 --json mid_cpu.json
    python benchmarks/step_cost.py --size full --device cuda --resolution 1024 --json full_gpu.json
    python benchmarks/step_cost.py --summarize mid_cpu.json full_gpu.json   # markdown rows
    python benchmarks/step_cost.py --size mid --threads 1 --variants plain,pulid --people "" --words --skip-memory \
        --skip-idformer   # 2 people bound to words vs 2 unbound (goal <= 1.02 per step)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# Benchmark the checkout this script belongs to, even when another copy of spatialid is installed;
# the helpers beside this file import as top-level modules (as cache_drift.py imports this one).
_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "spatialid").is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_cost_measure import (  # noqa: E402
    ALL_VARIANTS,
    COMPILED_SUFFIX,
    count_point_ops,
    make_variants,
    mask_path,
    measure_memory,
    time_idformer,
    time_masks,
    time_people,
    time_points,
    time_steps,
    time_words,
)
from step_cost_setup import SIZES, _max_rss_mb, _ms, _summary, build_models, make_inputs  # noqa: E402
from step_cost_setup import _sync  # noqa: E402, F401  (cache_drift.py times with it)

from spatialid.injection import IdentityInjector  # noqa: E402


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
        "spec": spec.record(),
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
        if args.words:
            result["words"] = time_words(
                models, injector, inputs, embeds, grid, args.people_preset, args.repeats, args.warmup, device, timer,
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
    if result.get("words"):
        words = result["words"]
        lines.append(f"2 people bound to words vs unbound (preset {words['preset']}, t {words['t']:g}, "
                     f"{words['capture_blocks']} capture blocks): " + ", ".join(
                         f"{k} step {v['median']:.2f} ms" for k, v in words["step_ms"].items())
                     + f" | ratio {words['ratio']:.4f}, paired {words['paired_ratio']:.4f}, estimated from the "
                     f"pieces {words['estimated_ratio']:.4f} (capture {words['capture_ms_per_block']['median']:.3f} ms "
                     f"per block, layout {words['layout_ms_per_call']['median']:.3f} ms per call)")
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
    parser.add_argument("--words", action="store_true",
                        help="also time 2 people bound to words against 2 people unbound (--people-preset; t 0.9)")
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
