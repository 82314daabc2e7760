"""Identity encoder building blocks: alignment maths, parsing/whitening, dlib faces, embedding file."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from spatialid.encoder.align import (
    ARCFACE_TEMPLATE_112,
    FFHQ_TEMPLATE_512,
    apply_affine,
    estimate_similarity,
    invert_affine,
    template_for_size,
    warp_affine,
)
from spatialid.encoder.embedding import IdentityEmbedding
from spatialid.utils.io import atomic_write_bytes
from spatialid.encoder.parsing import (
    BACKGROUND_LABELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    background_mask,
    eva_preprocess,
    face_features_image,
    landmark_parsing_map,
    to_gray,
)
from spatialid.errors import CheckpointError


def _similarity(angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


@pytest.fixture(scope="module")
def dlib_analyzer():
    from spatialid.encoder.face_dlib import DlibFaceAnalyzer

    return DlibFaceAnalyzer()


# ----------------------------------------------------------------------------- alignment maths


@pytest.mark.parametrize("angle, scale, tx, ty", [(0.3, 1.7, 12.0, -40.0), (-1.1, 0.4, 250.0, 3.5), (math.pi, 2.0, 0, 0)])
def test_similarity_recovered_from_known_points(angle, scale, tx, ty):
    m = _similarity(angle, scale, tx, ty)
    src = FFHQ_TEMPLATE_512
    dst = apply_affine(m, src)
    np.testing.assert_allclose(estimate_similarity(src, dst), m, atol=1e-9)
    # two points determine it exactly too
    np.testing.assert_allclose(estimate_similarity(src[:2], dst[:2]), m, atol=1e-9)
    # and the inverse maps back
    np.testing.assert_allclose(apply_affine(invert_affine(m), dst), src, atol=1e-9)


def test_similarity_is_least_squares_and_never_reflects():
    rng = np.random.default_rng(0)
    m = _similarity(0.2, 1.3, 5.0, 7.0)
    src = FFHQ_TEMPLATE_512
    noisy = apply_affine(m, src) + rng.normal(0, 0.5, src.shape)
    fit = estimate_similarity(src, noisy)
    np.testing.assert_allclose(fit[:, :2], m[:, :2], atol=0.02)
    np.testing.assert_allclose(fit[:, 2], m[:, 2], atol=3.0)
    # perturbing the fit increases the squared error (it is the least-squares optimum)
    err = ((apply_affine(fit, src) - noisy) ** 2).sum()
    for delta in np.eye(4) * 1e-3:
        a, b, tx, ty = fit[0, 0] + delta[0], fit[1, 0] + delta[1], fit[0, 2] + delta[2], fit[1, 2] + delta[3]
        assert ((apply_affine(np.array([[a, -b, tx], [b, a, ty]]), src) - noisy) ** 2).sum() > err
    mirrored = src * [-1, 1]
    fit = estimate_similarity(mirrored, src)
    assert np.linalg.det(fit[:, :2]) > 0  # a similarity, never a reflection


def test_similarity_rejects_bad_points():
    with pytest.raises(ValueError, match="matching"):
        estimate_similarity(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="matching"):
        estimate_similarity(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="degenerate"):
        estimate_similarity(np.ones((5, 2)), FFHQ_TEMPLATE_512)
    with pytest.raises(ValueError, match="finite"):
        estimate_similarity(np.full((5, 2), np.nan), FFHQ_TEMPLATE_512)


def test_templates():
    np.testing.assert_allclose(template_for_size(256), FFHQ_TEMPLATE_512 / 2)
    # both templates put the eyes level and the mouth below the nose, image-left point first
    for t in (FFHQ_TEMPLATE_512, ARCFACE_TEMPLATE_112):
        assert t[0, 0] < t[1, 0] and abs(t[0, 1] - t[1, 1]) < 1 and t[2, 1] < t[3, 1] and t[3, 0] < t[4, 0]


def test_warp_identity_and_integer_shift():
    img = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    # exact: integer sample positions, and rounding to uint8 absorbs the ~1e-5 float error
    assert np.array_equal(warp_affine(img, np.eye(2, 3), (40, 30)), img)
    shifted = warp_affine(img, np.array([[1.0, 0, 5], [0, 1.0, -3]]), (40, 30), border_value=(1, 2, 3))
    assert np.array_equal(shifted[0:27, 5:40], img[3:30, 0:35])
    assert (shifted[:, :5] == [1, 2, 3]).all() and (shifted[27:] == [1, 2, 3]).all()


def test_warp_matches_skimage_reference():
    from skimage.transform import AffineTransform, warp

    img = data.astronaut()
    m = _similarity(0.25, 1.8, -150.0, -20.0)
    ours = warp_affine(img, m, (300, 260), border_value=(132, 133, 135)).astype(float)
    inv = AffineTransform(matrix=np.vstack([invert_affine(m), [0, 0, 1]]))
    ref = np.stack(
        [warp(img[..., c].astype(float), inv, output_shape=(260, 300), order=1, mode="constant",
              cval=[132, 133, 135][c], preserve_range=True) for c in range(3)],
        axis=-1,
    )
    inner = (slice(2, -2), slice(2, -2))  # skimage treats the outermost half-pixel slightly differently
    assert np.abs(ours[inner] - ref[inner]).max() <= 1.0


# ----------------------------------------------------------------------------- parsing / EVA input


def test_background_labels_are_pulids():
    assert set(BACKGROUND_LABELS) == {0, 16, 18, 7, 8, 9, 14, 15}
    labels = torch.arange(19).view(1, 1, 1, 19)
    mask = background_mask(labels)
    assert mask.shape == (1, 1, 1, 19)
    assert [i for i in range(19) if mask[0, 0, 0, i]] == [0, 7, 8, 9, 14, 15, 16, 18]
    # hair (17), eyes, brows, nose, mouth, glasses (6) are kept
    assert background_mask(labels[..., [1, 2, 4, 6, 10, 11, 17]].contiguous()).sum() == 0


def test_face_features_whiten_background_and_gray_face():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 8, 8, generator=g)
    labels = torch.randint(0, 19, (2, 1, 8, 8), generator=g)
    out = face_features_image(img, labels)
    bg = torch.isin(labels, torch.tensor(BACKGROUND_LABELS)).expand(-1, 3, -1, -1)
    assert torch.all(out[bg] == 1.0)
    gray = 0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]
    for c in range(3):
        keep = ~bg[:, c]
        torch.testing.assert_close(out[:, c][keep], gray[keep])
    assert torch.equal(face_features_image(img, labels[:, 0]), out)  # [B,H,W] labels too
    torch.testing.assert_close(to_gray(img)[:, 0], gray)


def test_face_features_input_checks():
    with pytest.raises(ValueError, match="argmax"):
        background_mask(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="do not match"):
        face_features_image(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        to_gray(torch.zeros(3, 4, 4))


def test_eva_preprocess():
    const = torch.full((1, 3, 512, 512), 0.25)
    out = eva_preprocess(const, 336)
    assert out.shape == (1, 3, 336, 336)
    for c in range(3):  # bicubic keeps constants: plain CLIP normalisation of 0.25
        torch.testing.assert_close(out[0, c], torch.full((336, 336), (0.25 - OPENAI_CLIP_MEAN[c]) / OPENAI_CLIP_STD[c]))
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x, size=(336, 336), mode="bicubic", align_corners=False, antialias=False)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(eva_preprocess(x, 336), (ref - mean) / std)
    # no clamping after bicubic overshoot (as torchvision on float tensors)
    edge = torch.zeros(1, 3, 512, 512)
    edge[..., 256:] = 1.0
    assert eva_preprocess(edge, 336, mean=(0, 0, 0), std=(1, 1, 1)).max() > 1.0


def test_landmark_parsing_map_covers_face_only(dlib_analyzer):
    analyzer = dlib_analyzer
    img = data.astronaut()
    face = analyzer.detect(img)[0]
    aligned, m = analyzer.align(img, face)
    pts = analyzer.aligned_landmarks68(face, m)
    labels = landmark_parsing_map(pts, 512)
    assert labels.shape == (1, 1, 512, 512) and labels.dtype == torch.long
    area = labels.float().mean().item()
    assert 0.2 < area < 0.6
    assert labels[0, 0, 300, 256] == 1  # between the eyes and the mouth
    assert labels[0, 0, 5, 5] == 0 and labels[0, 0, 505, 5] == 0 and labels[0, 0, 5, 505] == 0
    top = labels[0, 0].nonzero()[:, 0].min().item()
    assert top < pts[17:27, 1].min() - 20  # forehead kept above the brows
    with pytest.raises(ValueError, match="68"):
        landmark_parsing_map(np.zeros((5, 2)))


# ----------------------------------------------------------------------------- dlib faces


def test_dlib_finds_astronaut_face_and_aligns_it(dlib_analyzer):
    img = data.astronaut()
    faces = dlib_analyzer.detect(img)
    assert len(faces) == 1  # the mission patch (score ~0.12) is rejected by min_score
    face = faces[0]
    x0, y0, x1, y1 = face.box
    assert 160 < x0 < 190 and 65 < y0 < 90 and 255 < x1 < 280 and 155 < y1 < 180
    assert 80 < face.side < 110 and face.score > 0.5
    le, re, nose, ml, mr = face.landmarks5
    assert le[0] < nose[0] < re[0] and ml[0] < mr[0] and le[1] < nose[1] < ml[1]
    aligned, m = dlib_analyzer.align(img, face)
    assert aligned.shape == (512, 512, 3) and aligned.dtype == np.uint8
    # the five points land on facexlib's template (least squares: within a few pixels)
    assert np.abs(apply_affine(m, face.landmarks5) - FFHQ_TEMPLATE_512).max() < 15
    vec = dlib_analyzer.descriptor(img, face)
    assert vec.shape == (128,) and vec.dtype == np.float32 and 0.5 < np.linalg.norm(vec) < 3


def test_dlib_no_face_in_coffee(dlib_analyzer):
    assert dlib_analyzer.detect(data.coffee()) == []


def _turned_astronaut() -> np.ndarray:
    """200x200, face turned ~50 degrees: HOG finds no face at all, dlib's CNN finds it."""
    crop = Image.fromarray(data.astronaut()).crop((70, 0, 370, 300))
    turned = crop.rotate(50, resample=Image.BICUBIC, fillcolor=(255, 255, 255))
    return np.ascontiguousarray(np.asarray(turned.resize((200, 200), Image.BICUBIC)))


