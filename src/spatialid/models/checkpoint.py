"""Loading and saving PuLID-FLUX weights (``pulid_flux_v0.9.x.safetensors``).

The published file holds an IDFormer under ``pulid_encoder.`` and ``num_ca`` (20) identity
cross-attention modules under ``pulid_ca.<i>.``. Loading checks the file's header against the
layout our modules expect *before* allocating ~570M parameters, so a wrong or damaged file fails
in milliseconds with a message naming the offending tensors (or the kind of file it really is).
Only safetensors files are read: pickles (``.bin``/``.pt``/``.ckpt``) can execute code on load and
are refused without being opened by a deserialiser.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from spatialid.defaults import PULID_FILENAME, PULID_REPO_ID
from spatialid.errors import CheckpointError, ModelFilesMissingError
from spatialid.utils.io import atomic_path
from spatialid.utils.weights import sniff_safetensors
from spatialid.utils.offline import is_offline
from spatialid.models.configs import PULID_FLUX, TINY_PULID, PuLIDFluxConfig
from spatialid.models.idformer import IDFormer
from spatialid.models.perceiver_ca import PerceiverAttentionCA
from spatialid.models.pulid_flux import PuLIDFluxModel

__all__ = [
    "DEFAULT_REPO_ID",
    "DEFAULT_FILENAME",
    "ENCODER_PREFIX",
    "CA_PREFIX",
    "build_pulid_model",
    "build_pulid_modules",
    "expected_pulid_layout",
    "read_safetensors_layout",
    "validate_pulid_layout",
    "resolve_pulid_checkpoint",
    "load_pulid_model",
    "load_pulid_checkpoint",
    "save_pulid_checkpoint",
]

DEFAULT_REPO_ID = PULID_REPO_ID
DEFAULT_FILENAME = PULID_FILENAME
ENCODER_PREFIX = "pulid_encoder."
CA_PREFIX = "pulid_ca."
_CONFIG_METADATA_KEY = "spatialid.config"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".pkl", ".pickle", ".sft")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_SDXL_MARKERS = ("id_adapter.", "id_adapter_attn_layers.")
_FLUX_MARKERS = (
    "double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks.",
    "model.diffusion_model.",
)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_SHOW = 5  # names listed per category in error messages

Layout = dict[str, tuple[int, ...]]


def _download_cmd(repo_id: str = DEFAULT_REPO_ID, filename: str = DEFAULT_FILENAME, cache_dir: object = None) -> str:
    """The shell command that fetches the file (``hf`` since huggingface_hub 1.0, before: huggingface-cli)."""
    extra = f" --cache-dir {cache_dir}" if cache_dir is not None else ""
    args = f"download {repo_id} {filename}{extra}"
    return f"`hf {args}` (older huggingface_hub: `huggingface-cli {args}`)"


# ----------------------------------------------------------------------------- expected layout


def build_pulid_model(
    config: PuLIDFluxConfig = PULID_FLUX,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PuLIDFluxModel:
    """Build a randomly initialised :class:`PuLIDFluxModel` (``device="meta"`` allocates nothing).

    The IDFormer is created first, then the CA modules in order, so a given random state always
    gives the same weights (the tiny preset's images depend on it).
    """
    _check_config(config)
    with torch.device(device if device is not None else "cpu"):
        model = PuLIDFluxModel.from_pulid_config(config)
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def build_pulid_modules(
    config: PuLIDFluxConfig = PULID_FLUX,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[IDFormer, nn.ModuleList]:
    """Build randomly initialised ``(idformer, ca_modules)`` of ``config`` (``device="meta"`` allocates nothing)."""
    model = build_pulid_model(config, device=device, dtype=dtype)
    return model.pulid_encoder, model.pulid_ca


@functools.lru_cache(maxsize=8)
def _expected_layout_cached(config: PuLIDFluxConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # The container's own names are the checkpoint's names (pulid_encoder.*, pulid_ca.<i>.*).
    model = build_pulid_model(config, device="meta")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def expected_pulid_layout(config: PuLIDFluxConfig = PULID_FLUX) -> Layout:
    """Tensor name -> shape of a checkpoint for ``config`` (computed on the meta device)."""
    _check_config(config)
    return dict(_expected_layout_cached(config))


def _check_config(config: object) -> None:
    if not isinstance(config, PuLIDFluxConfig):
        raise TypeError(f"config must be a PuLIDFluxConfig, got {type(config).__name__}")
    if config.num_ca < 1:
        raise ValueError(f"config.num_ca must be at least 1, got {config.num_ca}")


# ----------------------------------------------------------------------------- reading headers


def _sniff(path: Path) -> None:
    """Refuse files that are not safetensors by their first bytes (see :func:`sniff_safetensors`)."""
    sniff_safetensors(path, f"use the official safetensors file ({_download_cmd()})")


def read_safetensors_layout(path: str | os.PathLike) -> tuple[Layout, dict[str, str], dict[str, str]]:
    """Read only the header of a safetensors file: (name -> shape, name -> dtype, metadata).

    Raises :class:`CheckpointError` for a missing, non-safetensors, pickled or truncated file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes: Layout = {}
            dtypes: dict[str, str] = {}
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = tuple(int(s) for s in sl.get_shape())
                get_dtype = getattr(sl, "get_dtype", None)  # absent in old safetensors releases
                dtypes[key] = str(get_dtype()) if get_dtype is not None else "F32"
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({reason}); it may be truncated or corrupt: "
            f"re-download it ({_download_cmd()})"
        ) from exc
    return shapes, dtypes, metadata


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def config_from_metadata(metadata: Mapping[str, str]) -> PuLIDFluxConfig | None:
    """The configuration a file written by :func:`save_pulid_checkpoint` records, or None."""
    from spatialid.models.configs import IDFormerConfig, PerceiverCAConfig

    raw = metadata.get(_CONFIG_METADATA_KEY)
    if not raw:
        return None
    try:
        saved = json.loads(raw)
        idf = dict(saved["idformer"])
        idf.setdefault("mapping_dim", idf["dim"])  # files from before mapping_dim: dim was the width
        return PuLIDFluxConfig(
            idformer=IDFormerConfig(**idf), ca=PerceiverCAConfig(**saved["ca"]), num_ca=int(saved["num_ca"])
        )
    except (ValueError, KeyError, TypeError):
        return None


