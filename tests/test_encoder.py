"""The whole identity-encoding chain, offline: tiny preset (dlib + tiny EVA02 + tiny IDFormer) on real
skimage photos, several photos, errors, determinism, and the ``spatialid encode`` command."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from spatialid.encoder import IdentityEmbedding, IdentityEncoder
from spatialid.encoder.identity_encoder import tiny_encoder_config, tiny_pulid_modules
from spatialid.errors import FaceNotFoundError, InputImageError
from spatialid.models.configs import TINY_PULID


@pytest.fixture(scope="module")
def encoder(tiny_encoder) -> IdentityEncoder:
    """IdentityEncoder.tiny(seed=0), shared with the session (conftest): read-only here."""
    return tiny_encoder


@pytest.fixture(scope="module")
def astronaut_emb(astronaut_embedding) -> IdentityEmbedding:
    return astronaut_embedding


@pytest.fixture(scope="module")
def photos(photo_dir):
    """astronaut.png, and coffee.png (no face; small, since such a photo also runs dlib's CNN detector)."""
    return photo_dir


def turned_astronaut() -> np.ndarray:
    """200x200, face turned ~50 degrees: HOG finds no face at all, dlib's CNN finds it."""
    crop = Image.fromarray(data.astronaut()).crop((70, 0, 370, 300))
    turned = crop.rotate(50, resample=Image.BICUBIC, fillcolor=(255, 255, 255))
    return np.ascontiguousarray(np.asarray(turned.resize((200, 200), Image.BICUBIC)))


def two_astronauts() -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """1000x512: a big astronaut far left (face 91 px) and a smaller one (face ~76 px) whose face is
    nearest the centre; returns the image and the two faces' approximate top-left corners."""
    canvas = np.full((512, 1000, 3), 255, np.uint8)
    canvas[:, :512] = data.astronaut()
    canvas[132:512, 512:892] = np.asarray(Image.fromarray(data.astronaut()).resize((380, 380), Image.BICUBIC))
    return canvas, (175.0, 76.0), (643.0, 188.0)


def test_tiny_config_matches_tiny_idformer():
    assert tiny_encoder_config() == {"id_cond_dim": 160, "vit_dim": 32}
    assert TINY_PULID.idformer.id_cond_dim == 160 and TINY_PULID.idformer.vit_dim == 32


def test_astronaut_face_found_and_tokens(encoder, astronaut_emb):
    emb = astronaut_emb
    x0, y0, x1, y1 = emb.face_box
    # the face of the astronaut: around x 175-265, y 76-166 in the 512x512 photo
    assert 160 < x0 < 190 and 65 < y0 < 90 and 255 < x1 < 280 and 155 < y1 < 180
    q, d = TINY_PULID.idformer.num_queries, TINY_PULID.idformer.output_dim
    assert emb.tokens.shape == (1, q, d) and emb.uncond_tokens.shape == (1, q, d)
    assert torch.isfinite(emb.tokens).all() and emb.tokens.dtype == torch.float32
    assert not torch.allclose(emb.tokens, emb.uncond_tokens)
    assert emb.aligned_face.size == (512, 512)
    assert set(emb.debug_images) == {"aligned_face", "face_features", "detection"}
    assert emb.debug_images["detection"].size == (512, 512)
    ff = np.asarray(emb.debug_images["face_features"])
    assert (ff[:10, :10] == 255).all()  # background painted white
    assert (ff[..., 0] == ff[..., 1]).all() and (ff[..., 1] == ff[..., 2]).all()  # grayscale
    meta = emb.metadata
    assert meta["encoder"] == "tiny" and meta["face_backend"] == "dlib" and meta["num_images"] == "1"
    assert json.loads(meta["faces_found"]) == [1]


def test_uncond_tokens_are_idformer_of_zeros(encoder, astronaut_emb):
    cfg = encoder.eva.config
    zeros_cond = torch.zeros(1, TINY_PULID.idformer.id_cond_dim)
    zeros_hidden = [torch.zeros(1, cfg.num_tokens, cfg.width) for _ in cfg.hidden_indices]
    with torch.no_grad():
        expected = encoder.idformer(zeros_cond, zeros_hidden)
    torch.testing.assert_close(astronaut_emb.uncond_tokens, expected)


def test_tokens_are_idformer_of_arcface_like_vector_and_eva(encoder, astronaut_emb):
    """Recompute the chain by hand: dlib descriptor ++ normalised EVA embedding -> IDFormer."""
    from spatialid.encoder.parsing import eva_preprocess, face_features_image

    stack = encoder.face_stack
    face = stack.analyze(data.astronaut(), "astronaut")
    img = torch.from_numpy(face.aligned).permute(2, 0, 1)[None].float() / 255
    feats = face_features_image(img, face.labels)
    with torch.no_grad():
        emb, hidden = encoder.eva(eva_preprocess(feats, encoder.eva.config.image_size))
        cond = torch.cat([torch.from_numpy(face.id_vector)[None], emb / emb.norm(dim=1, keepdim=True)], -1)
        tokens = encoder.idformer(cond, hidden)
    assert len(hidden) == 5 and all(h.shape == (1, 65, 32) for h in hidden)
    torch.testing.assert_close(astronaut_emb.tokens, tokens)


def test_no_face_in_coffee(encoder):
    # neither HOG nor the CNN fallback finds a face: still an error
    with pytest.raises(FaceNotFoundError, match="no face found"):
        encoder.encode(data.coffee())


def test_small_face_is_encoded_with_a_warning(encoder, tmp_path, caplog):
    """PuLID refuses no face: one ~40 px face gives tokens and one warning naming photo and size."""
    Image.fromarray(data.astronaut()).resize((224, 224), Image.BICUBIC).save(tmp_path / "small.png")
    with caplog.at_level(logging.WARNING, logger="spatialid.encoder.identity_encoder"):
        emb = encoder.encode(tmp_path / "small.png")
    x0, y0, x1, y1 = emb.face_box
    assert 35 <= x1 - x0 < 64 and 35 <= y1 - y0 < 64
    assert torch.isfinite(emb.tokens).all() and json.loads(emb.metadata["faces_found"]) == [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "small.png" in warnings[0] and f"{x1 - x0:.0f}x{y1 - y0:.0f} px" in warnings[0] and "64 px" in warnings[0]


def test_turned_face_found_by_the_cnn_fallback(encoder, caplog):
    img = turned_astronaut()
    with caplog.at_level(logging.INFO, logger="spatialid.encoder.face_dlib"):
        emb = encoder.encode(img)
    x0, y0, x1, y1 = emb.face_box  # the CNN's box around the turned face (~44-124 px)
    assert 30 < x0 < 70 and 30 < y0 < 70 and 100 < x1 < 140 and 100 < y1 < 140
    assert json.loads(emb.metadata["faces_found"]) == [1] and torch.isfinite(emb.tokens).all()
    assert any("CNN face detector found 1" in r.getMessage() for r in caplog.records)


def test_several_faces_follow_pulid(encoder, caplog):
    """Identity vector from the largest face, alignment/EVA from the one nearest the centre."""
    canvas, big, small = two_astronauts()
    with caplog.at_level(logging.WARNING, logger="spatialid.encoder.identity_encoder"):
        res = encoder.face_stack.analyze(canvas, "two.png")
        emb = encoder.encode(canvas)
    assert res.num_faces == 2 and res.notes == ["identity_and_aligned_faces_differ"]
    assert res.box[:2] == pytest.approx(big, abs=8) and emb.face_box[:2] == pytest.approx(big, abs=8)
    # the aligned face's landmarks lie in the small astronaut's face box (x 643-719, y 188-263)
    lm = np.asarray(res.landmarks5)
    assert (lm[:, 0] > small[0]).all() and (lm[:, 0] < small[0] + 76).all()
    assert (lm[:, 1] > small[1]).all() and (lm[:, 1] < small[1] + 76).all()
    # the descriptor is the big face's: same as the one of the big astronaut alone
    alone = encoder.face_stack.analyze(data.astronaut(), "astronaut")
    assert np.linalg.norm(res.id_vector - alone.id_vector) < 1e-3
    msgs = [r.getMessage() for r in caplog.records if "several faces in two.png" in r.getMessage()]
    assert msgs and "largest of 2" in msgs[0] and "nearest the centre" in msgs[0] and "different faces" in msgs[0]


def test_several_photos_mean_of_tokens(encoder, astronaut_emb):
    mirrored = np.ascontiguousarray(data.astronaut()[:, ::-1])
    single_b = encoder.encode(mirrored)
    both = encoder.encode([data.astronaut(), mirrored])
    torch.testing.assert_close(both.tokens, (astronaut_emb.tokens + single_b.tokens) / 2)
    torch.testing.assert_close(both.uncond_tokens, astronaut_emb.uncond_tokens)
    assert both.num_images == 2 and both.face_box == astronaut_emb.face_box
    assert {"photo1_aligned_face", "photo2_detection"} <= set(both.debug_images)
    assert len(json.loads(both.metadata["face_boxes"])) == 2


def test_robust_inputs_give_a_face(encoder, astronaut_emb, tmp_path):
    gray = np.asarray(Image.fromarray(data.astronaut()).convert("L"))
    assert encoder.encode(gray).face_box == pytest.approx(astronaut_emb.face_box, abs=6)
    rgba = np.dstack([data.astronaut(), np.full((512, 512), 255, np.uint8)])
    torch.testing.assert_close(encoder.encode(rgba).tokens, astronaut_emb.tokens)
    # stored rotated with an EXIF orientation tag: load_image turns it upright again
    rotated = Image.fromarray(data.astronaut()).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=98)
    assert encoder.encode(tmp_path / "rot.jpg").face_box == pytest.approx(astronaut_emb.face_box, abs=6)
    sixteen = (data.astronaut().astype(np.uint16) * 257)[..., 0]
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    assert encoder.encode(tmp_path / "g16.png").face_box == pytest.approx(astronaut_emb.face_box, abs=6)


def test_bad_inputs(encoder, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(InputImageError, match="not an image"):
        encoder.encode(tmp_path / "x.png")
    with pytest.raises(InputImageError, match="not found"):
        encoder.encode([data.astronaut(), tmp_path / "missing.jpg"])
    with pytest.raises(Exception, match="no identity photo"):
        encoder.encode([])


def test_deterministic_in_seed(astronaut_emb):
    again = IdentityEncoder.tiny(seed=0).encode(data.astronaut())
    assert torch.equal(again.tokens, astronaut_emb.tokens)
    other = IdentityEncoder.tiny(seed=1).encode(data.astronaut())
    assert not torch.allclose(other.tokens, astronaut_emb.tokens)


def test_tiny_pulid_modules_deterministic_and_rng_neutral():
    from spatialid.models.checkpoint import build_pulid_modules

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a_id, a_ca = tiny_pulid_modules(7)
    after = torch.rand(3)
    assert torch.equal(before, after)  # the caller's random stream is untouched
    b_id, b_ca = tiny_pulid_modules(7)
    assert len(a_ca) == TINY_PULID.num_ca
    for x, y in zip(list(a_id.state_dict().values()) + list(a_ca.state_dict().values()),
                    list(b_id.state_dict().values()) + list(b_ca.state_dict().values())):
        assert torch.equal(x, y)
    # same as seeding the global RNG and building (the pipeline's own fallback recipe)
    torch.manual_seed(7)
    c_id, _ = build_pulid_modules(TINY_PULID)
    assert all(torch.equal(x, y) for x, y in zip(a_id.state_dict().values(), c_id.state_dict().values()))
    assert not any(p.requires_grad for p in a_id.parameters())


def test_tiny_with_given_idformer_and_dtype(astronaut_emb):
    idformer, _ = tiny_pulid_modules(0)
    enc = IdentityEncoder.tiny(idformer=idformer, seed=0, dtype=torch.bfloat16)
    emb = enc.encode(data.astronaut())
    assert emb.tokens.dtype == torch.bfloat16 and emb.metadata["dtype"] == "bfloat16"
    torch.testing.assert_close(emb.tokens.float(), astronaut_emb.tokens, atol=0.15, rtol=0.1)
    enc.to(dtype=torch.float32)  # weights were rounded to bf16: close, not equal
    back = enc.encode(data.astronaut())
    assert back.tokens.dtype == torch.float32 and enc.eva.model.cls_token.dtype == torch.float32
    torch.testing.assert_close(back.tokens, astronaut_emb.tokens, atol=0.15, rtol=0.1)


def test_mismatched_idformer_refused():
    from spatialid.models.idformer import IDFormer

    wrong = IDFormer(dim=32, depth=5, dim_head=8, heads=2, num_id_token=2, num_queries=4, output_dim=32,
                     ff_mult=2, id_cond_dim=1280, vit_dim=1024)
    with pytest.raises(ValueError, match="id_cond_dim=1280"):
        IdentityEncoder.tiny(idformer=wrong)


def test_tiny_warns_about_dlib(caplog):
    with caplog.at_level(logging.WARNING, logger="spatialid.encoder.identity_encoder"):
        IdentityEncoder.tiny(seed=0)
    assert any("identity fidelity differs from PuLID" in r.getMessage() for r in caplog.records)


def test_file_round_trip_of_encoded_identity(astronaut_emb, tmp_path):
    path = astronaut_emb.save(tmp_path / "id.safetensors")
    back = IdentityEmbedding.load(path)
    assert torch.equal(back.tokens, astronaut_emb.tokens) and torch.equal(back.uncond_tokens, astronaut_emb.uncond_tokens)
    assert back.face_box == astronaut_emb.face_box and back.metadata["encoder"] == "tiny"


# ----------------------------------------------------------------------------- CLI


def test_cli_encode_tiny(photos, tmp_path, capsys, astronaut_emb):
    from spatialid.cli.main import main

    out = tmp_path / "out" / "id.safetensors"
    rc = main(["-q", "encode", "--id", str(photos / "astronaut.png"), "--out", str(out), "--model", "tiny",
               "--debug-dir", str(tmp_path / "dbg"), "--device", "cpu"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "1 photo" in stdout
    emb = IdentityEmbedding.load(out)
    torch.testing.assert_close(emb.tokens, astronaut_emb.tokens)
    assert emb.metadata["model"] == "tiny" and json.loads(emb.metadata["photos"]) == ["astronaut.png"]
    assert sorted(p.name for p in (tmp_path / "dbg").iterdir()) == ["aligned_face.png", "detection.png", "face_features.png"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--id", "{coffee}", "--out", "{tmp}/c.safetensors"], "no face found in"),
        (["--id", "{tmp}/missing.png", "--out", "{tmp}/c.safetensors"], "image not found"),
        (["--id", "{astro}", "--out", "{tmp}/c.pt"], "must end in .safetensors"),
        (["--id", "{astro}", "--out", "{tmp}/c.safetensors", "--device", "warp9"], "unknown device"),
    ],
)
def test_cli_encode_errors(photos, tmp_path, capsys, argv, match):
    from spatialid.cli.main import main

    fill = {"coffee": str(photos / "coffee.png"), "astro": str(photos / "astronaut.png"), "tmp": str(tmp_path)}
    rc = main(["-q", "encode", "--model", "tiny", *[a.format(**fill) for a in argv]])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("spatialid: error:")]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err
    assert not (tmp_path / "c.safetensors").exists()


def test_cli_encode_exit_code_of_python_m_spatialid(photos, tmp_path, capsys, monkeypatch):
    """``python -m spatialid encode`` on a photo without a face exits with status 2 and one line.

    Runs the package's ``__main__`` in this process, as ``python -m`` does (``sys.exit(main())``); the
    console script itself is run as a separate process once, in test_cli.py.
    """
    import runpy

    monkeypatch.setattr(sys, "argv", ["spatialid", "-q", "encode", "--model", "tiny", "--id", str(photos / "coffee.png"),
                                      "--out", str(tmp_path / "c.safetensors")])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("spatialid", run_name="__main__", alter_sys=True)
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert not (tmp_path / "c.safetensors").exists()
    errors = [ln for ln in stderr.splitlines() if ln.startswith("spatialid: error:")]
    assert errors == [f"spatialid: error: no face found in {photos / 'coffee.png'}; use a photo where one face is "
                      "clearly visible, frontal and well lit (at least 64 px tall)"]


def test_large_photos_are_shrunk_like_pulid(encoder, astronaut_emb):
    from spatialid.encoder.identity_encoder import MAX_PHOTO_SIDE, resize_long_side

    assert MAX_PHOTO_SIDE == 1024
    wide = np.zeros((600, 2048, 3), np.uint8)
    out, (sx, sy) = resize_long_side(wide, 1024)
    assert out.shape == (300, 1024, 3) and sx == 0.5 and sy == 0.5
    same, scale = resize_long_side(data.astronaut(), 1024)
    assert same is not None and scale == (1.0, 1.0) and same.shape == (512, 512, 3)
    big = np.asarray(Image.fromarray(data.astronaut()).resize((2048, 2048), Image.BICUBIC))
    emb = encoder.encode(big)
    # detection ran on the 1024 px copy; the box is reported in the 2048 px photo's pixels
    assert emb.face_box == pytest.approx(tuple(4 * v for v in astronaut_emb.face_box), abs=24)
    assert emb.debug_images["detection"].size == (1024, 1024)


def test_encoder_follows_the_shared_idformer_device_and_dtype():
    """The pipeline shares its IDFormer: building the encoder must not move or cast it."""
    idformer, _ = tiny_pulid_modules(0)
    idformer.to(dtype=torch.float64)
    enc = IdentityEncoder.tiny(idformer=idformer, seed=0)
    assert enc.dtype == torch.float64 and enc.device == torch.device("cpu")
    assert next(idformer.parameters()).dtype == torch.float64
    assert enc.eva.model.cls_token.dtype == torch.float64
    assert enc.encode(data.astronaut()).tokens.dtype == torch.float64
