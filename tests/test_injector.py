"""IdentityInjector on a tiny random-weight diffusers FluxTransformer2DModel."""

from __future__ import annotations

import copy

import pytest
import torch
from injection_helpers import attention_probs, masks_by_call

from spatialid.injection import IdentityInjector, PuLIDIdentity, TransformerCall, injection_points
from spatialid.masks import SpatialSchedule
from spatialid.models import PerceiverAttentionCA
from spatialid.models.configs import TINY_FLUX, TINY_PULID
from spatialid.pipeline.tiny import build_tiny_transformer

TEXT_LEN = 5
KV_DIM = TINY_PULID.ca.kv_dim


def make_transformer(seed: int = 0):
    torch.manual_seed(seed)
    return build_tiny_transformer(TINY_FLUX).eval()


def make_ca_modules(seed: int = 1, n: int = TINY_PULID.num_ca) -> torch.nn.ModuleList:
    torch.manual_seed(seed)
    mods = torch.nn.ModuleList(PerceiverAttentionCA.from_config(TINY_PULID.ca) for _ in range(n))
    # Random LayerNorm affine parameters so the test exercises them too.
    for m in mods:
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return mods.eval()


def make_inputs(batch: int, rows: int, cols: int, t: float | list[float] = 0.5, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1] = torch.arange(rows).repeat_interleave(cols).float()
    img_ids[:, 2] = torch.arange(cols).repeat(rows).float()
    timestep = torch.tensor([t] * batch if isinstance(t, float) else t, dtype=torch.float32)
    return dict(
        hidden_states=torch.randn(batch, n, TINY_FLUX.latent_channels * 4, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, TINY_FLUX.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, TINY_FLUX.pooled_projection_dim, generator=g),
        timestep=timestep,
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT_LEN, 3),
        guidance=torch.full((batch,), 3.5),
        return_dict=False,
    )


def id_tokens(batch: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 4, KV_DIM, generator=torch.Generator().manual_seed(seed))


def reference_forward(model, ca_modules, inputs, embeds, weight, schedule=None, grid=None):
    """The FLUX forward written out by hand with PuLID/SpatialID injection between blocks."""
    hidden = model.x_embedder(inputs["hidden_states"])
    timestep = inputs["timestep"].to(hidden.dtype) * 1000
    guidance = inputs["guidance"].to(hidden.dtype) * 1000
    temb = model.time_text_embed(timestep, guidance, inputs["pooled_projections"])
    text = model.context_embedder(inputs["encoder_hidden_states"])
    rotary = model.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"]), dim=0))
    embeds = embeds.expand(hidden.shape[0], -1, -1)

    def inject(k, h):
        if schedule is None:
            return h + weight * ca_modules[k](embeds, h)
        out, raw = ca_modules[k](embeds, h, return_raw=True)
        mask = schedule.mask(inputs["timestep"].float(), raw, *grid)
        return h + weight * mask * out

    k = 0
    for i, block in enumerate(model.transformer_blocks):
        text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary)
        if i % 2 == 0:
            hidden = inject(k, hidden)
            k += 1
    for j, block in enumerate(model.single_transformer_blocks):
        text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary)
        if j % 4 == 0:
            hidden = inject(k, hidden)
            k += 1
    assert k == len(ca_modules)
    return model.proj_out(model.norm_out(hidden, temb))


@pytest.fixture(scope="module")
def model():
    return make_transformer()


@pytest.fixture(scope="module")
def cas():
    return make_ca_modules()


@pytest.fixture()
def injector(model, cas):
    inj = IdentityInjector(model, cas, double_interval=2, single_interval=4)
    yield inj
    inj.detach()


def test_injection_points_follow_pulid_flux_layout():
    pts = injection_points(19, 38, 2, 4)
    assert len(pts) == 20
    assert pts[:10] == [("double", i) for i in range(0, 19, 2)]
    assert pts[10:] == [("single", j) for j in range(0, 38, 4)]
    with pytest.raises(ValueError):
        injection_points(4, 8, 0, 4)


