"""Identity on Chroma: diffusers' ``ChromaPipeline``, ``ChromaImg2ImgPipeline`` and ``ChromaInpaintPipeline``.

``ChromaTransformer2DModel`` has FLUX.1's widths and block counts (19 double, 38 single blocks,
24 heads x 128 = 3072), so the published PuLID-FLUX weights attach through the one loader
(:func:`~spatialid.loaders.pulid.load_pulid`) unchanged. What differs from FLUX.1-dev:

* no guidance embedding: Chroma runs real classifier-free guidance with a negative prompt, which
  diffusers calls ``guidance_scale``. The settings record's ``true_cfg`` is that scale here
  (``true_cfg > 1`` turns it on, as for FLUX's true CFG); the FLUX ``guidance`` setting has no
  effect. Both CFG branches get their identity tokens (the identity's uncond tokens in the
  negative one), numbered by the call order since Chroma sets no cache context;
* one text encoder (T5, ``pipe.tokenizer``), no CLIP.

:class:`ChromaIdentityPipeline` is the diffusers Chroma pipeline with PuLID loaded plus what the one
identity call (:func:`~spatialid.pipeline.generate.run_identity_call`) needs of its base: the
identity encoder, the PuLID modules, the default size/steps and the model record.
:class:`~spatialid.pipeline.variants.IdentityPipelineRunner` calls it (or its img2img / inpainting
variant on the same components) with the settings record, as front-ends call every FLUX.1 pipeline;
for Chroma it maps ``true_cfg`` onto Chroma's ``guidance_scale``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from spatialid import defaults as D
from spatialid.errors import SpatialIDError
from spatialid.loaders.pulid import load_pulid, pulid_loader
from spatialid.pipeline.loading import (
    chroma_files_hint,
    hub_errors,
    load_flux_transformer,
    parse_quantization,
    pipeline_dtype_kwargs,
    resolve_local_files_only,
    wrap_pulid_modules,
)
from spatialid.pipeline.pipeline_spatialid import SpatialIDPipeline

__all__ = ["ChromaIdentityPipeline"]

_GENERATE = D.size_steps("generate", tiny=False)


class ChromaIdentityPipeline:
    """A diffusers ``ChromaPipeline`` with PuLID-FLUX loaded, and the identity encoder that feeds it.

    Attribute access falls through to the diffusers pipeline (``transformer``, ``scheduler``,
    ``current_timestep``, ``load_lora_weights``, ...). ``pulid`` is the
    :class:`~spatialid.models.PuLIDFluxModel` holding the IDFormer (shared with the identity
    encoder) and the CA modules.
    """

    family = "chroma"
    is_tiny = False
    _offload_mode: str | None = None
    _identity_encoder: Any = None
    _identity_encoder_factory: Callable[[], Any] | None = None
    default_num_inference_steps: int = _GENERATE.steps
    default_max_sequence_length: int = D.DEFAULT_MAX_SEQUENCE_LENGTH
    default_height: int = _GENERATE.height
    default_width: int = _GENERATE.width

    # The identity encoder, the PuLID modules and offloading work as on SpatialIDPipeline (written once there).
    identity_encoder = SpatialIDPipeline.identity_encoder
    encode_identity = SpatialIDPipeline.encode_identity
    ca_modules = SpatialIDPipeline.ca_modules
    idformer = SpatialIDPipeline.idformer
    _park_idformer = SpatialIDPipeline._park_idformer

    def __init__(
        self,
        pipe: Any,
        pulid: Any,
        *,
        identity_encoder_factory: Callable[[], Any] | None = None,
        model_info: dict[str, Any] | None = None,
    ) -> None:
        self.pipe = pipe
        self.pulid = pulid
        self._identity_encoder_factory = identity_encoder_factory
        self.model_info = model_info
        load_pulid(pipe, pulid)  # checks that the CA modules fit this transformer
        config = pipe.transformer.config
        if "guidance_embeds" not in config:
            # diffusers 0.42's ChromaInpaintPipeline reads transformer.config.guidance_embeds, which
            # ChromaTransformer2DModel does not define (Chroma1-HD's config.json has it, diffusers drops it)
            pipe.transformer.register_to_config(guidance_embeds=False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    @property
    def injector(self) -> Any:
        loader = pulid_loader(self.pipe)
        return loader.injector if loader is not None else None

    @property
    def tokenizer_2(self) -> Any:
        """Chroma's one (T5) tokenizer, where FLUX's T5 is ``tokenizer_2`` (the prompt-length warning)."""
        return self.pipe.tokenizer

    @property
    def components(self) -> dict[str, Any]:
        return dict(self.pipe.components)

    # ------------------------------------------------------------------ devices and memory
    def to(self, *args: Any, **kwargs: Any) -> ChromaIdentityPipeline:
        """The diffusers pipeline's ``to()`` plus the PuLID modules and the identity encoder."""
        self.pipe.to(*args, **kwargs)
        self.pulid.to(*args, **kwargs)
        if self._identity_encoder is not None and hasattr(self._identity_encoder, "to"):
            device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
            dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
            self._identity_encoder.to(device=device, dtype=dtype)
        return self

    def _offload(self, mode: str, device: Any) -> None:
        getattr(self.pipe, f"enable_{mode}_cpu_offload")(device=device)
        self.pulid.pulid_ca.to(self.pipe._execution_device)  # called by the blocks: on the device
        self._park_idformer()
        self._offload_mode = mode

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: Any = None) -> None:
        self._offload("model", device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: Any = None) -> None:
        self._offload("sequential", device)

    def reference_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        raise SpatialIDError("--noise reference is for FLUX.1 text-to-image; Chroma draws diffusers' noise")

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        dtype: torch.dtype = torch.float32,
        pulid_modules: tuple[Any, Any] | None = None,
        identity_encoder_factory: Callable[[], Any] | None = None,
    ) -> ChromaIdentityPipeline:
        """Chroma's architecture at the tiny FLUX size with random weights (``--model tiny-chroma``).

        The VAE, T5 and PuLID modules are the tiny FLUX model's of the same ``seed``, so identity
        files written by ``spatialid encode --model tiny`` fit it too.
        """
        from diffusers import ChromaPipeline

        from spatialid.encoder.identity_encoder import IdentityEncoder, tiny_pulid_modules
        from spatialid.models.configs import TINY_FLUX, TINY_PULID
        from spatialid.pipeline.tiny import build_tiny_chroma_components

        pipe = ChromaPipeline(**build_tiny_chroma_components(seed, dtype=dtype))
        if pulid_modules is None:
            idformer, cas = tiny_pulid_modules(seed)
            idformer.to(dtype=dtype)
        else:
            idformer, cas = pulid_modules
        cas.to(dtype=dtype)
        container = wrap_pulid_modules(idformer, cas, TINY_PULID.double_interval, TINY_PULID.single_interval)
        factory = identity_encoder_factory or (lambda: IdentityEncoder.tiny(idformer=idformer, seed=seed, dtype=dtype))
        out = cls(
            pipe, container, identity_encoder_factory=factory,
            model_info={"model": D.TINY_CHROMA_MODEL, "pulid": "tiny", "tiny_seed": seed,
                        "dtype": str(dtype).replace("torch.", "")},
        )
        out.is_tiny = True
        tiny_defaults = D.size_steps("generate", tiny=True)
        out.default_num_inference_steps = tiny_defaults.steps
        out.default_max_sequence_length = TINY_FLUX.text_max_length
        out.default_height, out.default_width = tiny_defaults.height, tiny_defaults.width
        return out

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        pulid_modules: tuple[Any, Any] | Callable[[], tuple[Any, Any]],
        torch_dtype: torch.dtype = torch.bfloat16,
        quantization: str | None = None,
        identity_encoder_factory: Callable[[], Any] | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        pulid_source: str | None = None,
    ) -> ChromaIdentityPipeline:
        """A Chroma model in diffusers layout (hub id or folder, e.g. ``lodestones/Chroma1-HD``) with the
        PuLID-FLUX modules (``pulid_modules``: loaded, or a callable that loads them after Chroma)."""
        from diffusers import ChromaPipeline, ChromaTransformer2DModel

        model_id = os.fspath(model)
        offline = resolve_local_files_only(local_files_only)
        mode, _ = parse_quantization(quantization)
        extra: dict[str, Any] = {}
        if mode is not None:
            extra["transformer"] = load_flux_transformer(
                model_id, quantization, torch_dtype=torch_dtype, cache_dir=cache_dir, local_files_only=offline,
                transformer_class=ChromaTransformer2DModel,
            )
        with hub_errors("Chroma model", model_id, chroma_files_hint(model_id)):
            pipe = ChromaPipeline.from_pretrained(
                model_id, **pipeline_dtype_kwargs(torch_dtype), cache_dir=cache_dir, local_files_only=offline, **extra
            )
        idformer, cas = pulid_modules() if callable(pulid_modules) else pulid_modules
        container = wrap_pulid_modules(idformer, cas, 2, 4)
        return cls(
            pipe, container, identity_encoder_factory=identity_encoder_factory,
            model_info={"model": model_id, "pulid": pulid_source or D.PULID_REPO_ID, "quantization": quantization,
                        "dtype": str(torch_dtype).replace("torch.", "")},
        )
