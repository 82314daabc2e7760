"""Multi-person metrics: Hungarian face matching, per-person FaceSim, leakage, mask placement."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spatialid.errors import SpatialIDError
from spatialid.evaluation.multi_person import mask_share_inside, match_faces, score_people


def _people(seed: int = 0, k: int = 3, d: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, d))


def test_matching_maximises_total_similarity_not_greedy() -> None:
    ids = np.array([[1.0, 0.0], [0.8, 0.6]])
    # greedy on identity 0 would take face 1 (cos 0.96 > 0.9) and leave identity 1 the bad face 0
    faces = np.array([[0.9, -0.436], [0.96, 0.28]])
    assert match_faces(faces, ids) == [0, 1]


def test_faces_shuffled_are_found_and_leakage_is_the_other_people() -> None:
    ids = _people()
    order = [2, 0, 1]
    faces = ids[order] + 0.05 * np.random.default_rng(1).standard_normal(ids.shape)
    scores = score_people(faces, ids)
    assert scores.face_index == [1, 2, 0]
    assert all(s > 0.99 for s in scores.facesim)
    unit = ids / np.linalg.norm(ids, axis=1, keepdims=True)
    cos = unit @ unit.T
    expected_leak = [(cos[0, 1] + cos[0, 2]) / 2, (cos[1, 0] + cos[1, 2]) / 2, (cos[2, 0] + cos[2, 1]) / 2]
    np.testing.assert_allclose(scores.leakage, expected_leak, atol=0.03)


def test_fewer_faces_than_people_and_identical_people() -> None:
    ids = _people(k=2)
    scores = score_people(ids[1:2], ids)
    assert scores.face_index == [None, 0] and math.isnan(scores.facesim[0]) and scores.facesim[1] == pytest.approx(1.0)
    same = np.stack([ids[0], ids[0]])
    twins = score_people(same, same)
    assert twins.leakage == pytest.approx(twins.facesim)  # blended identities: leakage as high as FaceSim
    none = score_people(np.zeros((0, ids.shape[1])), ids)
    assert none.face_index == [None, None] and math.isnan(none.mean_facesim)


def test_swapped_when_matched_faces_run_right_to_left() -> None:
    ids = _people(k=2)
    faces = ids[[1, 0]]
    left_right = [(0, 0, 10, 10), (20, 0, 30, 10)]
    assert score_people(faces, ids, boxes=left_right).swapped  # person 0's face is the right one
    assert not score_people(ids, ids, boxes=left_right).swapped
    with pytest.raises(SpatialIDError, match="one box per face"):
        score_people(ids, ids, boxes=left_right[:1])


def test_dimension_mismatch_is_one_line() -> None:
    with pytest.raises(SpatialIDError, match="same face model"):
        match_faces(np.ones((2, 3)), np.ones((2, 4)))


def test_mask_share_inside_region() -> None:
    rows, cols = 3, 4
    regions = np.zeros((2, rows, cols))
    regions[0, :, :2] = 1
    regions[1, :, 2:] = 1
    masks = np.zeros((2, 3, 2, 2, rows, cols))  # steps, points, persons, batch, rows, cols
    masks[:, :, 0, :, :, :2] = 0.8  # person 0 entirely in its half
    masks[:, :, 1, :, :, :] = 0.5  # person 1 spread everywhere: half inside
    share = mask_share_inside(masks, regions)
    assert share[0] == pytest.approx(1.0) and share[1] == pytest.approx(0.5)
    assert math.isnan(mask_share_inside(np.zeros_like(masks), regions)[0])
    with pytest.raises(SpatialIDError, match="regions must be"):
        mask_share_inside(masks, regions[:1])


def test_two_real_faces_matched_with_dlib() -> None:
    """A real two-face picture (the astronaut beside her mirror image), dlib's detector and descriptor."""
    import skimage.data

    from spatialid.evaluation.face_metrics import DlibFaceEmbedder

    face = skimage.data.astronaut()[:300, 80:380]
    mirror = face[:, ::-1]
    both = np.ascontiguousarray(np.concatenate([face, mirror], axis=1))
    embedder = DlibFaceEmbedder()
    found = embedder.analyze_all(both)
    assert len(found) == 2
    refs = np.stack([embedder.analyze(np.ascontiguousarray(x)).embedding for x in (mirror, face)])  # type: ignore[union-attr]
    scores = score_people(np.stack([f.embedding for f in found]), refs, boxes=[f.box for f in found])
    right, left = scores.face_index
    assert found[left].box[0] < found[right].box[0]  # the mirror (person 0) matched the right-hand face
    assert min(scores.facesim) > max(scores.leakage)
    assert scores.swapped  # person 0's face is right of person 1's: reported
