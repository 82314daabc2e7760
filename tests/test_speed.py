"""Speed paths (issue 16), checked for behaviour, never timed:

* the fused mask (``spatialid.masks.fused``) equals the eager reference on odd grids, batch 2,
  every preset and phase, float32 and bfloat16, and ``SpatialSchedule.mask`` dispatches to it;
* step caches (``--cache``) keep the identity: First Block Cache skips steps, a cached step adds
  no second identity residual, a change of phase or of injection forces a full step;
* ``--compile`` compiles the transformer with its hooks, with no graph break and no recompile
  across seeds, weights and identities (tiny model, dynamo's eager backend: fast on 2 cores).
"""

from __future__ import annotations

import argparse
import itertools

import pytest
import torch

from spatialid.errors import SpatialIDError
from spatialid.injection.step_cache import (
    CACHE_NAMES,
    CacheSpec,
    enable_step_cache,
    parse_cache,
)
from spatialid.masks import PRESETS, SpatialSchedule, fused
from spatialid.models.configs import TINY_PULID

SPATIAL = {name: s for name, s in PRESETS.items() if s is not None}
# every phase: prior (> early), attention, relaxed (<= late), the boundaries themselves, mixed batch
TIMES = ([0.9, 0.95], [0.5, 0.4], [0.2, 0.0], [0.7, 0.3], [0.8, 0.1], [0.5])


# ---------------------------------------------------------------------------------------------
# fused mask


def _inputs(rows: int, cols: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(2, rows * cols, 24, generator=g).to(dtype)
    probs = torch.softmax(torch.randn(2, 3, rows * cols, 5, generator=g), dim=-1)
    return raw, probs


@pytest.mark.parametrize("people", [1, 2])
@pytest.mark.parametrize("grid", [(1, 1), (3, 5)])
def test_fused_mask_is_the_mask_function_compiled(grid, people):
    """The fused path is identity_masks itself, compiled (aot_eager: inductor's graph without the
    C++ build): the same masks for one person and several, spatial presets and the entropy source."""
    from spatialid.masks.compute import build_layout, identity_masks

    rows, cols = grid
    maths = fused.FusedMask(compile=True, backend="aot_eager")
    for seed, name in enumerate(("paper", "entropy", "prior-only")):
        schedule = PRESETS[name]
        raw, probs = _inputs(rows, cols, torch.float32, seed)
        raw = torch.stack([raw] * people) + torch.arange(people).float().reshape(-1, 1, 1, 1)
        probs = torch.stack([probs] * people)
        layout = build_layout(people, rows, cols, schedule.center_sigma, None, "cpu")
        t = torch.tensor([0.9, 0.2])
        want = identity_masks(schedule, t, raw, rows, cols, layout, attn_probs=probs)
        got = maths(schedule, t, raw, rows, cols, layout, attn_probs=probs)
        assert maths.failed is None
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)


def test_fused_mask_falls_back_to_eager_with_one_warning():
    """A compile or kernel error (a GPU backend meeting code run only on CPUs) never loses a run."""
    from spatialid.masks.compute import build_layout, identity_masks

    maths = fused.FusedMask(compile=True, backend="no-such-backend")
    schedule, (raw, _) = PRESETS["paper"], _inputs(3, 5, torch.float32, 0)
    layout = build_layout(1, 3, 5, schedule.center_sigma, None, "cpu")
    t = torch.tensor([0.5, 0.5])
    with pytest.warns(RuntimeWarning, match="eager mask"):
        got = maths(schedule, t, raw[None], 3, 5, layout)
    assert maths.failed is not None
    torch.testing.assert_close(got, identity_masks(schedule, t, raw[None], 3, 5, layout))
    maths(schedule, t, raw[None], 3, 5, layout)  # later calls: eager, no second warning


