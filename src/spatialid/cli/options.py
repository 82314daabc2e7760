"""Command-line flags shared by several sub-commands, and their translation to the app layer.

Each flag is defined once here (with its default from :mod:`spatialid.defaults`), so ``generate``,
``bench``, ``serve`` and ``encode`` cannot drift apart; the parsed values become a
:class:`~spatialid.app.loading.ModelSpec` or a
:class:`~spatialid.pipeline.settings.GenerationSettings` through the functions below.
"""

from __future__ import annotations

import argparse

from spatialid import defaults as D

__all__ = [
    "add_model_arguments",
    "add_people_arguments",
    "add_pipeline_arguments",
    "add_sampling_arguments",
    "add_speed_arguments",
    "check_pipeline_arguments",
    "model_spec",
    "people_inputs",
    "people_words",
    "pipeline_fields",
    "sampling_settings",
]


def add_model_arguments(p: argparse.ArgumentParser, *, memory: bool = True) -> None:
    """Model / memory / device flags (``memory=False`` leaves out offload and quantization)."""
    g = p.add_argument_group("model and memory")
    g.add_argument(
        "--model",
        default=D.DEFAULT_FLUX_MODEL,
        help="FLUX.1 or Chroma hub id or local diffusers folder (FLUX.1-dev, FLUX.1-Krea-dev, FLUX.1-schnell, "
        "Chroma1-HD, ...: the pipeline family is read from model_index.json), a single FLUX transformer "
        ".safetensors/.gguf file, or 'tiny' / 'tiny-chroma' = offline toy FLUX.1 / Chroma model with random "
        f"weights whose images are noise by design (default: {D.DEFAULT_FLUX_MODEL})",
    )
    g.add_argument(
        "--pulid",
        default=None,
        help=f"PuLID-FLUX weights: .safetensors file, folder or hub id (default: {D.PULID_REPO_ID}, {D.PULID_FILENAME})",
    )
    if memory:
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


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """``--compile`` and ``--cache`` (docs/performance.md): faster steps that keep the identity."""
    g = p.add_argument_group("speed")
    g.add_argument(
        "--compile", action="store_true",
        help="torch.compile the FLUX transformer with the identity hooks (the first image pays the compilation: "
        "about a minute; later steps, seeds, weights and identities reuse it)",
    )
    g.add_argument(
        "--cache", default=None, metavar="NAME[:X]",
        help="step cache that keeps the identity: fbc[:THRESHOLD] (First Block Cache, default 0.08), "
        "taylorseer[:N] (full step every N, default 4), pab[:N] (attention every N steps, default 2), or none",
    )


def model_spec(args: argparse.Namespace, **overrides):  # -> ModelSpec
    """The :class:`ModelSpec` of the parsed model flags (flags a command lacks keep their defaults)."""
    from spatialid.app.loading import ModelSpec

    fields = {
        "model": "model", "pulid": "pulid", "offload": "offload", "quantize": "quantize", "device": "device",
        "dtype": "dtype", "offline": "offline", "cache_dir": "cache_dir", "eva": "eva", "models_dir": "models_dir",
        "face_backend": "face_backend", "compile": "compile", "cache": "cache",
        "pipeline": "pipeline", "controlnet": "controlnet",
    }
    values = {name: getattr(args, attr) for name, attr in fields.items() if getattr(args, attr, None) is not None}
    if getattr(args, "lora", None):
        values["loras"] = tuple(args.lora)
    values.update(overrides)
    return ModelSpec(**values)


def add_sampling_arguments(p: argparse.ArgumentParser, purpose: str) -> None:
    """Flags of the settings record that ``generate`` and ``bench`` share (prompt, preset and seed excepted)."""
    real, tiny = D.size_steps(purpose, tiny=False), D.size_steps(purpose, tiny=True)
    p.add_argument("--id-weight", type=float, default=D.DEFAULT_ID_WEIGHT, help=f"identity strength, 0..3 (default {D.DEFAULT_ID_WEIGHT:g})")
    p.add_argument(
        "--start-step", type=int, default=D.DEFAULT_START_STEP,
        help="first denoising step with identity (0 = all; PuLID suggests 4 for photos, 0-1 for stylised)",
    )
    p.add_argument(
        "--true-cfg", type=float, default=None,
        help=f"true classifier-free guidance scale, 1 = off (1..10); > 1 doubles the cost (default {D.DEFAULT_TRUE_CFG:g}; "
        f"Chroma models {D.CHROMA_TRUE_CFG:g}, as diffusers' ChromaPipeline)",
    )
    p.add_argument("--negative-prompt", default="", help="negative prompt for true CFG (default empty)")
    p.add_argument(
        "--steps", type=int, default=None, help=f"denoising steps (default {real.steps}; tiny model {tiny.steps})"
    )
    p.add_argument(
        "--guidance", type=float, default=D.DEFAULT_GUIDANCE,
        help=f"FLUX embedded guidance (default {D.DEFAULT_GUIDANCE:g}, as PuLID-FLUX)",
    )
    p.add_argument(
        "--size", default=None, metavar="WxH",
        help=f"image size, multiples of 16 (default {real.width}x{real.height}; tiny model {tiny.width}x{tiny.height})",
    )
    p.add_argument(
        "--noise", choices=D.NOISE_MODES, default=D.DEFAULT_NOISE,
        help="initial noise: diffusers (CPU generators, the same on every machine; default) or reference "
        "(drawn as the BFL/PuLID-FLUX scripts do, so a seed matches the authors' on the same GPU)",
    )
    g = p.add_argument_group(
        "schedule", "set fields of the preset's mask schedule (recorded in the PNG / results; uniform pulid ignores them)"
    )
    for name, what in _SCHEDULE_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=None, metavar="X", help=what)


