"""The other FLUX.1 pipelines behind the settings record: img2img, inpainting, Fill, Kontext, ControlNet, Control.

The application layer calls every pipeline with :meth:`GenerationSettings.pipeline_kwargs`, the
keyword arguments of :class:`SpatialIDPipeline`. :class:`IdentityPipelineRunner` takes the same
arguments, builds the diffusers pipeline's own ones (``image``, ``mask_image``, ``strength``,
``control_image``, ...), passes the identity per call through ``joint_attention_kwargs`` (see
:mod:`spatialid.loaders.pulid`) and returns the same output record, so ``run_job``, the metadata
and ``spatialid info`` serve every pipeline alike. :func:`variant_pipeline` builds the diffusers
pipeline from the components of an already loaded ``SpatialIDPipeline`` (the same module objects,
as ``from_pipe`` does: FLUX's weights are read once).
"""

from __future__ import annotations

import inspect
import secrets
from pathlib import Path
from typing import Any

import torch

from spatialid import __version__
from spatialid import defaults as D
from spatialid.errors import SpatialIDError
from spatialid.loaders.names import (
    IMAGE_PIPELINES,
    PIPELINE_CLASSES,
    STRENGTH_PIPELINES,
    controlnet_misfit,
    parse_lora,
)
from spatialid.loaders.pulid import IDENTITY_KEY, PuLIDIdentity, load_pulid

__all__ = [
    "IdentityPipelineRunner",
    "check_controlnet_fits",
    "load_controlnet",
    "load_loras",
    "variant_pipeline",
]

def variant_pipeline(base: Any, mode: str, controlnet: Any = None) -> Any:
    """The diffusers pipeline of ``mode`` on ``base``'s components (shared, not copied), with PuLID loaded."""
    import diffusers

    if mode not in PIPELINE_CLASSES:
        raise SpatialIDError(f"unknown pipeline {mode!r}; one of: {', '.join(PIPELINE_CLASSES)}")
    cls = getattr(diffusers, PIPELINE_CLASSES[mode])
    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    components = getattr(base, "flux_components", None) or dict(base.components)
    parts = {k: v for k, v in components.items() if k in names}
    if "controlnet" in names:
        if controlnet is None:
            raise SpatialIDError(f"{cls.__name__} needs a ControlNet (--controlnet ID)")
        parts["controlnet"] = controlnet
    pipe = cls(**parts)
    pulid = getattr(base, "pulid", None)
    if pulid is not None:
        load_pulid(pipe, pulid)
    return pipe


def load_loras(pipe: Any, loras: list[str] | tuple[str, ...], **hub_kwargs: Any) -> list[str]:
    """Load each ``FILE_OR_HUB_ID[:SCALE]`` with diffusers' ``load_lora_weights`` (PEFT) and set the scales.

    Raises:
        SpatialIDError: a LoRA whose keys or shapes do not fit this transformer (one line).
    """
    if not loras:
        return []
    try:
        import peft  # noqa: F401
    except ImportError:
        raise SpatialIDError("--lora needs the PEFT library: pip install peft") from None
    names: list[str] = []
    scales: list[float] = []
    for i, text in enumerate(loras):
        source, scale = parse_lora(text)
        name = f"lora{i}"
        path = Path(source).expanduser()
        kwargs: dict[str, Any] = dict(hub_kwargs)
        if path.is_file():
            kwargs["weight_name"] = path.name
            location = str(path.parent)
        else:
            location = source
        before = set(_adapters(pipe))
        try:
            pipe.load_lora_weights(location, adapter_name=name, **kwargs)
        except SpatialIDError:
            raise
        except Exception as exc:  # noqa: BLE001 - peft/diffusers raise many types: size mismatch, unknown keys, missing file
            reason = " ".join(str(exc).split())[:200]
            raise SpatialIDError(
                f"LoRA {source} does not fit this FLUX transformer (made for another base model?): {reason}"
            ) from None
        if name not in set(_adapters(pipe)) - before:
            raise SpatialIDError(
                f"LoRA {source} has no weights for this FLUX transformer (made for another base model?)"
            )
        names.append(name)
        scales.append(scale)
    pipe.set_adapters(names, adapter_weights=scales)
    return names


def _adapters(pipe: Any) -> list[str]:
    listed = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else {}
    return [n for values in listed.values() for n in values]


