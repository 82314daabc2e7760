"""Benchmark output folder: the run manifest and the per-preset results in IBench's format.

Layout of ``OUT/``::

    bench.json                  manifest: generation settings, identities, prompts, presets, seeds
    embeddings/                 identity embeddings cached per photo (safetensors)
    <preset>/results.json       IBench results: {"tags": {...}, "datas": [...], "failures": [...]}
    <preset>/images/*.png       one PNG per item, with its settings as PNG text metadata

Each ``datas`` entry has IBench's fields ``num, id, prompt, prompt_attr, prompt_style, imagewithid``
(``imagewithid`` = absolute image path, as IBench's scripts expect) plus ``key``, ``seed``,
``preset``, ``identity_key``, ``prompt_index``, ``gender`` and ``image`` (path relative to the preset
folder, which survives moving the folder). ``num`` is the item's unit number in the full grid, so it
is the same in every preset and in every shard. Readers of IBench's format ignore the extra keys.

Writes are atomic (temporary file + :func:`os.replace`) after every image, so an interrupted run
loses at most the image in progress and never leaves a half-written JSON. Several processes of one
machine (``accelerate launch``) each write their own ``results.part<R>.json``; whoever next runs as
a single writer (or rank 0 at the end of a multi-process run) folds them into ``results.json``.
Readers always take the union of all these files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spatialid.bench.datasets import Identity, PromptSpec
from spatialid.bench.grid import BenchItem
from spatialid.errors import SpatialIDError

__all__ = [
    "MANIFEST_NAME",
    "RESULTS_NAME",
    "BenchStateError",
    "PresetResults",
    "atomic_write_json",
    "find_presets",
    "load_manifest",
    "load_preset_results",
    "read_json",
    "settings_diff",
    "sort_entries",
    "update_manifest",
]

MANIFEST_NAME = "bench.json"
RESULTS_NAME = "results.json"
PART_GLOB = "results.part*.json"
MANIFEST_FORMAT = "spatialid-bench"
MANIFEST_VERSION = 1


class BenchStateError(SpatialIDError, ValueError):
    """A benchmark output folder is inconsistent with the requested run, or its files are damaged."""


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and :func:`os.replace` (never half-written)."""
    from spatialid.pipeline.metadata import atomic_write

    payload = json.dumps(data, indent=2, ensure_ascii=False, default=str).encode("utf-8")
    with atomic_write(path, "wb") as handle:
        handle.write(payload)


def read_json(path: Path) -> Any:
    """Parse a JSON file; unreadable or invalid -> :class:`BenchStateError` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchStateError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BenchStateError(
            f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); it was edited or copied partially — "
            "restore it or move it away to regenerate its images"
        ) from None


# -------------------------------------------------------------------------------------- manifest


def load_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a bench folder, or None when the folder has none."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise BenchStateError(f"{path} is not a spatialid bench manifest")
    return doc


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every setting that differs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def update_manifest(
    out_dir: str | os.PathLike[str],
    *,
    settings: Mapping[str, Any],
    identities: Sequence[Identity],
    prompts: Sequence[PromptSpec],
    presets: Sequence[str],
    seeds: Sequence[int],
    baseline: bool,
    write: bool = True,
) -> dict[str, Any]:
    """Check the requested run against ``OUT/bench.json`` and add its grid to it.

    Resuming or extending a run (more identities, prompts, presets, seeds) is allowed; changing a
    generation setting (steps, size, model, ...) or what a prompt index / identity key means is
    not, since the folder's images would then mix two experiments.
    """
    from spatialid import __version__

    doc = load_manifest(out_dir) or {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "spatialid_version": __version__,
        "settings": dict(settings),
        "identities": {},
        "prompts": {},
        "presets": [],
        "seeds": [],
        "baseline": bool(baseline),
    }
    diff = settings_diff(doc.get("settings", {}), dict(settings))
    if diff and not any(load_preset_results(Path(out_dir) / p)[0] for p in find_presets(out_dir)):
        doc["settings"] = dict(settings)  # no image made yet under the old settings: nothing to protect
        diff = []
    if diff:
        raise BenchStateError(
            f"{Path(out_dir)} holds a run with other settings ({'; '.join(diff)}); use a new --out folder "
            "or the same settings to resume"
        )
    known_ids: dict[str, Any] = doc.setdefault("identities", {})
    for ident in identities:
        old = known_ids.get(ident.key)
        if old is not None and old.get("id") != ident.id:
            raise BenchStateError(f"identity key {ident.key} meant {old.get('id')!r} in this folder, now {ident.id!r}; use a new --out")
        known_ids[ident.key] = ident.to_dict()
    known_prompts: dict[str, Any] = doc.setdefault("prompts", {})
    for prompt in prompts:
        old = known_prompts.get(str(prompt.index))
        if old is not None and old.get("prompt") != prompt.template:
            raise BenchStateError(
                f"prompt {prompt.index} of this folder was {old.get('prompt')!r}, now {prompt.template!r}: "
                "the prompts file changed; use a new --out"
            )
        known_prompts[str(prompt.index)] = prompt.to_dict()
    doc["presets"] = list(dict.fromkeys([*doc.get("presets", []), *presets]))
    doc["seeds"] = list(dict.fromkeys([*doc.get("seeds", []), *(int(s) for s in seeds)]))
    doc["baseline"] = bool(doc.get("baseline")) or bool(baseline)
    if write:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / MANIFEST_NAME, doc)
    return doc


# --------------------------------------------------------------------------------------- results


def _result_files(preset_dir: Path) -> list[Path]:
    files = sorted(preset_dir.glob(PART_GLOB))
    main = preset_dir / RESULTS_NAME
    return ([main] if main.is_file() else []) + files


def find_presets(out_dir: str | os.PathLike[str]) -> list[str]:
    """Preset folders of a bench folder (those holding results files), in name order."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _result_files(p))


