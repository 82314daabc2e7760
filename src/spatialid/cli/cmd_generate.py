"""``spatialid generate``: one photo + one prompt -> images of that person (PNG with settings).

Every check that can fail quickly (numbers, prompt, preset names, the photo, the output folder,
CUDA) runs before any model is loaded, so a typo costs milliseconds, not a model load.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["register", "run", "add_model_arguments"]

log = logging.getLogger("spatialid.generate")

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model / memory / device flags shared by ``generate`` (and usable by other commands)."""
    g = p.add_argument_group("model and memory")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="FLUX.1 hub id or local diffusers folder (FLUX.1-dev, FLUX.1-Krea-dev, ...), a single "
        "transformer .safetensors/.gguf file, or 'tiny' = offline toy model with random weights whose "
        f"images are noise by design (default: {DEFAULT_MODEL})",
    )
    g.add_argument(
        "--pulid",
        default=None,
        help="PuLID-FLUX weights: .safetensors file, folder or hub id (default: guozinan/PuLID, pulid_flux_v0.9.1.safetensors)",
    )
    g.add_argument(
        "--offload",
        choices=("none", "model", "sequential"),
        default="none",
        help="GPU memory mode: none (fastest, ~35 GB peak for FLUX.1-dev bf16 at 1024x1024), model (whole models "
        "moved to the GPU when used, ~24 GB), sequential (layer by layer, ~3 GB, slowest); see docs/memory.md",
    )
    g.add_argument(
        "--quantize",
        default="none",
        metavar="MODE",
        help="load the FLUX transformer quantized: none, nf4, int8 (bitsandbytes), torchao-int8, torchao-fp8, "
        "or gguf:FILE (pre-quantized GGUF); needs pip install 'spatialid[quant]'",
    )
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default auto)")
    g.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="weights dtype (default auto: bfloat16 on GPU, float32 on CPU)",
    )
    g.add_argument("--offline", action="store_true", help="never download: use local files only (like HF_HUB_OFFLINE=1)")
    g.add_argument("--cache-dir", default=None, help="Hugging Face cache folder for downloaded weights")


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
    p.add_argument("--preset", default="paper", help="mask schedule preset: pulid, paper, relaxed, prior-only, attention-only, no-relax, entropy (default paper)")
    p.add_argument("--id-weight", type=float, default=1.0, help="identity strength, 0..3 (default 1)")
    p.add_argument("--start-step", type=int, default=0, help="first denoising step with identity (0 = all; PuLID suggests 4 for photos, 0-1 for stylised)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="true classifier-free guidance scale, 1 = off (1..10); > 1 doubles the cost")
    p.add_argument("--negative-prompt", default="", help="negative prompt for true CFG (default empty)")
    p.add_argument("--cfg-start-step", type=int, default=1, help="first step where true CFG applies (PuLID-FLUX: 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; tiny model 6)")
    p.add_argument("--guidance", type=float, default=4.0, help="FLUX embedded guidance (default 4.0, as PuLID-FLUX)")
    p.add_argument("--size", default=None, metavar="WxH", help="image size, multiples of 16 (default 1024x1024; tiny model 256x256)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed and stored in the PNG)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate (image i uses seed + i)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 prompt tokens (default 128 as PuLID-FLUX)")
    p.add_argument("--out", default=None, help="output PNG, or a folder (default outputs/spatialid-<time>-s<seed>.png)")
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


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; refuse CUDA when torch cannot see a GPU."""
    import torch

    from spatialid.errors import SpatialIDError

    text = (name or "auto").strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU/driver is visible"
            raise SpatialIDError(f"--device {name} requested but CUDA is not available ({why}); use --device cpu")
        if ":" in text:
            try:
                index = int(text.split(":", 1)[1])
            except ValueError:
                raise SpatialIDError(f"bad device {name!r}; use cuda, cuda:N or cpu") from None
            if not 0 <= index < torch.cuda.device_count():
                raise SpatialIDError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return text
    if text in ("cpu", "mps"):
        if text == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SpatialIDError("--device mps requested but Apple MPS is not available; use --device cpu")
        return text
    raise SpatialIDError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def resolve_dtype(name: str, device: str):  # -> torch.dtype
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def parse_compare(text: str | None) -> list[str] | None:
    from spatialid.errors import SpatialIDError

    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SpatialIDError("--compare is empty; give presets separated by commas, e.g. pulid,paper,relaxed")
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen


def check_presets(names: list[str]) -> None:
    from spatialid.masks import PRESETS

    from spatialid.errors import SpatialIDError

    for n in names:
        if n not in PRESETS:
            raise SpatialIDError(f"unknown preset {n!r}; valid presets: {', '.join(PRESETS)}")


def quiet_third_party_logs() -> None:
    """diffusers/transformers reset their log level when imported; keep only their errors
    (the CLI's own messages say what matters; --debug still shows tracebacks)."""
    for name in ("diffusers", "transformers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["set_verbosity_error"])
            module.set_verbosity_error()
        except (ImportError, AttributeError):  # pragma: no cover
            pass


def check_quantize(model: str, quantize: str | None) -> None:
    """Refuse an unknown ``--quantize`` mode, or one given with ``--model tiny`` (which has no FLUX weights)."""
    if quantize in (None, "none"):
        return
    from spatialid.errors import SpatialIDError
    from spatialid.pipeline.loading import parse_quantization

    parse_quantization(quantize)
    if model == "tiny":
        raise SpatialIDError("--quantize applies to real FLUX weights, not to --model tiny")


def load_pipeline(
    model: str,
    *,
    pulid: str | None = None,
    offload: str = "none",
    quantize: str | None = None,
    device: str = "cpu",
    dtype=None,
    offline: bool = False,
    cache_dir: str | None = None,
):
    """Build the pipeline for ``--model`` (``tiny`` or FLUX weights) and apply the memory mode."""
    import torch

    from spatialid.errors import SpatialIDError
    from spatialid.pipeline.pipeline_spatialid import SpatialIDPipeline

    check_quantize(model, quantize)
    quiet_third_party_logs()
    if offload != "none" and not device.startswith("cuda"):
        raise SpatialIDError(f"--offload {offload} moves models between CPU and GPU; it needs --device cuda")
    if model == "tiny":
        pipe = SpatialIDPipeline.tiny(seed=0, dtype=dtype if dtype is not None else torch.float32)
    else:
        pipe = SpatialIDPipeline.from_pretrained(
            model,
            pulid,
            torch_dtype=dtype if dtype is not None else torch.bfloat16,
            quantization=None if quantize in (None, "none") else quantize,
            local_files_only=True if offline else None,
            cache_dir=cache_dir,
        )
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def encode_with_real_encoder(photos: list, args: argparse.Namespace, device: str, dtype):
    """Run the PuLID-FLUX identity encoder on its own, then free it (see ``run``)."""
    import gc

    import torch

    from spatialid.encoder.identity_encoder import IdentityEncoder

    encoder = IdentityEncoder.from_pretrained(
        pulid=args.pulid,
        cache_dir=args.cache_dir,
        local_files_only=True if args.offline else None,
        device=device,
        dtype=dtype,
    )
    try:
        return encoder.encode(photos if len(photos) > 1 else photos[0])
    finally:
        del encoder
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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


def build_job(args: argparse.Namespace, *, tiny: bool):
    """Validate every number and path; return the job (no model touched yet)."""
    import secrets

    from spatialid.pipeline.runner import GenerationJob, default_output_path
    from spatialid.pipeline.settings import check_generation_settings, check_prompt, parse_size

    check_prompt(args.prompt)
    if args.size:
        width, height = parse_size(args.size)
    else:
        width = height = 256 if tiny else 1024
    steps = args.steps if args.steps is not None else (6 if tiny else 20)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    check_generation_settings(
        num_inference_steps=steps,
        height=height,
        width=width,
        id_weight=args.id_weight,
        start_step=args.start_step,
        true_cfg=args.true_cfg,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        seed=seed,
    )
    from spatialid.errors import SpatialIDError

    if args.cfg_start_step < 0:
        raise SpatialIDError(f"--cfg-start-step must be >= 0, got {args.cfg_start_step}")
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= 512:
        raise SpatialIDError(f"--max-sequence-length must be between 1 and 512, got {args.max_sequence_length}")
    compare = parse_compare(args.compare)
    check_presets([args.preset, *(compare or [])])
    if args.out is None:
        out = default_output_path(seed)
    else:
        out = Path(args.out).expanduser()
        if out.is_dir() or args.out.endswith(("/", "\\")):
            out = default_output_path(seed, out)
    identity_files = [Path(p).name for p in (args.id_images or [])] + ([Path(args.id_embeds).name] if args.id_embeds else [])
    return GenerationJob(
        prompt=args.prompt,
        out=out,
        preset=args.preset,
        id_weight=args.id_weight,
        start_step=args.start_step,
        true_cfg=args.true_cfg,
        negative_prompt=args.negative_prompt,
        steps=steps,
        guidance=args.guidance,
        width=width,
        height=height,
        seed=seed,
        num_images=args.num_images,
        cfg_start_step=args.cfg_start_step,
        max_sequence_length=args.max_sequence_length,
        masks=args.masks,
        compare=compare,
        identity_files=identity_files,
        identity_source="image" if args.id_images else ("embeds" if args.id_embeds else None),
    )


def run(args: argparse.Namespace) -> int:
    import time

    from spatialid.pipeline.runner import check_outputs, run_job

    started = time.perf_counter()
    tiny = args.model == "tiny"
    job = build_job(args, tiny=tiny)
    _check_identity_inputs(args)
    check_outputs(job)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_quantize(args.model, args.quantize)  # before the identity encoder runs: fail fast
    if tiny:
        print(
            "spatialid: note: --model tiny uses random weights at toy size: the images are noise by design "
            "(it exercises the whole pipeline offline)",
            file=sys.stderr,
        )

    identity = None
    photos = None
    if args.id_images:
        from spatialid.utils.images import load_image

        photos = [load_image(p) for p in args.id_images]
        if not tiny:
            # Encode before loading FLUX: a photo without a face fails in seconds, not after a
            # multi-gigabyte model load, and the encoder is freed before denoising starts.
            identity = encode_with_real_encoder(photos, args, device, dtype)

    log.info("loading %s ...", args.model)
    pipe = load_pipeline(
        args.model,
        pulid=args.pulid,
        offload=args.offload,
        quantize=args.quantize,
        device=device,
        dtype=dtype,
        offline=args.offline,
        cache_dir=args.cache_dir,
    )
    pipe.set_progress_bar_config(disable=bool(args.quiet), desc="denoising", leave=True)

    if photos:
        if identity is None:
            identity = pipe.encode_identity(photos if len(photos) > 1 else photos[0])
        job.reference_image = photos[0]
    elif args.id_embeds:
        identity = pipe._load_embedding(args.id_embeds)
    else:
        log.warning("no --id photo given: generating without identity (plain FLUX)")

    extra = {"device": device, "quantization": None if args.quantize == "none" else args.quantize}
    result = run_job(pipe, job, identity, log=lambda m: log.warning("%s", m), extra_settings=extra)
    total = time.perf_counter() - started
    for path in result.files:
        print(path)
    if not args.quiet:
        print(
            f"spatialid: seed {job.seed}, preset {job.preset}, {len(result.images)} image(s) in {total:.1f} s",
            file=sys.stderr,
        )
    return 0
