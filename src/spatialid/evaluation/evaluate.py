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
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spatialid.bench.datasets import region_boxes, resolve_photo_path
from spatialid.bench.grid import BASELINE_PRESET
from spatialid.bench.results import (
    BenchStateError,
    find_presets,
    load_manifest,
    load_preset_results,
    read_json,
)
from spatialid.errors import SpatialIDError
from spatialid.evaluation.contamination import (
    LpipsDistance,
    background_change,
    face_region_mask,
)
from spatialid.evaluation.face_metrics import cosine
from spatialid.evaluation.inputs import (
    NothingScoreableError,
    UnreadableImageError,
    check_output_folder,
    check_source,
    load_rgb,
)
from spatialid.evaluation.paper import paper_rows_for
from spatialid.evaluation.report import (
    METRICS,
    RANKED_ALL,
    RANKED_COMMON,
    ReportData,
    summaries_for,
    write_report,
)
from spatialid.evaluation.stats import Summary, paired_difference
from spatialid.utils.io import atomic_write_json

__all__ = ["EvalItem", "MetricModels", "PresetGrid", "Sources", "collect_items", "collect_sources", "evaluate", "expected_units"]

log = logging.getLogger("spatialid.eval")

CACHE_NAME = "eval_cache.json"
FID_CACHE_NAME = "fid_features.npz"
CACHE_FLUSH_EVERY = 25
AESTHETIC_CLIPS = ("ViT-L-14", "ViT-L-14-quickgelu")  # open_clip names of OpenAI's ViT-L/14


@dataclass(frozen=True)
class EvalItem:
    """One generated image and what it is compared with."""

    preset: str
    key: str
    unit_key: str  # identity/prompt/seed: pairs an item with its baseline and other presets
    image: Path
    reference: Path | None
    identity: str
    prompt: str
    baseline: Path | None = None  # same prompt and seed without identity: background columns
    without_id: Path | None = None  # IBench's imagewithoutid: CLIP-I, AntiFaceSim, FID
    people: tuple[Path, ...] = ()  # several people in one image: each person's photo (multi-person columns)


