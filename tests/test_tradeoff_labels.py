"""The eval trade-off plot: preset labels of close points are moved apart instead of overlapping."""

from __future__ import annotations

from spatialid.evaluation.report import label_positions


def _box(point, offset, size):
    (x, y), (dx, dy), (w, h) = point, offset, size
    left = x + dx if dx > 0 else (x + dx - w if dx < 0 else x - w / 2)
    return left, y + dy, left + w, y + dy + h


def _overlaps(a, b):
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_far_points_keep_the_usual_spot():
    assert label_positions([(0, 0), (300, 300)], [(40, 10), (40, 10)]) == [(5, 5), (5, 5)]


def test_close_points_get_labels_that_do_not_overlap():
    points = [(100, 100), (102, 101), (104, 99), (101, 103)]  # four presets almost on one spot
    sizes = [(60, 10)] * 4
    offsets = label_positions(points, sizes)
    boxes = [_box(p, o, s) for p, o, s in zip(points, offsets, sizes)]
    for i in range(len(boxes)):
        for j in range(i):
            assert not _overlaps(boxes[i], boxes[j]), (i, j, offsets)
