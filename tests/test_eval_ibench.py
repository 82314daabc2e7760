"""IBench's metric definitions (typemovie/IBench ibench/metrics/*), checked on small inputs built here.

Every model is a random-weight or fake stand-in; the expected numbers come from the definitions
(cosines, Fréchet distances, means), never from a model's output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from spatialid.errors import ModelFilesMissingError, SpatialIDError


def _noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _solid(rgb: tuple[int, int, int], size: int = 24) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


# --------------------------------------------------------------------------------------- CLIP


def test_clip_inputs_follow_ibench_pipelines():
    from torchvision import transforms as T

    from spatialid.evaluation.clip_metrics import (
        OPENAI_MEAN,
        OPENAI_STD,
        aesthetic_clip_input,
        ibench_clip_input,
    )

    img = _noise(56, 40, 0)
    bicubic = T.InterpolationMode.BICUBIC
    # clipeval.py: ToTensor()*2-1, then Normalize(-1, 2) + clip_preprocess.transforms[:2] + [4:]
    clip_eval = T.Compose([T.Normalize([-1.0] * 3, [2.0] * 3), T.Resize(16, interpolation=bicubic), T.CenterCrop(16),
                           T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    expected = clip_eval(T.ToTensor()(img).unsqueeze(0) * 2.0 - 1.0)[0]
    assert torch.equal(ibench_clip_input(img, 16, antialias=True), expected)
    assert not torch.allclose(ibench_clip_input(img, 16, antialias=False), expected, atol=1e-3)
    # aesthetic.py clip_transform: 0-255 floats, Resize(antialias=False), CenterCrop, /255, Normalize
    raw = torch.from_numpy(np.asarray(img).astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
    aes = T.Compose([T.Resize(16, interpolation=bicubic, antialias=False), T.CenterCrop(16),
                     T.Lambda(lambda x: x.float().div(255.0)), T.Normalize(OPENAI_MEAN, OPENAI_STD)])(raw)[0]
    assert torch.equal(aesthetic_clip_input(img, 16), aes)
    # resizing is linear: both IBench pipelines agree up to float rounding when antialiasing is off
    assert torch.allclose(aesthetic_clip_input(img, 16), ibench_clip_input(img, 16, antialias=False), atol=1e-4)


def test_clip_i_is_the_cosine_of_with_and_without_identity_images():
    from spatialid.evaluation.clip_metrics import ClipScorer

    clip = ClipScorer.tiny()
    a, b = _noise(40, 30, 1), _noise(40, 30, 2)
    assert clip.clip_i([a, b], [a, b]) == pytest.approx([1.0, 1.0], abs=1e-5)
    fa, fb = clip.image_features([a]), clip.image_features([b])
    assert clip.clip_i([a], [b])[0] == pytest.approx(float(fa[0] @ fb[0]), abs=1e-6)
    assert clip.clip_i([a], [b])[0] < 0.9999
    with pytest.raises(SpatialIDError, match="one image without identity per image"):
        clip.clip_i([a, b], [a])


def test_openai_weights_get_quickgelu_and_clip_load_precision(monkeypatch):
    import open_clip

    from spatialid.evaluation.clip_metrics import (
        OPENAI_MEAN,
        ClipScorer,
        resolve_precision,
    )

    tiny = ClipScorer.tiny().model
    seen: dict = {}

    def fake_create(model_name, pretrained=None, **kw):
        seen.clear()
        seen.update(kw, model_name=model_name, pretrained=pretrained)
        return tiny, None, None

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    scorer = ClipScorer.from_open_clip("ViT-L-14", "openai", device="cpu")
    # open_clip 3 builds ViT-L-14 with GELU; OpenAI's weights (clip.load) need QuickGELU
    assert seen["force_quick_gelu"] is True and seen["precision"] == "fp32" and seen["pretrained"] == "openai"
    assert scorer.mean == OPENAI_MEAN and "QuickGELU" in scorer.label and "antialias on" in scorer.label
    ClipScorer.from_open_clip("ViT-L-14", "laion2b_s32b_b82k", device="cpu", antialias=False)
    assert seen["force_quick_gelu"] is False
    assert resolve_precision("auto", "cuda:1") == "fp16" and resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(SpatialIDError, match="precision must be one of"):
        ClipScorer.from_open_clip("ViT-L-14", "openai", precision="fp8")


# -------------------------------------------------------------------------------------- faces


class FakeDetector:
    """insightface's SCRFD.detect contract: (bboxes [N, 5] with the score last, kpss [N, 5, 2])."""

    def __init__(self, faces=None) -> None:
        self.faces = faces  # None: one full-image face when the image is not black
        self.seen: list[np.ndarray] = []

    def detect(self, img, max_num=0, metric="default"):
        assert max_num == 0 and metric == "default"  # FaceAnalysis.get's call
        self.seen.append(img)
        faces = self.faces
        if faces is None:
            h, w = img.shape[:2]
            faces = [((0, 0, w, h), 0.99)] if img.mean() > 5 else []
        boxes = np.array([[*box, score] for box, score in faces], dtype=np.float32).reshape(-1, 5)
        kpss = np.array([[[box[0], box[1]], [box[2], box[3]]] * 2 + [[box[0], box[3]]] for box, _ in faces],
                        dtype=np.float32).reshape(-1, 5, 2)
        return boxes, kpss


