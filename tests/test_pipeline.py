"""SpatialIDPipeline end to end on the tiny random-weight model (CPU, offline, 64x64, 2-3 steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatialid.errors import SpatialIDError
from spatialid.pipeline.settings import GenerationSettingsError

diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of a man"
SIZE = 64
STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    from spatialid.pipeline import SpatialIDPipeline

    p = SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def plain(pipe):
    p = diffusers.FluxPipeline(**pipe.flux_components)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def tokens(pipe):
    g = torch.Generator().manual_seed(123)
    kv = pipe.ca_modules[0].kv_dim
    return torch.randn(1, 4, kv, generator=g), torch.randn(1, 4, kv, generator=g)


def run(pipe, **kw):
    args = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=7, output_type="np")
    args.update(kw)
    return pipe(kw.pop("prompt", PROMPT), **{k: v for k, v in args.items() if k != "prompt"})


def plain_run(plain, pipe, **kw):
    args = dict(
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        guidance_scale=4.0,
        max_sequence_length=pipe.default_max_sequence_length,
    )
    args.update(kw)
    return plain(PROMPT, **args)


def count_calls(transformer):
    calls = []
    handle = transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


# ----------------------------------------------------------------------------- equivalence


def test_no_identity_equals_plain_flux(pipe, plain):
    ours = run(pipe).images
    ref = plain_run(plain, pipe).images
    assert ours.shape == (1, SIZE, SIZE, 3)
    assert np.array_equal(ours, ref)


def test_id_weight_zero_equals_plain_flux(pipe, plain, tokens):
    ours = run(pipe, id_embeds=tokens[0], id_weight=0.0, preset="paper").images
    assert np.array_equal(ours, plain_run(plain, pipe).images)


def test_true_cfg_without_identity_equals_plain_true_cfg(pipe, plain):
    ours = run(pipe, true_cfg=2.5, negative_prompt="blurry", cfg_start_step=0).images
    ref = plain_run(plain, pipe, true_cfg_scale=2.5, negative_prompt="blurry").images
    assert np.array_equal(ours, ref)


def test_identity_changes_the_image(pipe, plain, tokens):
    ours = run(pipe, id_embeds=tokens[0], preset="pulid").images
    ref = plain_run(plain, pipe).images
    assert np.abs(ours - ref).max() > 1e-3


def test_hooks_are_inactive_after_a_call(pipe, plain, tokens):
    run(pipe, id_embeds=tokens[0])
    assert np.array_equal(plain_run(plain, pipe).images, run(pipe).images)


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "preset", ["pulid", "paper", "relaxed", "prior-only", "attention-only", "no-relax", "entropy", None]
)
def test_every_preset_runs_and_records_masks(pipe, tokens, preset):
    from spatialid.masks import resolve_preset

    out = run(pipe, id_embeds=tokens[0], preset=preset, return_masks=True)
    assert out.images.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(out.images).all()
    assert [m.step for m in out.masks] == list(range(STEPS))
    schedule = resolve_preset(preset)
    for m in out.masks:
        assert m.masks.shape == (len(pipe.ca_modules), 1, SIZE // 16, SIZE // 16)
        assert m.masks.dtype == torch.float16
        mean = m.mean()
        assert float(mean.min()) >= 0.0 and float(mean.max()) <= 1.0 + 1e-3
        if schedule is None:
            assert m.phase == "uniform" and torch.all(m.masks == 1)
        else:
            assert m.phase == schedule.phase(m.t)
    assert out.settings["preset"] == ("pulid" if preset is None else preset)
    assert out.settings["schedule"] == (None if schedule is None else schedule.to_dict())


def test_mask_times_are_the_scheduler_sigmas(pipe, tokens):
    out = run(pipe, id_embeds=tokens[0], preset="paper", return_masks=True)
    sigmas = pipe.scheduler.sigmas[:STEPS].tolist()
    assert [m.t for m in out.masks] == pytest.approx(sigmas, abs=1e-6)
    assert out.masks[0].t == pytest.approx(1.0)
    assert out.masks[0].phase == "prior"


def test_scheduled_preset_differs_from_pulid(pipe, tokens):
    a = run(pipe, id_embeds=tokens[0], preset="pulid").images
    b = run(pipe, id_embeds=tokens[0], preset="paper").images
    assert np.abs(a - b).max() > 1e-4


def test_custom_schedule_object(pipe, tokens):
    from spatialid.masks import SpatialSchedule

    out = run(pipe, id_embeds=tokens[0], preset=SpatialSchedule(late_floor=0.9), return_masks=True)
    assert out.settings["preset"] == "custom"
    assert out.settings["schedule"]["late_floor"] == 0.9


# ----------------------------------------------------------------------------- start_step, true CFG


def test_start_step_leaves_early_steps_untouched(pipe, tokens):
    def capture(store):
        def cb(p, i, t, kw):
            store.append(kw["latents"].clone())
            return {}

        return cb

    plain_lat, id_lat = [], []
    run(pipe, callback_on_step_end=capture(plain_lat), callback_on_step_end_tensor_inputs=["latents"])
    out = run(
        pipe,
        id_embeds=tokens[0],
        start_step=2,
        return_masks=True,
        callback_on_step_end=capture(id_lat),
        callback_on_step_end_tensor_inputs=["latents"],
    )
    # before start_step the injector gets no tokens and returns None: the plain forward runs
    assert torch.equal(plain_lat[0], id_lat[0]) and torch.equal(plain_lat[1], id_lat[1])
    assert not torch.equal(plain_lat[2], id_lat[2])
    assert [m.step for m in out.masks] == [2]
    assert out.settings["start_step"] == 2


def test_true_cfg_runs_two_branches_with_uncond_identity(pipe, tokens):
    calls, handle = count_calls(pipe.transformer)
    try:
        out = run(pipe, id_embeds=tokens[0], uncond_id_embeds=tokens[1], true_cfg=3.0, return_masks=True)
    finally:
        handle.remove()
    assert len(calls) == 2 * STEPS
    assert [m.step for m in out.masks] == list(range(STEPS))  # positive branch only
    # the negative branch gets the uncond tokens: changing them changes the image
    other = run(pipe, id_embeds=tokens[0], uncond_id_embeds=tokens[0], true_cfg=3.0).images
    assert np.abs(out.images - other).max() > 1e-4
    assert out.settings["true_cfg"] == 3.0 and out.settings["negative_prompt"] == ""


def test_cfg_start_step_beyond_last_step_is_plain_sampling(pipe, tokens):
    with_cfg_never = run(
        pipe, id_embeds=tokens[0], uncond_id_embeds=tokens[1], true_cfg=4.0, cfg_start_step=STEPS
    ).images
    no_cfg = run(pipe, id_embeds=tokens[0]).images
    assert np.array_equal(with_cfg_never, no_cfg)  # neg is pos itself: pos + s * (pos - pos) == pos exactly


def test_cfg_start_step_one_differs_from_zero(pipe, tokens):
    a = run(pipe, id_embeds=tokens[0], uncond_id_embeds=tokens[1], true_cfg=4.0, cfg_start_step=0).images
    b = run(pipe, id_embeds=tokens[0], uncond_id_embeds=tokens[1], true_cfg=4.0, cfg_start_step=1).images
    assert np.abs(a - b).max() > 1e-4


def _true_cfg_by_call_order(plain, pipe, tokens, cfg_start_step, start_step, preset):
    """True CFG computed with a plain FluxPipeline on the same transformer: the identity passed
    through the loader with no warm-up of its own, and the warm-up done here by call order (call
    2k positive, 2k + 1 negative; call 2k's output copied into call 2k + 1 while k < cfg_start_step)."""
    from spatialid.loaders import PuLIDIdentity

    state = {"calls": 0, "positive": None}

    def warmup(module, args, output):
        step, branch = state["calls"] // 2, state["calls"] % 2
        state["calls"] += 1
        if step >= cfg_start_step:
            return None
        if branch == 0:
            state["positive"] = output
            return None
        return state["positive"]

    identity = PuLIDIdentity(
        tokens[0], tokens[1], preset=preset, start_step=start_step, record_masks=True, height=SIZE, width=SIZE
    )
    handle = pipe.transformer.register_forward_hook(warmup)
    try:
        images = plain_run(
            plain, pipe, true_cfg_scale=2.0, negative_prompt="", joint_attention_kwargs={"identity": identity}
        ).images
    finally:
        handle.remove()
    return images, identity.records


@pytest.mark.parametrize("preset, start_step", [("paper", 0), ("pulid", 1)])
def test_true_cfg_branches_from_cache_context_match_call_order(pipe, plain, tokens, preset, start_step):
    """FluxPipeline's cache context gives each call its branch and step; with its usual order
    (cond, then uncond) the images and masks are those of call-order counting."""
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: calls.append(pipe.injector.call))
    try:
        out = run(
            pipe, id_embeds=tokens[0], uncond_id_embeds=tokens[1], true_cfg=2.0, cfg_start_step=1,
            preset=preset, start_step=start_step, return_masks=True,
        )
    finally:
        handle.remove()
    assert [(c.step, c.branch, c.from_context) for c in calls] == [
        (s, b, True) for s in range(STEPS) for b in ("cond", "uncond")
    ]
    ref_images, ref_records = _true_cfg_by_call_order(plain, pipe, tokens, 1, start_step, preset)
    # Both paths run the same float ops in the same order; the 1e-6 tolerance on pixels in [0, 1]
    # keeps the test about which tokens and which warm-up copy each call got (a wrong branch or
    # step moves pixels by > 1e-3), not about kernel-level determinism.
    np.testing.assert_allclose(out.images, ref_images, rtol=0, atol=1e-6)
    positive = [r for r in ref_records if r.branch == "cond"]
    assert [m.step for m in out.masks] == list(range(start_step, STEPS))
    for m in out.masks:
        want = torch.stack([r.mask for r in positive if r.step == m.step])
        np.testing.assert_allclose(m.masks.reshape(want.shape).float().numpy(), want.float().numpy(), rtol=0, atol=1e-6)


