"""Test-only helpers for the injector (moved out of ``spatialid.injection``: only tests used them)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from spatialid.injection import InjectionRecord


def attention_probs(ca: nn.Module, id_tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Softmax attention of each image token over the identity tokens, ``[B, heads, N, n_id]``.

    A float32 reference that recomputes the query/key projections of ``ca``, to check the
    probabilities the injector takes from the CA forward (``return_probs=True``).
    """
    heads = ca.heads
    dim_head = ca.dim_head
    q = ca.to_q(ca.norm2(latents))
    k = ca.to_kv(ca.norm1(id_tokens))[..., : heads * dim_head]
    b, n, _ = q.shape
    q = q.view(b, n, heads, dim_head).transpose(1, 2).float()
    k = k.view(b, k.shape[1], heads, dim_head).transpose(1, 2).float()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim_head), dim=-1)


def masks_by_call(records: Iterable[InjectionRecord]) -> dict[int, list[InjectionRecord]]:
    """Records grouped by transformer call index (one denoising step, or one CFG branch of it)."""
    grouped: dict[int, list[InjectionRecord]] = {}
    for rec in records:
        grouped.setdefault(rec.call_index, []).append(rec)
    return grouped
