"""``spatialid bench``: generate an identities x prompts x presets x seeds grid (IBench-compatible).

Inputs, grid and output folder are checked before any model loads; a grid with nothing left to do
exits without loading one. See docs/benchmark.md for the full IBench commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

__all__ = ["register", "run"]

log = logging.getLogger("spatialid.bench")

# IBench runs of PuLID-FLUX / SpatialID: 896x1152, 25 steps, guidance 4, seed 42.
DEFAULT_SIZE = "896x1152"
DEFAULT_STEPS = 25
TINY_SIZE = "64x64"
TINY_STEPS = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    from spatialid.cli.cmd_generate import add_model_arguments

    p = subparsers.add_parser(
        "bench",
        help="generate a benchmark grid (identities x prompts x presets x seeds), IBench-compatible",
        description=(
            "Generate one image per identity x prompt x preset x seed into --out, with an IBench results "
            "JSON per preset, written after every image. Re-running the same command resumes; --shard K/N "
            "splits the grid across machines (join them with `spatialid merge`); under `accelerate launch` "
            "the GPUs of one machine split it. With --model tiny everything is offline and the images are "
            "noise by design (random weights)."
        ),
    )
    p.add_argument("--ids", required=True, help="identities: IBench identities .json, a folder of photos, or one photo")
    p.add_argument("--prompts", required=True, help="prompts: IBench prompts .json or a .txt with one prompt per line")
    p.add_argument("--presets", default="pulid,paper", help="comma-separated mask presets to compare (default pulid,paper)")
    p.add_argument("--out", required=True, help="output folder (created; re-use it to resume)")
    p.add_argument("--seeds", default="42", help="seeds, e.g. 42 or 42,43 or 42-45 (default 42, as IBench runs)")
    p.add_argument("--shard", default=None, metavar="K/N", help="only the K-th of N parts of the grid (1-based), for several machines")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEFAULT_STEPS}; tiny model {TINY_STEPS})")
    p.add_argument("--size", default=None, metavar="WxH", help=f"image size (default {DEFAULT_SIZE}; tiny model {TINY_SIZE})")
    p.add_argument("--guidance", type=float, default=4.0, help="FLUX embedded guidance (default 4.0)")
    p.add_argument("--id-weight", type=float, default=1.0, help="identity strength (default 1.0)")
    p.add_argument("--start-step", type=int, default=0, help="first denoising step with identity (default 0)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="true CFG scale, 1 = off (default 1.0)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for true CFG")
    p.add_argument("--limit-ids", type=int, default=None, metavar="N", help="only the first N identities")
    p.add_argument("--limit-prompts", type=int, default=None, metavar="N", help="only the first N prompts")
    p.add_argument("--id-root", default=None, help="folder to look for identity photos whose paths in --ids do not exist here")
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also generate each seed/prompt without identity (preset 'none'), needed by eval's background "
        "contamination metrics (default on; the baseline is shared by identities of the same gender)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(p)
    p.set_defaults(func=run)


def _positive(name: str, value: int | None) -> None:
    from spatialid.bench.datasets import BenchInputError

    if value is not None and value < 1:
        raise BenchInputError(f"{name} must be >= 1, got {value}")


def prepare(args: argparse.Namespace):
    """Validate everything that needs no model: returns (settings, identities, prompts, presets, seeds, shard)."""
    from spatialid.bench.datasets import check_unique_keys, load_identities, load_prompts
    from spatialid.bench.grid import parse_presets, parse_seeds, parse_shard
    from spatialid.bench.runner import BenchSettings
    from spatialid.masks import PRESETS
    from spatialid.pipeline.settings import check_generation_settings, parse_size

    tiny = args.model == "tiny"
    _positive("--limit-ids", args.limit_ids)
    _positive("--limit-prompts", args.limit_prompts)
    presets = parse_presets(args.presets, known=PRESETS)
    seeds = parse_seeds(args.seeds)
    shard = parse_shard(args.shard)
    width, height = parse_size(args.size or (TINY_SIZE if tiny else DEFAULT_SIZE))
    steps = args.steps if args.steps is not None else (TINY_STEPS if tiny else DEFAULT_STEPS)
    check_generation_settings(
        num_inference_steps=steps,
        height=height,
        width=width,
        id_weight=args.id_weight,
        start_step=args.start_step,
        true_cfg=args.true_cfg,
        guidance_scale=args.guidance,
    )
    identities = load_identities(args.ids, id_root=args.id_root, limit=args.limit_ids)
    check_unique_keys(identities)
    prompts = load_prompts(args.prompts, limit=args.limit_prompts)
    quantize = getattr(args, "quantize", "none")
    settings = BenchSettings(
        model=args.model,
        pulid=None if tiny else args.pulid,
        steps=int(steps),
        width=width,
        height=height,
        guidance=float(args.guidance),
        id_weight=float(args.id_weight),
        true_cfg=float(args.true_cfg),
        start_step=int(args.start_step),
        negative_prompt=args.negative_prompt if float(args.true_cfg) > 1 else "",
        dtype=None if args.dtype in (None, "auto") else args.dtype,
        extra={} if quantize in (None, "none") else {"quantize": quantize},
    )
    return settings, identities, prompts, presets, seeds, shard


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spatialid.bench.grid import build_grid, process_split, select_items
    from spatialid.bench.results import update_manifest
    from spatialid.bench.runner import consolidate, pending_items, run_bench
    from spatialid.pipeline.metadata import OutputPathError

    settings, identities, prompts, presets, seeds, shard = prepare(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create --out {out}: {exc.strerror or exc}") from None

    proc = process_split()
    rank, world = proc.index, proc.count
    if settings.dtype is None:
        # Record the dtype "auto" resolves to, so that shards run on a CPU and on a GPU (whose
        # images differ) are never mistaken for one run on resume or merge.
        settings = dataclasses.replace(settings, dtype=_auto_dtype_name(args.device, proc.device))
    manifest_args = dict(
        settings=settings.to_dict(), identities=identities, prompts=prompts, presets=presets, seeds=seeds,
        baseline=args.baseline,
    )
    # Check the folder against the request now; it is written (by process 0 only) once the model
    # has loaded, so a failed model load leaves no manifest that would block a corrected re-run.
    update_manifest(out, **manifest_args, write=False)
    grid = build_grid(identities, prompts, presets, seeds, baseline=args.baseline)
    items = select_items(grid, shard, rank, world)
    where = f"shard {shard}" + (f", process {rank + 1}/{world}" if world > 1 else "")
    log.info(
        "%d identities x %d prompts x %d seeds x %d presets%s = %d items; this %s: %d",
        len(identities), len(prompts), len(seeds), len(presets), " + baseline" if args.baseline else "",
        len(grid), where, len(items),
    )
    if settings.model == "tiny":
        log.warning("--model tiny: random weights, the images are noise by design (for testing the bench only)")

    pending = pending_items(out, items)
    summary_line = None
    if pending:
        generator = _build_generator(args, settings, proc.device)
        update_manifest(out, **manifest_args, write=rank == 0)
        from spatialid.bench.generators import embedding_io
        from spatialid.bench.runner import EmbeddingCache

        save_fn, load_fn = embedding_io()
        cache = EmbeddingCache(out / "embeddings", generator.encode, encoder_name=generator.encoder_name, save_fn=save_fn, load_fn=load_fn)
        summary = run_bench(
            items,
            out,
            settings=settings,
            generate_fn=generator,
            embeddings=cache,
            part=None if world == 1 else rank,
            progress=not args.no_progress and not args.quiet,
            desc=f"bench {where}",
        )
        summary_line = summary.line()
        failed = summary.failed
    else:
        update_manifest(out, **manifest_args, write=rank == 0)
        failed = 0
        summary_line = f"bench: nothing to do, all {len(items)} items of {where} are already in {out}"
    all_presets = list(dict.fromkeys(["none", *presets]))
    if world == 1:
        consolidate(out, all_presets, settings)  # folds part files an earlier multi-process run left
    elif proc.synchronized:
        proc.wait_for_everyone()
        if rank == 0:  # fold the processes' part files into each results.json
            consolidate(out, all_presets, settings)
    else:
        log.info(
            "processes wrote results.part<N>.json files (no barrier to fold them now); readers use their union and "
            "the next single-process run (or `spatialid merge`) folds them into results.json"
        )
    print(summary_line, file=sys.stderr)
    if failed:
        print(
            f"spatialid: {failed} items failed; their errors are under \"failures\" in {out}/<preset>/results.json; "
            "re-run the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def _auto_dtype_name(device: str | None, process_device: str | None) -> str:
    from spatialid.cli.cmd_generate import resolve_device, resolve_dtype

    if process_device is not None and device in (None, "auto"):
        device = process_device
    return str(resolve_dtype("auto", resolve_device(device))).removeprefix("torch.")


def _build_generator(args: argparse.Namespace, settings, process_device: str | None = None):
    from spatialid.bench.generators import PipelineGenerator
    from spatialid.cli.cmd_generate import load_pipeline, resolve_device, resolve_dtype

    device = args.device
    if process_device is not None and device in (None, "auto"):
        device = process_device  # accelerate launch: this process's GPU
    device = resolve_device(device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(
        args.model,
        pulid=args.pulid,
        offload=args.offload,
        quantize=getattr(args, "quantize", None),
        device=device,
        dtype=dtype,
        offline=getattr(args, "offline", False),
        cache_dir=getattr(args, "cache_dir", None),
    )
    pipe.set_progress_bar_config(disable=True)  # the bench shows one bar over images
    return PipelineGenerator(pipe, settings)
