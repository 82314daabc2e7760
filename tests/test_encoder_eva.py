"""EVA02-CLIP vision tower on timm: architecture, block-input indexing, name conversion, loading.

The reference below re-implements EVA-CLIP's visual forward (sub-LN attention with q/v biases,
2-D RoPE on patch tokens, SwiGLU with inner LN, class token after the final LN, head) directly on
an EVA-CLIP-named state dict. timm's Eva, loaded through our conversion, must match it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from spatialid.encoder.eva_clip import (
    EVA02_CLIP_L_336,
    TINY_EVA,
    EvaVisionConfig,
    EvaVisionTower,
    build_eva_model,
    convert_eva_state_dict,
    load_eva_vision_tower,
    read_eva_state_dict,
)
from spatialid.errors import CheckpointError

# small but non-trivial: 4x4 patch grid, RoPE reference grid 3 (interpolated), hidden from 3 blocks
CFG = EvaVisionConfig(image_size=56, patch_size=14, width=32, depth=6, heads=2, output_dim=16,
                      rope_ref_grid=3, hidden_indices=(1, 2, 4))


def _randomised_tower(cfg: EvaVisionConfig = CFG, seed: int = 0) -> EvaVisionTower:
    """Tower with every parameter random (so zero biases / unit norms cannot hide a naming error)."""
    torch.manual_seed(seed)
    tower = EvaVisionTower(cfg)
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == cfg.width else 0.0) * 0.5)
    return tower.double()


_TIMM_TO_EVACLIP = [
    (".attn.q_proj.bias", ".attn.q_bias"),
    (".attn.v_proj.bias", ".attn.v_bias"),
    (".attn.norm.", ".attn.inner_attn_ln."),
    (".mlp.fc1_g.", ".mlp.w1."),
    (".mlp.fc1_x.", ".mlp.w2."),
    (".mlp.fc2.", ".mlp.w3."),
    (".mlp.norm.", ".mlp.ffn_ln."),
]


def _as_eva_clip_checkpoint(tower: EvaVisionTower) -> dict[str, torch.Tensor]:
    """The state dict as EVA02_CLIP_L_336_psz14_s6B.pt names it: 'visual.' + EVA-CLIP names, plus
    the RoPE buffers EVA-CLIP saves and a text tower / logit scale that must be ignored."""
    out = {}
    for k, v in tower.model.state_dict().items():
        for a, b in _TIMM_TO_EVACLIP:
            k = k.replace(a, b)
        out["visual." + k] = v.clone()
    n = (CFG.grid if tower.config is CFG else tower.config.grid) ** 2
    hd = tower.config.width // tower.config.heads
    out["visual.rope.freqs_cos"] = torch.randn(n, hd)
    out["visual.rope.freqs_sin"] = torch.randn(n, hd)
    for i in range(tower.config.depth):
        out[f"visual.blocks.{i}.attn.rope.freqs_cos"] = torch.randn(n, hd)
        out[f"visual.blocks.{i}.attn.rope.freqs_sin"] = torch.randn(n, hd)
    out["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(8, 8)
    out["logit_scale"] = torch.tensor(4.6)
    return out


def _ln(x, sd, name, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name, bias=True):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias") if bias else None)


def _eva_clip_rope(cfg: EvaVisionConfig, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionRotaryEmbeddingFast tables: per-axis 'lang' frequencies over half the head dim,
    positions arange(ft)/ft*pt, each frequency repeated twice, rows then columns concatenated."""
    half = cfg.width // cfg.heads // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half))
    t = torch.arange(cfg.grid, dtype=torch.float64) / cfg.grid * cfg.rope_ref_grid
    f = torch.outer(t, freqs).repeat_interleave(2, dim=-1)  # [grid, half]
    g = cfg.grid
    full = torch.cat([f[:, None, :].expand(g, g, half), f[None, :, :].expand(g, g, half)], dim=-1)
    full = full.reshape(g * g, 2 * half)
    return full.cos().to(dtype), full.sin().to(dtype)