@pytest.fixture(scope="module")
def cnn_analyzer():
    """The encoder's analyzer (CNN fallback on); the CNN itself is loaded once per process."""
    from spatialid.encoder.face_dlib import shared_dlib_analyzer

    return shared_dlib_analyzer(True)


def test_dlib_cnn_fallback_finds_the_turned_face(dlib_analyzer, cnn_analyzer):
    img = _turned_astronaut()
    rects, _, _ = dlib_analyzer.detector.run(img, 1, 0.0)
    assert len(rects) == 0 and dlib_analyzer.detect(img) == []  # HOG: nothing, even at threshold 0
    faces = cnn_analyzer.detect(img)
    assert len(faces) == 1 and faces[0].extra["detector"] == "cnn" and faces[0].score > 0.5
    face = faces[0]
    x0, y0, x1, y1 = face.box
    assert 30 < x0 < 70 and 30 < y0 < 70 and 100 < x1 < 140 and 100 < y1 < 140
    le, re, nose, ml, mr = face.landmarks5
    assert le[0] < nose[0] < re[0] and ml[0] < mr[0] and le[1] < ml[1] and re[1] < mr[1]
    m = cnn_analyzer.alignment_matrix(face)
    assert np.abs(apply_affine(m, face.landmarks5) - FFHQ_TEMPLATE_512).max() < 25


