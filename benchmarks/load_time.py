"""Load time and peak memory of reading the PuLID-FLUX checkpoint: once (app layer) vs twice (0.1.0).

spatialid 0.1.0's ``generate --id PHOTO`` read the 1.1 GB checkpoint twice: the identity encoder
loaded it for its IDFormer (and threw the CA modules away), then ``SpatialIDPipeline.from_pretrained``
loaded it again. The application layer (``spatialid.app.loading.Models``) reads it once and shares
the IDFormer. This script writes a full-size checkpoint in the published layout with random
weights (no download) and measures both ways, each in a fresh process, so peak RSS is the
process's own (Linux ``VmHWM``, reset after the imports so it is the loading's peak).

    python benchmarks/load_time.py [--dtype bfloat16] [--keep FILE] [--json out.json]
    python benchmarks/load_time.py --first-image [--compile] [--cache fbc:0.3]   # tiny model, no checkpoint

``--first-image`` measures time to first image instead, each in a fresh process with the tiny
model (random weights, CPU unless ``--device``): import (torch, diffusers, transformers, spatialid),
load (``Models(...).pipeline()``: building the models), the
first image (which pays any ``--compile``), and a second image with another seed and identity.
Weights are read through safetensors' ``safe_open`` (the file is memory-mapped; each tensor is
copied once out of the map into its final dtype), so the load is one pass over the file.

It prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import gc, json, resource, sys, time
import torch
from spatialid.app.loading import Models, ModelSpec
from spatialid.models.checkpoint import load_pulid_checkpoint
mode, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    return float("nan")
rss_before_mb = _status("VmRSS")  # after the imports
try:  # Linux: reset the high-water mark so the peak below is the loading's own
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
t0 = time.perf_counter()
def touch(*modules):
    # safetensors maps the file lazily: reading every weight once is what encoding/denoising does
    for module in modules:
        for p in module.parameters():
            p.sum()
if mode == "twice":
    idformer, cas = load_pulid_checkpoint(path, dtype=dtype)   # the encoder's read (0.1.0)
    touch(idformer)                                           # encoding runs the IDFormer
    del cas
    enc_idformer = idformer
    del idformer
    gc.collect()
    del enc_idformer                                          # 0.1.0 freed the encoder before FLUX
    gc.collect()
    idformer, cas = load_pulid_checkpoint(path, dtype=dtype)   # the pipeline's read
    touch(idformer, cas)                                      # denoising runs the CA modules
else:
    models = Models(ModelSpec(model="unused-flux-id", pulid=path, device="cpu", dtype=sys.argv[3]))
    idformer, cas = models.pulid_modules()                     # encoder and pipeline share it
    assert models.pulid_modules()[0] is idformer
    touch(idformer)                                           # the encoder
    touch(idformer, cas)                                      # the pipeline
seconds = time.perf_counter() - t0
params = sum(p.numel() for p in idformer.parameters()) + sum(p.numel() for p in cas.parameters())
peak_mb = _status("VmHWM")
print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mb": peak_mb, "rss_before_load_mb": rss_before_mb, "params": params}))
"""


FIRST_IMAGE_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import diffusers, transformers  # imported here so that load_s is the models' own time
from spatialid.app.loading import Models, ModelSpec
from spatialid.models.configs import TINY_PULID
from spatialid.pipeline import pipeline_spatialid
compile_, cache, device, steps, size = sys.argv[1] == "1", sys.argv[2] or None, sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if int(sys.argv[6]):
    torch.set_num_threads(int(sys.argv[6]))  # 1 on a shared CPU: a descheduled OpenMP worker stalls the others
t_import = time.perf_counter()
pipe = Models(ModelSpec(model="tiny", device=device, compile=compile_, cache=cache)).pipeline()
pipe.set_progress_bar_config(disable=True)
t_load = time.perf_counter()
def tokens(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim, generator=g)
def image(seed):
    pipe(prompt="a person", id_embeds=tokens(seed), preset="paper", num_inference_steps=steps, height=size, width=size,
         seed=seed, output_type="np")
