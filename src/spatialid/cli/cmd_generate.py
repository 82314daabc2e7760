"""``spatialid generate``: one photo + one prompt -> images of that person (PNG with settings).

This module only parses arguments: the settings record, the model loading and the output files
belong to :mod:`spatialid.app`. Every check that can fail quickly (numbers, prompt, preset names,
the photo, the output folder, CUDA) runs before any model is loaded, so a typo costs
milliseconds, not a model load.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spatialid import defaults as D
from spatialid.cli.options import (
    add_model_arguments,
    add_sampling_arguments,
    model_spec,
    sampling_settings,
)

__all__ = ["register", "run", "build_job"]

log = logging.getLogger("spatialid.generate")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate images of a person from a photo and a prompt",
        description=(
            "Generate images of the person in --id following --prompt with FLUX.1 + PuLID-FLUX and a "
            "SpatialID mask schedule. Each PNG stores its settings (read them with `spatialid info`). "
            "'--model tiny' runs offline with random weights: its images are noise by design."
        ),
    )
    ident = p.add_mutually_exclusive_group()
    ident.add_argument(
        "--id",
        dest="id_images",
        action="append",
        metavar="PHOTO",
        help="photo of the person (repeat for several photos of the same person: their identity tokens are averaged)",
    )
    ident.add_argument(
        "--id-embeds", metavar="EMBEDS", default=None, help="identity file written by `spatialid encode` (.safetensors)"
    )
    p.add_argument("--prompt", required=True, help="what to draw, e.g. \"portrait, oil painting\"")
    p.add_argument(
        "--preset", default=D.DEFAULT_PRESET,
        help=f"mask schedule preset: pulid, paper, relaxed, prior-only, attention-only, no-relax, entropy (default {D.DEFAULT_PRESET})",
    )
    add_sampling_arguments(p, "generate")
    p.add_argument(
        "--cfg-start-step", type=int, default=D.DEFAULT_CFG_START_STEP,
        help=f"first step where true CFG applies (PuLID-FLUX: {D.DEFAULT_CFG_START_STEP})",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed and stored in the PNG)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate (image i uses seed + i)")
    p.add_argument(
        "--max-sequence-length", type=int, default=None,
        help=f"T5 prompt tokens (default {D.DEFAULT_MAX_SEQUENCE_LENGTH} as PuLID-FLUX)",
    )
    p.add_argument("--out", default=None, help="output PNG, or a folder (default outputs/spatialid-<time>-s<seed>.png)")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace existing output files (default: an existing name gets a free numbered one, e.g. out-2.png)",
    )
    p.add_argument("--masks", action="store_true", help="also write <out>_masks.png: the identity mask at early/mid/late steps over the image")
    p.add_argument(
        "--compare",
        default=None,
        metavar="PRESETS",
        help="also write <out>_compare.png: the same seed and prompt under these comma-separated presets, e.g. pulid,paper,relaxed",
    )
    add_model_arguments(p)
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- helpers


def parse_compare(text: str | None) -> list[str] | None:
    from spatialid.errors import SpatialIDError

    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SpatialIDError("--compare is empty; give presets separated by commas, e.g. pulid,paper,relaxed")
    return list(dict.fromkeys(names))


def check_presets(names: list[str]) -> None:
    from spatialid.errors import SpatialIDError
    from spatialid.masks import PRESETS

    for n in names:
        if n not in PRESETS:
            raise SpatialIDError(f"unknown preset {n!r}; valid presets: {', '.join(PRESETS)}")


def _check_identity_inputs(args: argparse.Namespace) -> None:
    """Open the photos / embedding file now: a bad path must not cost a model load."""
    from spatialid.errors import InputImageError

    if args.id_images:
        from spatialid.utils.images import load_image

        for path in args.id_images:
            load_image(path)
    if args.id_embeds:
        p = Path(args.id_embeds)
        if not p.is_file():
            raise InputImageError(f"{p}: identity file not found (write one with `spatialid encode --id PHOTO --out {p}`)")
        from spatialid.encoder.embedding import IdentityEmbedding

        IdentityEmbedding.load(p)  # a small file: damaged tokens are refused before any model loads


def build_job(args: argparse.Namespace, *, tiny: bool):
    """Validate every number and path; return the job (no model touched yet)."""
    from spatialid.app.job import GenerationJob, default_output_path

    settings = sampling_settings(
        args,
        "generate",
        tiny=tiny,
        prompt=args.prompt,
        preset=args.preset,
        cfg_start_step=args.cfg_start_step,
        seed=args.seed,
        num_images=args.num_images,
        max_sequence_length=args.max_sequence_length,
    ).with_seed().check()
    compare = parse_compare(args.compare)
    check_presets([settings.preset, *(compare or [])])
    if args.out is None:
        out = default_output_path(settings.seed)
    else:
        out = Path(args.out).expanduser()
        if out.is_dir() or args.out.endswith(("/", "\\")):
            out = default_output_path(settings.seed, out)
    identity_files = [Path(p).name for p in (args.id_images or [])] + ([Path(args.id_embeds).name] if args.id_embeds else [])
    return GenerationJob(
        settings=settings,
        out=out,
        masks=args.masks,
        compare=compare,
        identity_files=identity_files,
        identity_source="image" if args.id_images else ("embeds" if args.id_embeds else None),
        overwrite=args.overwrite,
    )


def run(args: argparse.Namespace) -> int:
    import time

    from spatialid.app.job import check_outputs, run_job
    from spatialid.app.loading import Models

    started = time.perf_counter()
    spec = model_spec(args)
    job = build_job(args, tiny=spec.is_tiny)
    _check_identity_inputs(args)
    check_outputs(job, reserve=False)  # writable? (the names are claimed when the images exist)
    spec.check()  # device, quantization, offload: before the identity encoder runs
    if spec.is_tiny:
        print(
            "spatialid: note: --model tiny uses random weights at toy size: the images are noise by design "
            "(it exercises the whole pipeline offline)",
            file=sys.stderr,
        )

    models = Models(spec)
    identity = None
    photos = None
    if args.id_images:
        from spatialid.utils.images import load_image

        photos = [load_image(p) for p in args.id_images]
        if not spec.is_tiny:
            # Encode before loading FLUX: a photo without a face fails in seconds, not after a
            # multi-gigabyte model load; the encoder's own weights are freed before denoising.
            identity = models.encoder().encode(photos if len(photos) > 1 else photos[0])
            models.release_encoder()

    pipe = models.pipeline()
    pipe.set_progress_bar_config(disable=bool(args.quiet), desc="denoising", leave=True)

    if photos:
        if identity is None:
            identity = pipe.encode_identity(photos if len(photos) > 1 else photos[0])
        job.reference_image = photos[0]
    elif args.id_embeds:
        from spatialid.encoder.embedding import IdentityEmbedding

        identity = IdentityEmbedding.load(args.id_embeds)
    else:
        log.warning("no --id photo given: generating without identity (plain FLUX)")

    extra = {"device": models.device, "quantization": None if spec.quantize in (None, "none") else spec.quantize}
    result = run_job(pipe, job, identity, log=lambda m: log.warning("%s", m), extra_settings=extra)
    total = time.perf_counter() - started
    for path in result.files:
        print(path)
    if not args.quiet:
        print(
            f"spatialid: seed {job.settings.seed}, preset {job.settings.preset}, {len(result.images)} image(s) in {total:.1f} s",
            file=sys.stderr,
        )
    return 0