def test_cfg_warmup_follows_the_cache_context_not_the_call_order(pipe, tokens):
    """The warm-up copies the positive output of the same step, read from the cache context: a
    step whose negative branch runs first keeps its own negative output."""
    from spatialid.loaders import PuLIDIdentity

    transformer = pipe.transformer
    identity = PuLIDIdentity(tokens[0], tokens[1], cfg_start_step=2, preset="pulid", height=SIZE, width=SIZE)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, (SIZE // 16) ** 2, transformer.config.in_channels, generator=g)
    text = torch.randn(1, 8, transformer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, generator=g)
    ids = torch.zeros((SIZE // 16) ** 2, 3)
    ids[:, 1] = torch.arange(SIZE // 16).repeat_interleave(SIZE // 16)
    ids[:, 2] = torch.arange(SIZE // 16).repeat(SIZE // 16)

    def call(branch, step, scale):
        with transformer.cache_context(branch, step_index=step):
            return transformer(
                hidden_states=hidden * scale, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(8, 3),
                guidance=torch.tensor([4.0]), joint_attention_kwargs={"identity": identity}, return_dict=False,
            )[0]

    with torch.no_grad():
        pos0, neg0 = call("cond", 0, 1.0), call("uncond", 0, 2.0)
        neg1, pos1 = call("uncond", 1, 3.0), call("cond", 1, 4.0)
        pos2, neg2 = call("cond", 2, 5.0), call("uncond", 2, 6.0)
    assert torch.equal(neg0, pos0)  # warm-up step: the negative branch returns the positive output
    assert not torch.equal(neg1, pos0) and not torch.equal(neg1, pos1)  # uncond first: its own output
    assert not torch.equal(neg2, pos2)  # past cfg_start_step: both branches are their own



def test_true_cfg_needs_uncond_tokens_for_plain_tensors(pipe, tokens):
    with pytest.raises(SpatialIDError, match="uncond"):
        run(pipe, id_embeds=tokens[0], true_cfg=2.0)


def test_identity_embedding_object_and_file(pipe, tokens, tmp_path):
    emb_mod = pytest.importorskip("spatialid.encoder.embedding")
    emb = emb_mod.IdentityEmbedding(tokens=tokens[0], uncond_tokens=tokens[1], metadata={"model": "tiny"})
    a = run(pipe, id_embeds=emb, true_cfg=2.0).images
    b = run(pipe, id_embeds=tokens[0], uncond_id_embeds=tokens[1], true_cfg=2.0).images
    assert np.array_equal(a, b)
    path = emb.save(tmp_path / "id.safetensors")
    out = run(pipe, id_embeds=str(path), true_cfg=2.0)
    assert np.array_equal(out.images, a)  # the file holds bit copies of the tokens
    assert out.settings["identity"]["files"] == ["id.safetensors"]


# ----------------------------------------------------------------------------- batches, seeds


def test_batch_of_two_uses_consecutive_seeds(pipe, tokens):
    out = run(pipe, id_embeds=tokens[0], num_images_per_prompt=2, return_masks=True)
    assert out.images.shape == (2, SIZE, SIZE, 3)
    assert out.settings["seeds"] == [7, 8] and out.settings["num_images"] == 2
    assert out.masks[0].masks.shape[1] == 2
    single = run(pipe, id_embeds=tokens[0], seed=8).images[0]
    np.testing.assert_allclose(out.images[1], single, atol=2e-3)
    assert np.abs(out.images[0] - out.images[1]).max() > 1e-3


def test_same_seed_same_image_and_random_seed_reported(pipe):
    a = run(pipe, seed=11).images
    b = run(pipe, seed=11).images
    assert np.array_equal(a, b)
    out = run(pipe, seed=None)
    assert isinstance(out.settings["seed"], int)
    again = run(pipe, seed=out.settings["seed"]).images
    assert np.array_equal(out.images, again)


def test_prompt_list_with_true_cfg(pipe, tokens):
    out = pipe(
        ["a man", "a woman"], id_embeds=tokens[0], uncond_id_embeds=tokens[1], true_cfg=2.0,
        height=SIZE, width=SIZE, num_inference_steps=2, seed=1, output_type="np",
    )
    assert out.images.shape == (2, SIZE, SIZE, 3) and out.settings["seeds"] == [1, 2]


def test_non_square_grid(pipe, tokens):
    out = run(pipe, id_embeds=tokens[0], height=64, width=96, return_masks=True)
    assert out.images.shape == (1, 64, 96, 3)
    assert out.masks[0].masks.shape[-2:] == (4, 6)


def test_pil_output_and_tuple_return(pipe):
    out = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=1, seed=0)
    assert out.images[0].size == (SIZE, SIZE)
    images, masks, settings = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=1, seed=0, return_dict=False)
    assert masks is None and settings["steps"] == 1
    assert "noise" in settings["note"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"height": 72}, "multiple of 16"),
        ({"width": 100}, "multiple of 16"),
        ({"height": 32}, "between 64"),
        ({"num_inference_steps": 0}, "steps"),
        ({"id_weight": -0.1}, "id weight"),
        ({"id_weight": 3.5}, "id weight"),
        ({"start_step": 3}, "start step"),
        ({"true_cfg": 0.5}, "true CFG"),
        ({"num_images_per_prompt": 0}, "number of images"),
        ({"guidance_scale": float("nan")}, "guidance"),
        ({"prompt": "   "}, "prompt is empty"),
    ],
)
def test_bad_settings_raise_one_line_errors(pipe, kwargs, match):
    with pytest.raises(GenerationSettingsError, match=match) as info:
        run(pipe, **kwargs)
    assert "\n" not in str(info.value)


