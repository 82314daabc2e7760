"""Join the outputs of several bench runs (shards of one grid, or extensions of it) into one folder.

Item keys do not depend on the shard, so merging is a union by key: images are copied into the
target's ``<preset>/images/``, results entries are rewritten to point at the copies, and the
manifests' grids are united. Runs with different generation settings are refused (their images are
different experiments). When two sources hold the same item, the first source wins; if their bytes
differ (e.g. a non-deterministic GPU kernel) this is counted and logged, never silently mixed.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spatialid.bench.results import (
    MANIFEST_NAME,
    RESULTS_NAME,
    BenchStateError,
    atomic_write_json,
    find_presets,
    load_manifest,
    load_preset_results,
    settings_diff,
    sort_entries,
)

__all__ = ["MergeSummary", "merge_runs"]

log = logging.getLogger("spatialid.bench")


@dataclass
class MergeSummary:
    presets: dict[str, int] = field(default_factory=dict)  # preset -> entries in the merged results
    copied: int = 0
    identical: int = 0
    conflicts: list[str] = field(default_factory=list)
    failures: int = 0

    def line(self) -> str:
        per = ", ".join(f"{p}: {n}" for p, n in self.presets.items())
        extra = f"; {len(self.conflicts)} items differed between sources (first kept)" if self.conflicts else ""
        return f"merged {sum(self.presets.values())} images ({per}); {self.copied} copied, {self.failures} failures kept{extra}"


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _merge_manifests(docs: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    base_path, base = docs[0]
    merged = {**base, "identities": dict(base.get("identities", {})), "prompts": dict(base.get("prompts", {}))}
    merged["presets"] = list(base.get("presets", []))
    merged["seeds"] = list(base.get("seeds", []))
    for path, doc in docs[1:]:
        diff = settings_diff(base.get("settings", {}), doc.get("settings", {}))
        if diff:
            raise BenchStateError(f"cannot merge {path} with {base_path}: different settings ({'; '.join(diff)})")
        for key, ident in doc.get("identities", {}).items():
            old = merged["identities"].get(key)
            if old is not None and old.get("id") != ident.get("id"):
                raise BenchStateError(f"cannot merge {path}: identity key {key} means {old.get('id')!r} and {ident.get('id')!r}")
            merged["identities"].setdefault(key, ident)
        for index, prompt in doc.get("prompts", {}).items():
            old = merged["prompts"].get(index)
            if old is not None and old.get("prompt") != prompt.get("prompt"):
                raise BenchStateError(f"cannot merge {path}: prompt {index} differs ({old.get('prompt')!r} vs {prompt.get('prompt')!r})")
            merged["prompts"].setdefault(index, prompt)
        merged["presets"] = list(dict.fromkeys([*merged["presets"], *doc.get("presets", [])]))
        merged["seeds"] = list(dict.fromkeys([*merged["seeds"], *doc.get("seeds", [])]))
        merged["baseline"] = bool(merged.get("baseline")) or bool(doc.get("baseline"))
    merged["prompts"] = dict(sorted(merged["prompts"].items(), key=lambda kv: int(kv[0])))
    return merged


def merge_runs(sources: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> MergeSummary:
    """Merge bench folders ``sources`` into ``out_dir`` (which may be one of them, or new)."""
    if not sources:
        raise BenchStateError("nothing to merge: give one or more bench output folders")
    out = Path(out_dir)
    resolved_out = out.resolve()
    docs: list[tuple[Path, dict[str, Any]]] = []
    for src in sources:
        path = Path(src)
        if not path.is_dir():
            raise BenchStateError(f"{path} is not a folder (give the --out folders of the bench runs)")
        doc = load_manifest(path)
        if doc is None:
            raise BenchStateError(f"{path} has no {MANIFEST_NAME}: not a spatialid bench output folder")
        docs.append((path, doc))
    if out.exists() and not out.is_dir():
        raise BenchStateError(f"--out {out} exists and is not a folder")
    existing = load_manifest(out) if out.is_dir() else None
    if existing is not None and all(p.resolve() != resolved_out for p, _ in docs):
        docs.insert(0, (out, existing))
    manifest = _merge_manifests(docs)
    out.mkdir(parents=True, exist_ok=True)

    summary = MergeSummary()
    presets = list(dict.fromkeys(p for path, _ in docs for p in find_presets(path)))
    tags_by_preset: dict[str, dict] = {}
    for preset in presets:
        target_dir = out / preset
        (target_dir / "images").mkdir(parents=True, exist_ok=True)
        merged: dict[str, dict] = {}
        failures: dict[str, dict] = {}
        for path, _ in docs:
            src_dir = path / preset
            if not src_dir.is_dir():
                continue
            entries, fails = load_preset_results(src_dir)
            for candidate in sorted(src_dir.glob("results*.json")):

                tags = json.loads(candidate.read_text(encoding="utf-8")).get("tags")
                if tags:
                    tags_by_preset.setdefault(preset, tags)
                    break
            for key, fail in fails.items():
                failures.setdefault(key, fail)
            for key, entry in entries.items():
                rel = entry.get("image") or f"images/{Path(entry.get('imagewithid', '')).name}"
                src_img = src_dir / rel
                if not src_img.is_file():
                    src_img = Path(entry.get("imagewithid", ""))
                if not src_img.is_file():
                    log.warning("%s: image of %s missing; left out", src_dir, key)
                    continue
                dst_img = target_dir / rel
                if key in merged:
                    if src_img.resolve() != dst_img.resolve() and not filecmp.cmp(src_img, dst_img, shallow=False):
                        summary.conflicts.append(key)
                        log.warning("item %s differs between sources; keeping the first", key)
                    continue
                dst_img.parent.mkdir(parents=True, exist_ok=True)
                if src_img.resolve() != dst_img.resolve():
                    if dst_img.is_file() and filecmp.cmp(src_img, dst_img, shallow=False):
                        summary.identical += 1
                    else:
                        _copy_atomic(src_img, dst_img)
                        summary.copied += 1
                new_entry = dict(entry)
                new_entry["image"] = rel
                new_entry["imagewithid"] = str(dst_img.resolve())
                merged[key] = new_entry
        for key in list(failures):
            if key in merged:
                del failures[key]
        doc = {
            "tags": tags_by_preset.get(preset, {"category": "imageid", "preset": preset}),
            "datas": sort_entries(merged.values()),
            "failures": sort_entries(failures.values()),
        }
        atomic_write_json(target_dir / RESULTS_NAME, doc)
        for part in target_dir.glob("results.part*.json"):
            part.unlink()
        summary.presets[preset] = len(merged)
        summary.failures += len(failures)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return summary
