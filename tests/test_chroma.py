"""Identity on Chroma through the one loader, the ``tiny-chroma`` model, and models that do not fit (issue 23).

``ChromaTransformer2DModel`` has FLUX.1's widths (so PuLID-FLUX's CA modules fit) but its single
blocks return the joint ``[text, image]`` stream instead of a ``(text, image)`` pair, it has no
guidance embedding, and ``ChromaPipeline`` runs real CFG with a negative prompt without a cache
context (the branch comes from the call order).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spatialid.models.configs import TINY_PULID

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
STEPS = 3


@pytest.fixture(scope="module")
def chroma():
    from diffusers import ChromaPipeline

    from spatialid.pipeline.tiny import build_tiny_chroma_components

    pipe = ChromaPipeline(**build_tiny_chroma_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_chroma():
    """``--model tiny-chroma`` as the front-ends load it (the runner over ChromaIdentityPipeline)."""
    from spatialid.app.loading import Models, ModelSpec

    pipe = Models(ModelSpec(model="tiny-chroma", device="cpu")).pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, identity=None, **extra):
    kwargs = dict(prompt="a portrait", negative_prompt="blurry", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  guidance_scale=3.0, output_type="np", max_sequence_length=16,
                  generator=torch.Generator().manual_seed(1), **extra)
    if identity is not None:
        kwargs["joint_attention_kwargs"] = {"identity": identity}
    with torch.no_grad():
        return pipe(**kwargs).images


def _plain(chroma, *, seed, true_cfg, **extra):
    """diffusers' own ChromaPipeline on the same weights, as the runner calls it."""
    from spatialid.pipeline.outputs import seed_generators

    kwargs = dict(prompt="a portrait", height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=true_cfg,
                  output_type="np", max_sequence_length=32, generator=seed_generators(seed, 1), **extra)
    if true_cfg > 1:
        kwargs["negative_prompt"] = "blurry"
    with torch.no_grad():
        return chroma(**kwargs).images


def _ours(pipe, *, seed, true_cfg, **extra):
    return pipe("a portrait", height=SIZE, width=SIZE, num_inference_steps=STEPS, true_cfg=true_cfg,
                negative_prompt="blurry", seed=seed, output_type="np", max_sequence_length=32, **extra)


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
        assert {(r.step, r.branch) for r in identity.records} == {(s, br) for s in range(STEPS) for br in ("cond", "uncond")}
        assert identity.records[0].mask.shape == (2, 1, n_image)
    finally:
        unload_pulid(chroma)
    assert np.array_equal(_run(chroma), plain)


# ----------------------------------------------------------------------------- --model tiny-chroma


def test_tiny_chroma_is_chroma_with_identity(tiny_chroma, chroma, embeds_file):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    assert isinstance(tiny_chroma.pipe, ChromaPipeline) and tiny_chroma.is_tiny
    assert isinstance(tiny_chroma.transformer, ChromaTransformer2DModel)
    # the same weights as the plain tiny Chroma of seed 0
    for (name, p), (_, q) in zip(tiny_chroma.transformer.state_dict().items(), chroma.transformer.state_dict().items()):
        assert torch.equal(p, q), name
    for true_cfg in (1.0, 3.0):
        plain = _plain(chroma, seed=7, true_cfg=true_cfg)
        # id weight 0 (and CFG from step 0): exactly Chroma's own output, both with and without real CFG
        zero = _ours(tiny_chroma, seed=7, true_cfg=true_cfg, id_embeds=embeds_file, id_weight=0.0, cfg_start_step=0)
        assert np.array_equal(zero.images, plain)
        out = _ours(tiny_chroma, seed=7, true_cfg=true_cfg, id_embeds=embeds_file, return_masks=True)
        assert np.abs(out.images - plain).max() > 1e-3
        assert out.settings["model"] == "tiny-chroma" and out.settings["identity_injected"]
        assert out.settings["true_cfg"] == true_cfg and len(out.masks) == STEPS
    # real CFG: the identity's uncond tokens go to the negative branch of every step
    records = tiny_chroma.injector.last_identity.records
    assert {r.branch for r in records} == {"cond", "uncond"}