def test_unknown_preset(pipe, tokens):
    with pytest.raises(SpatialIDError, match="unknown"):
        run(pipe, id_embeds=tokens[0], preset="nope")


def test_wrong_token_width(pipe):
    with pytest.raises(SpatialIDError, match="width"):
        run(pipe, id_embeds=torch.zeros(1, 4, 7))


def test_both_identity_sources_refused(pipe, tokens):
    with pytest.raises(SpatialIDError, match="either"):
        run(pipe, id_embeds=tokens[0], id_image="x.png")


def test_no_encoder_gives_clear_error(pipe):
    with pytest.raises(SpatialIDError, match="id_embeds"):
        run(pipe, id_image="photo.png")


# ----------------------------------------------------------------------------- offload (CPU as the "accelerator")


@pytest.mark.parametrize(
    "mode",
    [
        "model",
        pytest.param(
            "sequential",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(),
                reason="accelerate's sequential offload cannot use the CPU as execution device "
                "(Embedding weights come back as plain tensors); checked on a GPU instead",
            ),
        ),
    ],
)
def test_injection_survives_cpu_offload_hooks(tokens, mode):
    from spatialid.pipeline import SpatialIDPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref_pipe = SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False, device=device)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = run(ref_pipe, id_embeds=tokens[0], return_masks=True)
    off = SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False)
    off.set_progress_bar_config(disable=True)
    getattr(off, f"enable_{mode}_cpu_offload")(device=device)
    got = run(off, id_embeds=tokens[0], return_masks=True)
    assert got.settings["offload"] == mode
    assert len(got.masks) == STEPS
    # `pulid` is excluded from offloading: placed on the execution device, never hooked; the
    # IDFormer (run only by the identity encoder) waits on the CPU.
    assert "pulid" in off._exclude_from_cpu_offload and not hasattr(off.pulid, "_hf_hook")
    assert {p.device.type for p in off.ca_modules.parameters()} == {torch.device(device).type}
    assert {p.device.type for p in off.idformer.parameters()} == {"cpu"}
    np.testing.assert_allclose(got.images, ref.images, atol=1e-5)
    plain_off = run(off).images
    assert np.abs(plain_off - got.images).max() > 1e-3