class FakeRecognizer:
    """Embedding = the crop's mean colour (so faces of different colours differ)."""

    input_size = (112, 112)

    def get_feat(self, crop):
        return np.asarray(crop, dtype=np.float32).reshape(-1, 3).mean(axis=0)[None]


def fake_align(img, landmark, image_size):
    """norm_crop stand-in: the landmarks' bounding box."""
    x0, y0 = np.floor(landmark.min(axis=0)).astype(int)
    x1, y1 = np.ceil(landmark.max(axis=0)).astype(int)
    return img[y0:y1, x0:x1]


def bgr_imread(path):
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1])


def test_faces0_is_the_highest_score_not_the_largest():
    from spatialid.evaluation.face_metrics import ArcFaceEmbedder, first_face_index

    img = np.zeros((100, 100, 3), np.uint8)
    img[:60, :60] = (10, 20, 200)  # big face region (BGR)
    img[70:90, 70:90] = (200, 20, 10)  # small face region
    big, small = (0, 0, 60, 60), (70, 70, 90, 90)
    emb = ArcFaceEmbedder.from_parts(FakeDetector([(big, 0.6), (small, 0.9)]), FakeRecognizer(), align=fake_align)
    face = emb.analyze_bgr(img)
    assert face.detected and face.box == small and face.score == pytest.approx(0.9)
    assert face.embedding == pytest.approx([200, 20, 10])
    assert first_face_index([0.5, 0.8, 0.8]) == 1 and first_face_index([]) is None
    # no face: None (IBench leaves the item out); the centre fallback is flagged as not detected
    none = ArcFaceEmbedder.from_parts(FakeDetector([]), FakeRecognizer(), align=fake_align)
    assert none.analyze_bgr(img) is None
    none.fallback = "center"
    fb = none.analyze_bgr(img)
    assert fb is not None and not fb.detected and fb.source == "center-fallback"


def test_arcface_reads_files_as_opencv_bgr(tmp_path):
    from spatialid.evaluation.face_metrics import ArcFaceEmbedder

    path = tmp_path / "a.png"
    _solid((250, 10, 10)).save(path)
    det = FakeDetector()
    emb = ArcFaceEmbedder.from_parts(det, FakeRecognizer(), align=fake_align, imread=bgr_imread)
    face = emb.analyze_path(path)
    assert det.seen[0][0, 0].tolist() == [10, 10, 250]  # the detector got BGR, as cv2.imread gives it
    assert face.embedding == pytest.approx([10, 10, 250])
    broken = ArcFaceEmbedder.from_parts(det, FakeRecognizer(), align=fake_align, imread=lambda p: None)
    with pytest.raises(SpatialIDError, match="OpenCV cannot read"):
        broken.analyze_path(path)