def test_tiny_chroma_people_regions_and_mask_files(tiny_chroma, embeds_file, tmp_path):
    from spatialid.encoder.embedding import IdentityEmbedding

    other = IdentityEmbedding.load(embeds_file)
    other = IdentityEmbedding(tokens=other.tokens.flip(1), uncond_tokens=other.uncond_tokens)
    masks = tmp_path / "m.safetensors"
    kwargs = dict(people=[embeds_file, other], regions=["0,0,0.5,1", "0.5,0,1,1"], return_masks=True)
    out = _ours(tiny_chroma, seed=3, true_cfg=2.0, save_masks=masks, **kwargs)
    people = out.masks[-1].people  # [points, persons, batch, rows, cols]
    assert people.shape[1] == 2  # one mask per person
    cols = SIZE // 16
    left, right = people[:, 0], people[:, 1]
    assert float(left[..., cols // 2:].max()) == 0.0 and float(right[..., : cols // 2].max()) == 0.0
    assert float(left[..., : cols // 2].max()) > 0.0 and float(right[..., cols // 2:].max()) > 0.0
    again = _ours(tiny_chroma, seed=3, true_cfg=2.0, masks_from=masks, **kwargs)
    assert np.array_equal(again.images, out.images)  # replayed masks: the same image


def test_tiny_chroma_img2img_and_inpaint(tiny_chroma, tmp_path, embeds_file):
    from diffusers import ChromaImg2ImgPipeline, ChromaInpaintPipeline
    from PIL import Image

    from spatialid.pipeline.variants import IdentityPipelineRunner, variant_pipeline

    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype("uint8")).save(init)
    mask = tmp_path / "mask.png"
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[:, SIZE // 2:] = 255
    Image.fromarray(m).save(mask)
    base = tiny_chroma.base
    for mode, cls, extra in (("img2img", ChromaImg2ImgPipeline, {}), ("inpaint", ChromaInpaintPipeline, {"inpaint_mask": mask})):
        runner = IdentityPipelineRunner(variant_pipeline(base, mode), base, mode)
        runner.set_progress_bar_config(disable=True)
        assert isinstance(runner.pipe, cls)
        assert runner.injector is tiny_chroma.injector  # one injector on the shared transformer
        # what the diffusers pipeline lacks comes from the base (the web UI reads these off any pipeline)
        assert runner.model_info["model"] == "tiny-chroma" and runner.default_height == base.default_height == 256
        kwargs = dict(init_image=init, strength=0.8, id_embeds=embeds_file, **extra)
        zero = _ours(runner, seed=2, true_cfg=2.0, id_weight=0.0, cfg_start_step=0, **kwargs)
        out = _ours(runner, seed=2, true_cfg=2.0, **kwargs)
        assert out.settings["pipeline"] == mode and np.abs(out.images - zero.images).max() > 1e-3
        if mode == "inpaint":  # identity only where the picture is repainted (the mask's right half)
            masks = _ours(runner, seed=2, true_cfg=2.0, return_masks=True, **kwargs).masks[-1].masks
            assert float(masks[..., : (SIZE // 16) // 2].max()) == 0.0 and float(masks.max()) > 0.0


def test_chroma_refuses_flux_only_pipelines(tmp_path):
    from spatialid.app.loading import ModelSpec
    from spatialid.errors import SpatialIDError

    with pytest.raises(SpatialIDError, match="Chroma model, which has no kontext pipeline"):
        ModelSpec(model="tiny-chroma", device="cpu", pipeline="kontext").check()
    with pytest.raises(SpatialIDError, match="--quantize applies to real FLUX weights, not to --model tiny-chroma"):
        ModelSpec(model="tiny-chroma", device="cpu", quantize="nf4").check()
    # diffusers registers no Chroma blocks for First Block Cache (it raised "Model class ... not registered")
    with pytest.raises(SpatialIDError, match="First Block Cache does not support Chroma"):
        ModelSpec(model="tiny-chroma", device="cpu", cache="fbc").check()
    ModelSpec(model="tiny-chroma", device="cpu", cache="taylorseer").check()  # TaylorSeer and PAB work


# ----------------------------------------------------------------------------- the CLI


def _cli(argv, capsys):
    from spatialid.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_tiny_chroma(tmp_path, embeds_file, capsys):
    from spatialid.app.metadata import read_png_metadata

    out = tmp_path / "c.png"
    code, _, err = _cli(["generate", "--model", "tiny-chroma", "--size", "64x64", "--steps", 2, "--id-embeds", embeds_file,
                         "-p", "a portrait", "--seed", 4, "--true-cfg", 2, "--negative-prompt", "blurry", "--out", out,
                         "--masks"], capsys)
    assert code == 0, err
    s = read_png_metadata(out)
    assert s["model"] == "tiny-chroma" and s["true_cfg"] == 2.0 and s["negative_prompt"] == "blurry"
    assert s["identity_injected"] and (tmp_path / "c_masks.png").is_file()




def test_chroma_defaults_to_its_own_cfg_flux_to_none(tmp_path, embeds_file, capsys):
    """Chroma has no guidance embedding: without --true-cfg it gets diffusers' ChromaPipeline scale, FLUX.1 stays off."""
    from spatialid import defaults as D
    from spatialid.app.metadata import read_png_metadata

    for model, expected in (("tiny-chroma", D.CHROMA_TRUE_CFG), ("tiny", D.DEFAULT_TRUE_CFG)):
        out = tmp_path / f"{model}.png"
        code, _, err = _cli(["generate", "--model", model, "--size", "64x64", "--steps", 1, "--id-embeds", embeds_file,
                             "-p", "a portrait", "--seed", 1, "--out", out], capsys)
        assert code == 0, err
        assert read_png_metadata(out)["true_cfg"] == expected

def test_bench_runs_on_tiny_chroma(tmp_path, bench_inputs, capsys):
    """The bench takes ``--model tiny-chroma`` as it takes ``tiny`` (it was refused as a hub id before)."""
    from spatialid.bench.results import load_preset_results

    _, ids, prompts = bench_inputs
    out = tmp_path / "bench"
    code, _, err = _cli(["bench", "--ids", ids, "--prompts", prompts, "--limit-ids", 1, "--limit-prompts", 1,
                         "--presets", "pulid", "--model", "tiny-chroma", "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((out / "bench.json").read_text())["settings"]["model"] == "tiny-chroma"
    entries, failures = load_preset_results(out / "pulid")
    assert len(entries) == 1 and not failures

def _fake_model(root, class_name, transformer):
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": class_name, "transformer": ["diffusers", "X"]}))
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(transformer))
    return root


FLUX1 = {"num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 19, "num_single_layers": 38}


@pytest.mark.parametrize(
    "class_name, transformer, expected",
    [
        ("Flux2Pipeline", {"num_attention_heads": 48, "attention_head_dim": 128, "num_layers": 8, "num_single_layers": 48},
         "inner dim 6144 (48 heads x 128) vs 3072, 8 double / 48 single blocks take 16 CA modules"),
        ("QwenImagePipeline", {"num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 60},
         "60 double / 0 single blocks take 30 CA modules vs the weights' 20 (FLUX.1: 19 / 38)"),
        ("StableDiffusion3Pipeline", {"num_attention_heads": 24, "attention_head_dim": 64, "num_layers": 24},
         "inner dim 1536 (24 heads x 64) vs 3072"),
    ],
)
def test_models_that_do_not_fit_are_refused_before_loading(tmp_path, capsys, embeds_file, class_name, transformer, expected):
    folder = _fake_model(tmp_path / "m", class_name, transformer)  # config files only: nothing could load
    code, _, err = _cli(["generate", "--model", folder, "--id-embeds", embeds_file, "-p", "x", "--out", tmp_path / "o.png",
                         "--device", "cpu"], capsys)
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("spatialid: error:")]
    assert len(lines) == 1 and class_name in lines[0] and expected in lines[0], err
    assert not (tmp_path / "o.png").exists()


def test_family_from_model_index(tmp_path):
    from spatialid.app.loading import ModelSpec
    from spatialid.errors import SpatialIDError

    assert ModelSpec(model=str(_fake_model(tmp_path / "c", "ChromaPipeline", FLUX1))).family == "chroma"
    schnell = _fake_model(tmp_path / "k", "FluxPipeline", {**FLUX1, "guidance_embeds": False})  # schnell's config
    assert ModelSpec(model=str(schnell), device="cpu").check().family == "flux"  # fits: nothing refused
    assert ModelSpec(model="tiny-chroma").family == "chroma" and ModelSpec(model="tiny").family == "flux"
    # a Chroma class whose transformer is not FLUX.1-sized: refused with its shapes
    odd = _fake_model(tmp_path / "o", "ChromaPipeline", {**FLUX1, "num_single_layers": 20})
    with pytest.raises(SpatialIDError, match="19 double / 20 single blocks take 15 CA modules"):
        ModelSpec(model=str(odd), device="cpu").check()


def test_schnell_transformer_without_guidance_embedding_takes_identity(embeds_file):
    """FLUX.1-schnell's transformer has no guidance embedding (FluxPipeline then passes no guidance)."""
    import diffusers

    from spatialid.encoder.identity_encoder import tiny_pulid_modules
    from spatialid.pipeline.outputs import seed_generators
    from spatialid.pipeline.pipeline_spatialid import SpatialIDPipeline
    from spatialid.pipeline.tiny import build_tiny_flux_components

    parts = build_tiny_flux_components(0, guidance_embeds=False)
    assert parts["transformer"].config.guidance_embeds is False
    plain = diffusers.FluxPipeline(**parts)
    pipe = SpatialIDPipeline(**parts)
    for p in (plain, pipe):
        p.set_progress_bar_config(disable=True)
    idformer, cas = tiny_pulid_modules(0)
    pipe.attach_pulid(cas, idformer=idformer, double_interval=TINY_PULID.double_interval,
                      single_interval=TINY_PULID.single_interval)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="np", max_sequence_length=32)
    ref = plain("a portrait", generator=seed_generators(3, 1), **kw).images
    assert np.array_equal(pipe("a portrait", id_embeds=embeds_file, id_weight=0.0, seed=3, **kw).images, ref)
    out = pipe("a portrait", id_embeds=embeds_file, seed=3, return_masks=True, **kw)
    assert np.abs(out.images - ref).max() > 1e-3 and out.settings["identity_injected"] and len(out.masks) == 2


def test_web_ui_generates_on_tiny_chroma(tiny_chroma, photo_dir, tmp_path):
    """``serve --model tiny-chroma``: the form's request runs on Chroma, real CFG included."""
    from spatialid.app.metadata import read_png_metadata
    from spatialid import defaults as D
    from spatialid.ui import handlers as h

    defaults, _ = h.defaults_for(tiny_chroma)
    assert (defaults.width, defaults.height) == (128, 128)  # the tiny model's UI size
    assert defaults.true_cfg == D.CHROMA_TRUE_CFG  # the form's CFG slider starts on for Chroma
    form = dict(photos=[str(photo_dir / "astronaut.png")], prompt="portrait photo", negative_prompt="blurry",
                preset="paper", id_weight=1.0, start_step=0, true_cfg=2.0, steps=2, guidance=4.0, width=64, height=64,
                seed="5", num_images=1, compare=False, compare_presets=None)
    result = h.run_generation(tiny_chroma, h.build_request(**form), tmp_path / "out")
    meta = read_png_metadata(result.image_files[0])
    assert meta["model"] == "tiny-chroma" and meta["true_cfg"] == 2.0 and meta["negative_prompt"] == "blurry"
    assert meta["identity_injected"] and meta["interface"] == "web" and result.mask_picture is not None
