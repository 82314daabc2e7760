"""``SpatialIDPipeline``: diffusers' FluxPipeline with PuLID-FLUX identity injection and SpatialID masks.

The sampler is diffusers' own: this class subclasses :class:`diffusers.FluxPipeline` and only
wraps its ``__call__`` inside :meth:`IdentityInjector.active`, which adds the identity residual
``h + w * M_t * CA(Z_id, h)`` through module hooks on the transformer blocks. The PuLID weights
(IDFormer + the 20 CA modules) are one optional diffusers component, ``pulid``
(:class:`~spatialid.models.pulid_flux.PuLIDFluxModel`, whose ``state_dict`` is the published
checkpoint's layout), so diffusers' own ``to()``, dtype changes and offloading reach them; the
identity encoder (face models + EVA-CLIP, not an ``nn.Module``) stays a plain attribute.

PuLID-FLUX semantics reproduced here:

* ``start_step``: the first denoising step (0-based) that receives identity; earlier steps run the
  plain model.
* true CFG (``true_cfg > 1``): each step runs a positive branch (prompt + identity tokens) and a
  negative branch (``negative_prompt`` + the zero-identity "uncond" tokens, ``IDFormer(0, 0)``) and
  mixes them as ``neg + true_cfg * (pos - neg)``. As in PuLID-FLUX, the mix starts at step
  ``cfg_start_step`` (default 1): before it, the negative branch's output is replaced by the
  positive one (the step is then plain guidance-distilled sampling).
* ``id_weight`` scales the identity residual; 0 (or no identity) gives exactly FluxPipeline's output.
* the schedule's time ``t`` is the sigma FluxPipeline passes to the transformer at that step.

Memory modes (``docs/memory.md``; peaks measured for FLUX.1-dev bf16 at 1024x1024 on an H200 with
full-size random weights): everything on the GPU ~35 GiB; ``enable_model_cpu_offload()`` ~23 GiB;
``enable_sequential_cpu_offload()`` ~3 GiB (slowest). Both offload modes are diffusers' own, with
``pulid`` excluded from them (placed on the execution device; see the class comment); the
injector's hooks sit on the blocks and keep working under accelerate's offload hooks (checked on CUDA:
identical images). A quantized transformer loads via ``from_pretrained(..., quantization="nf4" |
"int8" | "torchao-int8" | "torchao-fp8" | "gguf:FILE")`` (transformer ~6.7-12.7 GB instead of 23.8 GB).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

from spatialid import __version__
from spatialid import defaults as D
from spatialid.errors import SpatialIDError
from spatialid.models.pulid_flux import PuLIDFluxModel
from spatialid.pipeline.loading import (
    flux_files_hint,
    hub_errors,
    is_single_file,
    load_flux_transformer,
    parse_quantization,
    pipeline_dtype_kwargs,
    resolve_local_files_only,
)
from spatialid.pipeline.settings import (
    DEFAULT_GUIDANCE,
    GenerationSettings,
    check_generation_settings,
    check_prompt,
)

__all__ = ["SpatialIDPipeline", "SpatialIDPipelineOutput", "StepMasks", "TINY_NOTE"]

_GENERATE = D.size_steps("generate", tiny=False)
_log = logging.getLogger("spatialid.pipeline")

TINY_NOTE = (
    "tiny model: random weights at toy size, the images are noise by design; it exercises the full "
    "pipeline offline and proves nothing about image quality"
)


@dataclass
class StepMasks:
    """Identity masks of one denoising step (positive branch), one per injection point."""

    step: int  # 0-based denoising step
    t: float  # the sigma FluxPipeline passed to the transformer
    phase: str  # schedule phase at t ("prior", "attention", "relaxed"; "uniform" without schedule)
    masks: torch.Tensor  # float16 CPU [num_points, batch, rows, cols] (all people together)
    # several people or regions: each person's mask, float32 CPU [num_points, persons, batch, rows, cols]
    people: torch.Tensor | None = None

    def mean(self) -> torch.Tensor:
        """Mask averaged over injection points, float32 ``[batch, rows, cols]``."""
        return self.masks.float().mean(dim=0)


@dataclass
class SpatialIDPipelineOutput(FluxPipelineOutput):
    """FluxPipeline's output plus the recorded masks (``return_masks=True``) and the call's settings."""

    masks: list[StepMasks] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


class _CFGWarmup:
    """Before ``cfg_start_step``, make the negative branch return the positive branch's output.

    FluxPipeline always mixes ``neg + s * (pos - neg)`` once true CFG is on; with ``neg == pos`` the
    mix is exactly ``pos``, which is PuLID-FLUX's behaviour for steps before ``timestep_to_start_cfg``.
    Each call's step and branch come from diffusers' cache context (the probe the injector shares),
    falling back to call order (cond, then uncond) without one, so the output copied is always the
    positive output of the same step.
    """

    def __init__(self, transformer: nn.Module, cfg_start_step: int) -> None:
        from spatialid.injection.calls import CallCounter, attach_context_probe

        self.cfg_start_step = cfg_start_step
        self.transformer = transformer
        self.counter = CallCounter(calls_per_step=2)
        self.probe: Any = attach_context_probe(transformer)
        if self.probe is not None:
            self.probe.subscribe(self.counter)
        self.positive: tuple[int, Any] | None = None  # (step, positive output of that step)
        self.warned = False
        self.handle = transformer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        counter, probe = self.counter, self.probe
        if counter.pending or probe is None:  # the context just entered (already numbered), or by order
            call = counter.next()
        else:
            call = counter.next(probe.name, probe.step_index)
        if call.step >= self.cfg_start_step:
            self.positive = None
            return None
        if call.branch != "uncond":
            self.positive = (call.step, output)
            return None
        if self.positive is not None and self.positive[0] == call.step:
            return self.positive[1]
        if not self.warned:  # uncond ran before cond in this step: nothing to copy yet
            import warnings

            warnings.warn(
                f"true CFG warm-up: the negative branch of step {call.step} ran before the positive one, "
                "so that step mixes both branches (cfg_start_step has no effect on it)",
                stacklevel=2,
            )
            self.warned = True
        return None

    def remove(self) -> None:
        from spatialid.injection.calls import detach_context_probe

        self.handle.remove()
        if self.probe is not None:
            self.probe.unsubscribe(self.counter)
            detach_context_probe(self.transformer, self.probe)
        self.probe = None
        self.positive = None


def _seed_generators(seed: int, count: int) -> list[torch.Generator]:
    """Image ``i`` of a batch uses seed ``seed + i`` on a CPU generator (device-independent noise),
    so any single image can be regenerated alone with ``seed=seed + i``."""
    return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(count)]


def _describe_sources(source: Any) -> list[str]:
    items = source if isinstance(source, (list, tuple)) else [source]
    names = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            names.append(Path(item).name)
        elif isinstance(item, PIL.Image.Image):
            names.append(getattr(item, "filename", "") and Path(item.filename).name or "<PIL image>")
        elif isinstance(item, np.ndarray):
            names.append(f"<array {tuple(item.shape)}>")
        else:
            names.append(f"<{type(item).__name__}>")
    return names


class SpatialIDPipeline(FluxPipeline):
    r"""FLUX.1 text-to-image with a person's identity from one photo (PuLID-FLUX), spatially scheduled.

    Build it with :meth:`from_pretrained` (real weights) or :meth:`tiny` (offline toy model with
    random weights: noise images, for trying the whole path anywhere). Call it like FluxPipeline
    plus ``id_image``/``id_embeds``, ``preset``, ``id_weight``, ``start_step``, ``true_cfg``.
    """

    # The PuLID weights are the optional component ``pulid`` (a PuLIDFluxModel: IDFormer + CA
    # modules), so DiffusionPipeline.to(), .dtype/.device, components and save_pretrained see them.
    #
    # Offloading: ``pulid`` is excluded from CPU offload, i.e. enable_*_cpu_offload() puts it on the
    # execution device (``model.to(device)``) instead of hooking it. Why:
    # * The CA modules run inside the transformer's forward, called directly by the injector's
    #   block hooks; the container's own forward is never called. Model offload's
    #   cpu_offload_with_hook(pulid) would hook only that forward, so the CA modules would stay on
    #   the CPU while the transformer runs on the accelerator. Excluded, they sit on the execution
    #   device, as they did before (the injector moved them there on the first injected call and
    #   they stayed for the whole denoising): the denoising peak is unchanged (CA modules 0.78 GiB
    #   in bf16 at full size), and the injector needs no device-following code. Difference: they
    #   now also stay there between calls (they went back to the CPU after each call), and
    #   maybe_free_model_hooks() round-trips them through the CPU after every call, as diffusers
    #   does for any excluded component.
    # * Sequential offload's accelerate hooks (AlignDevicesHook on every submodule with
    #   parameters, weights parked on "meta") would fire for direct CA calls too, since they sit
    #   on the Linear/LayerNorm leaves; but they would leave the parameters on "meta" between
    #   calls, where the injector reads the device and dtype for the identity tokens and the
    #   id_weight tensor, and where the identity encoder's ``.to(device)`` of the shared IDFormer
    #   cannot copy from. Excluding is simpler and keeps today's memory (CA modules resident on the
    #   accelerator); hooking only the CA modules could save their 0.78 GiB at ~4% more transfer per
    #   step, but needs the injector to take its device from the hidden states.
    # * The IDFormer is in the same component but runs only inside the identity encoder, which
    #   under offloading brings it to the execution device for each encode and back
    #   (encode_identity). enable_*_cpu_offload() therefore returns it to the CPU after diffusers
    #   placed the component, so offloading keeps the accelerator free of its 0.28 GiB between
    #   encodes, as before (see _park_idformer).
    _optional_components: ClassVar[list[str]] = [*FluxPipeline._optional_components, "pulid"]
    _exclude_from_cpu_offload: ClassVar[list[str]] = [*FluxPipeline._exclude_from_cpu_offload, "pulid"]

    pulid: PuLIDFluxModel | None = None
    injector: Any = None
    _identity_encoder: Any = None
    _identity_encoder_factory: Callable[[], Any] | None = None
    _offload_mode: str | None = None
    model_info: dict[str, Any] | None = None
    is_tiny: bool = False
    # Defaults when the caller gives none (PuLID-FLUX's app: 20 steps, guidance 4, T5 length 128).
    default_num_inference_steps: int = _GENERATE.steps
    default_max_sequence_length: int = D.DEFAULT_MAX_SEQUENCE_LENGTH
    default_height: int = _GENERATE.height
    default_width: int = _GENERATE.width

    # ------------------------------------------------------------------ construction
    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        pulid: PuLIDFluxModel | None = None,
    ) -> None:
        """FluxPipeline's components plus ``pulid``; with ``pulid`` given, its CA modules are attached.

        So ``SpatialIDPipeline(**other.components)`` (diffusers' way to share weights between
        pipelines) injects identity like ``other`` does (without its identity encoder).
        """
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_modules(pulid=None)  # always in the config: DiffusionPipeline.components needs it
        if pulid is not None:
            self._install_pulid(pulid)

    @property
    def ca_modules(self) -> nn.ModuleList | None:
        """The CA modules in checkpoint order (``pulid.pulid_ca``), or None without PuLID weights."""
        return self.pulid.pulid_ca if self.pulid is not None else None

    @property
    def idformer(self) -> nn.Module | None:
        """The IDFormer (``pulid.pulid_encoder``), shared with the identity encoder."""
        return self.pulid.pulid_encoder if self.pulid is not None else None

    @property
    def flux_components(self) -> dict[str, Any]:
        """``components`` without ``pulid``: what ``diffusers.FluxPipeline(**...)`` accepts."""
        return {k: v for k, v in self.components.items() if k != "pulid"}

    def attach_pulid(
        self,
        ca_modules: Sequence[nn.Module],
        *,
        idformer: nn.Module | None = None,
        identity_encoder: Any = None,
        identity_encoder_factory: Callable[[], Any] | None = None,
        double_interval: int = 2,
        single_interval: int = 4,
    ) -> None:
        """Install the PuLID-FLUX modules: CA modules go into hooks on the transformer blocks.

        ``(idformer, ca_modules)`` are registered as the ``pulid`` component, wrapped in a
        :class:`PuLIDFluxModel` that holds these very modules (no tensor is copied; the IDFormer
        stays shared with an identity encoder built on it). ``identity_encoder_factory`` builds the
        encoder on first use, so callers that pass precomputed ``id_embeds`` never need the
        encoder's weights.
        """
        container = _wrap_pulid_modules(idformer, ca_modules, double_interval, single_interval)
        self._install_pulid(container)
        self._identity_encoder = identity_encoder
        self._identity_encoder_factory = identity_encoder_factory

    def _install_pulid(self, pulid: PuLIDFluxModel) -> None:
        """Register ``pulid``, place its CA modules like the transformer and hook them into its blocks."""
        from spatialid.injection import IdentityInjector

        if self.injector is not None:
            self.injector.detach()
        cas = pulid.pulid_ca
        # Offloaded: where enable_*_cpu_offload puts excluded components (the transformer itself is
        # on the CPU or "meta" between calls); else next to the transformer. Its dtype either way.
        device = getattr(self, "_offload_device", None) if self._offload_mode is not None else None
        cas.to(device=device if device is not None else self._transformer_device(), dtype=self._compute_dtype())
        cas.eval().requires_grad_(False)
        self.injector = None
        injector = IdentityInjector(  # checks that the CA modules fit this transformer
            self.transformer,
            cas,
            double_interval=int(pulid.config["double_interval"]),
            single_interval=int(pulid.config["single_interval"]),
        )
        self.register_modules(pulid=pulid)
        self.injector = injector

    def detach_pulid(self) -> None:
        """Remove the injection hooks and the ``pulid`` component: the pipeline is a plain FluxPipeline again."""
        if self.injector is not None:
            self.injector.detach()
        self.injector = None
        self.register_modules(pulid=None)

    @property
    def identity_encoder(self) -> Any:
        """The photo -> identity-tokens encoder (built on first use)."""
        if self._identity_encoder is None and self._identity_encoder_factory is not None:
            encoder = self._identity_encoder_factory()
            if self._offload_mode is None and hasattr(encoder, "to"):
                device = self._execution_device
                if device.type != "cpu":
                    encoder.to(device=device)  # with offloading, encode_identity moves it per call
            self._identity_encoder = encoder
        return self._identity_encoder

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        flux: str | os.PathLike[str] = D.DEFAULT_FLUX_MODEL,
        pulid: str | os.PathLike[str] | None = None,
        *,
        pulid_filename: str | None = None,
        pulid_config: Any = None,
        torch_dtype: torch.dtype = torch.bfloat16,
        transformer: nn.Module | None = None,
        quantization: str | None = None,
        flux_base: str = D.DEFAULT_FLUX_MODEL,
        identity_encoder: Any = None,
        identity_encoder_factory: Callable[[], Any] | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        load_identity_encoder: bool = True,
        pulid_modules: tuple[nn.Module, Sequence[nn.Module]] | Callable[[], tuple] | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> SpatialIDPipeline:
        """Load FLUX.1 (diffusers layout), the PuLID-FLUX checkpoint and the identity encoder.

        Args:
            flux: hub id or local folder in diffusers layout (FLUX.1-dev, FLUX.1-Krea-dev or any
                FLUX.1 derivative with the same transformer), or a single transformer file
                (``.safetensors`` in BFL layout or ``.gguf``) whose other components come from
                ``flux_base``.
            pulid: PuLID-FLUX ``.safetensors`` file, folder, or hub id (default: the ``pulid/``
                folder of a local ``flux`` folder written by :meth:`save_pretrained`, else
                ``guozinan/PuLID``, file ``pulid_flux_v0.9.1.safetensors``; v0.9.0 loads too).
            pulid_config: module sizes of that file (default ``PULID_FLUX``; ``TINY_PULID`` for
                reduced files written by ``save_pulid_checkpoint``).
            torch_dtype: weights dtype (bfloat16 on GPUs; float32 for CPU experiments).
            transformer: an already loaded (e.g. quantized) ``FluxTransformer2DModel``.
            quantization: load the transformer quantized: ``"nf4"``, ``"int8"`` (bitsandbytes),
                ``"torchao-int8"``, ``"torchao-fp8"`` or ``"gguf:<file>"``.
            identity_encoder / identity_encoder_factory / encoder_kwargs / load_identity_encoder: an
                encoder instance, a callable that builds one on the first ``id_image``, or keyword
                arguments for ``IdentityEncoder.from_pretrained`` (also built lazily), or no encoder
                at all (then pass ``id_embeds``).
            pulid_modules: ``(idformer, ca_modules)`` already loaded from ``pulid`` (so a process that
                also encodes photos reads the checkpoint once), or a callable returning them (called
                after FLUX has loaded); ``pulid`` is then only recorded.
            local_files_only: never download (``None`` follows ``HF_HUB_OFFLINE``).
            **kwargs: forwarded to ``FluxPipeline.from_pretrained`` (``variant``, ``token``, ...).

        Raises:
            ModelFilesMissingError: weights absent locally while downloads are impossible; the
                message names the model and how to place its files for offline use.
        """
        from spatialid.models import PULID_FLUX, load_pulid_checkpoint

        pulid_config = PULID_FLUX if pulid_config is None else pulid_config
        offline = resolve_local_files_only(local_files_only)
        flux_id = os.fspath(flux)
        mode, _ = parse_quantization(quantization)
        if transformer is None and (quantization is not None and mode is not None or is_single_file(flux_id)):
            if flux_id.lower().endswith(".gguf") and mode is None:
                quantization, mode = f"gguf:{flux_id}", "gguf"
            single = flux_id if is_single_file(flux_id) and mode != "gguf" else None
            config_source = flux_base if is_single_file(flux_id) else flux_id
            transformer = load_flux_transformer(
                config_source,
                quantization,
                torch_dtype=torch_dtype,
                single_file=single,
                cache_dir=cache_dir,
                local_files_only=offline,
                revision=revision,
            )
        repo = flux_base if is_single_file(flux_id) else flux_id
        if not is_single_file(flux_id) and Path(flux_id).expanduser().is_absolute() and not Path(flux_id).exists():
            from spatialid.errors import ModelFilesMissingError

            raise ModelFilesMissingError(f"FLUX folder {flux_id} does not exist; {flux_files_hint(D.DEFAULT_FLUX_MODEL)}")
        extra = {"transformer": transformer} if transformer is not None else {}
        with hub_errors("FLUX model", repo, flux_files_hint(repo)):
            base = FluxPipeline.from_pretrained(
                repo,
                **pipeline_dtype_kwargs(torch_dtype),
                cache_dir=cache_dir,
                local_files_only=offline,
                revision=revision,
                **extra,
                **kwargs,
            )
        pipe = cls(**base.components)
        saved_pulid = _saved_pulid_folder(flux_id) if pulid is None and pulid_modules is None else None
        if pulid_modules is not None:
            idformer, cas = pulid_modules() if callable(pulid_modules) else pulid_modules
        elif saved_pulid is not None:  # a folder written by SpatialIDPipeline.save_pretrained
            saved = PuLIDFluxModel.from_pretrained(saved_pulid, torch_dtype=torch_dtype)
            idformer, cas, pulid_config = saved.pulid_encoder, saved.pulid_ca, saved.pulid_config
            pulid = saved_pulid
        else:
            idformer, cas = load_pulid_checkpoint(
                pulid,
                pulid_filename,
                dtype=torch_dtype,
                config=pulid_config,
                cache_dir=cache_dir,
                local_files_only=offline,
            )
        enc_kwargs = dict(encoder_kwargs or {})
        enc_kwargs.setdefault("cache_dir", cache_dir)
        enc_kwargs.setdefault("local_files_only", offline)

        def build_encoder() -> Any:
            from spatialid.encoder.identity_encoder import IdentityEncoder

            return IdentityEncoder.from_pretrained(idformer=idformer, **enc_kwargs)

        if identity_encoder_factory is not None:
            factory = identity_encoder_factory
        else:
            factory = build_encoder if identity_encoder is None and load_identity_encoder else None

        pipe.attach_pulid(
            cas,
            idformer=idformer,
            identity_encoder=identity_encoder,
            identity_encoder_factory=factory,
            double_interval=pulid_config.double_interval,
            single_interval=pulid_config.single_interval,
        )
        pipe.model_info = {
            "model": flux_id,
            "pulid": os.fspath(pulid) if pulid is not None else D.PULID_REPO_ID,
            "pulid_file": pulid_filename,
            "quantization": quantization,
            "dtype": str(torch_dtype).replace("torch.", ""),
        }
        return pipe

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs: Any,
    ) -> None:
        """diffusers' folder layout, safetensors only; ``pulid/`` holds the PuLID weights.

        The folder loads back with ``SpatialIDPipeline.from_pretrained(folder)`` (which reads
        ``pulid/`` when no ``pulid`` is given) or, without identity, ``diffusers.FluxPipeline``
        (which ignores ``pulid`` with a warning). The identity encoder is not saved. Pickles are
        refused before anything is written: diffusers would otherwise write ``.bin`` files for its
        own models and only then meet ``pulid``'s refusal.
        """
        if not safe_serialization or use_flashpack:
            raise ValueError("SpatialIDPipeline.save_pretrained writes safetensors only (safe_serialization=True)")
        super().save_pretrained(
            save_directory,
            safe_serialization=True,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=push_to_hub,
            **kwargs,
        )

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        with_identity_encoder: bool = True,
        pulid_modules: tuple[nn.Module, Sequence[nn.Module]] | None = None,
        identity_encoder_factory: Callable[[], Any] | None = None,
    ) -> SpatialIDPipeline:
        """The offline tiny pipeline: real architectures at toy size with random weights.

        Nothing is read from any model hub. Its images are noise by nature: it exists to exercise
        and show the full path (prompt -> identity -> injection -> masks -> image) on any machine
        in seconds. The same ``seed`` gives the same weights in every process, so identity files
        written by ``spatialid encode --model tiny`` match ``generate --model tiny``.
        """
        from spatialid.models.configs import TINY_FLUX, TINY_PULID
        from spatialid.pipeline.tiny import build_tiny_flux_components

        pipe = cls(**build_tiny_flux_components(seed, dtype=dtype))
        if pulid_modules is None:
            idformer, cas = _tiny_pulid_modules(seed)
            idformer.to(dtype=dtype)
        else:
            idformer, cas = pulid_modules

        def build_encoder() -> Any:
            from spatialid.encoder.identity_encoder import IdentityEncoder

            return IdentityEncoder.tiny(idformer=idformer, seed=seed, dtype=dtype)

        if not with_identity_encoder:
            factory = None
        else:
            factory = identity_encoder_factory if identity_encoder_factory is not None else build_encoder

        pipe.attach_pulid(
            cas,
            idformer=idformer,
            identity_encoder_factory=factory,
            double_interval=TINY_PULID.double_interval,
            single_interval=TINY_PULID.single_interval,
        )
        pipe.is_tiny = True
        tiny_defaults = D.size_steps("generate", tiny=True)
        pipe.default_num_inference_steps = tiny_defaults.steps
        pipe.default_max_sequence_length = TINY_FLUX.text_max_length
        pipe.default_height, pipe.default_width = tiny_defaults.height, tiny_defaults.width
        pipe.model_info = {"model": "tiny", "pulid": "tiny", "tiny_seed": seed, "dtype": str(dtype).replace("torch.", "")}
        if device is not None:
            pipe.to(device)
        return pipe

    # ------------------------------------------------------------------ devices and memory
    def _transformer_device(self) -> torch.device:
        try:
            return next(p.device for p in self.transformer.parameters() if p.device.type != "meta")
        except StopIteration:
            return torch.device("cpu")

    def _compute_dtype(self) -> torch.dtype:
        dtype = getattr(self.transformer, "dtype", torch.float32)
        return dtype if dtype.is_floating_point else torch.bfloat16

    def to(self, *args: Any, **kwargs: Any) -> SpatialIDPipeline:  # type: ignore[override]
        """``FluxPipeline.to`` (which moves and casts every component, ``pulid`` included), plus the
        identity encoder: it is not an ``nn.Module`` component, and its own ``to()`` re-casts the
        shared IDFormer to the encoder's dtype, so it gets the dtype too."""
        result = super().to(*args, **kwargs)
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
        enc = self._identity_encoder
        if enc is not None and hasattr(enc, "to") and (device is not None or dtype is not None):
            enc.to(device=device, dtype=dtype)
        return result

    def _park_idformer(self) -> None:
        """Under offloading, keep the IDFormer on the CPU: only the identity encoder runs it, and
        :meth:`encode_identity` brings it to the execution device for each encode (see the class
        comment on offloading)."""
        if self.idformer is not None:
            self.idformer.to("cpu")

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model offload (one whole model on the accelerator at a time).

        ``pulid`` is excluded from offloading (``_exclude_from_cpu_offload``): its CA modules stay on
        the accelerator, where the transformer's blocks call them; peak memory ~ transformer + CA
        modules. diffusers re-runs this after every call (``maybe_free_model_hooks``).
        """
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self._park_idformer()
        self._offload_mode = "model"

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' sequential offload (each sub-module moved when used): lowest memory, slowest.

        ``pulid`` is excluded as under model offload: the CA modules stay on the accelerator.
        """
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        self._park_idformer()
        self._offload_mode = "sequential"

    # ------------------------------------------------------------------ identity
    def encode_identity(self, id_image: Any) -> Any:
        """Photo(s) of one person -> :class:`~spatialid.encoder.IdentityEmbedding` (tokens + uncond tokens)."""
        encoder = self.identity_encoder
        if encoder is None:
            raise SpatialIDError(
                "this pipeline has no identity encoder; pass id_embeds (from `spatialid encode`) instead of id_image"
            )
        device = self._execution_device
        moved = False
        if self._offload_mode is not None and hasattr(encoder, "to"):
            encoder.to(device=device)
            moved = True
        try:
            return encoder.encode(id_image)
        finally:
            if moved:
                encoder.to(device="cpu")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _load_embedding(self, source: Any) -> Any:
        from spatialid.encoder.embedding import IdentityEmbedding

        return IdentityEmbedding.load(source)

    def _resolve_identity(
        self, id_image: Any, id_embeds: Any, uncond_id_embeds: Any, need_uncond: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
        info: dict[str, Any] = {"source": None}
        if id_image is not None and id_embeds is not None:
            raise SpatialIDError("give either id_image or id_embeds, not both")
        if id_image is None and id_embeds is None:
            return None, None, info
        if id_image is not None:
            emb = self.encode_identity(id_image)
            info = {"source": "image", "files": _describe_sources(id_image)}
        elif isinstance(id_embeds, (str, os.PathLike)):
            emb = self._load_embedding(id_embeds)
            info = {"source": "embeds", "files": [Path(id_embeds).name]}
        else:
            emb = id_embeds
            info = {"source": "embeds"}
        if isinstance(emb, torch.Tensor):
            tokens, uncond = emb, uncond_id_embeds
        else:
            tokens = emb.tokens
            uncond = uncond_id_embeds if uncond_id_embeds is not None else getattr(emb, "uncond_tokens", None)
            meta = getattr(emb, "metadata", None)
            if isinstance(meta, dict) and meta:
                info["embedding"] = {k: str(v) for k, v in meta.items()}
        if tokens.ndim == 2:
            tokens = tokens.unsqueeze(0)
        if tokens.ndim != 3:
            raise SpatialIDError(f"identity tokens must be [batch, tokens, dim], got shape {tuple(tokens.shape)}")
        num_queries = getattr(self.idformer, "num_queries", None)
        if not isinstance(emb, torch.Tensor) and num_queries and tokens.shape[1] != num_queries:
            raise SpatialIDError(
                f"the identity has {tokens.shape[1]} tokens but this model's IDFormer makes {num_queries}; "
                "encode the photo with the same model"
            )
        if not bool(torch.isfinite(tokens).all()):
            raise SpatialIDError("the identity tokens hold NaN or Inf values (a damaged identity file); re-encode the photo")
        kv_dim = getattr(self.ca_modules[0], "kv_dim", tokens.shape[-1]) if self.ca_modules else tokens.shape[-1]
        if tokens.shape[-1] != kv_dim:
            raise SpatialIDError(
                f"identity tokens have width {tokens.shape[-1]} but this model's PuLID modules expect {kv_dim}; "
                "encode the photo with the same model (e.g. `spatialid encode --model tiny` for the tiny model)"
            )
        if need_uncond and uncond is None:
            raise SpatialIDError(
                "true CFG needs the zero-identity (uncond) tokens; pass an IdentityEmbedding or uncond_id_embeds"
            )
        if uncond is not None and uncond.ndim == 2:
            uncond = uncond.unsqueeze(0)
        return tokens, uncond, info

    # ------------------------------------------------------------------ generation
    def _warn_if_truncated(self, prompt: str | list[str], max_len: int) -> None:
        """Say so when the text encoders will cut the prompt (diffusers' own notice is silenced)."""
        tokenizer = getattr(self, "tokenizer_2", None)
        if tokenizer is None:
            return
        for text in [prompt] if isinstance(prompt, str) else list(prompt):
            count = len(tokenizer(text, truncation=False, add_special_tokens=True).input_ids)
            if count > max_len:
                _log.warning(
                    "the prompt is %d T5 tokens long; only the first %d are used (raise --max-sequence-length, "
                    "up to 512, or shorten it); CLIP reads only the first 77",
                    count, max_len,
                )

    def _reference_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """Initial latents drawn as the BFL / PuLID-FLUX scripts draw them, packed for diffusers.

        Their ``get_noise`` samples ``[1, C, 2*ceil(H/16), 2*ceil(W/16)]`` in bfloat16 on the
        execution device with ``torch.Generator(device).manual_seed(seed)``, one image per seed;
        diffusers packs the same grid 2x2 into tokens in the same order.
        """
        device = self._execution_device
        channels = int(self.transformer.config.in_channels) // 4
        rows, cols = 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)
        noise = torch.cat(
            [
                torch.randn(
                    1, channels, rows, cols, device=device, dtype=torch.bfloat16,
                    generator=torch.Generator(device=device).manual_seed(int(s)),
                )
                for s in seeds
            ]
        )
        packed = self._pack_latents(noise, len(seeds), channels, rows, cols)
        return packed.to(dtype=self._compute_dtype())

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str] | None = None,
        id_image: Any = None,
        id_embeds: Any = None,
        preset: Any = D.DEFAULT_PRESET,
        id_weight: float = D.DEFAULT_ID_WEIGHT,
        start_step: int = D.DEFAULT_START_STEP,
        true_cfg: float = D.DEFAULT_TRUE_CFG,
        negative_prompt: str | list[str] = "",
        guidance_scale: float = DEFAULT_GUIDANCE,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        return_masks: bool = False,
        cfg_start_step: int = D.DEFAULT_CFG_START_STEP,
        uncond_id_embeds: torch.Tensor | None = None,
        people: Sequence[Any] | None = None,
        regions: Sequence[Any] | None = None,
        save_masks: str | os.PathLike[str] | None = None,
        masks_from: str | os.PathLike[str] | None = None,
        max_sequence_length: int | None = None,
        schedule_overrides: dict[str, float] | None = None,
        noise: str = D.DEFAULT_NOISE,
        output_type: str = "pil",
        return_dict: bool = True,
        **flux_kwargs: Any,
    ) -> SpatialIDPipelineOutput | tuple:
        """Generate images of the identity in ``id_image`` / ``id_embeds`` following ``prompt``.

        Args:
            prompt: text prompt(s).
            id_image: photo(s) of ONE person (path, PIL, array, or a list: tokens are averaged).
            id_embeds: precomputed identity: an ``IdentityEmbedding``, a ``.safetensors`` file from
                ``spatialid encode``, or a tokens tensor ``[1 or B, n, dim]``.
            preset: SpatialID schedule: a preset name (``"paper"``, ``"pulid"`` = uniform PuLID,
                ``"relaxed"``, ablations), a ``SpatialSchedule``, or None (= uniform).
            id_weight: identity strength, 0..3 (0 -> plain FLUX output, bit for bit).
            start_step: first denoising step (0-based) with identity; earlier steps are plain FLUX.
            true_cfg: > 1 enables true CFG with ``negative_prompt`` and zero-identity tokens.
            cfg_start_step: first step where true CFG mixes the branches (PuLID-FLUX uses 1).
            guidance_scale: FLUX.1-dev's embedded (distilled) guidance.
            seed: image ``i`` of the batch uses a CPU generator seeded ``seed + i``; ignored when
                ``generator`` is given; drawn at random (and reported in ``settings``) when both are None.
            return_masks: record the masks of every step and return them as ``output.masks``.
            people: several people in one image, one entry per person (docs/multi-identity.md): a
                photo, a list of photos of that person, an ``IdentityEmbedding``, a
                ``.safetensors`` identity file or a tokens tensor; up to 4, spread left to right
                in this order unless ``regions`` say where. Not together with ``id_image`` /
                ``id_embeds`` (photos of ONE person).
            regions: one region per person (or one for ``id_image``), in order: a box
                ``(x0, y0, x1, y1)`` / ``"x0,y0,x1,y1"`` in fractions of width and height, a mask
                picture (white = the person's place) or an ``[H, W]`` tensor in [0, 1]. A region
                is the person's early prior and an upper bound of their mask at every step.
            save_masks: write every person's mask of every injected step (positive branch) to
                this ``.safetensors`` file (``spatialid.pipeline.people``); implies recording.
            masks_from: replay the masks of such a file instead of computing them (same people,
                size, steps and batch); the negative CFG branch still computes its own.
            schedule_overrides: schedule fields set on top of ``preset`` (``early``, ``late``,
                ``late_floor``, ``center_sigma``, ``global_floor``).
            noise: ``"diffusers"`` (FluxPipeline's initial noise from CPU generators seeded
                ``seed + i``: the same on every machine) or ``"reference"`` (drawn as the BFL /
                PuLID-FLUX scripts do: bfloat16 on the execution device with a generator of that
                device, so a seed starts from the authors' noise on the same kind of GPU).
            **flux_kwargs: passed to ``FluxPipeline.__call__`` (``latents``, ``sigmas``,
                ``callback_on_step_end``, ``joint_attention_kwargs``, ...).

        Returns:
            :class:`SpatialIDPipelineOutput` with ``images``, ``masks`` and ``settings`` (a JSON-ready
            dict of everything needed to reproduce the call).
        """
        from spatialid.masks import resolve_preset

        steps = int(num_inference_steps if num_inference_steps is not None else self.default_num_inference_steps)
        height = int(height if height is not None else self.default_height)
        width = int(width if width is not None else self.default_width)
        max_len = int(max_sequence_length if max_sequence_length is not None else self.default_max_sequence_length)
        if flux_kwargs.get("prompt_embeds") is None:
            check_prompt(prompt)
            self._warn_if_truncated(prompt, max_len)
        check_generation_settings(
            num_inference_steps=steps,
            height=height,
            width=width,
            id_weight=id_weight,
            start_step=start_step,
            true_cfg=true_cfg,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            seed=seed,
        )
        if not isinstance(cfg_start_step, int) or cfg_start_step < 0:
            raise SpatialIDError(f"cfg_start_step must be a whole number >= 0, got {cfg_start_step!r}")
        from spatialid.masks import apply_overrides

        preset_name = preset if isinstance(preset, str) else ("pulid" if preset is None else "custom")
        schedule = apply_overrides(resolve_preset(preset), schedule_overrides)
        if schedule is None:
            schedule_overrides = None  # uniform injection: nothing was overridden
        if noise not in D.NOISE_MODES:
            raise SpatialIDError(f"noise must be one of {', '.join(D.NOISE_MODES)}, got {noise!r}")
        use_true_cfg = float(true_cfg) > 1.0
        if people is not None:
            from spatialid.pipeline.people import check_people_count

            if id_image is not None or id_embeds is not None:
                raise SpatialIDError("give people=[...] (several people) or id_image/id_embeds (one person), not both")
            if isinstance(people, (str, os.PathLike)) or not isinstance(people, Sequence):
                raise SpatialIDError("people must be a list with one entry per person (a photo, a list of photos or an embedding)")
            check_people_count(len(people))
        identity_given = id_image is not None or id_embeds is not None or bool(people)
        if identity_given and self.injector is None:
            raise SpatialIDError(
                "this pipeline has no PuLID modules; build it with SpatialIDPipeline.from_pretrained(...) or .tiny()"
            )
        need_uncond = use_true_cfg and float(id_weight) > 0
        people_info: list[dict[str, Any]] | None = None
        if people:
            from spatialid.pipeline.people import split_person

            resolved = [self._resolve_identity(*split_person(p), uncond_id_embeds, need_uncond=need_uncond) for p in people]
            tokens = [r[0] for r in resolved]
            uncond = [r[1] for r in resolved] if need_uncond else None
            people_info = [r[2] for r in resolved]
            identity_info = {"source": "people", "people": people_info}
        else:
            tokens, uncond, identity_info = self._resolve_identity(id_image, id_embeds, uncond_id_embeds, need_uncond=need_uncond)
        persons = len(tokens) if isinstance(tokens, list) else (1 if tokens is not None else 0)
        if (regions is not None or masks_from is not None) and persons == 0:
            raise SpatialIDError("regions and masks_from need an identity (id_image, id_embeds or people)")

        batch = 1 if isinstance(prompt, str) or prompt is None else len(prompt)
        total = batch * int(num_images_per_prompt)
        seeds: list[int] | None = None
        if generator is None:
            if seed is None:
                seed = secrets.randbelow(2**32)
            seeds = [int(seed) + i for i in range(total)]
            generator = _seed_generators(int(seed), total)
        if noise == "reference" and flux_kwargs.get("latents") is None:
            if seeds is None:
                raise SpatialIDError('noise="reference" needs seed=..., not generator=...')
            flux_kwargs["latents"] = self._reference_noise(seeds, height, width)

        rows = height // (self.vae_scale_factor * 2)
        cols = width // (self.vae_scale_factor * 2)
        calls_per_step = 2 if use_true_cfg else 1
        inject = tokens is not None and float(id_weight) > 0.0
        region_grid = None
        if regions is not None:
            from spatialid.pipeline.people import regions_tensor

            region_grid = regions_tensor(regions, persons, rows, cols)
        mask_source = None
        if masks_from is not None and inject:
            from spatialid.pipeline.people import mask_source_for

            mask_source = mask_source_for(
                masks_from, points=len(self.injector.points), persons=persons, batch=total, rows=rows, cols=cols,
                steps=range(int(start_step), steps),
            )
        recording = return_masks or save_masks is not None

        call_kwargs: dict[str, Any] = dict(
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=float(guidance_scale),
            num_images_per_prompt=int(num_images_per_prompt),
            generator=generator,
            max_sequence_length=max_len,
            output_type=output_type,
            return_dict=True,
            **flux_kwargs,
        )
        if use_true_cfg:
            call_kwargs["true_cfg_scale"] = float(true_cfg)
            if flux_kwargs.get("negative_prompt_embeds") is None:
                # FluxPipeline enables true CFG only when a negative prompt is given; "" is valid.
                neg = negative_prompt if negative_prompt is not None else ""
                if isinstance(neg, str) and isinstance(prompt, list):
                    neg = [neg] * len(prompt)  # one negative per prompt, as FluxPipeline expects
                call_kwargs["negative_prompt"] = neg

        warmup = _CFGWarmup(self.transformer, cfg_start_step) if use_true_cfg and cfg_start_step > 0 else None
        records = None
        try:
            if inject:
                start = int(start_step)

                def embeds_for_call(call: Any) -> torch.Tensor | None:
                    # call: a TransformerCall; its branch is diffusers' cache context ("cond"/"uncond")
                    if call.step < start:
                        return None
                    return uncond if call.branch == "uncond" else tokens

                with self.injector.active(
                    embeds_for_call,
                    id_weight=float(id_weight),
                    schedule=schedule,
                    grid=(rows, cols),
                    record_masks=recording,
                    calls_per_step=calls_per_step,
                    sigmas=lambda: getattr(self.scheduler, "sigmas", None),  # the phase from the float time
                    regions=region_grid,
                    mask_source=mask_source,
                    record_dtype=torch.float32 if save_masks is not None else torch.float16,
                ) as session:
                    out = super().__call__(**call_kwargs)
                records = session.records
            else:
                out = super().__call__(**call_kwargs)
        finally:
            if warmup is not None:
                warmup.remove()

        if save_masks is not None:
            from spatialid.pipeline.people import save_mask_file

            save_mask_file(save_masks, records or [], rows, cols)
        masks = _collect_masks(records, calls_per_step, rows, cols) if return_masks and records is not None else None
        if return_masks and masks is None:
            masks = []
        from spatialid.pipeline.people import describe_region, region_list

        record = GenerationSettings(
            prompt=prompt,
            negative_prompt=negative_prompt if use_true_cfg else None,
            preset=preset_name,
            id_weight=float(id_weight),
            start_step=int(start_step),
            true_cfg=float(true_cfg),
            cfg_start_step=int(cfg_start_step) if use_true_cfg else None,
            guidance=float(guidance_scale),
            steps=steps,
            width=width,
            height=height,
            seed=seeds[0] if seeds else None,
            num_images=total,
            max_sequence_length=max_len,
            schedule_overrides=dict(schedule_overrides) if schedule_overrides else None,
            noise=noise,
            people=[list((info or {}).get("files") or []) for info in people_info] if people_info else None,
            regions=[describe_region(r) for r in region_list(regions)] if regions is not None else None,
        )
        settings = {
            "version": __version__,
            **record.to_dict(),
            "seeds": seeds,
            "schedule": schedule.to_dict() if schedule is not None else None,
            "identity": identity_info,
            "identity_injected": bool(inject),
            **({"masks_from": Path(masks_from).name} if masks_from is not None else {}),
            "offload": self._offload_mode,
            **(self.model_info or {}),
        }
        if self.is_tiny:
            settings["note"] = TINY_NOTE
        result = SpatialIDPipelineOutput(images=out.images, masks=masks, settings=settings)
        if not return_dict:
            return (result.images, masks, settings)
        return result


