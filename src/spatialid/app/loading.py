"""Loading the models a front-end needs, once per process.

The front-ends describe what they want as a :class:`ModelSpec` (the CLI builds it from argparse,
the web UI and the bench receive it from the CLI or from Python). :class:`Models` turns the spec
into objects lazily and keeps them, so each weight file is read once per process whatever the
front-end does with them: the PuLID-FLUX checkpoint feeds both the identity encoder (its IDFormer)
and the pipeline (its CA modules and the same IDFormer), the identity encoder's face and EVA
weights are read once, and FLUX is read once.

Everything that can be checked without a model (the quantization mode, offload against the
device, the device itself) is checked by :meth:`ModelSpec.check` before anything loads.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
from dataclasses import dataclass
from typing import Any

from spatialid import defaults as D
from spatialid.app.sources import check_lora_files, in_hub_cache, looks_local  # re-exported: their old home
from spatialid.errors import SpatialIDError

__all__ = [
    "ModelSpec",
    "Models",
    "OFFLOAD_MODES",
    "check_lora_files",
    "in_hub_cache",
    "looks_local",
    "check_quantize",
    "compile_transformer",
    "load_pipeline",
    "quiet_third_party_logs",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger("spatialid.app")

OFFLOAD_MODES = ("none", "model", "sequential")
DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")


# ----------------------------------------------------------------------------- devices


def resolve_device(name: str | None) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; refuse CUDA when torch cannot see a GPU."""
    import torch

    text = (name or "auto").strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU/driver is visible"
            raise SpatialIDError(f"--device {name} requested but CUDA is not available ({why}); use --device cpu")
        if ":" in text:
            try:
                index = int(text.split(":", 1)[1])
            except ValueError:
                raise SpatialIDError(f"bad device {name!r}; use cuda, cuda:N or cpu") from None
            if not 0 <= index < torch.cuda.device_count():
                raise SpatialIDError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return text
    if text in ("cpu", "mps"):
        if text == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SpatialIDError("--device mps requested but Apple MPS is not available; use --device cpu")
        return text
    raise SpatialIDError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def resolve_dtype(name: str | None, device: str) -> Any:  # -> torch.dtype
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU; otherwise the named dtype."""
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise SpatialIDError(f"unknown dtype {name!r}; use one of: {', '.join(DTYPE_NAMES)}") from None


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def quiet_third_party_logs() -> None:
    """diffusers/transformers reset their log level when imported; keep only their errors
    (our own messages say what matters; --debug still shows tracebacks)."""
    for name in ("diffusers", "transformers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["set_verbosity_error"])
            module.set_verbosity_error()
        except (ImportError, AttributeError):  # pragma: no cover
            pass


def check_quantize(model: str, quantize: str | None) -> None:
    """Refuse an unknown ``--quantize`` mode, or one given with ``--model tiny`` (which has no FLUX weights)."""
    if quantize in (None, "none"):
        return
    from spatialid.pipeline.loading import parse_quantization

    parse_quantization(quantize)
    if model in D.TINY_MODELS:
        raise SpatialIDError(f"--quantize applies to real FLUX weights, not to --model {model}")


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ModelSpec:
    """Which models to load and how (what the CLI's model flags say).

    ``model`` is a FLUX.1 hub id or folder, a single transformer file, or ``"tiny"`` (the offline
    toy model with random weights). The encoder fields only matter for the real identity encoder.
    """

    model: str = D.DEFAULT_FLUX_MODEL
    pulid: str | None = None
    offload: str = "none"
    quantize: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    cache_dir: str | None = None
    # identity encoder (real path)
    eva: str | None = None
    models_dir: str | None = None
    face_backend: str = "auto"
    # tiny model: seed of its random weights (identity files written with a seed match it)
    tiny_seed: int = 0
    # speed: torch.compile the transformer with its hooks; a step cache "NAME[:VALUE]" (--cache)
    compile: bool = False
    cache: str | None = None
    # which diffusers FLUX.1 pipeline runs (docs/pipelines.md), its ControlNet, and LoRAs
    # (FILE_OR_HUB_ID[:SCALE], loaded with diffusers' load_lora_weights) on the shared transformer
    pipeline: str = "text2image"
    controlnet: str | None = None
    loras: tuple[str, ...] = ()

    @property
    def is_tiny(self) -> bool:
        """``tiny`` or ``tiny-chroma``: toy size, random weights, built in-process."""
        return self.model in D.TINY_MODELS

    @property
    def family(self) -> str:
        """``flux`` or ``chroma``, from the model's ``model_index.json`` (read, not loaded; refuses other models)."""
        return _model_family(self.model, self.local_files_only, self.cache_dir)

    @property
    def local_files_only(self) -> bool | None:
        """``True`` for ``--offline``; ``None`` lets the environment decide (one rule everywhere)."""
        return True if self.offline else None

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def _check_files(self) -> None:
        """Every weights file named on the command line is what it claims, before anything loads.

        Reads headers only: a pickle renamed to .safetensors, a wrong layout or a truncated file
        is refused in one line instead of after a model load.
        """
        from pathlib import Path

        if self.is_tiny:
            if self.pulid is not None:
                raise SpatialIDError(
                    "--pulid has no effect with --model tiny (the tiny model builds its own random PuLID modules); "
                    "drop --pulid or use a real --model"
                )
            return
        if self.pulid is not None and Path(self.pulid).expanduser().is_file():
            from spatialid.models.checkpoint import config_from_metadata, read_safetensors_layout, validate_pulid_layout
            from spatialid.models.configs import PULID_FLUX

            path = Path(self.pulid).expanduser()
            shapes, dtypes, metadata = read_safetensors_layout(path)
            config = config_from_metadata(metadata) or PULID_FLUX
            validate_pulid_layout(shapes, config, dtypes=dtypes, metadata=metadata, source=str(path))
        model = Path(self.model).expanduser()
        if model.is_file() and model.suffix.lower() in (".safetensors", ".sft"):
            from spatialid.models.checkpoint import read_safetensors_layout

            read_safetensors_layout(model)  # refuses pickles, truncated files, non-safetensors
        gguf = str(self.quantize or "")
        for candidate in ([model] if model.suffix.lower() == ".gguf" else []) + (
            [Path(gguf.partition(":")[2]).expanduser()] if gguf.lower().startswith("gguf:") else []
        ):
            if candidate.is_file():
                with candidate.open("rb") as fh:
                    if fh.read(4) != b"GGUF":
                        raise SpatialIDError(f"{candidate} is not a GGUF file (no GGUF header); give a .gguf FLUX transformer")

    def _check_pipeline(self) -> None:
        _check_pipeline_files(self)

    def check(self) -> ModelSpec:
        """Everything that needs no model: quantization, offload mode, dtype name, and the device."""
        check_quantize(self.model, self.quantize)
        from spatialid.injection.step_cache import parse_cache

        parse_cache(self.cache)  # an unknown cache name fails before anything loads
        _check_local_model(self.model)
        _check_model_fits(self)
        self._check_files()
        self._check_pipeline()
        if self.offload not in OFFLOAD_MODES:
            raise SpatialIDError(f"unknown offload mode {self.offload!r}; use one of: {', '.join(OFFLOAD_MODES)}")
        if self.dtype not in DTYPE_NAMES:
            raise SpatialIDError(f"unknown dtype {self.dtype!r}; use one of: {', '.join(DTYPE_NAMES)}")
        device = resolve_device(self.device)
        if self.offload != "none" and not device.startswith("cuda"):
            raise SpatialIDError(f"--offload {self.offload} moves models between CPU and GPU; it needs --device cuda")
        return self


def _base_transformer_config(model: str) -> dict[str, Any] | None:
    """The FLUX transformer's sizes when known without loading it (tiny, or a local diffusers folder)."""
    import json
    from pathlib import Path

    if model in D.TINY_MODELS:
        from spatialid.models.configs import TINY_FLUX

        return {
            "num_attention_heads": TINY_FLUX.num_attention_heads, "attention_head_dim": TINY_FLUX.attention_head_dim,
            "joint_attention_dim": TINY_FLUX.joint_attention_dim, "pooled_projection_dim": TINY_FLUX.pooled_projection_dim,
            "in_channels": TINY_FLUX.latent_channels * 4,
        }
    config = Path(model).expanduser() / "transformer" / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
    except (OSError, ValueError):
        return None


def _check_pipeline_files(spec: ModelSpec) -> None:
    """The pipeline name, the LoRA files and a local ControlNet's sizes, before any model loads."""
    import json
    from pathlib import Path

    from spatialid.loaders.names import PIPELINE_CLASSES, pipeline_classes

    if spec.pipeline not in PIPELINE_CLASSES:
        raise SpatialIDError(f"unknown pipeline {spec.pipeline!r}; one of: {', '.join(PIPELINE_CLASSES)}")
    family = spec.family
    if spec.pipeline not in pipeline_classes(family):
        raise SpatialIDError(
            f"{spec.model} is a {family.capitalize()} model, which has no {spec.pipeline} pipeline; "
            f"it runs: {', '.join(pipeline_classes(family))}"
        )
    check_lora_files(spec.loras)
    if spec.pipeline == "controlnet":
        if not spec.controlnet:
            raise SpatialIDError("the ControlNet pipeline needs --controlnet ID")
        config_file = Path(spec.controlnet).expanduser() / "config.json"
        base = _base_transformer_config(spec.model)
        if config_file.is_file() and base is not None:
            from spatialid.loaders.names import controlnet_misfit

            problems = controlnet_misfit(json.loads(config_file.read_text(encoding="utf-8")), base)
            if problems:
                raise SpatialIDError(f"ControlNet {spec.controlnet} does not fit this FLUX transformer ({problems})")


def _check_local_model(model: str) -> None:
    """A ``--model`` that names a local path (absolute, ``./``, ``~``, a weights file) must exist:
    refused before the identity encoder or anything else loads."""
    from pathlib import Path

    if model in D.TINY_MODELS:
        return
    text = str(model)
    if text.startswith(("/", "./", "../", "~")) or Path(text).suffix.lower() in (".safetensors", ".sft", ".gguf"):
        path = Path(text).expanduser()
        if not path.exists():
            from spatialid.errors import ModelFilesMissingError
            from spatialid.pipeline.loading import flux_files_hint

            what = "FLUX file" if path.suffix else "FLUX folder"
            raise ModelFilesMissingError(f"{what} {path} does not exist; {flux_files_hint(D.DEFAULT_FLUX_MODEL)}")


@functools.lru_cache(maxsize=32)
def _model_family(model: str, local_files_only: bool | None, cache_dir: str | None) -> str:
    from spatialid.pipeline.loading import model_family

    return model_family(model, local_files_only=local_files_only, cache_dir=cache_dir)


def _check_model_fits(spec: ModelSpec) -> None:
    """The pipeline family is known (other models refused) and the transformer fits the PuLID weights."""
    if spec.family == "chroma" and str(spec.cache or "").lower().startswith("fbc"):  # also refuses FLUX.2, ...
        raise SpatialIDError("--cache fbc: diffusers' First Block Cache does not support Chroma's transformer blocks; "
                             "use --cache taylorseer or --cache pab")
    if not spec.is_tiny:
        from spatialid.pipeline.loading import check_transformer_fits

        check_transformer_fits(spec.model, spec.pulid, local_files_only=spec.local_files_only, cache_dir=spec.cache_dir)


# ----------------------------------------------------------------------------- loading once


class Models:
    """The models of one process, built on first use and kept (each weight file read once).

    ``encoder()`` and ``pipeline()`` share the PuLID-FLUX modules: the checkpoint is read once and
    its IDFormer serves both. Call :meth:`release_encoder` to free the encoder's own weights (face
    models, EVA) once no more photos will be encoded, as ``spatialid generate`` does before the
    denoising loop.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._device: str | None = None
        self._dtype: Any = None
        self._pulid: tuple[Any, Any] | None = None
        self._encoder: Any = None
        self._pipeline: Any = None
        self.step_cache: Any = None  # the StepCache of --cache, once the pipeline is built

    # -------------------------------------------------------------- placement
    @property
    def device(self) -> str:
        if self._device is None:
            self._device = resolve_device(self.spec.device)
        return self._device

    @property
    def dtype(self) -> Any:
        if self._dtype is None:
            self._dtype = resolve_dtype(self.spec.dtype, self.device)
        return self._dtype

    # -------------------------------------------------------------- parts
    def pulid_modules(self) -> tuple[Any, Any]:
        """``(idformer, ca_modules)`` of the PuLID-FLUX checkpoint (tiny: the tiny random modules)."""
        if self._pulid is None:
            if self.spec.is_tiny:
                from spatialid.encoder.identity_encoder import tiny_pulid_modules

                idformer, cas = tiny_pulid_modules(self.spec.tiny_seed)
                idformer.to(dtype=self.dtype)
            else:
                from spatialid.models.checkpoint import load_pulid_checkpoint

                log.info("loading PuLID-FLUX weights %s ...", self.spec.pulid or D.PULID_REPO_ID)
                idformer, cas = load_pulid_checkpoint(
                    self._pulid_source(),
                    dtype=self.dtype,
                    config=None,  # the sizes the file records, else the published ones
                    cache_dir=self.spec.cache_dir,
                    local_files_only=self.spec.local_files_only,
                )
            self._pulid = (idformer, cas)
        return self._pulid

    def _pulid_source(self) -> Any:
        """``--pulid``, else the offline layout's ``pulid/`` file when present, else the hub repo."""
        if self.spec.pulid is not None:
            return self.spec.pulid
        from pathlib import Path

        from spatialid.encoder.model_files import default_models_dir

        root = default_models_dir() if self.spec.models_dir is None else Path(self.spec.models_dir).expanduser()
        local = root / "pulid" / D.PULID_FILENAME
        return local if local.is_file() else None

    def encoder(self) -> Any:
        """The identity encoder (real: insightface/facexlib + EVA + the checkpoint's IDFormer)."""
        if self._encoder is None:
            from spatialid.encoder.identity_encoder import IdentityEncoder

            if self.spec.is_tiny:
                self._encoder = IdentityEncoder.tiny(
                    idformer=self.pulid_modules()[0], seed=self.spec.tiny_seed, device=self.device, dtype=self.dtype
                )
            else:
                self._encoder = IdentityEncoder.from_pretrained(
                    lambda: self.pulid_modules()[0],  # read with the CA modules, once
                    eva=self.spec.eva,
                    models_dir=self.spec.models_dir,
                    cache_dir=self.spec.cache_dir,
                    local_files_only=self.spec.local_files_only,
                    face_backend=self.spec.face_backend,
                    device=self.device,
                    dtype=self.dtype,
                )
        return self._encoder

    def release_encoder(self) -> None:
        """Free the encoder's face and EVA weights (the shared IDFormer stays with the pipeline)."""
        if self._encoder is None:
            return
        if self._pipeline is not None and getattr(self._pipeline, "_identity_encoder", None) is self._encoder:
            self._pipeline._identity_encoder = None
        if self.spec.offload != "none":
            self._encoder.to(device="cpu")  # the shared IDFormer waits on the CPU under offloading
        self._encoder = None
        gc.collect()
        _empty_cuda_cache()

    def pipeline(self) -> Any:
        """The :class:`~spatialid.pipeline.SpatialIDPipeline`, on the device in the memory mode asked for
        (another FLUX.1 pipeline of ``spec.pipeline`` on its components, with the spec's LoRAs)."""
        if self._pipeline is None:
            self._pipeline = self._with_pipeline_mode(self._build_pipeline())
        return self._pipeline

    def _with_pipeline_mode(self, base: Any) -> Any:
        """LoRAs on the shared transformer, then the diffusers pipeline of ``spec.pipeline`` on the same
        components (weights read once) behind an :class:`~spatialid.pipeline.variants.IdentityPipelineRunner`."""
        spec = self.spec
        if spec.loras:
            from spatialid.pipeline.variants import load_loras

            log.info("loading LoRA(s) %s ...", ", ".join(spec.loras))
            load_loras(base, spec.loras, **({"cache_dir": spec.cache_dir} if spec.cache_dir else {}),
                       local_files_only=bool(spec.local_files_only))
        if getattr(base, "family", "flux") == "chroma":
            return self._chroma_mode(base)
        if spec.pipeline == "text2image":
            return base
        from spatialid.pipeline.variants import (
            IdentityPipelineRunner,
            check_controlnet_fits,
            load_controlnet,
            variant_pipeline,
        )

        controlnet = None
        if spec.pipeline == "controlnet":
            controlnet = load_controlnet(
                spec.controlnet, torch_dtype=self.dtype, local_files_only=spec.local_files_only, cache_dir=spec.cache_dir
            )
            check_controlnet_fits(controlnet.config, base.transformer.config, spec.controlnet)
            controlnet.to(self.device)
        pipe = variant_pipeline(base, spec.pipeline, controlnet)
        if spec.offload != "none":
            # the variant's own offload hooks (its ControlNet included); the CA modules stay on the device
            pipe.remove_all_hooks()
            getattr(pipe, f"enable_{spec.offload}_cpu_offload")(device=self.device)
            pipe._spatialid_pulid.ca_modules.to(self.device)  # the CA modules stay on the device
        return IdentityPipelineRunner(pipe, base, spec.pipeline)

    def _chroma_mode(self, base: Any) -> Any:
        """Chroma's pipeline of ``spec.pipeline`` (text-to-image: the base's own) behind its runner."""
        from spatialid.pipeline.variants import IdentityPipelineRunner, variant_pipeline

        if self.spec.pipeline == "text2image":
            return IdentityPipelineRunner(base.pipe, base, "text2image")
        pipe = variant_pipeline(base, self.spec.pipeline)
        if self.spec.offload != "none":
            pipe.remove_all_hooks()
            getattr(pipe, f"enable_{self.spec.offload}_cpu_offload")(device=self.device)
            pipe._spatialid_pulid.ca_modules.to(self.device)
        return IdentityPipelineRunner(pipe, base, self.spec.pipeline)

    def _build_pipeline(self) -> Any:
        from spatialid.pipeline.pipeline_spatialid import SpatialIDPipeline

        spec = self.spec.check()
        quiet_third_party_logs()
        if spec.family == "chroma":
            from spatialid.pipeline.chroma import ChromaIdentityPipeline

            if spec.is_tiny:
                pipe = ChromaIdentityPipeline.tiny(
                    seed=spec.tiny_seed, dtype=self.dtype, pulid_modules=self.pulid_modules(),
                    identity_encoder_factory=self.encoder,
                )
            else:
                log.info("loading %s ...", spec.model)
                pipe = ChromaIdentityPipeline.from_pretrained(
                    spec.model, pulid_modules=self.pulid_modules, torch_dtype=self.dtype,
                    quantization=None if spec.quantize in (None, "none") else spec.quantize,
                    identity_encoder_factory=self.encoder, local_files_only=spec.local_files_only,
                    cache_dir=spec.cache_dir, pulid_source=spec.pulid,
                )
        elif spec.is_tiny:
            pipe = SpatialIDPipeline.tiny(
                seed=spec.tiny_seed,
                dtype=self.dtype,
                pulid_modules=self.pulid_modules(),
                identity_encoder_factory=self.encoder,
            )
        else:
            log.info("loading %s ...", spec.model)
            pipe = SpatialIDPipeline.from_pretrained(
                spec.model,
                spec.pulid,
                torch_dtype=self.dtype,
                quantization=None if spec.quantize in (None, "none") else spec.quantize,
                pulid_modules=self.pulid_modules,  # read after FLUX: a wrong --model fails first
                identity_encoder_factory=self.encoder,
                local_files_only=spec.local_files_only,
                cache_dir=spec.cache_dir,
            )
        if spec.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif spec.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        if spec.cache not in (None, "none"):
            from spatialid.injection.step_cache import enable_step_cache

            # before compiling: the cache's hooks are part of what gets traced
            self.step_cache = enable_step_cache(
                pipe.transformer, pipe.injector, spec.cache, current_timestep=lambda: pipe.current_timestep
            )
        if spec.compile:
            # First Block Cache decides on the host by design (a graph break of diffusers' own);
            # without it the identity hooks trace into one graph.
            compile_transformer(pipe.transformer, fullgraph=spec.cache in (None, "none"))
        return pipe


def compile_transformer(transformer: Any, *, fullgraph: bool = True, backend: str | None = None, mode: str | None = None) -> Any:
    """``torch.compile`` the transformer in place, its forward hooks (the identity injection) included.

    In place (``nn.Module.compile``), so the pipeline keeps the same module, its ``cache_context``
    and its config. ``fullgraph=True`` turns a graph break into an error instead of a silent
    slowdown (a step cache's decision is a host read by design, so it compiles with breaks).
    ``SPATIALID_COMPILE_BACKEND`` overrides the backend (``eager``/``aot_eager`` to debug).
    Graphs: one per schedule structure, CFG branch and resolution; weights, identities, seeds and
    steps reuse them. The recompile limit is raised so that switching presets and sizes in one
    process (the web UI) keeps compiling instead of falling back to eager after 8 graphs.
    """
    import os

    import torch

    backend = backend or os.environ.get("SPATIALID_COMPILE_BACKEND", "inductor")
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    transformer.compile(backend=backend, mode=mode, fullgraph=fullgraph)
    # nn.Module.compile keeps the compiled callable here; wrapped so that a compile or kernel error
    # (a path that has only ever run on a CPU meeting a GPU backend) runs the step eagerly instead.
    transformer._compiled_call_impl = _EagerFallback(transformer, transformer._compiled_call_impl)
    return transformer


class _EagerFallback:
    """The compiled transformer call; on a compile/kernel error: one warning, then eager from there on."""

    def __init__(self, module: Any, compiled: Any) -> None:
        self.module = module
        self.compiled = compiled
        self.failed: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return self.module._call_impl(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - dynamo, inductor and kernel errors have many types
            import torch

            from spatialid.errors import SpatialIDError

            if isinstance(exc, (SpatialIDError, torch.cuda.OutOfMemoryError, torch._dynamo.exc.RecompileError)):
                raise  # ours, out of memory, or error_on_recompile (a debugging switch): not compile failures
            self.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            import warnings

            warnings.warn(
                f"--compile: the compiled transformer failed ({self.failed}); continuing without compilation",
                RuntimeWarning,
                stacklevel=2,
            )
            log.warning("compiled transformer failed; falling back to eager: %s", self.failed)
            return self.module._call_impl(*args, **kwargs)


def load_pipeline(spec: ModelSpec) -> Any:
    """The pipeline of ``spec`` (a :class:`Models` of its own; use ``Models`` to share weights)."""
    return Models(spec).pipeline()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
