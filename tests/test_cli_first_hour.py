"""Issue 21's command-line points: errors before loading and before torch (9), `tiny` for near-misses (10),
`--from-png`, output suffixes, size suggestions and huge jobs (11), argument mistakes, file names, presets and
the first line of a run (12), the demo's reproducing command, order and files (13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialid import defaults as D
from spatialid.cli.main import main

FAST = ["--model", "tiny", "--size", "64x64", "--steps", "2", "--seed", "1"]


def _refused(argv, capsys) -> str:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("spatialid: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _mask_file(path: Path, steps: list[int], shape=(2, 4, 1, 1, 4, 4)) -> Path:
    from safetensors.numpy import save_file

    save_file({"masks": np.full(shape, 0.5, np.float32)}, str(path),
              metadata={"format": "spatialid-masks/1", "steps": json.dumps(steps), "persons": str(shape[2])})
    return path


# ----------------------------------------------------------------------------- 9: before torch


_NO_TORCH = r"""
import json, sys
from spatialid.cli.main import main
results = []
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    results.append(code)
print(json.dumps({"codes": results, "torch": "torch" in sys.modules}))
"""


def test_mistakes_decidable_from_the_command_line_fail_without_importing_torch(tmp_path, astronaut, embeds_file):
    """0.1.x: these took 6-35 s (after torch, the encoder or FLUX); now each is one line before torch is imported."""
    masks = _mask_file(tmp_path / "m.safetensors", [0, 1])
    pickled = tmp_path / "me.safetensors"
    pickled.write_bytes(b"\x80\x04pickle")
    out = ["-p", "x", "-o", str(tmp_path / "o.png")]
    cases = {
        "masks-from steps": ["generate", "--model", "tiny", "--size", "64x64", "--steps", "6", "--id", str(astronaut),
                             "--masks-from", str(masks), *out],
        "missing lora": ["generate", "--model", "tiny", "--lora", "./nolora.safetensors", *out],
        "offload on cpu": ["generate", "--model", "tiny", "--device", "cpu", "--offload", "model", *out],
        "unknown preset": ["generate", "--model", "tiny", "--preset", "pulidd", *out],
        "model path": ["generate", "--model", "/nonexistent/flux", *out],
        "model near-miss": ["generate", "--model", "tny", "--id", str(astronaut), *out],
        "serve near-miss": ["serve", "--model", "tny"],
        "pickle identity": ["generate", "--model", "tiny", "--id-embeds", str(pickled), *out],
    }
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps(list(cases.values()))], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("spatialid: error:")]
    assert result["codes"] == [2] * len(cases) and len(errors) == len(cases), proc.stderr
    assert not result["torch"], "torch was imported for a mistake decidable from the command line"
    for text, line in zip(["this run injects steps 0-5", "no such LoRA file", "no GPU", "did you mean pulid?",
                           "/nonexistent/flux does not exist", "did you mean --model tiny", "did you mean --model tiny",
                           "pickle"],
                          errors):
        assert text in line, line


def test_help_and_error_list_the_same_presets(capsys, monkeypatch):
    from spatialid.masks import PRESETS

    monkeypatch.setenv("COLUMNS", "10000")  # no line breaks inside "late-floor-0.7"

    assert tuple(PRESETS) == D.PRESET_NAMES  # the torch-free names are the schedules' names
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    line = _refused(["generate", "--model", "tiny", "-p", "x", "--preset", "nope"], capsys)
    for name in PRESETS:
        assert name in help_text and name in line


def test_face_check_is_announced_before_flux_loads(tmp_path, photo_dir, capsys, monkeypatch):
    """The real model encodes the photo (the face check) before FLUX loads, and says so."""
    import spatialid.app.loading as loading
    from spatialid.errors import FaceNotFoundError

    class Encoder:
        def encode(self, photo):
            raise FaceNotFoundError("no face found in coffee.png")

    monkeypatch.setattr(loading.ModelSpec, "check", lambda self: self)
    monkeypatch.setattr(loading.Models, "encoder", lambda self: Encoder())
    monkeypatch.setattr(loading.Models, "pipeline", lambda self: pytest.fail("FLUX loaded before the face check"))
    flux = tmp_path / "flux"
    flux.mkdir()
    line = _refused(["generate", "--model", flux, "--device", "cpu", "--size", "64x64", "--steps", "2", "-p", "x",
                     "--id", photo_dir / "coffee.png", "-o", tmp_path / "o.png"], capsys)
    assert "no face found" in line
    # the announcement came first (capsys was read by _refused: run again to see stderr in order)
    main([str(a) for a in ["generate", "--model", flux, "--device", "cpu", "--size", "64x64", "--steps", "2", "-p",
                           "x", "--id", photo_dir / "coffee.png", "-o", tmp_path / "o.png"]])
    err = capsys.readouterr().err
    assert err.index("checking the face in coffee.png before FLUX loads") < err.index("no face found")


# ----------------------------------------------------------------------------- 10: near-misses


@pytest.mark.parametrize("name", ["tny", "tiyn", "Tiny"])
def test_near_misses_of_tiny_are_suggested(capsys, name):
    assert "did you mean --model tiny" in _refused(["generate", "--model", name, "-p", "x"], capsys)


@pytest.mark.parametrize("command", [["serve"], ["encode", "--id", "x.png", "--out", "x.safetensors"],
                                     ["bench", "--ids", "x.png", "--prompts", "p.txt", "--out", "b"]])
def test_every_command_suggests_tiny(capsys, command):
    """0.1.x: `serve --model tny` printed a paragraph asking to accept a licence on huggingface.co/tny."""
    line = _refused([*command[:1], "--model", "tny", *command[1:]], capsys)
    assert "did you mean --model tiny" in line and "licen" not in line


def test_model_without_owner_is_explained(capsys):
    line = _refused(["generate", "--model", "fluxdev", "-p", "x"], capsys)
    assert "neither a local folder or file nor a hub id" in line


# ----------------------------------------------------------------------------- 11


def test_from_png_without_a_recorded_identity_needs_id(tmp_path, capsys):
    from spatialid.app.metadata import save_png_with_metadata

    png = tmp_path / "old.png"
    save_png_with_metadata(Image.new("RGB", (64, 64)), png, {
        "prompt": "x", "preset": "relaxed", "steps": 2, "width": 64, "height": 64, "seed": 3,
        "model": "tiny", "identity": {"source": "image", "files": []}})
    line = _refused(["generate", "--model", "tiny", "--from-png", png, "-o", tmp_path / "o.png"], capsys)
    assert "--id PHOTO" in line and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("name", ["out.gif", "out.bmp", "out.tiff"])
def test_unsupported_image_suffix_is_refused_not_made_a_folder(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    line = _refused(["generate", *FAST, "-p", "x", "-o", name], capsys)
    assert ".png, .jpg, .jpeg or .webp" in line and not (tmp_path / name).exists()


@pytest.mark.parametrize("size, want, never", [("99999x64", "between 64 and 4096", "99984"),
                                              ("4100x64", "between 64 and 4096", "4112"), ("100x64", "try 96 or 112", None)])
def test_size_suggestions_are_in_range(capsys, size, want, never):
    line = _refused(["generate", "--model", "tiny", "-p", "x", "--size", size], capsys)
    assert want in line and (never is None or never not in line)


def test_huge_job_on_a_cpu_is_announced_before_loading(tmp_path, capsys, caplog, monkeypatch):
    import spatialid.app.loading as loading
    import spatialid.cli.prechecks as prechecks

    class Stop(Exception):
        pass

    def stop(self):
        raise Stop

    monkeypatch.setattr(prechecks, "gpu_possible", lambda: False)
    monkeypatch.setattr(loading.Models, "pipeline", stop)
    with pytest.raises(Stop):
        main(["generate", "--model", "tiny", "--size", "4096x4096", "-p", "x", "-o", str(tmp_path / "o.png")])
    err = caplog.text
    assert "may take about" in err and "minutes" in err and "Ctrl-C" in err
    assert prechecks.huge_job_warning(
        type("A", (), {"device": "auto", "model": "tiny", "num_images": 1})(), 256, 256, 6) is None


_CTRL_C_SCRIPT = r"""
import os, signal, sys, time
import spatialid.app.loading as loading