@dataclass
class MetricModels:
    """The models behind the metric columns (``None`` = column left out)."""

    clip: Any
    face: Any = None
    quality: Any = None
    lpips: Any = None
    aesthetic: Any = None
    fid: Any = None
    notes: list[str] = field(default_factory=list)

    def _groups(self) -> dict[str, Any]:
        return {"clip": self.clip, "face": self.face, "quality": self.quality, "lpips": self.lpips,
                "aesthetic": self.aesthetic, "fid": self.fid}

    @property
    def random_weights(self) -> bool:
        return bool(self.random_groups())

    def random_groups(self) -> list[str]:
        """Model groups (report column groups) whose model has random weights."""
        return [g for g, m in self._groups().items() if m is not None and getattr(m, "random_weights", False)]

    def labels(self) -> dict[str, str]:
        return {
            "clip": self.clip.label,
            "face": self.face.label if self.face is not None else "n/a (no face model)",
            "quality": self.quality.label if self.quality is not None else "n/a (--iq-metric none)",
            "lpips": self.lpips.label if self.lpips is not None else "n/a (lpips not installed or --no-lpips)",
            "aesthetic": self.aesthetic.label if self.aesthetic is not None else "n/a (--no-aesthetic)",
            "fid": self.fid.label if self.fid is not None else "n/a (--no-fid)",
            "pixels": "plain pixel arithmetic (no model)",
        }

    def fingerprint(self) -> str:
        return "|".join(f"{k}={v}" for k, v in sorted(self.labels().items()) if k != "fid")

    @classmethod
    def tiny(cls, *, device: str | None = None, seed: int = 0) -> MetricModels:
        """Offline models: random-weight CLIP, aesthetic head, IQ, FID and LPIPS backbones; dlib faces."""
        from spatialid.evaluation.aesthetic import AestheticScorer
        from spatialid.evaluation.clip_metrics import ClipScorer
        from spatialid.evaluation.face_metrics import DlibFaceEmbedder
        from spatialid.evaluation.fid import FidExtractor
        from spatialid.evaluation.quality import load_quality

        notes = [
            (
                "Tiny evaluation: CLIP, Aesthetic, IQ, FID and the LPIPS backbone have random weights; faces use dlib "
                "(real weights) with a centred box where no face is found (the tiny model's images are noise)."
            )
        ]
        lp = None
        try:
            lp = LpipsDistance(random_backbone=True, device=device)
        except SpatialIDError as exc:
            notes.append(f"BG LPIPS left out: {exc}")
        clip = ClipScorer.tiny(seed, device=device)
        return cls(
            clip=clip,
            face=DlibFaceEmbedder(fallback="center"),
            quality=load_quality(device=device, random_weights=True),
            lpips=lp,
            aesthetic=AestheticScorer.tiny(clip, seed),
            fid=FidExtractor.tiny(seed=seed, device=device),
            notes=notes,
        )

    @classmethod
    def real(
        cls,
        *,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str | None = "openai",
        clip_precision: str = "auto",
        clip_antialias: bool = True,
        face_model: str = "arcface",
        iq_metric: str = "musiq-spaq",
        aesthetic: bool = True,
        fid: bool = True,
        lpips: bool | None = None,
        face_fallback: str = "none",
        device: str | None = None,
        models_dir: str | None = None,
        offline: bool | None = None,
        cache_dir: str | None = None,
    ) -> MetricModels:
        """IBench's models; each one fails early with a one-line error if unavailable.

        ``lpips=None`` uses LPIPS when the package is installed (else notes that the column is out).
        """
        import importlib.util

        from spatialid.evaluation.aesthetic import load_aesthetic
        from spatialid.evaluation.clip_metrics import ClipScorer
        from spatialid.evaluation.face_metrics import load_face_embedder
        from spatialid.evaluation.fid import FidExtractor
        from spatialid.evaluation.quality import load_quality

        notes: list[str] = []
        clip = ClipScorer.from_open_clip(clip_model, clip_pretrained, device=device, precision=clip_precision,
                                         antialias=clip_antialias, cache_dir=cache_dir)
        if (clip_model, clip_pretrained) != ("ViT-L-14", "openai"):
            notes.append(f"CLIP columns use {clip_model}/{clip_pretrained}, not IBench's OpenAI ViT-L/14.")
        face = load_face_embedder(face_model, device=device, fallback=face_fallback, models_dir=models_dir, offline=offline)
        if face_model == "dlib":
            notes.append("FaceSim uses dlib's 128-d descriptor (offline alternative): not comparable to ArcFace FaceSim in papers.")
        quality = load_quality(iq_metric, device=device, offline=offline)
        aes = None
        if aesthetic:
            aes_clip = clip
            if clip_model not in AESTHETIC_CLIPS or clip_pretrained != "openai":
                aes_clip = ClipScorer.from_open_clip("ViT-L-14", "openai", device=device, precision=clip_precision,
                                                     cache_dir=cache_dir)
            aes = load_aesthetic(aes_clip, models_dir=models_dir, offline=offline)
        fid_model = FidExtractor.real(device=device, offline=offline) if fid else None
        lp = None
        if lpips is None:
            lpips = importlib.util.find_spec("lpips") is not None
            if not lpips:
                notes.append("BG LPIPS left out: the lpips package is not installed (`pip install lpips`).")
        if lpips:
            lp = LpipsDistance(device=device)
        return cls(clip=clip, face=face, quality=quality, lpips=lp, aesthetic=aes, fid=fid_model, notes=notes)


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


def _people_paths(entry: dict, manifest: dict | None, base: Path, id_root: str | None) -> tuple[Path, ...]:
    """Each person's photo of a several-people entry (the manifest's paths, else found like ``id``)."""
    people = entry.get("people")
    if not isinstance(people, list) or not people:
        return ()
    recorded = (manifest or {}).get("identities", {}).get(entry.get("identity_key", ""), {}).get("people") or []
    out = []
    for j, id_string in enumerate(people):
        known = recorded[j].get("path") if j < len(recorded) and isinstance(recorded[j], dict) else None
        if known and Path(known).is_file():
            out.append(Path(known))
            continue
        found = resolve_photo_path(str(id_string), base, id_root)
        if found is None:
            raise BenchStateError(f"photo {id_string} of a group entry not found; pass --id-root with its folder")
        out.append(found)
    return tuple(out)


