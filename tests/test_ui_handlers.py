"""The web UI's rules without a server: form checks, messages, generation outputs, app wiring, serve flags."""

from __future__ import annotations

import argparse
import json
import os
import socket
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialid.errors import FaceNotFoundError, InputImageError, SpatialIDError
from spatialid.ui import handlers as h

# ----------------------------------------------------------------------------- fixtures


# ``photo_dir`` (astronaut.png, coffee.png without a face) and ``tiny_pipe`` come from conftest.py:
# built once per session and shared, so read-only here.


@pytest.fixture(scope="module")
def identities():
    return h.IdentityCache(maxsize=4)


def _form(photos, **overrides):
    values = dict(
        photos=photos, prompt="portrait photo", negative_prompt="", preset="paper", id_weight=1.0,
        start_step=0, true_cfg=1.0, steps=3, guidance=4.0, width=128, height=128, seed="7",
        num_images=1, compare=False, compare_presets=None,
    )
    values.update(overrides)
    return values


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("value", [None, "", "random", " Random ", "-1", -1, -1.0])
def test_parse_seed_random_forms(value):
    seeds = {h.parse_seed(value) for _ in range(5)}
    assert all(0 <= s < 2**32 for s in seeds)
    assert len(seeds) > 1  # really random, not a constant


@pytest.mark.parametrize("value,expected", [("42", 42), (" 7 ", 7), ("12.0", 12), (3, 3), (5.0, 5), ("0", 0), (2**32 - 1, 2**32 - 1),
    ("2680261499100305976", 2680261499100305976), (2**32, 2**32), (str(2**63 - 1), 2**63 - 1), (2**63 - 1, 2**63 - 1)])
def test_parse_seed_numbers(value, expected):
    assert h.parse_seed(value) == expected


@pytest.mark.parametrize("value", ["abc", "1.5", 2.5, "1e3", "-5", 2**63, str(2**63), True, "nan", float("inf")])
def test_parse_seed_rejects(value):
    with pytest.raises(h.UIInputError, match="seed"):
        h.parse_seed(value)


def test_seed_range_is_the_cli_range():
    """The UI accepts exactly what check_generation_settings (the CLI's rule) accepts."""
    from spatialid.pipeline.settings import (
        GenerationSettingsError,
        check_generation_settings,
    )

    size = {"num_inference_steps": 4, "height": 128, "width": 128}
    assert h.MAX_SEED == 2**63 - 1
    check_generation_settings(**size, seed=h.parse_seed(str(h.MAX_SEED)))
    with pytest.raises(GenerationSettingsError):
        check_generation_settings(**size, seed=h.MAX_SEED + 1)
    with pytest.raises(h.UIInputError, match="seed"):
        h.parse_seed(h.MAX_SEED + 1)


def test_seed_plus_images_stays_in_range(photo_dir):
    with pytest.raises(h.UIInputError, match="at most"):
        h.build_request(**_form([str(photo_dir / "astronaut.png")], seed=str(2**63 - 1), num_images=2))
    req = h.build_request(**_form([str(photo_dir / "astronaut.png")], seed="2680261499100305976"))
    assert req.settings.seed == 2680261499100305976


@pytest.mark.parametrize("seed,randomize,expected", [("12", True, "random"), (" 12 ", False, "12"), (None, False, "")])
def test_seed_for_run(seed, randomize, expected):
    assert h.seed_for_run(seed, randomize) == expected


# ----------------------------------------------------------------------------- photos


def test_photo_set_replaces_unless_adding():
    assert h.photo_set(["/u/a.png"], "/u/b.png", add=False) == ["/u/b.png"]
    assert h.photo_set(["/u/a.png"], {"path": "/u/b.png"}, add=True) == ["/u/a.png", "/u/b.png"]
    assert h.photo_set(None, None, add=True) == []


def test_preview_identity_face_and_no_face(tiny_pipe, photo_dir):
    cache = h.IdentityCache(maxsize=2)
    thumbs, line = h.preview_identity(tiny_pipe, [str(photo_dir / "astronaut.png")], cache=cache)
    assert [c for _, c in thumbs] == ["astronaut.png", "face found"] and "Face found: 1 photo" in line
    assert thumbs[-1][0].size == (512, 512)  # the aligned face the encoder returned
    thumbs, line = h.preview_identity(tiny_pipe, [str(photo_dir / "coffee.png")], cache=cache)
    assert [c for _, c in thumbs] == ["coffee.png"] and "no face found in coffee.png" in line and "\n" not in line
    assert h.preview_identity(tiny_pipe, [], cache=cache) == ([], "")
    h.preview_identity(tiny_pipe, [str(photo_dir / "astronaut.png")], cache=cache)
    assert cache.hits == 1  # Generate after the preview reuses the encoding


