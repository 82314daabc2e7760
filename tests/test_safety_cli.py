"""Nothing lost, nothing refused late: output names, damaged identities, full disks, hostile files, info."""

from __future__ import annotations

import errno
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from spatialid.cli.main import main


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, match):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("spatialid: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]


# ----------------------------------------------------------------------------- 6: names never collide


def test_two_jobs_with_the_same_name_get_distinct_files(tmp_path):
    from spatialid.app.job import GenerationJob, check_outputs, release_outputs
    from spatialid.pipeline.settings import GenerationSettings

    s = GenerationSettings(prompt="x", seed=3, steps=1, width=64, height=64)
    a = GenerationJob(settings=s, out=tmp_path / "same.png", masks=True)
    b = GenerationJob(settings=s, out=tmp_path / "same.png", masks=True)
    pa, pb = check_outputs(a), check_outputs(b)  # two runs in the same second, same seed
    assert pa == [tmp_path / "same.png", tmp_path / "same_masks.png"]
    assert pb == [tmp_path / "same-2.png", tmp_path / "same-2_masks.png"]
    assert check_outputs(a) == pa  # idempotent for one job
    release_outputs(a)
    release_outputs(b)
    assert list(tmp_path.iterdir()) == []  # unwritten placeholders are removed


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    target = tmp_path / "img.png"
    target.write_bytes(b"precious")
    args = ["-q", "generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--size", "64x64", "--seed", "2"]
    code, out, _ = _run([*args, "--out", target], capsys)
    assert code == 0 and target.read_bytes() == b"precious"
    assert out.strip().splitlines() == [str(tmp_path / "img-2.png")]
    code, out, _ = _run([*args, "--out", target, "--overwrite"], capsys)
    assert code == 0 and target.read_bytes().startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- 7: damaged identities


def _embedding_file(path: Path, tokens: torch.Tensor, *, face: torch.Tensor | None = None, meta=None) -> Path:
    from safetensors.torch import save_file

    from spatialid.encoder.embedding import EMBEDDING_FORMAT, EMBEDDING_FORMAT_VERSION

    tensors = {"tokens": tokens, "uncond_tokens": torch.zeros_like(tokens)}
    if face is not None:
        tensors["aligned_face"] = face
    save_file(tensors, str(path), metadata={"format": EMBEDDING_FORMAT, "format_version": EMBEDDING_FORMAT_VERSION, **(meta or {})})
    return path


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: _embedding_file(p, torch.full((1, 4, 32), float("nan"))), "NaN/Inf"),
        (lambda p: _embedding_file(p, torch.full((1, 4, 32), float("inf"))), "NaN/Inf"),
        (lambda p: _embedding_file(p, torch.zeros(1, 4, 32), face=torch.zeros(8, 8, 7, dtype=torch.uint8)), "aligned face"),
        (lambda p: _embedding_file(p, torch.zeros(1, 5, 32), meta={"idformer_config": json.dumps({"num_queries": 4})}),
         "5 identity tokens but its IDFormer makes 4"),
        (lambda p: _embedding_file(p, torch.zeros(1, 4, 32, 1)), "must be [1, num_queries, dim]"),
    ],
)
def test_damaged_identity_files_are_refused_before_loading(tmp_path, capsys, make, match):
    path = make(tmp_path / "bad.safetensors")
    code, _, err = _run(["generate", "--model", "tiny", "--prompt", "x", "--id-embeds", path,
                         "--out", tmp_path / "o.png"], capsys)
    _one_line_error(code, err, match)
    assert not (tmp_path / "o.png").exists()


def test_wrong_token_count_for_the_model_is_refused(tiny_pipe_plain):
    from spatialid.encoder.embedding import IdentityEmbedding
    from spatialid.errors import SpatialIDError

    pipe = tiny_pipe_plain  # conftest's, shared
    emb = IdentityEmbedding(tokens=torch.zeros(1, 7, 32), uncond_tokens=torch.zeros(1, 7, 32))
    with pytest.raises(SpatialIDError, match="7 tokens but this model's IDFormer makes 4"):
        pipe("x", id_embeds=emb, height=64, width=64, num_inference_steps=1, seed=0)


