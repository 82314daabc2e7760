"""One identity path: one loader, one injection path, one mask function, and the seams that broke.

Each test here failed on the code before the one-path rework (0.1.x): compiled mask recording,
load_pulid under torch.compile(fullgraph=True), diffusers' own First Block Cache injecting twice,
First Block Cache on pipelines without a cache context, two injectors on one transformer, a box
region leaking into the next token row, several people refused outside text-to-image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatialid.models.configs import TINY_PULID

SIZE = 64
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    from spatialid.pipeline import SpatialIDPipeline

    pipe = SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(21)
    shape = (1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _flux(base, cls_name: str = "FluxPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls_name)(**base.flux_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plain_kwargs(base, **extra):
    args = dict(
        height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", guidance_scale=3.5,
        max_sequence_length=base.default_max_sequence_length,
        generator=[torch.Generator().manual_seed(9)],
    )
    args.update(extra)
    return args


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_spatialid_pipeline_equals_load_pulid_on_flux_pipeline(base, tokens, true_cfg):
    """SpatialIDPipeline is FluxPipeline + the one loader: the same image bit for bit."""
    from spatialid.loaders import PuLIDIdentity

    ours = base(
        "a portrait", id_embeds=tokens[0], uncond_id_embeds=tokens[1], preset="relaxed", true_cfg=true_cfg,
        cfg_start_step=0, height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=9, guidance_scale=3.5,
        output_type="np",
    ).images
    flux = _flux(base)  # the same transformer: its injector is shared, not doubled
    extra = {"true_cfg_scale": true_cfg, "negative_prompt": ""} if true_cfg > 1 else {}
    identity = PuLIDIdentity(tokens[0], tokens[1], preset="relaxed")
    theirs = flux("a portrait", **_plain_kwargs(base, joint_attention_kwargs={"identity": identity}, **extra)).images
    assert np.array_equal(ours, theirs)


def test_one_injector_per_transformer(base):
    """A second pipeline on the same components shares the transformer's hooks (0.1.x added a second set)."""
    from spatialid.injection.hooks import CALL_HOOK, POINT_HOOK
    from spatialid.pipeline.variants import variant_pipeline

    img2img = variant_pipeline(base, "img2img")
    block = base.transformer.transformer_blocks[0]
    assert list(block._diffusers_hook.hooks).count(POINT_HOOK) == 1
    assert list(base.transformer._diffusers_hook.hooks).count(CALL_HOOK) == 1
    assert img2img._spatialid_pulid.injector is base.injector
    from spatialid.loaders import unload_pulid

    unload_pulid(img2img)  # the other pipeline still has its identity
    assert base.injector is not None and base.injector.attached


def test_set_pulid_scale_scales_the_identity(base, tokens):
    from spatialid.loaders import set_pulid_scale

    kwargs = dict(id_embeds=tokens[0], preset="pulid", height=SIZE, width=SIZE, num_inference_steps=2, seed=1,
                  output_type="np")
    half = base("x", id_weight=0.5, **kwargs).images
    set_pulid_scale(base, 0.5)
    try:
        scaled = base("x", id_weight=1.0, **kwargs).images
    finally:
        set_pulid_scale(base, 1.0)
    np.testing.assert_allclose(scaled, half, rtol=0, atol=1e-6)


def _count_graph_breaks(run):
    from torch._dynamo.utils import counters

    counters.clear()
    result = run()
    return result, sum(counters["graph_break"].values())


@pytest.mark.parametrize("kind", ["FluxPipeline", "FluxKontextPipeline"])
def test_load_pulid_is_compile_clean_fullgraph(base, tokens, kind):
    """load_pulid on diffusers' own pipelines under torch.compile(fullgraph=True), mask recording
    included: no graph break (0.1.x failed on `if generated == 0` and five .item() reads)."""
    import torch._dynamo
    from PIL import Image

    from spatialid.loaders import PuLIDIdentity, load_pulid, unload_pulid

    pipe = _flux(base, kind)
    load_pulid(pipe, base.pulid)
    extra = {}
    if kind == "FluxKontextPipeline":
        rng = np.random.default_rng(0)
        extra = {"image": Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)),
                 "_auto_resize": False, "max_area": SIZE * SIZE}
    identity = PuLIDIdentity(tokens[0], preset="paper", record_masks=True, height=SIZE, width=SIZE)
    eager = pipe(prompt="x", **_plain_kwargs(base, num_inference_steps=2, joint_attention_kwargs={"identity": identity}, **extra))
    eager_records = identity.records
    torch._dynamo.reset()
    pipe.transformer.compile(fullgraph=True, backend="eager")
    try:
        identity = PuLIDIdentity(tokens[0], preset="paper", record_masks=True, height=SIZE, width=SIZE)
        out, breaks = _count_graph_breaks(
            lambda: pipe(prompt="x", **_plain_kwargs(base, num_inference_steps=2, joint_attention_kwargs={"identity": identity}, **extra))
        )
    finally:
        pipe.transformer._compiled_call_impl = None
        torch._dynamo.reset()
        unload_pulid(pipe)
    assert breaks == 0
    np.testing.assert_allclose(out.images, eager.images, rtol=0, atol=1e-5)
    assert len(identity.records) == len(eager_records) == 2 * TINY_PULID.num_ca
    for a, b in zip(identity.records, eager_records):
        assert (a.step, a.point, a.phase) == (b.step, b.point, b.phase)
        torch.testing.assert_close(a.mask.float(), b.mask.float(), rtol=0, atol=2e-3)