def test_rejects_wrong_number_of_ca_modules(model):
    with pytest.raises(ValueError, match="4 injection points"):
        IdentityInjector(model, make_ca_modules(n=3))
    with pytest.raises(TypeError):
        IdentityInjector(torch.nn.Linear(2, 2), make_ca_modules())


@torch.no_grad()
def test_outside_active_and_after_detach_bit_identical(model, cas):
    inputs = make_inputs(2, 4, 4)
    plain = model(**inputs)[0]
    inj = IdentityInjector(model, cas)
    assert torch.equal(model(**inputs)[0], plain)
    with inj.active(id_tokens(1)):
        injected = model(**inputs)[0]
    assert not torch.allclose(injected, plain)
    assert torch.equal(model(**inputs)[0], plain)
    inj.detach()
    assert torch.equal(model(**inputs)[0], plain)
    assert not inj.attached
    with pytest.raises(RuntimeError, match="detached"):
        with inj.active(id_tokens(1)):
            pass


@torch.no_grad()
def test_uniform_injection_matches_hand_written_loop(model, cas, injector):
    inputs = make_inputs(2, 4, 4)
    embeds = id_tokens(1)
    with injector.active(embeds, id_weight=0.8, schedule=None):
        got = model(**inputs)[0]
    want = reference_forward(model, cas, inputs, embeds, 0.8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [0.9, 0.5, 0.1])
