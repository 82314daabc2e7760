"""EVA02-CLIP-L-14-336 vision tower on timm, with the outputs PuLID-FLUX needs.

PuLID-FLUX runs the vision tower of ``EVA02-CLIP-L-14-336`` (BAAI's EVA-CLIP code) and keeps

* the final image embedding: LayerNorm of the last block's output, class token, linear ``head``
  (1024 -> 768); PuLID then L2-normalises it;
* the token sequences *entering* blocks 4, 8, 12, 16 and 20 (EVA-CLIP collects ``x`` before
  calling ``blocks[idx]`` for ``0 < idx <= 20, idx % 4 == 0``): five ``[B, 577, 1024]`` tensors.

Rather than vendoring EVA-CLIP, we build timm's maintained :class:`timm.models.eva.Eva` with the
arguments of timm's ``eva02_large_patch14_clip_336`` (separate q/k/v projections with q and v biases,
sub-LayerNorm inside attention, SwiGLU MLP with its inner LayerNorm, 2-D RoPE on the patch tokens
with a 16x16 reference grid interpolated to 24x24, absolute position embedding, class-token
pooling, LayerNorm eps 1e-6). The hidden states are captured with forward *pre*-hooks on the
blocks, i.e. exactly the block inputs. ``tests/test_encoder_eva.py`` checks this against an
independent re-implementation of EVA-CLIP's forward written from EVA-CLIP's equations and fed the
EVA-CLIP-named state dict.

Weights (both are the same fp16 EVA02_CLIP_L_336_psz14_s6B weights, 856 MB; open_clip's
``pretrained.py`` records the timm repo as converted from the QuanSun file):

* ``timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k`` / ``open_clip_model.safetensors``
  (default; safetensors; keys ``visual.trunk.<timm name>``; the text tower is skipped);
* ``QuanSun/EVA-CLIP`` / ``EVA02_CLIP_L_336_psz14_s6B.pt`` (the file PuLID downloads; a pickle,
  read with ``torch.load(weights_only=True)``; keys ``visual.<EVA-CLIP name>``).

Name conversion EVA-CLIP -> timm (done by timm's own ``checkpoint_filter_fn``; prefix ``visual.``
removed, ``visual.trunk.`` for open_clip files):

=====================================  ===================================
EVA-CLIP (``visual.`` + ...)           timm ``Eva``
=====================================  ===================================
``blocks.N.attn.q_bias``               ``blocks.N.attn.q_proj.bias``
``blocks.N.attn.v_bias``               ``blocks.N.attn.v_proj.bias``
``blocks.N.attn.inner_attn_ln.*``      ``blocks.N.attn.norm.*``
``blocks.N.mlp.w1.*`` / ``w2`` / ``w3``  ``blocks.N.mlp.fc1_g.*`` / ``fc1_x`` / ``fc2``
``blocks.N.mlp.ffn_ln.*``              ``blocks.N.mlp.norm.*``
``rope.freqs_cos`` / ``freqs_sin``     dropped (timm recomputes the same table)
``blocks.N.attn.rope.*``               dropped
everything else (``cls_token``,        unchanged
``pos_embed``, ``patch_embed.proj``,
``blocks.N.norm1/2``, ``q/k/v_proj``,
``attn.proj``, ``norm``, ``head``)
=====================================  ===================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from spatialid.encoder.parsing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from spatialid.errors import CheckpointError

__all__ = [
    "EvaVisionConfig",
    "EVA02_CLIP_L_336",
    "TINY_EVA",
    "EVA_DEFAULT_REPO_ID",
    "EVA_DEFAULT_FILENAME",
    "EVA_ORIGINAL_REPO_ID",
    "EVA_ORIGINAL_FILENAME",
    "EVA_KNOWN_FILENAMES",
    "EvaVisionTower",
    "build_eva_model",
    "convert_eva_state_dict",
    "read_eva_state_dict",
    "load_eva_vision_tower",
]

logger = logging.getLogger(__name__)

EVA_DEFAULT_REPO_ID = "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k"
EVA_DEFAULT_FILENAME = "open_clip_model.safetensors"
EVA_ORIGINAL_REPO_ID = "QuanSun/EVA-CLIP"
EVA_ORIGINAL_FILENAME = "EVA02_CLIP_L_336_psz14_s6B.pt"
# Looked for, in this order, inside a local folder or a hub repo given without a filename.
EVA_KNOWN_FILENAMES = (
    EVA_DEFAULT_FILENAME,
    "model.safetensors",
    EVA_ORIGINAL_FILENAME,
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
)


@dataclass(frozen=True)
class EvaVisionConfig:
    """Shape of the EVA02 vision tower and which block inputs are returned."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4 * 2 / 3  # SwiGLU hidden = int(1024 * 2.667) = 2730, as EVA-CLIP's 2.6667
    output_dim: int = 768  # CLIP embedding size (the ``head`` projection)
    rope_ref_grid: int = 16  # EVA-CLIP's pt_hw_seq_len: RoPE frequencies of a 224/14 grid, interpolated
    hidden_indices: tuple[int, ...] = (4, 8, 12, 16, 20)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ValueError(f"width {self.width} / heads {self.heads} must give a head size divisible by 4 (2-D RoPE)")
        bad = [i for i in self.hidden_indices if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"hidden_indices {bad} do not exist in a {self.depth}-block tower (valid: 0..{self.depth - 1})"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length of each hidden state: class token + patches (577 for the real model)."""
        return 1 + self.grid**2

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra", None)
        return d


EVA02_CLIP_L_336 = EvaVisionConfig()
# Tiny random-weight tower for the offline preset: same architecture and block indices, toy width,
# 112 px input (8x8 patches). Depth stays 24 so that the inputs of blocks 4..20 exist.
TINY_EVA = EvaVisionConfig(image_size=112, width=32, depth=24, heads=2, output_dim=32, rope_ref_grid=8)


def build_eva_model(config: EvaVisionConfig = EVA02_CLIP_L_336, device: torch.device | str | None = None) -> nn.Module:
    """timm ``Eva`` with ``eva02_large_patch14_clip_336``'s architecture at ``config``'s size.

    Random initialisation (timm's); ``device="meta"`` allocates nothing.
    """
    import contextlib

    from timm.models.eva import Eva

    # device None: the current default device (so ``with torch.device(...)`` around a caller works)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = Eva(
            img_size=config.image_size,
            patch_size=config.patch_size,
            num_classes=config.output_dim,
            global_pool="token",
            embed_dim=config.width,
            depth=config.depth,
            num_heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            qkv_fused=False,
            swiglu_mlp=True,
            scale_mlp=True,
            scale_attn_inner=True,
            use_rot_pos_emb=True,
            ref_feat_shape=(config.rope_ref_grid, config.rope_ref_grid),
        )
    return model.eval()


class EvaVisionTower(nn.Module):
    """EVA02 vision tower returning ``(embedding, hidden_states)`` like PuLID's ``return_hidden``.

    ``embedding`` is the raw ``head`` output ``[B, output_dim]`` (PuLID L2-normalises it
    afterwards); ``hidden_states`` is a list with the input of each block in
    ``config.hidden_indices``, ``[B, num_tokens, width]`` each.
    """

    def __init__(self, config: EvaVisionConfig = EVA02_CLIP_L_336, model: nn.Module | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = model if model is not None else build_eva_model(config, device=device)
        self.model.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``pixels``: CLIP-normalised ``[B, 3, S, S]`` with ``S = config.image_size``."""
        s = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (s, s):
            raise ValueError(f"EVA tower expects [B, 3, {s}, {s}] pixels, got {tuple(pixels.shape)}")
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for idx in self.config.hidden_indices:
            def grab(_module: nn.Module, args: tuple, idx: int = idx) -> None:
                captured[idx] = args[0]
            handles.append(self.model.blocks[idx].register_forward_pre_hook(grab))
        try:
            param = next(self.model.parameters())
            feats = self.model.forward_features(pixels.to(device=param.device, dtype=param.dtype))
            embedding = self.model.forward_head(feats)
        finally:
            for h in handles:
                h.remove()
        return embedding, [captured[i] for i in self.config.hidden_indices]


# ----------------------------------------------------------------------------- weights


def convert_eva_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an EVA-CLIP, open_clip or timm state dict onto timm ``Eva`` names (see module docs).

    Accepts the full CLIP state dict (text tower and logit scale are skipped: only ``visual.``/
    ``visual.trunk.`` keys are kept when present) or a bare vision-tower state dict.
    """
    from timm.models.eva import checkpoint_filter_fn

    sd = dict(state_dict)
    for wrapper in ("state_dict", "model", "module"):
        inner = sd.get(wrapper)
        if isinstance(inner, Mapping):
            sd = dict(inner)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if not any(k.startswith("visual.") for k in sd) and any(k.startswith(("text.", "transformer.")) for k in sd):
        raise CheckpointError("this CLIP checkpoint has no vision tower (no 'visual.' tensors)")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return checkpoint_filter_fn(tensors, model)


def read_eva_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors of an EVA checkpoint: safetensors directly (vision keys only), pickles safely.

    ``.pt``/``.pth``/``.bin`` files are opened with ``torch.load(weights_only=True)``, which refuses
    anything but tensors and plain containers (no arbitrary code runs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"EVA-CLIP weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                if any(k.startswith("visual.") for k in keys):
                    keys = [k for k in keys if k.startswith("visual.")]
                return {k: f.get_tensor(k) for k in keys}
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} could not be read as a tensors-only checkpoint ({type(exc).__name__}); "
            "it may hold Python objects, which spatialid never unpickles - use the safetensors weights "
            f"{EVA_DEFAULT_REPO_ID}/{EVA_DEFAULT_FILENAME} instead"
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not contain a state dict (found {type(obj).__name__})")
    return dict(obj)


def _load_into(model: nn.Module, converted: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shape = sorted(
        f"{k} {tuple(converted[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(converted)
        if tuple(converted[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})"
            )
        if shape:
            parts.append(f"{len(shape)} mis-shaped ({'; '.join(shape[:3])})")
        raise CheckpointError(
            f"{source} is not an EVA02-CLIP-L-14-336 vision tower: {'; '.join(parts)}; "
            f"use {EVA_DEFAULT_REPO_ID}/{EVA_DEFAULT_FILENAME} or {EVA_ORIGINAL_REPO_ID}/{EVA_ORIGINAL_FILENAME}"
        )
    model.load_state_dict(converted, strict=True, assign=True)


def load_eva_vision_tower(
    path: str | os.PathLike,
    config: EvaVisionConfig = EVA02_CLIP_L_336,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> EvaVisionTower:
    """Build the tower on the meta device and assign the checkpoint's tensors (strict names/shapes)."""
    state = read_eva_state_dict(path)
    logger.info("EVA-CLIP weights %s: %s", Path(path).name, eva_weights_summary(state))
    model = build_eva_model(config, device="meta")
    converted = convert_eva_state_dict(state, model)
    _load_into(model, converted, str(path))
    # Non-persistent buffers (the RoPE table) were created on meta: rebuild them on the real device.
    _materialise_buffers(model, config)
    tower = EvaVisionTower(config, model=model)
    dtype = dtype if dtype is not None else torch.float32
    return tower.to(device=device if device is not None else "cpu", dtype=dtype).eval()


def _materialise_buffers(model: nn.Module, config: EvaVisionConfig) -> None:
    """Replace meta-device buffers (the computed RoPE tables) with real ones.

    The buffers depend only on the head size and the patch grid, so a one-block twin built on the
    CPU (cheap) has the same buffers under the same names.
    """
    meta_buffers = [name for name, b in model.named_buffers() if b.is_meta]
    if not meta_buffers:
        return
    twin = build_eva_model(replace(config, depth=1, hidden_indices=()), device="cpu")
    twin_buffers = dict(twin.named_buffers())
    for name in meta_buffers:
        if name not in twin_buffers:
            raise CheckpointError(f"cannot rebuild the buffer {name} of the EVA tower after meta loading")
        module_name, _, buf_name = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        persistent = buf_name not in getattr(module, "_non_persistent_buffers_set", set())
        module.register_buffer(buf_name, twin_buffers[name].clone(), persistent=persistent)


def eva_weights_summary(state: Mapping[str, torch.Tensor]) -> str:
    """One-line summary (count, dtype) of a state dict, for logs."""
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
    n = sum(v.numel() for v in state.values())
    return f"{len(state)} tensors, {n / 1e6:.1f}M values, {'/'.join(dtypes)}"
