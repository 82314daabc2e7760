"""`spatialid generate --from-png IMAGE` restores every input the image's settings name.

People and their regions, the identity photo, the init image, its strength and the inpainting
mask are found again (recorded absolute path, else next to the image, else the current folder);
missing files stop the run with one line before any model loads; flags on the command line win;
the model, LoRAs and ControlNets are never taken from the image, only named.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialid.app.metadata import read_image_metadata, save_png_with_metadata
from spatialid.cli.main import main

FAST = ["--model", "tiny", "--size", "64x64", "--steps", "2"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """The astronaut as identity photo, a small init image and an inpainting mask of its size."""
    from skimage import data

    folder = tmp_path_factory.mktemp("inputs")
    astronaut = Image.fromarray(data.astronaut())
    photo = folder / "astronaut.png"
    astronaut.save(photo)
    init = folder / "start.png"
    astronaut.resize((64, 64)).save(init)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    inpaint = folder / "repair.png"
    Image.fromarray(mask).save(inpaint)
    region = np.zeros((64, 64), np.uint8)
    region[:, 32:] = 255
    right = folder / "right.png"
    Image.fromarray(region).save(right)
    return {"photo": photo, "init": init, "inpaint": inpaint, "region": right}


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _copy(files: dict[str, Path], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {key: Path(shutil.copy(path, folder / path.name)) for key, path in files.items()}


def _rewrite(path: Path, **changes) -> dict:
    """Store changed settings in ``path`` (as an older or foreign spatialid image would have them)."""
    meta = read_image_metadata(path)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    with Image.open(path) as img:
        save_png_with_metadata(img.copy(), path, meta)
    return meta


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model is loaded (Models is the only door to the weights)."""
    from spatialid.app import loading

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading.Models, "__init__", refuse)


# ----------------------------------------------------------------------------- round trips


def test_people_and_regions_round_trip_from_another_folder(tmp_path, pictures, capsys, monkeypatch):
    files = _copy(pictures, tmp_path / "in")
    bob = Path(shutil.copy(files["photo"], tmp_path / "in" / "bob.png"))
    first = tmp_path / "out" / "two.png"
    code, _, err = _run(
        ["generate", *FAST, "-p", "two people", "-s", 3, "--person", files["photo"], "--person", bob,
         "--region", "0,0,0.5,1", "--region", files["region"], "-o", first], capsys,
    )
    assert code == 0, err
    meta = read_image_metadata(first)
    assert meta["input_paths"] == {
        "people": [[str(files["photo"])], [str(bob)]],
        "regions": [[0.0, 0.0, 0.5, 1.0], str(files["region"])],
    }
    assert meta["people"] == [["astronaut.png"], ["bob.png"]]  # the names stay where they were

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = tmp_path / "out" / "again.png"
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", first, "-o", again], capsys)
    assert code == 0, err
    assert np.array_equal(_pixels(first), _pixels(again))
    restored = read_image_metadata(again)
    assert restored["people"] == meta["people"] and restored["regions"] == meta["regions"]
    assert restored["input_paths"] == meta["input_paths"]

    # --region on the command line replaces the stored regions; the people are still restored
    third = tmp_path / "out" / "third.png"
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", first, "--region", "0,0,1,0.5",
                         "--region", "0,0.5,1,1", "-o", third], capsys)
    assert code == 0, err
    s = read_image_metadata(third)
    assert s["regions"] == [[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]] and s["people"] == meta["people"]


def test_init_image_and_strength_round_trip(tmp_path, pictures, capsys):
    files = _copy(pictures, tmp_path / "in")
    first = tmp_path / "i2i.png"
    code, _, err = _run(
        ["generate", *FAST, "-p", "a portrait", "-s", 4, "--id", files["photo"], "--init-image", files["init"],
         "--strength", 0.6, "-o", first], capsys,
    )
    assert code == 0, err
    meta = read_image_metadata(first)
    assert meta["pipeline"] == "img2img" and meta["strength"] == 0.6
    assert meta["input_paths"] == {"id_images": [str(files["photo"])], "init_image": str(files["init"])}

    again = tmp_path / "again.png"
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", first, "-o", again], capsys)
    assert code == 0, err
    assert np.array_equal(_pixels(first), _pixels(again))
    restored = read_image_metadata(again)
    assert restored["pipeline"] == "img2img" and restored["strength"] == 0.6
    assert restored["identity"]["files"] == ["astronaut.png"] and restored["identity_injected"]


