"""The field's face metrics on real photos with dlib: count accuracy, ID-Conf, CP, Sim(GT), pose/expression.

Known answers: skimage's astronaut, its mirror and a crop are one person; skimage's LFW faces are
other people; a mirrored face flips the head's yaw; a picture holds 0, 1 or 2 faces. dlib's models
are loaded once for the module (the shared analyzer) and every photo is analysed once.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from PIL import Image
from skimage import data

from spatialid.errors import SpatialIDError
from spatialid.evaluation.face_geometry import expression_class, head_pose, landmark_diff
from spatialid.evaluation.multi_metrics import copy_paste, count_accuracy, group_bucket, id_conf, score_persons

pytestmark = pytest.mark.usefixtures("one_thread")


def _lfw_face(i: int) -> np.ndarray:
    """skimage's LFW face ``i`` (25x25) enlarged on a grey canvas: a stranger to the astronaut."""
    face = np.asarray(Image.fromarray((data.lfw_subset()[i] * 255).astype(np.uint8)).resize((150, 150), Image.BICUBIC))
    canvas = np.full((300, 300), 128, np.uint8)
    canvas[75:225, 75:225] = face
    return np.ascontiguousarray(np.stack([canvas] * 3, -1))


@pytest.fixture(scope="module")
def faces(photo_dir):
    """dlib (the shared analyzer) and each test photo's faces, analysed once."""
    from spatialid.evaluation.face_metrics import DlibFaceEmbedder

    embedder = DlibFaceEmbedder()
    ast = data.astronaut()
    crop = Image.fromarray(ast).crop((100, 0, 400, 300))  # 300x300 around her face: small photos detect fast
    photos = {
        "astronaut": ast,
        "mirrored": np.asarray(Image.open(photo_dir / "mirrored.png").convert("RGB")),
        "crop": np.asarray(crop),
        "rolled": np.asarray(crop.rotate(20, center=(120, 120), resample=Image.BICUBIC)),
        "coffee": np.asarray(Image.open(photo_dir / "coffee.png").convert("RGB")),
        "two": np.ascontiguousarray(np.hstack([np.asarray(crop), np.asarray(crop)])),  # her, side by side twice
        "stranger1": _lfw_face(1),
        "stranger2": _lfw_face(2),
    }
    found = {name: embedder.analyze_all(img) for name, img in photos.items()}
    return embedder, photos, found


def _emb(faces, name):
    return faces[2][name][0].embedding


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_same_person_vs_different_people(faces):
    ast = _emb(faces, "astronaut")
    assert _cos(ast, _emb(faces, "mirrored")) > 0.97 and _cos(ast, _emb(faces, "crop")) > 0.99
    for other in ("stranger1", "stranger2"):
        e = _emb(faces, other)
        assert _cos(ast, e) < 0.9 and np.linalg.norm(ast - e) > 0.6  # dlib: 0.6 apart = different people
    # all dlib's: 68 landmarks with every face (pose and expression need them)
    assert all(len(f.landmarks) == 68 for found in faces[2].values() for f in found)


def test_mirrored_face_flips_yaw_and_a_rotation_shows_as_roll(faces):
    found = faces[2]
    yaw, pitch, roll = head_pose(found["astronaut"][0].landmarks)
    m_yaw, m_pitch, m_roll = head_pose(found["mirrored"][0].landmarks)
    assert yaw * m_yaw < 0 and abs(yaw) > 1 and abs(m_yaw) > 1  # the mirror turns the head the other way
    assert abs(pitch - m_pitch) < 3
    _, _, r_roll = head_pose(found["rolled"][0].landmarks)
    assert 15 < abs(r_roll - roll) < 25  # the photo turned by 20 degrees in its plane
    # mirrored landmarks exactly (dlib's order: mirror x, and swap left and right points): yaw exactly negated
    pts = found["stranger1"][0].landmarks
    order = list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30, 35, 34, 33, 32, 31] + \
        [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40] + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + \
        [64, 63, 62, 61, 60, 67, 66, 65]
    flipped = np.column_stack([300 - pts[:, 0], pts[:, 1]])[order]
    assert head_pose(pts)[0] > 15 and head_pose(flipped)[0] == pytest.approx(-head_pose(pts)[0], abs=1e-6)


