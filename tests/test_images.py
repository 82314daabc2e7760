"""load_image: every kind of photo a user may hand us becomes 8-bit RGB, or a one-line InputImageError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from spatialid.errors import InputImageError, SpatialIDError
from spatialid.utils.images import load_image


def _png_16bit_rgb(arr: np.ndarray) -> bytes:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_rgb_file_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    im = load_image(tmp_path / "a.png")
    assert im.mode == "RGB" and im.size == (30, 20)
    assert np.array_equal(np.asarray(im), arr)
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "a.png"))), arr)  # str path too


def test_grayscale_becomes_rgb(tmp_path):
    Image.fromarray(np.full((8, 9), 77, np.uint8), mode="L").save(tmp_path / "g.jpg", quality=100)
    out = np.asarray(load_image(tmp_path / "g.jpg"))
    assert out.shape == (8, 9, 3)
    assert np.all(np.abs(out.astype(int) - 77) <= 1)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    out = np.asarray(load_image(tmp_path / "t.png"))
    assert (out[:2] == [200, 0, 0]).all()
    assert (out[2:] == [255, 255, 255]).all()


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    im.info["transparency"] = 0
    im.paste(0, (0, 0, 2, 4))
    im.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert (out[:, :2] == 255).all() and (out[:, 2:] == [10, 20, 30]).all()


def test_16bit_gray_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_16bit_rgb_png(tmp_path):
    arr = np.zeros((2, 3, 3), np.uint16)
    arr[..., 0] = 65535
    arr[..., 1] = 257 * 128
    (tmp_path / "rgb16.png").write_bytes(_png_16bit_rgb(arr))
    out = np.asarray(load_image(tmp_path / "rgb16.png"))
    assert out.shape == (2, 3, 3)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 128).all() and (out[..., 2] == 0).all()


def test_exif_rotation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    out = np.asarray(load_image(tmp_path / "r.jpg"))
    assert out.shape == (20, 10, 3)  # portrait after rotation
    assert out[:10].mean() > 200 and out[10:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize(
    "arr, expect",
    [
        (np.full((3, 4), 9, np.uint8), 9),
        (np.full((3, 4, 1), 9, np.uint8), 9),
        (np.full((3, 4), 65535, np.uint16), 255),
        (np.full((3, 4, 3), 0.5, np.float32), 128),
        (np.ones((3, 4), bool), 255),
        (np.dstack([np.full((3, 4, 3), 40, np.uint8), np.full((3, 4), 255, np.uint8)]), 40),
    ],
)
def test_numpy_inputs(arr, expect):
    out = np.asarray(load_image(arr))
    assert out.shape == (3, 4, 3) and (out == expect).all()


def test_pil_input_not_modified():
    src = Image.new("LA", (5, 5), (10, 255))
    out = load_image(src)
    assert out.mode == "RGB" and src.mode == "LA" and np.asarray(out)[0, 0].tolist() == [10, 10, 10]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.png", "not found"),
        (lambda p: p, "directory"),
        (lambda p: _write(p / "empty.png", b""), "empty file"),
        (lambda p: _write(p / "notes.png", b"hello, this is text, not a picture" * 10), "not an image"),
    ],
)
def test_bad_files(tmp_path, make, match):
    with pytest.raises(InputImageError, match=match) as info:
        load_image(make(tmp_path))
    assert isinstance(info.value, SpatialIDError) and "\n" not in str(info.value)


def _write(path, data):
    path.write_bytes(data)
    return path


def test_truncated_file(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputImageError, match="damaged or truncated"):
        load_image(tmp_path / "cut.png")


def test_animated_gif_refused(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with pytest.raises(InputImageError, match="animated image with 3 frames"):
        load_image(tmp_path / "anim.gif")
    frames[0].save(tmp_path / "still.gif")  # a single-frame GIF is fine
    assert load_image(tmp_path / "still.gif").size == (8, 8)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    # a 10000 x 10000 PNG of one colour: tiny on disk, 100 MP (300 MB) decoded
    path = tmp_path / "bomb.png"
    Image.new("L", (10000, 10000), 0).save(path, optimize=True)
    assert path.stat().st_size < 200_000
    with pytest.raises(InputImageError, match="decompression-bomb guard"):
        load_image(path)
    with pytest.raises(InputImageError, match="more than the limit of 100"):
        load_image(np.zeros((20, 10, 3), np.uint8), max_pixels=100)


@pytest.mark.parametrize(
    "value, match",
    [
        (np.zeros((2, 3, 5), np.uint8), "HxW"),
        (np.zeros((2,), np.uint8), "HxW"),
        (np.full((2, 2), np.nan, np.float32), "NaN"),
        (np.full((2, 2), -3, np.int32), "negative"),
        (np.zeros((2, 2), np.complex64), "unsupported dtype"),
        (12345, "cannot read an image from a int"),
    ],
)
def test_bad_in_memory_inputs(value, match):
    with pytest.raises(InputImageError, match=match):
        load_image(value)


def test_loaded_image_remembers_its_file_for_messages(tmp_path):
    from PIL import Image

    from spatialid.utils.images import describe_source, load_image

    path = tmp_path / "holiday.png"
    Image.new("RGB", (32, 24), "white").save(path)
    image = load_image(path)
    assert describe_source(image) == str(path)
    assert describe_source(Image.new("RGB", (5, 4))) == "PIL image 5x4 RGB"
