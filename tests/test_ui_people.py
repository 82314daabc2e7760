"""The web UI's several people, img2img / inpainting and LoRA inputs (spatialid.ui.people), without a server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialid.app.job import GenerationJob, run_job
from spatialid.app.metadata import read_png_metadata
from spatialid.ui import handlers as h
from spatialid.ui import people as P


# ``photo_dir`` (astronaut.png, mirrored.png, coffee.png without a face) and ``tiny_pipe`` come from
# conftest.py: built once per session and shared, so read-only here.


def _settings(photo: Path, **overrides):
    values = {"steps": 3, "width": 128, "height": 128, "seed": "5"}
    values.update(overrides)
    return h.build_request([str(photo)], "two friends", limits=h.UILimits(max_side=512), **values).settings


# ----------------------------------------------------------------------------- form values


@pytest.mark.parametrize("text,expected", [("", None), (None, None), ("  ", None), ("0,0,0.5,1", (0.0, 0.0, 0.5, 1.0)),
                                           (" 0.5 , 0, 1, 1 ", (0.5, 0.0, 1.0, 1.0))])
def test_parse_region(text, expected):
    assert P.parse_region(text, 1) == expected


@pytest.mark.parametrize("text,pattern", [("0,0,0.5", "four fractions"), ("left", "four fractions"),
                                          ("0.6,0,0.5,1", "region of person 2"), ("0,0,2,1", "region of person 2")])
def test_parse_region_rejects_in_one_line(text, pattern):
    with pytest.raises(h.UIInputError, match=pattern) as err:
        P.parse_region(text, 2)
    assert "\n" not in str(err.value)


def test_one_person_without_extras_is_the_plain_path(photo_dir):
    inputs = P.build_inputs([photo_dir / "astronaut.png"], others=[([str(photo_dir / "mirrored.png")], "0,0,1,1")])
    assert inputs == P.PictureInputs()  # the hidden slot of person 2 is ignored (people_count 1)
    settings = _settings(photo_dir / "astronaut.png")
    assert inputs.apply(settings) is settings
    assert inputs.mode == "text2image" and P.extra_metadata(settings) == {}


def test_two_people_with_regions(photo_dir):
    inputs = P.build_inputs(
        [photo_dir / "astronaut.png"], first_region="0,0,0.5,1", people_count=2,
        others=[([str(photo_dir / "mirrored.png")], "0.5,0,1,1"), (None, "")],
    )
    assert inputs.several and inputs.names == (("astronaut.png",), ("mirrored.png",))
    assert inputs.regions == ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))
    settings = inputs.apply(_settings(photo_dir / "astronaut.png"))
    assert settings.people == [["astronaut.png"], ["mirrored.png"]]
    assert settings.regions == [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]
    settings.check()


def test_one_person_with_a_region(photo_dir):
    inputs = P.build_inputs([photo_dir / "astronaut.png"], first_region="0.25,0,0.75,1")
    assert not inputs.several and inputs.regions == ((0.25, 0.0, 0.75, 1.0),)
    assert inputs.apply(_settings(photo_dir / "astronaut.png")).people is None


@pytest.mark.parametrize("kwargs,pattern", [
    ({"people_count": 2, "others": [(None, "")]}, "person 2 has no photo"),
    ({"people_count": 2, "others": [(["notes.txt"], "")]}, "person 2: notes.txt is not a photo"),
    ({"people_count": 2, "first_region": "0,0,0.5,1", "others": [("MIRRORED", "")]}, "person 2 has no region but person 1 has one"),
    ({"people_count": 5}, "between 1 and 4 people"),
    ({"people_count": "two"}, "number of people"),
])
def test_people_form_errors(photo_dir, kwargs, pattern):
    others = [tuple(str(photo_dir / "mirrored.png") if v == "MIRRORED" else v for v in o) for o in kwargs.pop("others", [])]
    with pytest.raises(h.UIInputError, match=pattern):
        P.build_inputs([photo_dir / "astronaut.png"], others=others, **kwargs)


def test_init_image_is_img2img_with_strength(photo_dir, tmp_path):
    inputs = P.build_inputs([photo_dir / "astronaut.png"], init_image=str(photo_dir / "coffee.png"), strength=0.6, folder=tmp_path)
    assert inputs.mode == "img2img" and inputs.strength == 0.6 and inputs.inpaint_mask is None
    assert inputs.init_image == tmp_path / "init-image.png" and inputs.init_image.is_file()
    settings = inputs.apply(_settings(photo_dir / "astronaut.png"))
    assert (settings.pipeline, settings.strength) == ("img2img", 0.6)
    settings.check()
    assert P.extra_metadata(settings)["init_image"] == "init-image.png"
    default = P.build_inputs([photo_dir / "astronaut.png"], init_image=str(photo_dir / "coffee.png"), folder=tmp_path)
    assert default.strength == 0.8  # the CLI's img2img default


def test_painted_layer_becomes_the_inpainting_mask(photo_dir, tmp_path):
    layer = np.zeros((256, 256, 4), dtype=np.uint8)  # the editor's brush layer, smaller than the picture
    layer[32:96, 64:128, 3] = 255
    editor = {"background": str(photo_dir / "astronaut.png"), "layers": [layer], "composite": None}
    inputs = P.build_inputs([photo_dir / "astronaut.png"], init_image=editor, folder=tmp_path)
    assert inputs.mode == "inpaint" and inputs.strength == 0.85
    mask = np.asarray(Image.open(inputs.inpaint_mask))
    assert mask.shape == (512, 512) and mask[128, 200] == 255 and mask[400, 400] == 0
    empty = {"background": str(photo_dir / "astronaut.png"), "layers": [np.zeros((512, 512, 4), np.uint8)]}
    assert P.build_inputs([photo_dir / "astronaut.png"], init_image=empty, folder=tmp_path).mode == "img2img"


def test_picture_input_errors(photo_dir, tmp_path):
    small = tmp_path / "small-mask.png"
    Image.new("L", (64, 64), 255).save(small)
    black = tmp_path / "black.png"
    Image.new("L", (512, 512), 0).save(black)
    init = str(photo_dir / "astronaut.png")
    cases = [
        ({"init_image": init, "mask_upload": str(small)}, "the inpainting mask is 64x64 but the init image is 512x512"),
        ({"init_image": init, "mask_upload": str(black)}, "black everywhere"),
        ({"mask_upload": str(small)}, "needs an init image"),
        ({"init_image": init, "strength": 0}, r"strength must be in \(0, 1\]"),
        ({"init_image": init, "strength": "x"}, "strength must be a number"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(h.UIInputError, match=pattern):
            P.build_inputs([photo_dir / "astronaut.png"], folder=tmp_path, **kwargs)


def test_lora_lines_checked_like_the_cli(tmp_path):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "style.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(good))
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(plain))
    assert P.parse_lora_lines(f"\n# mine\nstyle.safetensors:0.7\n", tmp_path) == (f"{good.resolve()}:0.7",)
    assert P.parse_lora_lines("") == ()
    for text, pattern in [
        ("missing.safetensors", "not one of this server's LoRA files"),
        (str(good), "not one of this server's LoRA files"),  # a path of the server's disk: refused
        ("../style.safetensors", "not one of this server's LoRA files"),
        ("user/flux-lora", "not one of this server's LoRA files"),  # no hub downloads from a browser
        ("plain.safetensors", "no LoRA weights in this file"),
        ("style.safetensors:9", "scale must be between -4 and 4"),
        ("\n".join(["style.safetensors"] * 5), "at most 4"),
    ]:
        with pytest.raises(h.UIInputError, match=pattern) as err:
            P.parse_lora_lines(text, tmp_path)
        assert "--lora" not in str(err.value)
    with pytest.raises(h.UIInputError, match="LoRAs are off on this server"):
        P.parse_lora_lines("style.safetensors")  # no --lora-dir


def test_lora_menu_names_without_the_suffix(tmp_path):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "style.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(good))
    (tmp_path / "notes.txt").write_text("x")
    assert P.lora_choices(tmp_path) == ["style"] and P.lora_choices(None) == []
    assert P.lora_lines(["style"], 0.8) == "style:0.8" and P.lora_lines([], 1) == ""
    assert P.parse_lora_lines(P.lora_lines(["style"], 0.8), tmp_path) == (f"{good.resolve()}:0.8",)
    assert P.parse_lora_lines("style", tmp_path) == (str(good.resolve()),)  # the menu's name, no suffix


def test_init_image_sets_the_size_as_the_cli(photo_dir, tmp_path):
    """The web's img2img takes the init image's size (as `generate --init-image` without --size), within the cap."""
    inputs = P.build_inputs([photo_dir / "astronaut.png"], init_image=str(photo_dir / "coffee.png"), folder=tmp_path)
    settings = inputs.apply(_settings(photo_dir / "astronaut.png"))  # the sliders said 128x128
    assert (settings.width, settings.height) == (144, 96)  # coffee.png is 150x100
    assert P.init_size((1000, 600), 512) == (512, 304) and P.init_size((40, 30), 512) == (64, 64)
    assert P.PictureInputs().apply(_settings(photo_dir / "astronaut.png")).width == 128  # no init image: the sliders


def test_active_modes_name_what_the_folded_sections_do(photo_dir):
    plain = P.active_modes()
    assert plain.parts == () and "text to image" in plain.line
    assert plain.people_header == "Several people (up to 4)" and plain.edit_header == "Edit a picture / LoRA"
    img2img = P.active_modes(init_image={"background": str(photo_dir / "coffee.png"), "layers": []}, strength=0.6)
    assert img2img.parts == ("img2img, strength 0.6",) and img2img.edit_header == "Edit a picture / LoRA: ON, img2img, strength 0.6"
    painted = np.zeros((8, 8, 4), np.uint8)
    painted[2, 2, 3] = 255
    inpaint = P.active_modes(init_image={"background": str(photo_dir / "coffee.png"), "layers": [painted]}, strength=0.85)
    assert inpaint.parts == ("inpainting, strength 0.85",)
    people = P.active_modes(people_count=2, regions=["0,0,0.5,1", "0.5,0,1,1", "", "0,0,1,1"], loras=["style"], lora_weight=0.7)
    assert people.parts == ("2 people", "regions", "LoRA style:0.7")
    assert people.people_header.endswith(": ON, 2 people, regions") and "ON, LoRA style:0.7" in people.edit_header
    assert "2 people · regions" in people.line
    # a region left for person 1 alone confines the identity: shown too; hidden people's regions do not count
    assert P.active_modes(regions=["0,0,0.5,1"]).parts == ("a region for person 1",)
    assert P.active_modes(regions=["", "0,0,1,1"]).parts == ()


def test_restore_inputs_from_settings_and_the_servers_record(photo_dir, tmp_path):
    data = {"people": [["astronaut.png"], ["mirrored.png"]], "regions": [[0, 0, 0.5, 1], [0.5, 0, 1, 1]],
            "pipeline": "img2img", "init_image": "init-image.png", "strength": 0.6, "loras": ["style:0.8", "other:1"]}
    (tmp_path / "style.safetensors").write_bytes(b"")
    values, missing = P.restore_inputs(data, None, lora_dir=str(tmp_path))  # a dropped PNG: values, not files
    assert values["count"] == 2 and values["regions"] == ["0,0,0.5,1", "0.5,0,1,1", "", ""]
    assert values["strength"] == 0.6 and values["loras"] == ["style"] and values["lora_weight"] == 0.8
    assert values["photos"] == [None, None, None] and values["init_image"] is None
    assert missing == ["the photos of person 2 (mirrored.png): upload them", "the init image (init-image.png): upload it",
                       "LoRA other (not offered by this server)"]
    inputs = P.build_inputs([photo_dir / "astronaut.png"], people_count=2, others=[([str(photo_dir / "mirrored.png")], "")],
                            init_image=str(photo_dir / "coffee.png"), folder=tmp_path / "in")
    values, missing = P.restore_inputs(data, P.input_record(inputs), lora_dir=str(tmp_path))  # a history click
    assert values["photos"][0] == [str(photo_dir / "mirrored.png")] and values["init_image"] == str(inputs.init_image)
    assert missing == ["LoRA other (not offered by this server)"]
    assert P.restore_inputs({"prompt": "x"}) == (
        {"count": 1, "photos": [None] * 3, "regions": [""] * 4, "init_image": None, "inpaint_mask": None,
         "strength": None, "loras": [], "lora_weight": None}, [])


def test_person_preview_shows_thumbnails_and_the_face(tiny_pipe, photo_dir):
    thumbs, line = P.person_preview(tiny_pipe, [str(photo_dir / "mirrored.png")], 2, cache=h.IdentityCache())
    assert line == "Person 2: face found (1 photo)." and [c for _, c in thumbs] == ["mirrored.png", "face found"]


def test_lora_metadata_names_files(tmp_path):
    good = tmp_path / "style.safetensors"
    good.write_bytes(b"")
    settings = h.GenerationSettings(prompt="x", loras=[f"{good}:0.5", "user/lora"])
    assert P.extra_metadata(settings)["loras"] == ["style.safetensors:0.5", "user/lora:1"]


# ----------------------------------------------------------------------------- generation (tiny model)


def test_two_people_generate_mask_picture_and_metadata(tiny_pipe, photo_dir, tmp_path):
    cache = h.IdentityCache()
    inputs = P.build_inputs(
        [photo_dir / "astronaut.png"], people_count=2, others=[([str(photo_dir / "mirrored.png")], "")]
    )
    settings = inputs.apply(_settings(photo_dir / "astronaut.png"))
    identity = P.identity_for(tiny_pipe, [photo_dir / "astronaut.png"], inputs, cache)
    assert isinstance(identity, list) and len(identity) == 2
    job = GenerationJob(
        settings=settings, out=tmp_path / "two.png", masks=True, identity_files=["astronaut.png"],
        identity_source="people", people_files=[list(n) for n in inputs.names],
    )
    result = run_job(tiny_pipe, job, identity, extra_settings=P.extra_metadata(settings))
    meta = read_png_metadata(result.images[0])
    assert meta["people"] == [["astronaut.png"], ["mirrored.png"]]
    assert meta["identity"]["source"] == "people" and len(meta["identity"]["people"]) == 2
    assert result.masks and read_png_metadata(result.masks[0])["kind"] == "mask schedule"
    assert P.identity_for(tiny_pipe, [photo_dir / "astronaut.png"], inputs, cache) is not None
    assert cache.hits == 2  # each person's encoding is reused


def test_no_face_names_the_person(tiny_pipe, photo_dir):
    inputs = P.build_inputs([photo_dir / "astronaut.png"], people_count=2, others=[([str(photo_dir / "coffee.png")], "")])
    with pytest.raises(h.SpatialIDError, match="person 2: no face found in coffee.png"):
        P.identity_for(tiny_pipe, [photo_dir / "astronaut.png"], inputs, h.IdentityCache())


def test_img2img_runs_on_the_loaded_components(tiny_pipe, photo_dir, tmp_path):
    cache = h.IdentityCache()
    inputs = P.build_inputs([photo_dir / "astronaut.png"], init_image=str(photo_dir / "coffee.png"), strength=0.5, folder=tmp_path)
    runner = P.pipeline_for(tiny_pipe, inputs)
    assert runner is P.pipeline_for(tiny_pipe, inputs)  # built once per mode
    assert runner.pipe.transformer is tiny_pipe.transformer  # shared, not copied
    settings = inputs.apply(_settings(photo_dir / "astronaut.png"))
    steps: list[int] = []
    job = GenerationJob(settings=settings, out=tmp_path / "i2i.png", masks=True, identity_files=["astronaut.png"], identity_source="image")
    identity = P.identity_for(tiny_pipe, [photo_dir / "astronaut.png"], inputs, cache)

    def counted(*args, **kwargs):
        kwargs["callback_on_step_end"] = lambda pipe, step, t, kw: (steps.append(step), kw)[1]
        return runner(*args, **kwargs)

    result = run_job(counted, job, identity, extra_settings=P.extra_metadata(settings))
    meta = read_png_metadata(result.images[0])
    assert (meta["pipeline"], meta["strength"], meta["init_image"]) == ("img2img", 0.5, "init-image.png")
    assert steps  # the step callback reaches diffusers' pipeline (progress and Stop in the web UI)
    assert Image.open(result.images[0]).size == (144, 96)  # the init image's 150x100 in multiples of 16, as the CLI


def test_person_check_lines(tiny_pipe, photo_dir):
    cache = h.IdentityCache()
    assert P.person_check(tiny_pipe, [str(photo_dir / "mirrored.png")], 2, cache=cache) == "Person 2: face found (1 photo)."
    line = P.person_check(tiny_pipe, [str(photo_dir / "coffee.png")], 3, cache=cache)
    assert line.startswith("Person 3: **No usable face**") and "coffee.png" in line
    assert P.person_check(tiny_pipe, None, 2, cache=cache) == ""


def test_run_generation_with_two_people_and_img2img(tiny_pipe, photo_dir, tmp_path):
    """The web UI's run: handlers.run_generation with the request's extras (what the Generate button sends)."""
    import dataclasses

    cache = h.IdentityCache()
    request = h.build_request([str(photo_dir / "astronaut.png")], "two friends", steps=3, width=128, height=128, seed="9")
    extras = P.build_inputs(request.photos, people_count=2, others=[([str(photo_dir / "mirrored.png")], "")])
    two = dataclasses.replace(request, settings=extras.apply(request.settings), extras=extras)
    result = h.run_generation(tiny_pipe, two, tmp_path / "a", identity_cache=cache)
    assert result.settings["people"] == [["astronaut.png"], ["mirrored.png"]]
    assert result.settings["interface"] == "web" and result.mask_picture is not None
    assert "mirrored.png" in h.settings_text(result.settings)

    extras = P.build_inputs(request.photos, init_image=str(photo_dir / "coffee.png"), strength=0.5, folder=tmp_path / "in")
    edit = dataclasses.replace(request, settings=extras.apply(request.settings), extras=extras)
    done: list[int] = []
    result = h.run_generation(tiny_pipe, edit, tmp_path / "b", identity_cache=cache, progress=lambda d, t, s: done.append(d))
    assert (result.settings["pipeline"], result.settings["strength"]) == ("img2img", 0.5)
    assert done  # the progress bar moves for img2img too

    asked: list[int] = []

    def stop_after_two() -> bool:
        asked.append(1)
        return len(asked) > 2

    # several people with an init image (one identity path: refused before 0.2)
    extras = P.build_inputs(request.photos, people_count=2, others=[([str(photo_dir / "mirrored.png")], "")],
                            init_image=str(photo_dir / "coffee.png"), strength=0.6, folder=tmp_path / "in2")
    both = dataclasses.replace(request, settings=extras.apply(request.settings), extras=extras)
    result = h.run_generation(tiny_pipe, both, tmp_path / "d", identity_cache=cache)
    assert result.settings["pipeline"] == "img2img" and result.settings["people"] == [["astronaut.png"], ["mirrored.png"]]
    assert result.mask_picture is not None

    with pytest.raises(h.GenerationStopped):  # Stop works on the img2img pipeline (its step callback)
        h.run_generation(tiny_pipe, edit, tmp_path / "c", identity_cache=cache, should_stop=stop_after_two)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").rglob("*.png"))


def test_loras_are_loaded_for_one_run_only():
    import types

    calls: list[str] = []
    adapters: dict[str, list[str]] = {"transformer": []}

    def load(location, adapter_name, **kwargs):
        calls.append(f"load {location} {kwargs.get('local_files_only')}")
        adapters["transformer"].append(adapter_name)

    pipe = types.SimpleNamespace(
        load_lora_weights=load, get_list_adapters=lambda: adapters,
        set_adapters=lambda names, adapter_weights: calls.append(f"set {names} {adapter_weights}"),
        unload_lora_weights=lambda: (calls.append("unload"), adapters["transformer"].clear()),
    )
    with P.loras_loaded(pipe, ["user/style:0.5"]):
        assert calls[-1] == "set ['lora0'] [0.5]"
    assert calls[-1] == "unload"
    with pytest.raises(RuntimeError), P.loras_loaded(pipe, ["user/style"]):
        raise RuntimeError("the run failed")
    assert calls[-1] == "unload"  # unloaded even when the run fails
    calls.clear()
    with P.loras_loaded(pipe, []):
        pass
    assert calls == []


def test_serve_lora_dir_must_be_a_folder(tmp_path, capsys):
    from spatialid.cli.main import main

    assert main(["serve", "--model", "tiny", "--lora-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora-dir" in err[0] and "not a folder" in err[0]
