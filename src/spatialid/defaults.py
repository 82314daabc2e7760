"""Every default of a generation, in one place.

Plain constants with no imports, so the CLI's argument parser, the web UI's form, the bench and
the pipeline read the same values without loading torch. Where a value comes from PuLID-FLUX or
IBench, the comment says so; change a default here and every front-end follows.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_CFG_START_STEP",
    "DEFAULT_CONTROLNET_SCALE",
    "DEFAULT_IMG2IMG_STRENGTH",
    "DEFAULT_INPAINT_STRENGTH",
    "DEFAULT_FLUX_MODEL",
    "DEFAULT_GUIDANCE",
    "DEFAULT_ID_WEIGHT",
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "DEFAULT_PRESET",
    "DEFAULT_START_STEP",
    "DEFAULT_TRUE_CFG",
    "CHROMA_TRUE_CFG",
    "default_true_cfg",
    "DEFAULT_NOISE",
    "IMAGE_PIPELINES",
    "MAX_CONTROLNET_SCALE",
    "MAX_LORA_SCALE",
    "MAX_MASK_VALUE",
    "PRESET_NAMES",
    "PIPELINES",
    "NOISE_MODES",
    "BENCH_PRESETS",
    "BENCH_SEED",
    "PULID_FILENAME",
    "PULID_REPO_ID",
    "SizeSteps",
    "TINY_CHROMA_MODEL",
    "TINY_MODEL",
    "TINY_MODELS",
    "size_steps",
]

# ----------------------------------------------------------------------------- models
DEFAULT_FLUX_MODEL = "black-forest-labs/FLUX.1-dev"
PULID_REPO_ID = "guozinan/PuLID"
PULID_FILENAME = "pulid_flux_v0.9.1.safetensors"  # v0.9.0 has the same layout
TINY_MODEL = "tiny"  # the offline toy model with random weights (``--model tiny``)
TINY_CHROMA_MODEL = "tiny-chroma"  # the same at toy size on Chroma's architecture (``--model tiny-chroma``)
TINY_MODELS = (TINY_MODEL, TINY_CHROMA_MODEL)

# ----------------------------------------------------------------------------- sampling
# The authors' IBench configuration ("Config F" of test_ibench_spatial.py), which produced the
# paper's table: late floor 0.8, prior sigma 0.7, global floor 0.3 = our ``relaxed``.
DEFAULT_PRESET = "relaxed"
BENCH_PRESETS = ("pulid", DEFAULT_PRESET)  # baseline and the paper's configuration
NOISE_MODES = ("diffusers", "reference")
DEFAULT_NOISE = "diffusers"
DEFAULT_ID_WEIGHT = 1.0
DEFAULT_START_STEP = 0
DEFAULT_TRUE_CFG = 1.0  # 1 = off
# Chroma has no guidance embedding: without real CFG its images lose the prompt, so its default is
# diffusers' ChromaPipeline default (guidance_scale 5.0), doubling the transformer calls as CFG does.
CHROMA_TRUE_CFG = 5.0


def default_true_cfg(family: str) -> float:
    """``--true-cfg`` when it is not given: off for FLUX.1 (embedded guidance), on for Chroma."""
    return CHROMA_TRUE_CFG if family == "chroma" else DEFAULT_TRUE_CFG

DEFAULT_CFG_START_STEP = 1  # PuLID-FLUX mixes the CFG branches from step 1 on
DEFAULT_GUIDANCE = 4.0  # PuLID-FLUX's embedded guidance for FLUX.1-dev
DEFAULT_MAX_SEQUENCE_LENGTH = 128  # T5 prompt tokens, as PuLID-FLUX's app
BENCH_SEED = 42  # test_ibench_spatial.py: seed 42 for every image
# The mask presets' names, in help order (their schedules are spatialid.masks.PRESETS, which needs torch;
# tests/test_cli_first_hour.py checks both list the same names), so the CLI checks a name in milliseconds.
PRESET_NAMES = (
    "pulid", "paper", "relaxed", "late-floor-0.7", "global-floor-0.3", "global-floor-0.5", "prior-only",
    "attention-only", "no-relax", "entropy",
)
# Largest |scale| of a LoRA (--lora FILE:SCALE, the web UI's weight): beyond it a LoRA only breaks the image.
MAX_LORA_SCALE = 4.0
# A recorded mask is in [0, 1] by construction; the slack covers float rounding of files written elsewhere.
MAX_MASK_VALUE = 1.001
MAX_CONTROLNET_SCALE = 2.0  # --controlnet-scale: diffusers' examples use 0.3-1.0
# other FLUX.1 pipelines (docs/pipelines.md): how much of the input image is redrawn, ControlNet weight
DEFAULT_IMG2IMG_STRENGTH = 0.8
DEFAULT_INPAINT_STRENGTH = 0.85  # identity repair redraws the face region almost fully
DEFAULT_CONTROLNET_SCALE = 0.7
# GenerationSettings.pipeline values (spatialid.loaders.names maps them to diffusers classes), and
# those that start from an input image
PIPELINES = ("text2image", "img2img", "inpaint", "fill", "kontext", "controlnet", "control")
IMAGE_PIPELINES = ("img2img", "inpaint", "fill", "kontext")


@dataclass(frozen=True)
class SizeSteps:
    """Image size and denoising steps a front-end starts from."""

    width: int
    height: int
    steps: int


# purpose -> (real model, tiny model). The real model: one rule, the authors' settings (1024x1024 at
# 20 steps; the bench IBench's 896x1152 at 25). The tiny model's differ on purpose, by how many images
# a command makes and what it shows: ``generate`` (also the pipeline's own default and the demo's)
# one image at 256x256 so its pictures are big enough to look at, 6 steps (every mask phase); the web
# UI 128x128 at 8 steps so a click takes seconds on a shared server and its mask picture reaches all
# three phases; the bench 64x64 at 2 steps because it makes a grid of many images and draws no
# mask pictures. Every front-end reads its pair from here, so they cannot drift apart unseen.
_SIZE_STEPS: dict[str, tuple[SizeSteps, SizeSteps]] = {
    "generate": (SizeSteps(1024, 1024, 20), SizeSteps(256, 256, 6)),
    "ui": (SizeSteps(1024, 1024, 20), SizeSteps(128, 128, 8)),  # 8 tiny steps: the mask picture reaches all three phases
    # test_ibench_spatial.py: width 896, height 1152, 25 steps (guidance 4, start step 0,
    # id weight 1, true CFG 1, T5 length 128, as the defaults above)
    "bench": (SizeSteps(896, 1152, 25), SizeSteps(64, 64, 2)),
}


def size_steps(purpose: str, tiny: bool) -> SizeSteps:
    """Default size and steps of ``purpose`` (``generate``, ``ui`` or ``bench``) for the real or tiny model."""
    try:
        real, small = _SIZE_STEPS[purpose]
    except KeyError:
        raise ValueError(f"unknown purpose {purpose!r}; expected one of {', '.join(_SIZE_STEPS)}") from None
    return small if tiny else real