@torch.no_grad()
def test_spatial_injection_matches_hand_written_loop(model, cas, injector, t):
    rows, cols = 3, 5  # odd, non-square grid
    inputs = make_inputs(2, rows, cols, t=t)
    embeds = id_tokens(2)
    schedule = SpatialSchedule()
    with injector.active(embeds, id_weight=1.0, schedule=schedule, grid=(rows, cols)):
        got = model(**inputs)[0]
    want = reference_forward(model, cas, inputs, embeds, 1.0, schedule=schedule, grid=(rows, cols))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_none_schedule_is_pulid_and_spatial_differs(model, injector):
    inputs = make_inputs(1, 4, 4, t=0.5)
    embeds = id_tokens(1)
    with injector.active(embeds, schedule=None):
        uniform = model(**inputs)[0]
    with injector.active(embeds, schedule=SpatialSchedule(), grid=(4, 4)):
        spatial = model(**inputs)[0]
    assert not torch.allclose(uniform, spatial)
    # A schedule whose mask is 1 everywhere (global floor 1) is exactly PuLID.
    with injector.active(embeds, schedule=SpatialSchedule(global_floor=1.0), grid=(4, 4)):
        floor_one = model(**inputs)[0]
    torch.testing.assert_close(floor_one, uniform, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_zero_weight_and_none_embeds_are_bit_identical(model, injector):
    inputs = make_inputs(2, 4, 4)
    plain_inj = IdentityInjector  # noqa: F841 (keeps the name in the failure message readable)
    with injector.active(id_tokens(1), id_weight=0.0, schedule=SpatialSchedule(), grid=(4, 4)):
        zero = model(**inputs)[0]
    with injector.active(PuLIDIdentity(None)):  # no people: nothing to inject
        none = model(**inputs)[0]
    injector.detach()
    plain = model(**inputs)[0]
    assert torch.equal(zero, plain)
    assert torch.equal(none, plain)


@torch.no_grad()
def test_batch_with_per_sample_embeddings_matches_single_runs(model, injector):
    """A true-CFG style batch (positive and zero identity per sample) equals separate runs."""
    inputs = make_inputs(2, 4, 4, t=[0.5, 0.5])
    embeds = torch.cat([id_tokens(1, seed=5), torch.zeros(1, 4, KV_DIM)])
    schedule = SpatialSchedule()
    with injector.active(embeds, schedule=schedule, grid=(4, 4)):
        both = model(**inputs)[0]
    for b in range(2):
        single = {k: (v[b : b + 1] if k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance") else v) for k, v in inputs.items()}
        with injector.active(embeds[b : b + 1], schedule=schedule, grid=(4, 4)):
            one = model(**single)[0]
        torch.testing.assert_close(both[b : b + 1], one, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_per_sample_time_selects_phase_per_sample(model, injector):
    """Different t per sample (no host sync) equals running each t on its own."""
    inputs = make_inputs(2, 4, 4, t=[0.9, 0.2])
    embeds = id_tokens(1)
    schedule = SpatialSchedule()
    with injector.active(embeds, schedule=schedule, grid=(4, 4)):
        both = model(**inputs)[0]
    for b, t in enumerate((0.9, 0.2)):
        single = make_inputs(2, 4, 4, t=t)
        with injector.active(embeds, schedule=schedule, grid=(4, 4)):
            alone = model(**single)[0]
        torch.testing.assert_close(both[b], alone[b], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_start_step_and_mask_recording(model, injector):
    embeds = id_tokens(1)
    seen = []
    handle = model.register_forward_hook(lambda m, a, o: seen.append(injector.call))
    identity = PuLIDIdentity(embeds, preset=SpatialSchedule(), start_step=1, height=32, width=48, record_masks=True)
    try:
        with injector.active(identity) as session:
            for t in (0.8, 0.5, 0.2):
                model(**make_inputs(1, 2, 3, t=t))
    finally:
        handle.remove()
    # no cache context: calls are numbered by order, one call per step, all positive
    assert seen == [TransformerCall(i, i, "cond", False) for i in range(3)]
    assert session.calls == 3
    assert len(session.records) == 2 * TINY_PULID.num_ca  # call 0 is before start_step
    by_call = masks_by_call(session.records)
    assert sorted(by_call) == [1, 2]
    assert [r.point for r in by_call[1]] == list(range(TINY_PULID.num_ca))
    rec = by_call[1][0]
    assert rec.mask.dtype == torch.float16 and rec.mask.device.type == "cpu"
    assert rec.mask.shape == (1, 6)
    assert rec.t == pytest.approx(0.5) and rec.phase == "attention"
    assert by_call[2][0].phase == "relaxed"
    assert float(by_call[2][0].mask.min()) >= 0.5 - 1e-3  # late floor


@torch.no_grad()
def test_uniform_recording_has_full_masks(model, injector):
    with injector.active(id_tokens(1), record_masks=True) as session:
        model(**make_inputs(2, 2, 2, t=0.4))
    assert len(session.records) == TINY_PULID.num_ca
    assert all(r.phase == "uniform" and torch.all(r.mask == 1) for r in session.records)
    assert session.records[0].t == pytest.approx(0.4)


@torch.no_grad()
def test_one_by_one_grid(model, injector):
    inputs = make_inputs(2, 1, 1, t=0.5)
    with injector.active(id_tokens(2), schedule=SpatialSchedule(), grid=(1, 1)):
        out = model(**inputs)[0]
    assert out.shape == (2, 1, TINY_FLUX.latent_channels * 4)
    assert torch.isfinite(out).all()


def test_bf16_transformer_and_ca(cas):
    model = make_transformer().to(torch.bfloat16)
    ca16 = copy.deepcopy(cas).to(torch.bfloat16)
    inj = IdentityInjector(model, ca16)
    inputs = make_inputs(2, 4, 4)
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        inputs[key] = inputs[key].to(torch.bfloat16)
    inputs["timestep"] = inputs["timestep"].to(torch.bfloat16)
    with torch.no_grad(), inj.active(id_tokens(1), schedule=SpatialSchedule(), grid=(4, 4), record_masks=True) as s:
        out = model(**inputs)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert s.records[0].phase == "attention"
    inj.detach()


@torch.no_grad()
def test_argument_errors(model, injector):
    inputs = make_inputs(1, 3, 5)
    with pytest.raises(ValueError, match="16 image tokens but the call has 15"):
        with injector.active(id_tokens(1), schedule=SpatialSchedule(), grid=(4, 4)):
            model(**inputs)
    with injector.active(id_tokens(1), schedule=SpatialSchedule()):
        model(**inputs)  # no grid given: read from the call's img_ids
    assert injector.last_layout == (None, (3, 5))
    with pytest.raises(ValueError, match="batch 3"):
        with injector.active(id_tokens(3)):
            model(**make_inputs(2, 2, 2))
    with pytest.raises(ValueError, match="id_weight"):
        with injector.active(id_tokens(1), id_weight=float("nan")):
            pass
    with pytest.raises(ValueError, match="shape"):
        with injector.active(torch.zeros(KV_DIM)):
            pass
    with pytest.raises(RuntimeError, match="nested"):
        with injector.active(id_tokens(1)):
            with injector.active(id_tokens(1)):
                pass
    assert injector.session is None


@torch.no_grad()
def test_entropy_source_uses_attention_probabilities(model, cas, injector):
    """The entropy preset computes its mask from softmax(QK^T) of each CA module."""
    from spatialid.masks import PRESETS, entropy_mask

    schedule = PRESETS["entropy"]
    inputs = make_inputs(2, 3, 3, t=0.5)
    embeds = id_tokens(1)
    with injector.active(embeds, schedule=schedule, grid=(3, 3), record_masks=True) as session:
        out = model(**inputs)[0]
    assert torch.isfinite(out).all()
    # Check the first injection point's mask against an explicit softmax of that CA module.
    hidden = model.x_embedder(inputs["hidden_states"])
    temb = model.time_text_embed(inputs["timestep"] * 1000, inputs["guidance"] * 1000, inputs["pooled_projections"])
    text = model.context_embedder(inputs["encoder_hidden_states"])
    rotary = model.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"])))
    _, h = model.transformer_blocks[0](hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary)
    probs = attention_probs(cas[0], embeds.expand(2, -1, -1), h)
    assert probs.shape == (2, cas[0].heads, 9, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, cas[0].heads, 9))
    expected = schedule.mask(0.5, torch.zeros(2, 9, 1), 3, 3, attn_probs=probs)[..., 0]
    torch.testing.assert_close(session.records[0].mask.float(), expected, atol=2e-3, rtol=0)
    assert entropy_mask(probs, 3, 3).shape == (2, 9)


# ----------------------------------------------------------------------------- CFG branches and steps


def _recorder(model, injector):
    """Collects ``injector.call`` after every transformer call; returns (calls, hook handle)."""
    seen: list = []
    return seen, model.register_forward_hook(lambda m, a, o: seen.append(injector.call))


@torch.no_grad()
def test_cache_context_gives_branch_and_step_in_any_order(model, injector):
    """Branch and step come from diffusers' cache context, not from the call order: a loop that
    runs uncond before cond, and a cond-only step, still gets the right tokens and step per call."""
    cond, uncond = id_tokens(1, seed=7), id_tokens(1, seed=8)
    # (a cond-only step right before an uncond-first step would read as one step: only a
    # step_index in the context can tell those apart)
    order = [("uncond", "cond"), ("cond",), ("cond", "uncond"), ("uncond", "cond")]
    inputs = [make_inputs(1, 3, 3, t=1.0 - 0.25 * s, seed=10 + s) for s in range(len(order))]
    outs = []
    schedule = SpatialSchedule()
    identity = PuLIDIdentity(cond, uncond, preset=schedule, height=48, width=48, record_masks=True)
    seen, handle = _recorder(model, injector)
    try:
        with injector.active(identity, calls_per_step=2) as session:
            for step, branches in enumerate(order):
                for branch in branches:
                    with model.cache_context(branch):
                        outs.append(model(**inputs[step])[0])
    finally:
        handle.remove()
    want_calls = [(s, b) for s, branches in enumerate(order) for b in branches]
    assert [(c.step, c.branch) for c in seen] == want_calls
    assert [c.index for c in seen] == list(range(len(want_calls)))
    assert all(c.from_context for c in seen)
    # each call's output is exactly the output with that branch's tokens given as the identity
    for (step, branch), out in zip(want_calls, outs):
        tokens = uncond if branch == "uncond" else cond
        with injector.active(tokens, schedule=schedule, grid=(3, 3)):
            assert torch.equal(out, model(**inputs[step])[0]), (step, branch)
    # the records carry the call's step and branch
    assert [(r.step, r.branch) for r in session.records[:: TINY_PULID.num_ca]] == want_calls
    assert {r.call_index for r in session.records} == set(range(len(want_calls)))


@torch.no_grad()
def test_without_cache_context_calls_are_counted(model, injector):
    """Fallback (no cache context, no scheduler): call i is step i // calls_per_step, cond then uncond."""
    cond, uncond = id_tokens(1, seed=7), id_tokens(1, seed=8)
    inputs = make_inputs(1, 2, 2, t=0.5)
    outs = []
    seen, handle = _recorder(model, injector)
    try:
        with injector.active(PuLIDIdentity(cond, uncond, preset=None), calls_per_step=2):
            for _ in range(5):
                outs.append(model(**inputs)[0])
    finally:
        handle.remove()
    assert seen == [TransformerCall(i, i // 2, ("cond", "uncond")[i % 2], False) for i in range(5)]
    for i, out in enumerate(outs):
        with injector.active(cond if i % 2 == 0 else uncond, schedule=None):
            assert torch.equal(out, model(**inputs)[0])
    with pytest.raises(ValueError, match="calls_per_step"):
        with injector.active(cond, calls_per_step=3):
            pass


@torch.no_grad()
def test_context_step_index_wins_over_counting(model, injector):
    seen, handle = _recorder(model, injector)
    try:
        with injector.active(PuLIDIdentity(id_tokens(1), id_tokens(1, seed=9), preset=None)):
            try:
                with model.cache_context("cond", step_index=7):
                    model(**make_inputs(1, 2, 2))
            except TypeError:  # diffusers releases whose cache_context takes only a name
                pytest.skip("this diffusers' cache_context has no step_index")
            with model.cache_context("uncond", step_index=7):
                model(**make_inputs(1, 2, 2))
    finally:
        handle.remove()
    assert [(c.step, c.branch) for c in seen] == [(7, "cond"), (7, "uncond")]


@torch.no_grad()
def test_context_probe_accepts_the_older_diffusers_route(model, injector):
    """diffusers 0.35's ``cache_context`` calls ``HookRegistry._set_context(name)``, which calls
    ``hook._set_context(module, name)`` on every stateful hook; emulate that loop here."""
    registry = model._diffusers_hook

    def set_context(name):
        for hook_name in reversed(registry._hook_order):
            hook = registry.hooks[hook_name]
            if hook._is_stateful:
                hook._set_context(model, name)

    seen, handle = _recorder(model, injector)
    try:
        with injector.active(PuLIDIdentity(id_tokens(1), id_tokens(1, seed=9), preset=None)):
            for name in ("uncond", "cond", "uncond", "cond"):
                set_context(name)
                model(**make_inputs(1, 2, 2))
            set_context(None)
            model(**make_inputs(1, 2, 2))
    finally:
        handle.remove()
    assert [(c.step, c.branch, c.from_context) for c in seen] == [
        (0, "uncond", True), (0, "cond", True), (1, "uncond", True), (1, "cond", True), (4, "cond", False)
    ]


def test_call_counter_steps():
    from spatialid.injection import CallCounter

    counter = CallCounter(calls_per_step=2)
    got = [counter.next(b) for b in ["cond", "cond", "uncond", "uncond", "cond", "uncond", "cond"]]
    assert [(c.step, c.branch) for c in got] == [
        (0, "cond"), (1, "cond"), (1, "uncond"), (2, "uncond"), (2, "cond"), (3, "uncond"), (3, "cond")
    ]
    fallback = CallCounter(calls_per_step=1)
    assert [(c.step, c.branch) for c in (fallback.next() for _ in range(3))] == [(0, "cond"), (1, "cond"), (2, "cond")]


@torch.no_grad()
def test_context_probe_is_shared_and_removed_by_detach(cas):
    from spatialid.injection.calls import CONTEXT_PROBE_NAME, attach_context_probe, detach_context_probe

    fresh = make_transformer()
    inputs = make_inputs(1, 2, 2)
    plain = fresh(**inputs)[0]
    first = IdentityInjector(fresh, cas)
    other = attach_context_probe(fresh)  # a second user of the probe (shared, counted)
    probe = fresh._diffusers_hook.get_hook(CONTEXT_PROBE_NAME)
    assert probe is other and probe.users == 2 and probe._is_stateful
    with pytest.raises(RuntimeError, match="already has PuLID hooks"):
        IdentityInjector(fresh, cas)  # one injector per transformer
    with fresh.cache_context("cond"):
        assert probe.name == "cond"
        assert torch.equal(fresh(**inputs)[0], plain)  # the hooks change nothing without an identity
    assert probe.name is None
    first.detach()
    assert fresh._diffusers_hook.get_hook(CONTEXT_PROBE_NAME) is probe
    detach_context_probe(fresh, other)
    assert fresh._diffusers_hook.get_hook(CONTEXT_PROBE_NAME) is None
    assert "forward" not in vars(fresh)  # diffusers' forward wrapper is gone
    assert all(not getattr(b, "_diffusers_hook", None) or not b._diffusers_hook.hooks for b in fresh.transformer_blocks)
    assert torch.equal(fresh(**inputs)[0], plain)


@torch.no_grad()
def test_begin_call_and_inject_are_the_hooks_code_path(model, cas, injector):
    """The public per-call API gives what the hooks compute, and the hooks go through it."""
    rows, cols = 2, 3
    inputs = make_inputs(2, rows, cols, t=0.5)
    embeds = id_tokens(1)
    schedule = SpatialSchedule()
    image = torch.randn(2, rows * cols, cas[0].to_q.in_features, generator=torch.Generator().manual_seed(9))
    with pytest.raises(RuntimeError, match="active"):
        injector.begin_call(inputs["hidden_states"], inputs["timestep"])
    assert injector.inject(0, image) is image  # no call begun: nothing to add
    with injector.active(embeds, id_weight=0.7, schedule=schedule, grid=(rows, cols)) as session:
        call = injector.begin_call(inputs["hidden_states"], inputs["timestep"])
        assert call == TransformerCall(0, 0, "cond", False) and session.call is call
        got = injector.inject(1, image)
    out, raw = cas[1](embeds.expand(2, -1, -1), image, return_raw=True)
    want = image + 0.7 * schedule.mask(inputs["timestep"], raw, rows, cols) * out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with injector.active(PuLIDIdentity(embeds, start_step=1, preset=None)):
        injector.begin_call(inputs["hidden_states"])
        assert injector.inject(0, image) is image  # an un-injected call leaves the tokens alone
    # the hooks call the public methods (one code path)
    begun, injected = [], []
    begin, inject = injector.begin_call, injector.inject
    injector.begin_call = lambda *a, **k: begun.append(1) or begin(*a, **k)
    injector.inject = lambda *a, **k: injected.append(a[0]) or inject(*a, **k)
    try:
        with injector.active(embeds):
            model(**inputs)
    finally:
        del injector.begin_call, injector.inject
    assert begun == [1] and injected == list(range(len(cas)))
