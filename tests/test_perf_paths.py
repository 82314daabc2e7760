"""Performance-relevant code paths of the injection step (issue 6). Behaviour checks, not timings:

* no host reads (``.item()``, ``bool(tensor)``, D2H copies) inside an injected step, checked by
  running the whole step on the ``meta`` device (where any host read raises) and with a dispatch
  mode that records scalar reads on CPU;
* ``torch.compile(transformer, fullgraph=True)`` traces the hooks without graph breaks, and
  changing ``id_weight``, ``t`` or the session does not recompile;
* the prior / blur caches are hit, the CA's entropy path needs one projection, and the CPU norm of
  a bf16 activation makes no activation-sized float32 copy;
* the benchmark script runs end to end at a toy size.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from spatialid.injection import IdentityInjector
from spatialid.masks import PRESETS, SpatialSchedule, extractor, norm_mask
from spatialid.models import PerceiverAttentionCA
from spatialid.models.configs import TINY_FLUX, TINY_PULID

REPO = Path(__file__).resolve().parents[1]
TEXT_LEN = 5
KV_DIM = TINY_PULID.ca.kv_dim
SPATIAL_PRESETS = [name for name, s in PRESETS.items() if s is not None]
# aten ops that read tensor data on the host (a device sync on GPU).
HOST_READ_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "_unique2", "unique_dim"}


def make_transformer(device: str = "cpu", num_layers: int = TINY_FLUX.num_layers, num_single_layers: int = TINY_FLUX.num_single_layers) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    cfg = TINY_FLUX
    with torch.device(device):
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=cfg.latent_channels * 4,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.joint_attention_dim,
            pooled_projection_dim=cfg.pooled_projection_dim,
            guidance_embeds=True,
            axes_dims_rope=cfg.axes_dims_rope,
        )
    return model.eval()


def make_cas(n: int, device: str = "cpu") -> torch.nn.ModuleList:
    torch.manual_seed(1)
    with torch.device(device):
        mods = torch.nn.ModuleList(PerceiverAttentionCA.from_config(TINY_PULID.ca) for _ in range(n))
    return mods.eval()


def make_inputs(batch: int, rows: int, cols: int, t: float = 0.5, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(2)
    n = rows * cols
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1] = torch.arange(rows).repeat_interleave(cols).float()
    img_ids[:, 2] = torch.arange(cols).repeat(rows).float()
    inputs = dict(
        hidden_states=torch.randn(batch, n, TINY_FLUX.latent_channels * 4, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, TINY_FLUX.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, TINY_FLUX.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), t),
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT_LEN, 3),
        guidance=torch.full((batch,), 3.5),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["return_dict"] = False
    return inputs


def id_tokens(batch: int = 1, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, 4, KV_DIM, generator=torch.Generator().manual_seed(3)).to(device)


class HostReads(TorchDispatchMode):
    """Records every aten op that reads tensor data on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ in HOST_READ_OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------
# no host-device synchronisation in a step


@pytest.fixture(scope="module")
def meta_model():
    model = make_transformer("meta")
    cas = make_cas(TINY_PULID.num_ca, "meta")
    return model, IdentityInjector(model, cas)


@pytest.mark.parametrize("preset", ["pulid", *SPATIAL_PRESETS])
def test_injected_step_runs_on_meta_device(meta_model, preset):
    """Any host read (.item(), float(t), bool(tensor), .cpu()) raises on meta tensors, so a step
    that completes on the meta device cannot synchronise a GPU either."""
    model, injector = meta_model
    inputs = make_inputs(2, 3, 4, device="meta")
    with torch.inference_mode(), injector.active(id_tokens(1, "meta"), 0.8, PRESETS[preset], grid=(3, 4)):
        out = model(**inputs)[0]
    assert out.device.type == "meta" and out.shape == (2, 12, TINY_FLUX.latent_channels * 4)


@pytest.mark.parametrize("preset", ["pulid", "paper", "entropy"])
def test_mask_recording_runs_on_meta_device(meta_model, preset):
    """Recording writes into preallocated tensors: no host read inside the step either."""
    model, injector = meta_model
    inputs = make_inputs(1, 2, 2, device="meta")
    with torch.inference_mode(), injector.active(
        id_tokens(1, "meta"), schedule=PRESETS[preset], grid=(2, 2), record_masks=True
    ) as session:
        model(**inputs)
    masks = session.identity._record[0]
    assert masks.device.type == "meta" and masks.shape[2:] == (TINY_PULID.num_ca, 1, 1, 4)


