"""Loading FLUX.1 weights: hub ids or local folders, single files, quantized transformers, offline errors.

What users of PuLID-FLUX run, mapped onto what diffusers supports:

* a diffusers-layout repository or folder (``black-forest-labs/FLUX.1-dev``, ``FLUX.1-Krea-dev``
  and other FLUX.1 derivatives with the same transformer) -> :meth:`FluxPipeline.from_pretrained`;
* a single transformer file (``flux1-dev.safetensors`` in BFL's original layout, or a ``.gguf``)
  -> :meth:`FluxTransformer2DModel.from_single_file`, the other components from a base repository;
* a quantized transformer: ``nf4`` / ``int8`` (bitsandbytes), ``torchao-int8`` / ``torchao-fp8``
  (torchao weight-only), or ``gguf:<file>`` (pre-quantized GGUF, e.g. city96's FLUX.1-dev-gguf).

Every "the weights are not here and we may not download them" failure becomes one
:class:`~spatialid.errors.ModelFilesMissingError` naming the model id, the files and how to place
them for offline use; a missing optional package becomes :class:`MissingDependencyError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spatialid.defaults import DEFAULT_FLUX_MODEL
from spatialid.errors import ModelFilesMissingError, SpatialIDError
from spatialid.utils.offline import is_offline

if TYPE_CHECKING:  # pragma: no cover - torch stays out of the CLI's argument checks
    from torch import nn

    from spatialid.models.pulid_flux import PuLIDFluxModel

__all__ = [
    "DEFAULT_FLUX",
    "QUANTIZATION_MODES",
    "MissingDependencyError",
    "check_transformer_fits",
    "chroma_files_hint",
    "flux_files_hint",
    "hub_errors",
    "is_single_file",
    "load_flux_transformer",
    "model_family",
    "model_json",
    "parse_quantization",
    "resolve_local_files_only",
    "saved_pulid_folder",
    "tiny_pulid_modules",
    "wrap_pulid_modules",
]

DEFAULT_FLUX = DEFAULT_FLUX_MODEL  # re-exported for callers of this module
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".gguf")

# mode -> (package to import, what it is, approx. transformer weight size for FLUX.1-dev)
QUANTIZATION_MODES: dict[str, tuple[str, str, str]] = {
    "nf4": ("bitsandbytes", "bitsandbytes 4-bit NF4 (compute in the pipeline dtype)", "~6.7 GB"),
    "int8": ("bitsandbytes", "bitsandbytes LLM.int8 8-bit", "~12 GB"),
    "torchao-int8": ("torchao", "torchao int8 weight-only", "~12 GB"),
    "torchao-fp8": ("torchao", "torchao float8 weight-only (Ada/Hopper GPUs)", "~12 GB"),
    "gguf": ("gguf", "pre-quantized GGUF file, gguf:<path or repo/file.gguf> (Q8_0 ~12.7 GB, Q4_K_S ~6.8 GB)", "file size"),
}


class MissingDependencyError(SpatialIDError, ImportError):
    """An optional package needed for the requested mode is not installed."""


def resolve_local_files_only(local_files_only: bool | None) -> bool:
    """``None`` follows the one offline rule of :func:`spatialid.utils.offline.is_offline`."""
    return is_offline(local_files_only)


def pipeline_dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``DiffusionPipeline.from_pretrained`` renamed ``torch_dtype`` to ``dtype`` in recent releases;
    pass whichever this diffusers understands without a deprecation warning."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:  # pragma: no cover
        return {"torch_dtype": dtype}
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def is_single_file(source: str | os.PathLike[str]) -> bool:
    return str(source).lower().endswith(SINGLE_FILE_SUFFIXES)


def flux_files_hint(flux: str) -> str:
    """How to make FLUX weights available offline (one sentence, for error messages)."""
    return (
        f"download them on a connected machine with `hf download {flux}` (FLUX.1-dev is gated: accept its "
        f"licence on https://huggingface.co/{flux} and log in first) and copy the Hugging Face cache "
        "(~/.cache/huggingface/hub or $HF_HOME) here, or pass --model with a local folder in diffusers "
        "layout (model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
        "tokenizer_2/, scheduler/)"
    )


def chroma_files_hint(model: str) -> str:
    """How to make a Chroma model available offline (one sentence, for error messages)."""
    return (
        f"download it on a connected machine with `hf download {model}` and copy the Hugging Face cache "
        "(~/.cache/huggingface/hub or $HF_HOME) here, or pass --model with a local folder in diffusers "
        "layout (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)"
    )


def model_json(
    model: str, filename: str, *, local_files_only: bool | None = None, cache_dir: Any = None
) -> dict[str, Any] | None:
    """A small JSON file of a diffusers model (``model_index.json``, ``transformer/config.json``):
    from a local folder, or that one file of a hub repository (from the cache when offline).

    None when it cannot be had: the model's own loading then says what is missing. Read before any
    weights load, so the pipeline family is known and a misfit refused first.
    """
    import json

    text = str(model)
    root = Path(text).expanduser()
    path: Path | str | None = None
    if root.is_dir():
        path = root / filename
    elif not is_single_file(text) and text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(
                text, filename, cache_dir=cache_dir, local_files_only=resolve_local_files_only(local_files_only)
            )
        except Exception:  # noqa: BLE001 - not cached, offline, no such repo or file, gated: the load reports it
            return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8")) if path is not None and Path(path).is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_family(model: str, *, local_files_only: bool | None = None, cache_dir: Any = None) -> str:
    """``"flux"`` or ``"chroma"``: the pipeline family of ``--model``, from ``model_index.json``'s ``_class_name``.

    ``tiny``/``tiny-chroma`` by name; a single transformer file and a model whose index cannot be read
    are FLUX.1 (its loading reports missing files). Any other pipeline class (FLUX.2, Qwen-Image,
    ...) is refused here, before any weights load, in one line naming the transformer shapes that
    differ from what the PuLID-FLUX weights need (read from its ``transformer/config.json``).
    """
    from spatialid import defaults as D
    from spatialid.loaders.names import family_of_class, transformer_misfit

    if model == D.TINY_CHROMA_MODEL:
        return "chroma"
    if model == D.TINY_MODEL or is_single_file(model):
        return "flux"
    index = model_json(model, "model_index.json", local_files_only=local_files_only, cache_dir=cache_dir)
    if index is None:
        return "flux"
    class_name = str(index.get("_class_name") or "")
    family = family_of_class(class_name)
    if family is not None:
        return family
    config = model_json(model, "transformer/config.json", local_files_only=local_files_only, cache_dir=cache_dir)
    misfit = transformer_misfit(config) if config else ""
    why = f"its transformer does not fit the PuLID-FLUX weights: {misfit}" if misfit else "not a FLUX.1 or Chroma pipeline"
    raise SpatialIDError(
        f"--model {model} is a {class_name or 'model without a pipeline class'} ({why}); "
        "spatialid runs FLUX.1 (dev, Krea-dev, schnell, ...) and Chroma models"
    )


def check_transformer_fits(
    model: str, pulid: str | None, *, local_files_only: bool | None = None, cache_dir: Any = None
) -> None:
    """Refuse, before any weights load, a FLUX.1 or Chroma model whose transformer (its ``config.json``)
    does not fit the PuLID weights that will load: the published sizes, or a ``--pulid`` file's
    recorded ones (a saved SpatialIDPipeline folder's own ``pulid/`` was made for its transformer)."""
    from spatialid.loaders.names import transformer_misfit
    from spatialid.models.configs import PULID_FLUX

    if pulid is not None and not Path(pulid).expanduser().is_file():
        return  # a hub id or folder: its sizes are known when it loads
    if pulid is None and saved_pulid_folder(model) is not None:
        return
    config = model_json(model, "transformer/config.json", local_files_only=local_files_only, cache_dir=cache_dir)
    if config is None:
        return
    sizes = PULID_FLUX
    if pulid is not None:
        from spatialid.models.checkpoint import config_from_metadata, read_safetensors_layout

        sizes = config_from_metadata(read_safetensors_layout(Path(pulid).expanduser())[2]) or PULID_FLUX
    misfit = transformer_misfit(config, ca_dim=sizes.ca.dim, num_ca=sizes.num_ca,
                                double_interval=sizes.double_interval, single_interval=sizes.single_interval)
    if misfit:
        raise SpatialIDError(f"the transformer of {model} does not fit the PuLID weights ({misfit})")


def _is_missing_files_error(exc: BaseException) -> bool:
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover - very old huggingface_hub
        LocalEntryNotFoundError = OfflineModeIsEnabled = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return True
    text = str(exc).lower()
    markers = (
        "not fully cached",
        "cannot find an appropriate cached snapshot",
        "outgoing traffic has been disabled",
        "couldn't connect",
        "could not connect",
        "connection error",
        "offline",
        "is not a local folder and is not a valid model identifier",
        "neither a valid local path nor a valid repo id",
        "does not appear to have a file named",
        "no such file or directory",
    )
    return isinstance(exc, (OSError, ValueError)) and any(m in text for m in markers)


@contextlib.contextmanager
def hub_errors(what: str, model_id: str, hint: str) -> Iterator[None]:
    """Turn diffusers/huggingface_hub "files not available" errors into one ModelFilesMissingError."""
    try:
        yield
    except SpatialIDError:
        raise
    except Exception as exc:
        if isinstance(exc, ImportError):
            raise
        if _is_missing_files_error(exc):
            reason = " ".join(str(exc).split())
            if len(reason) > 160:
                reason = reason[:157] + "..."
            raise ModelFilesMissingError(
                f"{what} {model_id!r} is not available locally and cannot be downloaded ({reason}); {hint}"
            ) from exc
        raise


def parse_quantization(spec: str | None) -> tuple[str | None, str | None]:
    """``"nf4"`` -> ``("nf4", None)``; ``"gguf:path.gguf"`` -> ``("gguf", "path.gguf")``; None/"none" -> (None, None)."""
    if spec is None or str(spec).strip().lower() in {"", "none", "off", "bf16", "fp16"}:
        return None, None
    text = str(spec).strip()
    mode, _, arg = text.partition(":")
    mode = mode.lower()
    if mode not in QUANTIZATION_MODES:
        raise SpatialIDError(
            f"unknown quantization {spec!r}; choose one of: none, {', '.join(m if m != 'gguf' else 'gguf:FILE' for m in QUANTIZATION_MODES)}"
        )
    if mode == "gguf" and not arg:
        raise SpatialIDError("gguf quantization needs a file: --quantize gguf:flux1-dev-Q8_0.gguf (or repo/file.gguf)")
    if mode != "gguf" and arg:
        raise SpatialIDError(f"quantization {mode!r} takes no argument, got {spec!r}")
    return mode, arg or None


def _require(package: str, mode: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise MissingDependencyError(
            f"quantization {mode!r} needs the {package!r} package; install it with pip install 'spatialid[quant]'"
        )


def _gguf_local_path(arg: str, *, cache_dir: Any, local_files_only: bool) -> str:
    """A local .gguf path, a URL, or ``owner/repo/file.gguf`` fetched with huggingface_hub."""
    if arg.startswith(("http://", "https://")) or Path(arg).expanduser().exists():
        return str(Path(arg).expanduser()) if not arg.startswith("http") else arg
    parts = arg.split("/")
    if len(parts) < 3:
        raise ModelFilesMissingError(f"GGUF file {arg!r} not found; give a local path or owner/repo/file.gguf")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    with hub_errors(
        "GGUF file",
        arg,
        f"download it with `hf download {repo_id} {filename}` and pass the local path to --quantize gguf:PATH",
    ):
        return hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=local_files_only)


def load_flux_transformer(
    flux: str = DEFAULT_FLUX,
    quantization: str | None = None,
    *,
    torch_dtype: Any = None,
    single_file: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
    transformer_class: Any = None,
) -> Any:
    """Load a (possibly quantized) ``FluxTransformer2DModel`` (or ``transformer_class``: Chroma's).

    Args:
        flux: diffusers-layout repo id or folder providing the transformer config (and weights
            unless ``single_file`` or a GGUF is given).
        quantization: None, ``"nf4"``, ``"int8"``, ``"torchao-int8"``, ``"torchao-fp8"`` or
            ``"gguf:<file>"`` (see :data:`QUANTIZATION_MODES`).
        torch_dtype: compute dtype (bfloat16 recommended on GPUs).
        single_file: a BFL-layout ``.safetensors`` transformer file to load instead of ``flux``'s.

    Peak memory of the transformer alone (FLUX.1-dev, 12B parameters): bf16 ~23.8 GB, int8 ~12 GB,
    NF4 ~6.7 GB, GGUF as its file; activations at 1024x1024 add ~1-3 GB.
    """
    import torch
    from diffusers import FluxTransformer2DModel

    model_cls = transformer_class or FluxTransformer2DModel  # the same loading for Chroma's transformer
    dtype = torch_dtype if torch_dtype is not None else torch.bfloat16
    offline = resolve_local_files_only(local_files_only)
    mode, arg = parse_quantization(quantization)
    common: dict[str, Any] = {"torch_dtype": dtype, "cache_dir": cache_dir, "local_files_only": offline}
    hint = flux_files_hint(flux)

    if mode == "gguf":
        _require("gguf", mode)
        from diffusers import GGUFQuantizationConfig

        path = _gguf_local_path(arg or "", cache_dir=cache_dir, local_files_only=offline)
        with hub_errors("FLUX transformer config of", flux, hint):
            return model_cls.from_single_file(
                path,
                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                config=flux,
                subfolder="transformer",
                **common,
            )

    quant_config = None
    if mode in ("nf4", "int8"):
        _require("bitsandbytes", mode)
        from diffusers import BitsAndBytesConfig

        if mode == "nf4":
            quant_config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
        else:
            quant_config = BitsAndBytesConfig(load_in_8bit=True)
    elif mode in ("torchao-int8", "torchao-fp8"):
        _require("torchao", mode)
        quant_config = _torchao_config(mode)

    if single_file is not None:
        with hub_errors("FLUX transformer config of", flux, hint):
            return model_cls.from_single_file(
                single_file,
                config=flux,
                subfolder="transformer",
                **({"quantization_config": quant_config} if quant_config is not None else {}),
                **common,
            )
    with hub_errors("FLUX transformer", flux, hint):
        return model_cls.from_pretrained(
            flux,
            subfolder="transformer",
            revision=revision,
            **({"quantization_config": quant_config} if quant_config is not None else {}),
            **common,
        )


def _torchao_config(mode: str) -> Any:
    """diffusers >= 0.36 wants an ``AOBaseConfig`` object; older releases a string quant type."""
    from diffusers import TorchAoConfig

    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        obj = Int8WeightOnlyConfig() if mode == "torchao-int8" else Float8WeightOnlyConfig()
        return TorchAoConfig(obj)
    except (ImportError, TypeError, ValueError):
        return TorchAoConfig("int8wo" if mode == "torchao-int8" else "float8wo")


def tiny_pulid_modules(seed: int) -> tuple[nn.Module, nn.ModuleList]:
    """Tiny IDFormer + CA modules, the same ones the identity encoder's tiny configuration uses."""
    from spatialid.encoder.identity_encoder import tiny_pulid_modules

    return tiny_pulid_modules(seed)


def wrap_pulid_modules(
    idformer: nn.Module | None, ca_modules: Sequence[nn.Module], double_interval: int, single_interval: int
) -> PuLIDFluxModel:
    """A :class:`PuLIDFluxModel` holding ``idformer`` and ``ca_modules`` themselves (no tensor copied).

    The container is built on the "meta" device (nothing allocated) with the sizes the modules
    report, then its ``pulid_encoder`` / ``pulid_ca`` are replaced by the given modules, so its
    ``state_dict`` and config describe exactly what is attached. Without an IDFormer,
    ``pulid_encoder`` is None (the config then records the published IDFormer size).
    """
    from torch import nn

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


def saved_pulid_folder(flux: str) -> Path | None:
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

