"""PuLID-FLUX identity for any diffusers FLUX.1 pipeline: the one way to attach identity.

In the style of diffusers' IP-Adapter (``FluxIPAdapterMixin.load_ip_adapter`` + per-call
embeddings in ``joint_attention_kwargs``): the weights are loaded once per pipeline and the
identity is passed per call::

    load_pulid(pipe, "guozinan/PuLID", weight_name="pulid_flux_v0.9.1.safetensors")
    pipe(prompt, ..., joint_attention_kwargs={"identity": PuLIDIdentity(embedding, id_weight=1.0)})

FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxFillPipeline, FluxKontextPipeline,
FluxControlNetPipeline and FluxControlPipeline all hand that dict unchanged to every transformer
call, so one transformer hook serves them all without copying any ``__call__``. The hook takes the
identity out before diffusers' attention processors see it (a ControlNet's copy too).

``SpatialIDPipeline`` is built on the same loader (:class:`PuLIDLoaderMixin`): it encodes the
photos, makes the :class:`PuLIDIdentity` and calls FluxPipeline's ``__call__``. The hooks live on
the transformer, so pipelines that share one transformer (``FluxImg2ImgPipeline(**pipe.components)``)
share one injector: loading again on the same transformer reuses it instead of hooking twice.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from spatialid.injection.identity import IDENTITY_KEY, IdentityError, PuLIDIdentity
from spatialid.injection.injector import IdentityInjector

__all__ = [
    "IDENTITY_KEY",
    "PuLIDIdentity",
    "PuLIDLoader",
    "PuLIDLoaderMixin",
    "load_pulid",
    "pulid_loader",
    "set_pulid_scale",
    "unload_pulid",
    "with_identity",
]

_ATTR = "_spatialid_pulid"
_STRIP_HOOK = "spatialid_strip_identity"


class PuLIDLoader:
    """What :func:`load_pulid` installs on a pipeline (``pipe._spatialid_pulid``).

    Attributes:
        injector: the :class:`~spatialid.injection.IdentityInjector` on ``pipe.transformer``
            (shared by every pipeline loaded on that transformer).
        pulid: the :class:`~spatialid.models.PuLIDFluxModel` (IDFormer + CA modules) when known.
    """

    def __init__(self, pipe: Any, injector: IdentityInjector, pulid: Any = None) -> None:
        self.pipe = pipe
        self.injector = injector
        self.pulid = pulid
        self._controlnets: list[nn.Module] = []
        self.hook_controlnet(getattr(pipe, "controlnet", None))

    @property
    def ca_modules(self) -> nn.ModuleList:
        return self.injector.ca_modules

    @property
    def last_identity(self) -> PuLIDIdentity | None:
        """The identity of the last call that carried one."""
        return self.injector.last_identity

    @property
    def records(self) -> list[Any]:
        """Masks recorded by the last identity call (``record_masks=True``)."""
        ident = self.last_identity
        return ident.records if ident is not None else []

    @property
    def last_layout(self) -> tuple[int | None, tuple[int, int]] | None:
        """``(generated tokens or None when all are, (rows, cols))`` of the last injected call."""
        return self.injector.last_layout

    def hook_controlnet(self, controlnet: Any) -> None:
        """Strip the identity from a ControlNet's ``joint_attention_kwargs`` (FLUX ControlNet pipelines pass it)."""
        if not isinstance(controlnet, nn.Module) or any(c is controlnet for c in self._controlnets):
            return
        from diffusers.hooks.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(controlnet)
        if registry.get_hook(_STRIP_HOOK) is None:
            registry.register_hook(_StripIdentity(), _STRIP_HOOK)
        self._controlnets.append(controlnet)

    def remove(self) -> None:
        """Remove this pipeline's hooks; the shared injector goes with the last pipeline using it."""
        from diffusers.hooks.hooks import HookRegistry

        for controlnet in self._controlnets:
            HookRegistry.check_if_exists_or_initialize(controlnet).remove_hook(_STRIP_HOOK, recurse=False)
        self._controlnets.clear()
        self.injector.users -= 1
        if self.injector.users <= 0:
            self.injector.detach()