def load_controlnet(source: str, *, torch_dtype: Any, local_files_only: bool | None, cache_dir: Any = None) -> Any:
    """A ``FluxControlNetModel`` from a hub id or folder (one-line errors for missing files)."""
    from diffusers import FluxControlNetModel

    from spatialid.pipeline.loading import hub_errors

    with hub_errors("ControlNet", source, f"download it first (huggingface-cli download {source}) or give a local folder"):
        return FluxControlNetModel.from_pretrained(
            source, torch_dtype=torch_dtype, local_files_only=bool(local_files_only), cache_dir=cache_dir
        )


def check_controlnet_fits(controlnet_config: Any, transformer_config: Any, source: str = "") -> None:
    """Refuse a ControlNet made for another transformer (widths that cannot add to its blocks)."""
    problems = controlnet_misfit(dict(controlnet_config), dict(transformer_config))
    if problems:
        raise SpatialIDError(f"ControlNet {source} does not fit this FLUX transformer ({problems})")


class IdentityPipelineRunner:
    """A diffusers FLUX.1 pipeline called with SpatialIDPipeline's arguments (for ``run_job``).

    Args:
        pipe: the diffusers pipeline (from :func:`variant_pipeline`: PuLID loaded).
        base: the ``SpatialIDPipeline`` it shares components with (identity encoder, model info).
        mode: a key of :data:`PIPELINE_CLASSES`.
    """

    def __init__(self, pipe: Any, base: Any, mode: str) -> None:
        self.pipe = pipe
        self.base = base
        self.mode = mode
        self._params = set(inspect.signature(type(pipe).__call__).parameters)

    # what cmd_generate and the app use besides __call__
    def encode_identity(self, id_image: Any) -> Any:
        return self.base.encode_identity(id_image)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    @property
    def is_tiny(self) -> bool:
        return bool(getattr(self.base, "is_tiny", False))

    def __getattr__(self, name: str) -> Any:  # transformer, scheduler, ... of the diffusers pipeline
        return getattr(self.pipe, name)

    @property
    def has_true_cfg(self) -> bool:
        return "true_cfg_scale" in self._params

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        id_embeds: Any = None,
        *,
        preset: Any = D.DEFAULT_PRESET,
        id_weight: float = D.DEFAULT_ID_WEIGHT,
        start_step: int = D.DEFAULT_START_STEP,
        true_cfg: float = D.DEFAULT_TRUE_CFG,
        negative_prompt: str = "",
        cfg_start_step: int = D.DEFAULT_CFG_START_STEP,
        guidance_scale: float = D.DEFAULT_GUIDANCE,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        schedule_overrides: dict[str, float] | None = None,
        noise: str = D.DEFAULT_NOISE,
        return_masks: bool = False,
        init_image: Any = None,
        strength: float | None = None,
        inpaint_mask: Any = None,
        control_image: Any = None,
        controlnet_scale: float | None = None,
        **recorded: Any,
    ) -> Any:
        """Generate with ``self.mode``'s pipeline; returns a ``SpatialIDPipelineOutput`` (images, masks, settings)."""
        from spatialid.masks import apply_overrides, resolve_preset
        from spatialid.pipeline.pipeline_spatialid import (
            TINY_NOTE,
            SpatialIDPipelineOutput,
            _CFGWarmup,
            _collect_masks,
            _seed_generators,
        )
        from spatialid.pipeline.settings import GenerationSettings
        from spatialid.utils.images import load_image

        if noise != "diffusers":
            raise SpatialIDError(f"--noise {noise} applies to text-to-image only; the {self.mode} pipeline draws diffusers' noise")
        steps = int(num_inference_steps or self.base.default_num_inference_steps)
        height = int(height or self.base.default_height)
        width = int(width or self.base.default_width)
        max_len = int(max_sequence_length or self.base.default_max_sequence_length)
        use_cfg = float(true_cfg) > 1.0
        if use_cfg and not self.has_true_cfg:
            raise SpatialIDError(f"{type(self.pipe).__name__} has no true CFG; use --true-cfg 1")
        total = (1 if isinstance(prompt, str) else len(prompt)) * int(num_images_per_prompt)
        seed = int(seed) if seed is not None else secrets.randbelow(2**32)
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "guidance_scale": float(guidance_scale),
            "num_images_per_prompt": int(num_images_per_prompt),
            "generator": _seed_generators(seed, total),
            "max_sequence_length": max_len,
            "output_type": "pil",
        }
        if use_cfg:
            kwargs.update(true_cfg_scale=float(true_cfg), negative_prompt=negative_prompt or "")
        region = None
        if self.mode in IMAGE_PIPELINES:
            if init_image is None:
                raise SpatialIDError(f"the {self.mode} pipeline needs an input image (--init-image)")
            kwargs["image"] = load_image(init_image)
        if self.mode in STRENGTH_PIPELINES and strength is not None and "strength" in self._params:
            kwargs["strength"] = float(strength)
        if self.mode in ("inpaint", "fill"):
            if inpaint_mask is None:
                raise SpatialIDError(f"the {self.mode} pipeline needs a mask (--inpaint-mask)")
            region = load_image(inpaint_mask).convert("L")
            kwargs["mask_image"] = region
        if self.mode == "kontext":
            kwargs.update(max_area=height * width, _auto_resize=not self.is_tiny)
        if self.mode in ("controlnet", "control"):
            if control_image is None:
                raise SpatialIDError(f"the {self.mode} pipeline needs a control image (--control-image)")
            kwargs["control_image"] = load_image(control_image)
            if self.mode == "controlnet":
                kwargs["controlnet_conditioning_scale"] = float(controlnet_scale if controlnet_scale is not None else 1.0)

        tokens, uncond, identity_info = self.base._resolve_identity(
            None, id_embeds, None, need_uncond=use_cfg and float(id_weight) > 0
        )
        inject = tokens is not None and float(id_weight) > 0
        schedule = apply_overrides(resolve_preset(preset), schedule_overrides)
        if inject:
            identity = PuLIDIdentity(
                tokens, uncond, id_weight=float(id_weight), preset=schedule, start_step=int(start_step),
                region=region, record_masks=return_masks,
            )
            kwargs["joint_attention_kwargs"] = {IDENTITY_KEY: identity}
        if recorded.get("callback_on_step_end") is not None:  # progress and Stop of the web UI, as for SpatialIDPipeline
            kwargs["callback_on_step_end"] = recorded["callback_on_step_end"]
        warmup = _CFGWarmup(self.pipe.transformer, cfg_start_step) if use_cfg and cfg_start_step > 0 else None
        try:
            out = self.pipe(**kwargs)
        finally:
            if warmup is not None:
                warmup.remove()
        loader = getattr(self.pipe, "_spatialid_pulid", None)
        records = loader.records if inject and loader is not None else None
        rows, cols = height // 16, width // 16
        masks = _collect_masks(records, 2 if use_cfg else 1, rows, cols) if return_masks and records else None
        if return_masks and masks is None:
            masks = []
        preset_name = preset if isinstance(preset, str) else ("pulid" if preset is None else "custom")
        record = GenerationSettings(
            prompt=prompt if isinstance(prompt, str) else prompt[0],
            negative_prompt=negative_prompt if use_cfg else None,
            preset=preset_name,
            id_weight=float(id_weight),
            start_step=int(start_step),
            true_cfg=float(true_cfg),
            cfg_start_step=int(cfg_start_step) if use_cfg else None,
            guidance=float(guidance_scale),
            steps=steps,
            width=width,
            height=height,
            seed=seed,
            num_images=total,
            max_sequence_length=max_len,
            schedule_overrides=dict(schedule_overrides) if schedule_overrides else None,
            noise=noise,
        )
        pipeline_record = {
            "pipeline": self.mode,
            "init_image": _name(init_image),
            "strength": float(strength) if strength is not None and self.mode in STRENGTH_PIPELINES else None,
            "inpaint_mask": _name(inpaint_mask),
            "control_image": _name(control_image),
            "controlnet_scale": float(controlnet_scale) if controlnet_scale is not None and self.mode == "controlnet" else None,
        }
        settings = {
            "version": __version__,
            **record.to_dict(),
            **{k: v for k, v in recorded.items() if k in ("controlnet", "loras")},
            **pipeline_record,
            "seeds": [seed + i for i in range(total)],
            "schedule": schedule.to_dict() if schedule is not None else None,
            "identity": identity_info,
            "identity_injected": bool(inject),
            "offload": getattr(self.base, "_offload_mode", None),
            **(getattr(self.base, "model_info", None) or {}),
        }
        if self.is_tiny:
            settings["note"] = TINY_NOTE
        return SpatialIDPipelineOutput(images=out.images, masks=masks, settings=settings)


def _name(source: Any) -> str | None:
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        return Path(source).name
    return f"<{type(source).__name__}>"