def test_collect_photos_accepts_gradio_value_shapes(photo_dir):
    p = photo_dir / "astronaut.png"
    named = types.SimpleNamespace(name=str(p))
    assert h.collect_photos([str(p)]) == [p]
    assert h.collect_photos(str(p)) == [p]
    assert h.collect_photos([{"path": str(p)}, named, (str(p), None)]) == [p, p, p]


@pytest.mark.parametrize("value", [None, [], ()])
def test_collect_photos_requires_a_photo(value):
    with pytest.raises(h.UIInputError, match="no identity photo"):
        h.collect_photos(value)


def test_collect_photos_limits_count(photo_dir):
    p = str(photo_dir / "astronaut.png")
    with pytest.raises(h.UIInputError, match="5 photos uploaded; use at most 4"):
        h.collect_photos([p] * 5)


def test_wrong_file_type_message_names_the_file(tmp_path):
    upload = tmp_path / "gradio" / "abc123" / "notes.txt"
    upload.parent.mkdir(parents=True)
    upload.write_text("hello")
    with pytest.raises(h.UIInputError) as info:
        h.collect_photos([str(upload)])
    message = str(info.value)
    assert message.startswith("notes.txt is not a photo (wrong file type)")
    assert str(upload.parent) not in message and "\n" not in message


def test_fake_png_is_refused_without_temp_path(tmp_path):
    upload = tmp_path / "deep" / "folder" / "face.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"this is not a png at all")
    with pytest.raises(InputImageError) as info:
        h.collect_photos([str(upload)])
    message = str(info.value)
    assert "face.png" in message and str(upload.parent) not in message
    assert "\n" not in message


def test_too_large_upload(tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)).save(big)
    size_mb = big.stat().st_size / 2**20
    assert size_mb > 0.5
    with pytest.raises(h.UIInputError, match=r"big\.png is 1\.\d MB, over the 0\.5 MB limit"):
        h.collect_photos([str(big)], h.UILimits(max_upload_mb=0.5))
    assert h.collect_photos([str(big)], h.UILimits(max_upload_mb=5)) == [big]


def test_animated_gif_refused(tmp_path):
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(InputImageError, match="anim.gif is an animated image"):
        h.collect_photos([str(gif)])


def test_missing_upload(tmp_path):
    with pytest.raises(h.UIInputError, match="gone.png: the upload is missing"):
        h.collect_photos([str(tmp_path / "gone.png")])


# ----------------------------------------------------------------------------- form


def test_build_request_ok_and_normalised(photo_dir):
    req = h.build_request(**_form([str(photo_dir / "astronaut.png")], prompt="  a portrait  ", steps=3.0, width=128.0))
    s = req.settings
    assert s.prompt == "a portrait" and s.steps == 3 and isinstance(s.steps, int)
    assert (s.width, s.height, s.seed, s.num_images) == (128, 128, 7, 1)
    assert req.compare == () and req.total_steps == 3


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"prompt": "   "}, "the prompt is empty"),
        ({"prompt": None}, "the prompt is empty"),
        ({"preset": "magic"}, "unknown preset 'magic'; choose one of: pulid, paper"),
        ({"steps": 0}, "steps must be between 1 and 50"),
        ({"steps": 51}, "steps 51 is over this server's cap of 50; .*spatialid serve --max-steps N"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"steps": None}, "steps is empty"),
        ({"start_step": 3}, "start step must be between 0 and 2"),
        ({"width": 120}, "width must be a multiple of 16"),
        ({"height": 4096}, "height 4096 is over this server's cap of 2048 px; .*--max-side N"),
        ({"height": 32}, "height must be between 64 and 2048"),
        ({"id_weight": 3.5}, "id weight must be between 0 and 3"),
        ({"id_weight": "x"}, "id weight must be a number"),
        ({"true_cfg": 0.5}, "true CFG must be between 1 and 10"),
        ({"guidance": float("nan")}, "guidance must be a number"),
        ({"num_images": 5}, "number of images 5 is over this server's cap of 4; .*--max-images N"),
        ({"num_images": 0}, "number of images must be between 1 and 4"),
        ({"seed": "lucky"}, "seed must be a whole number or 'random'"),
    ],
)
def test_build_request_rejects(photo_dir, overrides, pattern):
    with pytest.raises(h.UIInputError, match=pattern) as info:
        h.build_request(**_form([str(photo_dir / "astronaut.png")], **overrides))
    assert "\n" not in str(info.value)


