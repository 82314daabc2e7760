"""Command-line flags shared by several sub-commands, and their translation to the app layer.

Each flag is defined once here (with its default from :mod:`spatialid.defaults`), so ``generate``,
``bench``, ``serve`` and ``encode`` cannot drift apart; the parsed values become a
:class:`~spatialid.app.loading.ModelSpec` or a
:class:`~spatialid.pipeline.settings.GenerationSettings` through the functions below.
"""

from __future__ import annotations

import argparse

from spatialid import defaults as D

__all__ = ["add_model_arguments", "add_sampling_arguments", "model_spec", "sampling_settings"]


def add_model_arguments(p: argparse.ArgumentParser, *, memory: bool = True) -> None:
    """Model / memory / device flags (``memory=False`` leaves out offload and quantization)."""
    g = p.add_argument_group("model and memory")
    g.add_argument(
        "--model",
        default=D.DEFAULT_FLUX_MODEL,
        help="FLUX.1 hub id or local diffusers folder (FLUX.1-dev, FLUX.1-Krea-dev, ...), a single "
        "transformer .safetensors/.gguf file, or 'tiny' = offline toy model with random weights whose "
        f"images are noise by design (default: {D.DEFAULT_FLUX_MODEL})",
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


def model_spec(args: argparse.Namespace, **overrides):  # -> ModelSpec
    """The :class:`ModelSpec` of the parsed model flags (flags a command lacks keep their defaults)."""
    from spatialid.app.loading import ModelSpec

    fields = {
        "model": "model", "pulid": "pulid", "offload": "offload", "quantize": "quantize", "device": "device",
        "dtype": "dtype", "offline": "offline", "cache_dir": "cache_dir", "eva": "eva", "models_dir": "models_dir",
        "face_backend": "face_backend",
    }
    values = {name: getattr(args, attr) for name, attr in fields.items() if getattr(args, attr, None) is not None}
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
    p.add_argument("--true-cfg", type=float, default=D.DEFAULT_TRUE_CFG, help="true classifier-free guidance scale, 1 = off (1..10); > 1 doubles the cost")
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


def sampling_settings(args: argparse.Namespace, purpose: str, *, tiny: bool, **fields):  # -> GenerationSettings
    """The :class:`GenerationSettings` of the shared flags, with the purpose's default size and steps."""
    from spatialid.pipeline.settings import GenerationSettings, parse_size

    base = D.size_steps(purpose, tiny=tiny)
    width, height = parse_size(args.size) if args.size else (base.width, base.height)
    return GenerationSettings(
        id_weight=args.id_weight,
        start_step=args.start_step,
        true_cfg=args.true_cfg,
        negative_prompt=args.negative_prompt,
        steps=args.steps if args.steps is not None else base.steps,
        guidance=args.guidance,
        width=width,
        height=height,
        schedule_overrides=schedule_overrides(args),
        noise=args.noise,
        **fields,
    )
