"""The report's per-group-size block: the field's face columns per preset and number of people.

MultiID-Bench (WithAnyone) and MultiHuman-Testbench report their numbers per group size; so does
this block (buckets 1, 2, 3-4, 5+ of :func:`spatialid.evaluation.multi_metrics.group_bucket`).
Count accuracy is a share of images; the other columns are means over people (each person of each
image one value), so a 4-person image weighs four times a 1-person one. WithAnyone's published
MultiID-Bench numbers are printed below it, labelled as quoted from another benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from spatialid.evaluation.multi_metrics import GROUP_BUCKETS, group_bucket
from spatialid.evaluation.paper import OTHER_BENCHMARK_ROWS, OTHER_BENCHMARK_SOURCE
from spatialid.evaluation.stats import summarize

__all__ = ["GROUP_COLUMNS", "group_markdown", "group_summaries", "other_benchmark_json"]

#: (key, title, per): "image" = one value per image, "person" = one per person of the image.
GROUP_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("count_acc", "Count acc. ↑", "image"),
    ("sim_ref", "Sim(Ref) ↑", "person"),
    ("sim_gt", "Sim(GT) ↑", "person"),
    ("copy_paste", "CP ↓", "person"),
    ("id_conf", "ID-Conf ↑", "person"),
    ("landmark_diff", "LandmarkDiff", "person"),
    ("pose_div_yaw", "PoseDiv yaw", "person"),
    ("expr_div", "ExprDiv", "person"),
)


def group_summaries(rows: Sequence[Mapping[str, Any]], presets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """preset -> bucket -> ``{"images", "people", key: Summary dict}`` over the rows with the field's columns."""
    out: dict[str, dict[str, Any]] = {}
    for preset in presets:
        by: dict[str, list[Mapping[str, Any]]] = {}
        for r in rows:
            if r.get("preset") == preset and r.get("group_size"):
                by.setdefault(group_bucket(int(r["group_size"])), []).append(r)
        if not by:
            continue
        out[preset] = {}
        for bucket in (b for b in GROUP_BUCKETS if b in by):
            group = by[bucket]
            entry: dict[str, Any] = {"images": len(group), "people": sum(int(r["group_size"]) for r in group)}
            for key, _, per in GROUP_COLUMNS:
                if per == "image":
                    values = [r.get(key) for r in group]
                else:
                    values = [p.get(key) for r in group for p in (r.get("persons") or [])]
                entry[key] = summarize(values).to_dict()
            out[preset][bucket] = entry
    return out


def _cell(s: Mapping[str, Any]) -> str:
    mean, low, high = s.get("mean"), s.get("ci_low"), s.get("ci_high")
    if not s.get("count") or mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f}" + (f" ± {(high - low) / 2:.3f}" if low is not None and high is not None else "")


def group_table(groups: Mapping[str, Mapping[str, Any]]) -> str:
    header = ["Preset", "People", "Images"] + [title for _, title, _ in GROUP_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for preset, buckets in groups.items():
        for bucket, entry in buckets.items():
            cells = [preset, bucket, str(entry["images"])] + [_cell(entry[k]) for k, _, _ in GROUP_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def other_benchmark_json() -> dict[str, Any]:
    return {"source": OTHER_BENCHMARK_SOURCE, "quoted": True, "rows": [dict(r) for r in OTHER_BENCHMARK_ROWS]}


def _other_table() -> str:
    lines = ["| Method | People | Sim(GT) ↑ | CP ↓ |", "|---|---|---|---|"]
    for r in OTHER_BENCHMARK_ROWS:
        cells = [str(r["method"]), str(r["group"] or "—")]
        cells += [f"{r[k]:.3f}" if r[k] is not None else "—" for k in ("sim_gt", "copy_paste")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_markdown(groups: Mapping[str, Mapping[str, Any]], face_model: str) -> list[str]:
    """The Markdown block (nothing when no row has the field's columns)."""
    if not groups:
        return []
    return [
        "## Per group size (faces matched to people by the Hungarian method)",
        "",
        (
            "Count acc. is a share of images; the other columns are means over people. Sim(GT) and CP need "
            "another photo of each person (`--gt`); LandmarkDiff, PoseDiv and ExprDiv: higher = pose and "
            "expression less locked to the reference photo. Face model: " + face_model + "."
        ),
        "",
        group_table(groups),
        "",
        f"### Another benchmark's numbers (quoted, not computed here: {OTHER_BENCHMARK_SOURCE})",
        "",
        (
            "WithAnyone's MultiID-Bench numbers, as published: other people, prompts and ArcFace model, so they "
            "place a run in the field's range but are not comparable number for number (not at all with "
            "`--face-model dlib`)."
        ),
        "",
        _other_table(),
        "",
    ]