def test_build_request_checks_photos_first(tmp_path):
    with pytest.raises(h.UIInputError, match="no identity photo"):
        h.build_request(**_form(None, prompt=""))


def test_compare_list_rules():
    assert h.compare_list("paper", None) == ["pulid", "paper"]
    assert h.compare_list("relaxed", []) == ["pulid", "relaxed"]
    assert h.compare_list("pulid", None) == ["pulid", "paper"]
    assert h.compare_list("paper", ["relaxed"]) == ["paper", "relaxed"]
    assert h.compare_list("paper", ["paper"]) == ["pulid", "paper"]
    assert h.compare_list("paper", ["entropy", "pulid", "relaxed"]) == ["pulid", "relaxed", "entropy"]
    with pytest.raises(h.UIInputError, match="unknown preset 'nope' to compare"):
        h.compare_list("paper", ["nope"])


def test_total_steps_counts_only_extra_presets(photo_dir):
    req = h.build_request(**_form([str(photo_dir / "astronaut.png")], compare=True, compare_presets=["pulid", "paper", "relaxed"]))
    assert req.compare == ("pulid", "paper", "relaxed")
    assert req.total_steps == 3 * 3  # paper is the main image; pulid and relaxed are extra


def test_preset_help_covers_every_preset():
    from spatialid.masks import PRESET_DESCRIPTIONS, PRESETS

    assert h.preset_choices() == list(PRESETS)
    assert set(h.PLAIN_PRESET_TEXT) == set(PRESETS)
    for name in PRESETS:
        text = h.preset_help(name)
        assert text.startswith(f"**{name}**") and PRESET_DESCRIPTIONS[name] in text
    assert h.preset_help("unknown") == "Pick a preset to see what it does."


def test_defaults_for_tiny_and_full():
    tiny_defaults, tiny_limits = h.defaults_for(types.SimpleNamespace(is_tiny=True))
    assert (tiny_defaults.width, tiny_defaults.height, tiny_defaults.steps) == (128, 128, 8)  # all three phases
    assert tiny_limits.max_side == 512
    full = types.SimpleNamespace(is_tiny=False, default_width=896, default_height=1152, default_num_inference_steps=20)
    d, lim = h.defaults_for(full)
    assert (d.width, d.height, d.steps, d.guidance) == (896, 1152, 20, 4.0) and lim.max_side == 2048


def test_settings_text_hides_encoder_internals():
    settings = {"prompt": "p", "seed": 3, "identity": {"files": ["a.png"], "embedding": {"eva_config": "{...}"}}}
    text = h.settings_text(settings)
    first, rest = text.split("\n\n", 1)
    assert first.startswith("p\n") and "Seed: 3" in first
    data = json.loads(rest)
    assert data["identity"] == {"files": ["a.png"]}
    assert "embedding" in settings["identity"]  # the caller's dict is untouched


# ----------------------------------------------------------------------------- generation (tiny model)


