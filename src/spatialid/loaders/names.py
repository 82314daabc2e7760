"""Names shared by the loaders, the app layer and the CLI, free of torch imports (argument checks stay instant)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spatialid import defaults as D

__all__ = ["IMAGE_PIPELINES", "PIPELINE_CLASSES", "STRENGTH_PIPELINES", "controlnet_misfit", "parse_lora"]

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