def test_detach_after_model_offload_keeps_the_offload_hook(tokens):
    """The context probe wraps ``forward`` below accelerate's offload wrapper; removing it must
    leave accelerate's wrapper in place (diffusers' own removal would put the bare forward back)."""
    from spatialid.injection.calls import CONTEXT_PROBE_NAME
    from spatialid.pipeline import SpatialIDPipeline

    p = SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False)
    p.set_progress_bar_config(disable=True)
    p.enable_model_cpu_offload(device="cpu")
    run(p, id_embeds=tokens[0], uncond_id_embeds=tokens[1], true_cfg=2.0)
    p.detach_pulid()
    transformer = p.transformer
    assert transformer._diffusers_hook.get_hook(CONTEXT_PROBE_NAME) is None
    assert getattr(transformer._old_forward, "__func__", None) is type(transformer).forward
    hits = []
    pre_forward = transformer._hf_hook.pre_forward
    transformer._hf_hook.pre_forward = lambda *a, **k: hits.append(1) or pre_forward(*a, **k)
    try:
        run(p, true_cfg=2.0)
    finally:
        transformer._hf_hook.pre_forward = pre_forward
    assert len(hits) == 2 * STEPS  # accelerate's hook still runs on every transformer call


def test_detach_pulid_restores_plain_pipeline(tokens, plain):
    from spatialid.pipeline import SpatialIDPipeline

    p = SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False)
    p.set_progress_bar_config(disable=True)
    p.detach_pulid()
    with pytest.raises(SpatialIDError, match="no PuLID"):
        run(p, id_embeds=tokens[0])
    assert np.array_equal(run(p).images, plain_run(plain, p).images)  # weights rebuilt from seed 0 by the same ops


def test_tiny_is_deterministic_across_builds(pipe):
    from spatialid.pipeline import SpatialIDPipeline

    other = SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False)
    for a, b in zip(pipe.transformer.state_dict().values(), other.transformer.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(pipe.ca_modules.state_dict().values(), other.ca_modules.state_dict().values()):
        assert torch.equal(a, b)
    third = SpatialIDPipeline.tiny(seed=1, with_identity_encoder=False)
    assert not torch.equal(
        next(iter(third.transformer.state_dict().values())), next(iter(pipe.transformer.state_dict().values()))
    )
