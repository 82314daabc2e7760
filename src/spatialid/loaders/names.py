"""Names shared by the loaders, the app layer and the CLI, free of torch imports (argument checks stay instant)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spatialid import defaults as D

__all__ = [
    "CHROMA_PIPELINE_CLASSES",
    "FAMILIES",
    "IMAGE_PIPELINES",
    "PIPELINE_CLASSES",
    "STRENGTH_PIPELINES",
    "controlnet_misfit",
    "family_of_class",
    "parse_lora",
    "pipeline_classes",
    "transformer_misfit",
]

# GenerationSettings.pipeline (defaults.PIPELINES, same order) -> the diffusers class that runs it
PIPELINE_CLASSES = {
    "text2image": "FluxPipeline",
    "img2img": "FluxImg2ImgPipeline",
    "inpaint": "FluxInpaintPipeline",
    "fill": "FluxFillPipeline",
    "kontext": "FluxKontextPipeline",
    "controlnet": "FluxControlNetPipeline",
    "control": "FluxControlPipeline",
}
# Chroma (ChromaTransformer2DModel: FLUX.1's widths and block counts, no guidance embedding, real CFG)
CHROMA_PIPELINE_CLASSES = {
    "text2image": "ChromaPipeline",
    "img2img": "ChromaImg2ImgPipeline",
    "inpaint": "ChromaInpaintPipeline",
}
# pipeline family -> its pipelines; a model folder's family comes from model_index.json's _class_name
FAMILIES = {"flux": PIPELINE_CLASSES, "chroma": CHROMA_PIPELINE_CLASSES}
# the pipelines that start from an input image (--init-image), and those that take --strength
IMAGE_PIPELINES = D.IMAGE_PIPELINES
STRENGTH_PIPELINES = ("img2img", "inpaint", "fill")


def parse_lora(text: str) -> tuple[str, float]:
    """``FILE_OR_HUB_ID[:SCALE]`` -> ``(source, scale)``; a tail that is no number belongs to the name."""
    source, sep, tail = str(text).rpartition(":")
    if sep and source:
        try:
            return source, float(tail)
        except ValueError:
            pass
    return str(text), 1.0


def controlnet_misfit(controlnet: Mapping[str, Any], transformer: Mapping[str, Any]) -> str:
    """What keeps a ControlNet (its config) from adding to this transformer's blocks; "" when it fits."""

    def width(cfg: Mapping[str, Any]) -> int:
        return int(cfg.get("num_attention_heads", 0)) * int(cfg.get("attention_head_dim", 0))

    problems = []
    if width(controlnet) != width(transformer):
        problems.append(f"width {width(controlnet)} vs {width(transformer)}")
    for key in ("in_channels", "joint_attention_dim", "pooled_projection_dim"):
        a, b = controlnet.get(key), transformer.get(key)
        if a is not None and b is not None and int(a) != int(b):
            problems.append(f"{key} {a} vs {b}")
    return ", ".join(problems)


def pipeline_classes(family: str) -> dict[str, str]:
    """``GenerationSettings.pipeline`` -> diffusers class name, for ``family`` (``flux`` or ``chroma``)."""
    return FAMILIES[family]


def family_of_class(class_name: str | None) -> str | None:
    """The family of a ``model_index.json`` ``_class_name`` (ours included), or None for other models."""
    name = str(class_name or "")
    if name == "SpatialIDPipeline" or name in PIPELINE_CLASSES.values():
        return "flux"
    if name in CHROMA_PIPELINE_CLASSES.values():
        return "chroma"
    return None


def transformer_misfit(
    config: Mapping[str, Any],
    *,
    ca_dim: int = 3072,
    num_ca: int = 20,
    double_interval: int = 2,
    single_interval: int = 4,
) -> str:
    """What keeps PuLID-FLUX CA modules (``num_ca`` of width ``ca_dim``, one per ``double_interval``
    double and ``single_interval`` single blocks) off this transformer (its ``config.json``); "" when they fit.

    The published weights need FLUX.1's transformer: 24 heads x 128 = 3072 wide, 19 double and
    38 single blocks (10 + 10 CA modules). FLUX.2, Qwen-Image and others differ in one or both.
    """
    heads, head_dim = int(config.get("num_attention_heads", 0) or 0), int(config.get("attention_head_dim", 0) or 0)
    double = int(config.get("num_layers", 0) or 0)
    single = int(config.get("num_single_layers", 0) or 0)
    problems = []
    if heads * head_dim != ca_dim:
        problems.append(f"inner dim {heads * head_dim} ({heads} heads x {head_dim}) vs {ca_dim}")
    needed = -(-double // double_interval) + -(-single // single_interval)
    if needed != num_ca:
        problems.append(
            f"{double} double / {single} single blocks take {needed} CA modules vs the weights' {num_ca}"
            + (" (FLUX.1: 19 / 38)" if (num_ca, double_interval, single_interval) == (20, 2, 4) else "")
        )
    return ", ".join(problems)