def test_inpaint_mask_found_next_to_the_image_and_in_an_older_record(tmp_path, pictures, capsys, monkeypatch):
    files = _copy(pictures, tmp_path / "in")
    first = tmp_path / "in" / "repair-out.png"
    code, _, err = _run(
        ["generate", *FAST, "-p", "a portrait", "-s", 5, "--id", files["photo"], "--init-image", files["init"],
         "--inpaint-mask", files["inpaint"], "-o", first], capsys,
    )
    assert code == 0, err
    assert read_image_metadata(first)["pipeline"] == "inpaint"

    # the folder moved: the recorded paths are gone, the files lie next to the image
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "in", moved)
    again = tmp_path / "again.png"
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", moved / "repair-out.png", "-o", again], capsys)
    assert code == 0, err
    assert np.array_equal(_pixels(moved / "repair-out.png"), _pixels(again))
    assert read_image_metadata(again)["input_paths"]["inpaint_mask"] == str(moved / "repair.png")

    # an image written before input_paths existed (names only): the current folder is searched too
    old = tmp_path / "old" / "old.png"
    old.parent.mkdir()
    shutil.copy(moved / "repair-out.png", old)
    _rewrite(old, input_paths=None)
    monkeypatch.chdir(moved)
    third = tmp_path / "third.png"
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", old, "-o", third], capsys)
    assert code == 0, err
    assert np.array_equal(_pixels(old), _pixels(third))
    s = read_image_metadata(third)
    assert s["pipeline"] == "inpaint" and s["input_paths"]["init_image"] == str(moved / "start.png")


# ----------------------------------------------------------------------------- missing files