try:
    from diffusers.hooks.hooks import ModelHook as _ModelHook
except ImportError:  # pragma: no cover
    _ModelHook = object  # type: ignore[assignment,misc]


class _StripIdentity(_ModelHook):  # type: ignore[misc,valid-type]
    """Takes ``identity`` out of a ControlNet's ``joint_attention_kwargs`` (its processors never see it)."""

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        jak = kwargs.get("joint_attention_kwargs")
        if isinstance(jak, dict) and IDENTITY_KEY in jak:
            kwargs = {**kwargs, "joint_attention_kwargs": {k: v for k, v in jak.items() if k != IDENTITY_KEY}}
        return args, kwargs


def _transformer_placement(transformer: nn.Module) -> tuple[torch.device, torch.dtype]:
    params = [p for p in transformer.parameters() if p.device.type != "meta"]
    device = params[0].device if params else torch.device("cpu")
    dtype = getattr(transformer, "dtype", torch.float32)
    return device, (dtype if dtype.is_floating_point else torch.bfloat16)


def _pulid_weights(
    source: Any, weight_name: str | None, config: Any, torch_dtype: torch.dtype | None, cache_dir: Any,
    local_files_only: bool | None, transformer: nn.Module,
) -> tuple[nn.ModuleList, Any, Any]:
    """``(ca_modules, config or None, PuLIDFluxModel or None)`` from whatever ``load_pulid`` was given."""
    from spatialid.models.pulid_flux import PuLIDFluxModel

    if isinstance(source, PuLIDFluxModel):
        return source.pulid_ca, config or source.pulid_config, source
    if isinstance(source, tuple) and len(source) == 2:
        return source[1], config, None
    if isinstance(source, nn.ModuleList):
        return source, config, None
    from spatialid.models.checkpoint import load_pulid_checkpoint

    _, dtype = _transformer_placement(transformer)
    _, cas = load_pulid_checkpoint(
        source, weight_name, dtype=torch_dtype or dtype, config=config, cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    return cas, config, None


def load_pulid(
    pipe: Any,
    pulid_model_or_path: Any = None,
    *,
    weight_name: str | None = None,
    double_interval: int | None = None,
    single_interval: int | None = None,
    config: Any = None,
    torch_dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> PuLIDLoader:
    """Give ``pipe`` (any diffusers FLUX.1 pipeline) PuLID-FLUX identity; the identity is then passed per call.

    Args:
        pipe: a diffusers pipeline with a FLUX ``transformer`` (FluxPipeline, FluxImg2ImgPipeline,
            FluxInpaintPipeline, FluxFillPipeline, FluxKontextPipeline, FluxControlNetPipeline,
            FluxControlPipeline, ...).
        pulid_model_or_path: the PuLID-FLUX weights: a ``.safetensors`` file, folder or hub id
            (default ``guozinan/PuLID``), a loaded :class:`~spatialid.models.PuLIDFluxModel`, or
            ``(idformer, ca_modules)`` / the CA modules already loaded (shared, not copied).
        weight_name: the file inside a hub repo or folder (default ``pulid_flux_v0.9.1.safetensors``).
        double_interval / single_interval: where the CA modules go (default: the model's config,
            else PuLID-FLUX's 2 and 4).
        config: module sizes of a reduced checkpoint (``TINY_PULID``); default: what the file records.

    Returns:
        the :class:`PuLIDLoader` (also ``pipe._spatialid_pulid``). A pipeline whose transformer
        already carries these CA modules (another pipeline built on the same components) shares
        that injector; other CA modules replace it.
    """
    from spatialid.models.configs import PULID_FLUX

    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(transformer, "single_transformer_blocks"):
        raise IdentityError(f"{type(pipe).__name__} has no FLUX transformer; load_pulid needs a FLUX.1 pipeline")
    cas, cfg, container = _pulid_weights(
        pulid_model_or_path, weight_name, config, torch_dtype, cache_dir, local_files_only, transformer
    )
    cfg = cfg or PULID_FLUX
    di = int(double_interval if double_interval is not None else getattr(cfg, "double_interval", 2))
    si = int(single_interval if single_interval is not None else getattr(cfg, "single_interval", 4))
    unload_pulid(pipe)
    cas = cas if isinstance(cas, nn.ModuleList) else nn.ModuleList(cas)
    injector = getattr(transformer, "_spatialid_injector", None)
    if injector is not None and (injector.ca_modules is not cas or (injector.double_interval, injector.single_interval) != (di, si)):
        injector.detach()  # other weights: the transformer gets them instead
        injector = None
    if injector is None:
        device, dtype = _transformer_placement(transformer)
        cas.to(device=device, dtype=torch_dtype or dtype).eval().requires_grad_(False)
        try:
            injector = IdentityInjector(transformer, cas, di, si, scheduler=getattr(pipe, "scheduler", None))
        except ValueError as exc:  # CA count does not fit the transformer's blocks
            raise IdentityError(str(exc)) from None
    injector.scheduler = getattr(pipe, "scheduler", None) or injector.scheduler
    injector.users += 1
    loader = PuLIDLoader(pipe, injector, container)
    setattr(pipe, _ATTR, loader)
    return loader


def unload_pulid(pipe: Any) -> None:
    """Remove what :func:`load_pulid` installed: the pipeline computes exactly what it computed before."""
    loader = getattr(pipe, _ATTR, None)
    if loader is not None:
        loader.remove()
        setattr(pipe, _ATTR, None)


def pulid_loader(pipe: Any) -> PuLIDLoader | None:
    """The :class:`PuLIDLoader` installed on ``pipe``, or None."""
    return getattr(pipe, _ATTR, None)


def set_pulid_scale(pipe: Any, scale: float) -> None:
    """Multiply every identity's ``id_weight`` on ``pipe`` by ``scale`` (as ``set_ip_adapter_scale``)."""
    loader = pulid_loader(pipe)
    if loader is None:
        raise IdentityError("set_pulid_scale needs PuLID loaded on this pipeline (load_pulid)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0.0 <= float(scale) <= 10.0):
        raise IdentityError(f"the PuLID scale must be a number in [0, 10], got {scale!r}")
    loader.injector.scale = float(scale)


def with_identity(joint_attention_kwargs: dict[str, Any] | None, identity: Any) -> dict[str, Any]:
    """``joint_attention_kwargs`` plus the identity (a copy; ``identity`` None leaves it out)."""
    out = dict(joint_attention_kwargs or {})
    if identity is not None:
        out[IDENTITY_KEY] = identity
    return out


class PuLIDLoaderMixin:
    """``load_pulid`` / ``unload_pulid`` / ``set_pulid_scale`` as pipeline methods (diffusers' loader-mixin style).

    A pipeline class that mixes this in and lists ``pulid`` among its ``_optional_components``
    gets the PuLID weights registered as that component, so ``to()``, dtype changes, offloading
    and ``save_pretrained`` reach them.
    """

    def load_pulid(self, pulid_model_or_path: Any = None, **kwargs: Any) -> PuLIDLoader:
        loader = load_pulid(self, pulid_model_or_path, **kwargs)
        if loader.pulid is not None and "pulid" in getattr(self, "_optional_components", ()):
            self.register_modules(pulid=loader.pulid)  # type: ignore[attr-defined]
        return loader

    def unload_pulid(self) -> None:
        unload_pulid(self)
        if "pulid" in getattr(self, "_optional_components", ()):
            self.register_modules(pulid=None)  # type: ignore[attr-defined]

    def set_pulid_scale(self, scale: float) -> None:
        set_pulid_scale(self, scale)

    @property
    def injector(self) -> IdentityInjector | None:
        """The :class:`~spatialid.injection.IdentityInjector` of this pipeline's transformer, or None."""
        loader = pulid_loader(self)
        return loader.injector if loader is not None else None