def test_arcface_without_the_face_extra_names_it():
    from spatialid.evaluation.face_metrics import ArcFaceEmbedder

    if all(importlib.util.find_spec(m) is not None for m in ("insightface", "onnxruntime", "cv2")):
        pytest.skip("the face extra is installed here")
    with pytest.raises(SpatialIDError, match=r'spatialid\[face\].*--face-model dlib') as err:
        ArcFaceEmbedder()
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------- IQ


class MeanNet(torch.nn.Module):
    """'Quality' = the mean input value: shows exactly which pixel range reaches the network."""

    def forward(self, x):
        return x.mean().reshape(1, 1)


def test_iq_feeds_0_255_values_and_iq01_feeds_0_1():
    import torchvision.transforms.functional as TF

    from spatialid.evaluation.quality import (
        IBENCH_VALUE_RANGE,
        QualityScorer,
        image_tensor,
    )

    img = _solid((10, 20, 30))
    assert torch.equal(image_tensor(img, IBENCH_VALUE_RANGE)[0, :, 0, 0], torch.tensor([10.0, 20.0, 30.0]))
    assert torch.equal(image_tensor(img, 1.0), TF.to_tensor(img).unsqueeze(0))  # pyiqa's loader: ToTensor
    q = QualityScorer(MeanNet(), name="mean", scale=0.01)
    assert q.score([img], value_range=IBENCH_VALUE_RANGE)[0] == pytest.approx(20 / 100)
    assert q.score([img], value_range=1.0)[0] == pytest.approx(20 / 255 / 100)
    assert "/ 100" in q.label


def test_iq01_is_what_pyiqa_computes_and_iq_is_not():
    pyiqa = pytest.importorskip("pyiqa")
    from spatialid.evaluation.quality import (
        IBENCH_VALUE_RANGE,
        image_tensor,
        load_quality,
    )

    q = load_quality("musiq-spaq", random_weights=True)  # pyiqa's MUSIQ architecture, random weights
    assert "RANDOM" in q.label
    reference = pyiqa.create_metric("musiq-spaq", device="cpu", as_loss=False, pretrained=False)
    reference.net.load_state_dict(q.net.state_dict())
    img = _noise(64, 96, 5)
    with torch.no_grad():
        expected = float(reference(image_tensor(img, 1.0))) / 100
    assert q.score([img], value_range=1.0)[0] == pytest.approx(expected, abs=1e-6)
    assert q.score([img], value_range=IBENCH_VALUE_RANGE)[0] != pytest.approx(expected, abs=1e-6)


def test_iq_weights_offline_error_names_file_and_repo():
    from spatialid.evaluation import quality

    try:
        path = quality._musiq_spaq_checkpoint(True)
    except ModelFilesMissingError as exc:
        assert "musiq_spaq_ckpt-358bb6af.pth" in str(exc) and "chaofengc/IQA-PyTorch-Weights" in str(exc)
        assert "--iq-metric none" in str(exc) and "\n" not in str(exc)
    else:
        pytest.skip(f"the checkpoint is cached here ({path})")


# ---------------------------------------------------------------------------------- Aesthetic


