"""PuLID-FLUX identity encoder (IDFormer).

A perceiver-resampler that turns one identity (a 1280-d ArcFace + EVA-CLIP vector and five
EVA-CLIP hidden-state maps) into ``num_queries`` identity tokens for the FLUX cross-attention
modules. Module and parameter names follow the published PuLID-FLUX checkpoint exactly (the
``pulid_encoder.`` part of it), so its weights load with ``strict=True``; the code is our own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from spatialid.models.configs import IDFormerConfig
from spatialid.models.modeling import SafetensorsModelMixin

__all__ = ["IDFormer", "IDFormerAttention", "NUM_VIT_LEVELS"]

# The encoder consumes five EVA-CLIP hidden-state levels; each drives depth // 5 layers.
NUM_VIT_LEVELS = 5


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear-LN-LeakyReLU twice, then Linear: indices 0, 1, 3, 4, 6 hold weights (checkpoint keys)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, out_dim),
    )


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Pre-norm GELU MLP without biases (weights at indices 0, 1, 3)."""
    hidden = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, hidden, bias=False),
        nn.GELU(),
        nn.Linear(hidden, dim, bias=False),
    )


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D] as a view (SDPA accepts the strided layout)."""
    b, length, _ = x.shape
    return x.view(b, length, heads, -1).transpose(1, 2)


class IDFormerAttention(nn.Module):
    """Perceiver attention of the IDFormer: latents attend to ``[context, latents]``.

    The keys/values include the latents themselves, so the learned queries also exchange
    information with each other, not only with the context.
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)  # context
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context = self.norm1(context)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = _split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat((context, latents), dim=1)).chunk(2, dim=-1)
        k = _split_heads(k, self.heads)
        v = _split_heads(v, self.heads)
        # The original scales q and k by dim_head**-0.25 each: the same as one 1/sqrt(dim_head).
        out = F.scaled_dot_product_attention(q, k, v, scale=self.dim_head**-0.5)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class IDFormer(SafetensorsModelMixin, ConfigMixin):
    """PuLID-FLUX identity encoder: ``(id_cond, vit_hidden) -> [B, num_queries, output_dim]``.

    ``id_cond`` (ArcFace + EVA-CLIP class embedding) is mapped to ``num_id_token`` tokens that are
    appended to the learned queries; each of the five EVA-CLIP hidden-state levels, mapped to
    ``dim``, is concatenated with those identity tokens to form the context of ``depth // 5``
    perceiver layers. Only the learned queries are projected to the output.

    With the default arguments the parameter names and shapes equal the ``pulid_encoder.`` part of
    the published checkpoint. ``mapping_dim`` is the hidden width of the six input MLPs; the
    reference constructor fixes it at 1024 whatever ``dim`` is, so any of its configurations gives
    the same state_dict here (only offline toy models such as ``TINY_PULID`` reduce it).

    A diffusers model: ``save_pretrained`` / ``from_pretrained`` write and read ``config.json`` +
    safetensors. ``self.config`` is diffusers' FrozenDict; :attr:`pulid_config` is the typed
    :class:`IDFormerConfig`.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 1024,
        depth: int = 10,
        dim_head: int = 64,
        heads: int = 16,
        num_id_token: int = 5,
        num_queries: int = 32,
        output_dim: int = 2048,
        ff_mult: int = 4,
        id_cond_dim: int = 1280,
        vit_dim: int = 1024,
        mapping_dim: int = 1024,
    ) -> None:
        super().__init__()
        if depth <= 0 or depth % NUM_VIT_LEVELS != 0:
            raise ValueError(
                f"IDFormer depth must be a positive multiple of {NUM_VIT_LEVELS} "
                f"(one group of layers per EVA-CLIP level), got {depth}"
            )
        for name, value in (
            ("dim", dim), ("dim_head", dim_head), ("heads", heads), ("num_id_token", num_id_token),
            ("num_queries", num_queries), ("output_dim", output_dim), ("ff_mult", ff_mult),
            ("id_cond_dim", id_cond_dim), ("vit_dim", vit_dim), ("mapping_dim", mapping_dim),
        ):
            if value <= 0:
                raise ValueError(f"IDFormer {name} must be positive, got {value}")
        self.dim = dim
        self.num_id_token = num_id_token
        self.num_queries = num_queries
        self.layers_per_level = depth // NUM_VIT_LEVELS

        scale = dim**-0.5
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) * scale)
        self.proj_out = nn.Parameter(torch.randn(dim, output_dim) * scale)
        self.layers = nn.ModuleList(
            nn.ModuleList([IDFormerAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        for i in range(NUM_VIT_LEVELS):
            setattr(self, f"mapping_{i}", _mlp(vit_dim, mapping_dim, dim))
        self.id_embedding_mapping = _mlp(id_cond_dim, mapping_dim, dim * num_id_token)

    @classmethod
    def from_config(
        cls,
        config: IDFormerConfig | Mapping[str, Any] | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> IDFormer | tuple[IDFormer, dict[str, Any]]:
        """Build an (untrained) IDFormer from an :class:`IDFormerConfig` or a diffusers config dict."""
        if isinstance(config, IDFormerConfig):
            if kwargs or return_unused_kwargs:
                raise TypeError(
                    "IDFormer.from_config(IDFormerConfig) takes no extra arguments; use dataclasses.replace"
                )
            return cls(**config.to_dict())
        if isinstance(config, Mapping) and not isinstance(config, dict):
            config = dict(config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def pulid_config(self) -> IDFormerConfig:
        """The module's sizes as the typed dataclass (``self.config`` is diffusers' FrozenDict)."""
        return IDFormerConfig(**{f.name: self.config[f.name] for f in fields(IDFormerConfig)})

    def _check_inputs(self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor]) -> None:
        cfg = self.pulid_config
        if not isinstance(id_cond, torch.Tensor) or id_cond.ndim not in (2, 3) or id_cond.shape[-1] != cfg.id_cond_dim:
            shape = tuple(id_cond.shape) if isinstance(id_cond, torch.Tensor) else type(id_cond).__name__
            raise ValueError(
                f"IDFormer id_cond must be [B, {cfg.id_cond_dim}] (or [B, K, {cfg.id_cond_dim}] for K "
                f"identity images), got {shape}"
            )
        if not isinstance(vit_hidden, (list, tuple)) or len(vit_hidden) != NUM_VIT_LEVELS:
            got = len(vit_hidden) if isinstance(vit_hidden, (list, tuple)) else type(vit_hidden).__name__
            raise ValueError(
                f"IDFormer vit_hidden must be a list of {NUM_VIT_LEVELS} tensors [B, L, {cfg.vit_dim}], got {got}"
            )
        b = id_cond.shape[0]
        for i, h in enumerate(vit_hidden):
            if not isinstance(h, torch.Tensor) or h.ndim != 3 or h.shape[0] != b or h.shape[-1] != cfg.vit_dim:
                shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(
                    f"IDFormer vit_hidden[{i}] must be [B={b}, L, {cfg.vit_dim}], got {shape}"
                )

    def forward(self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """Encode one identity per sample.

        Args:
            id_cond: ``[B, id_cond_dim]``; ``[B, K, id_cond_dim]`` gives ``K * num_id_token``
                identity tokens (several photos of one person, as the original model allows).
            vit_hidden: five tensors ``[B, L_i, vit_dim]`` (EVA-CLIP hidden states).

        Inputs are cast to the parameters' dtype (a no-op when they already match); the result
        has that dtype: ``[B, num_queries, output_dim]``.
        """
        self._check_inputs(id_cond, vit_hidden)
        dtype = self.latents.dtype
        b = id_cond.shape[0]
        id_tokens = self.id_embedding_mapping(id_cond.to(dtype)).reshape(b, -1, self.dim)
        latents = torch.cat((self.latents.expand(b, -1, -1), id_tokens), dim=1)
        step = self.layers_per_level
        for level in range(NUM_VIT_LEVELS):
            vit = getattr(self, f"mapping_{level}")(vit_hidden[level].to(dtype))
            context = torch.cat((id_tokens, vit), dim=1)
            for attn, ff in self.layers[level * step : (level + 1) * step]:
                latents = attn(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : self.num_queries] @ self.proj_out
