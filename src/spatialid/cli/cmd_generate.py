"""``spatialid generate``: one photo + one prompt (or a prompt file) -> images of that person, with settings.

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
from spatialid.cli.from_png import apply_from_png
from spatialid.cli.prechecks import check_command_line, huge_job_warning, inputs_of
from spatialid.cli.options import (
    add_model_arguments,
    add_people_arguments,
    add_pipeline_arguments,
    add_sampling_arguments,
    add_speed_arguments,
    check_pipeline_arguments,
    model_spec,
    sampling_settings,
)

__all__ = ["register", "run", "build_job", "build_jobs", "parse_seed", "read_prompts"]

log = logging.getLogger("spatialid.generate")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate images of a person from a photo and a prompt",
        description=(
            "Generate images of the person in --id following --prompt with FLUX.1 + PuLID-FLUX and a "
            "SpatialID mask schedule. Each image (PNG, JPEG or WebP) stores its settings: `spatialid info` shows "
            "them and the command that reproduces it, `--from-png` reuses them. "
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
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt", default=None, help="what to draw, e.g. \"portrait, oil painting\"")
    prompt.add_argument(
        "--prompts", metavar="FILE", default=None,
        help="a text file (UTF-8) with one prompt per line (blank lines and # comments skipped): each is "
        "generated with the same settings, outputs numbered -p1, -p2, ...",
    )
    p.add_argument(
        "--from-png", metavar="IMAGE", default=None,
        help="reuse the settings stored in an image written by spatialid (PNG, JPEG or WebP), with its people, "
        "regions and input pictures (found at their recorded path, next to IMAGE or in the current folder); every "
        "flag given on this command line wins; --model, --lora and --controlnet are never taken from the image",
    )
    p.add_argument(
        "--preset", default=D.DEFAULT_PRESET,
        help=f"mask schedule preset: {', '.join(D.PRESET_NAMES)} (default {D.DEFAULT_PRESET})",
    )
    add_sampling_arguments(p, "generate")
    p.add_argument(
        "--cfg-start-step", type=int, default=D.DEFAULT_CFG_START_STEP,
        help=f"first step where true CFG applies (PuLID-FLUX: {D.DEFAULT_CFG_START_STEP})",
    )
    p.add_argument(
        "-s", "--seed", type=parse_seed, default=None,
        help="random seed; 'random' or -1 = draw one (the default; printed and stored in the image)",
    )
    p.add_argument("-n", "--num-images", type=int, default=1, help="images to generate (image i uses seed + i, file NAME_i.png; "
                   "a -2, -3 ... suffix only ever means the name was taken)")
    p.add_argument(
        "--max-sequence-length", type=int, default=None,
        help=f"T5 prompt tokens (default {D.DEFAULT_MAX_SEQUENCE_LENGTH} as PuLID-FLUX)",
    )
    p.add_argument(
        "-o", "--out", default=None,
        help="output file if it ends in .png, .jpg, .jpeg or .webp, otherwise a folder (created if missing; "
        "default outputs/spatialid-<time>-s<seed>.png)",
    )
    p.add_argument(
        "--format", choices=("png", "jpg", "webp"), default=None,
        help="image format (default: from the --out suffix, else png); JPEG/WebP keep the settings in EXIF; "
        "mask and comparison pictures are always PNG",
    )
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
    add_people_arguments(p)
    add_pipeline_arguments(p)
    add_model_arguments(p)
    add_speed_arguments(p)
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- helpers


def parse_seed(text: str) -> int | None:
    """``random`` or ``-1`` mean "draw one" (as in the web UI); anything else must be an integer."""
    if text.strip().lower() in ("random", "-1"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer, or 'random'") from None


MAX_PROMPTS_BYTES = 2**20  # --prompts: a prompt is at most a few hundred bytes
MAX_PROMPTS_LINES = 10_000


def read_prompts(path: str) -> list[str]:
    """The prompts of a ``--prompts`` file: one per line, blank lines and ``#`` comments skipped."""
    from spatialid.errors import SpatialIDError
    from spatialid.pipeline.settings import check_prompt

    p = Path(path).expanduser()
    try:
        with p.open("rb") as fh:  # bounded: /dev/zero or a huge file must not fill the memory
            data = fh.read(MAX_PROMPTS_BYTES + 1)
    except FileNotFoundError:
        raise SpatialIDError(f"{p}: prompt file not found") from None
    except IsADirectoryError:
        raise SpatialIDError(f"{p}: is a folder; --prompts wants a text file with one prompt per line") from None
    if len(data) > MAX_PROMPTS_BYTES:
        raise SpatialIDError(f"{p}: larger than {MAX_PROMPTS_BYTES // 2**20} MB; --prompts wants a text file with "
                             f"one prompt per line (at most {MAX_PROMPTS_LINES} lines)")
    if data.count(b"\n") >= MAX_PROMPTS_LINES:
        raise SpatialIDError(f"{p}: more than {MAX_PROMPTS_LINES} lines; split the prompts into several files")
    if b"\0" in data:
        raise SpatialIDError(f"{p}: holds NUL bytes, so it is no text file; --prompts wants one prompt per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpatialIDError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SpatialIDError(f"{p}: no prompts (one per line; blank lines and lines starting with # are skipped)")
    for i, prompt in enumerate(prompts, 1):
        check_prompt(prompt, name=f"prompt {i} of {p.name}")
    return prompts


# Settings-record fields that --from-png restores, as (metadata key, flag dest).
def parse_compare(text: str | None) -> list[str] | None:
    from spatialid.errors import SpatialIDError

    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SpatialIDError("--compare is empty; give presets separated by commas, e.g. pulid,paper,relaxed")
    return list(dict.fromkeys(names))


def check_presets(names: list[str]) -> None:
    """Refuse an unknown preset name (the names of ``defaults.PRESET_NAMES``: no torch needed)."""
    import difflib

    from spatialid.errors import SpatialIDError

    for n in names:
        if n not in D.PRESET_NAMES:
            close = difflib.get_close_matches(n, D.PRESET_NAMES, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SpatialIDError(f"unknown preset {n!r}; {hint}valid presets: {', '.join(D.PRESET_NAMES)}")


def _check_people_inputs(args: argparse.Namespace) -> list | None:
    """Validate --person/--person-embeds/--region/--save-masks/--masks-from without loading a model.

    Returns the people (see ``options.people_inputs``); every problem is a one-line error.
    """
    from spatialid.cli.options import people_inputs
    from spatialid.errors import InputImageError, SpatialIDError

    people = people_inputs(args)
    if people and (args.id_images or args.id_embeds):
        raise SpatialIDError("give --person/--person-embeds (several people) or --id/--id-embeds (one person), not both")
    count = len(people) if people else (1 if args.id_images or args.id_embeds else 0)
    regions = getattr(args, "regions", None)
    if regions:
        if count == 0:
            raise SpatialIDError("--region needs an identity: give --id PHOTO or one --person per region")
        if len(regions) != count:
            raise SpatialIDError(f"{len(regions)} --region for {count} person(s); give one --region per person, in order")
        from spatialid.pipeline.people import parse_box

        for i, region in enumerate(regions, 1):
            try:
                box = parse_box(region)
            except ValueError as exc:
                raise SpatialIDError(f"--region {region}: {exc}") from None
            if box is None:
                if "," in region and not Path(region).exists():
                    raise SpatialIDError(f"--region {region}: give four fractions x0,y0,x1,y1 or a mask picture")
                from spatialid.utils.images import load_image

                load_image(region)  # a missing or broken mask picture fails now
    for flag, value in (("--save-masks", getattr(args, "save_masks", None)), ("--masks-from", getattr(args, "masks_from", None))):
        if value is None:
            continue
        if count == 0:
            raise SpatialIDError(f"{flag} needs an identity (--id, --id-embeds, --person or --person-embeds)")
        if not value.lower().endswith(".safetensors"):
            raise SpatialIDError(f"{flag} {value}: the mask file must end in .safetensors")
    if getattr(args, "save_masks", None):
        from spatialid.utils.io import check_writable

        check_writable(Path(args.save_masks).expanduser())
    if getattr(args, "masks_from", None):
        from spatialid.pipeline.people import load_mask_file

        masks, _ = load_mask_file(args.masks_from)
        if masks.ndim == 6 and masks.shape[2] != count:
            raise SpatialIDError(
                f"--masks-from {args.masks_from} holds masks of {masks.shape[2]} person(s) but {count} are given"
            )
    for kind, paths in people or []:
        if kind == "photos":
            from spatialid.utils.images import load_image

            for path in paths:
                load_image(path)
        else:
            p = Path(paths[0])
            if not p.is_file():
                raise InputImageError(f"{p}: identity file not found (write one with `spatialid encode --id PHOTO --out {p}`)")
            from spatialid.encoder.embedding import IdentityEmbedding

            IdentityEmbedding.load(p)
    return people


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


def _output_target(args: argparse.Namespace, seed: int) -> Path:
    """``--out`` ending in an image suffix is a file; anything else is a folder (a default name inside)."""
    from spatialid.app.job import default_output_path
    from spatialid.app.metadata import IMAGE_FORMATS
    from spatialid.errors import SpatialIDError

    fmt = getattr(args, "format", None)
    if args.out is None:
        return default_output_path(seed, suffix=f".{fmt or 'png'}")
    out = Path(args.out).expanduser()
    suffix = out.suffix.lower()
    from spatialid.cli.prechecks import UNSUPPORTED_IMAGE_SUFFIXES

    if suffix in UNSUPPORTED_IMAGE_SUFFIXES and not out.is_dir():
        raise SpatialIDError(f"--out {args.out}: {suffix} images cannot hold the settings; give a .png, .jpg, .jpeg or "
                             ".webp file (or a folder)")
    if suffix in IMAGE_FORMATS and not args.out.endswith(("/", "\\")) and not out.is_dir():
        if fmt and IMAGE_FORMATS[suffix] != IMAGE_FORMATS[f".{fmt}"]:
            raise SpatialIDError(f"--format {fmt} does not match --out {args.out}; give one of them, or matching ones")
        return out
    return default_output_path(seed, out, suffix=f".{fmt or 'png'}")


def build_jobs(args: argparse.Namespace, *, tiny: bool, family: str = "flux") -> list:
    """Validate every number, prompt and path; return one job per prompt (no model touched yet).

    ``family`` (``ModelSpec.family``, read from the model's index before anything loads) picks the
    default true CFG: off for FLUX.1, Chroma's own scale for Chroma."""
    from spatialid.app.job import GenerationJob, record_input_paths
    from spatialid.errors import SpatialIDError

    prompts = read_prompts(args.prompts) if getattr(args, "prompts", None) else None
    if prompts is None and args.prompt is None:
        raise SpatialIDError("give --prompt TEXT, --prompts FILE or --from-png IMAGE")
    from spatialid.cli.options import people_inputs

    people = people_inputs(args)
    people_files = [[Path(p).name for p in paths] for _, paths in people] if people else None
    regions = getattr(args, "regions", None)
    settings = sampling_settings(
        args,
        "generate",
        tiny=tiny,
        family=family,
        prompt=prompts[0] if prompts else args.prompt,
        preset=args.preset,
        cfg_start_step=args.cfg_start_step,
        seed=args.seed,
        num_images=args.num_images,
        max_sequence_length=args.max_sequence_length,
        people=people_files,
        regions=list(regions) if regions else None,
    ).with_seed().check()
    compare = parse_compare(args.compare)
    check_presets([settings.preset, *(compare or [])])
    out = _output_target(args, settings.seed)
    identity_files = [Path(p).name for p in (args.id_images or [])] + ([Path(args.id_embeds).name] if args.id_embeds else [])
    input_paths = record_input_paths(  # so that --from-png finds every file again
        id_images=args.id_images,
        id_embeds=args.id_embeds,
        people=[paths for kind, paths in people or [] if kind == "photos"],
        people_embeds=[paths[0] for kind, paths in people or [] if kind == "embeds"],
        regions=list(regions) if regions else None,
        init_image=settings.init_image,
        inpaint_mask=settings.inpaint_mask,
        control_image=settings.control_image,
    )
    jobs = []
    for i, prompt in enumerate(prompts or [settings.prompt], 1):
        jobs.append(GenerationJob(
            settings=settings.replace(prompt=prompt),
            out=out.with_name(f"{out.stem}-p{i}{out.suffix}") if prompts else out,
            masks=args.masks,
            compare=compare,
            identity_files=identity_files,
            identity_source="image" if args.id_images else ("embeds" if args.id_embeds else ("people" if people else None)),
            overwrite=args.overwrite,
            people_files=people_files,
            save_masks=_numbered(args.save_masks, i) if getattr(args, "save_masks", None) and prompts else (
                Path(args.save_masks).expanduser() if getattr(args, "save_masks", None) else None),
            masks_from=Path(args.masks_from).expanduser() if getattr(args, "masks_from", None) else None,
            input_paths=input_paths,
        ))
    return jobs


def _numbered(path: str, index: int) -> Path:
    """``masks.safetensors`` -> ``masks-p<index>.safetensors`` (one mask file per prompt of --prompts)."""
    p = Path(path).expanduser()
    return p.with_name(f"{p.stem}-p{index}{p.suffix}")


def build_job(args: argparse.Namespace, *, tiny: bool, family: str = "flux"):
    """The single job of a one-prompt command line (see :func:`build_jobs`)."""
    return build_jobs(args, tiny=tiny, family=family)[0]


def _unused_settings_warnings(args: argparse.Namespace, settings) -> None:
    """One line per flag that would change nothing, so nobody tunes a knob that is not connected."""
    if settings.negative_prompt and settings.true_cfg <= 1:
        log.warning("--negative-prompt does nothing without --true-cfg > 1 (true CFG is off)")


def _encode_people(people: list, encode) -> list:
    """One IdentityEmbedding per person, in order (photos encoded with ``encode``, identity files read)."""
    from spatialid.encoder.embedding import IdentityEmbedding
    from spatialid.utils.images import load_image

    identities = []
    for kind, paths in people:
        if kind == "embeds":
            identities.append(IdentityEmbedding.load(paths[0]))
        else:
            photos = [load_image(p) for p in paths]
            identities.append(encode(photos if len(photos) > 1 else photos[0]))
    return identities


def _say_face_check(args: argparse.Namespace, photos: list[str]) -> None:
    """Say that the identity encoder looks for the face first: a photo without one fails before FLUX loads."""
    if not args.quiet:
        names = ", ".join(Path(p).name for p in photos)
        print(f"spatialid: checking the face in {names} before FLUX loads (identity encoder) ...", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import time

    from spatialid.app.job import check_outputs, run_job
    from spatialid.app.loading import Models
    from spatialid.app.metadata import pipeline_record

    started = time.perf_counter()
    # 1. the command line and the files' headers, without torch (each mistake costs well under 2 s)
    apply_from_png(args)
    check_pipeline_arguments(args)  # img2img / inpainting / Kontext / ControlNet flags, before the settings
    check_command_line(args)  # model name, device, presets, numbers, LoRAs, ControlNet, masks, mask file
    spec = model_spec(args)
    jobs = build_jobs(args, tiny=spec.is_tiny, family=spec.family)
    job = jobs[0]
    protected = tuple(inputs_of(args))
    for each in jobs:
        each.protected = protected
        check_outputs(each, reserve=False)  # writable, no input replaced (the names are claimed when the images exist)
    _unused_settings_warnings(args, job.settings)
    warning = huge_job_warning(args, job.settings.width, job.settings.height, job.settings.steps)
    if warning:
        log.warning("%s", warning)
    if not args.quiet:
        print(f"spatialid: loading {spec.model} ...", file=sys.stderr, flush=True)
    # 2. what needs torch (identity files, mask files, the device), still before any model loads
    people = _check_people_inputs(args)  # first: --person with --id is refused before any photo is read
    from spatialid.cli.options import people_words

    words = people_words(args, [each.settings.prompt for each in jobs])  # --person PHOTO@WORDS: in the prompt?
    _check_identity_inputs(args)
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
            _say_face_check(args, args.id_images)
            identity = models.encoder().encode(photos if len(photos) > 1 else photos[0])
            models.release_encoder()

    people_ids = None
    if people and not spec.is_tiny and any(kind == "photos" for kind, _ in people):
        # as for --id: a photo without a face fails before FLUX loads
        _say_face_check(args, [p for kind, paths in people if kind == "photos" for p in paths])
        people_ids = _encode_people(people, models.encoder().encode)
        models.release_encoder()

    pipe = models.pipeline()
    pipe.set_progress_bar_config(disable=bool(args.quiet), desc="denoising", leave=True)

    if photos:
        if identity is None:
            identity = pipe.encode_identity(photos if len(photos) > 1 else photos[0])
        for each in jobs:
            each.reference_image = photos[0]
    elif args.id_embeds:
        from spatialid.encoder.embedding import IdentityEmbedding

        identity = IdentityEmbedding.load(args.id_embeds)
    elif people:
        identity = people_ids if people_ids is not None else _encode_people(people, pipe.encode_identity)
        if words:  # (identity, words): the pipeline places that person where FLUX's attention puts the words
            identity = [(person, w) if w else person for person, w in zip(identity, words)]
        first_photos = next((paths for kind, paths in people if kind == "photos"), None)
        if first_photos:
            from spatialid.utils.images import load_image

            for each in jobs:
                each.reference_image = load_image(first_photos[0])
    else:
        log.warning("no --id photo given: generating without identity (plain FLUX)")

    extra = {"device": models.device, "quantization": None if spec.quantize in (None, "none") else spec.quantize}
    extra.update(pipeline_record(job.settings))
    if spec.cache not in (None, "none"):
        extra["cache"] = spec.cache  # a step cache changes the image: recorded, as the quantization is
    if spec.compile:
        extra["compile"] = True
    count = 0
    for each in jobs:
        result = run_job(pipe, each, identity, log=lambda m: log.warning("%s", m), extra_settings=extra)
        for path in result.files:
            print(path, flush=True)
        count += len(result.images)
    total = time.perf_counter() - started
    if not args.quiet:
        what = f"preset {job.settings.preset}" if identity is not None else "no identity: plain FLUX"
        prompts = f" for {len(jobs)} prompts" if len(jobs) > 1 else ""
        print(f"spatialid: seed {job.settings.seed}, {what}, {count} image(s){prompts} in {total:.1f} s", file=sys.stderr)
    return 0
