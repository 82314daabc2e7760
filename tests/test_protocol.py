"""The authors' configuration by default, their ablation presets, schedule flags and reference noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spatialid import defaults as D


@pytest.fixture(scope="module")
def pipe(tiny_pipe_plain):
    """SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False), shared with the session (conftest)."""
    return tiny_pipe_plain


TOK = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0))
KW = dict(height=80, width=64, num_inference_steps=3, seed=5, output_type="np", max_sequence_length=32)


def test_relaxed_is_the_default_everywhere():
    """test_ibench_spatial.py's Config F (late floor 0.8, sigma 0.7, global floor 0.3) = relaxed."""
    import argparse

    from spatialid.cli.main import build_parser
    from spatialid.masks import PRESETS
    from spatialid.pipeline.settings import GenerationSettings
    from spatialid.ui import handlers as h

    relaxed = PRESETS["relaxed"]
    assert (relaxed.early, relaxed.late, relaxed.late_floor, relaxed.center_sigma, relaxed.global_floor) == (
        0.7, 0.3, 0.8, 0.7, 0.3
    )
    assert D.DEFAULT_PRESET == "relaxed" and GenerationSettings().preset == "relaxed"
    parser = build_parser()
    gen = parser.parse_args(["generate", "--prompt", "x"])
    bench = parser.parse_args(["bench", "--ids", "a", "--prompts", "b", "--out", "c"])
    assert gen.preset == "relaxed" and bench.presets == "pulid,relaxed"
    assert h.defaults_for(argparse.Namespace(is_tiny=True))[0].preset == "relaxed"
    # the rest of test_ibench_spatial.py's generation config
    s = D.size_steps("bench", tiny=False)
    assert (s.width, s.height, s.steps, D.BENCH_SEED) == (896, 1152, 25, 42)
    assert (D.DEFAULT_GUIDANCE, D.DEFAULT_START_STEP, D.DEFAULT_ID_WEIGHT, D.DEFAULT_TRUE_CFG) == (4.0, 0, 1.0, 1.0)
    assert D.DEFAULT_MAX_SEQUENCE_LENGTH == 128
    from spatialid.cli.options import sampling_settings

    # --true-cfg is resolved per model family (FLUX.1: off, as the authors' script; Chroma: on)
    resolved = sampling_settings(bench, "bench", tiny=False, family="flux")
    assert (bench.guidance, bench.start_step, bench.id_weight, resolved.true_cfg, bench.seeds) == (4.0, 0, 1.0, 1.0, "42")


def test_ablation_presets_c_d_e():
    from spatialid.masks import PRESETS

    paper = PRESETS["paper"]
    c, d, e = PRESETS["late-floor-0.7"], PRESETS["global-floor-0.3"], PRESETS["global-floor-0.5"]
    assert (c.late_floor, c.center_sigma, c.global_floor) == (0.7, 0.5, 0.0)
    assert (d.late_floor, d.center_sigma, d.global_floor) == (paper.late_floor, paper.center_sigma, 0.3)
    assert (e.late_floor, e.center_sigma, e.global_floor) == (paper.late_floor, paper.center_sigma, 0.5)
    assert {c.early, d.early, e.early} == {0.7} and {c.late, d.late, e.late} == {0.3}


def test_schedule_overrides_change_the_mask_and_are_recorded(pipe):
    base = pipe("a portrait", id_embeds=TOK, preset="paper", **KW)
    same = pipe("a portrait", id_embeds=TOK, preset="global-floor-0.5", **KW)
    over = pipe("a portrait", id_embeds=TOK, preset="paper", schedule_overrides={"global_floor": 0.5}, **KW)
    # paper + global_floor 0.5 is preset E: the same schedule object values, the same computation
    assert over.settings["schedule"] == same.settings["schedule"]
    np.testing.assert_array_equal(over.images, same.images)
    assert np.abs(over.images - base.images).max() > 1e-4
    assert over.settings["preset"] == "paper" and over.settings["schedule_overrides"] == {"global_floor": 0.5}
    # uniform PuLID has no mask: overrides do nothing and are not recorded
    uni = pipe("a portrait", id_embeds=TOK, preset="pulid", schedule_overrides={"global_floor": 0.5}, **KW)
    ref = pipe("a portrait", id_embeds=TOK, preset="pulid", **KW)
    np.testing.assert_array_equal(uni.images, ref.images)
    assert uni.settings["schedule_overrides"] is None and uni.settings["schedule"] is None


def test_cli_schedule_flags(tmp_path, capsys):
    from spatialid.app.metadata import read_png_metadata
    from spatialid.cli.main import main

    out = tmp_path / "a.png"
    args = ["-q", "generate", "--model", "tiny", "--prompt", "x", "--steps", "2", "--size", "64x64", "--seed", "1"]
    assert main([*args, "--late-floor", "0.6", "--center-sigma", "0.4", "--out", str(out)]) == 0
    meta = read_png_metadata(out)
    assert meta["schedule_overrides"] == {"late_floor": 0.6, "center_sigma": 0.4}
    assert meta["preset"] == "relaxed"
    # no identity here, so nothing was injected: the record still says what was asked
    capsys.readouterr()
    assert main([*args, "--preset", "pulid", "--global-floor", "0.3", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "injects uniformly" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--late-floor", "1.5", "--out", str(tmp_path / "c.png")]) == 2
    assert "late_floor must be in [0, 1]" in capsys.readouterr().err


def test_reference_noise_matches_the_bfl_draw(pipe):
    seeds = [7, 8]
    lat = pipe.reference_noise(seeds, 80, 64)
    c = pipe.transformer.config.in_channels // 4
    for i, s in enumerate(seeds):
        # BFL/PuLID get_noise: [1, 16, 2*ceil(H/16), 2*ceil(W/16)], bfloat16, device generator
        ref = torch.randn(1, c, 10, 8, dtype=torch.bfloat16, generator=torch.Generator("cpu").manual_seed(s))
        packed = pipe._pack_latents(ref, 1, c, 10, 8).float()
        assert torch.equal(lat[i : i + 1], packed)  # the same draw, packed the same way
    a = pipe("a portrait", noise="reference", **KW)
    b = pipe("a portrait", noise="reference", **KW)
    d = pipe("a portrait", **KW)
    np.testing.assert_array_equal(a.images, b.images)
    assert np.abs(a.images - d.images).max() > 1e-3 and a.settings["noise"] == "reference"
    with pytest.raises(Exception, match="noise must be one of"):
        pipe("a portrait", noise="other", **KW)


def test_bench_records_schedule_flags(tmp_path):
    from PIL import Image
    from skimage import data

    from spatialid.app.metadata import read_png_metadata
    from spatialid.cli.main import main

    ids = tmp_path / "ids"
    ids.mkdir()
    Image.fromarray(data.astronaut()).save(ids / "a.png")
    (tmp_path / "p.txt").write_text("a portrait of a person\n")
    out = tmp_path / "run"
    argv = ["-q", "bench", "--model", "tiny", "--ids", str(ids), "--prompts", str(tmp_path / "p.txt"),
            "--presets", "pulid,relaxed", "--out", str(out), "--no-progress", "--late-floor", "0.6"]
    assert main(argv) == 0
    manifest = json.loads((out / "bench.json").read_text())
    assert manifest["settings"]["schedule_overrides"] == {"late_floor": 0.6}
    relaxed = [p for p in (out / "relaxed").rglob("*.png")]
    pulid = [p for p in (out / "pulid").rglob("*.png")]
    assert read_png_metadata(relaxed[0])["schedule"]["late_floor"] == 0.6
    assert "schedule" not in read_png_metadata(pulid[0])
