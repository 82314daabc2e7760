"""Evaluate bench outputs with IBench's metrics: per-image values, per-preset statistics, report files.

Sources are bench output folders (every preset in them; the no-identity baseline preset ``none``
of the same prompt and seed is each image's ``imagewithoutid``, and also drives the
background-contamination columns) and/or IBench results JSON files made by any tool
(``{"datas": [{"id", "prompt", "imagewithid", "imagewithoutid", ...}], "tags": {"category":
"imageid"}}``; one method each, named after the file). For JSON files the no-identity image is the
entry's ``imagewithoutid``; nothing says it shares the seed, so they get no background columns.

Per-image values are cached in ``REPORT/eval_cache.json`` keyed by the image files (size and mtime)
and the metric models used, and FID features in ``REPORT/fid_features.npz``, so evaluating again
after adding presets or seeds only scores new images.

Nothing is lost silently: an unreadable image (truncated, empty, not an image) is skipped and
listed in the report; a bench preset's items are counted against the grid its ``bench.json``
records, and presets scored on different items are not ranked (no "best", no paired differences)
unless ``allow_incomplete``, which ranks them on the items every preset has.

The jobs live in modules of this package: :mod:`.sources` (what to score), :mod:`.metric_models`
(the models), :mod:`.scoring` (one image's row), :mod:`.fid_sets` (FID per preset); this module is
the driver, and its names stay importable from here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spatialid.bench.grid import BASELINE_PRESET
from spatialid.bench.results import BenchStateError, read_json
from spatialid.evaluation.fid_sets import FID_CACHE_NAME, fid_summaries  # noqa: F401
from spatialid.evaluation.group_report import group_summaries
from spatialid.evaluation.gt_photos import GtIndex, attach_gt, load_gt_index
from spatialid.evaluation.inputs import NothingScoreableError, check_output_folder
from spatialid.evaluation.metric_models import AESTHETIC_CLIPS, MetricModels  # noqa: F401
from spatialid.evaluation.paper import paper_rows_for
from spatialid.evaluation.report import (
    METRICS,
    RANKED_ALL,
    RANKED_COMMON,
    ReportData,
    summaries_for,
    write_report,
)
from spatialid.evaluation.scoring import _Scorer, file_stats
from spatialid.evaluation.sources import (  # noqa: F401
    EvalItem,
    PresetGrid,
    Sources,
    collect_items,
    collect_sources,
    expected_units,
)
from spatialid.evaluation.stats import Summary, paired_difference
from spatialid.utils.io import atomic_write_json

__all__ = ["EvalItem", "MetricModels", "PresetGrid", "Sources", "collect_items", "collect_sources", "evaluate", "expected_units"]

log = logging.getLogger("spatialid.eval")

CACHE_NAME = "eval_cache.json"
CACHE_FLUSH_EVERY = 25


def _row_is_current(hit: dict | None, item: EvalItem) -> bool:
    return hit is not None and hit.get("file_stats") == file_stats(item)


def evaluate(
    sources: Sequence[str | os.PathLike[str]],
    models: MetricModels | Callable[[], MetricModels],
    out_dir: str | os.PathLike[str],
    *,
    presets: Sequence[str] | None = None,
    id_root: str | None = None,
    image_root: str | None = None,
    reference_preset: str | None = "pulid",
    progress: bool = True,
    plots: bool = True,
    allow_incomplete: bool = False,
    gt: str | os.PathLike[str] | GtIndex | None = None,
) -> tuple[ReportData, dict[str, Path]]:
    """Score every image of ``sources`` and write the report into ``out_dir``.

    ``models`` may be a factory: it is called only once the sources have been read, so a bad
    source fails in seconds, before minutes of model loading. Presets scored on different items
    are not ranked unless ``allow_incomplete`` (then: on the items every preset has). ``gt``: other
    photos of the people, for CP and Sim(GT) (:func:`spatialid.evaluation.gt_photos.load_gt_index`).
    """
    found = collect_sources(sources, presets=presets, id_root=id_root, image_root=image_root)
    if gt is not None and not isinstance(gt, GtIndex):
        gt = load_gt_index(gt, id_root)
    found.items = attach_gt(found.items, gt)
    items, order, settings = found.items, found.order, found.settings
    if not items:
        raise BenchStateError("no finished images to evaluate")
    out = Path(out_dir)
    check_output_folder(out, "report folder")
    if not isinstance(models, MetricModels):
        models = models()
    out.mkdir(parents=True, exist_ok=True)
    rows, bad = _score_rows(items, models, out, progress)

    notes = list(models.notes)
    set_level: dict[str, dict[str, Summary]] = {}
    if models.fid is not None:
        fid, fid_notes = fid_summaries(items, order, models.fid, out, progress, bad)
        notes += fid_notes
        if fid:
            set_level["fid"] = fid
    metrics = [m for m in METRICS if (any(m.key in r for r in rows) if m.per_image else m.key in set_level)]
    summaries = summaries_for(rows, order, [m for m in metrics if m.per_image])
    empty = Summary(math.nan, math.nan, 0, math.nan, math.nan)
    for key, per_preset in set_level.items():
        for p in order:
            summaries[p][key] = per_preset.get(p, empty)

    notes += _data_notes(rows, items, order)

    # Ranking needs the same items in every bench preset with identity (IBench .json methods have
    # their own items: nothing pairs them with a bench grid, they are ranked as they are).
    grids = found.grids
    units = {p: {r["unit"] for r in rows if r["preset"] == p} for p in order}
    contenders = [p for p in order if p in grids and p != BASELINE_PRESET]
    common = set.intersection(*(units[p] for p in contenders)) if contenders else set()
    same_items = len({frozenset(units[p]) for p in contenders}) <= 1
    ranked_on = RANKED_ALL if same_items else (RANKED_COMMON if allow_incomplete else None)
    common_summaries: dict[str, dict[str, Summary]] = {}
    if ranked_on == RANKED_COMMON:
        shown = [p for p in order if p in grids]
        common_rows = [r for r in rows if r["preset"] in grids and r["unit"] in common]
        common_summaries = summaries_for(common_rows, shown, [m for m in metrics if m.per_image])
        if "fid" in set_level:
            fid_common, _ = fid_summaries([it for it in items if it.preset in grids and it.unit_key in common],
                                           shown, models.fid, out, False, bad)
            for p in shown:
                common_summaries[p]["fid"] = fid_common.get(p, empty)
    paired: dict[str, dict] = {}
    ref = reference_preset if reference_preset in order and ranked_on is not None else None
    if ranked_on == RANKED_COMMON and ref not in grids:
        ref = None  # an IBench .json method shares no bench items
    if ref is not None:
        paired = _paired(rows, order, grids, metrics, ref, ranked_on, common)
    data = ReportData(
        sources=[str(s) for s in sources],
        presets=order,
        metrics=metrics,
        summaries=summaries,
        models=models.labels(),
        random_weights=models.random_weights,
        per_image=rows,
        paired=paired,
        paired_reference=ref if paired else None,
        notes=notes,
        settings=settings,
        random_groups=models.random_groups(),
        paper=paper_rows_for(order),
        expected={p: g.expected for p, g in grids.items()},
        missing={p: {"count": len(g.missing), "failed": g.failed, "keys": list(g.missing)} for p, g in grids.items()},
        ranked_on=ranked_on,
        common_items=len(common) if ranked_on == RANKED_COMMON else None,
        common_summaries=common_summaries,
        skipped=[{"file": f, "reason": bad[f]} for f in sorted(bad)],
        groups=group_summaries(rows, order),
    )
    files = write_report(data, out, plots=plots)
    return data, files


def _score_rows(
    items: Sequence[EvalItem], models: MetricModels, out: Path, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every readable item's row (from ``eval_cache.json`` while its files are unchanged) and the
    unreadable files (path -> reason); raises when not one image can be read."""
    fingerprint = models.fingerprint()
    cache_path = out / CACHE_NAME
    cached: dict[str, dict] = {}
    if cache_path.is_file():
        try:
            doc = read_json(cache_path)
            if doc.get("fingerprint") == fingerprint:
                cached = {f"{r['preset']}|{r['key']}": r for r in doc.get("rows", [])}
        except BenchStateError:
            log.warning("evaluation cache %s unreadable; scoring every image again", cache_path)

    scorer = _Scorer(models)
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="eval", unit="img", dynamic_ncols=True)
    fresh = 0
    try:
        for item in items:
            ck = f"{item.preset}|{item.key}"
            hit = cached.get(ck)
            if _row_is_current(hit, item):
                rows.append(hit)
            else:
                row = scorer.score(item)
                if row is None:  # its image is unreadable: skipped, and not kept in the cache
                    if cached.pop(ck, None) is not None:
                        fresh += 1
                else:
                    rows.append(row)
                    cached[ck] = row
                    fresh += 1
                    if fresh % CACHE_FLUSH_EVERY == 0:
                        atomic_write_json(cache_path, {"fingerprint": fingerprint, "rows": list(cached.values())})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if fresh:
            atomic_write_json(cache_path, {"fingerprint": fingerprint, "rows": list(cached.values())})

    bad: dict[str, str] = {str(k): v for k, v in scorer.bad.items()}
    for r in rows:
        for f, reason in (r.get("unreadable") or {}).items():
            bad.setdefault(f, reason)
    if not rows:
        first = next(iter(bad.items()), ("?", "?"))
        raise NothingScoreableError(
            f"no image could be read: all {len(items)} images of the sources are unreadable (first: {first[0]}: "
            f"{first[1]}); re-run `spatialid bench` on the folder to regenerate them, or copy the folder again"
        )
    return rows, bad