def _entry_image(value: Any, base: Path, image_root: str | None, what: str, source: Path) -> Path | None:
    """An IBench entry's image path: as written, relative to ``base`` or the cwd, or under ``image_root``."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BenchStateError(f"{source}: {what} must be a path string, got {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        raise BenchStateError(f"{source}: {what} is a URL ({value[:60]}); download the images and give local paths")
    found = resolve_photo_path(value, base, image_root)
    if found is not None:
        return found
    raw = Path(os.path.expanduser(value))
    return raw if raw.is_absolute() else (base / raw)


def _image_path(entry: dict, preset_dir: Path) -> Path:
    rel = entry.get("image")
    if rel and (preset_dir / rel).is_file():
        return preset_dir / rel
    return Path(entry.get("imagewithid", ""))


def _ibench_items(path: Path, name: str, id_root: str | None, image_root: str | None) -> list[EvalItem]:
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("datas"), list):
        raise BenchStateError(f'{path} does not hold IBench results ({{"datas": [...]}})')
    tags = doc.get("tags")
    category = tags.get("category") if isinstance(tags, dict) else None
    if category not in (None, "imageid"):
        raise BenchStateError(f"{path} has IBench category {category!r}; spatialid eval scores 'imageid' results only")
    items = []
    for i, e in enumerate(doc["datas"]):
        if not isinstance(e, dict):
            raise BenchStateError(f"{path}: datas[{i}] is not an object")
        image = _entry_image(e.get("imagewithid"), path.parent, image_root, f"datas[{i}].imagewithid", path)
        if image is None:
            raise BenchStateError(f"{path}: datas[{i}] has no imagewithid")
        without = _entry_image(e.get("imagewithoutid"), path.parent, image_root, f"datas[{i}].imagewithoutid", path)
        prompt = str(e.get("prompt", ""))
        key = str(e.get("key") or f"{e.get('id', '')}|{prompt}|{e.get('num', i)}")
        unit = key.rsplit("/", 1)[0] if e.get("key") else key
        items.append(
            EvalItem(name, key, unit, image, _reference_path(e, None, path.parent, id_root), str(e.get("id", "")),
                     prompt, baseline=None, without_id=without)
        )
    return items


@dataclass(frozen=True)
class PresetGrid:
    """A bench preset's finished items against the grid its ``bench.json`` records."""

    expected: int  # identities x selected prompts x seeds
    missing: tuple[str, ...] = ()  # item keys of the grid with no finished entry, in grid order
    failed: int = 0  # of those, items whose generation failed ("failures" in results.json)


@dataclass
class Sources:
    """What :func:`collect_sources` read: the items to score and, per bench preset, its grid."""

    items: list[EvalItem]
    order: list[str]
    settings: dict[str, Any]
    grids: dict[str, PresetGrid] = field(default_factory=dict)  # bench presets only (not IBench .json methods)


def expected_units(manifest: dict[str, Any]) -> list[str]:
    """Unit keys (``<identity key>/p<prompt>/s<seed>``, as ``BenchItem.unit_key``) of a manifest's grid, in grid order.

    The manifest records the identities and the prompts that were selected (``prompt_ids``; older
    manifests only the ``prompts`` table), and every seed; each preset's grid is their product.
    """
    idents = manifest.get("identities") or {}
    id_keys = sorted(idents, key=lambda k: (int(idents[k].get("index", 0) or 0) if isinstance(idents[k], dict) else 0, k))
    prompt_ids = manifest.get("prompt_ids")
    if not isinstance(prompt_ids, list):
        prompt_ids = sorted(int(k) for k in (manifest.get("prompts") or {}))
    seeds = [int(s) for s in manifest.get("seeds") or []]

    def used(key: str, index: int) -> bool:  # a group of people may be limited to some prompts
        only = idents[key].get("prompt_ids") if isinstance(idents[key], dict) else None
        return not isinstance(only, list) or int(index) in only

    return [f"{k}/p{int(i):03d}/s{s}" for k in id_keys for i in prompt_ids if used(k, i) for s in seeds]


def collect_items(
    sources: Sequence[str | os.PathLike[str]],
    *,
    presets: Sequence[str] | None = None,
    id_root: str | None = None,
    image_root: str | None = None,
) -> tuple[list[EvalItem], list[str], dict[str, Any]]:
    """``(items, preset order, generation settings)`` from bench folders and IBench JSON files."""
    found = collect_sources(sources, presets=presets, id_root=id_root, image_root=image_root)
    return found.items, found.order, found.settings


