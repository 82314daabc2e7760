"""PuLID-FLUX identity cross-attention (one of the 20 ``pulid_ca.<i>`` modules).

FLUX image tokens (queries) attend to the IDFormer's identity tokens (keys/values only). The
result is added to the image stream by the injector; SpatialID additionally needs the attention
result before the output projection (``return_raw=True``) to derive where the face is.

This runs 20 times per denoising step on 4096 image tokens, so it avoids copies: heads are split
with views, the fused ``scaled_dot_product_attention`` kernel does the attention, and the only
materialised intermediate is the ``[B, N, heads*dim_head]`` tensor ``to_out`` needs anyway (which
is also the raw output).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from spatialid.models.configs import PerceiverCAConfig
from spatialid.models.modeling import SafetensorsModelMixin

__all__ = ["PerceiverAttentionCA"]


class PerceiverAttentionCA(SafetensorsModelMixin, ConfigMixin):
    """Cross-attention from image tokens (``dim``) to identity tokens (``kv_dim``).

    Parameter names and shapes equal each ``pulid_ca.<i>.`` part of the published PuLID-FLUX
    checkpoint. ``norm1`` normalises the identity tokens, ``norm2`` the image tokens.

    A diffusers model (``save_pretrained`` / ``from_pretrained``, safetensors only);
    ``self.config`` is diffusers' FrozenDict, :attr:`pulid_config` the typed
    :class:`PerceiverCAConfig`.
    """

    @register_to_config
    def __init__(self, dim: int = 3072, dim_head: int = 128, heads: int = 16, kv_dim: int = 2048) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("dim_head", dim_head), ("heads", heads), ("kv_dim", kv_dim)):
            if value <= 0:
                raise ValueError(f"PerceiverAttentionCA {name} must be positive, got {value}")
        self.dim = dim
        self.kv_dim = kv_dim
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.inner_dim = inner
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    @classmethod
    def from_config(
        cls,
        config: PerceiverCAConfig | Mapping[str, Any] | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> PerceiverAttentionCA | tuple[PerceiverAttentionCA, dict[str, Any]]:
        """Build an (untrained) module from a :class:`PerceiverCAConfig` or a diffusers config dict."""
        if isinstance(config, PerceiverCAConfig):
            if kwargs or return_unused_kwargs:
                raise TypeError(
                    "PerceiverAttentionCA.from_config(PerceiverCAConfig) takes no extra arguments; "
                    "use dataclasses.replace"
                )
            return cls(**config.to_dict())
        if isinstance(config, Mapping) and not isinstance(config, dict):
            config = dict(config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def pulid_config(self) -> PerceiverCAConfig:
        """The module's sizes as the typed dataclass (``self.config`` is diffusers' FrozenDict)."""
        return PerceiverCAConfig(**{f.name: self.config[f.name] for f in fields(PerceiverCAConfig)})

    def _check_inputs(self, id_tokens: torch.Tensor, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 3 or latents.shape[-1] != self.dim:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"PerceiverAttentionCA latents must be [B, N, {self.dim}], got {shape}")
        if not isinstance(id_tokens, torch.Tensor) or id_tokens.ndim != 3 or id_tokens.shape[-1] != self.kv_dim:
            shape = tuple(id_tokens.shape) if isinstance(id_tokens, torch.Tensor) else type(id_tokens).__name__
            raise ValueError(f"PerceiverAttentionCA id_tokens must be [B, n, {self.kv_dim}], got {shape}")
        if id_tokens.shape[1] == 0:
            raise ValueError("PerceiverAttentionCA needs at least one identity token, got n=0")
        b_id, b = id_tokens.shape[0], latents.shape[0]
        if b_id not in (1, b):
            raise ValueError(
                f"PerceiverAttentionCA id_tokens batch ({b_id}) must equal the latents batch ({b}) or be 1"
            )

    def forward(
        self,
        id_tokens: torch.Tensor,
        latents: torch.Tensor,
        return_raw: bool = False,
        return_probs: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend from ``latents`` [B, N, dim] to ``id_tokens`` [B or 1, n, kv_dim].

        An ``id_tokens`` batch of 1 is shared by every sample (one identity for the whole batch);
        otherwise the batches must match (e.g. true-CFG batches with per-sample identities).
        Inputs are cast to the weights' dtype when they differ; the output has ``latents``' dtype.

        Returns ``out`` [B, N, dim], or ``(out, raw)`` with ``return_raw=True`` where ``raw`` is the
        attention result before ``to_out``, [B, N, heads*dim_head], so ``to_out(raw) == out``.
        With ``return_probs=True`` it returns ``(out, raw, probs)``, ``probs`` being the float32
        softmax over identity tokens ``[B, heads, N, n]`` (the attention-entropy mask source needs
        it). The attention is then computed explicitly in the same pass instead of by the fused
        kernel, which does not expose its probabilities; with only ``n`` identity tokens the
        score matrix is small, and no second projection of the image tokens is needed.
        """
        self._check_inputs(id_tokens, latents)
        out_dtype = latents.dtype
        w_dtype = self.to_q.weight.dtype
        b, n, _ = latents.shape
        h = self.heads

        q = self.to_q(self.norm2(latents.to(w_dtype)))  # [B, N, inner]
        kv = self.to_kv(self.norm1(id_tokens.to(w_dtype)))  # [B_id, n, 2*inner]
        k, v = kv.view(kv.shape[0], kv.shape[1], 2, h, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        if k.shape[0] != b:
            # Shared identity: copy the few identity keys/values per sample (B*n*inner values)
            # rather than pass stride-0 batches, which some fused kernels do not accept.
            k = k.expand(b, -1, -1, -1).contiguous()
            v = v.expand(b, -1, -1, -1).contiguous()
        q = q.view(b, n, h, self.dim_head).transpose(1, 2)  # [B, H, N, D] view
        attn, probs = self._attend(q, k, v, return_probs)
        raw = attn.transpose(1, 2).reshape(b, n, self.inner_dim)  # the one copy, needed by to_out
        out = self.to_out(raw).to(out_dtype)
        if probs is not None:
            return out, raw, probs
        if return_raw:
            return out, raw
        return out

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_probs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``q`` [B, H, N, D] over ``k``/``v`` [B, H, n, D]: ``(attn, probs or None)``.

        With ``return_probs`` the scores [B, H, N, n] are computed explicitly in the compute dtype
        (float32 accumulation inside the matmul) with the softmax in float32, like the fused
        kernels do; otherwise the fused kernel runs (it does not expose its probabilities).
        """
        scale = self.dim_head**-0.5
        if return_probs:
            probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).float() * scale, dim=-1)
            return torch.matmul(probs.to(v.dtype), v), probs
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None

    def forward_people(
        self, id_tokens: torch.Tensor, latents: torch.Tensor, return_probs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K identities against the same image tokens in one pass: ``id_tokens`` is ``[K, B, n, kv_dim]``.

        The image tokens are normalised and projected to queries once (the expensive part of
        the CA on 4096 tokens), the K identities' keys/values in one matmul, then one attention
        and one output projection over a ``K * B`` batch. Returns ``(out [K, B, N, dim],
        raw [K, B, N, inner])`` and, with ``return_probs=True``, ``probs [K, B, heads, N, n]``.
        """
        if id_tokens.ndim != 4:
            raise ValueError(f"forward_people needs id_tokens [K, B, n, {self.kv_dim}], got {tuple(id_tokens.shape)}")
        count = id_tokens.shape[0]
        if count == 1:
            # One person is the plain forward (the same kernels, so one identity gives the same
            # bits whether it is passed alone or as a list of one).
            result = self.forward(id_tokens[0], latents, return_raw=True, return_probs=return_probs)
            return tuple(x.unsqueeze(0) for x in result)  # type: ignore[return-value]
        self._check_inputs(id_tokens[0], latents)
        out_dtype = latents.dtype
        w_dtype = self.to_q.weight.dtype
        b, n, _ = latents.shape
        h, d = self.heads, self.dim_head
        q = self.to_q(self.norm2(latents.to(w_dtype))).view(b, n, h, d).transpose(1, 2)  # [B, H, N, D]
        ids = id_tokens.to(w_dtype).expand(count, b, -1, -1).reshape(count * b, id_tokens.shape[2], self.kv_dim)
        kv = self.to_kv(self.norm1(ids))  # [K*B, n, 2*inner]
        k, v = kv.view(count * b, kv.shape[1], 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = k.contiguous(), v.contiguous()
        q = q.unsqueeze(0).expand(count, -1, -1, -1, -1).reshape(count * b, h, n, d)  # the K copies of q
        attn, probs = self._attend(q, k, v, return_probs)
        raw = attn.transpose(1, 2).reshape(count * b, n, self.inner_dim)
        out = self.to_out(raw).to(out_dtype).view(count, b, n, self.dim)
        raw = raw.view(count, b, n, self.inner_dim)
        if probs is not None:
            return out, raw, probs.view(count, b, h, n, probs.shape[-1])
        return out, raw