def _collect_masks(records: Sequence[Any], calls_per_step: int, rows: int, cols: int) -> list[StepMasks]:
    """Group the injector's records by denoising step, keeping the positive (identity) branch.

    Step and branch come with each record (from the cache context, or the injector's counting
    fallback, which already used ``calls_per_step``); the argument stays for the call site.
    """
    del calls_per_step
    by_step: dict[int, list[Any]] = {}
    for rec in records:
        if rec.branch != "uncond":
            by_step.setdefault(rec.step, []).append(rec)
    result = []
    for step in sorted(by_step):
        recs = sorted(by_step[step], key=lambda r: r.point)
        people = None
        if recs[0].mask.dim() == 3:  # the multi-identity path: [K, B, N] per point
            per_person = torch.stack([r.mask.float() for r in recs])  # [P, K, B, N]
            people = per_person.reshape(*per_person.shape[:3], rows, cols)
            stack = per_person.sum(dim=1).clamp_(max=1.0).to(torch.float16)  # [P, B, N]
        else:
            stack = torch.stack([r.mask.to(torch.float16) for r in recs])  # [P, B, N]
        result.append(
            StepMasks(
                step=step,
                t=float(recs[0].t),
                phase=str(recs[0].phase),
                masks=stack.reshape(stack.shape[0], stack.shape[1], rows, cols),
                people=people,
            )
        )
    return result