def test_mask_dispatch(monkeypatch):
    calls = []
    real = fused.FusedMask(compile=False)

    def spy(schedule, t, ca_raw, rows, cols, layout, attn_probs=None):  # type: ignore[no-untyped-def]
        calls.append(rows)
        return real(schedule, t, ca_raw, rows, cols, layout, attn_probs=attn_probs)

    monkeypatch.setattr("spatialid.masks.schedule.fused_identity_masks", spy)
    schedule, (raw, _) = SpatialSchedule(), _inputs(3, 5, torch.float32, 0)
    t = torch.tensor([0.5, 0.5])
    schedule.mask(t, raw, 3, 5)  # "auto" on the CPU: eager
    schedule.mask(0.5, raw, 3, 5, fused=True)  # a float t: eager
    assert calls == []
    schedule.mask(t, raw, 3, 5, fused=True)
    assert calls == [3]
    assert fused.use_fused("auto", torch.device("cuda")) and not fused.use_fused("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="fused must be"):
        schedule.mask(t, raw, 3, 5, fused="yes")
    with pytest.raises(ValueError, match="shape"):
        schedule.mask(torch.zeros(3), raw, 3, 5, fused=True)


# ---------------------------------------------------------------------------------------------
# step caches


def test_parse_cache():
    assert parse_cache(None) is None and parse_cache("none") is None
    assert parse_cache("fbc") == CacheSpec("fbc", CACHE_NAMES["fbc"][1])
    assert parse_cache("FBC:0.12") == CacheSpec("fbc", 0.12)
    assert parse_cache("taylorseer:3") == CacheSpec("taylorseer", 3.0)
    for bad, why in [("teacache", "fbc"), ("fbc:x", "not a number"), ("pab:1.5", "whole"), ("fbc:-1", ">= 0")]:
        with pytest.raises(SpatialIDError, match=why):
            parse_cache(bad)


def test_cli_refuses_unknown_cache_before_loading(tmp_path, capsys):
    from spatialid.cli.main import main

    assert main(["generate", "--model", "tiny", "--cache", "teacache", "-p", "x", "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fbc" in err[0] and "taylorseer" in err[0] and "pab" in err[0]
    assert not list(tmp_path.iterdir())


def test_speed_flags_reach_the_model_spec():
    from spatialid.cli.options import (
        add_model_arguments,
        add_speed_arguments,
        model_spec,
    )

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    add_speed_arguments(p)
    spec = model_spec(p.parse_args(["--model", "tiny", "--compile", "--cache", "fbc:0.2"]))
    assert spec.compile and spec.cache == "fbc:0.2"
    assert not model_spec(p.parse_args(["--model", "tiny"])).compile
    with pytest.raises(SpatialIDError, match="unknown --cache"):
        spec.replace(cache="nope").check()


@pytest.fixture(scope="module")
def tiny_pipe():
    from spatialid.pipeline.pipeline_spatialid import SpatialIDPipeline

    pipe = SpatialIDPipeline.tiny(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tokens(seed: int = 1) -> torch.Tensor:
    shape = (1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _generate(pipe, **overrides) -> torch.Tensor:  # type: ignore[no-untyped-def]
    kwargs = {"prompt": "a person", "id_embeds": _tokens(), "preset": "paper", "num_inference_steps": 10,
              "height": 64, "width": 64, "seed": 3, "output_type": "np"}
    return torch.from_numpy(pipe(**{**kwargs, **overrides}).images)


def _phase_changes(pipe, schedule: SpatialSchedule) -> int:  # type: ignore[no-untyped-def]
    phases = [schedule.phase(float(s)) for s in pipe.scheduler.sigmas[:-1]]
    return sum(a != b for a, b in itertools.pairwise(phases))


@torch.no_grad()
def test_first_block_cache_skips_steps_and_keeps_the_identity(tiny_pipe):
    pipe = tiny_pipe
    plain_id, plain_none = _generate(pipe), _generate(pipe, id_weight=0.0)
    effect = plain_id - plain_none
    cache = enable_step_cache(pipe.transformer, pipe.injector, "fbc:0.3")
    try:
        cached_id, cached_none = _generate(pipe), _generate(pipe, id_weight=0.0)
        assert cache.cached > 0  # steps were skipped
        cached_effect = cached_id - cached_none
        cosine = torch.nn.functional.cosine_similarity(cached_effect.flatten(), effect.flatten(), dim=0)
        assert cosine > 0.95
        assert 0.8 < cached_effect.abs().mean() / effect.abs().mean() < 1.25
        # by construction: the identity hook is the innermost hook of every block it is on, so a
        # block the cache skips skips its identity too
        from spatialid.injection.hooks import POINT_HOOK

        for block in pipe.injector._blocks:
            assert block._diffusers_hook._hook_order[0] == POINT_HOOK
    finally:
        cache.disable()
    torch.testing.assert_close(_generate(pipe), plain_id)  # disabled: the uncached output again


@torch.no_grad()
def test_first_block_cache_recomputes_when_the_injection_changes(tiny_pipe):
    """With a threshold no step reaches, only the forced full steps run: the first one and one per
    change of schedule phase; start_step adds one (identity switched on)."""
    pipe = tiny_pipe
    cache = enable_step_cache(pipe.transformer, pipe.injector, "fbc:1e9")
    try:
        _generate(pipe)
        assert cache.computed == 1 + _phase_changes(pipe, PRESETS["paper"])
        cache.reset_counts()
        _generate(pipe, preset="pulid", start_step=3)
        assert cache.computed == 2 and cache.cached == 8
        cache.reset_counts()
        _generate(pipe, true_cfg=2.0, cfg_start_step=0, uncond_id_embeds=torch.zeros_like(_tokens()))  # two branches
        assert cache.computed == 2 * (1 + _phase_changes(pipe, PRESETS["paper"]))
    finally:
        cache.disable()


@torch.no_grad()
def test_attention_caches_keep_the_identity(tiny_pipe):
    pipe = tiny_pipe
    effect = _generate(pipe, num_inference_steps=6) - _generate(pipe, num_inference_steps=6, id_weight=0.0)
    for name in ("taylorseer:2", "pab:2"):
        cache = enable_step_cache(pipe.transformer, pipe.injector, name, current_timestep=lambda: pipe.current_timestep)
        try:
            got = _generate(pipe, num_inference_steps=6) - _generate(pipe, num_inference_steps=6, id_weight=0.0)
        finally:
            cache.disable()
        assert torch.nn.functional.cosine_similarity(got.flatten(), effect.flatten(), dim=0) > 0.95, name


# ---------------------------------------------------------------------------------------------
# --compile


@torch.no_grad()
def test_compiled_pipeline_no_graph_breaks_no_recompiles(monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from spatialid.app.loading import Models, ModelSpec
    from spatialid.pipeline.pipeline_spatialid import SpatialIDPipeline

    monkeypatch.setenv("SPATIALID_COMPILE_BACKEND", "eager")  # tracing as inductor sees it, no C++ build
    torch._dynamo.reset()
    counters.clear()
    try:
        pipe = Models(ModelSpec(model="tiny", device="cpu", compile=True)).pipeline()
        pipe.set_progress_bar_config(disable=True)
        reference = SpatialIDPipeline.tiny(seed=0)
        reference.set_progress_bar_config(disable=True)
        _generate(pipe, num_inference_steps=4)  # first generation: compiles
        assert sum(counters["graph_break"].values()) == 0
        with torch._dynamo.config.patch(error_on_recompile=True):
            _generate(pipe, num_inference_steps=4, id_embeds=_tokens(5), seed=5, id_weight=0.6)
            kwargs = {"num_inference_steps": 4, "id_embeds": _tokens(6), "seed": 6, "id_weight": 1.4}
            got = _generate(pipe, **kwargs)
        torch.testing.assert_close(got, _generate(reference, **kwargs), rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()


def test_cli_generate_with_cache(tmp_path, capsys):
    """`spatialid generate --cache fbc:X` end to end on the tiny model (the flag reaches the pipeline)."""
    from spatialid.cli.main import main
    from spatialid.encoder.embedding import IdentityEmbedding

    g = torch.Generator().manual_seed(0)
    shape = (1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim)
    emb = IdentityEmbedding(tokens=torch.randn(shape, generator=g), uncond_tokens=torch.randn(shape, generator=g))
    path = emb.save(tmp_path / "me.safetensors")
    out = tmp_path / "a.png"
    argv = ["generate", "--model", "tiny", "--device", "cpu", "--id-embeds", str(path), "-p", "x", "--seed", "1",
            "--steps", "4", "--size", "64x64", "--cache", "fbc:0.5", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert out.is_file()


def test_bench_records_the_cache_and_refuses_to_mix_runs(tmp_path, capsys):
    """A step cache changes the images: bench.json records it and a resume without it is refused."""
    import json

    from spatialid.bench.samples import write_sample_inputs
    from spatialid.cli.main import main

    ids, prompts = write_sample_inputs(tmp_path / "in")
    out = tmp_path / "bench"
    base = ["bench", "--model", "tiny", "--ids", str(ids), "--prompts", str(prompts), "--limit-ids", "1",
            "--limit-prompts", "1", "--presets", "paper", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main([*base, "--cache", "fbc:0.5"]) == 0
    assert json.loads((out / "bench.json").read_text())["settings"]["extra"]["cache"] == "fbc:0.5"
    capsys.readouterr()
    assert main(base) == 2  # the same folder without the cache: other images, refused in one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]
