"""All PuLID-FLUX weights as one diffusers model (:class:`PuLIDFluxModel`).

The published checkpoint is a single file whose tensors are named ``pulid_encoder.*`` (the
IDFormer) and ``pulid_ca.<i>.*`` (the identity cross-attention modules). Holding the modules under
exactly those attribute names makes the container's ``state_dict`` *be* that layout, so the
official file loads with ``strict=True`` without renaming, and diffusers' ``save_pretrained`` /
``from_pretrained`` (``config.json`` + safetensors) work on the same object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from spatialid.models.configs import IDFormerConfig, PerceiverCAConfig, PuLIDFluxConfig
from spatialid.models.idformer import IDFormer
from spatialid.models.modeling import SafetensorsModelMixin
from spatialid.models.perceiver_ca import PerceiverAttentionCA

__all__ = ["PuLIDFluxModel"]


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
        """Read the official single-file checkpoint; see :func:`spatialid.models.checkpoint.load_pulid_model`."""
        from spatialid.models.checkpoint import load_pulid_model
        from spatialid.models.configs import PULID_FLUX

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