def _tiny_pulid_modules(seed: int) -> tuple[nn.Module, nn.ModuleList]:
    """Tiny IDFormer + CA modules, the same ones the identity encoder's tiny configuration uses."""
    from spatialid.encoder.identity_encoder import tiny_pulid_modules

    return tiny_pulid_modules(seed)


def _wrap_pulid_modules(
    idformer: nn.Module | None, ca_modules: Sequence[nn.Module], double_interval: int, single_interval: int
) -> PuLIDFluxModel:
    """A :class:`PuLIDFluxModel` holding ``idformer`` and ``ca_modules`` themselves (no tensor copied).

    The container is built on the "meta" device (nothing allocated) with the sizes the modules
    report, then its ``pulid_encoder`` / ``pulid_ca`` are replaced by the given modules, so its
    ``state_dict`` and config describe exactly what is attached. Without an IDFormer,
    ``pulid_encoder`` is None (the config then records the published IDFormer size).
    """
    from spatialid.models.checkpoint import build_pulid_model
    from spatialid.models.configs import IDFormerConfig, PuLIDFluxConfig

    cas = ca_modules if isinstance(ca_modules, nn.ModuleList) else nn.ModuleList(ca_modules)
    if len(cas) == 0:
        raise ValueError("attach_pulid needs at least one CA module")
    ca_configs = [getattr(ca, "pulid_config", None) for ca in cas]
    if ca_configs[0] is None:
        raise TypeError(
            f"CA modules must be PerceiverAttentionCA (with a pulid_config), got {type(cas[0]).__name__}; "
            "load them with spatialid.models.load_pulid_checkpoint"
        )
    for i, cfg in enumerate(ca_configs):
        if cfg != ca_configs[0]:
            raise ValueError(f"all CA modules must share one configuration; ca_modules[{i}] differs")
    id_cfg = getattr(idformer, "pulid_config", None) if idformer is not None else IDFormerConfig()
    if id_cfg is None:
        raise TypeError(f"idformer must be an IDFormer (with a pulid_config), got {type(idformer).__name__}")
    config = PuLIDFluxConfig(
        idformer=id_cfg,
        ca=ca_configs[0],
        num_ca=len(cas),
        double_interval=int(double_interval),
        single_interval=int(single_interval),
    )
    container = build_pulid_model(config, device="meta")
    container.pulid_encoder = idformer
    container.pulid_ca = cas
    return container.eval().requires_grad_(False)


def _saved_pulid_folder(flux: str) -> Path | None:
    """``<flux>/pulid`` when ``flux`` is a local folder whose ``model_index.json`` lists a ``pulid``
    component with its files (what :meth:`SpatialIDPipeline.save_pretrained` writes), else None."""
    import json

    root = Path(flux).expanduser()
    index = root / "model_index.json"
    if not index.is_file() or not (root / "pulid" / "config.json").is_file():
        return None
    try:
        entry = json.loads(index.read_text(encoding="utf-8")).get("pulid")
    except (OSError, ValueError):
        return None
    if not isinstance(entry, list) or not entry or entry[0] is None:
        return None
    return root / "pulid"

