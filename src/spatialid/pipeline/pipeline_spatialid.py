"""``SpatialIDPipeline``: diffusers' FluxPipeline with PuLID-FLUX identity injection and SpatialID masks.

The sampler is diffusers' own: this class subclasses :class:`diffusers.FluxPipeline` with the one
PuLID loader (:class:`~spatialid.loaders.pulid.PuLIDLoaderMixin`). Its ``__call__`` only encodes
the photos into a :class:`~spatialid.injection.identity.PuLIDIdentity` and calls FluxPipeline's
``__call__`` with it in ``joint_attention_kwargs`` (:func:`~spatialid.pipeline.generate.run_identity_call`,
the path every other FLUX.1 pipeline takes too); the loader's hooks add the identity residual
``h + w * M_t * CA(Z_id, h)`` after the transformer blocks. The PuLID weights
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

import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

from spatialid import defaults as D
from spatialid.errors import SpatialIDError
from spatialid.injection.identity import IdentityError
from spatialid.loaders.pulid import PuLIDLoaderMixin, load_pulid
from spatialid.models.pulid_flux import PuLIDFluxModel
from spatialid.pipeline.generate import run_identity_call
from spatialid.pipeline.loading import (
    flux_files_hint,
    saved_pulid_folder,
    tiny_pulid_modules,
    wrap_pulid_modules,
    hub_errors,
    is_single_file,
    load_flux_transformer,
    parse_quantization,
    pipeline_dtype_kwargs,
    resolve_local_files_only,
)
from spatialid.pipeline.outputs import TINY_NOTE, SpatialIDPipelineOutput, StepMasks
from spatialid.pipeline.settings import DEFAULT_GUIDANCE

__all__ = ["SpatialIDPipeline", "SpatialIDPipelineOutput", "StepMasks", "TINY_NOTE"]

_GENERATE = D.size_steps("generate", tiny=False)


class SpatialIDPipeline(FluxPipeline, PuLIDLoaderMixin):
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
        container = wrap_pulid_modules(idformer, ca_modules, double_interval, single_interval)
        self._install_pulid(container)
        self._identity_encoder = identity_encoder
        self._identity_encoder_factory = identity_encoder_factory

    def _install_pulid(self, pulid: PuLIDFluxModel) -> None:
        """Register ``pulid``, place its CA modules like the transformer and hook them in (the one loader)."""
        cas = pulid.pulid_ca
        # Offloaded: where enable_*_cpu_offload puts excluded components (the transformer itself is
        # on the CPU or "meta" between calls); else next to the transformer. Its dtype either way.
        device = getattr(self, "_offload_device", None) if self._offload_mode is not None else None
        cas.to(device=device if device is not None else self._transformer_device(), dtype=self._compute_dtype())
        cas.eval().requires_grad_(False)
        load_pulid(self, pulid)  # checks that the CA modules fit this transformer
        self.register_modules(pulid=pulid)

    def detach_pulid(self) -> None:
        """Remove the injection hooks and the ``pulid`` component: the pipeline is a plain FluxPipeline again."""
        self.unload_pulid()

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
        saved_pulid = saved_pulid_folder(flux_id) if pulid is None and pulid_modules is None else None
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
            idformer, cas = tiny_pulid_modules(seed)
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

    def reference_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
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
        *,
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
        true_cfg_scale: float | None = None,
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
                in this order unless ``regions`` say where, or ``(entry, "the boy")``: bound to
                words of the prompt, placed where FLUX's attention puts them (``"man#2"``: the
                second "man"). Not with ``id_image`` / ``id_embeds`` (photos of ONE person).
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
        if true_cfg_scale is not None:  # diffusers' name for true_cfg
            if true_cfg != D.DEFAULT_TRUE_CFG and float(true_cfg) != float(true_cfg_scale):
                raise IdentityError("give true_cfg or true_cfg_scale (the same setting), not both")
            true_cfg = true_cfg_scale
        return run_identity_call(
            functools.partial(FluxPipeline.__call__, self),
            self,
            prompt=prompt, id_image=id_image, id_embeds=id_embeds, people=people, regions=regions, preset=preset,
            id_weight=id_weight, start_step=start_step, true_cfg=true_cfg, negative_prompt=negative_prompt,
            cfg_start_step=cfg_start_step, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
            height=height, width=width, generator=generator, seed=seed, num_images_per_prompt=num_images_per_prompt,
            return_masks=return_masks, uncond_id_embeds=uncond_id_embeds, save_masks=save_masks,
            masks_from=masks_from, max_sequence_length=max_sequence_length, schedule_overrides=schedule_overrides,
            noise=noise, output_type=output_type, return_dict=return_dict, **flux_kwargs,
        )