def test_run_generation_outputs_and_metadata(tiny_pipe, photo_dir, tmp_path, identities):
    from spatialid.app.job import GenerationJob, run_job
    from spatialid.app.metadata import read_png_metadata
    from spatialid.pipeline.settings import GenerationSettings

    req = h.build_request(**_form([str(photo_dir / "astronaut.png")], seed="11"))
    calls = []
    result = h.run_generation(
        tiny_pipe, req, tmp_path / "out", progress=lambda d, t, s: calls.append((d, t, s)), identity_cache=identities
    )

    assert [im.size for im in result.images] == [(128, 128)]
    assert result.mask_picture is not None and result.mask_picture.size[0] > 128 * 3
    assert result.comparison is None
    assert result.aligned_face is not None and result.aligned_face.size == (512, 512)
    assert len(result.files) == 2 and all(p.exists() and p.suffix == ".png" for p in result.files)
    assert all(tmp_path / "out" in p.parents for p in result.files)
    # progress: "finding the face" at 0, then one report per denoising step, ending at the total
    assert calls[0][:2] == (0, 3) and [c[0] for c in calls[1:]] == [1, 2, 3] and calls[-1][1] == 3

    meta = read_png_metadata(result.image_files[0])
    assert meta == result.settings
    assert meta["prompt"] == "portrait photo" and meta["seed"] == 11 and meta["preset"] == "paper"
    assert meta["identity"]["files"] == ["astronaut.png"] and meta["identity"]["source"] == "image"
    assert meta["width"] == 128 and meta["steps"] == 3 and meta["interface"] == "web"
    assert "noise by design" in meta["note"]
    assert "Tiny model" in result.status and "seed 11" in result.status and result.captions == ["seed 11"]

    # the CLI's run_job with the same settings writes the same keys (the UI adds "interface")
    identity = identities.get_or_encode(tiny_pipe, [photo_dir / "astronaut.png"])
    settings = GenerationSettings(prompt="portrait photo", preset="paper", steps=3, width=128, height=128, seed=11)
    job = GenerationJob(settings=settings, out=tmp_path / "cli" / "x.png", identity_files=["astronaut.png"],
                        identity_source="image")
    cli = run_job(tiny_pipe, job, identity, log=lambda m: None, extra_settings={"device": "cpu", "quantization": None})
    cli_meta = read_png_metadata(cli.images[0])
    assert set(meta) - set(cli_meta) == {"interface"} and set(cli_meta) <= set(meta)
    # same pipeline object, identity and seed through the same run_job: the same computation
    assert np.array_equal(np.asarray(Image.open(cli.images[0])), np.asarray(result.images[0]))


def test_run_generation_compare_mode(tiny_pipe, photo_dir, tmp_path, identities):
    req = h.build_request(**_form([str(photo_dir / "astronaut.png")], steps=2, compare=True))
    calls = []
    result = h.run_generation(
        tiny_pipe, req, tmp_path, progress=lambda d, t, s: calls.append((d, t, s)), identity_cache=identities
    )
    assert result.comparison is not None
    assert result.comparison.size[0] >= 3 * 256  # identity photo + paper + pulid, tiles scaled to >= 256 px
    assert result.comparison.size[1] >= 3 * 256  # the image row, then the mask rows
    compare_file = next(p for p in result.files if p.stem.endswith("_compare"))
    from spatialid.app.metadata import read_image_metadata

    assert read_image_metadata(compare_file)["presets_shown"] == ["paper", "pulid"]  # the chosen preset first
    # one progress bar over the whole comparison, named by preset and step
    assert calls[-1][:2] == (4, 4) and calls[-1][2] == "preset 2/2 (pulid): denoising step 2/2"
    assert calls[1][2] == "preset 1/2 (paper): denoising step 1/2"
    assert "preset comparison" in result.status


def test_two_requests_never_share_a_folder(tiny_pipe, photo_dir, tmp_path, identities):
    req = h.build_request(**_form([str(photo_dir / "astronaut.png")], steps=1, seed="5"))
    a = h.run_generation(tiny_pipe, req, tmp_path, identity_cache=identities)
    b = h.run_generation(tiny_pipe, req, tmp_path, identity_cache=identities)
    assert a.image_files[0].parent != b.image_files[0].parent
    assert a.image_files[0].name == b.image_files[0].name == "spatialid-s5.png"


def test_identity_cache_by_content(tmp_path):
    calls = []

    class FakePipe:
        def encode_identity(self, photos):
            calls.append(photos)
            if "noface" in str(photos):
                raise FaceNotFoundError(f"no face found in {photos}; use a photo where one face is visible")
            return f"embedding-{len(calls)}"

    a, b, c = (tmp_path / "up1" / "me.png", tmp_path / "up2" / "me.png", tmp_path / "other.png")
    for p, data in ((a, b"same"), (b, b"same"), (c, b"different")):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
    cache = h.IdentityCache(maxsize=2)
    pipe = FakePipe()
    assert cache.get_or_encode(pipe, [a]) == "embedding-1"
    assert cache.get_or_encode(pipe, [b]) == "embedding-1"  # same bytes, new upload path: no re-encode
    assert cache.get_or_encode(pipe, [c]) == "embedding-2"
    assert cache.get_or_encode(pipe, [a, c]) == "embedding-3"  # several photos: one embedding
    assert calls == [str(a), str(c), [str(a), str(c)]]
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache.get_or_encode(pipe, [a]) == "embedding-4"  # evicted (maxsize 2)
    bad = tmp_path / "tmpdir" / "noface.png"
    bad.parent.mkdir()
    bad.write_bytes(b"x")
    with pytest.raises(FaceNotFoundError, match=r"^no face found in noface.png;"):
        cache.get_or_encode(pipe, [bad])


