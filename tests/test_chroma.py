"""Identity on Chroma through the one loader (a step of issue 23, tiny random-weight components).

``ChromaTransformer2DModel`` has FLUX.1's widths (so PuLID-FLUX's CA modules fit) but its single
blocks return the joint ``[text, image]`` stream instead of a ``(text, image)`` pair, it has no
guidance embedding, and ``ChromaPipeline`` runs real CFG with a negative prompt without a cache
context (the branch comes from the call order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatialid.models.configs import TINY_FLUX, TINY_PULID

SIZE = 64


@pytest.fixture(scope="module")
def chroma():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    from spatialid.pipeline.tiny import build_tiny_flux_components

    parts = build_tiny_flux_components(0)
    cfg = TINY_FLUX
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=cfg.latent_channels * 4, num_layers=cfg.num_layers,
            num_single_layers=cfg.num_single_layers, attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
            axes_dims_rope=tuple(cfg.axes_dims_rope), approximator_num_channels=16, approximator_hidden_dim=32,
            approximator_layers=1,
        ).eval()
    pipe = ChromaPipeline(
        scheduler=parts["scheduler"], vae=parts["vae"], text_encoder=parts["text_encoder_2"],
        tokenizer=parts["tokenizer_2"], transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, identity=None):
    kwargs = dict(prompt="a portrait", negative_prompt="blurry", height=SIZE, width=SIZE, num_inference_steps=3,
                  guidance_scale=3.0, output_type="np", max_sequence_length=16,
                  generator=torch.Generator().manual_seed(1))
    if identity is not None:
        kwargs["joint_attention_kwargs"] = {"identity": identity}
    with torch.no_grad():
        return pipe(**kwargs).images


def test_chroma_identity_through_load_pulid(chroma):
    from spatialid.encoder.identity_encoder import tiny_pulid_modules
    from spatialid.injection.hooks import register_innermost
    from spatialid.loaders import PuLIDIdentity, load_pulid, unload_pulid

    plain = _run(chroma)
    g = torch.Generator().manual_seed(5)
    a, b, uncond = (torch.randn(1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim, generator=g) for _ in range(3))
    load_pulid(chroma, tiny_pulid_modules(0), config=TINY_PULID)
    try:
        # weight 0: Chroma's own output, bit for bit (both CFG branches untouched)
        assert np.array_equal(_run(chroma, PuLIDIdentity(a, uncond, id_weight=0.0)), plain)
        # a single block's text tokens never change: the identity goes to the image tokens only
        from diffusers.hooks.hooks import HookRegistry, ModelHook

        block = chroma.transformer.single_transformer_blocks[0]
        before, after = [], []

        class Before(ModelHook):
            def post_forward(self, module, output):
                before.append(output.clone())
                return output

        register_innermost(block, Before(), "test_before")
        handle = block.register_forward_hook(lambda m, i, o: after.append(o.clone()))
        identity = PuLIDIdentity([a, b], [uncond, uncond], preset="paper", record_masks=True, height=SIZE, width=SIZE)
        try:
            with_id = _run(chroma, identity)
        finally:
            handle.remove()
            HookRegistry.check_if_exists_or_initialize(block).remove_hook("test_before", recurse=False)
        assert np.abs(with_id - plain).max() > 1e-3
        n_image = (SIZE // 16) ** 2
        for x, y in zip(before, after):
            n_text = x.shape[1] - n_image
            assert torch.equal(x[:, :n_text], y[:, :n_text])
            assert not torch.equal(x[:, n_text:], y[:, n_text:])
        # real CFG: both branches of every step carry their own identity tokens, masks per person
        assert {(r.step, r.branch) for r in identity.records} == {(s, br) for s in range(3) for br in ("cond", "uncond")}
        assert identity.records[0].mask.shape == (2, 1, n_image)
    finally:
        unload_pulid(chroma)
    assert np.array_equal(_run(chroma), plain)