def test_flat_image_is_a_failure_and_nothing_is_written(tmp_path):
    from spatialid.app.job import GenerationFailedError, GenerationJob, run_job
    from spatialid.pipeline.settings import GenerationSettings

    class FlatPipe:  # what NaN tokens do to a real model: one colour everywhere
        def __call__(self, **kwargs):
            from types import SimpleNamespace

            return SimpleNamespace(images=[Image.new("RGB", (64, 64))], settings={"steps": 1}, masks=None)

    job = GenerationJob(settings=GenerationSettings(prompt="x", seed=1, steps=1, width=64, height=64), out=tmp_path / "a.png")
    with pytest.raises(GenerationFailedError, match="one flat colour"):
        run_job(FlatPipe(), job, None, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 11: a full disk


def test_full_disk_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import spatialid.app.metadata as metadata

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o.png"))

    monkeypatch.setattr(metadata, "atomic_save_image", full)
    code, _, err = _run(["generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--size", "64x64",
                         "--out", tmp_path / "o.png"], capsys)
    _one_line_error(code, err, "No space left on device")
    assert "free some space" in err and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 12: files checked first


def test_hostile_files_are_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import pickle

    from spatialid.app.loading import Models

    monkeypatch.setattr(Models, "pipeline", lambda self: pytest.fail("a model was loaded"))
    monkeypatch.setattr(Models, "encoder", lambda self: pytest.fail("the encoder was loaded"))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": 1}))
    renamed = tmp_path / "evil.safetensors"
    renamed.write_bytes(pickle.dumps({"x": 1}))
    photo = tmp_path / "me.png"
    Image.new("RGB", (64, 64), (200, 150, 120)).save(photo)
    base = ["generate", "--prompt", "x", "--id", photo, "--out", tmp_path / "o.png", "--device", "cpu"]
    code, _, err = _run([*base, "--model", "tiny", "--pulid", evil], capsys)
    _one_line_error(code, err, "--pulid has no effect with --model tiny")
    code, _, err = _run([*base, "--model", renamed], capsys)
    _one_line_error(code, err, "pickle")
    code, _, err = _run([*base, "--model", "black-forest-labs/FLUX.1-dev", "--pulid", renamed], capsys)
    _one_line_error(code, err, "pickle")
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"pulid_ca.0.norm1.weight": torch.zeros(3)}, str(wrong))
    code, _, err = _run([*base, "--model", "black-forest-labs/FLUX.1-dev", "--pulid", wrong], capsys)
    _one_line_error(code, err, "does not match the PuLID-FLUX layout")


# ----------------------------------------------------------------------------- 13: info and seeds


def _png_with_text(path: Path, width: int, height: int, text: dict) -> Path:
    """A tiny valid PNG whose header claims ``width`` x ``height`` (a decompression bomb for Pillow)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr)
    payload = json.dumps(text, ensure_ascii=False).encode("utf-8")
    body += chunk(b"iTXt", b"spatialid\0\0\0\0\0" + payload)
    body += chunk(b"IDAT", zlib.compress(b"\0" * 16))
    body += chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_info_on_a_decompression_bomb_reads_settings_without_decoding(tmp_path, capsys):
    bomb = _png_with_text(tmp_path / "bomb.png", 60000, 60000, {"prompt": "hello", "seed": 1})
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb).load()  # what 0.1.0's info did
    code, out, err = _run(["info", bomb], capsys)
    assert code == 0 and "hello" in out and "Traceback" not in err


def test_info_escapes_terminal_control_codes(tmp_path, capsys):
    png = _png_with_text(tmp_path / "x.png", 8, 8, {"prompt": "a \x1b[2J\x1b]0;pwned\x07 cat\r", "seed": 1})
    code, out, _ = _run(["info", png], capsys)
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b[2J" in out and "cat" in out
    code, out, _ = _run(["info", "--json", png], capsys)
    assert "\x1b" not in out and json.loads(out)["prompt"].startswith("a \x1b[2J")


def test_seed_range_covers_every_image(tmp_path, capsys):
    code, _, err = _run(["generate", "--model", "tiny", "--prompt", "x", "--seed", str(2**63 - 1), "--num-images", "2",
                         "--out", tmp_path / "o.png"], capsys)
    _one_line_error(code, err, "would use seeds up to")
    code, _, _ = _run(["-q", "generate", "--model", "tiny", "--prompt", "x", "--seed", str(2**63 - 2), "--num-images",
                       "2", "--steps", "1", "--size", "64x64", "--out", tmp_path / "ok.png"], capsys)
    assert code == 0


def test_long_prompt_warns_with_its_token_count(tiny_pipe_plain, caplog):
    pipe = tiny_pipe_plain  # conftest's, shared (progress bars off)
    prompt = " ".join(["portrait of a woman in a red dress"] * 40)
    with caplog.at_level("WARNING", logger="spatialid.pipeline"):
        pipe(prompt, height=64, width=64, num_inference_steps=1, seed=0, output_type="latent")
    messages = [r.getMessage() for r in caplog.records if "T5 tokens" in r.getMessage()]
    assert len(messages) == 1 and "only the first 32 are used" in messages[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="spatialid.pipeline"):
        pipe("a short prompt", height=64, width=64, num_inference_steps=1, seed=0, output_type="latent")
    assert not [r for r in caplog.records if "T5 tokens" in r.getMessage()]


def test_bench_refuses_pulid_with_tiny_before_anything(tmp_path, capsys):
    from skimage import data

    ids = tmp_path / "ids"
    ids.mkdir()
    Image.fromarray(data.astronaut()).save(ids / "a.png")
    (tmp_path / "p.txt").write_text("a portrait\n")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x04pickle")
    code, _, err = _run(["bench", "--model", "tiny", "--pulid", evil, "--ids", ids, "--prompts", tmp_path / "p.txt",
                         "--out", tmp_path / "run"], capsys)
    _one_line_error(code, err, "--pulid has no effect with --model tiny")
    assert not (tmp_path / "run").exists()
