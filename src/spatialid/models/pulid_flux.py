"""All PuLID-FLUX weights as one diffusers model (:class:`PuLIDFluxModel`).

The published checkpoint is a single file whose tensors are named ``pulid_encoder.*`` (the
IDFormer) and ``pulid_ca.<i>.*`` (the identity cross-attention modules). Holding the modules under
exactly those attribute names makes the container's ``state_dict`` *be* that layout, so the
official file loads with ``strict=True`` without renaming, and diffusers' ``save_pretrained`` /
``from_pretrained`` (``config.json`` + safetensors) work on the same object.

Building the container and loading the official file into it live here too (re-exported by
:mod:`spatialid.models.checkpoint`): :meth:`PuLIDFluxModel.from_pulid_checkpoint` needs them, and
the file-level pieces they use (:mod:`spatialid.models.checkpoint_format`) sit below this module,
so nothing imports back up.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from spatialid.models.checkpoint_format import (
    Layout,
    check_config,
    compare_layout,
    config_from_metadata,
    read_safetensors_layout,
    read_tensors,
    refuse_foreign_file,
    resolve_pulid_checkpoint,
)
from spatialid.models.configs import PULID_FLUX, IDFormerConfig, PerceiverCAConfig, PuLIDFluxConfig
from spatialid.models.idformer import IDFormer
from spatialid.models.modeling import SafetensorsModelMixin
from spatialid.models.perceiver_ca import PerceiverAttentionCA

__all__ = [
    "PuLIDFluxModel",
    "build_pulid_model",
    "expected_pulid_layout",
    "load_pulid_model",
    "validate_pulid_layout",
]


def _sub_config(cls: type, value: object, name: str) -> Any:
    """Accept the dataclass, a mapping (config.json) or None (defaults) for a sub-configuration."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TypeError(f"PuLIDFluxModel {name} config has unknown keys {unknown} (known: {sorted(known)})")
        return cls(**value)
    raise TypeError(f"PuLIDFluxModel {name} must be a {cls.__name__} or a dict, got {type(value).__name__}")


class PuLIDFluxModel(SafetensorsModelMixin, ConfigMixin):
    """IDFormer (``pulid_encoder``) + ``num_ca`` cross-attention modules (``pulid_ca``).

    Its ``state_dict`` keys and shapes are those of the published ``pulid_flux_v0.9.x.safetensors``.
    The config stores the :class:`~spatialid.models.configs.PuLIDFluxConfig` as plain JSON values
    (``idformer`` and ``ca`` as dicts); :attr:`pulid_config` gives it back typed. Read the official
    single file with :meth:`from_pulid_checkpoint`, diffusers folders with ``from_pretrained``.
    """

    @register_to_config
    def __init__(
        self,
        idformer: Mapping[str, int] | IDFormerConfig | None = None,
        ca: Mapping[str, int] | PerceiverCAConfig | None = None,
        num_ca: int = 20,
        double_interval: int = 2,
        single_interval: int = 4,
    ) -> None:
        super().__init__()
        id_cfg = _sub_config(IDFormerConfig, idformer, "idformer")
        ca_cfg = _sub_config(PerceiverCAConfig, ca, "ca")
        sizes = (("num_ca", num_ca), ("double_interval", double_interval), ("single_interval", single_interval))
        for name, value in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PuLIDFluxModel {name} must be a positive integer, got {value!r}")
        # config.json must hold complete plain dicts, whatever form the sizes were passed in.
        self.register_to_config(idformer=id_cfg.to_dict(), ca=ca_cfg.to_dict())
        self.pulid_encoder = IDFormer.from_config(id_cfg)
        self.pulid_ca = nn.ModuleList(PerceiverAttentionCA.from_config(ca_cfg) for _ in range(num_ca))

    @classmethod
    def from_pulid_config(cls, config: PuLIDFluxConfig) -> PuLIDFluxModel:
        """Build a randomly initialised model (use ``with torch.device("meta"):`` to allocate nothing)."""
        if not isinstance(config, PuLIDFluxConfig):
            raise TypeError(f"config must be a PuLIDFluxConfig, got {type(config).__name__}")
        return cls(
            idformer=config.idformer.to_dict(),
            ca=config.ca.to_dict(),
            num_ca=config.num_ca,
            double_interval=config.double_interval,
            single_interval=config.single_interval,
        )

    @property
    def pulid_config(self) -> PuLIDFluxConfig:
        """The sizes as the typed dataclass (``self.config`` is diffusers' FrozenDict of JSON values)."""
        cfg = self.config
        return PuLIDFluxConfig(
            idformer=_sub_config(IDFormerConfig, cfg["idformer"], "idformer"),
            ca=_sub_config(PerceiverCAConfig, cfg["ca"], "ca"),
            num_ca=cfg["num_ca"],
            double_interval=cfg["double_interval"],
            single_interval=cfg["single_interval"],
        )

    @classmethod
    def from_pulid_checkpoint(
        cls,
        path_or_repo_id: str | os.PathLike | None = None,
        filename: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        config: PuLIDFluxConfig | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
    ) -> PuLIDFluxModel:
        """Read the official single-file checkpoint; see :func:`load_pulid_model`."""
        return load_pulid_model(
            path_or_repo_id,
            filename,
            device=device,
            dtype=dtype,
            config=PULID_FLUX if config is None else config,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            revision=revision,
        )