def test_count_accuracy_on_pictures_with_0_1_2_faces(faces):
    counts = [len(faces[2][n]) for n in ("coffee", "astronaut", "two")]
    assert counts == [0, 1, 2]
    assert [count_accuracy(c, 2) for c in counts] == [0.0, 0.0, 1.0]
    assert [count_accuracy(c, 1) for c in counts] == [0.0, 1.0, 0.0]
    assert [group_bucket(n) for n in (1, 2, 3, 4, 5, 7)] == ["1", "2", "3-4", "3-4", "5+", "5+"]
    # the tiny evaluation scores a stand-in centre box where no face was found: not counted as found
    cols, _ = score_persons([_emb(faces, "crop")], [_emb(faces, "astronaut")], faces_found=0)
    assert cols["count_acc"] == 0.0 and cols["faces_found"] == 0.0 and cols["sim_ref"] > 0.99


def test_copy_paste_formula_on_constructed_embeddings():
    def at(deg):
        return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])

    ref, gt = at(0), at(60)
    assert copy_paste(at(0), gt, ref) == pytest.approx(1.0)  # the reference copied
    assert copy_paste(at(60), gt, ref) == pytest.approx(-1.0)  # the other photo
    assert copy_paste(at(30), gt, ref) == pytest.approx(0.0)  # between the two: the person
    assert copy_paste(at(15), gt, ref) == pytest.approx((45 - 15) / 60)
    assert copy_paste(at(10), ref, ref) == 0.0  # GT = reference: WithAnyone's 0


def test_copy_paste_and_sim_gt_on_real_photos(faces):
    ref, gt = _emb(faces, "astronaut"), _emb(faces, "mirrored")
    assert copy_paste(_emb(faces, "crop"), gt, ref) > 0.8  # a crop of the reference: copy-paste
    assert copy_paste(gt, gt, ref) == pytest.approx(-1.0)
    cols, people = score_persons([_emb(faces, "crop")], [ref], [[gt]])
    assert cols["count_acc"] == 1.0 and cols["copy_paste"] > 0.8 and cols["id_conf"] == 1.0
    assert people[0]["sim_gt"] == pytest.approx(_cos(_emb(faces, "crop"), gt)) and people[0]["sim_ref"] > 0.99


def test_id_conf_on_constructed_similarities():
    assert id_conf([0.8, 0.2]) == pytest.approx(0.75)
    assert id_conf([0.5, 0.5]) == 0.0  # two faces equally like the reference
    assert id_conf([0.6]) == 1.0  # one face: nothing to confuse it with
    assert id_conf([0.8, -0.2, 0.1]) == pytest.approx(0.875)  # top2 = 0.1; negatives clipped at 0
    assert math.isnan(id_conf([])) and math.isnan(id_conf([-0.1, -0.3]))


def test_two_people_matched_by_hungarian_and_a_duplicate_has_low_id_conf(faces):
    ast, stranger = _emb(faces, "astronaut"), _emb(faces, "stranger1")
    cols, people = score_persons([stranger, ast], [ast, stranger])
    assert [p["face_index"] for p in people] == [1, 0] and cols["sim_ref"] == pytest.approx(1.0)
    # the astronaut twice side by side: one face per person, but her reference fits both faces
    two = [f.embedding for f in faces[2]["two"]]
    cols, people = score_persons(two, [ast, stranger])
    assert cols["count_acc"] == 1.0 and people[0]["id_conf"] < 0.02 and people[0]["sim_ref"] > 0.97
    assert people[1]["sim_ref"] < 0.9  # the stranger got the other astronaut