def test_missing_files_are_listed_in_one_line_before_any_model_loads(tmp_path, pictures, capsys, no_model_load):
    files = _copy(pictures, tmp_path / "in")
    first = tmp_path / "out" / "two.png"
    first.parent.mkdir()
    meta = {
        "prompt": "two people", "seed": 1, "steps": 2, "width": 64, "height": 64, "model": "tiny",
        "pipeline": "text2image", "people": [["astronaut.png"], ["bob.png"]],
        "regions": [[0.0, 0.0, 0.5, 1.0], "right.png"],
        "input_paths": {"people": [[str(files["photo"])], [str(tmp_path / "in" / "bob.png")]],
                        "regions": [[0.0, 0.0, 0.5, 1.0], str(files["region"])]},
    }
    save_png_with_metadata(Image.new("RGB", (64, 64)), first, meta)
    files["region"].unlink()  # bob.png never existed; right.png is gone now
    out = tmp_path / "never.png"
    code, stdout, err = _run(["generate", "--model", "tiny", "--from-png", first, "-o", out], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("spatialid: error:") and "2 file(s) that cannot be found" in line
    assert "--person 2 bob.png" in line and "--region 2 right.png" in line and "astronaut.png" not in line
    assert "pass them explicitly" in line
    assert not out.exists() and stdout == ""


def test_missing_identity_photo_stops_instead_of_plain_flux(tmp_path, pictures, capsys, no_model_load):
    files = _copy(pictures, tmp_path / "in")
    first = tmp_path / "one.png"
    save_png_with_metadata(Image.new("RGB", (64, 64)), first, {
        "prompt": "a portrait", "seed": 1, "steps": 2, "width": 64, "height": 64, "model": "tiny",
        "pipeline": "img2img", "init_image": "start.png", "strength": 0.5,
        "identity": {"source": "image", "files": ["gone.png"]},
        "input_paths": {"id_images": [str(tmp_path / "in" / "gone.png")], "init_image": str(files["init"])},
    })
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", first, "-o", tmp_path / "x.png"], capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "1 file(s) that cannot be found: --id gone.png" in line and "(--id PATH)" in line

    # an image from before input_paths, whose photo lies nowhere: the same one line
    _rewrite(first, input_paths=None)
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", first, "-o", tmp_path / "x.png"], capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "--id gone.png" in line and "--init-image start.png" in line


# ----------------------------------------------------------------------------- the command line wins


def test_explicit_flags_override_the_stored_inputs(tmp_path, pictures, capsys):
    files = _copy(pictures, tmp_path / "in")
    first = tmp_path / "i2i.png"
    code, _, err = _run(
        ["generate", *FAST, "-p", "a portrait", "-s", 4, "--id", files["photo"], "--init-image", files["init"],
         "--strength", 0.6, "-o", first], capsys,
    )
    assert code == 0, err
    other = Path(shutil.copy(files["photo"], tmp_path / "other.png"))
    new_init = Path(shutil.copy(files["init"], tmp_path / "new-start.png"))
    files["init"].unlink()  # the stored init image is gone, but the command line names another
    again = tmp_path / "again.png"
    code, _, err = _run(
        ["generate", "--model", "tiny", "--from-png", first, "--id", other, "--init-image", new_init,
         "--strength", 0.3, "-o", again], capsys,
    )
    assert code == 0, err
    s = read_image_metadata(again)
    assert s["identity"]["files"] == ["other.png"] and s["init_image"] == "new-start.png"
    assert s["strength"] == 0.3 and s["pipeline"] == "img2img"
    assert s["input_paths"]["id_images"] == [str(other)] and s["prompt"] == "a portrait" and s["seed"] == 4


def test_another_model_is_named_in_one_line_and_never_taken_from_the_image(tmp_path, capsys, caplog, monkeypatch):
    first = tmp_path / "plain.png"
    code, _, err = _run(["generate", *FAST, "-p", "plain", "-s", 2, "-o", first], capsys)
    assert code == 0, err
    _rewrite(first, model="someone/FLUX.1-custom")
    again = tmp_path / "again.png"
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", first, "-o", again], capsys)
    assert code == 0, err
    notices = [r.getMessage() for r in caplog.records if "someone/FLUX.1-custom" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "this run uses --model tiny" in notices[0]
    assert read_image_metadata(again)["model"] == "tiny"

    # without --model the default is used, not the image's
    from spatialid import defaults as D
    from spatialid.cli import cmd_generate
    from spatialid.errors import SpatialIDError

    seen = []

    def stop(args, **_):
        seen.append(args.model)
        raise SpatialIDError("stopped before loading")

    monkeypatch.setattr(cmd_generate, "model_spec", stop)
    code, _, err = _run(["generate", "--from-png", first, "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and "stopped before loading" in err
    assert seen == [D.DEFAULT_FLUX_MODEL]


def test_lora_and_controlnet_are_named_not_loaded(tmp_path, pictures, capsys, caplog):
    first = tmp_path / "styled.png"
    code, _, err = _run(["generate", *FAST, "-p", "styled", "-s", 2, "-o", first], capsys)
    assert code == 0, err
    (tmp_path / "style.safetensors").write_bytes(b"not a LoRA: loading it would fail")
    shutil.copy(pictures["init"], tmp_path / "pose.png")
    _rewrite(first, loras=["style.safetensors:0.8"], controlnet="someone/flux-controlnet-pose",
             pipeline="controlnet", control_image="pose.png", controlnet_scale=0.7)
    again = tmp_path / "again.png"
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", first, "-o", again], capsys)
    assert code == 0, err
    text = caplog.text
    assert "style.safetensors:0.8" in text and "--lora" in text
    assert "someone/flux-controlnet-pose" in text and "--controlnet" in text
    s = read_image_metadata(again)
    assert s["loras"] is None and s["controlnet"] is None and s["pipeline"] == "text2image"
    assert s["control_image"] is None
