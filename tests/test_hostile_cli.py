"""Issue 20's command-line points: outputs never replace files (9), SIGTERM leaves nothing half-written (11),
every number checked before loading (18), black masks refused (19), messages that name the real problem (20).

Most cases are refused before any model loads, so they run in milliseconds; the two that generate use the
tiny model at 64x64 with 2 steps.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialid.cli.main import main

FAST = ["--model", "tiny", "--size", "64x64", "--steps", "2", "--seed", "1"]


def _refused(argv, capsys) -> str:
    """Run ``argv``; it must fail with one ``spatialid: error:`` line and exit code 2."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("spatialid: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _black(path: Path, size=(64, 64)) -> Path:
    Image.new("L", size, 0).save(path)
    return path


def _mask_file(path: Path, values: np.ndarray, steps: list[int]) -> Path:
    """A --save-masks style file written by hand (the header's steps and the tensor's values as given)."""
    from safetensors.numpy import save_file

    save_file({"masks": values.astype(np.float32)}, str(path), metadata={
        "format": "spatialid-masks/1", "steps": json.dumps(steps), "persons": str(values.shape[2]),
        "grid": f"{values.shape[4]}x{values.shape[5]}"})
    return path


# ----------------------------------------------------------------------------- 9: outputs keep files


def test_save_masks_never_replaces_the_identity_file_named_in_the_command(tmp_path, embeds_file, capsys):
    """0.1.x: `--save-masks me.safetensors --id-embeds me.safetensors --overwrite` turned the identity into a mask file."""
    ident = tmp_path / "me.safetensors"
    ident.write_bytes(embeds_file.read_bytes())
    before = ident.read_bytes()
    line = _refused(["generate", *FAST, "-p", "x", "--id-embeds", ident, "--save-masks", ident, "--overwrite",
                     "-o", tmp_path / "a.png"], capsys)
    assert "also an input of this command" in line
    assert ident.read_bytes() == before and not (tmp_path / "a.png").exists()


def test_overwrite_never_replaces_an_input_image(tmp_path, astronaut, capsys):
    photo = tmp_path / "me.png"
    photo.write_bytes(astronaut.read_bytes())
    line = _refused(["generate", *FAST, "-p", "x", "--id", photo, "-o", photo, "--overwrite"], capsys)
    assert "also an input" in line and photo.read_bytes() == astronaut.read_bytes()