def test_no_face_error_names_the_upload(tiny_pipe, photo_dir, tmp_path):
    upload = tmp_path / "gradio" / "f00d" / "coffee.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes((photo_dir / "coffee.png").read_bytes())
    req = h.build_request(**_form([str(upload)]))
    with pytest.raises(FaceNotFoundError) as info:
        h.run_generation(tiny_pipe, req, tmp_path / "out")
    message = str(info.value)
    assert message.startswith("no face found in coffee.png") and str(upload.parent) not in message
    assert not list((tmp_path / "out").rglob("*.png"))  # nothing written for a failed request


# ----------------------------------------------------------------------------- examples


def test_example_photos_written_once(tmp_path):
    from spatialid.ui.examples import EXAMPLES, write_example_photos

    paths = write_example_photos(tmp_path)
    assert set(paths) == {e.name for e in EXAMPLES} == {"astronaut", "coffee"}
    first = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    with Image.open(paths["astronaut"]) as im:
        assert im.size == (512, 512) and im.mode == "RGB"
    assert write_example_photos(tmp_path) == paths
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == first


# ----------------------------------------------------------------------------- app wiring (no server)


def test_build_app_queue_and_offline_settings(tmp_path):
    pytest.importorskip("gradio")
    from spatialid.ui.app import build_app

    pipe = types.SimpleNamespace(is_tiny=True, model_info={"model": "tiny"})
    demo = build_app(pipe, output_dir=tmp_path / "out", example_dir=tmp_path / "ex")
    files = demo._spatialid_files
    assert os.environ["GRADIO_TEMP_DIR"] == str(files.root)  # uploads and Gradio's cache: private
    assert demo.analytics_enabled is False
    assert os.environ.get("GRADIO_ANALYTICS_ENABLED") == "False"
    generating = [f for f in demo.fns.values() if f.name == "on_generate"]
    assert len(generating) == 3  # button, Enter in the prompt, example click
    assert all(f.concurrency_id == "gpu" and f.concurrency_limit == 1 and f.queue for f in generating)
    public = [f.api_name for f in demo.fns.values() if f.api_visibility == "public"]
    assert public == ["generate"]
    assert (tmp_path / "ex" / "astronaut.png").exists()
    assert demo._queue.max_size == 16 and demo.api_open is False  # no direct POST around the queue
    assert [f.name for f in demo.fns.values() if any(t[1] == "unload" for t in f.targets)] == ["on_unload"]
    config = json.dumps(demo.get_config_file())
    assert "noise **by design**" in config and "googleapis" not in config
    assert str(tmp_path / "out") not in config  # --output-dir only receives copies
    files.close()
    assert not files.root.exists() and os.environ.get("GRADIO_TEMP_DIR") != str(files.root)


def test_theme_fonts_are_served_locally():
    gr = pytest.importorskip("gradio")
    from spatialid.ui.app import _theme

    theme = _theme()
    fonts = [*theme._font, *theme._font_mono]
    assert fonts and not any(isinstance(f, gr.themes.GoogleFont) for f in fonts)
    assert "googleapis" not in json.dumps(getattr(theme, "_stylesheets", []))


# ----------------------------------------------------------------------------- serve command


def test_serve_parser_defaults_to_localhost():
    from spatialid.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--model", "tiny"])
    assert (args.host, args.port, args.model, args.offload) == ("127.0.0.1", 7860, "tiny", "none")
    assert args.max_upload_mb == 20.0


@pytest.mark.parametrize(
    "host,loop", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
                  ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False), ("::", False)]
)
def test_is_loopback(host, loop):
    from spatialid.ui.network import is_loopback

    assert is_loopback(host) is loop


def test_port_in_use_is_a_one_line_error():
    from spatialid.ui.network import check_port_free

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(SpatialIDError, match=rf"cannot listen on 127.0.0.1:{port} .*choose another --port"):
            check_port_free("127.0.0.1", port)