def _data_notes(rows: Sequence[dict[str, Any]], items: Sequence[EvalItem], order: Sequence[str]) -> list[str]:
    """What the report must say about the inputs: faceless references, centred face boxes, missing baselines."""
    notes: list[str] = []
    no_ref_face = sorted({r["identity"] for r in rows if r.get("ref_face_found") is False})
    if no_ref_face:
        notes.append(f"No face found in {len(no_ref_face)} reference photo(s) (FaceSim n/a for them), e.g. {no_ref_face[0]}.")
    if any(r.get("face_source") == "center-fallback" or r.get("without_id_face_source") == "center-fallback" for r in rows):
        notes.append("Images without a detected face were scored on a centred box (face_source = center-fallback in per_image.json).")
    if not any(it.without_id is not None for it in items):
        notes.append(
            "No images without identity: CLIP-I, AntiFaceSim and FID need the baseline preset 'none' "
            "(`spatialid bench --baseline`) or imagewithoutid in the IBench results."
        )
    if BASELINE_PRESET not in order:
        notes.append("No baseline (preset 'none'): background-contamination columns need `spatialid bench --baseline`.")
    return notes


def _paired(
    rows: Sequence[dict[str, Any]],
    order: Sequence[str],
    grids: Mapping[str, Any],
    metrics: Sequence[Any],
    ref: str,
    ranked_on: str,
    common: set[str],
) -> dict[str, dict]:
    """Each ranked preset's paired differences to ``ref`` over the items both have, per ranked metric."""
    paired: dict[str, dict] = {}
    by: dict[str, dict[str, dict]] = {p: {} for p in order}
    for r in rows:
        if ranked_on == RANKED_ALL or r["unit"] in common:
            by[r["preset"]][r["unit"]] = r
    for p in order:
        if p in (ref, BASELINE_PRESET) or (ranked_on == RANKED_COMMON and p not in grids):
            continue
        paired[p] = {
            m.key: paired_difference(
                {u: r.get(m.key) for u, r in by[p].items()}, {u: r.get(m.key) for u, r in by[ref].items()}
            )
            for m in metrics
            if m.per_image and m.ranked
        }
    return paired