def _count_ca_calls(cas):
    """Which CA modules run (the injector calls ``forward_people``), in order; undo with the handles."""
    calls = []

    class Undo:
        def __init__(self, ca):
            self.ca = ca

        def remove(self):
            del self.ca.forward_people

    def counting(i, ca):
        original = ca.forward_people

        def wrapped(*args, **kwargs):
            calls.append(i)
            return original(*args, **kwargs)

        ca.forward_people = wrapped
        return Undo(ca)

    return calls, [counting(i, ca) for i, ca in enumerate(cas)]


@pytest.mark.parametrize("order", ["cache-after-load", "cache-before-load"])
def test_diffusers_own_first_block_cache_injects_once(base, tokens, order):
    """transformer.enable_cache(FirstBlockCacheConfig(...)) with PuLID: a cached step runs only block
    0's CA module (0.1.x ran all of them and added their residuals on top of the cached one)."""
    from diffusers.hooks import FirstBlockCacheConfig

    from spatialid.loaders import PuLIDIdentity, load_pulid, unload_pulid

    pipe = _flux(base, "FluxPipeline")
    transformer = pipe.transformer
    unload_pulid(base)  # a fresh transformer state: the cache before or after the loader
    try:
        if order == "cache-before-load":
            transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
            load_pulid(pipe, base.pulid)
        else:
            load_pulid(pipe, base.pulid)
            transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        calls, handles = _count_ca_calls(base.pulid.pulid_ca)
        identity = PuLIDIdentity(tokens[0], preset="pulid")
        try:
            pipe("x", **_plain_kwargs(base, num_inference_steps=4, joint_attention_kwargs={"identity": identity}))
        finally:
            for h in handles:
                h.remove()
        n = TINY_PULID.num_ca
        # step 0 full (all CA modules), steps 1-3 cached (only the head block's CA, on block 0)
        assert calls == list(range(n)) + [0, 0, 0]
    finally:
        transformer.disable_cache()
        unload_pulid(pipe)
        base.attach_pulid(base.pulid.pulid_ca, idformer=base.pulid.pulid_encoder,
                          double_interval=TINY_PULID.double_interval, single_interval=TINY_PULID.single_interval)


def test_first_block_cache_on_img2img_gets_a_cache_context(base, tokens, tmp_path):
    """img2img sets no cache context; 0.1.x failed with "No cache context is set" (serve --cache fbc
    with an init image)."""
    from PIL import Image

    from spatialid.injection.step_cache import enable_step_cache
    from spatialid.pipeline.variants import IdentityPipelineRunner, variant_pipeline

    rng = np.random.default_rng(1)
    init = tmp_path / "init.png"
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(init)
    runner = IdentityPipelineRunner(variant_pipeline(base, "img2img"), base, "img2img")
    runner.set_progress_bar_config(disable=True)
    cache = enable_step_cache(base.transformer, base.injector, "fbc:0.5")
    try:
        out = runner("x", id_embeds=tokens[0], uncond_id_embeds=tokens[1], true_cfg=2.0, init_image=str(init),
                     strength=0.9, height=SIZE, width=SIZE, num_inference_steps=4, seed=2, output_type="np")
    finally:
        cache.disable()
    assert np.isfinite(out.images).all() and cache.cached > 0


def test_box_region_on_a_token_boundary_is_exactly_zero_outside():
    """0.1.x compared float64 cell edges with float32 bounds: up to 1.9e-6 leaked into the next row."""
    from spatialid.masks.multi import box_region

    for rows, cols in [(7, 5), (9, 13), (48, 64)]:
        for k in range(1, cols):
            x1 = k / cols
            grid = box_region((0.0, 0.0, x1, 1.0), rows, cols)
            assert float(grid[:, k:].max()) == 0.0, (rows, cols, k)
            assert float(grid[:, :k].min()) == 1.0
        for k in range(1, rows):
            grid = box_region((0.0, k / rows, 1.0, 1.0), rows, cols)
            assert float(grid[:k].max()) == 0.0 and float(grid[k:].min()) == 1.0