def _rotate_pairs(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


def eva_clip_reference(sd: dict[str, torch.Tensor], pixels: torch.Tensor, cfg: EvaVisionConfig):
    """EVA-CLIP EVAVisionTransformer.forward(return_hidden=True) semantics, written out by hand."""
    p = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    b = pixels.shape[0]
    x = F.conv2d(pixels, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p["cls_token"].expand(b, -1, -1), x], dim=1) + p["pos_embed"]
    cos, sin = _eva_clip_rope(cfg, x.dtype)
    heads, hd = cfg.heads, cfg.width // cfg.heads
    hidden = []
    for i in range(cfg.depth):
        if i in cfg.hidden_indices:
            hidden.append(x)
        pre = f"blocks.{i}."
        h = _ln(x, p, pre + "norm1")
        q = F.linear(h, p[pre + "attn.q_proj.weight"], p[pre + "attn.q_bias"])
        k = F.linear(h, p[pre + "attn.k_proj.weight"])
        v = F.linear(h, p[pre + "attn.v_proj.weight"], p[pre + "attn.v_bias"])
        q, k, v = (t.reshape(b, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
        q = torch.cat([q[:, :, :1], q[:, :, 1:] * cos + _rotate_pairs(q[:, :, 1:]) * sin], dim=2)
        k = torch.cat([k[:, :, :1], k[:, :, 1:] * cos + _rotate_pairs(k[:, :, 1:]) * sin], dim=2)
        attn = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(b, -1, heads * hd)
        a = _ln(a, p, pre + "attn.inner_attn_ln")
        x = x + _lin(a, p, pre + "attn.proj")
        h = _ln(x, p, pre + "norm2")
        g = F.silu(_lin(h, p, pre + "mlp.w1")) * _lin(h, p, pre + "mlp.w2")
        g = _ln(g, p, pre + "mlp.ffn_ln")
        x = x + _lin(g, p, pre + "mlp.w3")
    x = _ln(x, p, "norm")
    return _lin(x[:, 0], p, "head"), hidden


@pytest.fixture(scope="module")
def tower() -> EvaVisionTower:
    return _randomised_tower()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(1)).double()


def test_eva_clip_checkpoint_names_convert_and_match_reference(tower, pixels):
    ckpt = _as_eva_clip_checkpoint(tower)
    fresh = build_eva_model(CFG).double()
    converted = convert_eva_state_dict(ckpt, fresh)
    assert set(converted) == set(fresh.state_dict())  # text tower, logit scale and RoPE buffers dropped
    fresh.load_state_dict(converted, strict=True)
    loaded = EvaVisionTower(CFG, model=fresh)
    with torch.no_grad():
        emb, hidden = loaded(pixels)
        ref_emb, ref_hidden = eva_clip_reference(ckpt, pixels, CFG)
    assert emb.shape == (2, CFG.output_dim)
    assert [tuple(h.shape) for h in hidden] == [(2, CFG.num_tokens, CFG.width)] * 3
    # float64 throughout except timm's RoPE table (float32): agreement to ~1e-8, a naming or
    # architecture error would show as O(1) differences
    torch.testing.assert_close(emb, ref_emb, rtol=1e-6, atol=1e-6)
    for h, r in zip(hidden, ref_hidden):
        torch.testing.assert_close(h, r, rtol=1e-6, atol=1e-6)
    assert (emb - ref_emb).abs().max() < 1e-7 < emb.abs().max()


def test_hidden_states_are_block_inputs(tower, pixels):
    outputs = {}
    handles = [
        tower.model.blocks[i - 1].register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
        for i in CFG.hidden_indices if i > 0
    ]
    try:
        with torch.no_grad():
            emb, hidden = tower(pixels)
    finally:
        for h in handles:
            h.remove()
    for idx, h in zip(CFG.hidden_indices, hidden):
        # same forward pass: the tower's pre-hook and this hook see the same tensor
        assert torch.equal(h, outputs[idx]), f"hidden for block {idx} is not the output of block {idx - 1}"
    # and the final embedding is head(norm(x)[:, 0]) of the last block's output
    with torch.no_grad():
        x = tower.model.forward_features(pixels)
        expected = tower.model.head(x[:, 0])
        x_manual = tower.model.patch_embed(pixels)
        x_manual, rope = tower.model._pos_embed(x_manual)
        for blk in tower.model.blocks:
            x_manual = blk(x_manual, rope=rope)
        manual = tower.model.head(tower.model.norm(x_manual)[:, 0])
    torch.testing.assert_close(emb, expected)
    torch.testing.assert_close(emb, manual)
    assert not tower.model.blocks[0]._forward_pre_hooks  # hooks removed after the call


def test_open_clip_timm_names_convert(tower, pixels):
    """timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k stores 'visual.trunk.<timm name>'."""
    sd = {"visual.trunk." + k: v.clone() for k, v in tower.model.state_dict().items()}
    sd["text.token_embedding.weight"] = torch.randn(4, 4)
    fresh = build_eva_model(CFG).double()
    fresh.load_state_dict(convert_eva_state_dict(sd, fresh), strict=True)
    with torch.no_grad():
        a, ha = tower(pixels)
        b, hb = EvaVisionTower(CFG, model=fresh)(pixels)
    # exact: bit-copied weights (in memory) in a model built the same way, same input and ops
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ha, hb))


