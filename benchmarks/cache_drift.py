#!/usr/bin/env python
"""Step caches with identity injection: drift, identity kept, steps skipped, time (random weights).

A denoising loop (Euler on FLUX's flow, shifted sigmas, one ``cache_context("cond")`` per call as
FluxPipeline does) over the transformer of ``benchmarks/step_cost.py`` (``tiny`` / ``mid`` /
``full``), with the identity injector attached. For each preset and cache it generates once with
the identity and once without, and reports, against the uncached run of the same preset:

* ``drift``: ``||x_cache - x_ref|| / ||x_ref||`` of the final latents with identity,
* ``identity_cos`` / ``identity_ratio``: cosine and norm ratio of the identity's effect
  ``x(id) - x(no id)`` cached against uncached (1 / 1 = the identity is kept exactly),
* ``computed`` / ``cached``: transformer calls that ran every block / reused the residual (FBC),
* ``ms``: one generation's time (wall on CUDA, process CPU time on the CPU), and with
  ``--compile`` the same for the torch.compile'd transformer.

Random weights make the absolute drift meaningless for image quality; the comparison between
caches, the identity numbers and the skipped steps are what it measures. It prints numbers; it is
not a test.

    python benchmarks/cache_drift.py --size tiny --steps 20 --json tiny_cache.json
    python benchmarks/cache_drift.py --size mid --steps 20 --caches none,fbc:0.05,fbc:0.08,fbc:0.12,taylorseer:4,pab:2
    python benchmarks/cache_drift.py --size full --device cuda --resolution 1024 --steps 12 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost

from spatialid.injection import IdentityInjector
from spatialid.injection.step_cache import enable_step_cache, parse_cache
from spatialid.masks import PRESETS


def sigmas_for(steps: int, shift: float = 3.0) -> torch.Tensor:
    """FLUX-style shifted sigmas from 1 to 0 (``steps + 1`` values)."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def generate(
    model: Any, transformer: Any, injector: IdentityInjector, inputs: dict[str, Any], latents: torch.Tensor,
    sigmas: torch.Tensor, embeds: Any, schedule: Any, grid: tuple[int, int], clock: Any, device: torch.device,
    now: dict[str, float],
) -> tuple[torch.Tensor, float]:
    """One Euler generation; returns the final latents (float32) and its duration on ``clock``."""
    x = latents.clone()
    step_cost._sync(device)
    start = clock()
    with injector.active(embeds, 1.0, schedule, grid, sigmas=sigmas.float()) if embeds is not None else _null():
        for i in range(len(sigmas) - 1):
            now["t"] = float(sigmas[i]) * 1000.0
            t = torch.full((x.shape[0],), float(sigmas[i]), device=device, dtype=x.dtype)
            with transformer.cache_context("cond"):
                v = model(**{**inputs, "hidden_states": x, "timestep": t})[0]
            x = (x.float() + float(sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
    step_cost._sync(device)
    elapsed = clock() - start
    if hasattr(transformer, "_reset_stateful_cache"):
        transformer._reset_stateful_cache()  # what FluxPipeline does after each call
    return x.float(), elapsed


class _null:
    """A ``with`` block that does nothing (the run without identity)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(step_cost.SIZES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--presets", default="pulid,paper")
    ap.add_argument("--caches", default="none,fbc:0.08,fbc:0.3,fbc:0.5,fbc:0.8,taylorseer:4,pab:2")
    ap.add_argument("--compile", action="store_true", help="also run each configuration with the compiled transformer")
    ap.add_argument("--compiled-caches", default=None, help="caches to run compiled (default: all of --caches)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    spec = step_cost.SIZES[args.size]
    resolution = args.resolution or spec.default_resolution
    side = resolution // 16
    grid = (side, side)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    compiled_caches = caches if args.compiled_caches is None else [c.strip() for c in args.compiled_caches.split(",") if c.strip()]
    for name in caches + compiled_caches:
        parse_cache(name)  # a typo fails before the model is built
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]

    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        transformer, cas = step_cost.build_models(spec, device, dtype)
        injector = IdentityInjector(transformer, cas, spec.double_interval, spec.single_interval)
        inputs = step_cost.make_inputs(spec, resolution, 1, device, dtype, 1.0)
        latents = inputs.pop("hidden_states")
        inputs.pop("timestep")
        gen = torch.Generator().manual_seed(3)
        # random weights give a small identity residual; scale the tokens so its effect is visible
        embeds = (4.0 * torch.randn(1, spec.num_id_tokens, spec.ca.kv_dim, generator=gen)).to(device=device, dtype=dtype)
        sigmas = sigmas_for(args.steps)
        now = {"t": 1000.0}
        modes: list[tuple[str, Any, list[str]]] = [("eager", transformer, caches)]
        if args.compile:
            from torch import _dynamo

            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
            modes.append(("compiled", torch.compile(transformer), compiled_caches))
        for mode, model, mode_caches in modes:
            for preset in presets:
                schedule = PRESETS[preset]
                ref: dict[str, torch.Tensor] = {}
                for cache_name in mode_caches:
                    cache = None
                    parsed = parse_cache(cache_name)
                    if parsed is not None:
                        cache = enable_step_cache(transformer, injector, parsed, current_timestep=lambda: now["t"])
                    try:
                        generate(model, transformer, injector, inputs, latents, sigmas, embeds, schedule, grid, clock, device, now)  # warm-up / compile
                        if cache is not None:
                            cache.reset_counts()
                        with_id, ms = generate(model, transformer, injector, inputs, latents, sigmas, embeds, schedule, grid, clock, device, now)
                        computed, cached = (cache.computed, cache.cached) if cache is not None else (args.steps, 0)
                        without_id, _ = generate(model, transformer, injector, inputs, latents, sigmas, None, schedule, grid, clock, device, now)
                    finally:
                        if cache is not None:
                            cache.disable()
                    effect = with_id - without_id
                    if parsed is None:
                        ref = {"x": with_id, "effect": effect}
                    row = {"mode": mode, "preset": preset, "cache": cache_name, "ms": ms * 1e3,
                           "computed": computed, "cached": cached}
                    if ref:
                        row["drift"] = float((with_id - ref["x"]).norm() / ref["x"].norm())
                        row["identity_cos"] = float(torch.nn.functional.cosine_similarity(effect.flatten(), ref["effect"].flatten(), dim=0))
                        row["identity_ratio"] = float(effect.norm() / ref["effect"].norm())
                        row["identity_effect"] = float(effect.norm() / ref["x"].norm())
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    base = next((r["ms"] for r in rows if r["mode"] == "eager" and r["preset"] == "pulid" and r["cache"] == "none"), None)
    print(f"\n{args.size} {resolution}px {args.steps} steps {str(dtype).replace('torch.', '')} on {device}")
    print("| mode | preset | cache | ms / generation | x vs eager PuLID | computed / cached calls | drift | identity cos | identity ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{base / r['ms']:.2f}" if base else "-"
        print(f"| {r['mode']} | {r['preset']} | {r['cache']} | {r['ms']:.0f} | {speed} | {r['computed']} / {r['cached']} | "
              f"{r.get('drift', float('nan')):.4f} | {r.get('identity_cos', float('nan')):.4f} | {r.get('identity_ratio', float('nan')):.3f} |")
    if args.json:
        env = {"torch": torch.__version__, "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "cpu_threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
        out = {"size": args.size, "resolution": resolution, "steps": args.steps, "dtype": str(dtype), "environment": env,
               "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]), "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