def test_landmark_diff_and_expression(faces):
    found = faces[2]
    pts = found["astronaut"][0].landmarks
    assert landmark_diff(pts, pts * 2.0 + 10.0) == pytest.approx(0.0, abs=1e-12)  # IBench: centred and scaled
    assert landmark_diff(pts, found["crop"][0].landmarks) < 0.03  # same photo
    assert landmark_diff(pts, found["stranger1"][0].landmarks) > 2 * landmark_diff(pts, found["crop"][0].landmarks)
    assert expression_class(pts) == "smile"
    opened = pts.copy()
    opened[[65, 66, 67, 55, 56, 57, 58, 59, 5, 6, 7, 8, 9, 10, 11]] += [0, 40]  # jaw and lower lip dropped
    assert expression_class(opened) == "mouth-open"
    from spatialid.evaluation.face_geometry import face_geometry

    ref = face_geometry(pts)
    same = ref.compare(face_geometry(found["crop"][0].landmarks))
    assert same["expr_div"] == 0.0 and same["pose_div_roll"] < 3
    assert ref.compare(face_geometry(opened))["expr_div"] == 1.0


def test_eval_dlib_finds_a_turned_face_hog_misses(faces):
    """The defect: eval's dlib path was HOG only (95 of IBench's 100 photos); encode's rule adds the CNN."""
    crop = Image.fromarray(data.astronaut()).crop((70, 0, 370, 300))
    img = np.ascontiguousarray(np.asarray(
        crop.rotate(50, resample=Image.BICUBIC, fillcolor=(255, 255, 255)).resize((200, 200), Image.BICUBIC)))
    embedder = faces[0]
    assert max(embedder.analyzer.detector.run(img, 1, 0.0)[1], default=0.0) < embedder.analyzer.min_score  # HOG: none
    face = embedder.analyze(img)
    assert face is not None and face.detected and 30 < face.box[0] < 70 and len(face.landmarks) == 68


def test_lpips_random_backbone_is_seeded():
    """The tiny eval's BG LPIPS: one network per seed, so a resumed eval_cache.json never mixes two."""
    from spatialid.evaluation.contamination import LpipsDistance

    rng = np.random.default_rng(0)
    a, b = (Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(2))
    first = LpipsDistance(random_backbone=True)
    assert np.array_equal(first.distance_map(a, b), LpipsDistance(random_backbone=True).distance_map(a, b))
    assert "seed 0" in first.label  # in the cache's fingerprint: rows of an unseeded network are not reused


def test_gt_photos_from_a_folder_and_from_json(tmp_path, photo_dir):
    from spatialid.evaluation.gt_photos import load_gt_index

    folder = tmp_path / "gt"
    (folder / "astronaut").mkdir(parents=True)
    (folder / "astronaut" / "b.png").write_bytes((photo_dir / "mirrored.png").read_bytes())
    (folder / "astronaut.jpg").write_bytes((photo_dir / "mirrored.png").read_bytes())
    found = load_gt_index(folder).lookup(photo_dir / "astronaut.png")
    assert [p.name for p in found] == ["b.png", "astronaut.jpg"]
    doc = tmp_path / "ids.json"
    doc.write_text(json.dumps({"datas": [{"id": [str(photo_dir / "astronaut.png"), str(photo_dir / "mirrored.png")]},
                                         {"id": str(photo_dir / "coffee.png"), "gt": []}]}))
    index = load_gt_index(doc)
    assert index.lookup(photo_dir / "astronaut.png") == (photo_dir / "mirrored.png",)
    assert index.lookup(photo_dir / "coffee.png") == ()
    assert index.lookup(photo_dir / "mirrored.png") == ()  # GT of nobody here
    (tmp_path / "bad.json").write_text(json.dumps({"alice.jpg": ["nowhere.jpg"]}))
    with pytest.raises(SpatialIDError, match="GT photo nowhere.jpg .* not found"):
        load_gt_index(tmp_path / "bad.json")
    with pytest.raises(SpatialIDError, match="--gt .* does not exist"):
        load_gt_index(tmp_path / "missing")