def test_dlib_cnn_runs_only_when_hog_finds_nothing(cnn_analyzer, monkeypatch):
    calls = []
    monkeypatch.setattr(type(cnn_analyzer), "detect_cnn", lambda self, rgb: calls.append(rgb.shape) or [])
    faces = cnn_analyzer.detect(data.astronaut())
    assert len(faces) == 1 and faces[0].extra["detector"] == "hog" and calls == []
    assert cnn_analyzer.detect(np.full((60, 80, 3), 128, np.uint8)) == [] and calls == [(60, 80, 3)]


def test_dlib_cnn_finds_no_face_in_coffee(cnn_analyzer):
    small = np.asarray(Image.fromarray(data.coffee()).resize((150, 100), Image.BICUBIC))
    assert cnn_analyzer.detect_cnn(small) == []  # both passes (upsampled once too)


def test_dlib_cnn_model_file_missing(tmp_path, dlib_analyzer):
    from spatialid.encoder.face_dlib import DLIB_LANDMARKS_5, DlibFaceAnalyzer
    from spatialid.errors import ModelFilesMissingError

    (tmp_path / DLIB_LANDMARKS_5).symlink_to(dlib_analyzer.models_dir / DLIB_LANDMARKS_5)  # small: loads fast
    assert DlibFaceAnalyzer(tmp_path, with_descriptor=False).cnn_path is None  # off by default
    with pytest.raises(ModelFilesMissingError, match="mmod_human_face_detector.dat"):
        DlibFaceAnalyzer(tmp_path, with_descriptor=False, cnn_fallback=True)


def test_face_choice_rules():
    from spatialid.encoder.face_dlib import FaceDetection, center_face, largest_face

    def face(x0, y0, side):
        return FaceDetection(box=(x0, y0, x0 + side, y0 + side), score=1.0, landmarks5=np.zeros((5, 2)))

    big, mid, small = face(0, 0, 100), face(250, 160, 60), face(500, 300, 80)
    assert largest_face([mid, big, small]) is big
    assert center_face([big, small, mid], 600, 400) is mid  # box centre (280, 190) vs photo centre (300, 200)
    with pytest.raises(ValueError):
        center_face([], 10, 10)


