"""The published PuLID-FLUX file as a file: where it is, what its header says, how it is named.

Nothing here builds a module: these are the pieces the loader in :mod:`spatialid.models.pulid_flux`
and the public API of :mod:`spatialid.models.checkpoint` share (locating the file or hub download,
reading only its safetensors header, recognising wrong files, the recorded configuration, the
mismatch message). Kept below the container so that the container can read its own file without
importing the module that imports it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from spatialid.defaults import PULID_FILENAME, PULID_REPO_ID
from spatialid.errors import CheckpointError, ModelFilesMissingError
from spatialid.models.configs import PULID_FLUX, TINY_PULID, PuLIDFluxConfig
from spatialid.utils.offline import is_offline
from spatialid.utils.weights import sniff_safetensors

__all__ = [
    "DEFAULT_REPO_ID",
    "DEFAULT_FILENAME",
    "ENCODER_PREFIX",
    "CA_PREFIX",
    "CONFIG_METADATA_KEY",
    "Layout",
    "check_config",
    "compare_layout",
    "config_from_metadata",
    "read_safetensors_layout",
    "read_tensors",
    "refuse_foreign_file",
    "resolve_pulid_checkpoint",
]

DEFAULT_REPO_ID = PULID_REPO_ID
DEFAULT_FILENAME = PULID_FILENAME
ENCODER_PREFIX = "pulid_encoder."
CA_PREFIX = "pulid_ca."
CONFIG_METADATA_KEY = "spatialid.config"  # metadata entry: the sizes a file was written with

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


def check_config(config: object) -> None:
    """Refuse anything but a :class:`PuLIDFluxConfig` with at least one CA module."""
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

    raw = metadata.get(CONFIG_METADATA_KEY)
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
    raw = metadata.get(CONFIG_METADATA_KEY)
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
    if saved == saved_config_dict(TINY_PULID) and config != TINY_PULID:
        return "; the file was written for the tiny configuration: pass config=spatialid.models.TINY_PULID"
    if saved == saved_config_dict(PULID_FLUX) and config != PULID_FLUX:
        return "; the file was written for the full configuration: pass config=spatialid.models.PULID_FLUX"
    return f"; the file was written with configuration {raw}: pass a PuLIDFluxConfig with those sizes"


def saved_config_dict(config: PuLIDFluxConfig) -> dict:
    """The sizes a written file records in its metadata (and that :func:`_config_hint` compares)."""
    return {"idformer": config.idformer.to_dict(), "ca": config.ca.to_dict(), "num_ca": config.num_ca}


# ----------------------------------------------------------------------------- checking the layout


def refuse_foreign_file(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` for a file that holds no PuLID-FLUX tensors at all.

    Recognises common wrong files (SDXL PuLID, FLUX transformer weights, a bare IDFormer
    state_dict) by their names, before any expected layout is computed.
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


def compare_layout(
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    config: PuLIDFluxConfig,
    *,
    dtypes: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    source: str = "checkpoint",
) -> None:
    """Raise :class:`CheckpointError` listing missing / unexpected / mis-shaped / non-float tensors.

    ``expected`` is the layout of ``config`` (the container's ``state_dict`` names and shapes).
    """
    keys = list(shapes)
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


def read_tensors(path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the (already validated) file, moved to ``device`` / ``dtype`` one by one."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read ({exc}); it may be corrupt: re-download it") from exc
    return state
