"""Hostile files, round two (issue 20): results files, PNG text chunks, prompt files, mask files, pipes.

Every reader of outside data either returns a valid record or stops with the project's one-line
error (exit 2): no path outside its folder, no unbounded memory, no traceback. All in-process
through ``spatialid.cli.main.main``, with files made here (no model is loaded).
"""

from __future__ import annotations

import io
import json
import logging
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from spatialid.cli.main import main

MB = 2**20


# ----------------------------------------------------------------------------- helpers


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The stderr of the last call, which must be exactly one ``spatialid: error:`` line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("spatialid: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_with_chunks(path: Path, *chunks: bytes) -> Path:
    """A small PNG with ``chunks`` (already framed) inserted before IEND."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(buf, format="PNG")
    png = buf.getvalue()
    path.write_bytes(png[:-12] + b"".join(chunks) + png[-12:])
    return path


def _png_with_settings(path: Path, settings: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("spatialid", json.dumps(settings))
    Image.new("RGB", (16, 16), (90, 90, 90)).save(path, format="PNG", pnginfo=info)
    return path


def _zeros_deflate(megabytes: int) -> bytes:
    """A valid zlib stream inflating to ``megabytes`` MB of zeros, about 1000:1, built in milliseconds.

    One 1 MB block compressed after a full flush is the same bytes each time, so it is repeated;
    the Adler-32 of n zero bytes is ``(n mod 65521) << 16 | 1``.
    """
    block = b"\0" * MB
    c = zlib.compressobj(9)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    assert first[2:] == again
    adler = (((megabytes * MB) % 65521) << 16) | 1
    return first[:2] + again * megabytes + b"\x03\x00" + struct.pack(">I", adler)


def _bomb_png(path: Path, kind: bytes) -> Path:
    """A ~500 KB PNG whose ``spatialid`` text chunk (zTXt or iTXt) inflates to 500 MB."""
    stream = _zeros_deflate(500)
    body = b"spatialid\0" + (b"\0" if kind == b"zTXt" else b"\1\0\0\0") + stream
    return _png_with_chunks(path, _chunk(kind, body))


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


# ----------------------------------------------------------------------------- 1, 15: merge


def _bench_folder(root: Path, entries: list[dict]) -> Path:
    from spatialid.bench.results import MANIFEST_FORMAT, MANIFEST_NAME

    root.mkdir(parents=True)
    (root / MANIFEST_NAME).write_text(json.dumps({"format": MANIFEST_FORMAT}), encoding="utf-8")
    images = root / "paper" / "images"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(b"image bytes")
    (root / "paper" / "results.json").write_text(json.dumps({"datas": entries}), encoding="utf-8")
    return root


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_merge_refuses_image_paths_outside_the_folder(tmp_path, capsys, where):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me", encoding="utf-8")
    created = tmp_path / "created.txt"
    image = "../../../victim.txt" if where == "relative" else str(created)
    src = _bench_folder(tmp_path / "s" / "x" / "src", [
        {"key": "k1", "image": image, "imagewithid": str(tmp_path / "s" / "x" / "src" / "paper" / "images" / "a.png")},
    ])
    out = tmp_path / "o" / "out"  # out/paper/../../../victim.txt is tmp_path/victim.txt
    assert main(["merge", str(src), "--out", str(out)]) == 2
    assert "outside" in _err_line(capsys)
    assert victim.read_text(encoding="utf-8") == "keep me"
    assert not created.exists()


def test_merge_refuses_imagewithid_outside_the_folder(tmp_path, capsys):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    src = _bench_folder(tmp_path / "src", [{"key": "k1", "image": "images/gone.png", "imagewithid": str(secret)}])
    out = tmp_path / "out"
    assert main(["merge", str(src), "--out", str(out)]) == 2
    assert "outside" in _err_line(capsys)
    assert not (out / "paper" / "images" / "gone.png").exists()


@pytest.mark.parametrize("image", [5, ["images/a.png"], {"x": 1}])
def test_merge_refuses_a_non_text_image(tmp_path, capsys, image):
    src = _bench_folder(tmp_path / "src", [{"key": "k1", "image": image}])
    assert main(["merge", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "non-text" in _err_line(capsys)


def test_merge_still_copies_images_inside_the_folder(tmp_path, capsys):
    src = _bench_folder(tmp_path / "src", [{"key": "k1", "image": "images/a.png"}])
    out = tmp_path / "out"
    assert main(["merge", str(src), "--out", str(out)]) == 0
    assert (out / "paper" / "images" / "a.png").read_bytes() == b"image bytes"


# ----------------------------------------------------------------------------- 2: zlib bombs in text chunks


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt"])
def test_text_chunk_bomb_is_refused_within_a_fixed_memory(tmp_path, capsys, kind):
    bomb = _bomb_png(tmp_path / "bomb.png", kind)
    assert bomb.stat().st_size < 600 * 1024
    main(["info", str(tmp_path / "warm-up.png")])  # imports first: they are not the reader's memory
    capsys.readouterr()
    before, peak_known = _rss(), _reset_peak_rss()
    tracemalloc.start()
    try:
        code = main(["info", str(bomb)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grown = (_peak_rss() if peak_known else _rss()) - before  # peak RSS where Linux resets it, else now
    assert peak < 100 * MB, f"{peak / MB:.0f} MB allocated reading a {bomb.stat().st_size} byte PNG"
    assert grown < 100 * MB, f"RSS grew by {grown / MB:.0f} MB"
    assert code == 2
    assert "1 MB" in _err_line(capsys)


def test_text_chunk_bomb_through_from_png(tmp_path, capsys):
    bomb = _bomb_png(tmp_path / "bomb.png", b"iTXt")
    tracemalloc.start()
    try:
        code = main(["generate", "--model", "tiny", "--from-png", str(bomb), "--out", str(tmp_path / "o.png")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2
    assert "1 MB" in _err_line(capsys)
    assert peak < 100 * MB


def test_text_below_the_cap_still_reads(tmp_path):
    from spatialid.app.metadata import read_image_metadata

    text = json.dumps({"prompt": "p" * 200_000, "seed": 3}).encode("latin-1")
    path = _png_with_chunks(tmp_path / "z.png", _chunk(b"zTXt", b"spatialid\0\0" + zlib.compress(text)))
    assert read_image_metadata(path)["seed"] == 3


# ----------------------------------------------------------------------------- 16: closed pipe


class _ClosedPipe(io.TextIOBase):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_info_into_a_closed_pipe_exits_quietly(tmp_path, capsys, monkeypatch):
    png = _png_with_settings(tmp_path / "a.png", {"prompt": "a cat", "seed": 1, "steps": 4})
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = main(["info", str(png)])
    assert code == 141  # 128 + SIGPIPE, as `yes | head -1` reports under pipefail
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- 17: --prompts bounds


def test_prompts_from_dev_zero_is_refused(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--prompts", "/dev/zero", "--out", str(tmp_path / "o.png")]) == 2
    assert "larger than" in _err_line(capsys)


def test_prompts_with_too_many_lines_is_refused(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n" * 20_000, encoding="utf-8")
    assert main(["generate", "--model", "tiny", "--prompts", str(prompts), "--out", str(tmp_path / "o.png")]) == 2
    assert "lines" in _err_line(capsys)


# ----------------------------------------------------------------------------- 22: bench groups


def test_bench_group_with_the_same_photo_by_two_spellings(tmp_path, capsys, monkeypatch):
    Image.new("RGB", (64, 64), (120, 100, 90)).save(tmp_path / "astro.png")
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"groups": [["astro.png", "./astro.png"]]}), encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code = main(["bench", "--model", "tiny", "--ids", str(groups), "--prompts", str(prompts), "--presets", "paper",
                 "--out", str(tmp_path / "bench"), "--no-progress", "--device", "cpu"])
    assert code == 2
    assert "same photo twice" in _err_line(capsys)


# ----------------------------------------------------------------------------- 7: ANSI from metadata


def test_from_png_warnings_do_not_carry_terminal_escapes(tmp_path, capsys, caplog):
    png = _png_with_settings(tmp_path / "a.png", {
        "prompt": "a cat", "seed": 1, "steps": 4,
        "model": "evil\x1b]0;owned\x07/model\x1b[2J",
        "loras": ["\x1b[31mred\x1b[0m:1"],
        "controlnet": "cn\x9b2J",
    })
    caplog.set_level(logging.INFO)
    # --steps 0 stops the run after the image's settings were applied and its notices logged
    code = main(["generate", "--model", "tiny", "--from-png", str(png), "--steps", "0", "--out", str(tmp_path / "o.png")])
    assert code == 2
    err = capsys.readouterr().err
    messages = [r.getMessage() for r in caplog.records]
    assert any("evil" in m for m in messages), messages
    for text in [err, *messages]:
        assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text, repr(text)
    assert any("\\x1b" in m for m in messages)


def test_error_lines_do_not_carry_terminal_escapes(tmp_path, capsys):
    png = _png_with_settings(tmp_path / "a.png", {"prompt": "a cat", "seed": 1, "steps": 4, "init_image": "gone\x1b[2J.png",
                                                  "pipeline": "img2img"})
    assert main(["generate", "--model", "tiny", "--from-png", str(png), "--out", str(tmp_path / "o.png")]) == 2
    line = _err_line(capsys)
    assert "\x1b" not in line and "gone\\x1b[2J.png" in line


# ----------------------------------------------------------------------------- 12: --masks-from metadata


def _mask_file(path: Path, steps: str | None) -> Path:
    import torch
    from safetensors.torch import save_file

    meta = {"format": "spatialid-masks/1", "persons": "1", "grid": "2x2"}
    if steps is not None:
        meta["steps"] = steps
    save_file({"masks": torch.zeros(1, 1, 1, 1, 2, 2)}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("steps", [None, "5", "[1e400]", "[[1]]", '["a"]', "[true]", "[100000000]", "[" * 5000])
def test_masks_from_with_odd_steps_is_one_line(tmp_path, capsys, steps):
    masks = _mask_file(tmp_path / "m.safetensors", steps)
    photo = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (120, 100, 90)).save(photo)
    code = main(["generate", "--model", "tiny", "--id", str(photo), "--prompt", "a person", "--masks-from", str(masks),
                 "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert "steps" in _err_line(capsys)



@pytest.mark.parametrize("value", [1e30, 1.5])
def test_mask_file_values_above_one_are_refused_by_the_library_reader(tmp_path, value):
    """The [0, 1] bound sat only in the command line's early check: Python's masks_from took 1e30 masks."""
    import torch
    from safetensors.torch import save_file

    from spatialid.injection.people import MaskFileError, mask_replay_table

    path = tmp_path / "m.safetensors"
    save_file({"masks": torch.full((1, 1, 1, 1, 2, 2), value)}, str(path),
              metadata={"format": "spatialid-masks/1", "steps": "[0]", "persons": "1", "grid": "2x2"})
    with pytest.raises(MaskFileError, match=r"finite and in \[0, 1\]"):
        mask_replay_table(path)
    save_file({"masks": torch.ones(1, 1, 1, 1, 2, 2)}, str(path),
              metadata={"format": "spatialid-masks/1", "steps": "[0]", "persons": "1", "grid": "2x2"})
    assert mask_replay_table(path)[1] == [0]  # exactly 1 (full identity) is a valid mask

# ----------------------------------------------------------------------------- 13, 21: hostile settings records


_HOSTILE_INFO = [
    {"identity": [1]},
    {"identity": {"files": 5}},
    {"people": 5},
    {"people": [[1, 2]], "regions": [["a", "b", "c", "d"]]},
    {"true_cfg": "abc"},
    {"true_cfg": [1]},
    {"schedule_overrides": [1, 2]},
    {"schedule_overrides": {"id_weight_early": "x"}},
    {"width": 64, "height": [1]},
    {"regions": 5},
    {"prompt": ["a", "b"], "loras": 5},
]


@pytest.mark.parametrize("settings", _HOSTILE_INFO, ids=lambda s: json.dumps(s)[:40])
def test_info_on_hostile_settings_never_tracebacks(tmp_path, capsys, settings):
    png = _png_with_settings(tmp_path / "a.png", settings)
    code = main(["info", str(png)])
    if code != 0:
        assert code == 2
        _err_line(capsys)


def test_itxt_holding_only_its_keyword_is_one_line(tmp_path, capsys):
    png = _png_with_chunks(tmp_path / "a.png", _chunk(b"iTXt", b"spatialid\0"))
    assert main(["info", str(png)]) == 2
    assert "keyword" in _err_line(capsys)
    assert main(["generate", "--model", "tiny", "--from-png", str(png), "--out", str(tmp_path / "o.png")]) == 2
    assert "keyword" in _err_line(capsys)


def test_deeply_nested_or_huge_numbers_are_one_line(tmp_path, capsys):
    for i, text in enumerate(["[" * 100_000 + "]" * 100_000, '{"seed": ' + "9" * 5000 + "}"]):
        path = _png_with_chunks(tmp_path / f"{i}.png", _chunk(b"tEXt", b"spatialid\0" + text.encode()))
        assert main(["info", str(path)]) == 2
        _err_line(capsys)


@pytest.mark.parametrize("settings", [
    {"prompt": ["a cat", "a dog"], "seed": 1},
    {"prompt": "a cat", "preset": ["paper"], "seed": 1},
    {"prompt": "a cat", "steps": "many", "seed": 1},
    {"prompt": "a cat", "steps": 4.5, "seed": 1},
    {"prompt": "a cat", "guidance": [3.5], "seed": 1},
    {"prompt": "a cat", "seed": 1e300},
    {"prompt": "a cat", "seed": 2**80},
    {"prompt": "a cat", "schedule_overrides": {"id_weight_early": "x"}, "seed": 1},
    {"prompt": "a cat", "schedule_overrides": [1], "seed": 1},
    {"prompt": {"text": "a cat"}, "seed": 1},
], ids=lambda s: json.dumps(s)[:48])
def test_from_png_refuses_settings_of_the_wrong_type(tmp_path, capsys, settings):
    png = _png_with_settings(tmp_path / "a.png", settings)
    code = main(["generate", "--model", "tiny", "--from-png", str(png), "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert "stored setting" in _err_line(capsys)
    assert not (tmp_path / "o.png").exists()


def test_from_png_model_naming_a_folder_is_only_a_notice(tmp_path, capsys, caplog):
    png = _png_with_settings(tmp_path / "a.png", {"prompt": "a cat", "seed": 1, "steps": 4, "model": "/etc"})
    caplog.set_level(logging.INFO)
    code = main(["generate", "--model", "tiny", "--from-png", str(png), "--steps", "0", "--out", str(tmp_path / "o.png")])
    assert code == 2  # stopped by --steps 0, after the notice; /etc is never opened as a model
    assert "steps" in _err_line(capsys)
    assert any("/etc" in r.getMessage() for r in caplog.records)
