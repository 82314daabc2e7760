"""What ``spatialid generate`` can refuse from the command line and the files' headers alone, without torch.

Importing torch costs seconds (more on a busy machine); a model load costs minutes. So every
check here uses only the standard library, Pillow, numpy and safetensors' header (read as JSON):
the model name, the device for ``--offload``, preset names, every number, LoRA and ControlNet
sources, region and inpainting masks, a ``--masks-from`` file against this run, and output names
against the inputs. ``cmd_generate.run`` calls :func:`check_command_line` first, so these
mistakes cost well under two seconds. The checks that need torch (identity files, the model's
own files) run after it, before anything loads.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from spatialid import defaults as D
from spatialid.app.sources import check_lora_files, in_hub_cache, looks_local
from spatialid.errors import SpatialIDError
from spatialid.utils.weights import read_safetensors_header

__all__ = ["UNSUPPORTED_IMAGE_SUFFIXES", "check_command_line", "gpu_possible", "huge_job_warning", "inputs_of", "model_name_error"]

# image suffixes people try that cannot hold the settings (PNG, JPEG and WebP can)
UNSUPPORTED_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".ico", ".ppm",
                               ".pgm", ".tga", ".svg", ".jp2", ".exr", ".apng")


def gpu_possible() -> bool:
    """False only when this machine surely has no GPU torch could use (no NVIDIA/ROCm/WSL device node, not macOS).

    Lets ``--offload`` and ``--device cuda`` be refused on a CPU-only machine without importing torch;
    when a GPU may exist, torch decides later.
    """
    if sys.platform == "darwin":
        return True
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
    return any(os.path.exists(node) for node in nodes)


def model_name_error(model: str) -> str | None:
    """Why ``--model`` cannot name anything (a near-miss of ``tiny``, a hub id without owner); None when it may."""
    text = str(model)
    if text in D.TINY_MODELS:
        return None
    if Path(text).expanduser().exists() or Path(text).suffix.lower() in (".safetensors", ".sft", ".gguf"):
        return None  # a weights file: a missing one is named by app.loading's own check
    close = difflib.get_close_matches(text.lower(), D.TINY_MODELS, n=1, cutoff=0.6)
    if close:
        return f"unknown --model {text!r}; did you mean --model {close[0]} (the offline toy model)?"
    if "/" not in text and not text.startswith(("~", ".")):
        return (f"--model {text!r} is neither a local folder or file nor a hub id (owner/name, e.g. "
                f"{D.DEFAULT_FLUX_MODEL}); give one of them, or --model tiny to try the tool offline")
    return None


def _number(flag: str, value: Any, low: float, high: float, what: str) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not low <= value <= high:
        raise SpatialIDError(f"{flag} must be a number between {low:g} and {high:g} ({what}), got {value!r}")


def _check_controlnet(args: argparse.Namespace, offline: bool) -> None:
    source = getattr(args, "controlnet", None)
    if not source:
        return
    path = Path(source).expanduser()
    if looks_local(source) or path.exists():
        if not path.exists():
            raise SpatialIDError(f"--controlnet {source}: the folder does not exist; give a FLUX.1 ControlNet folder "
                                 "(with config.json) or a hub id")
        if not (path / "config.json").is_file():
            raise SpatialIDError(f"--controlnet {source}: no config.json in this folder; give a diffusers FLUX.1 "
                                 "ControlNet folder or a hub id")
    elif "/" not in source:
        raise SpatialIDError(f"--controlnet {source!r} is neither a local folder nor a hub id (owner/name)")
    elif offline and not in_hub_cache(source, getattr(args, "cache_dir", None)):
        raise SpatialIDError(f"--controlnet {source}: not available offline (not in the Hugging Face cache); download "
                             f"it on a connected machine with `hf download {source}`, or give a local folder")


def _check_identity_files(args: argparse.Namespace) -> None:
    """``--id-embeds`` / ``--person-embeds``: present and safetensors by their first bytes (tokens are read later)."""
    from spatialid.errors import InputImageError
    from spatialid.utils.weights import sniff_safetensors

    files = ([("--id-embeds", args.id_embeds)] if getattr(args, "id_embeds", None) else []) + [
        ("--person-embeds", f) for f in getattr(args, "people_embeds", None) or []]
    for flag, name in files:
        p = Path(name).expanduser()
        if not p.is_file():
            raise InputImageError(f"{p}: identity file not found (write one with `spatialid encode --id PHOTO --out {p}`)")
        sniff_safetensors(p, "give an identity file written by `spatialid encode`", name=f"{flag} {p}")


def _black(path: str) -> bool:
    import numpy as np

    from spatialid.utils.images import load_image

    return not (np.asarray(load_image(path).convert("L")) > 0).any()


def _check_masks(args: argparse.Namespace) -> None:
    """Region mask pictures and the inpainting mask must have some white (the web UI refuses them too)."""
    from spatialid.utils.images import load_image

    for k, region in enumerate(getattr(args, "regions", None) or [], 1):
        if "," in region and not Path(region).exists():
            continue  # a box: checked with the settings
        load_image(region)  # a missing or broken picture: one line
        if _black(region):
            raise SpatialIDError(f"--region {region}: the mask is black everywhere; paint the person's place white")
    mask = getattr(args, "inpaint_mask", None)
    if mask and Path(mask).expanduser().is_file() and _black(mask):
        raise SpatialIDError(f"--inpaint-mask {mask}: the mask is black everywhere; paint the place to redraw white")


MAX_MASK_FILE_BYTES = 2**31  # far above any run's recording ([steps, points, people, images, rows, cols] float32)


def _check_mask_file(args: argparse.Namespace, people: int, size: tuple[int, int], steps: int, start: int) -> None:
    """``--masks-from`` against this run: steps, people, images and grid from the header; the values from the data."""
    value = getattr(args, "masks_from", None)
    if not value:
        return
    flag, p = "--masks-from", Path(value).expanduser()
    if not p.is_file():
        raise SpatialIDError(f"{flag} {p}: mask file not found (write one with --save-masks)")
    if p.stat().st_size > MAX_MASK_FILE_BYTES:
        raise SpatialIDError(f"{flag} {p}: larger than {MAX_MASK_FILE_BYTES // 2**30} GB; give a file written by --save-masks")
    header = read_safetensors_header(p, "give a file written by --save-masks", name=f"{flag} {p}")
    meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
    info = header.get("masks")
    shape = info.get("shape") if isinstance(info, dict) else None
    if not isinstance(shape, list) or len(shape) != 6 or not all(isinstance(v, int) for v in shape) \
            or info.get("dtype") != "F32":
        raise SpatialIDError(f"{flag} {p}: no float32 'masks' tensor [steps, points, persons, batch, rows, cols]; "
                             "give a file written by --save-masks")
    try:
        recorded = json.loads(meta.get("steps", "null"))
    except (ValueError, TypeError, RecursionError):
        recorded = None
    if not isinstance(recorded, list) or len(recorded) != shape[0] or not all(
            isinstance(s, int) and not isinstance(s, bool) and -10_000 <= s < 10_000 for s in recorded):
        raise SpatialIDError(f"{flag} {p}: missing or odd 'steps' metadata; give a file written by --save-masks")
    if people and shape[2] != people:
        raise SpatialIDError(f"{flag} {p} holds masks of {shape[2]} person(s) but {people} are given")
    if shape[3] != getattr(args, "num_images", 1):
        raise SpatialIDError(f"{flag} {p} holds masks of {shape[3]} image(s) per run but -n is {args.num_images}; "
                             "use the same number of images")
    rows, cols = size[1] // 16, size[0] // 16
    if (shape[4], shape[5]) != (rows, cols):
        raise SpatialIDError(f"{flag} {p} holds masks of a {shape[5] * 16}x{shape[4] * 16} image but this run is "
                             f"{size[0]}x{size[1]}; use the same --size")
    if getattr(args, "pipeline", "text2image") == "text2image":
        missing = sorted(set(range(start, steps)) - set(recorded))
        if missing:
            have = f"steps {min(recorded)}-{max(recorded)}" if recorded else "no steps"
            raise SpatialIDError(f"{flag} {p} holds {have} but this run injects steps {start}-{steps - 1} "
                                 f"(--steps {steps}, --start-step {start}); use the steps of the run that wrote it")
    from safetensors.numpy import load_file

    import numpy as np

    masks = load_file(str(p)).get("masks")
    if masks is None or not np.isfinite(masks).all() or masks.size and (masks.min() < 0 or masks.max() > D.MAX_MASK_VALUE):
        raise SpatialIDError(f"{flag} {p}: mask values must be finite and in [0, 1] (0 = no identity, 1 = full)")


def inputs_of(args: argparse.Namespace) -> list[Path]:
    """Every input file named on the command line (outputs must never replace one)."""
    names: list[str] = []
    names += getattr(args, "id_images", None) or []
    for key in ("id_embeds", "init_image", "inpaint_mask", "control_image", "masks_from", "from_png", "prompts"):
        if getattr(args, key, None):
            names.append(getattr(args, key))
    for entry in getattr(args, "people", None) or []:
        names += [part.strip() for part in entry.split(",") if part.strip()]
    names += getattr(args, "people_embeds", None) or []
    names += [r for r in getattr(args, "regions", None) or [] if Path(r).exists()]
    names += [s.rpartition(":")[0] or s for s in getattr(args, "lora", None) or []]
    return [Path(n).expanduser() for n in names]


def check_command_line(args: argparse.Namespace) -> None:
    """Every check of a ``generate`` command line that needs no torch and no model (see the module docstring).

    Runs after ``--from-png`` filled the flags and ``check_pipeline_arguments`` picked the pipeline.
    """
    from spatialid.pipeline.settings import parse_size
    from spatialid.utils.offline import is_offline

    problem = model_name_error(args.model)
    if problem:
        raise SpatialIDError(problem)
    from spatialid.app.loading import _check_local_model

    _check_local_model(args.model)  # --model /nonexistent: one line, no torch
    device = str(getattr(args, "device", "auto") or "auto")
    on_cpu = device == "cpu" or device == "mps" or (device == "auto" and not gpu_possible())
    offload = getattr(args, "offload", "none")
    if offload not in (None, "none") and on_cpu:
        raise SpatialIDError(f"--offload {offload} moves models between CPU and GPU; it needs --device cuda and "
                             f"this run has no GPU (--device {device}): drop --offload")
    if device.startswith("cuda") and not gpu_possible():
        raise SpatialIDError(f"--device {device}: this machine has no CUDA GPU; use --device cpu (or auto)")
    names = [args.preset] + [n.strip() for n in (getattr(args, "compare", None) or "").split(",") if n.strip()]
    for name in names:
        if name not in D.PRESET_NAMES:
            close = difflib.get_close_matches(name, D.PRESET_NAMES, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SpatialIDError(f"unknown preset {name!r}; {hint}valid presets: {', '.join(D.PRESET_NAMES)}")
    _number("--controlnet-scale", getattr(args, "controlnet_scale", None), 0.0, D.MAX_CONTROLNET_SCALE,
            "how strongly the control image steers")
    _number("--strength", getattr(args, "strength", None), 0.0, 1.0, "the share of --init-image redrawn")
    for flag, dest in (("--id-weight", "id_weight"), ("--true-cfg", "true_cfg"), ("--guidance", "guidance")):
        value = getattr(args, dest, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise SpatialIDError(f"{flag} must be a finite number, got {value!r}")
    if getattr(args, "cache", None) not in (None, "none"):
        from spatialid.injection.step_cache import parse_cache  # imports torch, only when --cache is given

        parse_cache(args.cache)  # an unknown cache name: one line before the "loading" line
    _check_identity_files(args)
    offline = is_offline(True if getattr(args, "offline", False) else None)
    check_lora_files(getattr(args, "lora", None) or [], offline=offline, cache_dir=getattr(args, "cache_dir", None))
    _check_controlnet(args, offline)
    _check_masks(args)
    size = parse_size(args.size) if getattr(args, "size", None) else None
    tiny = args.model in D.TINY_MODELS
    base = D.size_steps("generate", tiny=tiny)
    width, height = size or (base.width, base.height)
    steps = args.steps if args.steps is not None else base.steps
    from spatialid.cli.options import people_inputs

    count = len(people_inputs(args) or []) or (1 if args.id_images or args.id_embeds else 0)
    if isinstance(steps, int) and 0 < steps <= 10_000:
        _check_mask_file(args, count, (width, height), steps, int(getattr(args, "start_step", 0) or 0))


def huge_job_warning(args: argparse.Namespace, width: int, height: int, steps: int) -> str | None:
    """A warning before a job that runs for many minutes on a CPU (a toy model at 4096x4096 took 354 s per step)."""
    device = str(getattr(args, "device", "auto") or "auto")
    if not (device == "cpu" or (device == "auto" and not gpu_possible())):
        return None
    tokens = (width // 16) * (height // 16)
    if args.model in D.TINY_MODELS:
        per_step = 354.0 * (tokens / 65536) ** 2 + 0.02  # measured: 4096x4096 (65536 tokens) at 354 s per step
    else:
        per_step = 60.0 * max(1.0, tokens / 4096)  # a 12B transformer on a CPU: minutes per step at 1024x1024
    total = per_step * steps * max(1, getattr(args, "num_images", 1) or 1)
    if total < 120:
        return None
    return (f"this job ({width}x{height}, {steps} steps on the CPU) may take about {total / 60:.0f} minutes; "
            "Ctrl-C stops it (a second Ctrl-C quits at once); a smaller --size or fewer --steps is much faster")
