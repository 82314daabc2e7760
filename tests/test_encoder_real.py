"""The real (PuLID-FLUX) encoder path without its optional packages or weights.

insightface / facexlib are an optional extra and their weights cannot be downloaded here, so the
orchestration is tested with stand-ins that behave like them (same methods, known outputs): which
face is used, PuLID's ArcFace-on-aligned-crop fallback, the dlib alignment fallback, the file
lookup and the "missing files" error, and a full ``from_pretrained`` build on reduced weights.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from spatialid.encoder import model_files as mf
from spatialid.encoder.eva_clip import EvaVisionConfig, EvaVisionTower
from spatialid.encoder.face_dlib import FaceDetection, shared_dlib_analyzer
from spatialid.encoder.face_facexlib import box_iou, load_pth_weights_only
from spatialid.encoder.face_insightface import require_face_extra
from spatialid.encoder.identity_encoder import IdentityEncoder, _PuLIDStack
from spatialid.errors import CheckpointError, FaceNotFoundError, ModelFilesMissingError, SpatialIDError

SMALL_EVA = EvaVisionConfig(image_size=56, width=32, depth=21, heads=2, output_dim=16, rope_ref_grid=4)


class FakeArcFace:
    """Behaves like InsightFaceArcFace: detect() largest first, embed() per face, embed_aligned()."""

    id_dim = 512
    name = "fake-insightface"

    def __init__(self, faces):
        self.faces = faces
        self.calls = []

    def detect(self, rgb):
        return list(self.faces)

    def embed(self, rgb, face):
        self.calls.append(("embed", face.box))
        return np.full(512, face.box[0], np.float32)

    def embed_aligned(self, aligned):
        self.calls.append(("aligned", aligned.shape))
        return np.full(512, -1.0, np.float32)


class FakeFacexlib:
    """Behaves like FacexlibFace (detect, align, parse) on top of dlib alignment."""

    name = "fake-facexlib"

    def __init__(self, faces):
        self.faces = faces
        self.dlib = shared_dlib_analyzer(False)
        self.parsed = 0

    def detect(self, rgb):
        return list(self.faces)

    def align(self, rgb, face, size=512):
        return np.full((size, size, 3), int(face.box[0]) % 256, np.uint8), np.eye(2, 3)

    def parse(self, face01):
        self.parsed += 1
        return torch.ones(1, 1, 512, 512, dtype=torch.long)


def _face(x0, y0, side, score=0.9):
    pts = np.array([[x0 + 0.3 * side, y0 + 0.4 * side], [x0 + 0.7 * side, y0 + 0.4 * side],
                    [x0 + 0.5 * side, y0 + 0.6 * side], [x0 + 0.35 * side, y0 + 0.8 * side],
                    [x0 + 0.65 * side, y0 + 0.8 * side]])
    return FaceDetection(box=(x0, y0, x0 + side, y0 + side), score=score, landmarks5=pts)


IMG = np.zeros((400, 600, 3), np.uint8)


def test_largest_identity_face_and_centre_alignment_face(caplog):
    """PuLID-FLUX: ArcFace of insightface's largest face, facexlib's face nearest the photo centre."""
    big, small = _face(400, 250, 150), _face(245, 150, 85)
    arc = FakeArcFace([small, big])
    # facexlib sees the same two people; the small one's box centre (285, 195) is nearest (300, 200)
    fx = FakeFacexlib([_face(402, 248, 146), _face(240, 150, 90)])
    with caplog.at_level(logging.WARNING, logger="spatialid.encoder.identity_encoder"):
        res = _PuLIDStack(arc, fx, None, 64).analyze(IMG, "photo")
    assert res.box == big.box and res.num_faces == 2
    assert arc.calls == [("embed", big.box)] and (res.id_vector == 400).all()
    assert res.aligned[0, 0, 0] == 240  # the centre-most facexlib face was aligned
    assert fx.parsed == 1 and res.notes == ["identity_and_aligned_faces_differ"]
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "several faces in photo" in msg and "largest of 2 (fake-insightface)" in msg and "different faces" in msg


def test_same_face_for_identity_and_alignment_is_quiet(caplog):
    face = _face(250, 150, 100)
    with caplog.at_level(logging.WARNING, logger="spatialid.encoder.identity_encoder"):
        res = _PuLIDStack(FakeArcFace([face]), FakeFacexlib([_face(255, 145, 96)]), None, 64).analyze(IMG, "photo")
    assert res.box == face.box and res.notes == [] and res.aligned[0, 0, 0] == 255
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_arcface_on_aligned_crop_when_insightface_finds_nothing(caplog):
    arc = FakeArcFace([])
    fx = FakeFacexlib([_face(100, 100, 120)])
    with caplog.at_level(logging.INFO, logger="spatialid.encoder.identity_encoder"):
        res = _PuLIDStack(arc, fx, None, 64).analyze(IMG, "photo")
    assert arc.calls == [("aligned", (512, 512, 3))] and (res.id_vector == -1).all()
    assert res.notes == ["arcface_on_aligned_crop"]
    assert any("ArcFace runs on the aligned crop" in r.getMessage() for r in caplog.records)


def test_no_face_errors():
    with pytest.raises(FaceNotFoundError, match="no face found in photo"):
        _PuLIDStack(FakeArcFace([]), FakeFacexlib([]), None, 64).analyze(IMG, "photo")
    with pytest.raises(FaceNotFoundError, match="alignment detector"):
        _PuLIDStack(FakeArcFace([_face(0, 0, 100)]), FakeFacexlib([]), None, 64).analyze(IMG, "photo")


def test_small_faces_are_used_with_one_warning(caplog):
    """PuLID refuses no face: under min_face_size it is encoded, with one warning naming photo and size."""
    with caplog.at_level(logging.WARNING, logger="spatialid.encoder.identity_encoder"):
        stack = _PuLIDStack(FakeArcFace([_face(0, 0, 40)]), FakeFacexlib([_face(1, 1, 38)]), None, 64)
        res = stack.analyze(IMG, "a.jpg")
    assert (res.id_vector == 0).all() and res.notes == ["small_face"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "a.jpg" in warnings[0] and "40x40 px" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialid.encoder.identity_encoder"):
        res = _PuLIDStack(FakeArcFace([]), FakeFacexlib([_face(0, 0, 40)]), None, 64).analyze(IMG, "b.jpg")
    assert res.notes == ["small_face", "arcface_on_aligned_crop"] and (res.id_vector == -1).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "b.jpg" in warnings[0] and "40x40 px" in warnings[0]


def test_dlib_alignment_fallback_on_astronaut():
    img = data.astronaut()
    dl = shared_dlib_analyzer(False)
    face = dl.detect(img)[0]
    arc = FakeArcFace([face])
    res = _PuLIDStack(arc, None, dl, 64).analyze(img, "astronaut")
    assert res.aligned.shape == (512, 512, 3) and res.labels.float().mean() < 0.7
    assert res.box == face.box and arc.calls == [("embed", face.box)]


def test_dlib_alignment_fallback_uses_the_cnn_for_a_turned_face():
    """HOG finds no face in the turned astronaut; the CNN fallback does, and ArcFace (none found by
    insightface here) runs on the aligned crop: the identity is not lost."""
    crop = Image.fromarray(data.astronaut()).crop((70, 0, 370, 300))
    img = np.ascontiguousarray(np.asarray(
        crop.rotate(50, resample=Image.BICUBIC, fillcolor=(255, 255, 255)).resize((200, 200), Image.BICUBIC)))
    arc = FakeArcFace([])
    res = _PuLIDStack(arc, None, shared_dlib_analyzer(False), 64).analyze(img, "turned")
    assert arc.calls == [("aligned", (512, 512, 3))] and res.notes == ["arcface_on_aligned_crop"]
    assert 30 < res.box[0] < 70 and 100 < res.box[2] < 140 and res.aligned.shape == (512, 512, 3)


def test_dlib_alignment_fallback_follows_pulid_on_two_astronauts():
    canvas = np.full((512, 1000, 3), 255, np.uint8)
    canvas[:, :512] = data.astronaut()
    canvas[132:512, 512:892] = np.asarray(Image.fromarray(data.astronaut()).resize((380, 380), Image.BICUBIC))
    dl = shared_dlib_analyzer(False)
    faces = dl.detect(canvas)
    assert len(faces) == 2
    big = max(faces, key=lambda f: f.area)
    arc = FakeArcFace(faces)
    res = _PuLIDStack(arc, None, dl, 64).analyze(canvas, "two")
    assert arc.calls == [("embed", big.box)] and res.box == big.box
    assert res.notes == ["identity_and_aligned_faces_differ"]
    assert (np.asarray(res.landmarks5)[:, 0] > 600).all()  # aligned: the smaller astronaut, nearer the centre


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_pth_loader_is_weights_only(tmp_path):
    torch.save({"module.conv.weight": torch.ones(2)}, tmp_path / "ok.pth")
    assert list(load_pth_weights_only(tmp_path / "ok.pth")) == ["conv.weight"]
    torch.save({"w": torch.ones(1), "cfg": Path("/x")}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError, match="tensors-only"):
        load_pth_weights_only(tmp_path / "obj.pth")


def test_missing_face_extra_message():
    with pytest.raises(SpatialIDError, match=r'pip install "spatialid\[face\]"'):
        require_face_extra("surely_not_an_installed_module_xyz")


@pytest.mark.skipif(importlib.util.find_spec("insightface") is not None, reason="insightface is installed")
def test_from_pretrained_without_face_extra(tmp_path):
    with pytest.raises(SpatialIDError, match=r"needs the Python package 'insightface'.*spatialid\[face\]"):
        IdentityEncoder.from_pretrained(models_dir=tmp_path, local_files_only=True)


@pytest.fixture
def face_extra_present(monkeypatch):
    """Pretend insightface/onnxruntime are installed (their classes are replaced where used)."""
    import spatialid.encoder.face_insightface as fi

    monkeypatch.setattr(fi, "require_face_extra", lambda module: None)


def test_missing_files_listed_with_sources_offline(tmp_path, face_extra_present, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelFilesMissingError) as info:
        IdentityEncoder.from_pretrained(models_dir=tmp_path / "models", local_files_only=True, face_backend="dlib")
    msg = str(info.value)
    assert "\n" not in msg and "offline" in msg
    for needed in ("antelopev2/scrfd_10g_bnkps.onnx", "antelopev2/glintr100.onnx", "DIAMONIK7777/antelopev2",
                   "eva-clip/open_clip_model.safetensors", "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k",
                   "guozinan/PuLID", "pulid_flux_v0.9.1.safetensors", str(tmp_path / "models" / "antelopev2")):
        assert needed in msg, needed


def test_facexlib_files_named_when_required(tmp_path, face_extra_present, monkeypatch):
    import spatialid.encoder.identity_encoder as ie

    monkeypatch.setattr(ie, "_has_module", lambda name: True)
    with pytest.raises(ModelFilesMissingError) as info:
        IdentityEncoder.from_pretrained(models_dir=tmp_path, local_files_only=True, face_backend="facexlib")
    msg = str(info.value)
    assert "facexlib/detection_Resnet50_Final.pth" in msg and "facexlib/parsing_bisenet.pth" in msg
    assert "github.com/xinntao/facexlib/releases" in msg


def test_find_local_layout(tmp_path):
    target = tmp_path / "antelopev2" / "glintr100.onnx"
    target.parent.mkdir()
    target.write_bytes(b"x")
    assert mf.find_local(mf.ANTELOPE_RECOGNIZER, tmp_path) == target
    assert mf.find_local(mf.ANTELOPE_RECOGNIZER, tmp_path / "elsewhere", override=target.parent) == target
    assert mf.find_local(mf.ANTELOPE_DETECTOR, tmp_path, override=tmp_path / "nothing") is None
    assert mf.offline_mode(True) and not mf.offline_mode(False)


def test_from_pretrained_full_build_with_reduced_weights(tmp_path, face_extra_present, monkeypatch, caplog):
    """Every file in the documented layout (EVA reduced in size); insightface replaced by a stand-in."""
    import spatialid.encoder.face_insightface as fi
    from spatialid.models.idformer import IDFormer

    models = tmp_path / "models"
    (models / "antelopev2").mkdir(parents=True)
    for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx"):
        (models / "antelopev2" / name).write_bytes(b"onnx")
    torch.manual_seed(0)
    eva = EvaVisionTower(SMALL_EVA)
    (models / "eva-clip").mkdir()
    save_file({"visual.trunk." + k: v.half() for k, v in eva.model.state_dict().items()},
              str(models / "eva-clip" / "open_clip_model.safetensors"))

    built = {}

    class StandInArcFace(FakeArcFace):
        def __init__(self, det, rec, device=None):
            built["paths"] = (Path(det).name, Path(rec).name, device)
            self.dlib = shared_dlib_analyzer(False)
            super().__init__([])

        def detect(self, rgb):
            return self.dlib.detect(rgb)

    monkeypatch.setattr(fi, "InsightFaceArcFace", StandInArcFace)
    idformer = IDFormer(dim=32, depth=5, dim_head=8, heads=2, num_id_token=2, num_queries=4, output_dim=32,
                        ff_mult=2, id_cond_dim=512 + SMALL_EVA.output_dim, vit_dim=SMALL_EVA.width)
    with caplog.at_level(logging.WARNING):
        enc = IdentityEncoder.from_pretrained(idformer, models_dir=models, local_files_only=True,
                                              face_backend="dlib", eva_config=SMALL_EVA)
    assert built["paths"] == ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "cpu")
    assert any("dlib face path" in r.getMessage() for r in caplog.records)
    emb = enc.encode(data.astronaut())
    assert emb.tokens.shape == (1, 4, 32) and emb.metadata["encoder"] == "pulid-flux"
    assert emb.metadata["face_backend"] == "insightface+dlib" and emb.metadata["eva"] == "open_clip_model.safetensors"
    x0, y0, x1, y1 = emb.face_box
    assert 160 < x0 < 190 and 65 < y0 < 90
    with pytest.raises(FaceNotFoundError):
        enc.encode(data.coffee())


@pytest.mark.skipif(importlib.util.find_spec("facexlib") is None or importlib.util.find_spec("cv2") is None,
                    reason="facexlib (spatialid[face]) not installed")
def test_facexlib_networks_load_weights_only_and_run(tmp_path):  # pragma: no cover - optional extra
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.bisenet import BiSeNet

    from spatialid.encoder.face_facexlib import FacexlibFace

    torch.manual_seed(0)
    torch.save(RetinaFace(network_name="resnet50", half=False, device="cpu").state_dict(), tmp_path / "det.pth")
    torch.save(BiSeNet(num_class=19).state_dict(), tmp_path / "parse.pth")
    fx = FacexlibFace(tmp_path / "det.pth", tmp_path / "parse.pth", device="cpu")
    assert isinstance(fx.detect(data.astronaut()), list)  # random weights: any number of faces
    face = _face(175, 76, 91)
    aligned, m = fx.align(data.astronaut(), face)
    assert aligned.shape == (512, 512, 3) and m.shape == (2, 3)
    labels = fx.parse(torch.rand(1, 3, 512, 512))
    assert labels.shape == (1, 1, 512, 512) and labels.dtype == torch.long and int(labels.max()) < 19
