"""Loading and saving PuLID-FLUX weights (``pulid_flux_v0.9.x.safetensors``).

The published file holds an IDFormer under ``pulid_encoder.`` and ``num_ca`` (20) identity
cross-attention modules under ``pulid_ca.<i>.``. Loading checks the file's header against the
layout our modules expect *before* allocating ~570M parameters, so a wrong or damaged file fails
in milliseconds with a message naming the offending tensors (or the kind of file it really is).
Only safetensors files are read: pickles (``.bin``/``.pt``/``.ckpt``) can execute code on load and
are refused without being opened by a deserialiser.

Where each piece lives: the file itself (locating, header, layout messages) in
:mod:`spatialid.models.checkpoint_format`, building the container and loading the file into it in
:mod:`spatialid.models.pulid_flux`; this module is the public API over both, and writes files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

# Names of checkpoint_format and pulid_flux stay importable from here, where callers import them.
from spatialid.models.checkpoint_format import (  # noqa: F401
    CA_PREFIX,
    CONFIG_METADATA_KEY,
    DEFAULT_FILENAME,
    DEFAULT_REPO_ID,
    ENCODER_PREFIX,
    Layout,
    config_from_metadata,
    read_safetensors_layout,
    resolve_pulid_checkpoint,
    saved_config_dict,
)
from spatialid.models.configs import PULID_FLUX, PuLIDFluxConfig
from spatialid.models.idformer import IDFormer
from spatialid.models.perceiver_ca import PerceiverAttentionCA
from spatialid.models.pulid_flux import (  # noqa: F401
    build_pulid_model,
    expected_pulid_layout,
    load_pulid_model,
    validate_pulid_layout,
)
from spatialid.utils.io import atomic_path

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


def build_pulid_modules(
    config: PuLIDFluxConfig = PULID_FLUX,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[IDFormer, nn.ModuleList]:
    """Build randomly initialised ``(idformer, ca_modules)`` of ``config`` (``device="meta"`` allocates nothing)."""
    model = build_pulid_model(config, device=device, dtype=dtype)
    return model.pulid_encoder, model.pulid_ca


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
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(saved_config_dict(config), sort_keys=True)}

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
