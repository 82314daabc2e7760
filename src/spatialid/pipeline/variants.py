"""The other FLUX.1 pipelines behind the settings record: img2img, inpainting, Fill, Kontext, ControlNet, Control.

The application layer calls every pipeline with :meth:`GenerationSettings.pipeline_kwargs`, the
keyword arguments of :class:`SpatialIDPipeline`. :class:`IdentityPipelineRunner` takes the same
arguments, turns the pipeline inputs into the diffusers pipeline's own ones (``image``,
``mask_image``, ``strength``, ``control_image``, ...) and runs the one identity call
(:func:`~spatialid.pipeline.generate.run_identity_call`): several people, regions (intersected
with the inpainting mask), mask recording and replay, true CFG, step caches and compilation work
here as in text-to-image. :func:`variant_pipeline` builds the diffusers pipeline from the
components of an already loaded ``SpatialIDPipeline`` (the same module objects, as ``from_pipe``
does: FLUX's weights are read once) and loads PuLID with the one loader, which shares the
transformer's injector instead of hooking it twice.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from spatialid import defaults as D
from spatialid.errors import SpatialIDError
from spatialid.loaders.names import (
    IMAGE_PIPELINES,
    STRENGTH_PIPELINES,
    controlnet_misfit,
    parse_lora,
    pipeline_classes,
)
from spatialid.injection.identity import IdentityError
from spatialid.loaders.pulid import load_pulid
from spatialid.pipeline.generate import run_identity_call

__all__ = [
    "IdentityPipelineRunner",
    "kontext_size",
    "check_controlnet_fits",
    "load_controlnet",
    "load_loras",
    "variant_pipeline",
]

def variant_pipeline(base: Any, mode: str, controlnet: Any = None) -> Any:
    """The diffusers pipeline of ``mode`` on ``base``'s components (shared, not copied), with PuLID loaded."""
    import diffusers

    family = getattr(base, "family", "flux")
    classes = pipeline_classes(family)
    if mode not in classes:
        raise IdentityError(f"unknown {family} pipeline {mode!r}; one of: {', '.join(classes)}")
    cls = getattr(diffusers, classes[mode])
    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    components = getattr(base, "flux_components", None) or dict(base.components)
    parts = {k: v for k, v in components.items() if k in names}
    if "controlnet" in names:
        if controlnet is None:
            raise IdentityError(f"{cls.__name__} needs a ControlNet (--controlnet ID)")
        parts["controlnet"] = controlnet
    pipe = cls(**parts)
    pulid = getattr(base, "pulid", None)
    if pulid is not None:
        load_pulid(pipe, pulid)
    return pipe


