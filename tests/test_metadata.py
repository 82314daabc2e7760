"""PNG settings metadata round trip and atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from spatialid.errors import InputImageError, SpatialIDError
from spatialid.app.metadata import (
    METADATA_KEY,
    SUMMARY_KEY,
    format_summary,
    read_png_metadata,
    save_png_with_metadata,
)
from spatialid.utils.io import OutputPathError, atomic_save_image, atomic_write, check_writable

SETTINGS = {
    "version": "0.1.0",
    "prompt": "portrait of Ærøskøbing's mayor, 油画",
    "seed": 2**40 + 3,
    "preset": "paper",
    "schedule": {"early": 0.7, "late": 0.3, "late_floor": 0.5, "center_sigma": 0.3, "global_floor": 0.0},
    "id_weight": 1.0,
    "steps": 20,
    "width": 64,
    "height": 48,
    "identity": {"source": "image", "files": ["me.jpg"]},
    "model": "black-forest-labs/FLUX.1-dev",
}


def _image(w=64, h=48):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_round_trip_keeps_every_setting_and_pixels(tmp_path):
    img = _image()
    path = save_png_with_metadata(img, tmp_path / "out.png", SETTINGS)
    assert read_png_metadata(path) == SETTINGS
    with Image.open(path) as back:
        assert np.array_equal(np.asarray(back), np.asarray(img))
        assert back.text[SUMMARY_KEY].startswith(SETTINGS["prompt"])
        assert "Seed: 1099511627779" in back.text[SUMMARY_KEY]
        assert "Size: 64x48" in back.text[SUMMARY_KEY]
        assert back.text["Software"] == "spatialid 0.1.0"
    assert _leftovers(tmp_path) == []


def test_non_json_values_are_converted(tmp_path):
    import torch

    settings = {"seed": np.int64(5), "path": tmp_path, "t": torch.tensor(0.5), "pair": (1, 2)}
    path = save_png_with_metadata(_image(), tmp_path / "x.png", settings)
    data = read_png_metadata(path)
    assert data == {"seed": 5, "path": str(tmp_path), "t": 0.5, "pair": [1, 2]}


def test_overwrite_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "a.png"
    save_png_with_metadata(_image(), path, {"seed": 1})
    save_png_with_metadata(_image(32, 32), path, {"seed": 2})
    assert read_png_metadata(path) == {"seed": 2}
    assert _leftovers(tmp_path) == []


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "partial.png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as fh:
            fh.write(b"\x89PNG half")
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old_file(tmp_path):
    target = tmp_path / "keep.png"
    save_png_with_metadata(_image(), target, {"seed": 1})
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write(b"garbage")
            raise RuntimeError("disk full")
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_atomic_save_image_formats(tmp_path):
    p = atomic_save_image(_image(), tmp_path / "x.jpg")
    with Image.open(p) as im:
        assert im.format == "JPEG"


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "no such file"),
        (b"hello, not an image", "not a readable image"),
    ],
)
def test_read_errors(tmp_path, content, match):
    path = tmp_path / "f.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputImageError, match=match):
        read_png_metadata(path)


def test_read_png_without_metadata(tmp_path):
    path = tmp_path / "plain.png"
    _image().save(path)
    with pytest.raises(InputImageError, match="without spatialid settings"):
        read_png_metadata(path)
    jpg = tmp_path / "x.jpg"
    _image().save(jpg)
    with pytest.raises(InputImageError, match="JPEG image without"):
        read_png_metadata(jpg)


def test_read_folder_and_bad_json(tmp_path):
    with pytest.raises(InputImageError, match="folder"):
        read_png_metadata(tmp_path)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, "{not json")
    path = tmp_path / "bad.png"
    _image().save(path, pnginfo=info)
    with pytest.raises(InputImageError, match="not valid JSON"):
        read_png_metadata(path)
    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps([1, 2]))
    _image().save(path, pnginfo=info)
    with pytest.raises(InputImageError, match="not a JSON object"):
        read_png_metadata(path)


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "deep" / "x.png") == tmp_path / "new" / "deep" / "x.png"
    assert (tmp_path / "new" / "deep").is_dir()
    assert _leftovers(tmp_path / "new" / "deep") == []
    with pytest.raises(OutputPathError, match="is a folder"):
        check_writable(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="not a folder|cannot create"):
        check_writable(blocker / "x.png")
    with pytest.raises(OutputPathError, match="does not exist"):
        check_writable(tmp_path / "missing" / "x.png", create_parent=False)
    assert issubclass(OutputPathError, SpatialIDError)


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root ignores permissions")
def test_check_writable_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="cannot write"):
            check_writable(ro / "x.png")
    finally:
        ro.chmod(0o700)


def test_summary_format():
    text = format_summary({"prompt": "a cat", "steps": 4, "seed": 1, "width": 64, "height": 32, "true_cfg": None})
    assert text == "a cat\nSteps: 4, Seed: 1, Size: 64x32"
