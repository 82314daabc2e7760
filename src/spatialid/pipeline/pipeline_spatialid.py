"""``SpatialIDPipeline``: diffusers' FluxPipeline with PuLID-FLUX identity injection and SpatialID masks.

The sampler is diffusers' own: this class subclasses :class:`diffusers.FluxPipeline` and only
wraps its ``__call__`` inside :meth:`IdentityInjector.active`, which adds the identity residual
``h + w * M_t * CA(Z_id, h)`` through module hooks on the transformer blocks. The PuLID parts
(IDFormer, the 20 CA modules, the identity encoder) are extra attributes, not registered diffusers
components, so ``FluxPipeline`` machinery (offloading, LoRA loading, progress bars, callbacks)
keeps working unchanged.

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
``enable_sequential_cpu_offload()`` ~3 GiB (slowest). Both offload modes are diffusers' own; the
injector's hooks sit on the blocks and keep working under accelerate's offload hooks (checked on CUDA:
identical images). A quantized transformer loads via ``from_pretrained(..., quantization="nf4" |
"int8" | "torchao-int8" | "torchao-fp8" | "gguf:FILE")`` (transformer ~6.7-12.7 GB instead of 23.8 GB).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from torch import nn

from spatialid import __version__
from spatialid.errors import SpatialIDError
from spatialid.pipeline.loading import (
    DEFAULT_FLUX,
    flux_files_hint,
    hub_errors,
    is_single_file,
    load_flux_transformer,
    parse_quantization,
    pipeline_dtype_kwargs,
    resolve_local_files_only,
)
from spatialid.pipeline.settings import DEFAULT_GUIDANCE, check_generation_settings, check_prompt

__all__ = ["SpatialIDPipeline", "SpatialIDPipelineOutput", "StepMasks", "TINY_NOTE"]

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
    masks: torch.Tensor  # float16 CPU [num_points, batch, rows, cols]

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
    """

    def __init__(self, transformer: nn.Module, cfg_start_step: int) -> None:
        self.cfg_start_step = cfg_start_step
        self.calls = 0
        self.positive: Any = None
        self.handle = transformer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        step, branch = divmod(self.calls, 2)
        self.calls += 1
        if step >= self.cfg_start_step:
            self.positive = None
            return None
        if branch == 0:
            self.positive = output
            return None
        return self.positive

    def remove(self) -> None:
        self.handle.remove()
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

    # PuLID parts: plain attributes (not diffusers components; offload/save machinery ignores them).
    ca_modules: nn.ModuleList | None = None
    idformer: nn.Module | None = None
    injector: Any = None
    _identity_encoder: Any = None
    _identity_encoder_factory: Callable[[], Any] | None = None
    _offload_mode: str | None = None
    model_info: dict[str, Any] | None = None
    is_tiny: bool = False
    # Defaults when the caller gives none (PuLID-FLUX's app: 20 steps, guidance 4, T5 length 128).
    default_num_inference_steps: int = 20
    default_max_sequence_length: int = 128
    default_height: int = 1024
    default_width: int = 1024

    # ------------------------------------------------------------------ construction
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

        ``identity_encoder_factory`` builds the encoder on first use, so callers that pass
        precomputed ``id_embeds`` never need the encoder's weights.
        """
        from spatialid.injection import IdentityInjector

        if self.injector is not None:
            self.injector.detach()
        cas = ca_modules if isinstance(ca_modules, nn.ModuleList) else nn.ModuleList(ca_modules)
        cas.to(device=self._transformer_device(), dtype=self._compute_dtype())
        cas.eval().requires_grad_(False)
        self.ca_modules = cas
        self.idformer = idformer
        self._identity_encoder = identity_encoder
        self._identity_encoder_factory = identity_encoder_factory
        self.injector = IdentityInjector(
            self.transformer, cas, double_interval=double_interval, single_interval=single_interval
        )

    def detach_pulid(self) -> None:
        """Remove the injection hooks: the pipeline is a plain FluxPipeline again."""
        if self.injector is not None:
            self.injector.detach()
        self.injector = None

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
        flux: str | os.PathLike[str] = DEFAULT_FLUX,
        pulid: str | os.PathLike[str] | None = None,
        *,
        pulid_filename: str | None = None,
        pulid_config: Any = None,
        torch_dtype: torch.dtype = torch.bfloat16,
        transformer: nn.Module | None = None,
        quantization: str | None = None,
        flux_base: str = DEFAULT_FLUX,
        identity_encoder: Any = None,
        encoder_kwargs: dict[str, Any] | None = None,
        load_identity_encoder: bool = True,
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
            pulid: PuLID-FLUX ``.safetensors`` file, folder, or hub id (default ``guozinan/PuLID``,
                file ``pulid_flux_v0.9.1.safetensors``; v0.9.0 loads too).
            pulid_config: module sizes of that file (default ``PULID_FLUX``; ``TINY_PULID`` for
                reduced files written by ``save_pulid_checkpoint``).
            torch_dtype: weights dtype (bfloat16 on GPUs; float32 for CPU experiments).
            transformer: an already loaded (e.g. quantized) ``FluxTransformer2DModel``.
            quantization: load the transformer quantized: ``"nf4"``, ``"int8"`` (bitsandbytes),
                ``"torchao-int8"``, ``"torchao-fp8"`` or ``"gguf:<file>"``.
            identity_encoder / encoder_kwargs / load_identity_encoder: an encoder instance, or
                keyword arguments for ``IdentityEncoder.from_pretrained`` (built lazily on the first
                ``id_image``), or no encoder at all (then pass ``id_embeds``).
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

            raise ModelFilesMissingError(f"FLUX folder {flux_id} does not exist; {flux_files_hint(DEFAULT_FLUX)}")
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
            "pulid": os.fspath(pulid) if pulid is not None else "guozinan/PuLID",
            "pulid_file": pulid_filename,
            "quantization": quantization,
            "dtype": str(torch_dtype).replace("torch.", ""),
        }
        return pipe

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        with_identity_encoder: bool = True,
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
        idformer, cas = _tiny_pulid_modules(seed)
        idformer.to(dtype=dtype)

        def build_encoder() -> Any:
            from spatialid.encoder.identity_encoder import IdentityEncoder

            return IdentityEncoder.tiny(idformer=idformer, seed=seed, dtype=dtype)

        factory = build_encoder if with_identity_encoder else None

        pipe.attach_pulid(
            cas,
            idformer=idformer,
            identity_encoder_factory=factory,
            double_interval=TINY_PULID.double_interval,
            single_interval=TINY_PULID.single_interval,
        )
        pipe.is_tiny = True
        pipe.default_num_inference_steps = 6
        pipe.default_max_sequence_length = TINY_FLUX.text_max_length
        pipe.default_height = pipe.default_width = 256
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
        """Like ``FluxPipeline.to``, moving the PuLID modules along."""
        result = super().to(*args, **kwargs)
        device = kwargs.get("device")
        dtype = kwargs.get("dtype")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
        for module in (self.ca_modules, self.idformer):
            if module is not None:
                module.to(device=device, dtype=dtype)
        enc = self._identity_encoder
        if enc is not None and device is not None and hasattr(enc, "to"):
            enc.to(device=device)
        return result

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model offload (one whole model on the accelerator at a time).

        The CA modules follow the transformer onto the accelerator on the first injected call and
        go back to the CPU after each generation; peak memory ~ transformer + CA modules.
        """
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self._offload_mode = "model"

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' sequential offload (each sub-module moved when used): lowest memory, slowest."""
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
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
    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str] | None = None,
        id_image: Any = None,
        id_embeds: Any = None,
        preset: Any = "paper",
        id_weight: float = 1.0,
        start_step: int = 0,
        true_cfg: float = 1.0,
        negative_prompt: str | list[str] = "",
        guidance_scale: float = DEFAULT_GUIDANCE,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        return_masks: bool = False,
        cfg_start_step: int = 1,
        uncond_id_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
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
        schedule = resolve_preset(preset)
        preset_name = preset if isinstance(preset, str) else ("pulid" if preset is None else "custom")
        use_true_cfg = float(true_cfg) > 1.0
        identity_given = id_image is not None or id_embeds is not None
        if identity_given and self.injector is None:
            raise SpatialIDError(
                "this pipeline has no PuLID modules; build it with SpatialIDPipeline.from_pretrained(...) or .tiny()"
            )
        tokens, uncond, identity_info = self._resolve_identity(
            id_image, id_embeds, uncond_id_embeds, need_uncond=use_true_cfg and float(id_weight) > 0
        )

        batch = 1 if isinstance(prompt, str) or prompt is None else len(prompt)
        total = batch * int(num_images_per_prompt)
        seeds: list[int] | None = None
        if generator is None:
            if seed is None:
                seed = secrets.randbelow(2**32)
            seeds = [int(seed) + i for i in range(total)]
            generator = _seed_generators(int(seed), total)

        rows = height // (self.vae_scale_factor * 2)
        cols = width // (self.vae_scale_factor * 2)
        calls_per_step = 2 if use_true_cfg else 1
        inject = tokens is not None and float(id_weight) > 0.0

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

                def embeds_for_call(call_index: int) -> torch.Tensor | None:
                    step, branch = divmod(call_index, calls_per_step)
                    if step < start:
                        return None
                    return tokens if branch == 0 else uncond

                with self.injector.active(
                    embeds_for_call,
                    id_weight=float(id_weight),
                    schedule=schedule,
                    grid=(rows, cols),
                    record_masks=return_masks,
                ) as session:
                    out = super().__call__(**call_kwargs)
                records = session.records
            else:
                out = super().__call__(**call_kwargs)
        finally:
            if warmup is not None:
                warmup.remove()
            if self._offload_mode is not None and self.ca_modules is not None:
                self.ca_modules.to("cpu")

        masks = _collect_masks(records, calls_per_step, rows, cols) if return_masks and records is not None else None
        if return_masks and masks is None:
            masks = []
        settings = {
            "version": __version__,
            "prompt": prompt,
            "negative_prompt": (negative_prompt if use_true_cfg else None),
            "seed": seeds[0] if seeds else None,
            "seeds": seeds,
            "preset": preset_name,
            "schedule": schedule.to_dict() if schedule is not None else None,
            "id_weight": float(id_weight),
            "start_step": int(start_step),
            "true_cfg": float(true_cfg),
            "cfg_start_step": int(cfg_start_step) if use_true_cfg else None,
            "guidance": float(guidance_scale),
            "steps": steps,
            "width": width,
            "height": height,
            "num_images": total,
            "max_sequence_length": max_len,
            "identity": identity_info,
            "identity_injected": bool(inject),
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
    """Group the injector's records by denoising step, keeping the positive (identity) branch."""
    by_step: dict[int, list[Any]] = {}
    for rec in records:
        step, branch = divmod(rec.call_index, calls_per_step)
        if branch == 0:
            by_step.setdefault(step, []).append(rec)
    result = []
    for step in sorted(by_step):
        recs = sorted(by_step[step], key=lambda r: r.point)
        stack = torch.stack([r.mask.to(torch.float16) for r in recs])  # [P, B, N]
        result.append(
            StepMasks(
                step=step,
                t=float(recs[0].t),
                phase=str(recs[0].phase),
                masks=stack.reshape(stack.shape[0], stack.shape[1], rows, cols),
            )
        )
    return result


def _tiny_pulid_modules(seed: int) -> tuple[nn.Module, nn.ModuleList]:
    """Tiny IDFormer + CA modules, the same ones the identity encoder's tiny configuration uses."""
    from spatialid.encoder.identity_encoder import tiny_pulid_modules

    return tiny_pulid_modules(seed)
