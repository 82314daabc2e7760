"""PuLID-FLUX modules: checkpoint-compatible parameter layout and forward behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spatialid.models import (
    PULID_FLUX,
    TINY_PULID,
    IDFormer,
    IDFormerConfig,
    PerceiverAttentionCA,
    PerceiverCAConfig,
    expected_pulid_layout,
)


def _shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _part(layout: dict[str, list[int]], prefix: str) -> dict[str, list[int]]:
    return {k[len(prefix) :]: v for k, v in layout.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- layout


def test_idformer_state_dict_equals_published_encoder(pulid_layout):
    with torch.device("meta"):
        model = IDFormer()
    expected = _part(pulid_layout, "pulid_encoder.")
    assert len(expected) == 172
    got = _shapes(model)
    assert got == expected
    assert list(got) == list(expected)  # same order, too


def test_every_ca_state_dict_equals_published_ca(pulid_layout):
    with torch.device("meta"):
        ca = PerceiverAttentionCA()
    got = _shapes(ca)
    indices = sorted({int(k.split(".")[1]) for k in pulid_layout if k.startswith("pulid_ca.")})
    assert indices == list(range(20))
    for i in indices:
        assert _part(pulid_layout, f"pulid_ca.{i}.") == got, i


def test_full_layout_covers_all_tensors_and_parameters(pulid_layout, pulid_layout_doc):
    info = pulid_layout_doc  # tests/data/pulid_flux_checkpoint_layout.json (conftest)
    layout = expected_pulid_layout(PULID_FLUX)
    assert {k: list(v) for k, v in layout.items()} == pulid_layout
    assert len(layout) == info["num_tensors"] == 312
    assert sum(math.prod(s) for s in layout.values()) == info["num_parameters"] == 571_033_600
    with torch.device("meta"):
        n = sum(p.numel() for p in IDFormer().parameters())
        n += 20 * sum(p.numel() for p in PerceiverAttentionCA().parameters())
    assert n == info["num_parameters"]


def test_from_config_and_pulid_config():
    m = IDFormer.from_config(TINY_PULID.idformer)
    assert m.pulid_config == TINY_PULID.idformer
    ca = PerceiverAttentionCA.from_config(TINY_PULID.ca)
    assert ca.pulid_config == TINY_PULID.ca
    with torch.device("meta"):
        assert IDFormer().pulid_config == IDFormerConfig()
        assert PerceiverAttentionCA().pulid_config == PerceiverCAConfig()
        # diffusers' own config (a FrozenDict) rebuilds the same module, too
        again = IDFormer.from_config(m.config)
        assert again.pulid_config == TINY_PULID.idformer and _shapes(again) == _shapes(m)
        assert PerceiverAttentionCA.from_config(dict(ca.config)).pulid_config == TINY_PULID.ca
    assert m.config.dim == 32 and m.config["mapping_dim"] == 32  # FrozenDict: attribute and item access
    assert IDFormerConfig().mapping_dim == 1024 and TINY_PULID.idformer.mapping_dim == 32


def test_from_config_with_dataclass_takes_no_overrides():
    with pytest.raises(TypeError, match="replace"):
        IDFormer.from_config(TINY_PULID.idformer, dim=64)
    with pytest.raises(TypeError, match="replace"):
        PerceiverAttentionCA.from_config(TINY_PULID.ca, return_unused_kwargs=True)


def _reference_rule_shapes(
    dim: int = 1024,
    depth: int = 10,
    dim_head: int = 64,
    heads: int = 16,
    num_id_token: int = 5,
    num_queries: int = 32,
    output_dim: int = 2048,
    ff_mult: int = 4,
) -> dict[str, list[int]]:
    """State_dict of the reference IDFormer constructor, written from its rule (not its code).

    Its input MLPs have a hidden width fixed at 1024 whatever ``dim`` is; the inputs are the
    1024-d EVA-CLIP hidden states and the 1280-d identity condition.
    """
    inner, hidden = dim_head * heads, dim * ff_mult
    out: dict[str, list[int]] = {"latents": [1, num_queries, dim], "proj_out": [dim, output_dim]}
    for i in range(depth):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        out.update({
            a + "norm1.weight": [dim], a + "norm1.bias": [dim], a + "norm2.weight": [dim], a + "norm2.bias": [dim],
            a + "to_q.weight": [inner, dim], a + "to_kv.weight": [2 * inner, dim], a + "to_out.weight": [dim, inner],
            f + "0.weight": [dim], f + "0.bias": [dim], f + "1.weight": [hidden, dim], f + "3.weight": [dim, hidden],
        })

    def mlp(prefix: str, in_dim: int, out_dim: int) -> None:
        out.update({
            prefix + "0.weight": [1024, in_dim], prefix + "0.bias": [1024],
            prefix + "1.weight": [1024], prefix + "1.bias": [1024],
            prefix + "3.weight": [1024, 1024], prefix + "3.bias": [1024],
            prefix + "4.weight": [1024], prefix + "4.bias": [1024],
            prefix + "6.weight": [out_dim, 1024], prefix + "6.bias": [out_dim],
        })

    for i in range(5):
        mlp(f"mapping_{i}.", 1024, dim)
    mlp("id_embedding_mapping.", 1280, dim * num_id_token)
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"dim": 512, "depth": 5, "output_dim": 256},
        {"dim": 768, "depth": 15, "dim_head": 32, "heads": 8, "num_id_token": 3, "num_queries": 16,
         "output_dim": 1024, "ff_mult": 2},
        {"dim": 2048, "depth": 5, "heads": 4, "num_id_token": 1, "num_queries": 8, "output_dim": 3072, "ff_mult": 1},
    ],
    ids=["default", "dim512", "dim768-depth15", "dim2048"],
)
def test_reference_constructor_arguments_give_reference_state_dict(kwargs):
    """Any argument set of the reference constructor gives its names, shapes and order here."""
    with torch.device("meta"):
        model = IDFormer(**kwargs)
    expected = _reference_rule_shapes(**kwargs)
    got = _shapes(model)
    assert got == expected
    assert list(got) == list(expected)
    assert model.pulid_config.mapping_dim == 1024


def test_tiny_idformer_keeps_its_reduced_mapping_width():
    """TINY_PULID sets mapping_dim=32: the tiny tensors (and their random init) are unchanged."""
    with torch.device("meta"):
        m = IDFormer.from_config(TINY_PULID.idformer)
    assert m.mapping_0[0].weight.shape == (32, 32) and m.mapping_4[6].weight.shape == (32, 32)
    assert m.id_embedding_mapping[0].weight.shape == (32, 160)
    assert m.id_embedding_mapping[6].weight.shape == (64, 32)
    assert sum(p.numel() for p in m.parameters()) == 57_760


def test_idformer_init_statistics():
    torch.manual_seed(0)
    m = IDFormer(dim=64, depth=5, dim_head=8, heads=2, num_id_token=2, num_queries=16, output_dim=48, vit_dim=24,
                 mapping_dim=40)
    # latents and proj_out ~ N(0, 1/dim)
    assert m.latents.std().item() == pytest.approx(64**-0.5, rel=0.15)
    assert m.proj_out.std().item() == pytest.approx(64**-0.5, rel=0.1)
    assert m.mapping_0[0].in_features == 24 and m.id_embedding_mapping[0].in_features == 1280
    assert m.mapping_0[3].in_features == 40 and m.id_embedding_mapping[6].in_features == 40
    assert m.id_embedding_mapping[6].out_features == 128


@pytest.mark.parametrize("depth", [0, 3, 7, -5])
def test_idformer_rejects_depth_not_multiple_of_5(depth):
    with pytest.raises(ValueError, match="multiple of 5"):
        IDFormer(dim=8, depth=depth)


# ----------------------------------------------------------------------------- IDFormer forward


def _tiny_inputs(b: int, cfg: IDFormerConfig = TINY_PULID.idformer, lengths=(7, 7, 7, 7, 7), dtype=torch.float32):
    g = torch.Generator().manual_seed(b)
    id_cond = torch.randn(b, cfg.id_cond_dim, generator=g, dtype=dtype)
    vit = [torch.randn(b, n, cfg.vit_dim, generator=g, dtype=dtype) for n in lengths]
    return id_cond, vit


def _reference_idformer(m: IDFormer, id_cond: torch.Tensor, vit: list[torch.Tensor]) -> torch.Tensor:
    """Explicit re-statement of the published forward (q and k each scaled by dim_head**-0.25)."""
    cfg = m.pulid_config

    def attn(layer, ctx, lat):
        ctx, lat = layer.norm1(ctx), layer.norm2(lat)
        b, n, _ = lat.shape
        q = layer.to_q(lat)
        k, v = layer.to_kv(torch.cat([ctx, lat], 1)).chunk(2, -1)
        split = lambda t: t.reshape(b, t.shape[1], cfg.heads, cfg.dim_head).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        s = cfg.dim_head**-0.25
        w = torch.softmax((q * s) @ (k * s).transpose(-1, -2), -1)
        return layer.to_out((w @ v).permute(0, 2, 1, 3).reshape(b, n, -1))

    b = id_cond.shape[0]
    x = m.id_embedding_mapping(id_cond).reshape(b, cfg.num_id_token, cfg.dim)
    lat = torch.cat([m.latents.repeat(b, 1, 1), x], 1)
    per = cfg.depth // 5
    for i in range(5):
        ctx = torch.cat([x, getattr(m, f"mapping_{i}")(vit[i])], 1)
        for a, ff in m.layers[i * per : (i + 1) * per]:
            lat = attn(a, ctx, lat) + lat
            lat = ff(lat) + lat
    return lat[:, : cfg.num_queries] @ m.proj_out


@pytest.mark.parametrize("b", [1, 3])
def test_idformer_forward_shape_and_reference(b):
    torch.manual_seed(0)
    m = IDFormer.from_config(TINY_PULID.idformer).eval()
    id_cond, vit = _tiny_inputs(b, lengths=(5, 6, 7, 8, 9))  # levels may differ in length
    with torch.no_grad():
        out = m(id_cond, vit)
        ref = _reference_idformer(m, id_cond, vit)
    assert out.shape == (b, 4, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_idformer_batch_samples_are_independent():
    torch.manual_seed(1)
    m = IDFormer.from_config(TINY_PULID.idformer).eval()
    id_cond, vit = _tiny_inputs(3)
    with torch.no_grad():
        full = m(id_cond, vit)
        for i in range(3):
            one = m(id_cond[i : i + 1], [h[i : i + 1] for h in vit])
            torch.testing.assert_close(full[i : i + 1], one, rtol=1e-5, atol=1e-5)


def test_idformer_multi_image_id_cond_gives_more_identity_tokens():
    torch.manual_seed(2)
    m = IDFormer.from_config(TINY_PULID.idformer).eval()
    id_cond, vit = _tiny_inputs(2)
    with torch.no_grad():
        out = m(id_cond[:, None].expand(-1, 3, -1), vit)
    assert out.shape == (2, 4, 32) and torch.isfinite(out).all()


def test_idformer_bf16_forward_close_to_fp32():
    torch.manual_seed(3)
    m = IDFormer.from_config(TINY_PULID.idformer).eval()
    id_cond, vit = _tiny_inputs(2)
    with torch.no_grad():
        ref = m(id_cond, vit)
        out = m.to(torch.bfloat16)(id_cond.bfloat16(), [h.bfloat16() for h in vit])
        mixed = m(id_cond, vit)  # fp32 inputs are cast to the weights' dtype
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert torch.equal(out, mixed)  # the model's input cast is the same .to(bfloat16) as the test's
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.02


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda c, v: (c[:, :100], v), "id_cond must be"),
        (lambda c, v: (c[0], v), "id_cond must be"),
        (lambda c, v: (c, v[:4]), "list of 5"),
        (lambda c, v: (c, torch.stack(v)), "list of 5"),
        (lambda c, v: (c, [*v[:4], v[4][:, :, :16]]), r"vit_hidden\[4\]"),
        (lambda c, v: (c, [v[0][:1], *v[1:]]), r"vit_hidden\[0\]"),
    ],
)
def test_idformer_rejects_bad_inputs(make, match):
    m = IDFormer.from_config(TINY_PULID.idformer)
    id_cond, vit = _tiny_inputs(2)
    with pytest.raises(ValueError, match=match):
        m(*make(id_cond, vit))


# ----------------------------------------------------------------------------- CA forward


def _explicit_ca(ca: PerceiverAttentionCA, id_tokens: torch.Tensor, latents: torch.Tensor):
    """softmax(Q K^T / sqrt(d)) V written out, keys/values from the identity tokens only."""
    b, n, _ = latents.shape
    q = ca.to_q(ca.norm2(latents))
    k, v = ca.to_kv(ca.norm1(id_tokens.expand(b, -1, -1))).chunk(2, -1)
    split = lambda t: t.reshape(b, t.shape[1], ca.heads, ca.dim_head).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(ca.dim_head), dim=-1)
    raw = (w @ v).transpose(1, 2).reshape(b, n, -1)
    return ca.to_out(raw), raw


@pytest.mark.parametrize("b, n_img, n_id", [(1, 16, 4), (3, 1, 4), (2, 37, 1), (2, 64, 32)])
def test_ca_matches_explicit_softmax_attention(b, n_img, n_id):
    torch.manual_seed(4)
    ca = PerceiverAttentionCA(dim=48, dim_head=16, heads=3, kv_dim=40).eval()
    id_tokens = torch.randn(b, n_id, 40)
    latents = torch.randn(b, n_img, 48)
    with torch.no_grad():
        out, raw = ca(id_tokens, latents, return_raw=True)
        ref_out, ref_raw = _explicit_ca(ca, id_tokens, latents)
        plain = ca(id_tokens, latents)
    assert out.shape == (b, n_img, 48) and raw.shape == (b, n_img, 48)
    torch.testing.assert_close(raw, ref_raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, out)  # return_raw only also returns raw: same kernel path
    torch.testing.assert_close(ca.to_out(raw), out, rtol=0, atol=0)


def test_ca_raw_width_is_heads_times_dim_head():
    ca = PerceiverAttentionCA(dim=32, dim_head=8, heads=2, kv_dim=16)  # inner (16) != dim (32)
    out, raw = ca(torch.randn(2, 3, 16), torch.randn(2, 5, 32), return_raw=True)
    assert out.shape == (2, 5, 32) and raw.shape == (2, 5, 16)


def test_ca_image_tokens_do_not_attend_to_each_other():
    torch.manual_seed(5)
    ca = PerceiverAttentionCA.from_config(TINY_PULID.ca)
    id_tokens = torch.randn(2, 4, 32)
    latents = torch.randn(2, 10, TINY_PULID.ca.dim)
    with torch.no_grad():
        full = ca(id_tokens, latents)
        part = ca(id_tokens, latents[:, 3:6])
        single = ca(id_tokens, latents[:, 7:8])  # N = 1
    torch.testing.assert_close(full[:, 3:6], part, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full[:, 7:8], single, rtol=1e-5, atol=1e-6)


def test_ca_shared_identity_broadcasts_over_batch():
    torch.manual_seed(6)
    ca = PerceiverAttentionCA(dim=32, dim_head=8, heads=4, kv_dim=24)
    id_tokens = torch.randn(1, 6, 24)
    latents = torch.randn(3, 9, 32)
    with torch.no_grad():
        shared, raw = ca(id_tokens, latents, return_raw=True)
        repeated, raw_rep = ca(id_tokens.repeat(3, 1, 1), latents, return_raw=True)
    torch.testing.assert_close(shared, repeated, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(raw, raw_rep, rtol=1e-6, atol=1e-6)


def test_ca_per_sample_identities_differ():
    torch.manual_seed(7)
    ca = PerceiverAttentionCA(dim=32, dim_head=8, heads=4, kv_dim=24)
    id_tokens = torch.randn(2, 6, 24)
    latents = torch.randn(1, 9, 32).expand(2, -1, -1)  # same image, two identities (true CFG)
    with torch.no_grad():
        out = ca(id_tokens, latents)
        first = ca(id_tokens[:1], latents[:1])
    torch.testing.assert_close(out[:1], first, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], out[1])


def test_ca_bf16_and_mixed_dtypes():
    torch.manual_seed(8)
    ca = PerceiverAttentionCA(dim=64, dim_head=16, heads=4, kv_dim=32)
    id_tokens, latents = torch.randn(2, 8, 32), torch.randn(2, 20, 64)
    with torch.no_grad():
        ref = ca(id_tokens, latents)
        ca_bf = ca.to(torch.bfloat16)
        out, raw = ca_bf(id_tokens.bfloat16(), latents.bfloat16(), return_raw=True)
        mixed = ca_bf(id_tokens, latents)  # fp32 inputs, bf16 weights: output in the latents' dtype
    assert out.dtype == torch.bfloat16 and raw.dtype == torch.bfloat16
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, out.float(), rtol=0, atol=0)  # same bf16 computation; bf16 -> f32 is exact
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize(
    "id_shape, lat_shape, match",
    [
        ((2, 4, 31), (2, 5, 32), "id_tokens must be"),
        ((2, 4, 16), (2, 5, 33), "latents must be"),
        ((4, 16), (2, 5, 32), "id_tokens must be"),
        ((2, 4, 16), (5, 32), "latents must be"),
        ((2, 4, 16), (3, 5, 32), "batch"),
        ((2, 0, 16), (2, 5, 32), "at least one identity token"),
    ],
)
def test_ca_rejects_bad_shapes(id_shape, lat_shape, match):
    ca = PerceiverAttentionCA(dim=32, dim_head=8, heads=2, kv_dim=16)
    with pytest.raises(ValueError, match=match):
        ca(torch.randn(id_shape), torch.randn(lat_shape))


def test_ca_noncontiguous_latents():
    torch.manual_seed(9)
    ca = PerceiverAttentionCA(dim=32, dim_head=8, heads=2, kv_dim=16)
    base = torch.randn(2, 32, 12)
    latents = base.transpose(1, 2)  # [2, 12, 32], not contiguous
    id_tokens = torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(ca(id_tokens, latents), ca(id_tokens, latents.contiguous()))


def test_ca_uses_fused_attention(monkeypatch):
    """The fused kernel is what runs (issue 6 performance); the scale passed is 1/sqrt(dim_head)."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("scale"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ca = PerceiverAttentionCA(dim=32, dim_head=16, heads=2, kv_dim=16)
    ca(torch.randn(1, 3, 16), torch.randn(1, 5, 32))
    assert calls == [pytest.approx(0.25)]
