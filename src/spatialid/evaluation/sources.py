"""What an evaluation scores: the items of bench output folders and IBench results files.

Reads only JSON and file names (no image is opened, no model loaded), so a wrong source fails in
seconds: a bench preset's items are counted against the grid its ``bench.json`` records
(:class:`PresetGrid`), the no-identity baseline ``none`` of the same prompt and seed becomes each
item's ``imagewithoutid`` and background baseline, and missing photos or images are refused with
the option that fixes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spatialid.bench.datasets import resolve_photo_path
from spatialid.bench.grid import BASELINE_PRESET
from spatialid.bench.results import (
    BenchStateError,
    find_presets,
    load_manifest,
    load_preset_results,
    read_json,
)
from spatialid.evaluation.gt_photos import entry_gt
from spatialid.evaluation.inputs import check_source

__all__ = ["EvalItem", "PresetGrid", "Sources", "collect_items", "collect_sources", "expected_units"]


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
    gt: tuple[tuple[Path, ...], ...] = ()  # per person (or the one reference): other photos of them (CP, Sim(GT))


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
                     prompt, baseline=None, without_id=without, gt=entry_gt(e, path.parent, id_root, 1))
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
                people = _people_paths(e, manifest, path, id_root)
                items.append(
                    EvalItem(
                        preset, key, unit, _image_path(e, path / preset), _reference_path(e, manifest, path, id_root),
                        str(e.get("id", "")), e.get("prompt", ""), baselines.get(unit), without,
                        people, entry_gt(e, path, id_root, max(len(people), 1)),
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