def _clip768():
    """A tiny random CLIP whose image embedding has ViT-L/14's width (768), for the real head's shape."""
    import open_clip

    from spatialid.evaluation.clip_metrics import ClipScorer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(embed_dim=768, vision_cfg={"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                               text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
                               quick_gelu=True)
    return ClipScorer(model, open_clip.SimpleTokenizer(), name="tiny 768-d CLIP", random_weights=True)


def test_aesthetic_is_the_linear_head_on_normalised_features_over_ten():
    from spatialid.evaluation.aesthetic import AestheticScorer
    from spatialid.evaluation.clip_metrics import ClipScorer, aesthetic_clip_input

    clip = ClipScorer.tiny()
    aes = AestheticScorer.tiny(clip)
    img = _noise(48, 36, 3)
    feats = torch.nn.functional.normalize(clip.encode_tensors(aesthetic_clip_input(img, clip.image_size)[None]), dim=-1)
    with torch.no_grad():
        expected = float(aes.head(feats)[0, 0]) / 10
    assert aes.score([img])[0] == pytest.approx(expected, abs=1e-6)
    assert aes.random_weights and "RANDOM" in aes.label


def test_aesthetic_head_download_check_and_offline_error(monkeypatch, tmp_path):
    from spatialid.evaluation import aesthetic
    from spatialid.evaluation.clip_metrics import ClipScorer

    clip = _clip768()
    with pytest.raises(ModelFilesMissingError, match=r"sa_0_4_vit_l_14_linear\.pth.*offline.*LAION-AI/aesthetic-predictor") as err:
        aesthetic.load_aesthetic(clip, models_dir=tmp_path, offline=True)
    assert "\n" not in str(err.value)
    with pytest.raises(SpatialIDError, match="768-d"):
        aesthetic.load_aesthetic(ClipScorer.tiny(), models_dir=tmp_path, offline=True)

    head = torch.nn.Linear(768, 1)

    def fake_fetch(spec, folder, cache_dir=None):  # stands in for the download on first use
        assert spec.url == aesthetic.AESTHETIC_HEAD_URL
        target = folder / spec.subdir / spec.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(head.state_dict(), target)
        return target

    monkeypatch.setattr("spatialid.encoder.model_files.fetch", fake_fetch)
    with pytest.raises(SpatialIDError, match="is not LAION's sa_0_4_vit_l_14_linear.pth"):
        aesthetic.load_aesthetic(clip, models_dir=tmp_path, offline=False)
    file = tmp_path / "laion-aesthetic" / "sa_0_4_vit_l_14_linear.pth"
    monkeypatch.setattr(aesthetic, "AESTHETIC_HEAD_SHA256", hashlib.sha256(file.read_bytes()).hexdigest())
    scorer = aesthetic.load_aesthetic(clip, models_dir=tmp_path, offline=True)  # now found locally
    assert torch.equal(scorer.head.weight.detach().cpu(), head.weight.detach())
    img = _noise(30, 30, 4)
    f = torch.nn.functional.normalize(clip.encode_tensors(aesthetic.aesthetic_clip_input(img, 16)[None]), dim=-1)
    with torch.no_grad():
        assert scorer.score([img])[0] == pytest.approx(float(head(f)[0, 0]) / 10, abs=1e-6)


# ---------------------------------------------------------------------------------------- FID


def test_frechet_distance_matches_closed_forms():
    from spatialid.evaluation.fid import fid_from_features, frechet_distance

    a = np.random.default_rng(0).normal(size=(300, 4))
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0.5, 0.0])  # same covariance: FID = |mean shift|^2
    assert fid_from_features(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    closed = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-9)
    assert math.isnan(fid_from_features(a[:1], a))
    with pytest.raises(SpatialIDError, match="same D"):
        fid_from_features(a, a[:, :3])


def test_fid_of_image_sets_and_ibench_file_names(tmp_path):
    from spatialid.evaluation.fid import (
        FidExtractor,
        fid_from_features,
        ibench_fid_files,
    )

    ext = FidExtractor.tiny()
    imgs = [_noise(24, 32, i) for i in range(6)]
    feats = ext.features(imgs)
    assert feats.shape == (6, 16) and feats.dtype == np.float32
    self_distance = fid_from_features(feats, feats)
    assert self_distance == pytest.approx(0.0, abs=1e-4)
    flat = ext.features([_solid((40 * i, 200, 255 - 30 * i), 32) for i in range(6)])
    assert fid_from_features(feats, flat) > 100 * max(abs(self_distance), 1e-6)
    assert ext.random_weights and "RANDOM" in ext.label
    # IBench copies each set into one folder by file name: a repeated name keeps the last copied
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / "y.png"]
    assert ibench_fid_files(paths) == [tmp_path / "b" / "x.png", tmp_path / "a" / "y.png"]


def test_real_fid_is_pytorch_fids_inception(monkeypatch):
    inception = pytest.importorskip("pytorch_fid.inception")
    import torchvision

    from spatialid.evaluation.fid import FidExtractor

    # no download here: the weights file is replaced by the architecture's own random initialisation
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(torchvision.models.Inception3, "load_state_dict", lambda self, sd, *a, **k: None)
    ext = FidExtractor.real(offline=False)
    assert ext.dims == 2048 and "pytorch-fid" in ext.label
    feats = ext.features([_noise(40, 56, 0), _noise(80, 64, 1)])  # any size: resized to 299 inside
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()