def test_scorer_row_and_group_report(faces, tmp_path, photo_dir):
    """One image through the evaluation's scorer: every field column, then the per-group-size block."""
    from spatialid.evaluation.group_report import group_markdown, group_summaries
    from spatialid.evaluation.metric_models import MetricModels
    from spatialid.evaluation.scoring import _Scorer
    from spatialid.evaluation.sources import EvalItem

    image = tmp_path / "gen.png"
    Image.fromarray(faces[1]["crop"]).save(image)
    item = EvalItem("pulid", "a/p000/s1/pulid", "a/p000/s1", image, photo_dir / "astronaut.png", "astronaut", "x",
                    gt=((photo_dir / "mirrored.png",),))
    class Clip:  # the CLIP columns are not under test here (and open_clip takes seconds to import)
        label = "constant"

        def image_features(self, images):
            return [np.full(4, 0.5) for _ in images]

        text_features = image_features

    scorer = _Scorer(MetricModels(clip=Clip(), face=faces[0]))
    row = scorer.score(item)
    assert row["group_size"] == 1 and row["count_acc"] == 1.0 and row["copy_paste"] > 0.8
    assert row["sim_ref"] > 0.99 and 0.9 < row["sim_gt"] < row["sim_ref"] and row["id_conf"] == 1.0
    assert row["expr_div"] == 0.0 and row["landmark_diff"] < 0.03 and row["persons"][0]["face_index"] == 0
    two_row = {"preset": "pulid", "group_size": 2, "count_acc": 0.0,
               "persons": [{"sim_ref": 0.5, "copy_paste": 0.2}, {"sim_ref": 0.7, "copy_paste": math.nan}]}
    groups = group_summaries([row, two_row], ["pulid", "none"])
    assert list(groups) == ["pulid"] and list(groups["pulid"]) == ["1", "2"]
    assert groups["pulid"]["2"]["people"] == 2 and groups["pulid"]["2"]["sim_ref"]["mean"] == pytest.approx(0.6)
    assert groups["pulid"]["2"]["copy_paste"]["count"] == 1
    md = "\n".join(group_markdown(groups, "dlib"))
    assert "| WithAnyone | 1 | 0.460 | 0.144 |" in md and "| WithAnyone | 3-4 | 0.414 | 0.171 |" in md
    assert "| PuLID | — | — | 0.315 |" in md and "another benchmark" in md.lower()


def test_bench_says_t5_truncation_once_with_advice_it_accepts(caplog):
    from spatialid.pipeline.generate import TruncationNotice, warn_if_truncated

    class Tok:
        def __call__(self, text, truncation=False, add_special_tokens=True):
            return type("Out", (), {"input_ids": text.split()})()

    base = type("Base", (), {"tokenizer_2": Tok()})()
    notice = TruncationNotice("shorten the texts of --prompts")
    with caplog.at_level(logging.WARNING, logger="spatialid.pipeline"):
        for _ in range(3):
            with notice:
                warn_if_truncated(base, "a b c d e", 3)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "--prompts" in lines[0] and "--max-sequence-length" not in lines[0]
    assert notice.count == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatialid.pipeline"):
        warn_if_truncated(base, "a b c d e", 3)  # outside a bench: the generate advice
    assert "--max-sequence-length" in caplog.records[0].getMessage()


def test_eval_cli_face_model_and_gt_are_checked_before_models_load(tmp_path, capsys):
    from spatialid.cli.main import build_parser, main

    results = tmp_path / "other.json"
    results.write_text(json.dumps({"datas": [], "tags": {"category": "imageid"}}))
    assert main(["eval", str(results), "--gt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gt" in err[0] and "does not exist" in err[0]
    for model in ("antelopev2", "dlib", "arcface"):
        assert build_parser().parse_args(["eval", str(results), "--face-model", model]).face_model == model
    assert build_parser().parse_args(["eval", str(results)]).face_model == "antelopev2"
