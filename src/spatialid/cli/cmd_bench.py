"""``spatialid bench``: generate an identities x prompts x presets x seeds grid (IBench-compatible).

Inputs, grid and output folder are checked before any model loads; a grid with nothing left to do
exits without loading one. See docs/benchmark.md for the full IBench commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from spatialid import defaults as D
from spatialid.cli.options import (
    add_model_arguments,
    add_sampling_arguments,
    add_speed_arguments,
    model_spec,
    sampling_settings,
)

__all__ = ["register", "run"]

log = logging.getLogger("spatialid.bench")

def register(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--ids", required=True,
        help="identities: IBench identities .json, a folder of photos, or one photo; several people per image: "
        'a .json with {"groups": [["a.jpg", "b.jpg"], ...]} (see docs/multi-identity.md); or a benchmark file '
        "with its own prompts: XVerseBench's XVerseBench_multi.json / XVerseBench_single.json, "
        "MultiHuman-Testbench's multihuman_metadata.json (see docs/benchmark.md)",
    )
    p.add_argument(
        "--prompts", default=None,
        help="prompts: IBench prompts .json or a .txt with one prompt per line (left out for XVerseBench and "
        "MultiHuman-Testbench --ids, which carry their own)",
    )
    p.add_argument(
        "--presets", default=",".join(D.BENCH_PRESETS),
        help=f"comma-separated mask presets to compare (default {','.join(D.BENCH_PRESETS)}: the PuLID baseline "
        "and the authors' IBench configuration)",
    )
    p.add_argument("--out", required=True, help="output folder (created; re-use it to resume)")
    p.add_argument(
        "--seeds", default=str(D.BENCH_SEED),
        help=f"seeds, e.g. 42 or 42,43 or 42-45 (default {D.BENCH_SEED}, as IBench runs)",
    )
    p.add_argument("--shard", default=None, metavar="K/N", help="only the K-th of N parts of the grid (1-based), for several machines")
    add_sampling_arguments(p, "bench")
    p.add_argument(
        "--limit-ids", type=int, default=None, metavar="N",
        help="only the first N identities of --ids (the authors' ablation: 5)",
    )
    p.add_argument("--limit-prompts", type=int, default=None, metavar="N", help="only the first N prompts (after --prompt-ids)")
    p.add_argument(
        "--prompt-ids", default=None, metavar="LIST",
        help="only the prompts at these indices of --prompts (from 0), e.g. 0,1,5,10,20 (the authors' ablation) "
        "or 0-4; recorded in bench.json",
    )
    p.add_argument(
        "--id-root", default=None,
        help="folder to look for identity photos whose paths in --ids do not exist here (e.g. your IBench checkout: "
        "the path's trailing parts are tried under it)",
    )
    p.add_argument(
        "--paths", default="absolute", metavar="absolute|relative",
        help="image paths in the results files: absolute (default) or relative to the current folder "
        "(then run IBench's evaluator from this folder)",
    )
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also generate each seed/prompt without identity (preset 'none'), needed by eval's background "
        "contamination metrics (default on; the baseline is shared by identities of the same gender)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(p)
    add_speed_arguments(p)
    p.set_defaults(func=run)


def _positive(name: str, value: int | None) -> None:
    from spatialid.bench.datasets import BenchInputError

    if value is not None and value < 1:
        raise BenchInputError(f"{name} must be >= 1, got {value}")


def prepare(args: argparse.Namespace):
    """Validate everything that needs no model: returns (settings, identities, prompts, presets, seeds, shard)."""
    from spatialid.bench.datasets import BenchInputError, check_unique_keys, parse_prompt_ids
    from spatialid.cli.prechecks import model_name_error

    if model_name_error(args.model):  # `--model tny`: a suggestion at once, not a hub error after torch
        raise BenchInputError(model_name_error(args.model))
    from spatialid.bench.datasets_multi import load_bench_inputs
    from spatialid.bench.grid import parse_presets, parse_seeds, parse_shard
    from spatialid.bench.results import parse_path_mode
    from spatialid.bench.runner import BenchSettings
    from spatialid.masks import PRESETS

    tiny = args.model in D.TINY_MODELS
    _positive("--limit-ids", args.limit_ids)
    _positive("--limit-prompts", args.limit_prompts)
    args.paths = parse_path_mode(args.paths)
    presets = parse_presets(args.presets, known=PRESETS)
    seeds = parse_seeds(args.seeds)
    shard = parse_shard(args.shard)
    spec = model_spec(args)
    generation = sampling_settings(args, "bench", tiny=tiny, family=spec.family).check(prompt=False)
    spec.check()  # quantization, offload, device and every weights file, before any model
    if generation.true_cfg <= 1:
        generation = generation.replace(negative_prompt="")  # unused without true CFG: not part of the run
    inputs = load_bench_inputs(
        args.ids, args.prompts, id_root=args.id_root, limit_ids=args.limit_ids, limit_prompts=args.limit_prompts,
        prompt_ids=parse_prompt_ids(args.prompt_ids),
    )
    identities, prompts = inputs.identities, inputs.prompts
    if inputs.note:  # XVerseBench / MultiHuman-Testbench: what of the file is used, in one line
        log.info("%s", inputs.note)
    check_unique_keys(identities)
    known = {p.index for p in prompts}
    for ident in identities:
        unknown = sorted(set(ident.prompt_ids or ()) - known)
        if unknown:
            raise BenchInputError(
                f"group {ident.index} of {args.ids} asks for prompt {unknown[0]}, which is not among the prompts used "
                f"({len(prompts)} from {args.prompts}); fix its \"prompt_ids\""
            )
    quantize = getattr(args, "quantize", "none")
    settings = BenchSettings(
        model=args.model,
        pulid=None if tiny else args.pulid,
        generation=generation,
        dtype=None if args.dtype in (None, "auto") else args.dtype,
        # a quantized or step-cached run makes other images: part of the settings a resume must match
        extra={
            **({} if quantize in (None, "none") else {"quantize": quantize}),
            **({} if getattr(args, "cache", None) in (None, "none") else {"cache": args.cache}),
        },
    )
    return settings, identities, prompts, presets, seeds, shard


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spatialid.bench.grid import process_split
    from spatialid.bench.lock import FolderInUseError, bench_lock
    from spatialid.bench.results import MANIFEST_NAME
    from spatialid.bench.runner import clean_temp_files, consolidate
    from spatialid.utils.io import OutputPathError, check_writable

    settings, identities, prompts, presets, seeds, shard = prepare(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} exists and is not a folder")
    proc = process_split()
    rank, world = proc.index, proc.count
    all_presets = list(dict.fromkeys(["none", *presets]))
    # One run per folder, held from before the model loads until its files are final; the
    # processes of one `accelerate launch` share it (each holds its own part).
    with bench_lock(out, None if world == 1 else rank) as lock:
        # A read-only folder fails now, in one line, not after minutes of model loading (inside
        # the lock, so that no other run's clean-up can take the probe file).
        check_writable(out / MANIFEST_NAME)
        for preset in all_presets:
            if (out / preset / "images").is_dir():
                check_writable(out / preset / "images" / "probe.png", create_parent=False)
        if lock.exclusive:
            clean_temp_files(out)
        failed, summary_line, grid, settings = _run_locked(args, out, proc, settings, identities, prompts, presets, seeds, shard)
        if world == 1:
            # folds part files an earlier multi-process run left; rewrites older-format results
            consolidate(out, all_presets, settings, paths=args.paths, items=grid)
    if world > 1 and proc.synchronized:
        proc.wait_for_everyone()  # every process has released its part: rank 0 may take the folder
        if rank == 0:  # fold the processes' part files into each results.json
            try:
                with bench_lock(out):
                    consolidate(out, all_presets, settings, paths=args.paths, items=grid)
            except FolderInUseError as exc:
                log.warning("part files not folded (%s); readers use their union, the next run folds them", exc)
    elif world > 1:
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


def _count(n: int, one: str, many: str | None = None) -> str:
    """``1 identity``, ``2 identities``: the log line reads as English for any count."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _run_locked(args: argparse.Namespace, out, proc, settings, identities, prompts, presets, seeds, shard):
    """Check the folder against the request, load the model only when work is left, run the loop.

    Returns ``(failed items, summary line, grid, settings with the resolved dtype)``; called with
    the folder lock held.
    """
    from spatialid.bench.grid import build_grid, select_items
    from spatialid.bench.results import update_manifest
    from spatialid.bench.runner import pending_items, run_bench

    rank, world = proc.index, proc.count
    if settings.dtype is None:
        # Record the dtype "auto" resolves to, so that shards run on a CPU and on a GPU (whose
        # images differ) are never mistaken for one run on resume or merge.
        settings = dataclasses.replace(settings, dtype=_auto_dtype_name(args.device, proc.device))
    inputs = {
        "ids": str(args.ids), "prompts": str(args.prompts or args.ids), "id_root": args.id_root, "prompt_ids": args.prompt_ids,
        "limit_ids": args.limit_ids, "limit_prompts": args.limit_prompts,
    }
    manifest_args = dict(
        settings=settings.to_dict(), identities=identities, prompts=prompts, presets=presets, seeds=seeds,
        baseline=args.baseline, paths=args.paths, inputs=inputs,
    )
    # Check the folder against the request now; it is written (by process 0 only) once the model
    # has loaded, so a failed model load leaves no manifest that would block a corrected re-run.
    update_manifest(out, **manifest_args, write=False)
    grid = build_grid(identities, prompts, presets, seeds, baseline=args.baseline)
    items = select_items(grid, shard, rank, world)
    where = f"shard {shard}" + (f", process {rank + 1}/{world}" if world > 1 else "")
    units = len({it.unit for it in grid})
    # identities x prompts, or (XVerseBench, MultiHuman-Testbench, groups with prompt_ids) the pairs used
    pairs = (
        _count(units // len(seeds), "identity-prompt pair") if units != len(identities) * len(prompts) * len(seeds)
        else f"{_count(len(identities), 'identity', 'identities')} x {_count(len(prompts), 'prompt')}"
    )
    log.info(
        "%s x %s x %s%s = %s; this %s: %d",
        pairs, _count(len(seeds), "seed"), _count(len(presets), "preset"), " + baseline" if args.baseline else "",
        _count(len(grid), "item"), where, len(items),
    )
    if not args.baseline and "none" not in presets:
        log.warning(
            "--no-baseline: entries without a baseline image get no imagewithoutid, which IBench's fid, clipi and "
            "antifacesim metrics need (its evaluator stops at fid without it)"
        )
    if settings.model in D.TINY_MODELS:
        log.warning(f"--model {settings.model}: random weights, the images are noise by design (for testing the bench only)")

    pending = pending_items(out, items)
    if not pending:
        update_manifest(out, **manifest_args, write=rank == 0)
        return 0, f"bench: nothing to do, all {len(items)} items of {where} are already in {out}", grid, settings
    generator = _build_generator(args, settings, proc.device)
    generator.out_dir = out  # where group items with regions keep their people's masks
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
        paths=args.paths,
        progress=not args.no_progress and not args.quiet,
        desc=f"bench {where}",
    )
    return summary.failed, summary.line(), grid, settings


def _auto_dtype_name(device: str | None, process_device: str | None) -> str:
    from spatialid.app.loading import dtype_name, resolve_device, resolve_dtype

    if process_device is not None and device in (None, "auto"):
        device = process_device
    return dtype_name(resolve_dtype("auto", resolve_device(device)))


def _build_generator(args: argparse.Namespace, settings, process_device: str | None = None):
    from spatialid.app.loading import Models
    from spatialid.bench.generators import PipelineGenerator

    spec = model_spec(args)
    if process_device is not None and spec.device in (None, "auto"):
        spec = spec.replace(device=process_device)  # accelerate launch: this process's GPU
    pipe = Models(spec.check()).pipeline()
    pipe.set_progress_bar_config(disable=True)  # the bench shows one bar over images
    return PipelineGenerator(pipe, settings)
