"""Evaluation: statistics, metric models (tiny / offline), contamination, report files."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialid.bench.datasets import load_identities, load_prompts
from spatialid.bench.grid import build_grid
from spatialid.bench.results import update_manifest
from spatialid.bench.runner import BenchSettings, run_bench
from spatialid.bench.samples import hash_encoder
from spatialid.errors import ModelFilesMissingError, SpatialIDError
from spatialid.evaluation.contamination import (
    apply_mask,
    background_change,
    face_region_mask,
)
from spatialid.evaluation.stats import paired_difference, summarize
from spatialid.pipeline.settings import GenerationSettings

SIZE = 160


# ------------------------------------------------------------------------------------ stats


def test_summary_matches_student_t():
    s = summarize([1, 2, 3, 4, float("nan"), None])
    assert s.count == 4 and s.mean == 2.5
    assert s.std == pytest.approx(1.2909944, rel=1e-6)
    # t(0.975, 3) = 3.182446
    assert s.half_width == pytest.approx(3.182446 * 1.2909944 / 2, rel=1e-5)
    assert summarize([]).count == 0 and math.isnan(summarize([]).mean)
    one = summarize([0.3])
    assert one.mean == 0.3 and math.isnan(one.ci_low) and one.to_dict()["ci_low"] is None
    d = paired_difference({"a": 1.0, "b": 2.0, "c": 5.0}, {"a": 0.5, "b": 1.0, "x": 9.0})
    assert d.count == 2 and d.mean == pytest.approx(0.75)


# ------------------------------------------------------------------------------ contamination


def test_face_region_mask_geometry():
    mask = face_region_mask(100, 100, [(40, 40, 60, 60)], scale=1.0)
    assert mask[48, 50] and not mask[0, 0] and not mask[99, 99]
    assert not mask[50, 28] and mask[50, 41]  # horizontal semi-axis = 10 px
    union = face_region_mask(100, 100, [(10, 10, 20, 20), (70, 70, 90, 90)], scale=1.0)
    assert union[14, 15] and union[78, 80] and not union[50, 50]
    assert face_region_mask(10, 10, []).sum() == 0


def test_background_change_counts_only_outside_the_face():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, (64, 64, 3), dtype=np.uint8)
    mask = face_region_mask(64, 64, [(24, 20, 40, 36)])
    inside = base.copy()
    inside[mask] = 255  # identity changed the face only
    outside = base.copy()
    outside[~mask] += 51  # and here the whole background moved by 0.2
    a, b, c = (Image.fromarray(x) for x in (base, inside, outside))
    assert background_change(b, a, mask)["bg_mae"] == 0.0
    assert background_change(c, a, mask)["bg_mae"] == pytest.approx(0.2, abs=1e-6)
    r = background_change(a, a, np.ones((64, 64), bool))
    assert r["bg_fraction"] == 0 and math.isnan(r["bg_mae"])
    grey = np.asarray(apply_mask(b, mask))
    assert (grey[mask] == 128).all() and (grey[~mask] == base[~mask]).all()
    with pytest.raises(SpatialIDError, match="sizes differ"):
        background_change(a, a.resize((32, 32)), mask)


def test_lpips_random_backbone_map():
    pytest.importorskip("lpips")
    from spatialid.evaluation.contamination import LpipsDistance

    lp = LpipsDistance(random_backbone=True)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    other = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    assert lp.distance_map(img, img).shape == (48, 48)
    assert float(np.abs(lp.distance_map(img, img)).max()) < 1e-6
    assert lp.distance_map(img, other).mean() > 0
    assert "RANDOM" in lp.label


# ------------------------------------------------------------------------------------- CLIP


def test_tiny_clip_is_offline_deterministic_and_normalised():
    from spatialid.evaluation.clip_metrics import ClipScorer

    a, b = ClipScorer.tiny(), ClipScorer.tiny()
    imgs = [Image.new("RGB", (40, 40), (200, 10, 10)), Image.new("RGB", (64, 48), (10, 10, 200))]
    fa, fb = a.image_features(imgs), b.image_features(imgs)
    assert fa.shape == (2, 32) and np.allclose(fa, fb)
    assert np.allclose(np.linalg.norm(fa.numpy(), axis=1), 1, atol=1e-5)
    t = a.text_features(["a photo of a woman", "an oil painting of a man"])
    assert t.shape == (2, 32) and not np.allclose(t[0], t[1])
    ct = a.clip_t(imgs, ["a", "b"])
    assert ct.shape == (2,) and np.all(np.abs(ct) <= 1)
    assert a.clip_i(imgs, imgs) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert a.random_weights and "RANDOM" in a.label


def test_real_clip_offline_error_names_model(monkeypatch):
    from spatialid.evaluation.clip_metrics import ClipScorer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesMissingError, match=r"ViT-L-14/openai.*timm/vit_large_patch14_clip_224\.openai"):
        ClipScorer.from_open_clip("ViT-L-14", "openai")
    with pytest.raises(SpatialIDError, match="unknown open_clip model"):
        ClipScorer.from_open_clip("ViT-Q-99", "openai")
    with pytest.raises(SpatialIDError, match="no pretrained tag 'nope'"):
        ClipScorer.from_open_clip("ViT-L-14", "nope")


# ------------------------------------------------------------------------------ faces / IQ


@pytest.fixture(scope="module")
def sample_dir(bench_inputs):
    """The sample bench inputs (ids.json, prompts.json, photos/), shared with the session (conftest): read-only."""
    return bench_inputs[0]


def test_dlib_facesim_on_real_photos_and_fallback(sample_dir):
    from spatialid.evaluation.face_metrics import DlibFaceEmbedder, cosine

    emb = DlibFaceEmbedder()
    a = emb.analyze(np.asarray(Image.open(sample_dir / "photos" / "astronaut.png").convert("RGB")))
    b = emb.analyze(np.asarray(Image.open(sample_dir / "photos" / "astronaut_mirror.png").convert("RGB")))
    assert a.detected and b.detected and a.embedding.shape == (128,)
    assert 170 < a.box[0] < 180 and 70 < a.box[1] < 85  # the face, not the mission patch
    assert cosine(a.embedding, b.embedding) > 0.9  # the same person, mirrored
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert emb.analyze(noise) is None
    fb = DlibFaceEmbedder(fallback="center").analyze(noise)
    assert fb is not None and not fb.detected and fb.source == "center-fallback" and fb.embedding.shape == (128,)
    assert math.isnan(cosine(None, a.embedding))


def test_arcface_without_insightface_says_what_to_do():
    import importlib.util

    if importlib.util.find_spec("insightface") is not None:
        pytest.skip("insightface installed here")
    from spatialid.evaluation.face_metrics import load_face_embedder

    with pytest.raises(SpatialIDError, match=r"insightface.*--face-model dlib"):
        load_face_embedder("arcface")
    with pytest.raises(SpatialIDError, match="unknown face model"):
        load_face_embedder("vgg")


def test_quality_backends(monkeypatch):
    from spatialid.evaluation import quality

    monkeypatch.setattr(quality, "_pyiqa_available", lambda: False)
    assert quality.load_quality("none") is None
    stand_in = quality.load_quality("musiq-spaq", random_weights=True)
    assert stand_in.random_weights and "RANDOM" in stand_in.label and "musiq-spaq" in stand_in.label
    imgs = [Image.new("RGB", (32, 32), (i * 60, 0, 0)) for i in range(3)]
    scores = stand_in.score(imgs)
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))
    with pytest.raises(SpatialIDError, match=r"needs pyiqa.*--iq-metric none"):
        quality.load_quality("musiq-spaq")


# --------------------------------------------------------------------------- full evaluation


class PhotoGenerator:
    """Fake generator with known contamination: the identity's face pasted over a baseline.

    Baseline: a fixed noise picture per (prompt, seed). ``paper`` pastes the face region only;
    ``pulid`` pastes the face and also brightens the whole background, i.e. contaminates it.
    """

    def __init__(self, size: int = SIZE) -> None:
        from spatialid.evaluation.face_metrics import DlibFaceEmbedder

        self.size = size
        self.faces = DlibFaceEmbedder()
        self._portraits: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def portrait(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """The photo cropped around its face (face ~45% of the side) and that face's region mask."""
        if path not in self._portraits:
            photo = Image.open(path).convert("RGB")
            x0, y0, x1, y1 = self.faces.analyze(np.asarray(photo)).box
            cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, 1.1 * (x1 - x0)
            crop = np.asarray(photo.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half))).resize((self.size, self.size)))
            box = self.faces.analyze(crop).box
            self._portraits[path] = (crop, face_region_mask(self.size, self.size, [box]))
        return self._portraits[path]

    def __call__(self, item, embedding) -> Image.Image:
        seed = int.from_bytes(f"{item.prompt_text}|{item.seed}".encode()[:8].ljust(8, b"."), "little")
        base = np.random.default_rng(seed).integers(40, 200, (self.size, self.size, 3), dtype=np.uint8)
        if item.is_baseline:
            return Image.fromarray(base)
        photo, mask = self.portrait(item.identity.path)
        out = base.copy()
        out[mask] = photo[mask]
        if item.preset == "pulid":
            out[~mask] = np.clip(out[~mask].astype(int) + 40, 0, 255).astype(np.uint8)
        return Image.fromarray(out)