_SCHEDULE_FLAGS = {
    "early": "centre prior while t > X (paper 0.7)",
    "late": "relaxed mask while t <= X (paper 0.3)",
    "late_floor": "relaxed mask = X + (1 - X) * mask (paper 0.5, relaxed 0.8)",
    "center_sigma": "width of the centre prior (paper 0.3, relaxed 0.7)",
    "global_floor": "lower bound of the mask at every step (paper 0, relaxed 0.3)",
}


def schedule_overrides(args: argparse.Namespace) -> dict[str, float] | None:
    """The schedule fields given on the command line, or None."""
    given = {name: getattr(args, name) for name in _SCHEDULE_FLAGS if getattr(args, name, None) is not None}
    return given or None


def sampling_settings(
    args: argparse.Namespace, purpose: str, *, tiny: bool, family: str = "flux", **fields
):  # -> GenerationSettings
    """The :class:`GenerationSettings` of the shared flags, with the purpose's default size and steps and
    the model family's default true CFG (``family``: ``ModelSpec.family``)."""
    from spatialid.pipeline.settings import GenerationSettings, parse_size

    base = D.size_steps(purpose, tiny=tiny)
    width, height = parse_size(args.size) if args.size else (base.width, base.height)
    return GenerationSettings(
        id_weight=args.id_weight,
        start_step=args.start_step,
        true_cfg=args.true_cfg if args.true_cfg is not None else D.default_true_cfg(family),
        negative_prompt=args.negative_prompt,
        steps=args.steps if args.steps is not None else base.steps,
        guidance=args.guidance,
        width=width,
        height=height,
        schedule_overrides=schedule_overrides(args),
        noise=args.noise,
        **pipeline_fields(args),
        **fields,
    )


def add_people_arguments(p: argparse.ArgumentParser) -> None:
    """Several people in one image, their regions and the mask files (docs/multi-identity.md)."""
    g = p.add_argument_group(
        "several people", "one identity per person, each injected only where that person is (up to 4 people)"
    )
    g.add_argument(
        "--person", dest="people", action="append", default=None, metavar="PHOTO[,PHOTO...][@WORDS]",
        help="photos of one person (comma-separated for several photos of the same person); repeat once per "
        "person, left to right: --person alice.jpg --person bob1.jpg,bob2.jpg; @WORDS binds the person to words "
        "of the prompt, placed where FLUX's attention puts them: --person boy.jpg@'the boy' (@man#2: the second 'man')",
    )
    g.add_argument(
        "--person-embeds", dest="people_embeds", action="append", default=None, metavar="FILE[@WORDS]",
        help="identity file of one person (from `spatialid encode`); repeatable, after the --person photos",
    )
    g.add_argument(
        "--region", dest="regions", action="append", default=None, metavar="x0,y0,x1,y1|MASK.png",
        help="where a person is: a box in fractions of width and height, or a mask picture (white = there); "
        "repeat in the order of the people (also for a single --id); the person's mask never leaves it",
    )
    g.add_argument(
        "--save-masks", default=None, metavar="FILE.safetensors",
        help="write every person's mask of every step (float32 [steps, points, persons, batch, rows, cols]); an "
        "existing file is kept (the new one gets a free numbered name) unless --overwrite; never an input's name",
    )
    g.add_argument(
        "--masks-from", default=None, metavar="FILE.safetensors",
        help="re-run with the masks of a --save-masks file (possibly edited) instead of computing them",
    )