@pytest.fixture(scope="module")
def cpu_model():
    model = make_transformer()
    cas = make_cas(TINY_PULID.num_ca)
    return model, cas, IdentityInjector(model, cas)


@pytest.mark.parametrize("preset", ["pulid", "paper", "entropy"])
def test_no_scalar_reads_on_cpu(cpu_model, preset):
    model, _, injector = cpu_model
    inputs = make_inputs(2, 4, 4, t=0.5)
    with torch.inference_mode(), injector.active(id_tokens(1), schedule=PRESETS[preset], grid=(4, 4)):
        with HostReads() as reads:
            model(**inputs)
    assert reads.seen == []


def test_scalar_read_detector_sees_host_reads(cpu_model):
    """The detector itself: reading the records after the step is a host read."""
    model, _, injector = cpu_model
    with torch.inference_mode(), injector.active(id_tokens(1), schedule=PRESETS["paper"], grid=(4, 4), record_masks=True) as session:
        with HostReads() as reads:
            model(**make_inputs(1, 4, 4))
        assert reads.seen == []  # recording inside the step reads nothing
        with HostReads() as reads:
            assert session.records
    assert reads.seen  # turning the buffers into records afterwards does


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture()
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@torch.no_grad()
def test_compiled_fullgraph_matches_eager_without_recompiles(fresh_dynamo):
    """The hooks trace into one graph; weight, t, identity values and new sessions reuse it."""
    import torch._dynamo

    # 2 double + 1 single block -> CA after double 0 and single 0 (keeps tracing fast).
    model = make_transformer(num_layers=2, num_single_layers=1)
    cas = make_cas(2)
    injector = IdentityInjector(model, cas)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    schedule = SpatialSchedule()
    inputs = make_inputs(2, 3, 4, t=0.5)

    with injector.active(id_tokens(1), 1.0, schedule, grid=(3, 4)):
        compiled(**inputs)  # call 0
        compiled(**inputs)  # call 1: the call counter becomes dynamic (one small recompile)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for weight, t, seed in [(0.6, 0.9, 4), (1.3, 0.2, 5)]:
            embeds = torch.randn(1, 4, KV_DIM, generator=torch.Generator().manual_seed(seed))
            step = make_inputs(2, 3, 4, t=t)
            with injector.active(embeds, weight, schedule, grid=(3, 4)):
                got = compiled(**step)[0]
                got_next = compiled(**step)[0]
            with injector.active(embeds, weight, schedule, grid=(3, 4)):
                want = model(**step)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_next, want, rtol=1e-5, atol=1e-5)
    # Another schedule is another graph (its constants are baked in); uniform PuLID too.
    with injector.active(id_tokens(1), 1.0, None):
        torch.testing.assert_close(compiled(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)
    # Outside active() the compiled model is the plain model.
    injector.detach()
    torch.testing.assert_close(compiled(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_entropy_schedule_compiles_fullgraph(fresh_dynamo):
    model = make_transformer(num_layers=2, num_single_layers=1)
    injector = IdentityInjector(model, make_cas(2))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    inputs = make_inputs(1, 2, 3, t=0.5)
    with injector.active(id_tokens(1), 1.0, PRESETS["entropy"], grid=(2, 3)):
        got = compiled(**inputs)[0]
        want = model(**inputs)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_compiled_cfg_branches_from_cache_context_do_not_recompile(fresh_dynamo):
    """The branch read from diffusers' cache context (through the probe hook) traces fullgraph:
    one graph per branch and step pattern in the first session, none later, eager results."""
    import torch._dynamo

    from spatialid.injection import PuLIDIdentity

    model = make_transformer(num_layers=2, num_single_layers=1)
    injector = IdentityInjector(model, make_cas(2))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    schedule = SpatialSchedule()
    cond, uncond = id_tokens(1), torch.zeros(1, 4, KV_DIM)

    def generate(module, order, steps=4):
        outs = []
        # the pipeline's pattern: no identity before step 1, uncond tokens for the uncond branch
        identity = PuLIDIdentity(cond, uncond, id_weight=1.0, preset=schedule, start_step=1, height=48, width=64)
        with injector.active(identity, calls_per_step=2):
            for i in range(steps):
                step = make_inputs(2, 3, 4, t=1.0 - 0.2 * i)
                for branch in order:
                    with model.cache_context(branch):
                        outs.append(module(**step)[0])
        return outs

    generate(compiled, ("cond", "uncond"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for order in [("cond", "uncond"), ("cond", "uncond")]:
            got = generate(compiled, order, steps=5)
            want = generate(model, order, steps=5)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # another call order is other guards (a few graphs), still fullgraph and still right
    got = generate(compiled, ("uncond", "cond"))
    for a, b in zip(got, generate(model, ("uncond", "cond"))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    injector.detach()


def test_compiled_masks_build_constants_on_device(fresh_dynamo):
    """Under compile the prior and blur matrices are built in float32 by traced ops (no float64
    host maths, no host-to-device copy per call), several masks share one graph (as the 20
    injection points do) and AOT tracing accepts it."""
    graphs = []

    def capture(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    schedule = PRESETS["paper"]

    def two_points(t, x, y):  # type: ignore[no-untyped-def]
        return schedule.mask(t, x, 4, 6) + schedule.mask(t, y, 4, 6)

    x, y, t = torch.randn(2, 24, 16), torch.randn(2, 24, 16), torch.tensor([0.5, 0.9])
    want = two_points(t, x, y)
    torch.testing.assert_close(torch.compile(two_points, backend=capture, fullgraph=True)(t, x, y), want)
    assert "float64" not in graphs[0].code
    torch.testing.assert_close(torch.compile(two_points, backend="aot_eager", fullgraph=True)(t, x, y), want)


def test_device_builders_equal_cached_tensors():
    cpu = torch.device("cpu")
    for length in (1, 2, 3, 4, 9, 64):
        torch.testing.assert_close(
            extractor._blur_matrix_on_device(length, 5, 1.5, cpu, torch.float32),
            extractor._blur_matrix_cached(length, 5, 1.5, cpu, torch.float32),
        )
    for rows, cols in ((1, 1), (3, 5), (64, 64)):
        torch.testing.assert_close(
            extractor._prior_on_device(rows, cols, 0.3, cpu, torch.float32),
            extractor._center_prior_cached(rows, cols, 0.3, cpu, torch.float32),
        )
    torch.testing.assert_close(
        extractor._kernel_on_device(5, 1.5, cpu, torch.float32), extractor.gaussian_kernel1d(5, 1.5)
    )


# ---------------------------------------------------------------------------------------------
# avoided work


@torch.no_grad()
def test_prior_and_blur_caches_are_hit_every_step(cpu_model):
    model, cas, injector = cpu_model
    extractor._center_prior_cached.cache_clear()
    extractor._blur_matrix_cached.cache_clear()
    inputs = make_inputs(1, 3, 5, t=0.5)
    with injector.active(id_tokens(1), schedule=PRESETS["paper"], grid=(3, 5)):
        model(**inputs)
        first_prior = extractor._center_prior_cached.cache_info()
        first_blur = extractor._blur_matrix_cached.cache_info()
        model(**inputs)
    prior = extractor._center_prior_cached.cache_info()
    blur = extractor._blur_matrix_cached.cache_info()
    n = len(cas)
    # the prior once per transformer call (the call's layout), the blur matrices at every point
    assert first_prior.misses == 1 and first_prior.hits == 0
    assert first_blur.misses == 2 and first_blur.hits == 2 * n - 2  # one matrix per axis length
    assert prior.misses == 1 and prior.hits == 1
    assert blur.misses == 2 and blur.hits == 4 * n - 2


@pytest.mark.parametrize("length", [1, 2, 3, 4, 9])
def test_blur_matrix_rows_sum_to_one_and_match_padded_convolution(length):
    m = extractor._blur_matrix_cached(length, 5, 1.5, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(m.sum(1), torch.ones(length, dtype=torch.float64))
    x = torch.rand(length, dtype=torch.float64)
    w = extractor.gaussian_kernel1d(5, 1.5, dtype=torch.float64)
    mode = "reflect" if length > 2 else "replicate"
    padded = torch.nn.functional.pad(x.view(1, 1, -1), (2, 2), mode=mode).view(-1)
    expected = torch.stack([(padded[i : i + 5] * w).sum() for i in range(length)])
    torch.testing.assert_close(m @ x, expected)


@torch.no_grad()
def test_entropy_path_projects_image_tokens_once(cpu_model):
    """The entropy source takes probabilities from the CA's own pass (no second to_q)."""
    model, cas, injector = cpu_model
    calls = []
    handles = [ca.to_q.register_forward_hook(lambda *a: calls.append(1)) for ca in cas]
    try:
        with injector.active(id_tokens(1), schedule=PRESETS["entropy"], grid=(4, 4)):
            model(**make_inputs(1, 4, 4))
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(cas)


@torch.no_grad()
def test_ca_return_probs_matches_fused_path():
    torch.manual_seed(4)
    ca = PerceiverAttentionCA(dim=32, dim_head=8, heads=4, kv_dim=16).eval()
    id_tok, latents = torch.randn(1, 6, 16), torch.randn(2, 10, 32)
    out, raw = ca(id_tok, latents, return_raw=True)
    out_p, raw_p, probs = ca(id_tok, latents, return_probs=True)
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw_p, raw, rtol=1e-5, atol=1e-6)
    assert probs.shape == (2, 4, 10, 6) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 10))
    from injection_helpers import attention_probs

    torch.testing.assert_close(probs, attention_probs(ca, id_tok.expand(2, -1, -1), latents), rtol=1e-5, atol=1e-6)


class _Float32Allocations(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_norm_of_low_precision_activation_is_exact_without_full_copy(dtype):
    x = torch.randn(2, 8192, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    with _Float32Allocations() as allocs:
        got = norm_mask(x)
    assert allocs.largest < x.numel() // 2  # chunks only, never the whole activation in float32
    # chunked vs whole-tensor float32 reductions: equal up to float32 rounding (bf16 accumulation would be ~1e-2 off)
    torch.testing.assert_close(got, norm_mask(x.float()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_elements", [16, 48, 1 << 18])
def test_cpu_norm_chunking_handles_remainders(monkeypatch, chunk_elements):
    monkeypatch.setattr(extractor, "_NORM_CHUNK_ELEMENTS", chunk_elements)
    x = torch.randn(3, 13, 16, generator=torch.Generator().manual_seed(7)).bfloat16()
    want = torch.linalg.vector_norm(x.float(), dim=-1)
    torch.testing.assert_close(extractor._token_norms(x), want, rtol=1e-6, atol=1e-6)  # chunked vs whole


# ---------------------------------------------------------------------------------------------
# the benchmark script


def _load_step_cost():
    path = REPO / "benchmarks" / "step_cost.py"
    spec = importlib.util.spec_from_file_location("step_cost", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_cost"] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_tiny_smoke(tmp_path, capsys):
    step_cost = _load_step_cost()
    out = tmp_path / "tiny.json"
    threads = torch.get_num_threads()
    try:  # --threads 1: the benchmark's setting on shared CPUs (restored for the other tests)
        args = ["--size", "tiny", "--resolution", "64", "--repeats", "2", "--warmup", "1", "--point-repeats", "2"]
        assert step_cost.main([*args, "--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["image_tokens"] == 16 and result["text_tokens"] == TINY_FLUX.text_max_length
    assert set(result["step_ms"]) == set(step_cost.ALL_VARIANTS)
    assert "pulid/plain" in result["ratios"]
    for preset in SPATIAL_PRESETS:
        assert result["ratios"][f"{preset}/pulid"] > 0
        assert f"{preset}/pulid" in result["paired_ratios"]
    assert result["num_ca"] == TINY_PULID.num_ca
    assert set(result["mask_ms"]) == set(SPATIAL_PRESETS)
    assert result["idformer_ms"]["median"] > 0
    assert result["memory"]["plain"]["peak_rss_mb"] > 0
    assert "paper" in capsys.readouterr().out


def test_benchmark_sizes_follow_flux_layout():
    step_cost = _load_step_cost()
    full = step_cost.SIZES["full"]
    assert (full.num_layers, full.num_single_layers, full.width) == (19, 38, 3072)
    assert full.axes_dims_rope == (16, 56, 56) and sum(full.axes_dims_rope) == full.attention_head_dim
    assert (full.joint_attention_dim, full.pooled_projection_dim, full.in_channels, full.text_tokens) == (4096, 768, 64, 512)
    from spatialid.injection import injection_points

    assert len(injection_points(full.num_layers, full.num_single_layers, full.double_interval, full.single_interval)) == 20
    mid = step_cost.SIZES["mid"]
    assert sum(mid.axes_dims_rope) == mid.attention_head_dim
    assert mid.ca.dim == mid.width