# ----------------------------------------------------------------------------- building and loading


def build_pulid_model(
    config: PuLIDFluxConfig = PULID_FLUX,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PuLIDFluxModel:
    """Build a randomly initialised :class:`PuLIDFluxModel` (``device="meta"`` allocates nothing).

    The IDFormer is created first, then the CA modules in order, so a given random state always
    gives the same weights (the tiny preset's images depend on it).
    """
    check_config(config)
    with torch.device(device if device is not None else "cpu"):
        model = PuLIDFluxModel.from_pulid_config(config)
    if dtype is not None:
        model.to(dtype=dtype)
    return model


@functools.lru_cache(maxsize=8)
def _expected_layout_cached(config: PuLIDFluxConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # The container's own names are the checkpoint's names (pulid_encoder.*, pulid_ca.<i>.*).
    model = build_pulid_model(config, device="meta")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def expected_pulid_layout(config: PuLIDFluxConfig = PULID_FLUX) -> Layout:
    """Tensor name -> shape of a checkpoint for ``config`` (computed on the meta device)."""
    check_config(config)
    return dict(_expected_layout_cached(config))


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
    refuse_foreign_file(shapes, source)
    compare_layout(shapes, expected_pulid_layout(config), config, dtypes=dtypes, metadata=metadata, source=source)


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
        config: module sizes; ``TINY_PULID`` for reduced files written by
            :func:`~spatialid.models.checkpoint.save_pulid_checkpoint`; None reads them from the file's
            metadata when it records them (files written by that function), else the published size.
        cache_dir, local_files_only, revision: forwarded to ``huggingface_hub.hf_hub_download``;
            ``local_files_only=None`` follows the one offline rule (``spatialid.utils.offline``).

    The header is validated first (no parameters allocated); the model is then built on the meta
    device and receives the file's tensors one by one (``load_state_dict(strict=True, assign=True)``),
    so peak memory is about one copy of the weights. Only safetensors is ever read.
    """
    if config is not None:
        check_config(config)
    path = resolve_pulid_checkpoint(
        path_or_repo_id, filename, cache_dir=cache_dir, local_files_only=local_files_only, revision=revision
    )
    shapes, dtypes, metadata = read_safetensors_layout(path)
    if config is None:
        config = config_from_metadata(metadata) or PULID_FLUX
    validate_pulid_layout(shapes, config, dtypes=dtypes, metadata=metadata, source=str(path))

    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    state = read_tensors(path, device, dtype)
    model = build_pulid_model(config, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model
