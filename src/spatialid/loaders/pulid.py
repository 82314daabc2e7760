"""PuLID-FLUX identity for any diffusers FLUX.1 pipeline: ``load_pulid(pipe, ...)`` / ``unload_pulid(pipe)``.

Like diffusers' ``load_ip_adapter``, the weights are loaded once per pipeline and the identity is
passed per call, through the channel every FLUX.1 pipeline already forwards to its transformer::

    load_pulid(pipe, "guozinan/PuLID", weight_name="pulid_flux_v0.9.1.safetensors")
    pipe(prompt, ..., joint_attention_kwargs={"identity": PuLIDIdentity(embedding, id_weight=1.0)})

Why ``joint_attention_kwargs`` (and not a context manager or a subclass): FluxPipeline,
FluxImg2ImgPipeline, FluxInpaintPipeline, FluxFillPipeline, FluxKontextPipeline,
FluxControlNetPipeline and FluxControlPipeline all hand that dict unchanged to each transformer
call, so one transformer pre-hook serves them all without copying any ``__call__``; the identity
then travels with the call that uses it (two calls with different people cannot mix, nothing is
left switched on after an exception), and the call site reads like diffusers' own IP-Adapter
arguments. The pre-hook removes the ``identity`` key before diffusers' attention processors see
it (a ControlNet's copy too), so they get exactly the arguments of a plain call.

Per pipeline call: the hook opens an :meth:`IdentityInjector.active` session at the first
transformer call of a pipeline call (a new ``scheduler.timesteps`` tensor, which every FLUX.1
pipeline sets once per call, or a new identity object) and closes it at the next call without
identity, at the next pipeline call, or in :func:`unload_pulid`. The denoising step is the
scheduler's own ``step_index`` (counted from its ``begin_index``, so img2img's first executed step
is step 0); the CFG branch is diffusers' ``cache_context`` where the pipeline sets one, else the
call order within a step (positive first, as all of these pipelines call it). The image-token
grid and the number of generated tokens come from the call's ``img_ids``: FLUX.1 Kontext appends
its context image's tokens (``img_ids[:, 0] == 1``) and they never receive identity. A ``region``
(the inpainting mask) is the upper bound of ``M_t`` on the token grid: the injector's
``regions`` (:mod:`spatialid.masks.multi`), outside which the residual is exactly zero.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spatialid import defaults as D
from spatialid.errors import SpatialIDError

__all__ = [
    "IDENTITY_KEY",
    "PuLIDIdentity",
    "PuLIDLoader",
    "load_pulid",
    "pulid_loader",
    "region_to_tokens",
    "unload_pulid",
    "with_identity",
]

IDENTITY_KEY = "identity"
_ATTR = "_spatialid_pulid"


@dataclass
class PuLIDIdentity:
    """The identity of one pipeline call (the value of ``joint_attention_kwargs["identity"]``).

    Attributes:
        tokens: identity tokens ``[1 or B, n, dim]``, or an ``IdentityEmbedding`` / a file from
            ``spatialid encode`` (then ``uncond_tokens`` come with it).
        uncond_tokens: the zero-identity tokens for true CFG's negative branch (PuLID-FLUX's
            ``IDFormer(0, 0)``); needed only when the pipeline runs true CFG.
        id_weight: identity strength; 0 gives the plain pipeline's output bit for bit.
        preset: SpatialID schedule (a preset name, a ``SpatialSchedule``, or None = uniform PuLID).
        schedule_overrides: schedule fields set on top of ``preset``.
        start_step: first executed denoising step (0-based) with identity.
        region: upper bound of the mask: a PIL image / array / tensor (white or 1 = identity may go
            there, any size: resized to the token grid by area), e.g. the inpainting mask.
        record_masks: keep every mask in :attr:`PuLIDLoader.records` (CPU float16).
    """

    tokens: Any
    uncond_tokens: torch.Tensor | None = None
    id_weight: float = D.DEFAULT_ID_WEIGHT
    preset: Any = D.DEFAULT_PRESET
    schedule_overrides: Mapping[str, float] | None = None
    start_step: int = D.DEFAULT_START_STEP
    region: Any = None
    record_masks: bool = False
    _resolved: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)

    def resolved_tokens(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens, uncond_tokens)`` as 3-D tensors (an embedding file is read once)."""
        if self._resolved is None:
            source = self.tokens
            if isinstance(source, (str, os.PathLike)):
                from spatialid.encoder.embedding import IdentityEmbedding

                source = IdentityEmbedding.load(Path(source))
            uncond = self.uncond_tokens
            if not isinstance(source, torch.Tensor):
                tokens = getattr(source, "tokens", None)
                if not isinstance(tokens, torch.Tensor):
                    raise SpatialIDError(
                        f"identity tokens must be a tensor, an IdentityEmbedding or an embedding file, got {type(source).__name__}"
                    )
                uncond = uncond if uncond is not None else getattr(source, "uncond_tokens", None)
                source = tokens
            if source.ndim == 2:
                source = source.unsqueeze(0)
            if uncond is not None and uncond.ndim == 2:
                uncond = uncond.unsqueeze(0)
            if source.ndim != 3:
                raise SpatialIDError(f"identity tokens must be [batch, tokens, dim], got shape {tuple(source.shape)}")
            self._resolved = (source, uncond)
        return self._resolved


