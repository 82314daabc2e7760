"""``spatialid generate`` / ``info`` / ``demo`` on the tiny model: outputs, metadata and error exits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spatialid.cli.main import main
from spatialid.app.metadata import read_png_metadata

FAST = ["--model", "tiny", "--size", "64x64", "--steps", "2"]


# Fixtures from conftest.py (shared, read-only): ``astronaut`` (the photo), ``photo_dir`` and
# ``embeds_file`` (``me.safetensors``, random tiny-model tokens).


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, match):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("spatialid: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert match.lower() in lines[0].lower(), lines[0]


# ----------------------------------------------------------------------------- happy paths


def test_generate_with_embeds_then_info(tmp_path, embeds_file, capsys):
    out = tmp_path / "img.png"
    code, stdout, err = _run(
        ["generate", *FAST, "--id-embeds", embeds_file, "--prompt", "a portrait", "--seed", 5, "--out", out,
         "--preset", "relaxed", "--id-weight", 0.8, "--true-cfg", 2, "--negative-prompt", "blurry"],
        capsys,
    )
    assert code == 0, err
    assert stdout.split() == [str(out)]
    assert "noise by design" in err
    s = read_png_metadata(out)
    assert s["prompt"] == "a portrait" and s["seed"] == 5 and s["preset"] == "relaxed"
    assert s["schedule"]["late_floor"] == 0.8 and s["schedule"]["global_floor"] == 0.3
    assert s["id_weight"] == 0.8 and s["true_cfg"] == 2.0 and s["negative_prompt"] == "blurry"
    assert s["steps"] == 2 and s["width"] == 64 and s["height"] == 64 and s["start_step"] == 0
    assert s["guidance"] == 4.0 and s["model"] == "tiny" and s["version"]
    assert s["identity"]["source"] == "embeds" and s["identity"]["files"] == ["me.safetensors"]
    assert s["identity"]["embedding"]["format"] == "spatialid.identity_embedding"
    assert s["identity_injected"] is True

    code, stdout, _ = _run(["info", "--full", out], capsys)
    assert code == 0
    assert "a portrait" in stdout and "schedule.late_floor" in stdout and "me.safetensors" in stdout
    code, stdout, _ = _run(["info", "--json", out], capsys)
    assert json.loads(stdout) == s


def test_generate_from_photo_with_masks_and_compare(tmp_path, astronaut, capsys):
    out = tmp_path / "run" / "me.png"
    code, stdout, err = _run(
        ["generate", *FAST, "--id", astronaut, "--prompt", "astronaut", "--seed", 1, "--out", out,
         "--masks", "--compare", "pulid,paper,relaxed"],
        capsys,
    )
    assert code == 0, err
    files = [Path(p) for p in stdout.split()]
    assert files == [out, out.with_name("me_masks.png"), out.with_name("me_compare.png")]
    for f in files:
        assert f.stat().st_size > 0
    assert read_png_metadata(out)["identity"]["files"] == ["astronaut.png"]
    grid = read_png_metadata(files[2])
    assert grid["kind"] == "preset comparison" and grid["compare"] == ["pulid", "paper", "relaxed"]
    with Image.open(files[2]) as im:  # identity photo + 3 presets side by side
        assert im.size[0] > 4 * 64
    with Image.open(files[1]) as im:
        assert im.size[0] > 3 * 64
    assert read_png_metadata(files[1])["kind"] == "mask schedule"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_num_images_and_output_folder(tmp_path, embeds_file, capsys):
    code, stdout, err = _run(
        ["generate", *FAST, "--id-embeds", embeds_file, "--prompt", "x", "--seed", 9, "--num-images", 2,
         "--out", str(tmp_path) + "/", "--masks"],
        capsys,
    )
    assert code == 0, err
    files = [Path(p) for p in stdout.split()]
    images = [f for f in files if not f.stem.endswith("_masks")]
    assert len(images) == 2 and len(files) == 4
    assert [read_png_metadata(f)["seed"] for f in images] == [9, 10]
    assert all(f.parent == tmp_path for f in files)
    # image 1 of the batch is reproducible alone with seed 10
    single = tmp_path / "single.png"
    assert _run(["generate", *FAST, "--id-embeds", embeds_file, "--prompt", "x", "--seed", 10, "--out", single],
                capsys)[0] == 0
    a = np.asarray(Image.open(images[1]), dtype=np.int16)
    b = np.asarray(Image.open(single), dtype=np.int16)
    assert np.abs(a - b).max() <= 2


def test_encode_then_generate_matches_generate_from_photo(tmp_path, astronaut, capsys):
    """`spatialid encode --model tiny` + `generate --id-embeds` == `generate --id` (same tiny weights)."""
    emb = tmp_path / "astro.safetensors"
    code, _, err = _run(["encode", "--model", "tiny", "--id", astronaut, "--out", emb, "--device", "cpu"], capsys)
    if code != 0 and "invalid choice" in err:
        pytest.skip("encode command not available")
    assert code == 0, err
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = [*FAST, "--prompt", "x", "--seed", 4, "--true-cfg", 2]
    assert _run(["generate", *common, "--id-embeds", emb, "--out", a], capsys)[0] == 0
    assert _run(["generate", *common, "--id", astronaut, "--out", b], capsys)[0] == 0
    # Exact: both runs rebuild the tiny weights from seed 0 with the same ops, and the embedding file
    # holds bit copies of the tokens `generate --id` computes in memory.
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert read_png_metadata(a)["identity"]["files"] == ["astro.safetensors"]


def test_generate_without_identity_is_plain_flux(tmp_path, capsys, caplog):
    out = tmp_path / "plain.png"
    code, _, err = _run(["generate", *FAST, "--prompt", "x", "--seed", 3, "--out", out, "--masks"], capsys)
    assert code == 0, err
    assert "without identity" in caplog.text
    s = read_png_metadata(out)
    assert s["identity_injected"] is False and s["identity"]["source"] is None


def test_info_several_files_and_json_list(tmp_path, capsys):
    from spatialid.app.metadata import save_png_with_metadata

    a = save_png_with_metadata(Image.new("RGB", (8, 8)), tmp_path / "a.png", {"prompt": "a", "seed": 1})
    b = save_png_with_metadata(Image.new("RGB", (8, 8)), tmp_path / "b.png", {"prompt": "b", "seed": 2})
    code, out, _ = _run(["info", a, b], capsys)
    assert code == 0 and f"== {a}" in out and f"== {b}" in out
    code, out, _ = _run(["info", "--json", a, b], capsys)
    assert [d["prompt"] for d in json.loads(out)] == ["a", "b"]


def test_demo_in_process(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, stdout, err = _run(["demo", "--out", out_dir, "--size", "64x64", "--steps", 2], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["astronaut.png", "demo.png", "demo_compare.png", "demo_masks.png"]  # the photo: a command that works
    assert "wall time" in stdout and "noise by design" in err
    s = read_png_metadata(out_dir / "demo.png")
    assert s["identity"]["files"] == ["astronaut.png"] and s["demo"] is True


# ----------------------------------------------------------------------------- bad input


def _gif(path: Path) -> Path:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    return path


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt", "x", "--preset", "nope"], "unknown preset"),
        (["--prompt", "x", "--compare", "pulid,nope"], "unknown preset"),
        (["--prompt", "x", "--compare", ","], "--compare is empty"),
        (["--prompt", "x", "--steps", "0"], "steps must be between"),
        (["--prompt", "x", "--id-weight", "5"], "id weight"),
        (["--prompt", "x", "--id-weight", "-1"], "id weight"),
        (["--prompt", "x", "--size", "100x100"], "multiple of 16"),
        (["--prompt", "x", "--size", "32x32"], "between 64"),
        (["--prompt", "x", "--size", "8192x8192"], "between 64"),
        (["--prompt", "x", "--size", "big"], "size must look like"),
        (["--prompt", "x", "--num-images", "0"], "number of images"),
        (["--prompt", "x", "--true-cfg", "0.5"], "true cfg"),
        (["--prompt", "x", "--start-step", "2"], "start step"),
        (["--prompt", "x", "--seed", "-4"], "seed"),
        (["--prompt", "x", "--quantize", "nf4"], "--model tiny"),
        (["--prompt", "x", "--quantize", "q3"], "unknown quantization"),
        (["--prompt", "x", "--offload", "model", "--device", "cpu"], "needs --device cuda"),
        (["--prompt", "x", "--max-sequence-length", "0"], "max sequence length"),
    ],
)
def test_bad_numbers_and_names_exit_2(tmp_path, capsys, extra, match):
    code, _, err = _run(["generate", "--model", "tiny", "--steps", "2", "--out", tmp_path / "x.png", *extra], capsys)
    _assert_one_line_error(code, err, match)
    assert not (tmp_path / "x.png").exists()


def test_bad_photos_exit_2(tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 8000)).save(bomb)  # 72 MP, a few KB on disk
    cases = [
        (tmp_path / "missing.jpg", "missing.jpg"),
        (text, "notes.png"),
        (_gif(tmp_path / "anim.gif"), "anim"),
        (bomb, "bomb.png"),
        (tmp_path, str(tmp_path)),
    ]
    for photo, match in cases:
        code, _, err = _run(["generate", *FAST, "--id", photo, "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
        _assert_one_line_error(code, err, match)


def test_photo_without_face_exit_2(tmp_path, photo_dir, capsys):
    coffee = photo_dir / "coffee.png"
    code, _, err = _run(["generate", *FAST, "--id", coffee, "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    _assert_one_line_error(code, err, "face")
    assert not (tmp_path / "o.png").exists()


def test_embeds_problems_exit_2(tmp_path, capsys):
    from spatialid.encoder.embedding import IdentityEmbedding

    code, _, err = _run(["generate", *FAST, "--id-embeds", tmp_path / "none.safetensors", "--prompt", "x",
                         "--out", tmp_path / "o.png"], capsys)
    _assert_one_line_error(code, err, "not found")
    wide = IdentityEmbedding(tokens=torch.zeros(1, 4, 2048), uncond_tokens=torch.zeros(1, 4, 2048))
    path = wide.save(tmp_path / "full.safetensors")
    code, _, err = _run(["generate", *FAST, "--id-embeds", path, "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    _assert_one_line_error(code, err, "width 2048")


def test_unwritable_output_checked_before_generating(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(["generate", *FAST, "--prompt", "x", "--out", blocker / "x.png"], capsys)
    _assert_one_line_error(code, err, "file")
    code, _, err = _run(["generate", *FAST, "--prompt", "x", "--out", tmp_path / "x.png", "--format", "jpg"], capsys)
    _assert_one_line_error(code, err, "--format jpg does not match")


def test_offline_hub_model_names_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = _run(
        ["generate", "--model", "black-forest-labs/FLUX.1-dev", "--device", "cpu", "--prompt", "x", "--steps", "2",
         "--out", tmp_path / "o.png"],
        capsys,
    )
    _assert_one_line_error(code, err, "black-forest-labs/FLUX.1-dev")
    assert "hf download" in err or "local folder" in err


def test_missing_local_model_folder(tmp_path, capsys):
    code, _, err = _run(["generate", "--model", tmp_path / "nope", "--device", "cpu", "--prompt", "x",
                         "--out", tmp_path / "o.png"], capsys)
    _assert_one_line_error(code, err, "nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_absent(tmp_path, capsys):
    code, _, err = _run(["generate", *FAST, "--device", "cuda", "--prompt", "x", "--out", tmp_path / "o.png"], capsys)
    _assert_one_line_error(code, err, "CUDA")


def test_info_errors(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, _, err = _run(["info", plain], capsys)
    _assert_one_line_error(code, err, "without spatialid settings")
    code, _, err = _run(["info", tmp_path / "missing.png"], capsys)
    _assert_one_line_error(code, err, "no such file")


def test_debug_flag_shows_the_exception(tmp_path):
    from spatialid.pipeline.settings import GenerationSettingsError

    with pytest.raises(GenerationSettingsError):
        main(["--debug", "generate", *FAST, "--prompt", "x", "--steps", "0", "--out", str(tmp_path / "x.png")])


def test_demo_refuses_a_file_as_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = _run(["demo", "--out", f], capsys)
    _assert_one_line_error(code, err, "not a folder")


# ----------------------------------------------------------------------------- the console script


def test_console_script_generate_and_info(tmp_path):
    exe = shutil.which("spatialid")
    cmd = [exe] if exe else [sys.executable, "-m", "spatialid"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "cli.png"
    proc = subprocess.run(
        [*cmd, "generate", *FAST, "--prompt", "hello", "--seed", "2", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "denoising" in proc.stderr  # the progress bar is shown
    proc = subprocess.run([*cmd, "info", "--json", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["prompt"] == "hello"
    proc = subprocess.run([*cmd, "generate", *FAST, "--prompt", "", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("spatialid: error: prompt is empty")