def load_preset_results(preset_dir: str | os.PathLike[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """``(entries by key, failures by key)``: the union of ``results.json`` and part files.

    A failure is dropped when its key also finished (a later retry succeeded).
    """
    entries: dict[str, dict] = {}
    failures: dict[str, dict] = {}
    for path in _result_files(Path(preset_dir)):
        doc = read_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("datas", []), list):
            raise BenchStateError(f'{path} does not hold IBench results ({{"datas": [...]}})')
        for entry in doc.get("datas", []):
            if isinstance(entry, dict) and "key" in entry:
                entries.setdefault(entry["key"], entry)
        for fail in doc.get("failures", []) or []:
            if isinstance(fail, dict) and "key" in fail:
                failures[fail["key"]] = fail
    for key in list(failures):
        if key in entries:
            del failures[key]
    return entries, failures


def sort_entries(entries: Iterable[dict]) -> list[dict]:
    """Results entries in grid order (``num``, then key)."""
    return sorted(entries, key=lambda e: (int(e.get("num", 0)), str(e.get("key", ""))))


class PresetResults:
    """The results file of one preset, as written by one process.

    ``part=None``: the single writer; it adopts every part file left by an earlier multi-process
    run into ``results.json`` and removes them. ``part=R``: process R of a multi-process run; it
    writes ``results.part<R>.json`` only (no two processes ever write the same file).
    """

    def __init__(self, out_dir: str | os.PathLike[str], preset: str, *, tags: Mapping[str, Any], part: int | None = None) -> None:
        self.preset = preset
        self.dir = Path(out_dir) / preset
        self.images_dir = self.dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.tags = dict(tags)
        self.part = part
        self.path = self.dir / (RESULTS_NAME if part is None else f"results.part{part}.json")
        self.done, all_failures = load_preset_results(self.dir)
        if part is None:
            self.entries = dict(self.done)
            self.failures = dict(all_failures)
            parts = sorted(self.dir.glob(PART_GLOB))
            if parts:
                self.write()
                for p in parts:
                    with contextlib.suppress(OSError):
                        p.unlink()
        else:
            own = self.path
            self.entries, self.failures = ({}, {}) if not own.is_file() else load_preset_results_file(own)

    def image_path(self, item: BenchItem) -> Path:
        return self.images_dir / item.image_name

    def is_done(self, item: BenchItem) -> bool:
        """Finished = recorded in a results file and its image still on disk."""
        entry = self.done.get(item.key)
        if entry is None:
            return False
        rel = entry.get("image")
        path = self.dir / rel if rel else Path(entry.get("imagewithid", ""))
        return path.is_file()

    def entry_for(self, item: BenchItem, image_path: Path) -> dict[str, Any]:
        return {
            "num": item.unit,
            "id": item.identity.id,
            "prompt": item.prompt_text,
            "prompt_attr": list(item.prompt.prompt_attr),
            "prompt_style": list(item.prompt.prompt_style),
            "imagewithid": str(Path(image_path).resolve()),
            "key": item.key,
            "preset": item.preset,
            "seed": item.seed,
            "identity_key": item.identity.key,
            "prompt_index": item.prompt.index,
            "gender": item.identity.gender,
            "image": Path(image_path).resolve().relative_to(self.dir.resolve()).as_posix(),
        }

    def record_success(self, item: BenchItem, image_path: Path) -> dict[str, Any]:
        entry = self.entry_for(item, image_path)
        self.entries[item.key] = entry
        self.done[item.key] = entry
        self.failures.pop(item.key, None)
        self.write()
        return entry

    def record_failure(self, item: BenchItem, error: BaseException) -> dict[str, Any]:
        message = " ".join(str(error).split()) or type(error).__name__
        fail = {
            "key": item.key,
            "num": item.unit,
            "id": item.identity.id,
            "prompt": item.prompt_text,
            "seed": item.seed,
            "preset": item.preset,
            "error": f"{type(error).__name__}: {message}",
        }
        self.failures[item.key] = fail
        self.write()
        return fail

    def write(self) -> None:
        doc = {
            "tags": self.tags,
            "datas": sort_entries(self.entries.values()),
            "failures": sort_entries(f for k, f in self.failures.items() if k not in self.entries),
        }
        atomic_write_json(self.path, doc)

    def consolidate(self) -> None:
        """Fold every part file into ``results.json`` (call when no other process is writing)."""
        entries, failures = load_preset_results(self.dir)
        doc = {"tags": self.tags, "datas": sort_entries(entries.values()), "failures": sort_entries(failures.values())}
        atomic_write_json(self.dir / RESULTS_NAME, doc)
        for p in sorted(self.dir.glob(PART_GLOB)):
            with contextlib.suppress(OSError):
                p.unlink()


def load_preset_results_file(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Entries and failures of one results file (no union)."""
    doc = read_json(path)
    entries = {e["key"]: e for e in doc.get("datas", []) if isinstance(e, dict) and "key" in e}
    failures = {f["key"]: f for f in doc.get("failures", []) or [] if isinstance(f, dict) and "key" in f}
    return entries, failures