def _as_identity(value: Any) -> PuLIDIdentity:
    if isinstance(value, PuLIDIdentity):
        return value
    if isinstance(value, Mapping):
        known = {"tokens", "embedding", "uncond_tokens", "id_weight", "preset", "schedule_overrides", "start_step",
                 "region", "record_masks"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SpatialIDError(f"unknown identity argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        args = dict(value)
        if "embedding" in args:
            args["tokens"] = args.pop("embedding")
        if "tokens" not in args:
            raise SpatialIDError('joint_attention_kwargs["identity"] needs "tokens" (or "embedding")')
        return PuLIDIdentity(**args)
    return PuLIDIdentity(tokens=value)  # a bare tensor / IdentityEmbedding / file


def region_to_tokens(region: Any, rows: int, cols: int) -> torch.Tensor:
    """A pixel (or token-grid) mask -> ``[rows * cols]`` float32 in [0, 1], by area averaging.

    White / 1 marks where identity may go (diffusers' inpainting convention: white is repainted).
    Area averaging keeps tokens wholly outside the mask at exactly 0.
    """
    import numpy as np
    import PIL.Image

    if isinstance(region, (str, os.PathLike)):
        from spatialid.utils.images import load_image

        region = load_image(region)
    if isinstance(region, PIL.Image.Image):
        tensor = torch.from_numpy(np.asarray(region.convert("L"), dtype=np.float32) / 255.0)
    elif isinstance(region, np.ndarray):
        tensor = torch.from_numpy(region.astype(np.float32))
    elif isinstance(region, torch.Tensor):
        tensor = region.detach().float().cpu()
    else:
        raise SpatialIDError(f"region must be an image, an array or a tensor, got {type(region).__name__}")
    while tensor.ndim > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim == 3:  # [H, W, C] array
        tensor = tensor.mean(dim=-1)
    if tensor.ndim != 2:
        raise SpatialIDError(f"region must be a 2-D mask, got shape {tuple(tensor.shape)}")
    if tensor.max() > 1.0:
        tensor = tensor / 255.0
    grid = torch.nn.functional.interpolate(tensor[None, None], size=(rows, cols), mode="area")
    return grid.reshape(-1).clamp(0.0, 1.0)


def _token_layout(kwargs: Mapping[str, Any], hidden: torch.Tensor | None) -> tuple[int | None, tuple[int, int] | None]:
    """``(generated tokens, (rows, cols))`` from the call's ``img_ids`` (one small host read per pipeline call).

    FLUX pipelines number image tokens ``(0, row, col)``; Kontext's context tokens carry 1 first.
    """
    ids = kwargs.get("img_ids")
    total = hidden.shape[1] if hidden is not None else None
    if not isinstance(ids, torch.Tensor):
        return None, None
    ids = ids.detach()
    if ids.ndim == 3:
        ids = ids[0]
    ids = ids.to("cpu", torch.float32)
    generated = int((ids[:, 0] == 0).sum())
    if generated == 0:
        return None, None
    head = ids[:generated]
    rows, cols = int(head[:, 1].max()) + 1, int(head[:, 2].max()) + 1
    grid = (rows, cols) if rows * cols == generated else None
    return (None if total == generated else generated), grid


class PuLIDLoader:
    """What :func:`load_pulid` installs on a pipeline (``pipe._spatialid_pulid``): the injector and its per-call state.

    Attributes:
        injector: the :class:`~spatialid.injection.IdentityInjector` on ``pipe.transformer``.
        records: masks of the last call made with ``record_masks=True``.
        last_layout: ``(generated_tokens, grid)`` of the last identity call (for checks and tests).
    """

    def __init__(self, pipe: Any, ca_modules: nn.ModuleList, double_interval: int, single_interval: int) -> None:
        from spatialid.injection import IdentityInjector

        self.pipe = pipe
        self.transformer = pipe.transformer
        self.injector = IdentityInjector(self.transformer, ca_modules, double_interval, single_interval)
        self.records: list[Any] = []
        self.last_layout: tuple[int | None, tuple[int, int] | None] | None = None
        self._stack: contextlib.ExitStack | None = None
        self._key: tuple[Any, Any] | None = None
        self._identity: PuLIDIdentity | None = None
        self._step = 0
        self._branch = "cond"
        self._seen: dict[int, int] = {}
        # Before the injector's own pre-hook, so the session is open when it numbers the call.
        self._handles = [
            self.transformer.register_forward_pre_hook(self._on_call, with_kwargs=True, prepend=True),
            # after the injector's: the recorded masks carry the scheduler's step and branch
            self.transformer.register_forward_pre_hook(self._renumber),
        ]
        self._hooked_controlnets: list[nn.Module] = []
        self.hook_controlnet(getattr(pipe, "controlnet", None))

    @property
    def ca_modules(self) -> nn.ModuleList:
        return self.injector.ca_modules

    def hook_controlnet(self, controlnet: Any) -> None:
        """Strip the identity key from a ControlNet's ``joint_attention_kwargs`` (FLUX ControlNet pipelines pass it)."""
        if not isinstance(controlnet, nn.Module) or any(c is controlnet for c in self._hooked_controlnets):
            return
        self._handles.append(controlnet.register_forward_pre_hook(_strip_identity, with_kwargs=True))
        self._hooked_controlnets.append(controlnet)

    # ------------------------------------------------------------------ per call
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        jak = kwargs.get("joint_attention_kwargs")
        if not isinstance(jak, Mapping) or IDENTITY_KEY not in jak:
            self.close()
            return None
        jak = dict(jak)
        value = jak.pop(IDENTITY_KEY)
        kwargs = {**kwargs, "joint_attention_kwargs": jak}
        if value is None:
            self.close()
            return args, kwargs
        scheduler = getattr(self.pipe, "scheduler", None)
        key = (getattr(scheduler, "timesteps", None), value)
        if self._key is None or self._key[0] is not key[0] or self._key[1] is not key[1]:
            self.close()
            self._open(_as_identity(value), kwargs, args)
            self._key = key
        self._number_call(scheduler)
        return args, kwargs

    def _number_call(self, scheduler: Any) -> None:
        """Step from the scheduler, branch from the cache context or the order within the step."""
        index = getattr(scheduler, "step_index", None)
        begin = getattr(scheduler, "begin_index", None) or 0
        step = 0 if index is None else int(index) - int(begin)
        count = self._seen.get(step, 0)
        self._seen = {step: count + 1}
        probe = self.injector._probe
        name = getattr(probe, "name", None) if probe is not None else None
        self._step = step
        self._branch = name if name in ("cond", "uncond") else ("cond" if count == 0 else "uncond")

    def _renumber(self, module: nn.Module, args: tuple) -> None:
        session = self.injector.session
        if self._stack is not None and session is not None and session.call is not None:
            from spatialid.injection import TransformerCall

            session.call = TransformerCall(session.call.index, self._step, self._branch, False)

    def _open(self, identity: PuLIDIdentity, kwargs: Mapping[str, Any], args: tuple) -> None:
        from spatialid.masks import apply_overrides, resolve_preset

        hidden = kwargs.get("hidden_states", args[0] if args else None)
        generated, grid = _token_layout(kwargs, hidden)
        self.last_layout = (generated, grid)
        tokens, uncond = identity.resolved_tokens()
        kv_dim = getattr(self.ca_modules[0], "kv_dim", tokens.shape[-1])
        if tokens.shape[-1] != kv_dim:
            raise SpatialIDError(
                f"identity tokens have width {tokens.shape[-1]} but these PuLID modules expect {kv_dim}; "
                "encode the photo with the same model"
            )
        schedule = apply_overrides(resolve_preset(identity.preset), identity.schedule_overrides)
        regions = None
        if identity.region is not None:
            if grid is None:
                raise SpatialIDError("a region needs the image-token grid; this transformer call has no img_ids")
            regions = region_to_tokens(identity.region, *grid).reshape(1, *grid)
        start = int(identity.start_step)

        def embeds_for_call(call: Any) -> torch.Tensor | None:
            del call  # the step and branch come from the scheduler (see _number_call)
            if self._step < start:
                return None
            if self._branch == "uncond":
                if uncond is None:
                    raise SpatialIDError(
                        "true CFG needs the zero-identity (uncond) tokens: pass an IdentityEmbedding or uncond_tokens"
                    )
                return uncond
            return tokens

        self.records = []
        stack = contextlib.ExitStack()
        session = stack.enter_context(
            self.injector.active(
                embeds_for_call,
                id_weight=float(identity.id_weight),
                schedule=schedule,
                grid=grid,
                record_masks=bool(identity.record_masks),
                calls_per_step=2,
                sigmas=lambda: getattr(getattr(self.pipe, "scheduler", None), "sigmas", None),
                generated_tokens=generated,
                regions=regions,
            )
        )
        self.records = session.records
        self._stack = stack
        self._identity = identity
        self._seen = {}

    def close(self) -> None:
        """End the open session (the transformer computes the plain model again)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()
        self._key = None
        self._identity = None

    def remove(self) -> None:
        """Remove every hook and the injector (the pipeline is exactly as before :func:`load_pulid`)."""
        self.close()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked_controlnets.clear()
        self.injector.detach()


def _strip_identity(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    jak = kwargs.get("joint_attention_kwargs")
    if isinstance(jak, Mapping) and IDENTITY_KEY in jak:
        return args, {**kwargs, "joint_attention_kwargs": {k: v for k, v in jak.items() if k != IDENTITY_KEY}}
    return None


def _transformer_placement(transformer: nn.Module) -> tuple[torch.device, torch.dtype]:
    params = [p for p in transformer.parameters() if p.device.type != "meta"]
    device = params[0].device if params else torch.device("cpu")
    dtype = getattr(transformer, "dtype", torch.float32)
    return device, (dtype if dtype.is_floating_point else torch.bfloat16)


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
        pipe: a diffusers pipeline with a ``transformer`` (FluxPipeline, FluxImg2ImgPipeline,
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
        the :class:`PuLIDLoader` (also ``pipe._spatialid_pulid``). Loading again replaces it.
    """
    from spatialid.models.configs import PULID_FLUX
    from spatialid.models.pulid_flux import PuLIDFluxModel

    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(transformer, "single_transformer_blocks"):
        raise SpatialIDError(f"{type(pipe).__name__} has no FLUX transformer; load_pulid needs a FLUX.1 pipeline")
    cfg = config
    if isinstance(pulid_model_or_path, PuLIDFluxModel):
        cas = pulid_model_or_path.pulid_ca
        cfg = cfg or pulid_model_or_path.pulid_config
    elif isinstance(pulid_model_or_path, tuple) and len(pulid_model_or_path) == 2:
        cas = pulid_model_or_path[1]
    elif isinstance(pulid_model_or_path, nn.ModuleList):
        cas = pulid_model_or_path
    else:
        from spatialid.models.checkpoint import load_pulid_checkpoint

        device, dtype = _transformer_placement(transformer)
        _, cas = load_pulid_checkpoint(
            pulid_model_or_path,
            weight_name,
            dtype=torch_dtype or dtype,
            config=config,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    cfg = cfg or PULID_FLUX
    di = int(double_interval if double_interval is not None else getattr(cfg, "double_interval", 2))
    si = int(single_interval if single_interval is not None else getattr(cfg, "single_interval", 4))
    unload_pulid(pipe)
    device, dtype = _transformer_placement(transformer)
    cas = cas if isinstance(cas, nn.ModuleList) else nn.ModuleList(cas)
    cas.to(device=device, dtype=torch_dtype or dtype).eval().requires_grad_(False)
    try:
        loader = PuLIDLoader(pipe, cas, di, si)
    except ValueError as exc:  # CA count does not fit the transformer's blocks
        raise SpatialIDError(str(exc)) from None
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


def with_identity(joint_attention_kwargs: Mapping[str, Any] | None, identity: Any) -> dict[str, Any]:
    """``joint_attention_kwargs`` plus the identity (a copy; ``identity`` None leaves it out)."""
    out = dict(joint_attention_kwargs or {})
    if identity is not None:
        out[IDENTITY_KEY] = identity
    return out