def people_inputs(args: argparse.Namespace) -> list[tuple[str, list[str]]] | None:
    """The people of ``--person`` / ``--person-embeds`` in order, as ``("photos" | "embeds", paths)``;
    None without them. Raises a one-line error for an empty entry or more than four people."""
    from spatialid.errors import SpatialIDError

    photos = getattr(args, "people", None) or []
    embeds = getattr(args, "people_embeds", None) or []
    if not photos and not embeds:
        return None
    people: list[tuple[str, list[str]]] = []
    for entry in photos:
        paths = [part.strip() for part in _split_words(entry)[0].split(",") if part.strip()]
        if not paths:
            raise SpatialIDError(f"--person {entry!r} names no photo; give PHOTO or PHOTO,PHOTO (photos of one person)")
        people.append(("photos", paths))
    people += [("embeds", [_split_words(path)[0]]) for path in embeds]
    if len(people) > 4:
        raise SpatialIDError(f"{len(people)} people given (--person/--person-embeds); at most 4 people per image")
    return people


def _split_words(entry: str) -> tuple[str, str | None]:
    """``PHOTO@WORDS`` -> ``(PHOTO, WORDS)``; an entry without ``@`` (or an existing file named with one) has no words."""
    from pathlib import Path

    head, sep, words = entry.rpartition("@")
    if not sep or not head or Path(entry).expanduser().exists():
        return entry, None
    from spatialid.errors import SpatialIDError

    if not words.strip():
        raise SpatialIDError(f"--person {entry!r}: no words after '@'; give PHOTO@WORDS, e.g. boy.jpg@'the boy'")
    return head, words.strip()


def people_words(args: argparse.Namespace, prompts: list[str] | None = None) -> list[str | None] | None:
    """Each person's ``@WORDS`` (None for a person without), in the order of :func:`people_inputs`;
    None when nobody is bound to words. With ``prompts``, words that are in none of a prompt's text
    are refused now, in one line (the pipeline checks the T5 tokens themselves)."""
    entries = [*(getattr(args, "people", None) or []), *(getattr(args, "people_embeds", None) or [])]
    words = [_split_words(entry)[1] for entry in entries]
    if not any(w is not None for w in words):
        return None
    import re

    from spatialid.errors import SpatialIDError

    for entry, w in zip(entries, words):
        for prompt in prompts or []:
            text = re.sub(r"\s*#\d+$", "", w or "")  # "man#2": the second "man"
            if w is not None and not re.search(rf"(?<!\w){re.escape(text)}(?!\w)", prompt or "", re.IGNORECASE):
                raise SpatialIDError(
                    f"--person {entry!r}: the words {w!r} are not in the prompt {prompt!r}; bind each person to words of the prompt"
                )
    return words


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """Which FLUX.1 pipeline runs, and its inputs (docs/pipelines.md): img2img, inpainting, Kontext, ControlNet, LoRA."""
    g = p.add_argument_group(
        "other FLUX.1 pipelines", "start from a picture, repair a region, edit with Kontext, follow a control image, add LoRAs"
    )
    g.add_argument(
        "--init-image", default=None, metavar="PATH",
        help="start from this picture (img2img; with --inpaint-mask: inpainting; with --kontext: an edit); "
        "default --size: its own size, rounded down to 16",
    )
    g.add_argument(
        "--strength", type=float, default=None, metavar="S",
        help=f"how much of --init-image is redrawn, in (0, 1] (default {D.DEFAULT_IMG2IMG_STRENGTH:g}; "
        f"inpainting {D.DEFAULT_INPAINT_STRENGTH:g})",
    )
    g.add_argument(
        "--inpaint-mask", default=None, metavar="PATH",
        help="identity repair: redraw only where this mask is white (same size as --init-image); the identity "
        "goes only there; a FLUX.1 Fill --model runs FluxFillPipeline",
    )
    g.add_argument(
        "--kontext", action="store_true",
        help="edit --init-image with FLUX.1 Kontext (use a Kontext --model, e.g. black-forest-labs/FLUX.1-Kontext-dev; "
        "implied by a --model whose name contains 'kontext')",
    )
    g.add_argument(
        "--control-image", default=None, metavar="PATH",
        help="follow this pose/depth/edge picture: with --controlnet (FluxControlNetPipeline), or with a FLUX.1 "
        "Canny/Depth --model (FluxControlPipeline)",
    )
    g.add_argument("--controlnet", default=None, metavar="ID", help="FLUX.1 ControlNet hub id or local folder")
    g.add_argument(
        "--controlnet-scale", type=float, default=None, metavar="X",
        help=f"ControlNet conditioning scale (default {D.DEFAULT_CONTROLNET_SCALE:g})",
    )
    g.add_argument(
        "--lora", action="append", default=None, metavar="FILE_OR_HUB_ID[:SCALE]",
        help="a FLUX.1 LoRA (.safetensors file, or hub id) loaded with diffusers' load_lora_weights; repeatable; "
        "SCALE default 1",
    )