def test_real_config_is_timm_eva02_large_patch14_clip_336():
    import timm

    ours = build_eva_model(EVA02_CLIP_L_336, device="meta")
    with torch.device("meta"):
        ref = timm.create_model("eva02_large_patch14_clip_336", pretrained=False, num_classes=768)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert a == b
    assert a["blocks.0.mlp.fc1_g.weight"] == (2730, 1024)  # EVA-CLIP's int(1024 * 2.6667)
    assert a["pos_embed"] == (1, 577, 1024) and a["head.weight"] == (768, 1024)
    assert len([k for k in a if k.endswith("attn.q_proj.weight")]) == 24
    assert EVA02_CLIP_L_336.num_tokens == 577 and EVA02_CLIP_L_336.hidden_indices == (4, 8, 12, 16, 20)


def test_real_size_rope_matches_eva_clip():
    """The 24x24 patch grid with EVA-CLIP's 16x16 reference frequencies (pt_hw_seq_len=16, intp_freq)."""
    from timm.layers import apply_rot_embed_cat

    twin = build_eva_model(replace(EVA02_CLIP_L_336, depth=1, hidden_indices=()))
    emb = twin.rope.get_embed()
    q = torch.randn(1, 16, 576, 64, generator=torch.Generator().manual_seed(0))
    cos, sin = _eva_clip_rope(EVA02_CLIP_L_336, torch.float32)
    torch.testing.assert_close(apply_rot_embed_cat(q, emb), q * cos + _rotate_pairs(q) * sin, rtol=1e-5, atol=1e-5)


def test_tiny_config_keeps_real_indices():
    assert TINY_EVA.depth >= 21 and TINY_EVA.hidden_indices == (4, 8, 12, 16, 20)
    with pytest.raises(ValueError, match="do not exist"):
        EvaVisionConfig(depth=20)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        EvaVisionConfig(image_size=100)


def test_tower_rejects_wrong_input_size(tower):
    with pytest.raises(ValueError, match=r"\[B, 3, 56, 56\]"):
        tower(torch.zeros(1, 3, 64, 64, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["eva_clip_pt", "open_clip_safetensors"])
def test_load_eva_vision_tower_from_file(tmp_path, tower, pixels, kind):
    if kind == "eva_clip_pt":
        path = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
        torch.save(_as_eva_clip_checkpoint(tower), path)
    else:
        path = tmp_path / "open_clip_model.safetensors"
        sd = {"visual.trunk." + k: v.half() for k, v in tower.model.state_dict().items()}
        sd["text.positional_embedding"] = torch.zeros(3, 3, dtype=torch.half)
        save_file(sd, str(path))
    loaded = load_eva_vision_tower(path, CFG, dtype=torch.float64)
    assert all(not b.is_meta for b in loaded.buffers()) and all(not p.is_meta for p in loaded.parameters())
    with torch.no_grad():
        a, ha = tower(pixels)
        b, hb = loaded(pixels)
    tol = 1e-12 if kind == "eva_clip_pt" else 5e-2  # fp16 file
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    torch.testing.assert_close(hb[-1], ha[-1], rtol=tol, atol=tol)


class ArbitraryObject:
    """Stands for any pickled Python object (which could run code when unpickled)."""


def test_read_eva_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"visual.cls_token": torch.zeros(1), "obj": ArbitraryObject()}, path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_eva_state_dict(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_eva_state_dict(tmp_path / "missing.pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_eva_state_dict(bad)


def test_wrong_checkpoint_is_named(tmp_path, tower):
    sd = {"visual.trunk." + k: v for k, v in tower.model.state_dict().items()}
    sd.pop("visual.trunk.head.weight")
    sd["visual.trunk.blocks.0.attn.proj.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"missing \(head.weight\).*mis-shaped"):
        load_eva_vision_tower(path, CFG)
    text_only = tmp_path / "text.safetensors"
    save_file({"text.token_embedding.weight": torch.zeros(2, 2)}, str(text_only))
    with pytest.raises(CheckpointError, match="no vision tower"):
        load_eva_vision_tower(text_only, CFG)
    assert math.isfinite(float(tower.model.head.weight.sum()))


def test_build_respects_the_callers_default_device():
    with torch.device("meta"):
        tower = EvaVisionTower(TINY_EVA)
    assert tower.model.cls_token.is_meta
    assert build_eva_model(TINY_EVA, device="meta").blocks[0].attn.q_proj.weight.is_meta
    assert not build_eva_model(replace(TINY_EVA, depth=21)).cls_token.is_meta  # plain CPU by default