def collect_sources(
    sources: Sequence[str | os.PathLike[str]],
    *,
    presets: Sequence[str] | None = None,
    id_root: str | None = None,
    image_root: str | None = None,
) -> Sources:
    """The items of bench folders and IBench JSON files, and each bench preset's grid (cheap: no image is read)."""
    items: list[EvalItem] = []
    order: list[str] = []
    settings: dict[str, Any] = {}
    grids: dict[str, PresetGrid] = {}
    for src in sources:
        path = Path(src).resolve()
        if check_source(path) == "ibench":
            name = path.stem
            if name in order:
                raise BenchStateError(f"two sources give the method name {name!r}; rename one results file")
            order.append(name)
            items += _ibench_items(path, name, id_root, image_root)
            continue
        manifest = load_manifest(path)
        assert manifest is not None  # check_source made sure
        settings = settings or dict(manifest.get("settings", {}))
        found = find_presets(path)
        if not found:
            raise BenchStateError(f"{path} holds no results yet; run `spatialid bench` first")
        units = expected_units(manifest)
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
            entries, failures = load_preset_results(path / preset)
            missing = tuple(f"{u}/{preset}" for u in units if f"{u}/{preset}" not in entries)
            grids[preset] = PresetGrid(len(units), missing, sum(k in failures for k in missing))
            for key, e in sorted(entries.items(), key=lambda kv: (kv[1].get("num", 0), kv[0])):
                unit = key.rsplit("/", 1)[0]
                without = None
                if preset != BASELINE_PRESET:
                    without = baselines.get(unit) or _entry_image(
                        e.get("imagewithoutid"), path / preset, image_root, f"{key}: imagewithoutid", path / preset
                    )
                items.append(
                    EvalItem(
                        preset, key, unit, _image_path(e, path / preset), _reference_path(e, manifest, path, id_root),
                        str(e.get("id", "")), e.get("prompt", ""), baselines.get(unit), without,
                        _people_paths(e, manifest, path, id_root),
                    )
                )
    missing_refs = sorted({it.identity for it in items if it.reference is None})
    if missing_refs:
        raise BenchStateError(
            f"{len(missing_refs)} reference photos not found (first: {missing_refs[0]}); pass --id-root with their folder"
        )
    missing_imgs = [it.image for it in items if not it.image.is_file()]
    missing_imgs += [it.without_id for it in items if it.without_id is not None and not it.without_id.is_file()]
    if missing_imgs:
        raise BenchStateError(
            f"{len(missing_imgs)} images are missing (first: {missing_imgs[0]}); pass --image-root with their folder"
        )
    return Sources(items, order, settings, grids)


# ------------------------------------------------------------------------------------- scoring


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _file_stats(item: EvalItem) -> dict[str, Any]:
    """What a cached row depends on: the image, its image without identity and its baseline."""
    return {
        "image": _stat(item.image),
        "without_id": [str(item.without_id), *_stat(item.without_id)] if item.without_id is not None else None,
        "baseline": [str(item.baseline), *_stat(item.baseline)] if item.baseline is not None and item.baseline.is_file() else None,
    }