def test_one_mask_function_one_person_is_k_equals_one():
    """SpatialSchedule.mask (one person) is identity_masks with a one-person layout, bit for bit,
    and the phase rule is written once (phase() and the masks agree)."""
    from spatialid.masks import PRESETS
    from spatialid.masks.compute import PHASES, build_layout, identity_masks, phase_index

    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 15, 8, generator=g)
    for name, schedule in PRESETS.items():
        if schedule is None or schedule.needs_attention_probs:
            continue
        for t in (0.95, 0.7, 0.5, 0.3, 0.1):
            tt = torch.tensor([t, t])
            want = schedule.mask(tt, raw, 3, 5, fused=False)[..., 0]
            got = identity_masks(schedule, tt, raw[None], 3, 5, build_layout(1, 3, 5, schedule.center_sigma, None, "cpu"))
            assert torch.equal(got[0], want), (name, t)
            assert schedule.phase(t) == PHASES[int(phase_index(schedule, torch.tensor(t, dtype=torch.float64)))]


def test_public_api():
    import spatialid

    for name in ("load_pulid", "unload_pulid", "set_pulid_scale", "PuLIDIdentity", "PuLIDFluxModel", "PuLIDLoaderMixin"):
        assert getattr(spatialid, name) is not None, name
    from spatialid.injection.identity import IdentityError

    with pytest.raises(ValueError, match="start_step"):  # argument errors are ValueErrors too
        spatialid.PuLIDIdentity(torch.zeros(1, 4, 8), start_step=-1)
    with pytest.raises(IdentityError, match="tokens"):
        spatialid.PuLIDIdentity(object())
    with pytest.raises(ValueError, match="region"):
        spatialid.PuLIDIdentity([torch.zeros(1, 4, 8)] * 2, regions=["0,0,1,1"])


def test_true_cfg_scale_is_diffusers_name(base, tokens):
    kwargs = dict(id_embeds=tokens[0], uncond_id_embeds=tokens[1], height=SIZE, width=SIZE, num_inference_steps=2,
                  seed=4, output_type="np")
    a = base("x", true_cfg=2.0, **kwargs).images
    b = base("x", true_cfg_scale=2.0, **kwargs).images
    assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- the CLI


def _embedding_file(tmp_path, seed: int = 0):
    from spatialid.encoder.embedding import IdentityEmbedding

    g = torch.Generator().manual_seed(seed)
    shape = (1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim)
    emb = IdentityEmbedding(tokens=torch.randn(shape, generator=g), uncond_tokens=torch.randn(shape, generator=g))
    return str(emb.save(tmp_path / f"id{seed}.safetensors"))


@pytest.mark.parametrize("flag", ["--masks", "--save-masks"])
def test_cli_compile_with_mask_recording(tmp_path, capsys, monkeypatch, flag):
    """`generate --compile --masks` / `--save-masks` exited 1 on an uncaught dynamo error in 0.1.x."""
    import torch._dynamo

    from spatialid.cli.main import main

    monkeypatch.setenv("SPATIALID_COMPILE_BACKEND", "eager")  # dynamo's tracing without a C++ build
    out = tmp_path / "a.png"
    argv = ["generate", "--model", "tiny", "--device", "cpu", "--id-embeds", _embedding_file(tmp_path), "-p", "x",
            "--seed", "1", "--steps", "2", "--size", "64x64", "--compile", "-o", str(out), flag]
    if flag == "--save-masks":
        argv.append(str(tmp_path / "m.safetensors"))
    torch._dynamo.reset()
    try:
        with _no_compile_fallback():
            code = main(argv)
    finally:
        torch._dynamo.reset()
    assert code == 0, capsys.readouterr().err
    assert out.is_file()


class _no_compile_fallback:
    """Fails when the compiled transformer fell back to eager (a graph break under fullgraph)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.seen = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        fallbacks = [w for w in self.seen if "compiled transformer failed" in str(w.message)]
        assert not fallbacks, fallbacks[0].message
        return False


def test_cli_people_and_cache_on_img2img_and_inpainting(tmp_path, capsys):
    """Several people, regions and --cache on img2img / inpainting (refused by 0.1.x's CLI)."""
    from PIL import Image

    from spatialid.cli.main import main

    rng = np.random.default_rng(2)
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(init)
    array = np.zeros((SIZE, SIZE), dtype=np.uint8)
    array[:, : SIZE // 2] = 255
    Image.fromarray(array).save(mask)
    a, b = _embedding_file(tmp_path, 1), _embedding_file(tmp_path, 2)
    common = ["generate", "--model", "tiny", "--device", "cpu", "--person-embeds", a, "--person-embeds", b,
              "--region", "0,0,0.5,1", "--region", "0.5,0,1,1", "-p", "two friends", "--seed", "3", "--steps", "3",
              "--init-image", str(init), "--cache", "fbc:0.3"]
    assert main([*common, "-o", str(tmp_path / "i2i.png")]) == 0, capsys.readouterr().err
    assert main([*common, "--inpaint-mask", str(mask), "-o", str(tmp_path / "inp.png")]) == 0, capsys.readouterr().err
    assert (tmp_path / "i2i.png").is_file() and (tmp_path / "inp.png").is_file()