def _not_downloadable(exc: BaseException) -> bool:
    """The hub could not be reached or the file is not cached (offline), anywhere in the exception's chain."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        text = str(seen).lower()
        if type(seen).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "RepositoryNotFoundError") \
                or "offline" in text or "local cache" in text or "couldn't connect" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
        raise IdentityError("--lora needs the PEFT library: pip install peft") from None
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
            if not path.is_file() and _not_downloadable(exc):
                raise IdentityError(
                    f"LoRA {source} is not available offline (not in the Hugging Face cache): download it on a "
                    f"connected machine with `hf download {source}`, or give a .safetensors file"
                ) from None
            raise IdentityError(
                f"LoRA {source} does not fit this FLUX transformer (made for another base model?): {reason}"
            ) from None
        if name not in set(_adapters(pipe)) - before:
            raise IdentityError(
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
        raise IdentityError(f"ControlNet {source} does not fit this FLUX transformer ({problems})")


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
        self.family = getattr(base, "family", "flux")
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
        if name.startswith("__") or name in ("pipe", "base"):
            raise AttributeError(name)
        try:
            return getattr(self.pipe, name)
        except AttributeError:  # default size and steps, model record: the base's
            return getattr(self.base, name)

    @property
    def has_true_cfg(self) -> bool:
        return self.family == "chroma" or "true_cfg_scale" in self._params

    def pipeline_call(self, **kwargs: Any) -> Any:
        """The diffusers pipeline's own call.

        Chroma's ``guidance_scale`` is real CFG (negative prompt, two transformer calls per step): the
        settings record's ``true_cfg`` drives it, and FLUX's distilled ``guidance`` has nothing to drive.
        """
        if self.family == "chroma":
            scale = float(kwargs.pop("true_cfg_scale", 1.0))
            kwargs["guidance_scale"] = scale
            if scale <= 1.0:
                kwargs.pop("negative_prompt", None)
        return self.pipe(**kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        id_embeds: Any = None,
        *,
        people: Any = None,
        id_image: Any = None,
        regions: Any = None,
        noise: str = D.DEFAULT_NOISE,
        height: int | None = None,
        width: int | None = None,
        init_image: Any = None,
        strength: float | None = None,
        inpaint_mask: Any = None,
        control_image: Any = None,
        controlnet_scale: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate with ``self.mode``'s pipeline; returns a ``SpatialIDPipelineOutput`` (images, masks, settings).

        Takes :meth:`SpatialIDPipeline.__call__`'s arguments plus the pipeline inputs.
        """
        from spatialid.utils.images import load_image

        if noise != "diffusers":
            raise IdentityError(f"--noise {noise} applies to text-to-image only; the {self.mode} pipeline draws diffusers' noise")
        height = int(height or self.base.default_height)
        width = int(width or self.base.default_width)
        inputs: dict[str, Any] = {}
        bound = None
        if self.mode in IMAGE_PIPELINES:
            if init_image is None:
                raise IdentityError(f"the {self.mode} pipeline needs an input image (--init-image)")
            inputs["image"] = load_image(init_image)
        if self.mode in STRENGTH_PIPELINES and strength is not None and "strength" in self._params:
            inputs["strength"] = float(strength)
        if self.mode in ("inpaint", "fill"):
            if inpaint_mask is None:
                raise IdentityError(f"the {self.mode} pipeline needs a mask (--inpaint-mask)")
            bound = load_image(inpaint_mask).convert("L")  # identity only where the picture is repainted
            inputs["mask_image"] = bound
        size: tuple[int, int] | None = (height, width)
        if self.mode == "kontext":
            inputs.update(max_area=height * width, _auto_resize=not self.is_tiny)
            size = kontext_size(height, width, height * width, int(getattr(self.pipe, "vae_scale_factor", 8)))
        if self.mode in ("controlnet", "control"):
            if control_image is None:
                raise IdentityError(f"the {self.mode} pipeline needs a control image (--control-image)")
            inputs["control_image"] = load_image(control_image)
            if self.mode == "controlnet":
                inputs["controlnet_conditioning_scale"] = float(controlnet_scale if controlnet_scale is not None else 1.0)
        record = {
            "pipeline": self.mode,
            "init_image": _name(init_image),
            "strength": float(strength) if strength is not None and self.mode in STRENGTH_PIPELINES else None,
            "inpaint_mask": _name(inpaint_mask),
            "control_image": _name(control_image),
            "controlnet_scale": float(controlnet_scale) if controlnet_scale is not None and self.mode == "controlnet" else None,
            **{k: kwargs.pop(k) for k in ("controlnet", "loras") if k in kwargs},
        }
        flux_kwargs = {k: v for k, v in kwargs.items() if k in self._params or k in _IDENTITY_ARGS}
        unknown = sorted(set(kwargs) - set(flux_kwargs))
        if unknown:
            raise IdentityError(f"{type(self.pipe).__name__} does not take {', '.join(unknown)}")
        return run_identity_call(
            self.pipeline_call,
            self.base,
            prompt=prompt,
            id_image=id_image,
            id_embeds=id_embeds,
            people=people,
            regions=regions,
            bound=bound,
            noise=noise,
            height=height,
            width=width,
            pipeline_inputs=inputs,
            pipeline_record=record,
            identity_size=size,
            has_true_cfg=self.has_true_cfg,
            **flux_kwargs,
        )


#: SpatialIDPipeline arguments that are not the diffusers pipeline's own.
_IDENTITY_ARGS = frozenset({
    "preset", "id_weight", "start_step", "true_cfg", "cfg_start_step", "seed", "return_masks", "uncond_id_embeds",
    "save_masks", "masks_from", "schedule_overrides", "return_dict", "output_type",
})


def kontext_size(height: int, width: int, max_area: int, vae_scale_factor: int) -> tuple[int, int]:
    """The size FluxKontextPipeline generates for ``height`` x ``width`` and ``max_area``: the same
    aspect ratio scaled to the area, rounded down to multiples of ``2 * vae_scale_factor`` (its rule)."""
    aspect = width / height
    multiple = vae_scale_factor * 2
    out_w = round((max_area * aspect) ** 0.5) // multiple * multiple
    out_h = round((max_area / aspect) ** 0.5) // multiple * multiple
    return out_h, out_w


def _name(source: Any) -> str | None:
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        return Path(source).name
    return f"<{type(source).__name__}>"
