"""The schedule's phase comes from the sampler's float time, not the bfloat16-rounded timestep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatialid.injection import snap_to_schedule
from spatialid.masks import PRESETS

SIZES = [(512, 512), (1024, 1024), (896, 1152)]
STEPS = range(4, 51)


def _flux_times(width: int, height: int, steps: int):
    """Sigmas and timesteps exactly as diffusers' FluxPipeline computes them for this size."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from spatialid.pipeline.tiny import FLUX_SCHEDULER_CONFIG

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    seq_len = (height // 16) * (width // 16)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas, timesteps


def _phases(schedule, times):
    return [schedule.phase(float(t)) for t in times]


def test_bf16_phase_sequence_equals_the_float_one():
    schedule = PRESETS["paper"]
    rounded_differs = 0
    for width, height in SIZES:
        for steps in STEPS:
            sigmas, timesteps = _flux_times(width, height, steps)
            exact = _phases(schedule, sigmas[:steps])
            # what the transformer receives in a bfloat16 pipeline: t.to(bf16) / 1000
            passed = torch.stack([(t.reshape(1).to(torch.bfloat16) / 1000).float() for t in timesteps]).reshape(-1)
            snapped = snap_to_schedule(passed, sigmas)
            assert _phases(schedule, snapped) == exact, (width, height, steps)
            rounded_differs += _phases(schedule, passed) != exact
    # without snapping some combinations land a step in another phase (e.g. 896x1152, 28 steps)
    assert rounded_differs > 0


def test_snap_is_exact_for_exact_times_and_batched():
    sigmas, _ = _flux_times(1024, 1024, 20)
    t = sigmas[[0, 5, 19]].clone()
    assert torch.equal(snap_to_schedule(t, sigmas), t)
    noisy = t + torch.tensor([0.001, -0.0015, 0.0004])
    assert torch.equal(snap_to_schedule(noisy, sigmas), t)


@pytest.mark.parametrize("size,steps", [((896, 1152), 28)])
def test_known_case_crosses_a_boundary_without_snapping(size, steps):
    """The issue's example: sigma 0.7009 becomes 0.6992 in bfloat16, a prior step read as attention."""
    sigmas, timesteps = _flux_times(*size, steps)
    passed = torch.stack([(t.reshape(1).to(torch.bfloat16) / 1000).float() for t in timesteps]).reshape(-1)
    schedule = PRESETS["paper"]
    assert _phases(schedule, passed) != _phases(schedule, sigmas[:steps])
    assert _phases(schedule, snap_to_schedule(passed, sigmas)) == _phases(schedule, sigmas[:steps])


def test_bf16_pipeline_records_the_float_phases():
    """End to end: a bfloat16 tiny pipeline records, per step, the phase of the scheduler's sigma."""
    from spatialid.pipeline import SpatialIDPipeline

    pipe = SpatialIDPipeline.tiny(seed=0, dtype=torch.bfloat16, with_identity_encoder=False)
    pipe.set_progress_bar_config(disable=True)
    tok = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = pipe("a portrait", id_embeds=tok, preset="paper", height=896, width=1152, num_inference_steps=28,
               seed=0, output_type="latent", max_sequence_length=32, return_masks=True)
    sigmas, _ = _flux_times(1152, 896, 28)
    assert [m.phase for m in out.masks] == _phases(PRESETS["paper"], sigmas[:28])
    assert [m.t for m in out.masks] == pytest.approx([float(s) for s in sigmas[:28]], abs=1e-6)