def check_pipeline_arguments(args: argparse.Namespace) -> str:
    """Decide the pipeline from the flags (set as ``args.pipeline``) and refuse what cannot run, before any model loads.

    Also sets ``--size`` from ``--init-image`` when none was given. Every failure is one line.
    """
    from spatialid.errors import SpatialIDError

    init = getattr(args, "init_image", None)
    mask = getattr(args, "inpaint_mask", None)
    control = getattr(args, "control_image", None)
    controlnet = getattr(args, "controlnet", None)
    strength = getattr(args, "strength", None)
    model = str(getattr(args, "model", "") or "").lower()
    kontext = bool(getattr(args, "kontext", False)) or "kontext" in model
    fill_model = "fill" in model
    control_model = any(word in model for word in ("canny", "depth")) and "controlnet" not in model
    if strength is not None and not 0.0 < strength <= 1.0:
        raise SpatialIDError(f"--strength must be in (0, 1] (the share of --init-image redrawn), got {strength:g}")
    if kontext:
        if init is None:
            raise SpatialIDError("Kontext edits a picture: give --init-image PATH")
        if mask or control or controlnet:
            raise SpatialIDError("--kontext takes --init-image only (no --inpaint-mask, --control-image or --controlnet)")
        mode = "kontext"
    elif mask is not None:
        if init is None:
            raise SpatialIDError("--inpaint-mask needs --init-image PATH (the picture to repair)")
        if control or controlnet:
            raise SpatialIDError("--inpaint-mask cannot be combined with --control-image/--controlnet")
        mode = "fill" if fill_model else "inpaint"
    elif fill_model:
        raise SpatialIDError("a FLUX.1 Fill --model needs --init-image and --inpaint-mask")
    elif control is not None or controlnet is not None:
        if control is None:
            raise SpatialIDError("--controlnet needs --control-image PATH (the pose/depth/edge picture)")
        if controlnet is None and not control_model:
            raise SpatialIDError("--control-image needs --controlnet ID (or a FLUX.1 Canny/Depth --model)")
        if init is not None:
            raise SpatialIDError("--init-image cannot be combined with --control-image (one pipeline at a time)")
        mode = "controlnet" if controlnet is not None else "control"
    elif control_model:
        raise SpatialIDError("a FLUX.1 Canny/Depth --model needs --control-image PATH")
    elif init is not None:
        mode = "img2img"
    else:
        mode = "text2image"
        if strength is not None:
            raise SpatialIDError("--strength needs --init-image PATH")
    if mode != "text2image":
        if getattr(args, "noise", "diffusers") != "diffusers":
            raise SpatialIDError(f"--noise {args.noise} is for text-to-image only (the {mode} pipeline draws diffusers' noise)")
        if mode in ("fill", "control") and float(getattr(args, "true_cfg", 1.0) or 1.0) > 1:
            raise SpatialIDError(f"the {mode} pipeline has no true CFG; drop --true-cfg")
    if init is not None or mask is not None or control is not None:
        from spatialid.utils.images import load_image

        images = {flag: load_image(path) for flag, path in (("--init-image", init), ("--inpaint-mask", mask),
                                                            ("--control-image", control)) if path is not None}
        if mask is not None and images["--inpaint-mask"].size != images["--init-image"].size:
            (mw, mh), (iw, ih) = images["--inpaint-mask"].size, images["--init-image"].size
            raise SpatialIDError(f"--inpaint-mask is {mw}x{mh} but --init-image is {iw}x{ih}; give a mask of the same size")
        first = images.get("--init-image") or images.get("--control-image")
        if getattr(args, "size", None) is None and first is not None:
            width, height = (max(64, v // 16 * 16) for v in first.size)
            args.size = f"{width}x{height}"
    args.pipeline = mode
    return mode


def pipeline_fields(args: argparse.Namespace) -> dict:
    """The settings-record fields of the pipeline flags (none for a command without them)."""
    mode = getattr(args, "pipeline", None)
    if mode is None:
        return {}
    strength = getattr(args, "strength", None)
    if strength is None and mode in ("img2img", "inpaint"):
        strength = D.DEFAULT_INPAINT_STRENGTH if mode == "inpaint" else D.DEFAULT_IMG2IMG_STRENGTH
    scale = getattr(args, "controlnet_scale", None)
    if scale is None and mode == "controlnet":
        scale = D.DEFAULT_CONTROLNET_SCALE
    return {
        "pipeline": mode,
        "init_image": getattr(args, "init_image", None),
        "strength": strength,
        "inpaint_mask": getattr(args, "inpaint_mask", None),
        "control_image": getattr(args, "control_image", None),
        "controlnet": getattr(args, "controlnet", None),
        "controlnet_scale": scale,
        "loras": list(args.lora) if getattr(args, "lora", None) else None,
    }