def test_real_fid_needs_pytorch_fid():
    from spatialid.evaluation.fid import FidExtractor

    if importlib.util.find_spec("pytorch_fid") is not None:
        pytest.skip("pytorch-fid installed here")
    with pytest.raises(SpatialIDError, match="pip install pytorch-fid"):
        FidExtractor.real()


# ------------------------------------------------------------------- IBench JSON + evaluation


@pytest.fixture
def ibench_run(tmp_path):
    """An IBench results file of another method: 3 items, one generated image without a face."""
    root = tmp_path / "run"
    (root / "img").mkdir(parents=True)
    colours = {
        "photo": (200, 30, 30),
        "w0": (190, 40, 20), "w1": (20, 200, 40), "w2": (0, 0, 0),  # w2: no face detected
        "o0": (30, 30, 200), "o1": (0, 0, 0), "o2": (200, 30, 30),  # o1: no face detected
    }
    for name, rgb in colours.items():
        _solid(rgb).save(root / "img" / f"{name}.png")
    datas = [
        {"num": i, "id": str(root / "img" / "photo.png"), "prompt": f"a photo of a woman {i}", "prompt_attr": [],
         "prompt_style": [], "imagewithid": f"img/w{i}.png", "imagewithoutid": f"img/o{i}.png", "extra": "kept"}
        for i in range(3)
    ]
    path = root / "method_x.json"
    path.write_text(json.dumps({"datas": datas, "tags": {"category": "imageid"}}))
    return path, colours