def _config_hint(metadata: Mapping[str, str], config: PuLIDFluxConfig) -> str:
    """If the file says which configuration wrote it, tell the user which one to pass."""
    raw = metadata.get(_CONFIG_METADATA_KEY)
    if not raw:
        return ""
    try:
        saved = json.loads(raw)
    except ValueError:
        return ""
    idf = saved.get("idformer") if isinstance(saved, dict) else None
    if isinstance(idf, dict) and "mapping_dim" not in idf and "dim" in idf:
        # Files written before mapping_dim existed used dim as the MLPs' hidden width.
        saved = {**saved, "idformer": {**idf, "mapping_dim": idf["dim"]}}
    if saved == _saved_config_dict(TINY_PULID) and config != TINY_PULID:
        return "; the file was written for the tiny configuration: pass config=spatialid.models.TINY_PULID"
    if saved == _saved_config_dict(PULID_FLUX) and config != PULID_FLUX:
        return "; the file was written for the full configuration: pass config=spatialid.models.PULID_FLUX"
    return f"; the file was written with configuration {raw}: pass a PuLIDFluxConfig with those sizes"


def validate_pulid_layout(
    shapes: Mapping[str, tuple[int, ...]],
    config: PuLIDFluxConfig = PULID_FLUX,
    *,
    dtypes: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    source: str = "checkpoint",
) -> None:
    """Raise :class:`CheckpointError` unless ``shapes`` is exactly the layout of ``config``.

    Recognises common wrong files (SDXL PuLID, FLUX transformer weights, a bare IDFormer
    state_dict) before listing missing / unexpected / mis-shaped tensors.
    """
    keys = list(shapes)
    if not keys:
        raise CheckpointError(f"{source} contains no tensors; expected PuLID-FLUX weights ({DEFAULT_FILENAME})")
    ours = [k for k in keys if k.startswith((ENCODER_PREFIX, CA_PREFIX))]
    if not ours:
        fix = f"use {DEFAULT_FILENAME} from {DEFAULT_REPO_ID}"
        if any(k.startswith(_SDXL_MARKERS) for k in keys):
            raise CheckpointError(
                f"{source} is a PuLID checkpoint for SDXL (tensors 'id_adapter.*'), not for FLUX: {fix}"
            )
        if any(k.startswith(_FLUX_MARKERS) for k in keys):
            raise CheckpointError(
                f"{source} holds FLUX transformer weights (tensors like 'double_blocks.*' / "
                f"'transformer_blocks.*'), not the PuLID-FLUX identity modules: {fix}"
            )
        if "latents" in shapes and "proj_out" in shapes:
            raise CheckpointError(
                f"{source} looks like a bare IDFormer state_dict without the '{ENCODER_PREFIX}' prefix "
                f"and without CA modules; write files with spatialid.models.save_pulid_checkpoint"
            )
        raise CheckpointError(
            f"{source} is not a PuLID-FLUX checkpoint: no '{ENCODER_PREFIX}*' or '{CA_PREFIX}*' tensors "
            f"(it has {len(keys)} tensors such as {_names(keys)}): {fix}"
        )

    expected = expected_pulid_layout(config)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in keys if k not in expected]
    misshaped = [
        f"{k} {list(shapes[k])} (expected {list(expected[k])})"
        for k in keys
        if k in expected and tuple(shapes[k]) != expected[k]
    ]
    bad_dtype = [
        f"{k} {dtypes[k]}" for k in keys if dtypes is not None and k in expected and dtypes[k] not in _FLOAT_DTYPES
    ]
    if not (missing or unexpected or misshaped or bad_dtype):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
    if misshaped:
        parts.append(f"{len(misshaped)} mis-shaped: {_names(misshaped)}")
    if bad_dtype:
        parts.append(f"{len(bad_dtype)} not floating point: {_names(bad_dtype)}")
    n_ca_file = len({k.split(".")[1] for k in keys if k.startswith(CA_PREFIX)})
    hint = ""
    if n_ca_file != config.num_ca:
        hint = f"; the file has {n_ca_file} CA modules, the configuration expects {config.num_ca}"
    hint += _config_hint(metadata or {}, config)
    raise CheckpointError(
        f"{source} does not match the PuLID-FLUX layout ({len(expected)} tensors): " + "; ".join(parts) + hint
    )


