"""Join the outputs of several bench runs (shards of one grid, or extensions of it) into one folder.

Item keys do not depend on the shard, so merging is a union by key: images are copied into the
target's ``<preset>/images/``, results entries are rewritten to point at the copies (in the path
style of the target's manifest, and renumbered 0, 1, 2, ... in file order, with ``imagewithoutid``
pointing at the merged baseline), and the manifests' grids are united. Runs with different generation settings are refused (their images are
different experiments). When two sources hold the same item, the first source wins; if their bytes
differ (e.g. a non-deterministic GPU kernel) this is counted and logged, never silently mixed.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spatialid.bench.grid import BASELINE_PRESET
from spatialid.bench.lock import bench_lock
from spatialid.bench.results import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    RESULTS_NAME,
    BenchStateError,
    PathStyle,
    find_presets,
    ibench_entry,
    load_manifest,
    load_preset_results,
    parse_path_mode,
    read_json,
    results_doc,
    settings_diff,
)
from spatialid.bench.runner import clean_temp_files
from spatialid.utils.io import atomic_path, atomic_write_json

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
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _entry_rel(entry: dict[str, Any], src_dir: Path, key: str) -> str:
    """The image path of a results entry, relative to its preset folder (checked to be text)."""
    rel = entry.get("image")
    if rel in (None, ""):
        withid = entry.get("imagewithid", "")
        if not isinstance(withid, str):
            raise BenchStateError(f"{src_dir}: entry {key!r} has a non-text \"imagewithid\" ({type(withid).__name__}); "
                                  "give folders written by spatialid bench")
        rel = f"images/{Path(withid).name}"
    if not isinstance(rel, str):
        raise BenchStateError(f"{src_dir}: entry {key!r} has a non-text \"image\" ({type(rel).__name__}); "
                              "give folders written by spatialid bench")
    return rel


def _inside(folder: Path, rel: str, src_dir: Path, key: str, field_name: str, base: Path | None = None) -> Path:
    """``(base or folder) / rel``, refused unless it resolves inside ``folder`` (a results file names no path outside it)."""
    bad = "\0" in rel
    if not bad:
        path = (folder if base is None else base) / rel
        try:
            bad = not path.resolve().is_relative_to(folder.resolve())
        except (OSError, ValueError, RuntimeError):
            bad = True
    if bad:
        raise BenchStateError(
            f"{src_dir}: entry {key!r} names {field_name} {rel!r}, which is outside {folder}; "
            "a results file may only name images inside its own folder"
        )
    return path


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
    grids: list[dict[str, Any]] = []
    for _, doc in docs:  # the grid each input selection was run with, united over the sources
        for g in doc.get("grids", []) or []:
            if not isinstance(g, dict):
                continue
            same = next((h for h in grids if h["inputs"] == g.get("inputs")), None)
            if same is None:
                grids.append({"inputs": g.get("inputs"), "identities": list(g.get("identities", [])), "prompt_ids": list(g.get("prompt_ids", []))})
            else:
                same["identities"] = list(dict.fromkeys([*same["identities"], *g.get("identities", [])]))
                same["prompt_ids"] = sorted(set(same["prompt_ids"]) | set(g.get("prompt_ids", [])))
    if grids:
        merged["grids"] = grids
    merged["prompts"] = dict(sorted(merged["prompts"].items(), key=lambda kv: int(kv[0])))
    merged["prompt_ids"] = [int(k) for k in merged["prompts"]]
    merged["format_version"] = MANIFEST_VERSION
    merged["paths"] = parse_path_mode(base.get("paths"))
    return merged


def merge_runs(sources: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> MergeSummary:
    """Merge bench folders ``sources`` into ``out_dir`` (which may be one of them, or new).

    Holds ``out_dir`` exclusively (:func:`~spatialid.bench.lock.bench_lock`): a bench still writing
    into it would lose entries, so merging into a folder in use is refused.
    """
    if not sources:
        raise BenchStateError("nothing to merge: give one or more bench output folders")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BenchStateError(f"--out {out} exists and is not a folder")
    for src in sources:
        if not Path(src).is_dir():
            raise BenchStateError(f"{src} is not a folder (give the --out folders of the bench runs)")
        if load_manifest(src) is None:
            raise BenchStateError(f"{src} has no {MANIFEST_NAME}: not a spatialid bench output folder")
    with bench_lock(out) as lock:
        if lock.depth == 1:
            clean_temp_files(out)
        return _merge_locked(sources, out)


def _merge_locked(sources: list[str | os.PathLike[str]], out_dir: Path) -> MergeSummary:
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
    # the baseline first, so that the other presets' imagewithoutid finds the merged copies
    presets.sort(key=lambda p: p != BASELINE_PRESET)
    style = PathStyle(manifest["paths"])
    out_abs = str(out.resolve())
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
                doc = read_json(candidate)  # bounded; any file there may be hostile
                tags = doc.get("tags") if isinstance(doc, dict) else None
                if tags and isinstance(tags, dict):
                    tags_by_preset.setdefault(preset, tags)
                    break
            for key, fail in fails.items():
                failures.setdefault(key, fail)
            for key, entry in entries.items():
                rel = _entry_rel(entry, src_dir, key)
                src_img = _inside(src_dir, rel, src_dir, key, "image")
                if not src_img.is_file() and isinstance(entry.get("imagewithid"), str) and entry["imagewithid"]:
                    src_img = _inside(src_dir, entry["imagewithid"], src_dir, key, "imagewithid", base=Path.cwd())
                if not src_img.is_file():
                    log.warning("%s: image of %s missing; left out", src_dir, key)
                    continue
                dst_img = _inside(target_dir, rel, src_dir, key, "image")
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
                merged[key] = ibench_entry(new_entry, preset, out_abs, style)
        for key in list(failures):
            if key in merged:
                del failures[key]
        tags = {**tags_by_preset.get(preset, {"preset": preset}), "paths": style.mode}
        doc = results_doc(tags, merged.values(), failures.values())
        atomic_write_json(target_dir / RESULTS_NAME, doc)
        for part in target_dir.glob("results.part*.json"):
            part.unlink()
        summary.presets[preset] = len(merged)
        summary.failures += len(failures)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return summary