def test_serve_warns_on_public_host_and_loads_once(monkeypatch, capsys):
    from spatialid.app.loading import Models
    from spatialid.cli import cmd_serve
    from spatialid.ui import app

    class _Pipe:
        def set_progress_bar_config(self, **kw):
            pass

    pipe = _Pipe()
    loaded, launched = [], []
    monkeypatch.setattr(cmd_serve, "check_port_free", lambda host, port: None)
    monkeypatch.setattr(Models, "pipeline", lambda self: loaded.append((self.spec.model, self.spec)) or pipe)
    monkeypatch.setattr(app, "launch", lambda pipe, **kw: launched.append((pipe, kw)))
    from spatialid.cli.main import main

    assert main(["serve", "--model", "tiny", "--host", "0.0.0.0", "--port", "7999"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "noise by design" in err
    assert [m for m, _ in loaded] == ["tiny"] and launched[0][0] is pipe
    assert launched[0][1]["host"] == "0.0.0.0" and launched[0][1]["port"] == 7999

    loaded.clear()
    assert main(["serve", "--model", "tiny"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,pattern", [(["--port", "0"], "--port must be between 1 and 65535"),
                                          (["--max-upload-mb", "0"], "--max-upload-mb must be > 0"),
                                          (["--host", " "], "--host is empty")])
def test_serve_bad_flags(argv, pattern, capsys):
    from spatialid.cli.main import main

    assert main(["serve", "--model", "tiny", *argv]) == 2
    assert pattern in capsys.readouterr().err


def test_serve_check_args_namespace():
    from spatialid.cli.cmd_serve import _check_args

    _check_args(argparse.Namespace(port=7860, host="127.0.0.1", max_upload_mb=1.0))


# ----------------------------------------------------------------------------- stop, aspect ratios, history, settings from a PNG


def test_stop_between_steps_leaves_no_files(tiny_pipe, photo_dir, tmp_path, identities):
    """Stop asked after the second step: the run raises between steps and its folder is gone."""
    req = h.build_request(**_form([str(photo_dir / "astronaut.png")], steps=6, compare=True))
    seen: list[int] = []
    with pytest.raises(h.GenerationStopped):
        h.run_generation(
            tiny_pipe, req, tmp_path, progress=lambda d, t, s: seen.append(d), identity_cache=identities,
            should_stop=lambda: len(seen) >= 3,  # "finding the face", then two steps
        )
    assert max(seen) == 2
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    # the pipeline is usable at once (the injector's hooks were taken off)
    ok = h.run_generation(tiny_pipe, h.build_request(**_form([str(photo_dir / "astronaut.png")], steps=1)), tmp_path,
                          identity_cache=identities)
    assert ok.image_files[0].exists()


@pytest.mark.parametrize("ratio,base,expected", [
    ("1:1", (128, 128), (128, 128)), ("3:4", (128, 128), (112, 144)), ("4:3", (128, 128), (144, 112)),
    ("16:9", (1024, 1024), (1360, 768)), ("9:16", (1024, 1024), (768, 1360)),
])
def test_aspect_size_keeps_the_pixels_in_multiples_of_16(ratio, base, expected):
    w, h_ = h.aspect_size(ratio, *base)
    assert (w, h_) == expected and w % 16 == 0 and h_ % 16 == 0


def test_aspect_size_caps_and_rejects():
    assert max(h.aspect_size("16:9", 512, 512, max_side=512)) == 512
    with pytest.raises(h.UIInputError, match="aspect ratio"):
        h.aspect_size("wide", 128, 128)


def test_history_keeps_the_last_results_newest_first(tmp_path):
    history: list = []
    for seed in range(10):
        history = h.add_to_history(history, [tmp_path / f"s{seed}.png"], {"seed": seed, "seeds": [seed], "preset": "paper"})
    assert len(history) == h.HISTORY_SIZE
    assert history[0] == (str(tmp_path / "s9.png"), "seed 9, paper") and history[-1][1] == "seed 2, paper"
    both = h.add_to_history([], [tmp_path / "a.png", tmp_path / "b.png"], {"seeds": [5, 6], "preset": "pulid"})
    assert [c for _, c in both] == ["seed 6, pulid", "seed 5, pulid"]


def test_settings_from_png_restore_the_form(tiny_pipe, photo_dir, tmp_path, identities):
    form = _form([str(photo_dir / "astronaut.png")], prompt="a knight, oil painting", preset="pulid", id_weight=0.8,
                 start_step=1, steps=2, guidance=3.5, width=144, height=112, seed="2680261499100305976")
    result = h.run_generation(tiny_pipe, h.build_request(**form), tmp_path, identity_cache=identities)
    values, message = h.settings_from_file(str(result.image_files[0]))
    assert values == {
        "prompt": "a knight, oil painting", "negative_prompt": "", "preset": "pulid", "id_weight": 0.8,
        "start_step": 1, "true_cfg": 1.0, "guidance": 3.5, "steps": 2, "width": 144, "height": 112,
        "seed": "2680261499100305976",
    }
    assert message.startswith("Loaded the settings of spatialid-s2680261499100305976.png")
    # the restored values make the same request again
    again = h.build_request(photos=form["photos"], **{k: v for k, v in values.items()})
    assert again.settings == h.build_request(**form).settings
    # over this server's caps: lowered, and said so
    small = h.UILimits(max_side=128, max_steps=1)
    capped, note = h.settings_from_file(str(result.image_files[0]), small)
    assert capped["width"] == 128 and capped["steps"] == 1 and capped["start_step"] == 0 and "lowered" in note


def test_settings_from_a_png_without_settings(photo_dir):
    values, message = h.settings_from_file(str(photo_dir / "astronaut.png"))
    assert values is None
    assert message.startswith("**No settings loaded**: astronaut.png: PNG image without spatialid settings")
    assert str(photo_dir) not in message and "\n" not in message


# ----------------------------------------------------------------------------- the page's events (issue 21)


@pytest.fixture()
def page_app(tmp_path):
    """The app on a fake tiny pipe, its event functions by name, and a fake browser session."""
    pytest.importorskip("gradio")
    from spatialid.ui.app import build_app

    pipe = types.SimpleNamespace(is_tiny=True, model_info={"model": "tiny"})
    demo = build_app(pipe, output_dir=tmp_path / "out", example_dir=tmp_path / "ex", local=True)
    fns: dict = {}
    for f in demo.fns.values():
        fns.setdefault(f.name, []).append(f.fn)
    try:
        yield demo, fns, types.SimpleNamespace(session_hash="tab-1")
    finally:
        demo._spatialid_files.close()


def _status(update):
    return update if isinstance(update, str) else None


def test_stop_says_stopped_only_for_this_tabs_run(page_app):
    demo, fns, tab = page_app
    stop, start, failed = fns["stop_run"][0], fns["start"][0], fns["failed_status"][0]
    status, button = stop(tab)  # idle (or a late click after the result): nothing changes, Stop goes off
    assert _status(status) is None and button["interactive"] is False
    assert start("random", True, tab)[-1]["interactive"] is True  # a run queued: Stop on
    status, button = stop(tab)
    assert status.startswith("**Stopped**") and button["interactive"] is False
    # the cancelled run's own failure event: "Stopped" again, never "something went wrong"
    status, button = failed(tab)
    assert status.startswith("**Stopped**") and "went wrong" not in status and button["interactive"] is False
    # a later real error is still said as an error
    start("random", True, tab)
    status, _ = failed(tab)
    assert status.startswith("**Not generated**")


def test_reuse_seed_and_fifth_person_say_why_nothing_happens(page_app):
    demo, fns, tab = page_app
    seed, randomize, status = fns["reuse"][0](tab)
    assert "No run yet in this tab" in status
    out = fns["add_a_person"][0](4)
    assert out[-1].startswith("At most 4 people")
    out = fns["add_a_person"][0](1)
    assert out[0] == 2 and out[-1] == ""


def test_removing_the_last_other_person_clears_person_1s_region(page_app):
    demo, fns, tab = page_app
    remove = fns["remove"][0]  # person 2's Remove
    photos, regions, previews = [["b.png"], None, None], ["0.5,0,1,1", "", ""], [None] * 3
    out = remove(2, "0,0,0.5,1", *photos, *regions, *previews)
    count, region_1, note = out[0], out[-2], out[-1]
    assert count == 1 and region_1 == "" and "region of person 1 was cleared" in note
    out = remove(3, "0,0,0.3,1", ["b.png"], ["c.png"], None, "0.3,0,0.6,1", "0.6,0,1,1", "", *previews)
    assert out[0] == 2 and out[-2] == "0,0,0.3,1" and out[-1] == ""  # still several people: their regions stay


def test_page_says_where_results_are_kept(tmp_path):
    pytest.importorskip("gradio")
    from spatialid.cli.cmd_serve import default_output_dir
    from spatialid.ui.events import storage_note
    from spatialid.ui.storage import ServeFiles

    kept = ServeFiles(tmp_path, keep_hours=1, archive_dir=tmp_path / "outputs")
    shared = ServeFiles(tmp_path, keep_hours=2)
    try:
        assert f"`{tmp_path / 'outputs'}`" in storage_note(kept, local=True)
        for files, local in ((kept, False), (shared, True), (shared, False)):  # a shared server: the tab's files go
            assert "deleted when you close this tab" in storage_note(files, local)
        assert "after 2 h" in storage_note(shared, False)
    finally:
        kept.close(), shared.close()
    assert default_output_dir("0.0.0.0") is None  # a shared server keeps no copies unless told
    assert default_output_dir("127.0.0.1", [("alice", "pw")]) is None  # a login: shared (a proxy in front)
    assert default_output_dir("127.0.0.1") == str((Path.cwd() / "outputs").resolve())


def test_history_comes_back_after_a_reload_only_from_the_output_folder(tmp_path):
    from PIL import Image as PILImage

    from spatialid.ui.generation import restore_kept
    from spatialid.ui.storage import ServeFiles

    out = tmp_path / "outputs" / "20261206-1200-x"
    out.mkdir(parents=True)
    PILImage.new("RGB", (8, 8)).save(out / "spatialid-s1.png")
    secret = tmp_path / "secret.png"
    PILImage.new("RGB", (8, 8)).save(secret)
    files = ServeFiles(tmp_path / "serve", keep_hours=1, archive_dir=tmp_path / "outputs")
    try:
        browser_list = [[str(out / "spatialid-s1.png"), "seed 1, paper"], [str(secret), "x"],
                        [str(out / ".." / ".." / "secret.png"), "y"], "junk", [str(out / "missing.png"), "z"]]
        history, sources = restore_kept(files, "tab", browser_list, 8)
        assert [c for _, c in history] == ["seed 1, paper"] and sources == [(str(out / "spatialid-s1.png"), "seed 1, paper")]
        assert Path(history[0][0]).is_relative_to(files.root)  # served from the session's own folder
        assert restore_kept(ServeFiles(tmp_path / "serve2", keep_hours=1), "tab", browser_list, 8) == ([], [])
    finally:
        files.close()


def test_cost_line_shows_the_price_against_the_cap():
    pytest.importorskip("gradio")
    from spatialid.ui.events import cost_line

    limits = h.UILimits(max_side=512, unit_steps=8, unit_width=128, unit_height=128)
    assert cost_line(8, 128, 128, 1, 1.0, False, [], "paper", limits) == "Cost: 1 of this server's cap of 10 default requests."
    over = cost_line(12, 512, 512, 1, 1.0, False, [], "paper", limits)  # the 24 > 10
    assert over.startswith("**Over this server's cap**: this request costs 24 default requests")


def test_settings_summary_is_short_and_names_the_mode():
    from spatialid.ui.generation import GenerationResult, settings_summary

    settings = {"prompt": "a knight", "negative_prompt": "", "seed": 7, "width": 144, "height": 96, "steps": 8,
                "preset": "relaxed", "id_weight": 1.0, "start_step": 1, "guidance": 3.5, "true_cfg": 1.0,
                "pipeline": "img2img", "init_image": "init-image.png", "strength": 0.6, "inpaint_mask": None,
                "loras": ["style.safetensors:0.8"], "people": [["a.png"], ["b.png"]], "regions": [[0, 0, 0.5, 1], [0.5, 0, 1, 1]],
                "model": "tiny", "controlnet": None, "version": "0.2"}
    text = settings_summary(settings)
    assert text.splitlines()[0] == "a knight" and len(text.splitlines()) <= 4 and "None" not in text and "null" not in text
    assert "img2img from init-image.png, strength 0.6" in text and "LoRAs: style.safetensors:0.8" in text
    assert "people: a.png | b.png" in text and "regions: 0,0,0.5,1 | 0.5,0,1,1" in text
    status = GenerationResult([object()], [], None, None, None, [], settings=settings, seconds=1.0).status
    assert "img2img (strength 0.6), 2 people, regions, LoRA style.safetensors:0.8" in status


def test_two_peoples_aligned_faces_side_by_side():
    from PIL import Image as PILImage

    from spatialid.ui.generation import _aligned_faces

    one, two = (types.SimpleNamespace(aligned_face=PILImage.new("RGB", (112, 112), c)) for c in ("red", "blue"))
    row = _aligned_faces([one, two])
    assert row.size == (224, 112) and row.getpixel((0, 0)) == (255, 0, 0) and row.getpixel((200, 0)) == (0, 0, 255)
    assert _aligned_faces(one) is one.aligned_face and _aligned_faces([types.SimpleNamespace()]) is None