class _Scorer:
    """Per-image metrics, with features and faces cached per file (baselines are shared by presets).

    Unreadable files are remembered in ``bad`` (path -> reason): an item whose own image is
    unreadable is skipped (:meth:`score` returns None); an unreadable image without identity,
    baseline or reference photo only leaves the columns that need it out of that item's row.
    """

    def __init__(self, models: MetricModels) -> None:
        self.m = models
        self._text: dict[str, Any] = {}
        self._feat: dict[Path, Any] = {}
        self._face: dict[Path, Any] = {}
        self._ref_face: dict[Path, Any] = {}
        self.bad: dict[Path, str] = {}
        self._ok: set[Path] = set()

    def load(self, path: Path) -> Image.Image | None:
        """The image, or None (recorded in ``bad``) when it cannot be decoded."""
        if path in self.bad:
            return None
        try:
            image = load_rgb(path)
        except UnreadableImageError as exc:
            self.bad[path] = exc.reason
            log.warning("skipping unreadable image %s (%s)", path, exc.reason)
            return None
        self._ok.add(path)
        return image

    def readable(self, path: Path | None) -> bool:
        """Whether ``path`` decodes (checked once per file; face models then read it themselves)."""
        if path is None:
            return False
        return path in self._ok or self.load(path) is not None

    def text(self, prompt: str) -> Any:
        if prompt not in self._text:
            self._text[prompt] = self.m.clip.text_features([prompt])[0]
        return self._text[prompt]

    def feature(self, path: Path, image: Image.Image | None = None) -> Any:
        if path not in self._feat:
            self._feat[path] = self.m.clip.image_features([image if image is not None else load_rgb(path)])[0]
        return self._feat[path]

    def face(self, path: Path) -> Any:
        if path not in self._face:
            self._face[path] = self.m.face.analyze_path(path)
        return self._face[path]

    def ref_face(self, path: Path) -> Any:
        if path not in self._ref_face:
            # references are real photos: never use the centre fallback for them
            saved = getattr(self.m.face, "fallback", "none")
            try:
                self.m.face.fallback = "none"
                self._ref_face[path] = self.m.face.analyze_path(path)
            finally:
                self.m.face.fallback = saved
        return self._ref_face[path]

    @staticmethod
    def _mask_inside(item: EvalItem) -> list[float]:
        """Share of each person's recorded mask inside their region (bench groups with regions)."""
        from spatialid.app.metadata import read_png_metadata
        from spatialid.bench.results import masks_file
        from spatialid.evaluation.multi_person import mask_share_inside
        from spatialid.pipeline.people import load_mask_file, regions_tensor

        path = masks_file(item.image)
        if not path.is_file():
            return []
        try:
            boxes = region_boxes(read_png_metadata(item.image).get("regions") or [])
            if boxes is None:
                return []
            masks, _ = load_mask_file(path)
            rows, cols = masks.shape[-2:]
            grid = regions_tensor(boxes, len(boxes), int(rows), int(cols)).reshape(len(boxes), int(rows), int(cols))
            return mask_share_inside(masks.numpy(), grid.numpy())
        except SpatialIDError as exc:
            log.warning("mask in region of %s not scored: %s", item.key, exc)
            return []

    def _people_columns(self, item: EvalItem, image: Image.Image) -> dict[str, Any]:
        """Several people: faces matched to the people (Hungarian), per-person FaceSim and leakage."""
        import numpy as np

        from spatialid.evaluation.multi_person import score_people

        refs = [self.ref_face(p) for p in item.people]
        if any(r is None for r in refs):
            return {"people_ref_faces": sum(r is not None for r in refs)}
        faces = self.m.face.analyze_all(np.asarray(image.convert("RGB")))
        scores = score_people(
            np.stack([f.embedding for f in faces]) if faces else np.zeros((0, len(refs[0].embedding))),
            np.stack([r.embedding for r in refs]),
            boxes=[f.box for f in faces],
        )
        inside = self._mask_inside(item)
        if inside:
            scores.mask_inside = inside
        return {
            **({"mask_in_region": float(np.nanmean(inside))} if inside and not all(math.isnan(v) for v in inside) else {}),
            "person_face_sim": scores.mean_facesim,
            "identity_leakage": scores.mean_leakage,
            "people_found": float(sum(i is not None for i in scores.face_index)) / len(refs),
            "people_swapped": 1.0 if scores.swapped else 0.0,
            "people": scores.to_dict(),
        }

    def score(self, item: EvalItem) -> dict[str, Any] | None:
        """The item's row, or None when its own image cannot be read (``bad`` says why)."""
        try:
            return self._score(item)
        except UnreadableImageError as exc:  # decoded by PIL, refused by a face model's own reader
            self.bad[exc.path] = exc.reason
            log.warning("skipping %s: %s", item.key, exc)
            return None

    def _score(self, item: EvalItem) -> dict[str, Any] | None:
        image = self.load(item.image)
        if image is None:
            return None
        row: dict[str, Any] = {
            "preset": item.preset, "key": item.key, "unit": item.unit_key, "identity": item.identity,
            "prompt": item.prompt, "image": str(item.image),
            "without_id": None,
            "file_stats": _file_stats(item),
        }
        unreadable: dict[str, str] = {}
        without_id, baseline_path, reference = item.without_id, item.baseline, item.reference
        for path in {p for p in (without_id, baseline_path, reference) if p is not None and p.is_file()}:
            if not self.readable(path):
                unreadable[str(path)] = self.bad[path]
        if without_id is not None and str(without_id) in unreadable:
            without_id = None
        if baseline_path is not None and str(baseline_path) in unreadable:
            baseline_path = None
        if reference is not None and str(reference) in unreadable:
            reference = None
        if unreadable:
            row["unreadable"] = unreadable  # kept with the cached row: still reported when it is reused
        row["without_id"] = str(without_id) if without_id is not None else None
        feat = self.feature(item.image, image)
        row["clip_t"] = float((feat * self.text(item.prompt)).sum())
        row["clip_ref"] = float((feat * self.feature(reference)).sum()) if reference else math.nan
        if without_id is not None:
            row["clip_i"] = float((feat * self.feature(without_id)).sum())
        face = None
        if self.m.face is not None:
            face = self.face(item.image)
            ref_face = self.ref_face(reference) if reference else None
            ref_emb = ref_face.embedding if ref_face is not None else None
            row["face_det"] = 1.0 if face is not None and face.detected else 0.0
            row["face_source"] = face.source if face is not None else "none"
            row["face_sim"] = cosine(face.embedding, ref_emb) if face is not None else math.nan
            if reference is not None:
                row["ref_face_found"] = ref_face is not None
            if without_id is not None:
                other = self.face(without_id)
                row["anti_face_sim"] = cosine(other.embedding, ref_emb) if other is not None else math.nan
                row["without_id_face_source"] = other.source if other is not None else "none"
        if item.people and self.m.face is not None and hasattr(self.m.face, "analyze_all"):
            row.update(self._people_columns(item, image))
        if self.m.quality is not None:
            from spatialid.evaluation.quality import IBENCH_VALUE_RANGE

            row["iq"] = float(self.m.quality.score([image], value_range=IBENCH_VALUE_RANGE)[0])
            row["iq_01"] = float(self.m.quality.score([image], value_range=1.0)[0])
        if self.m.aesthetic is not None:
            row["aesthetic"] = float(self.m.aesthetic.score([image])[0])
        if baseline_path is not None and baseline_path.is_file():
            baseline = load_rgb(baseline_path)
            boxes = [face.box] if face is not None else []
            base_face = self.face(baseline_path) if self.m.face is not None else None
            if base_face is not None and base_face.detected:
                boxes.append(base_face.box)
            if boxes:
                mask = face_region_mask(image.width, image.height, boxes)
                row.update(background_change(image, baseline, mask, clip=self.m.clip, lpips_model=self.m.lpips, prompt=item.prompt))
        return row