# ----------------------------------------------------------------------------- locating the file


def _looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID_RE.match(text)) and not text.lower().endswith(_WEIGHT_SUFFIXES)


def resolve_pulid_checkpoint(
    path_or_repo_id: str | os.PathLike | None = None,
    filename: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> Path:
    """Return the local path of the checkpoint: a file, ``folder/filename``, or a hub download.

    ``local_files_only=None`` follows ``HF_HUB_OFFLINE``. Raises :class:`ModelFilesMissingError`
    when the hub file is not cached and cannot be downloaded, :class:`CheckpointError` for a local
    path that does not exist.
    """
    if path_or_repo_id is None:
        path_or_repo_id = DEFAULT_REPO_ID
    text = os.fspath(path_or_repo_id)
    path = Path(text).expanduser()
    name = filename or DEFAULT_FILENAME
    if path.is_dir():
        candidate = path / name
        if candidate.is_file():
            return candidate
        present = sorted(p.name for p in path.glob("*.safetensors"))
        raise CheckpointError(
            f"{candidate} not found (the folder has: {', '.join(present) or 'no .safetensors files'}); "
            f"pass the file path or filename=..."
        )
    if path.is_file():
        return path
    if not isinstance(path_or_repo_id, os.PathLike) and _looks_like_repo_id(text):
        return _hub_download(text, name, cache_dir=cache_dir, local_files_only=local_files_only, revision=revision)
    raise CheckpointError(
        f"checkpoint file not found: {path}; pass the path of {DEFAULT_FILENAME} or a hub repo id "
        f"such as {DEFAULT_REPO_ID}; to fetch the file run {_download_cmd()}"
    )


def _hub_download(
    repo_id: str,
    filename: str,
    *,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
    revision: str | None,
) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline(local_files_only)
    where = f"cache {cache_dir}" if cache_dir is not None else "Hugging Face cache"
    get = _download_cmd(repo_id, filename, cache_dir)
    try:
        return Path(
            hf_hub_download(
                repo_id, filename, cache_dir=cache_dir, local_files_only=offline, revision=revision
            )
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise ModelFilesMissingError(
            f"PuLID-FLUX weights {filename} from {repo_id} are not in the local {where} and downloading "
            f"is off (offline mode): run {get} on a connected machine, or pass the local path of the "
            f".safetensors file"
        ) from exc
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise ModelFilesMissingError(
            f"{filename} was not found in the hub repository {repo_id} ({type(exc).__name__}); "
            f"check the repo id and filename (default: {DEFAULT_REPO_ID} {DEFAULT_FILENAME}) or pass a local path"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        reason = (str(exc).splitlines() or [""])[0]
        raise ModelFilesMissingError(
            f"could not download {filename} from {repo_id} ({type(exc).__name__}: {reason}); "
            f"run {get} when online, or pass the local path of the .safetensors file"
        ) from exc


# ----------------------------------------------------------------------------- load / save


def load_pulid_model(
    path_or_repo_id: str | os.PathLike | None = None,
    filename: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: PuLIDFluxConfig | None = PULID_FLUX,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> PuLIDFluxModel:
    """Load the official single-file PuLID-FLUX weights as a :class:`PuLIDFluxModel` (eval, frozen).

    Args:
        path_or_repo_id: a local ``.safetensors`` file, a folder holding ``filename``, or a hub repo
            id (default ``guozinan/PuLID``).
        filename: file inside the folder / repo (default ``pulid_flux_v0.9.1.safetensors``;
            v0.9.0 has the same layout).
        device, dtype: where and in which dtype the modules live (default CPU, float32 — the
            published file is bf16; pass ``dtype=torch.bfloat16`` to keep that).
        config: module sizes; ``TINY_PULID`` for reduced files written by :func:`save_pulid_checkpoint`;
            None reads them from the file's metadata when it records them (files written by
            :func:`save_pulid_checkpoint`), else the published size.
        cache_dir, local_files_only, revision: forwarded to ``huggingface_hub.hf_hub_download``;
            ``local_files_only=None`` follows the one offline rule (``spatialid.utils.offline``).

    The header is validated first (no parameters allocated); the model is then built on the meta
    device and receives the file's tensors one by one (``load_state_dict(strict=True, assign=True)``),
    so peak memory is about one copy of the weights. Only safetensors is ever read.
    """
    from safetensors import safe_open

    if config is not None:
        _check_config(config)
    path = resolve_pulid_checkpoint(
        path_or_repo_id, filename, cache_dir=cache_dir, local_files_only=local_files_only, revision=revision
    )
    shapes, dtypes, metadata = read_safetensors_layout(path)
    if config is None:
        config = config_from_metadata(metadata) or PULID_FLUX
    validate_pulid_layout(shapes, config, dtypes=dtypes, metadata=metadata, source=str(path))

    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read ({exc}); it may be corrupt: re-download it") from exc

    model = build_pulid_model(config, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model


def load_pulid_checkpoint(
    path_or_repo_id: str | os.PathLike | None = None,
    filename: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: PuLIDFluxConfig | None = PULID_FLUX,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> tuple[IDFormer, nn.ModuleList]:
    """Load PuLID-FLUX weights: returns ``(idformer, ca_modules)`` in eval mode, frozen.

    The modules of :func:`load_pulid_model` (same arguments), for callers that use them separately.
    """
    model = load_pulid_model(
        path_or_repo_id,
        filename,
        device=device,
        dtype=dtype,
        config=config,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        revision=revision,
    )
    return model.pulid_encoder, model.pulid_ca


def _saved_config_dict(config: PuLIDFluxConfig) -> dict:
    return {"idformer": config.idformer.to_dict(), "ca": config.ca.to_dict(), "num_ca": config.num_ca}


def save_pulid_checkpoint(
    idformer: IDFormer,
    ca_modules: Iterable[PerceiverAttentionCA],
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write modules in the official PuLID-FLUX layout (``pulid_encoder.*``, ``pulid_ca.<i>.*``).

    The file is written to a temporary name in the same folder and moved into place, so a crash
    never leaves a half-written checkpoint. ``dtype`` optionally casts (the published files are
    bf16). The module sizes are recorded in the metadata to make later mismatch errors precise.
    """
    from safetensors.torch import save_file

    if not isinstance(idformer, IDFormer):
        raise TypeError(f"idformer must be an IDFormer, got {type(idformer).__name__}")
    cas = list(ca_modules)
    if not cas:
        raise ValueError("save_pulid_checkpoint needs at least one PerceiverAttentionCA module")
    for i, ca in enumerate(cas):
        if not isinstance(ca, PerceiverAttentionCA):
            raise TypeError(f"ca_modules[{i}] must be a PerceiverAttentionCA, got {type(ca).__name__}")
        if ca.pulid_config != cas[0].pulid_config:
            raise ValueError(f"all CA modules must share one configuration; ca_modules[{i}] differs")

    tensors: dict[str, torch.Tensor] = {}

    def add(prefix: str, module: nn.Module) -> None:
        for key, value in module.state_dict().items():
            if value.is_meta:
                raise ValueError(f"{prefix}{key} is on the meta device (no data); load weights before saving")
            tensors[prefix + key] = value.detach().to(device="cpu", dtype=dtype or value.dtype).contiguous()

    add(ENCODER_PREFIX, idformer)
    for i, ca in enumerate(cas):
        add(f"{CA_PREFIX}{i}.", ca)
    config = PuLIDFluxConfig(idformer=idformer.pulid_config, ca=cas[0].pulid_config, num_ca=len(cas))
    metadata = {"format": "pt", _CONFIG_METADATA_KEY: json.dumps(_saved_config_dict(config), sort_keys=True)}

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