def test_dlib_descriptor_is_an_identity_signal(dlib_analyzer):
    """Same person (mirrored, rescaled photo) -> close descriptors; dlib's threshold is 0.6."""
    img = data.astronaut()
    a = dlib_analyzer.descriptor(img, dlib_analyzer.detect(img)[0])
    other = np.ascontiguousarray(np.asarray(Image.fromarray(img).resize((400, 400)))[:, ::-1])
    b = dlib_analyzer.descriptor(other, dlib_analyzer.detect(other)[0])
    assert np.linalg.norm(a - b) < 0.6


def test_dlib_model_files_missing(tmp_path):
    from spatialid.encoder.face_dlib import DlibFaceAnalyzer
    from spatialid.errors import ModelFilesMissingError

    with pytest.raises(ModelFilesMissingError, match="face-recognition-models"):
        DlibFaceAnalyzer(tmp_path)


def test_dlib_five_point_fallback(tmp_path, dlib_analyzer):
    """With only the 5-point predictor the similarity comes from the two eye centres."""
    from spatialid.encoder.face_dlib import DLIB_LANDMARKS_5, DlibFaceAnalyzer

    (tmp_path / DLIB_LANDMARKS_5).symlink_to(dlib_analyzer.models_dir / DLIB_LANDMARKS_5)
    five = DlibFaceAnalyzer(tmp_path, with_descriptor=False)
    assert five.num_landmarks == 5
    img = data.astronaut()
    f5, f68 = five.detect(img)[0], dlib_analyzer.detect(img)[0]
    assert f5.landmarks68 is None
    m5, m68 = five.alignment_matrix(f5), dlib_analyzer.alignment_matrix(f68)
    # both alignments put the eyes within a few pixels of each other in the 512 crop
    assert np.abs(apply_affine(m5, f68.landmarks5[:2]) - apply_affine(m68, f68.landmarks5[:2])).max() < 12


# ----------------------------------------------------------------------------- embedding file


def _embedding(dtype=torch.float32) -> IdentityEmbedding:
    g = torch.Generator().manual_seed(0)
    face = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return IdentityEmbedding(
        tokens=torch.randn(1, 4, 8, generator=g).to(dtype),
        uncond_tokens=torch.randn(1, 4, 8, generator=g).to(dtype),
        face_box=(1.5, 2.0, 30.0, 40.25),
        aligned_face=face,
        debug_images={"x": face},
        metadata={"encoder": "test", "num_images": 3},
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_round_trip(tmp_path, dtype):
    emb = _embedding(dtype)
    path = emb.save(tmp_path / "sub" / "e.safetensors")  # parent folder created
    back = IdentityEmbedding.load(path)
    assert back.tokens.dtype == dtype and torch.equal(back.tokens, emb.tokens)
    assert torch.equal(back.uncond_tokens, emb.uncond_tokens)
    assert back.face_box == emb.face_box and back.num_images == 3
    assert np.array_equal(np.asarray(back.aligned_face), np.asarray(emb.aligned_face))
    assert back.metadata["encoder"] == "test" and back.metadata["format"] == "spatialid.identity_embedding"
    assert back.debug_images == {}  # debug images are not stored in the file
    assert [p.name for p in path.parent.iterdir()] == ["e.safetensors"]  # no temp file left
    conv = IdentityEmbedding.load(path, dtype=torch.float64)
    assert conv.tokens.dtype == torch.float64
    moved = emb.to(dtype=torch.float16)
    assert moved.tokens.dtype == torch.float16 and emb.tokens.dtype == dtype and moved.face_box == emb.face_box
    assert "num_images=3" in repr(emb)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]


def test_embedding_load_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError, match="not found.*spatialid encode"):
        IdentityEmbedding.load(tmp_path / "none.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        IdentityEmbedding.load(tmp_path / "text.safetensors")
    save_file({"tokens": torch.zeros(1, 2, 3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a spatialid identity embedding"):
        IdentityEmbedding.load(tmp_path / "plain.safetensors")
    meta = {"format": "spatialid.identity_embedding", "format_version": "99"}
    save_file({"tokens": torch.zeros(1, 2, 3)}, str(tmp_path / "v99.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="version '99'"):
        IdentityEmbedding.load(tmp_path / "v99.safetensors")
    meta["format_version"] = "1"
    save_file({"tokens": torch.zeros(1, 2, 3)}, str(tmp_path / "half.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="no 'uncond_tokens'"):
        IdentityEmbedding.load(tmp_path / "half.safetensors")
    save_file({"tokens": torch.zeros(1, 2, 3), "uncond_tokens": torch.zeros(1, 2, 4)},
              str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="differ in shape"):
        IdentityEmbedding.load(tmp_path / "shape.safetensors")


def test_embedding_validates_shapes():
    with pytest.raises(ValueError, match=r"\[1, num_queries, dim\]"):
        IdentityEmbedding(tokens=torch.zeros(4, 8), uncond_tokens=torch.zeros(4, 8))