@pytest.fixture(scope="module")
def fake_bench(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("bench")
    identities = load_identities(sample_dir / "ids.json")
    prompts = load_prompts(sample_dir / "prompts.json", limit=2)
    settings = BenchSettings(model="fake", generation=GenerationSettings(steps=1, width=SIZE, height=SIZE))
    update_manifest(out, settings=settings.to_dict(), identities=identities, prompts=prompts, presets=["pulid", "paper"], seeds=[1], baseline=True)
    items = build_grid(identities, prompts, ["pulid", "paper"], [1])
    run_bench(items, out, settings=settings, generate_fn=PhotoGenerator(), encode_fn=hash_encoder, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_models():
    from spatialid.evaluation.evaluate import MetricModels

    return MetricModels.tiny()


ALL_KEYS = ["clip_t", "clip_i", "clip_ref", "face_sim", "face_det", "anti_face_sim", "count_acc", "sim_ref", "id_conf",
            "landmark_diff", "pose_div_yaw", "pose_div_pitch", "pose_div_roll", "expr_div",
            "iq", "iq_01", "aesthetic", "fid", "bg_lpips", "bg_clip_dist", "bg_mae", "bg_clip_t"]


def test_evaluate_writes_every_metric_and_measures_contamination(fake_bench, tiny_models, tmp_path):
    from spatialid.evaluation.evaluate import evaluate

    data, files = evaluate([fake_bench], tiny_models, tmp_path / "report", progress=False)
    keys = [m.key for m in data.metrics]
    assert keys == ALL_KEYS or ("bg_lpips" not in keys and keys == [k for k in ALL_KEYS if k != "bg_lpips"])
    assert data.presets == ["none", "pulid", "paper"]
    s = data.summaries
    # IBench's pair metrics need an image without identity: none for the baseline preset itself
    for key in ("clip_i", "anti_face_sim", "fid"):
        assert s["none"][key].count == 0 and s["paper"][key].count == 4
    assert s["paper"]["fid"].std != s["paper"]["fid"].std  # one number per preset: no spread, no interval
    assert set(data.paired["paper"]) == {k for k in keys if k not in ("fid", "anti_face_sim")}
    # faces are real photos here: detected in every identity image, FaceSim high
    assert s["paper"]["face_det"].mean == 1.0 and s["paper"]["face_sim"].mean > 0.9
    # contamination: paper pastes the face only, pulid also shifts the background by 40/255
    assert s["paper"]["bg_mae"].mean < 0.01 < s["pulid"]["bg_mae"].mean
    assert s["pulid"]["bg_mae"].mean == pytest.approx(40 / 255, abs=0.03)
    assert s["none"]["bg_mae"].mean == 0.0 and s["paper"]["bg_mae"].count == 4
    assert data.paired_reference == "pulid" and data.paired["paper"]["bg_mae"].mean < 0
    assert data.random_weights

    md = files["markdown"].read_text()
    assert md.splitlines()[2].startswith("> **WARNING:**") and "RANDOM WEIGHTS" in md
    header = next(line for line in md.splitlines() if line.startswith("| Preset"))
    for title in ("CLIP-T ↑ [random]", "CLIP-I ↑ [random]", "CLIP-ref ↑ [random]", "FaceSim ↑", "Face det. ↑",
                  "AntiFaceSim (ref.)", "IQ ↑ [random]", "IQ-01 ↑ [random]", "Aesthetic ↑ [random]", "FID ↓ [random]",
                  "BG CLIP dist. ↓ [random]", "BG MAE ↓", "BG CLIP-T ↑ [random]"):
        assert title in header
    assert "FaceSim ↑ [random]" not in header  # dlib has real weights
    # the paper's PuLID row beside this run's pulid row, marked as quoted
    assert "## The paper's numbers (quoted, not computed here)" in md
    assert "| pulid | **paper** (PuLID (Krea)), quoted | 0.505 | 0.793 | 0.277 | 0.495 |" in md
    assert "| pulid | this run (RANDOM-WEIGHT models) |" in md
    paper_row = next(line for line in md.splitlines() if line.startswith("| paper"))
    mae_col = header.split(" | ").index("BG MAE ↓")
    assert paper_row.split(" | ")[mae_col].startswith("**")  # best (lowest) background change
    assert "dlib HOG detector" in md and "stand-in" in md

    rows = list(csv.DictReader(io.StringIO(files["csv"].read_text())))
    assert [r["preset"] for r in rows] == ["none", "pulid", "paper"] and rows[0]["random_weights"] == "1"
    assert float(rows[2]["bg_mae_mean"]) == pytest.approx(s["paper"]["bg_mae"].mean, rel=1e-4)
    doc = json.loads(files["json"].read_text())
    assert doc["random_weights"] and doc["best"]["bg_mae"] == "paper" and doc["best"]["anti_face_sim"] is None
    assert doc["paper"]["rows"]["pulid"]["paper"] == {"iq": 0.505, "clip_i": 0.793, "clip_t": 0.277, "face_sim": 0.495}
    assert doc["paper"]["rows"]["pulid"]["run"]["clip_t"] == pytest.approx(s["pulid"]["clip_t"].mean)
    assert "paper" not in doc["paper"]["rows"]  # our 'paper' preset is not a row of the paper's table
    assert {m["key"]: m["random_weights"] for m in doc["metrics"]}["face_sim"] is False
    assert set(doc["presets"]["paper"]["clip_t"]) == {"mean", "std", "count", "ci_low", "ci_high"}
    for name in ("metrics_bars", "tradeoff_facesim_clipt"):
        with Image.open(files[name]) as im:
            assert im.format == "PNG" and im.width > 300
    per_image = json.loads(files["per_image"].read_text())["rows"]
    assert len(per_image) == 12 and all(r["face_source"] == "detected" for r in per_image if r["preset"] != "none")


def test_evaluate_cache_and_external_ibench_json(fake_bench, sample_dir, tiny_models, tmp_path, monkeypatch):
    from spatialid.evaluation import evaluate as ev

    report = tmp_path / "report"
    first, _ = ev.evaluate([fake_bench], tiny_models, report, progress=False, plots=False)

    def boom(self, item):
        raise AssertionError("cached rows must be reused")

    monkeypatch.setattr(ev._Scorer, "score", boom)
    again, _ = ev.evaluate([fake_bench], tiny_models, report, progress=False, plots=False)
    assert again.summaries["paper"]["clip_t"] == first.summaries["paper"]["clip_t"]
    monkeypatch.undo()

    # an IBench results file from elsewhere (only IBench's keys, relative paths): one method named after
    # the file; imagewithoutid gives CLIP-I, AntiFaceSim and FID, but no background columns (seed unknown)
    from spatialid.bench.results import load_preset_results

    external = tmp_path / "elsewhere" / "other_method.json"
    (external.parent / "img").mkdir(parents=True)
    base = {e["key"].rsplit("/", 1)[0]: e for e in load_preset_results(fake_bench / "none")[0].values()}
    datas = []
    for i, e in enumerate(sorted(load_preset_results(fake_bench / "pulid")[0].values(), key=lambda e: e["key"])):
        unit = e["key"].rsplit("/", 1)[0]
        for tag, src in (("with", fake_bench / "pulid" / e["image"]), ("without", fake_bench / "none" / base[unit]["image"])):
            (external.parent / "img" / f"{tag}{i}.png").write_bytes(src.read_bytes())
        datas.append({"num": i, "id": Path(e["id"]).name, "prompt": e["prompt"], "prompt_attr": [], "prompt_style": [],
                      "imagewithid": f"img/with{i}.png", "imagewithoutid": f"img/without{i}.png"})
    external.write_text(json.dumps({"datas": datas, "tags": {"category": "imageid"}}))
    with pytest.raises(ev.BenchStateError, match="2 reference photos not found.*--id-root"):
        ev.evaluate([external], tiny_models, tmp_path / "r2", progress=False, plots=False)
    data, files = ev.evaluate([external], tiny_models, tmp_path / "r2", id_root=str(sample_dir / "photos"),
                              progress=False, plots=False)
    keys = [m.key for m in data.metrics]
    assert data.presets == ["other_method"] and "bg_mae" not in keys and {"clip_i", "anti_face_sim", "fid"} <= set(keys)
    assert data.summaries["other_method"]["face_det"].count == 4 and not data.paper
    # the same images score the same whichever way they are read (bench folder or IBench JSON)
    bench_rows = sorted((r for r in first.per_image if r["preset"] == "pulid"), key=lambda r: r["key"])
    assert [r["clip_i"] for r in sorted(data.per_image, key=lambda r: int(Path(r["image"]).stem[4:]))] == pytest.approx(
        [r["clip_i"] for r in bench_rows], abs=1e-6)
    assert data.summaries["other_method"]["fid"].mean == pytest.approx(first.summaries["pulid"]["fid"].mean, rel=1e-6)
    assert "No baseline" in files["markdown"].read_text()

    for e in datas:
        del e["imagewithoutid"]
    external.write_text(json.dumps({"datas": datas}))
    data, files = ev.evaluate([external], tiny_models, tmp_path / "r3", id_root=str(sample_dir / "photos"),
                              progress=False, plots=False)
    assert "clip_i" not in [m.key for m in data.metrics] and "No images without identity" in files["markdown"].read_text()


def test_evaluate_input_errors(fake_bench, tiny_models, tmp_path):
    from spatialid.bench.results import BenchStateError
    from spatialid.evaluation.evaluate import evaluate

    with pytest.raises(BenchStateError, match="no bench.json"):
        evaluate([tmp_path], tiny_models, tmp_path / "r", progress=False)
    with pytest.raises(BenchStateError, match="no results for preset"):
        evaluate([fake_bench], tiny_models, tmp_path / "r", presets=["relaxed"], progress=False)