# ----------------------------------------------------------------------------------------- FID


class _FidCache:
    """FID features per image file (path, size, mtime) in one ``.npz`` next to the report."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.feats: dict[str, np.ndarray] = {}
        self.dirty = False
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    if str(z["fingerprint"]) == fingerprint:
                        self.feats = dict(zip((str(k) for k in z["keys"]), z["feats"]))
            except (OSError, ValueError, KeyError):
                log.warning("FID feature cache %s unreadable; computing the features again", path)

    @staticmethod
    def key(path: Path) -> str:
        size, mtime = _stat(path)
        return f"{path.resolve()}|{size}|{mtime}"

    def get(self, paths: Sequence[Path], extractor: Any, bar: Any = None, bad: dict[str, str] | None = None) -> np.ndarray:
        """Features of the readable ``paths``; an unreadable one is left out and added to ``bad``."""
        out = []
        for p in paths:
            k = self.key(p)
            if k not in self.feats:
                try:
                    image = load_rgb(p)
                except UnreadableImageError as exc:
                    if bad is not None:
                        bad.setdefault(str(p), exc.reason)
                    if bar is not None:
                        bar.update(1)
                    continue
                self.feats[k] = extractor.features([image])[0]
                self.dirty = True
            out.append(self.feats[k])
            if bar is not None:
                bar.update(1)
        return np.stack(out) if out else np.empty((0, extractor.dims), dtype=np.float32)

    def save(self) -> None:
        if not self.dirty or not self.feats:
            return
        import io

        from spatialid.utils.io import atomic_write_bytes

        keys = list(self.feats)
        buffer = io.BytesIO()  # features are small (2048 floats per image): encode, then one atomic write
        np.savez(buffer, fingerprint=np.array(self.fingerprint), keys=np.array(keys), feats=np.stack([self.feats[k] for k in keys]))
        atomic_write_bytes(self.path, buffer.getvalue())


def _fid_summaries(
    items: Sequence[EvalItem], order: Sequence[str], extractor: Any, out: Path, progress: bool,
    bad: dict[str, str] | None = None,
) -> tuple[dict[str, Summary], list[str]]:
    """IBench's FID per preset: its images with identity vs the images without identity.

    Files in ``bad`` (unreadable) are left out of both sets; any other found unreadable is added.
    """
    from spatialid.evaluation.fid import fid_from_features, ibench_fid_files

    nan = math.nan
    bad = bad if bad is not None else {}
    sets: dict[str, tuple[list[Path], list[Path]]] = {}
    notes: list[str] = []
    for p in order:
        mine = [it for it in items if it.preset == p and str(it.image) not in bad]
        if p == BASELINE_PRESET or not mine:
            continue
        with_files = ibench_fid_files(it.image for it in mine)
        without_files = ibench_fid_files(
            it.without_id for it in mine if it.without_id is not None and str(it.without_id) not in bad
        )
        lacking = sum(it.without_id is None for it in mine)
        if lacking and without_files:
            notes.append(f"FID of {p}: {lacking} of {len(mine)} images have no image without identity (left out of that set).")
        if without_files:
            sets[p] = (with_files, without_files)
    cache = _FidCache(out / FID_CACHE_NAME, extractor.label)
    bar = None
    if progress and sets:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(a) + len(b) for a, b in sets.values()), desc="fid", unit="img", dynamic_ncols=True)
    result: dict[str, Summary] = {}
    try:
        for p, (with_files, without_files) in sets.items():
            value = fid_from_features(cache.get(with_files, extractor, bar, bad), cache.get(without_files, extractor, bar, bad))
            if math.isfinite(value):
                result[p] = Summary(value, nan, len(with_files), nan, nan)
            elif len(with_files) >= 2 and len(without_files) >= 2:
                notes.append(f"FID of {p} is not computable (the covariance square root is complex), as IBench would fail.")
    finally:
        if bar is not None:
            bar.close()
        cache.save()
    return result, notes


# -------------------------------------------------------------------------------------- driver


def _row_is_current(hit: dict | None, item: EvalItem) -> bool:
    return hit is not None and hit.get("file_stats") == _file_stats(item)


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
) -> tuple[ReportData, dict[str, Path]]:
    """Score every image of ``sources`` and write the report into ``out_dir``.

    ``models`` may be a factory: it is called only once the sources have been read, so a bad
    source fails in seconds, before minutes of model loading. Presets scored on different items
    are not ranked unless ``allow_incomplete`` (then: on the items every preset has).
    """
    found = collect_sources(sources, presets=presets, id_root=id_root, image_root=image_root)
    items, order, settings = found.items, found.order, found.settings
    if not items:
        raise BenchStateError("no finished images to evaluate")
    out = Path(out_dir)
    check_output_folder(out, "report folder")
    if not isinstance(models, MetricModels):
        models = models()
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

    notes = list(models.notes)
    set_level: dict[str, dict[str, Summary]] = {}
    if models.fid is not None:
        fid, fid_notes = _fid_summaries(items, order, models.fid, out, progress, bad)
        notes += fid_notes
        if fid:
            set_level["fid"] = fid
    metrics = [m for m in METRICS if (any(m.key in r for r in rows) if m.per_image else m.key in set_level)]
    summaries = summaries_for(rows, order, [m for m in metrics if m.per_image])
    empty = Summary(math.nan, math.nan, 0, math.nan, math.nan)
    for key, per_preset in set_level.items():
        for p in order:
            summaries[p][key] = per_preset.get(p, empty)

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
            fid_common, _ = _fid_summaries([it for it in items if it.preset in grids and it.unit_key in common],
                                           shown, models.fid, out, False, bad)
            for p in shown:
                common_summaries[p]["fid"] = fid_common.get(p, empty)
    paired: dict[str, dict] = {}
    ref = reference_preset if reference_preset in order and ranked_on is not None else None
    if ranked_on == RANKED_COMMON and ref not in grids:
        ref = None  # an IBench .json method shares no bench items
    if ref is not None:
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
    )
    files = write_report(data, out, plots=plots)
    return data, files