def test_save_masks_keeps_an_existing_file_and_takes_a_numbered_name(tmp_path, embeds_file, capsys):
    kept = tmp_path / "m.safetensors"
    kept.write_bytes(b"keep me")
    code = main([str(a) for a in ["generate", *FAST, "-p", "x", "--id-embeds", embeds_file, "--save-masks", kept,
                                  "-o", tmp_path / "a.png"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert kept.read_bytes() == b"keep me"
    numbered = tmp_path / "m-2.safetensors"
    assert numbered.stat().st_size > 100 and str(numbered) in out.split()
    from spatialid.pipeline.people import load_mask_file

    masks, meta = load_mask_file(numbered)
    assert masks.shape[0] == len(meta["steps"]) == 2


# ----------------------------------------------------------------------------- 11: SIGTERM


_SIGTERM_SCRIPT = r"""
import os, signal, sys, time
import spatialid.app.loading as loading

class Pipe:  # stands for FLUX: the signal arrives while it "denoises"
    def set_progress_bar_config(self, **kwargs):
        pass
    def __call__(self, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)

class Models:
    def __init__(self, spec):
        self.device = "cpu"
    def pipeline(self):
        return Pipe()

loading.Models = Models
loading.ModelSpec.check = lambda self: self
from spatialid.cli.main import main
sys.exit(main(["-q", "generate", "--model", "tiny", "-p", "x", "--size", "64x64", "--steps", "2", "--seed", "1",
               "-o", sys.argv[1]]))
"""


def test_sigterm_during_generate_leaves_no_empty_image(tmp_path):
    """0.1.x: SIGTERM killed the process with the reserved (empty) PNG left under its final name."""
    out = tmp_path / "a.png"
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT, str(out)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "stopped (SIGTERM)" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 18: numbers


@pytest.mark.parametrize("extra, expected", [
    (["--lora", "some/lora:nan"], "scale must be a number between -4 and 4"),
    (["--lora", "some/lora:1e30"], "scale must be a number between -4 and 4"),
    (["--lora", "some/lora:inf"], "scale must be a number between -4 and 4"),
    (["--controlnet", "some/cn", "--control-image", "{init}", "--controlnet-scale", "nan"], "--controlnet-scale must be"),
    (["--controlnet", "some/cn", "--control-image", "{init}", "--controlnet-scale", "1e30"], "--controlnet-scale must be"),
])
def test_every_number_is_checked_before_loading(tmp_path, capsys, monkeypatch, extra, expected):
    import spatialid.app.loading as loading

    monkeypatch.setattr(loading.Models, "pipeline", lambda self: pytest.fail("a model was loaded"))
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (40, 90, 160)).save(init)
    extra = [a.replace("{init}", str(init)) for a in extra]
    assert expected in _refused(["generate", *FAST, "-p", "x", *extra], capsys)


@pytest.mark.parametrize("value", [1e30, float("nan"), -1.0])
def test_mask_file_values_are_checked_before_loading(tmp_path, embeds_file, capsys, value):
    masks = np.full((2, 4, 1, 1, 4, 4), 0.5, np.float32)
    masks[1, 0, 0, 0, 0, 0] = value
    path = _mask_file(tmp_path / "m.safetensors", masks, [0, 1])
    line = _refused(["generate", *FAST, "-p", "x", "--id-embeds", embeds_file, "--masks-from", path], capsys)
    assert "values must be finite and in [0, 1]" in line


# ----------------------------------------------------------------------------- 19: black masks


def test_black_region_mask_is_refused_before_loading(tmp_path, embeds_file, capsys, monkeypatch):
    import spatialid.app.loading as loading

    monkeypatch.setattr(loading.Models, "pipeline", lambda self: pytest.fail("a model was loaded"))
    line = _refused(["generate", *FAST, "-p", "x", "--id-embeds", embeds_file, "--region", _black(tmp_path / "r.png")],
                    capsys)
    assert "black everywhere" in line and "--region" in line


def test_black_inpaint_mask_is_refused(tmp_path, capsys, monkeypatch):
    """0.1.x accepted it (the web UI refused it) and ran a repair of nothing."""
    import spatialid.app.loading as loading

    monkeypatch.setattr(loading.Models, "pipeline", lambda self: pytest.fail("a model was loaded"))
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (40, 90, 160)).save(init)
    line = _refused(["generate", *FAST, "-p", "x", "--init-image", init, "--inpaint-mask", _black(tmp_path / "m.png")],
                    capsys)
    assert "--inpaint-mask" in line and "black everywhere" in line


# ----------------------------------------------------------------------------- 20: messages


def test_pickle_as_lora_says_it_is_not_a_safetensors_lora(tmp_path, capsys):
    evil = tmp_path / "style.safetensors"
    evil.write_bytes(pickle.dumps({"weights": 1}, protocol=2))
    line = _refused(["generate", *FAST, "-p", "x", "--lora", evil], capsys)
    assert "--lora" in line and "pickle" in line and "not a safetensors file" in line
    assert "PuLID" not in line and "hf download" not in line


def test_offline_hub_lora_says_it_is_not_available_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    line = _refused(["generate", *FAST, "-p", "x", "--lora", "someone/flux-style-lora"], capsys)
    assert "not available offline" in line and "does not fit" not in line


def test_missing_controlnet_folder_says_the_folder_does_not_exist(tmp_path, capsys):
    init = tmp_path / "pose.png"
    Image.new("RGB", (64, 64), (40, 90, 160)).save(init)
    line = _refused(["generate", *FAST, "-p", "x", "--controlnet", "./no_such_cn", "--control-image", init], capsys)
    assert "./no_such_cn" in line and "does not exist" in line and "hf download" not in line


def test_truncated_mask_file_header_is_one_line(tmp_path, embeds_file, capsys):
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(struct.pack("<Q", 10_000) + b"{" + b"x" * 20)
    assert "truncated" in _refused(["generate", *FAST, "-p", "x", "--id-embeds", embeds_file, "--masks-from", bad], capsys)


def test_encode_keeps_an_existing_identity_file(tmp_path, astronaut, capsys):
    """0.1.x: `encode --out me.safetensors` replaced an existing identity file without a word."""
    kept = tmp_path / "me.safetensors"
    kept.write_bytes(b"earlier identity")
    code = main(["encode", "--model", "tiny", "--device", "cpu", "--id", str(astronaut), "--out", str(kept)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert kept.read_bytes() == b"earlier identity"
    assert (tmp_path / "me-2.safetensors").stat().st_size > 1000 and "me-2.safetensors" in out


def test_offline_hub_lora_at_load_time_is_not_blamed_on_the_transformer(tiny_pipe_plain, monkeypatch):
    """The web UI's LoRA path loads without the CLI's precheck: the same message, not "does not fit"."""
    from spatialid.errors import SpatialIDError
    from spatialid.pipeline.variants import load_loras

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpatialIDError, match="not available offline") as exc:
        load_loras(tiny_pipe_plain, ["someone/flux-style-lora"], local_files_only=True)
    assert "does not fit" not in str(exc.value)


def test_pickle_lora_in_the_shared_check_names_no_pulid_download(tmp_path):
    """``check_lora_files`` (the web UI's LoRA list and ``--lora``) said to re-download PuLID for a pickled LoRA."""
    from spatialid.app.loading import check_lora_files
    from spatialid.errors import SpatialIDError

    evil = tmp_path / "style.safetensors"
    evil.write_bytes(pickle.dumps({"weights": 1}, protocol=2))
    with pytest.raises(SpatialIDError) as exc:
        check_lora_files([str(evil)])
    assert "pickle" in str(exc.value) and "PuLID" not in str(exc.value) and "LoRA" in str(exc.value)


# ----------------------------------------------------------------------------- ~NAME of no user


@pytest.mark.parametrize("argv", [
    ["generate", *FAST, "-p", "x", "--id", "~nosuchuser-spatialid/a.png"],
    ["generate", *FAST, "-p", "x", "-o", "~nosuchuser-spatialid/o.png"],
    ["encode", "--model", "tiny", "--id", "~nosuchuser-spatialid/a.png", "--out", "~nosuchuser-spatialid/b.safetensors"],
])
def test_a_path_of_a_user_that_does_not_exist_is_one_line(argv, capsys):
    """pathlib's expanduser raises RuntimeError for ``~nosuchuser/...``; it was a traceback from every path flag."""
    assert "no user NAME exists" in _refused(argv, capsys)