class Pipe:  # a torch operation that does not return for minutes: the first KeyboardInterrupt cannot land
    def set_progress_bar_config(self, **kwargs):
        pass
    def __call__(self, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(600):
            try:
                time.sleep(0.1)
            except KeyboardInterrupt:
                os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C

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


def test_second_ctrl_c_quits_at_once_and_leaves_no_empty_image(tmp_path):
    """0.1.x: SIGINT during a long step did not stop the run; now the first says so, the second quits cleanly."""
    out = tmp_path / "a.png"
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_SCRIPT, str(out)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 130, proc.stderr
    assert "Ctrl-C again quits at once" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 12


def test_options_before_the_sub_command_are_explained(capsys):
    line = _refused(["--model", "tiny", "generate", "-p", "x"], capsys)
    assert "put it after the sub-command" in line and "spatialid generate --model tiny" in line


def test_two_values_for_id_say_repeat_the_flag(capsys, astronaut):
    line = _refused(["generate", "--model", "tiny", "-p", "x", "--id", astronaut, astronaut], capsys)
    assert "repeat --id" in line


def test_batch_index_and_collision_number_are_different_suffixes(tmp_path):
    """0.1.x: `-o seven.png -n 2` wrote seven-0/seven-1 while a taken name became seven-2."""
    from spatialid.app.job import GenerationJob, check_outputs, release_outputs
    from spatialid.pipeline.settings import GenerationSettings

    (tmp_path / "seven_0.png").write_bytes(b"earlier")
    job = GenerationJob(settings=GenerationSettings(prompt="x", num_images=2), out=tmp_path / "seven.png")
    paths = check_outputs(job)
    assert [p.name for p in paths] == ["seven-2_0.png", "seven-2_1.png"]
    release_outputs(job)


def test_a_run_says_loading_at_once_and_numbers_images(tmp_path, embeds_file, capsys):
    code = main([str(a) for a in ["generate", *FAST, "-p", "x", "--id-embeds", embeds_file, "-n", "2",
                                  "-o", tmp_path / "q.png"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.splitlines()[0] == "spatialid: loading tiny ..."
    assert [Path(p).name for p in out.split()] == ["q_0.png", "q_1.png"]


# ----------------------------------------------------------------------------- 13: the demo


def test_demo_command_reproduces_its_image_order_is_printed_and_files_are_kept(tmp_path, capsys, monkeypatch):
    import shlex

    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--out", "d", "--size", "64x64", "--steps", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "left to right: relaxed | pulid | paper" in out
    assert main(argv) == 0  # a second demo keeps the first one's files
    capsys.readouterr()
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert {"demo.png", "demo-2.png", "demo_compare.png", "demo-2_compare.png", "astronaut.png"} <= set(names)
    assert main(["info", "d/demo.png"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("spatialid generate"))
    command = shlex.split(line)[1:]
    assert "skimage astronaut" not in line and str(tmp_path / "d" / "astronaut.png") in command
    assert main([*command, "-o", "again.png"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open("again.png")), np.asarray(Image.open("d/demo.png")))