image(1)
t_first = time.perf_counter()
image(2)
t_second = time.perf_counter()
print(json.dumps({"compile": compile_, "cache": cache, "import_s": t_import - t0, "load_s": t_load - t_import,
                  "first_image_s": t_first - t_load, "second_image_s": t_second - t_first,
                  "to_first_image_s": t_first - t0}))
"""


def first_image(args: argparse.Namespace) -> int:
    """Time to first image with the tiny model, in fresh processes (see the module docstring)."""
    rows = []
    for _ in range(args.repeats):
        out = subprocess.run(
            [sys.executable, "-c", FIRST_IMAGE_CHILD, "1" if args.compile else "0", args.cache or "", args.device,
             str(args.steps), str(args.size), str(args.threads)],
            check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    best = {k: min(r[k] for r in rows) for k in ("import_s", "load_s", "first_image_s", "second_image_s", "to_first_image_s")}
    label = ("compiled" if args.compile else "eager") + (f", cache {args.cache}" if args.cache else "")
    print(f"tiny model, {args.size}x{args.size}, {args.steps} steps, {args.device}, {args.threads or 'default'} thread(s), "
          f"{label} (best of {args.repeats})")
    print("| import s | load s | first image s | second image s | to first image s |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {best['import_s']:.2f} | {best['load_s']:.2f} | {best['first_image_s']:.2f} | {best['second_image_s']:.2f} | {best['to_first_image_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "best": best, "compile": args.compile, "cache": args.cache,
                                               "steps": args.steps, "size": args.size, "device": args.device}, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--keep", default=None, help="reuse/keep the random checkpoint at this path")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode (alternating)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--first-image", action="store_true", help="time to first image with the tiny model instead")
    ap.add_argument("--compile", action="store_true", help="with --first-image: ModelSpec(compile=True)")
    ap.add_argument("--cache", default=None, help="with --first-image: a --cache value, e.g. fbc:0.3")
    ap.add_argument("--device", default="cpu", help="with --first-image: cpu or cuda")
    ap.add_argument("--steps", type=int, default=8, help="with --first-image: denoising steps")
    ap.add_argument("--size", type=int, default=256, help="with --first-image: image side in pixels")
    ap.add_argument("--threads", type=int, default=1, help="with --first-image: torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.first_image:
        return first_image(args)

    import torch

    from spatialid.models import PULID_FLUX, build_pulid_modules, save_pulid_checkpoint

    path = Path(args.keep) if args.keep else Path(tempfile.mkdtemp()) / "pulid_flux_random.safetensors"
    if not path.is_file():
        t0 = time.perf_counter()
        idformer, cas = build_pulid_modules(PULID_FLUX, dtype=getattr(torch, args.dtype))
        save_pulid_checkpoint(idformer, cas, path)
        del idformer, cas
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = []
    for _ in range(args.repeats):
        for mode in ("twice", "once"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(path), args.dtype],
                check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    summary = {}
    for mode in ("twice", "once"):
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {
            "seconds_min": min(r["seconds"] for r in mine),
            "rss_before_load_mb": max(r["rss_before_load_mb"] for r in mine),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in mine),
            "params": mine[0]["params"],
        }
    print(f"checkpoint {path.stat().st_size / 1e9:.2f} GB ({args.dtype}), {summary['once']['params']:,} parameters")
    print("| read | load s (best) | RSS before loading MB | peak RSS while loading MB |")
    print("| --- | --- | --- | --- |")
    for mode, label in (("twice", "twice (0.1.0: encoder, then pipeline)"), ("once", "once (app layer, shared)")):
        row = summary[mode]
        print(f"| {label} | {row['seconds_min']:.2f} | {row['rss_before_load_mb']:.0f} | {row['peak_rss_mb_max']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    if not args.keep:
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
