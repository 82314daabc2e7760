"""Evaluate bench outputs: per-image metrics, per-preset statistics, report files.

Sources are bench output folders (every preset in them, with the no-identity baseline used for the
background-contamination metrics) and/or IBench results JSON files made by other tools (one method
each, named after the file; no baseline, so no background columns for them).

Per-image values are cached in ``REPORT/eval_cache.json`` keyed by image file (size and mtime) and
the metric models used, so evaluating again after adding presets or seeds only scores new images.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spatialid.bench.datasets import resolve_photo_path
from spatialid.bench.grid import BASELINE_PRESET
from spatialid.bench.results import BenchStateError, atomic_write_json, find_presets, load_manifest, load_preset_results, read_json
from spatialid.errors import SpatialIDError
from spatialid.evaluation.contamination import LpipsDistance, background_change, face_region_mask
from spatialid.evaluation.face_metrics import cosine
from spatialid.evaluation.report import METRICS, ReportData, summaries_for, write_report
from spatialid.evaluation.stats import paired_difference

__all__ = ["EvalItem", "MetricModels", "collect_items", "evaluate"]

log = logging.getLogger("spatialid.eval")

CACHE_NAME = "eval_cache.json"
CACHE_FLUSH_EVERY = 25


@dataclass(frozen=True)
class EvalItem:
    preset: str
    key: str
    unit_key: str  # identity/prompt/seed: pairs an item with its baseline and other presets
    image: Path
    reference: Path | None
    identity: str
    prompt: str
    baseline: Path | None = None


@dataclass
class MetricModels:
    """The models behind the metric columns (``None`` = column left out)."""

    clip: Any
    face: Any = None
    quality: Any = None
    lpips: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def random_weights(self) -> bool:
        return any(getattr(m, "random_weights", False) for m in (self.clip, self.face, self.quality, self.lpips) if m is not None)

    def labels(self) -> dict[str, str]:
        return {
            "clip": self.clip.label,
            "face": self.face.label if self.face is not None else "n/a (no face model)",
            "quality": self.quality.label if self.quality is not None else "n/a (--iq-metric none)",
            "lpips": self.lpips.label if self.lpips is not None else "n/a (lpips not installed or --no-lpips)",
            "pixels": "plain pixel arithmetic (no model)",
        }

    def fingerprint(self) -> str:
        return "|".join(f"{k}={v}" for k, v in sorted(self.labels().items()))

    @classmethod
    def tiny(cls, *, device: str | None = None, seed: int = 0) -> MetricModels:
        """Offline models: random-weight CLIP, dlib faces (centre fallback), random IQ and LPIPS backbones."""
        from spatialid.evaluation.clip_metrics import ClipScorer
        from spatialid.evaluation.face_metrics import DlibFaceEmbedder
        from spatialid.evaluation.quality import load_quality

        notes = [
            "Tiny evaluation: CLIP, IQ and the LPIPS backbone have random weights; faces use dlib (real weights) "
            "with a centred box where no face is found (the tiny model's images are noise)."
        ]
        lp = None
        try:
            lp = LpipsDistance(random_backbone=True, device=device)
        except SpatialIDError as exc:
            notes.append(f"BG LPIPS left out: {exc}")
        return cls(
            clip=ClipScorer.tiny(seed, device=device),
            face=DlibFaceEmbedder(fallback="center"),
            quality=load_quality(device=device, random_weights=True),
            lpips=lp,
            notes=notes,
        )

    @classmethod
    def real(
        cls,
        *,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str | None = "openai",
        face_model: str = "arcface",
        iq_metric: str = "musiq-spaq",
        lpips: bool | None = None,
        face_fallback: str = "none",
        device: str | None = None,
        models_dir: str | None = None,
        offline: bool | None = None,
        cache_dir: str | None = None,
    ) -> MetricModels:
        """The models a paper's table uses; each one fails early with a one-line error if unavailable.

        ``lpips=None`` uses LPIPS when the package is installed (else notes that the column is out).
        """
        import importlib.util

        from spatialid.evaluation.clip_metrics import ClipScorer
        from spatialid.evaluation.face_metrics import load_face_embedder
        from spatialid.evaluation.quality import load_quality

        notes: list[str] = []
        clip = ClipScorer.from_open_clip(clip_model, clip_pretrained, device=device, cache_dir=cache_dir)
        face = load_face_embedder(face_model, device=device, fallback=face_fallback, models_dir=models_dir, offline=offline)
        if face_model == "dlib":
            notes.append("FaceSim uses dlib's 128-d descriptor (offline alternative): not comparable to ArcFace FaceSim in papers.")
        quality = load_quality(iq_metric, device=device)
        lp = None
        if lpips is None:
            lpips = importlib.util.find_spec("lpips") is not None
            if not lpips:
                notes.append("BG LPIPS left out: the lpips package is not installed (`pip install lpips`).")
        if lpips:
            lp = LpipsDistance(device=device)
        return cls(clip=clip, face=face, quality=quality, lpips=lp, notes=notes)


# ------------------------------------------------------------------------------------- sources


def _reference_path(entry: dict, manifest: dict | None, base: Path, id_root: str | None) -> Path | None:
    if manifest is not None:
        ident = manifest.get("identities", {}).get(entry.get("identity_key", ""))
        if ident is not None and Path(ident.get("path", "")).is_file():
            return Path(ident["path"])
    id_string = entry.get("id")
    if isinstance(id_string, str) and id_string:
        return resolve_photo_path(id_string, base, id_root)
    return None


def _image_path(entry: dict, preset_dir: Path) -> Path:
    rel = entry.get("image")
    if rel and (preset_dir / rel).is_file():
        return preset_dir / rel
    return Path(entry.get("imagewithid", ""))


def collect_items(
    sources: Sequence[str | os.PathLike[str]],
    *,
    presets: Sequence[str] | None = None,
    id_root: str | None = None,
) -> tuple[list[EvalItem], list[str], dict[str, Any]]:
    """``(items, preset order, generation settings)`` from bench folders and IBench JSON files."""
    items: list[EvalItem] = []
    order: list[str] = []
    settings: dict[str, Any] = {}
    for src in sources:
        path = Path(src).resolve()
        if path.is_file() and path.suffix.lower() == ".json":
            doc = read_json(path)
            if not isinstance(doc, dict) or not isinstance(doc.get("datas"), list):
                raise BenchStateError(f'{path} does not hold IBench results ({{"datas": [...]}})')
            name = path.stem
            if name in order:
                raise BenchStateError(f"two sources give the method name {name!r}; rename one results file")
            order.append(name)
            for i, e in enumerate(doc["datas"]):
                image = Path(e.get("imagewithid", ""))
                if not image.is_absolute():
                    image = path.parent / image
                prompt = e.get("prompt", "")
                key = e.get("key") or f"{e.get('id', '')}|{prompt}|{i}"
                items.append(
                    EvalItem(name, key, e.get("key", key).rsplit("/", 1)[0] if e.get("key") else key, image,
                             _reference_path(e, None, path.parent, id_root), str(e.get("id", "")), prompt)
                )
            continue
        if not path.is_dir():
            raise BenchStateError(f"{path} is neither a bench output folder nor an IBench results .json")
        manifest = load_manifest(path)
        if manifest is None:
            raise BenchStateError(f"{path} has no bench.json: not a spatialid bench output folder")
        settings = settings or dict(manifest.get("settings", {}))
        found = find_presets(path)
        if not found:
            raise BenchStateError(f"{path} holds no results yet; run `spatialid bench` first")
        baselines: dict[str, Path] = {}
        if BASELINE_PRESET in found:
            entries, _ = load_preset_results(path / BASELINE_PRESET)
            for e in entries.values():
                baselines[e["key"].rsplit("/", 1)[0]] = _image_path(e, path / BASELINE_PRESET)
        wanted = [p for p in (manifest.get("presets") or []) + found if p in found]
        wanted = list(dict.fromkeys([BASELINE_PRESET] * (BASELINE_PRESET in found) + wanted))
        if presets:
            missing = [p for p in presets if p not in found]
            if missing:
                raise BenchStateError(f"{path} has no results for preset(s) {', '.join(missing)}; it has {', '.join(found)}")
            wanted = [p for p in wanted if p in presets]
        for preset in wanted:
            if preset in order:
                raise BenchStateError(f"preset {preset!r} appears in two sources; evaluate them separately or merge them first")
            order.append(preset)
            entries, _ = load_preset_results(path / preset)
            for key, e in sorted(entries.items(), key=lambda kv: (kv[1].get("num", 0), kv[0])):
                unit = key.rsplit("/", 1)[0]
                items.append(
                    EvalItem(
                        preset, key, unit, _image_path(e, path / preset), _reference_path(e, manifest, path, id_root),
                        str(e.get("id", "")), e.get("prompt", ""), baselines.get(unit),
                    )
                )
    missing_refs = sorted({it.identity for it in items if it.reference is None})
    if missing_refs:
        raise BenchStateError(
            f"{len(missing_refs)} reference photos not found (first: {missing_refs[0]}); pass --id-root with their folder"
        )
    missing_imgs = [it for it in items if not it.image.is_file()]
    if missing_imgs:
        raise BenchStateError(f"{len(missing_imgs)} generated images are missing (first: {missing_imgs[0].image})")
    return items, order, settings


# ------------------------------------------------------------------------------------- scoring


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class _Scorer:
    """Per-image metrics with caches for prompts, references and baselines."""

    def __init__(self, models: MetricModels) -> None:
        self.m = models
        self._text: dict[str, Any] = {}
        self._ref_feat: dict[Path, Any] = {}
        self._ref_face: dict[Path, Any] = {}
        self._face: dict[Path, Any] = {}

    def text(self, prompt: str) -> Any:
        if prompt not in self._text:
            self._text[prompt] = self.m.clip.text_features([prompt])[0]
        return self._text[prompt]

    def ref_feature(self, path: Path) -> Any:
        if path not in self._ref_feat:
            self._ref_feat[path] = self.m.clip.image_features([_load_rgb(path)])[0]
        return self._ref_feat[path]

    def face(self, path: Path, image: Image.Image | None = None) -> Any:
        if self.m.face is None:
            return None
        if path not in self._face:
            img = image if image is not None else _load_rgb(path)
            self._face[path] = self.m.face.analyze(np.asarray(img))
        return self._face[path]

    def ref_face(self, path: Path) -> Any:
        if self.m.face is None:
            return None
        if path not in self._ref_face:
            # references are real photos: never use the centre fallback for them
            saved = getattr(self.m.face, "fallback", "none")
            try:
                self.m.face.fallback = "none"
                self._ref_face[path] = self.m.face.analyze(np.asarray(_load_rgb(path)))
            finally:
                self.m.face.fallback = saved
        return self._ref_face[path]

    def score(self, item: EvalItem) -> dict[str, Any]:
        image = _load_rgb(item.image)
        row: dict[str, Any] = {
            "preset": item.preset, "key": item.key, "unit": item.unit_key, "identity": item.identity,
            "prompt": item.prompt, "image": str(item.image), "image_stat": _stat(item.image),
        }
        feat = self.m.clip.image_features([image])[0]
        row["clip_t"] = float((feat * self.text(item.prompt)).sum())
        row["clip_i"] = float((feat * self.ref_feature(item.reference)).sum()) if item.reference else math.nan
        face = self.face(item.image, image)
        if self.m.face is not None:
            ref_face = self.ref_face(item.reference) if item.reference else None
            row["face_det"] = 1.0 if face is not None and face.detected else 0.0
            row["face_source"] = face.source if face is not None else "none"
            row["face_sim"] = cosine(face.embedding, ref_face.embedding) if face is not None and ref_face is not None else math.nan
            row["ref_face_found"] = ref_face is not None
        if self.m.quality is not None:
            row["iq"] = float(self.m.quality.score([image])[0])
        if item.baseline is not None and item.baseline.is_file():
            baseline = _load_rgb(item.baseline)
            boxes = [face.box] if face is not None else []
            base_face = self.face(item.baseline, baseline)
            if base_face is not None and base_face.detected:
                boxes.append(base_face.box)
            if boxes:
                mask = face_region_mask(image.width, image.height, boxes)
                row.update(background_change(image, baseline, mask, clip=self.m.clip, lpips_model=self.m.lpips, prompt=item.prompt))
        return row


def evaluate(
    sources: Sequence[str | os.PathLike[str]],
    models: MetricModels,
    out_dir: str | os.PathLike[str],
    *,
    presets: Sequence[str] | None = None,
    id_root: str | None = None,
    reference_preset: str | None = "pulid",
    progress: bool = True,
    plots: bool = True,
) -> tuple[ReportData, dict[str, Path]]:
    """Score every image of ``sources`` and write the report into ``out_dir``."""
    items, order, settings = collect_items(sources, presets=presets, id_root=id_root)
    if not items:
        raise BenchStateError("no finished images to evaluate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
            base_ok = hit is not None and (item.baseline is None) == ("bg_mae" not in hit)
            if hit is not None and hit.get("image_stat") == _stat(item.image) and base_ok:
                rows.append(hit)
            else:
                row = scorer.score(item)
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

    metrics = [m for m in METRICS if any(m.key in r for r in rows)]
    summaries = summaries_for(rows, order, metrics)
    notes = list(models.notes)
    no_ref_face = sorted({r["identity"] for r in rows if r.get("ref_face_found") is False})
    if no_ref_face:
        notes.append(f"No face found in {len(no_ref_face)} reference photo(s) (FaceSim n/a for them), e.g. {no_ref_face[0]}.")
    if any(r.get("face_source") == "center-fallback" for r in rows):
        notes.append("Images without a detected face were scored on a centred box (face_source = center-fallback in per_image.json).")
    if BASELINE_PRESET not in order:
        notes.append("No baseline (preset 'none'): background-contamination columns need `spatialid bench --baseline`.")
    paired: dict[str, dict] = {}
    ref = reference_preset if reference_preset in order else None
    if ref is not None:
        by = {p: {} for p in order}
        for r in rows:
            by[r["preset"]][r["unit"]] = r
        for p in order:
            if p in (ref, BASELINE_PRESET):
                continue
            paired[p] = {
                m.key: paired_difference(
                    {u: r.get(m.key) for u, r in by[p].items()}, {u: r.get(m.key) for u, r in by[ref].items()}
                )
                for m in metrics
            }
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
    )
    files = write_report(data, out, plots=plots)
    return data, files