def _cos(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_facesim_leaves_faceless_images_out_of_the_mean_but_counts_them_in_detection(ibench_run, tmp_path, monkeypatch):
    from spatialid.evaluation.clip_metrics import ClipScorer
    from spatialid.evaluation.face_metrics import ArcFaceEmbedder
    from spatialid.evaluation.fid import FidExtractor
    from spatialid.evaluation.quality import QualityScorer

    ev = importlib.import_module("spatialid.evaluation.evaluate")  # the module (the package exports a function of that name)
    path, c = ibench_run
    face = ArcFaceEmbedder.from_parts(FakeDetector(), FakeRecognizer(), align=fake_align, imread=bgr_imread)
    models = ev.MetricModels(clip=ClipScorer.tiny(), face=face, quality=QualityScorer(MeanNet(), name="mean", scale=0.01),
                             fid=FidExtractor.tiny())
    data, _ = ev.evaluate([path], models, tmp_path / "report", progress=False, plots=False)
    s = data.summaries["method_x"]
    ref = c["photo"]
    assert s["face_det"].count == 3 and s["face_det"].mean == pytest.approx(2 / 3)
    assert s["face_sim"].count == 2 and s["face_sim"].mean == pytest.approx((_cos(c["w0"], ref) + _cos(c["w1"], ref)) / 2)
    assert s["anti_face_sim"].count == 2 and s["anti_face_sim"].mean == pytest.approx((_cos(c["o0"], ref) + 1.0) / 2)
    rows = sorted(data.per_image, key=lambda r: r["image"])
    assert math.isnan(rows[2]["face_sim"]) and rows[2]["face_det"] == 0.0 and rows[2]["face_source"] == "none"
    # IQ: the network saw 0-255 values (IBench); IQ-01 the same image in [0, 1]
    assert rows[1]["iq"] == pytest.approx(np.mean(c["w1"]) / 100) and rows[1]["iq_01"] == pytest.approx(np.mean(c["w1"]) / 255 / 100)
    assert s["clip_i"].count == 3 and s["fid"].count == 3 and math.isfinite(s["fid"].mean)
    assert "bg_mae" not in [m.key for m in data.metrics]  # an IBench file says nothing about seeds
    assert (tmp_path / "report" / "fid_features.npz").is_file()

    # a second run reuses per-image rows and FID features
    monkeypatch.setattr(ev._Scorer, "score", lambda self, item: pytest.fail("rows must come from the cache"))
    monkeypatch.setattr(models.fid, "features", lambda images: pytest.fail("FID features must come from the cache"))
    again, _ = ev.evaluate([path], models, tmp_path / "report", progress=False, plots=False)
    assert again.summaries["method_x"]["fid"].mean == pytest.approx(s["fid"].mean)


def test_ibench_json_sources_resolve_and_reject_bad_input(ibench_run, tmp_path):
    from spatialid.evaluation.evaluate import BenchStateError, collect_items

    path, _ = ibench_run
    items, order, _ = collect_items([path])
    assert order == ["method_x"] and [it.image.name for it in items] == ["w0.png", "w1.png", "w2.png"]
    assert [it.without_id.name for it in items] == ["o0.png", "o1.png", "o2.png"] and all(it.baseline is None for it in items)

    doc = json.loads(path.read_text())
    # paths of the machine that made the file: found under --image-root by their trailing parts
    moved = tmp_path / "moved.json"
    for e in doc["datas"]:
        e["imagewithid"] = "/home/someone/run/" + e["imagewithid"]
    moved.write_text(json.dumps(doc))
    with pytest.raises(BenchStateError, match="images are missing.*--image-root"):
        collect_items([moved])
    assert collect_items([moved], image_root=str(path.parent))[0][0].image == (path.parent / "img" / "w0.png").resolve()

    cases = [
        ({"datas": doc["datas"], "tags": {"category": "t2i"}}, "category 't2i'"),
        ({"datas": [{"id": doc["datas"][0]["id"], "imagewithid": "https://x.org/a.png"}]}, "is a URL"),
        ({"datas": [{"id": doc["datas"][0]["id"], "prompt": "p"}]}, "has no imagewithid"),
        ({"rows": []}, "does not hold IBench results"),
    ]
    for i, (content, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(BenchStateError, match=message):
            collect_items([bad])


def test_cli_scores_an_ibench_json_with_tiny_models(ibench_run, capsys):
    from spatialid.cli.main import main

    path, _ = ibench_run
    assert main(["eval", str(path), "--model", "tiny", "--no-progress", "--no-plots"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| Preset"))
    for title in ("CLIP-T", "CLIP-I", "CLIP-ref", "FaceSim", "Face det.", "AntiFaceSim", "IQ ↑", "IQ-01", "Aesthetic", "FID"):
        assert title in header
    assert "| method_x |" in out and "paper" not in out  # not a preset of the paper's table
    doc = json.loads((path.parent / "report" / "report.json").read_text())
    assert doc["random_weights"] and doc["paper"] is None


# ------------------------------------------------------------------------------- paper block


def test_paper_block_quotes_the_paper_beside_the_run():
    from spatialid.evaluation.paper import PAPER_ROWS, paper_rows_for
    from spatialid.evaluation.report import METRICS, ReportData, markdown_report
    from spatialid.evaluation.stats import summarize

    assert PAPER_ROWS["relaxed"].values == {"iq": 0.523, "clip_i": 0.827, "clip_t": 0.281, "face_sim": 0.533}
    assert list(paper_rows_for(["none", "relaxed", "paper", "pulid"])) == ["relaxed", "pulid"]
    metrics = [m for m in METRICS if m.key in ("clip_t", "clip_i", "iq")]
    summaries = {p: {m.key: summarize([0.25, 0.35]) for m in metrics} for p in ("relaxed", "pulid")}
    data = ReportData(sources=["x"], presets=["relaxed", "pulid"], metrics=metrics, summaries=summaries, models={},
                      random_weights=False, paper=paper_rows_for(["relaxed", "pulid"]))
    md = markdown_report(data)
    assert "| relaxed | **paper** (SpatialID), quoted | 0.523 | 0.827 | 0.281 | 0.533 |" in md
    assert "| relaxed | this run | 0.300 ± 0.635 | 0.300 ± 0.635 | 0.300 ± 0.635 | n/a |" in md
    rows = data.to_json()["paper"]["rows"]
    assert rows["relaxed"]["run"] == {"iq": 0.3, "clip_i": 0.3, "clip_t": 0.3, "face_sim": None}
    assert rows["pulid"]["paper_row"] == "PuLID (Krea)"
