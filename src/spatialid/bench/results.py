"""Benchmark output folder: the run manifest and the per-preset results in IBench's format.

Layout of ``OUT/``::

    bench.json                  manifest: generation settings, identities, prompts, presets, seeds,
                                and the grid each selection of inputs was run with (``grids``)
    .spatialid-bench.lock       held by the run using the folder (see :mod:`spatialid.bench.lock`)
    embeddings/                 identity embeddings cached per photo (safetensors)
    <preset>/results.json       IBench results: {"datas": [...], "tags": {...}, "failures": [...]}
    <preset>/images/*.png       one PNG per item, with its settings as PNG text metadata

Each ``results.json`` is what IBench's evaluator reads (``IbenchMain.py --config config/imageid.py
--data results.json``): ``tags.category`` is ``"imageid"`` and every ``datas`` entry starts with
IBench's fields, in this order:

``num``            0, 1, 2, ... in file order (entries ordered by identities file, prompt, seed)
``id``             the identity photo's path exactly as the identities file writes it
``prompt``         the text that was generated (see :func:`~spatialid.bench.datasets.render_prompt`)
``prompt_attr``    copied from the prompts file
``prompt_style``   copied from the prompts file
``imagewithid``    the generated image
``imagewithoutid`` the same prompt and seed without identity (preset ``none``'s image); left out
                   only while that baseline does not exist (``--no-baseline``, or it failed)

Image paths are absolute, or relative to the folder the bench ran in (``--paths relative``), since
IBench opens them from the folder the evaluator runs in. Our own keys follow: ``key``, ``preset``,
``seed``, ``identity_key``, ``identity_index``, ``prompt_index``, ``gender``, ``image`` (path relative
to the preset folder; what spatialid itself reads, so a moved folder still works) and ``id_path``
(where the identity photo was found). IBench ignores keys it does not know, and ``failures``.

Writes are atomic (temporary file + :func:`os.replace`) after every image, so an interrupted run
loses at most the image in progress and never leaves a half-written JSON. Several processes of one
machine (``accelerate launch``) each write their own ``results.part<R>.json``; whoever next runs as
a single writer (or rank 0 at the end of a multi-process run) folds them into ``results.json``.
Readers always take the union of all these files (a part file's entry wins: it is the newer one).
Results files of earlier versions (``num`` = grid unit, no ``imagewithoutid``) are read and
rewritten in this format by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spatialid.bench.datasets import BenchInputError, Identity, PromptSpec, as_json_value
from spatialid.bench.grid import BASELINE_PRESET, BenchItem
from spatialid.errors import SpatialIDError
from spatialid.utils.io import atomic_write_json

__all__ = [
    "IBENCH_KEYS",
    "MANIFEST_NAME",
    "PATH_MODES",
    "RESULTS_NAME",
    "BenchStateError",
    "PathStyle",
    "PresetResults",
    "find_presets",
    "ibench_entry",
    "load_manifest",
    "load_preset_results",
    "masks_file",
    "parse_path_mode",
    "read_json",
    "results_doc",
    "settings_diff",
    "sort_entries",
    "update_manifest",
]

MANIFEST_NAME = "bench.json"
RESULTS_NAME = "results.json"
PART_GLOB = "results.part*.json"
MANIFEST_FORMAT = "spatialid-bench"
MANIFEST_VERSION = 2  # 2: results in IBench's evaluator format (num in file order, imagewithoutid)
RESULTS_VERSION = 2
PATH_MODES = ("absolute", "relative")
# IBench's entry fields (ibench/metrics/*: id, prompt, imagewithid, imagewithoutid are read;
# num, prompt_attr, prompt_style complete the format of its data files), first in every entry.
IBENCH_KEYS = ("num", "id", "prompt", "prompt_attr", "prompt_style", "imagewithid", "imagewithoutid")


class BenchStateError(SpatialIDError, ValueError):
    """A benchmark output folder is inconsistent with the requested run, or its files are damaged."""


# A results file holds ~500 bytes per image: 64 MB is over 100,000 images. A larger file (or /dev/zero
# under a results name) is refused before it is read, so a hostile folder cannot fill the memory.
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of at most ``limit`` bytes; unreadable or invalid -> :class:`BenchStateError` naming the file."""
    from spatialid.utils.io import read_bounded

    try:
        data = read_bounded(path, limit, text=True)
    except ValueError as exc:  # too large, /dev/zero, NUL bytes
        raise BenchStateError(f"{path} {exc}, so it is no file spatialid bench wrote; move it away") from None
    except OSError as exc:
        raise BenchStateError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BenchStateError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    except json.JSONDecodeError as exc:
        raise BenchStateError(
            f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); it was edited or copied partially — "
            "restore it or move it away to regenerate its images"
        ) from None
    except (ValueError, RecursionError):  # a 5000-digit number, nesting thousands deep
        raise BenchStateError(f"{path} holds JSON spatialid bench never writes (huge numbers or deep nesting); "
                              "restore it or move it away") from None


# what each manifest field must be (merge and resume read them): checked once, when the manifest is read
_MANIFEST_TYPES = (
    ("settings", dict, "an object"), ("identities", dict, "an object"), ("prompts", dict, "an object"),
    ("presets", list, "a list"), ("seeds", list, "a list"), ("grids", list, "a list"), ("inputs", dict, "an object"),
)


def _check_manifest(path: Path, doc: dict[str, Any]) -> None:
    def bad(what: str) -> BenchStateError:
        return BenchStateError(f"{path}: {what}; the manifest was edited or damaged: restore it or use a new --out")

    for key, kind, name in _MANIFEST_TYPES:
        if key in doc and not isinstance(doc[key], kind):
            raise bad(f'"{key}" is not {name}')
    if not all(isinstance(v, dict) for v in (doc.get("identities") or {}).values()):
        raise bad('an entry of "identities" is not an object')
    prompts = doc.get("prompts") or {}
    if not all(k.isascii() and k.isdigit() and len(k) < 10 and isinstance(v, dict) for k, v in prompts.items()):
        raise bad('"prompts" must map prompt indices to objects')
    if not all(isinstance(p, str) for p in doc.get("presets") or []):
        raise bad('"presets" must be preset names')
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in doc.get("seeds") or []):
        raise bad('"seeds" must be whole numbers')
    if doc.get("paths") is not None and doc["paths"] not in PATH_MODES:
        raise bad(f'"paths" must be one of {", ".join(PATH_MODES)}')
    for grid in doc.get("grids") or []:
        keys, indices = (grid.get("identities", []), grid.get("prompt_ids", [])) if isinstance(grid, dict) else (None, None)
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys) and isinstance(indices, list)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in indices)):
            raise bad('a "grids" entry is not {"inputs": ..., "identities": [keys], "prompt_ids": [indices]}')


# -------------------------------------------------------------------------------------- manifest


def load_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a bench folder, or None when the folder has none."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise BenchStateError(f"{path} is not a spatialid bench manifest")
    _check_manifest(path, doc)
    return doc


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every setting that differs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def parse_path_mode(mode: str | None) -> str:
    """``--paths``: ``absolute`` (default) or ``relative`` (to the folder the command runs in)."""
    value = (mode or "absolute").strip().lower()
    if value not in PATH_MODES:
        raise BenchInputError(f"--paths must be absolute or relative, got {mode!r}")
    return value


def update_manifest(
    out_dir: str | os.PathLike[str],
    *,
    settings: Mapping[str, Any],
    identities: Sequence[Identity],
    prompts: Sequence[PromptSpec],
    presets: Sequence[str],
    seeds: Sequence[int],
    baseline: bool,
    paths: str | None = None,
    inputs: Mapping[str, Any] | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Check the requested run against ``OUT/bench.json`` and add its grid to it.

    Resuming or extending a run (more identities, prompts, presets, seeds) is allowed; changing a
    generation setting (steps, size, model, ...) or what a prompt index / identity key means is
    not, since the folder's images would then mix two experiments. ``prompt_ids`` records every
    prompt index of the folder; ``paths`` (the results' path style) and ``inputs`` (the files and
    selection of the latest run) are recorded too but may change between runs.

    ``grids`` records, per ``inputs`` (the same files and selection), the identity keys and prompt
    indices the folder was run with: the same command finding fewer of them (a photo deleted
    from an ``--ids`` folder, a prompt removed) is refused instead of silently shrinking the grid.
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
    if inputs is not None:
        _check_grid(doc, inputs, identities, prompts)
    doc["format_version"] = MANIFEST_VERSION
    doc["prompt_ids"] = sorted(int(k) for k in known_prompts)
    doc["presets"] = list(dict.fromkeys([*doc.get("presets", []), *presets]))
    doc["seeds"] = list(dict.fromkeys([*doc.get("seeds", []), *(int(s) for s in seeds)]))
    doc["baseline"] = bool(doc.get("baseline")) or bool(baseline)
    doc["paths"] = parse_path_mode(paths or doc.get("paths"))
    if inputs is not None:
        doc["inputs"] = dict(inputs)
    if write:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / MANIFEST_NAME, doc)
    return doc


def _check_grid(doc: dict[str, Any], inputs: Mapping[str, Any], identities: Sequence[Identity], prompts: Sequence[PromptSpec]) -> None:
    """Refuse a run whose inputs, read the same way as before, now give a smaller grid; record it."""
    signature = json.loads(json.dumps(dict(inputs), default=str))
    grids: list[dict[str, Any]] = doc.setdefault("grids", [])
    keys = [ident.key for ident in identities]
    indices = [int(p.index) for p in prompts]
    record = next((g for g in grids if isinstance(g, dict) and g.get("inputs") == signature), None)
    if record is None:
        grids.append({"inputs": signature, "identities": keys, "prompt_ids": indices})
        return
    have_keys, have_indices = set(keys), set(indices)
    lost_ids = [k for k in record.get("identities", []) if k not in have_keys]
    if lost_ids:
        known = doc.get("identities", {})
        names = [Path(str(known.get(k, {}).get("id", k)).replace("\\", "/")).name for k in lost_ids]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        n = len(lost_ids)
        raise BenchStateError(
            f"--ids {signature.get('ids')} no longer gives {n} identit{'y' if n == 1 else 'ies'} this folder's grid was "
            f"started with ({shown}; {len(record['identities'])} then, {len(keys)} now): restore the missing "
            "photo or entry to resume, or use a new --out for the smaller grid"
        )
    lost_prompts = [i for i in record.get("prompt_ids", []) if i not in have_indices]
    if lost_prompts:
        known_p = doc.get("prompts", {})
        first = lost_prompts[0]
        text = known_p.get(str(first), {}).get("prompt", "")
        more = f" (and {len(lost_prompts) - 1} more)" if len(lost_prompts) > 1 else ""
        raise BenchStateError(
            f"--prompts {signature.get('prompts')} no longer has prompt {first} ({text!r}){more} that this folder's grid "
            "was started with: restore the prompts file to resume, or use a new --out for the smaller grid"
        )
    record["identities"] = list(dict.fromkeys([*record.get("identities", []), *keys]))
    record["prompt_ids"] = sorted(set(record.get("prompt_ids", [])) | have_indices)


# --------------------------------------------------------------------------------------- results


class PathStyle:
    """How image paths are written for IBench: absolute, or relative to ``base`` (default: cwd).

    String operations only (no file system calls), since every entry is formatted on every write.
    """

    def __init__(self, mode: str = "absolute", base: str | os.PathLike[str] | None = None) -> None:
        self.mode = parse_path_mode(mode)
        self.base = os.path.abspath(os.fspath(base) if base is not None else os.getcwd())

    def __call__(self, absolute: str) -> str:
        if self.mode == "absolute":
            return absolute
        return Path(os.path.relpath(absolute, self.base)).as_posix()


def _entry_image(entry: Mapping[str, Any]) -> str:
    """An entry's image path relative to its preset folder (older entries: from ``imagewithid``)."""
    rel = entry.get("image")
    if isinstance(rel, str) and rel:
        return rel
    return f"images/{Path(str(entry.get('imagewithid', ''))).name}"


def ibench_entry(entry: Mapping[str, Any], preset: str, out_abs: str, style: PathStyle) -> dict[str, Any]:
    """``entry`` with IBench's fields first and its image paths (re)derived for this folder.

    ``imagewithoutid`` is the baseline image of the same item (``none/<image>``; image names do not
    depend on the preset) when that file exists; a ``none`` entry is its own baseline.
    """
    rel = _entry_image(entry)
    image_abs = os.path.join(out_abs, preset, rel)
    baseline_abs = image_abs if preset == BASELINE_PRESET else os.path.join(out_abs, BASELINE_PRESET, rel)
    out: dict[str, Any] = {
        "num": entry.get("num", 0),
        "id": entry.get("id", ""),
        "prompt": entry.get("prompt", ""),
        "prompt_attr": entry.get("prompt_attr", []),
        "prompt_style": entry.get("prompt_style", []),
        "imagewithid": style(image_abs),
    }
    if preset == BASELINE_PRESET or os.path.isfile(baseline_abs):
        out["imagewithoutid"] = style(baseline_abs)
    for k, v in entry.items():
        if k not in IBENCH_KEYS:
            out[k] = v
    out["image"] = rel
    return out


def _order(entry: Mapping[str, Any]) -> tuple:
    index = entry.get("identity_index")
    key = str(entry.get("key", ""))
    try:
        if isinstance(index, int):
            return (0, index, int(entry.get("prompt_index", 0) or 0), int(entry.get("seed", 0) or 0), key)
        return (1, int(entry.get("num", 0) or 0), 0, 0, key)  # an older entry: num was its grid unit
    except (TypeError, ValueError):
        return (2, 0, 0, 0, key)


def sort_entries(entries: Iterable[dict]) -> list[dict]:
    """Results entries in file order: identities file, prompt index, seed (then key)."""
    return sorted(entries, key=_order)


def results_doc(tags: Mapping[str, Any], entries: Iterable[dict], failures: Iterable[dict]) -> dict[str, Any]:
    """The results document: entries sorted and numbered 0, 1, 2, ... (``num`` = position)."""
    datas = []
    for i, entry in enumerate(sort_entries(entries)):
        entry = dict(entry)
        entry["num"] = i
        datas.append(entry)
    return {
        "datas": datas,
        "tags": {**dict(tags), "category": "imageid"},
        "failures": sort_entries(failures),
    }


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


def _read_results_file(path: Path) -> dict[str, Any]:
    """One results file, checked: IBench results that spatialid wrote (every entry has a ``key``)."""
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("datas", []), list):
        raise BenchStateError(f'{path} does not hold IBench results ({{"datas": [...]}})')
    if not isinstance(doc.get("failures") or [], list) or not isinstance(doc.get("tags") or {}, dict):
        raise BenchStateError(f'{path}: "failures" must be a list and "tags" an object, as spatialid bench writes them; '
                              f"move that file out of {path.parent} (or use a new --out) and run again")
    for i, entry in enumerate(doc.get("datas", [])):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise BenchStateError(
                f"{path}: entry {i} has no bench \"key\", so it was not written by spatialid bench; "
                f"move that file out of {path.parent} (or use a new --out) and run again"
            )
    return doc


def load_preset_results(preset_dir: str | os.PathLike[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """``(entries by key, failures by key)``: the union of ``results.json`` and part files.

    Part files are newer than ``results.json`` (a single writer folds and removes them), so their
    entries win. A failure is dropped when its key also finished (a later retry succeeded).
    """
    entries: dict[str, dict] = {}
    failures: dict[str, dict] = {}
    for path in _result_files(Path(preset_dir)):
        doc = _read_results_file(path)
        for entry in doc.get("datas", []):
            entries[entry["key"]] = entry
        for fail in doc.get("failures", []) or []:
            if isinstance(fail, dict) and isinstance(fail.get("key"), str):
                failures[fail["key"]] = fail
    for key in list(failures):
        if key in entries:
            del failures[key]
    return entries, failures


class PresetResults:
    """The results file of one preset, as written by one process.

    ``part=None``: the single writer; it adopts every part file left by an earlier multi-process
    run into ``results.json`` and removes them, and rewrites an older-format ``results.json`` in
    today's format. ``part=R``: process R of a multi-process run; it writes
    ``results.part<R>.json`` only (no two processes ever write the same file). ``paths`` is the
    style of the image paths written for IBench (see :class:`PathStyle`).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        preset: str,
        *,
        tags: Mapping[str, Any],
        part: int | None = None,
        paths: str = "absolute",
        base: str | os.PathLike[str] | None = None,
    ) -> None:
        self.preset = preset
        self.out = Path(out_dir)
        self.dir = self.out / preset
        self.images_dir = self.dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._out_abs = str(self.out.resolve())
        self.style = PathStyle(paths, base)
        self.part = part
        self.path = self.dir / (RESULTS_NAME if part is None else f"results.part{part}.json")
        main = self.dir / RESULTS_NAME
        old_doc = _read_results_file(main) if main.is_file() else None
        stored_tags = dict(old_doc.get("tags") or {}) if old_doc else {}
        self.tags = {**stored_tags, **dict(tags), "results_version": RESULTS_VERSION, "paths": self.style.mode}
        done, all_failures = load_preset_results(self.dir)
        self.done = {k: self._link(e) for k, e in done.items()}
        if part is None:
            self.entries = dict(self.done)
            self.failures = dict(all_failures)
            parts = sorted(self.dir.glob(PART_GLOB))
            if parts or (old_doc is not None and self._doc() != old_doc):
                self.write()
                for p in parts:
                    with contextlib.suppress(OSError):
                        p.unlink()
        else:
            own = self.path
            entries, self.failures = ({}, {}) if not own.is_file() else load_preset_results_file(own)
            self.entries = {k: self.done[k] if k in self.done else self._link(e) for k, e in entries.items()}

    def _link(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        return ibench_entry(entry, self.preset, self._out_abs, self.style)

    def image_path(self, item: BenchItem) -> Path:
        return self.images_dir / item.image_name

    def is_done(self, item: BenchItem) -> bool:
        """Finished = recorded with the prompt this run generates, and its image still on disk.

        An entry whose prompt differs (a results file of a version that rendered prompts another
        way) is not this item: it is generated again.
        """
        path = self.recorded_image(item)
        return path is not None and path.is_file()

    def recorded_image(self, item: BenchItem) -> Path | None:
        """The image file this folder's entry of ``item`` names (None: no entry for this item's prompt)."""
        entry = self.done.get(item.key)
        if entry is None or entry.get("prompt") != item.prompt_text:
            return None
        return self.dir / _entry_image(entry)

    def forget(self, item: BenchItem) -> bool:
        """Drop a finished entry whose image turned out damaged (write after); True when there was one.

        A part writer can only drop it from its own file; readers still see the entry of
        ``results.json`` until the item is made again (a part file's entry wins).
        """
        found = self.done.pop(item.key, None) is not None
        return self.entries.pop(item.key, None) is not None or found

    def entry_for(self, item: BenchItem, image_path: Path) -> dict[str, Any]:
        image_path = Path(image_path)
        try:
            rel = image_path.relative_to(self.dir).as_posix()
        except ValueError:
            rel = image_path.resolve().relative_to(self.dir.resolve()).as_posix()
        return self._link(
            {
                "id": item.identity.id,
                "prompt": item.prompt_text,
                "prompt_attr": as_json_value(item.prompt.prompt_attr),
                "prompt_style": as_json_value(item.prompt.prompt_style),
                "key": item.key,
                "preset": item.preset,
                "seed": item.seed,
                "identity_key": item.identity.key,
                "identity_index": item.identity.index,
                "prompt_index": item.prompt.index,
                "gender": item.identity.gender,
                "image": rel,
                "id_path": self.style(str(item.identity.path)),
                # several people in one image: each person's photo (eval matches faces to them)
                **(
                    {"people": [m.id for m in item.identity.members],
                     "people_paths": [self.style(str(m.path)) for m in item.identity.members]}
                    if item.identity.is_group else {}
                ),
            }
        )

    def refresh(self, item: BenchItem) -> bool:
        """Rewrite a finished item's entry in today's format; True when it changed (write after)."""
        old = self.done.get(item.key)
        if old is None:
            return False
        new = self.entry_for(item, self.dir / _entry_image(old))
        if {k: v for k, v in new.items() if k != "num"} == {k: v for k, v in old.items() if k != "num"}:
            return False
        self.done[item.key] = new
        self.entries[item.key] = new
        return True

    def link_baselines(self) -> bool:
        """Add ``imagewithoutid`` to entries whose baseline appeared since; True when any did."""
        changed = False
        for store in (self.done, self.entries):
            for key, entry in store.items():
                if "imagewithoutid" not in entry:
                    linked = self._link(entry)
                    if "imagewithoutid" in linked:
                        store[key] = linked
                        changed = True
        return changed

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
            "identity_index": item.identity.index,
            "prompt_index": item.prompt.index,
            "error": f"{type(error).__name__}: {message}",
        }
        self.failures[item.key] = fail
        self.write()
        return fail

    def _doc(self) -> dict[str, Any]:
        return results_doc(self.tags, self.entries.values(), (f for k, f in self.failures.items() if k not in self.entries))

    def write(self) -> None:
        atomic_write_json(self.path, self._doc())

    def consolidate(self) -> None:
        """Fold every part file into ``results.json`` (call when no other process is writing)."""
        entries, failures = load_preset_results(self.dir)
        doc = results_doc(self.tags, (self._link(e) for e in entries.values()), failures.values())
        atomic_write_json(self.dir / RESULTS_NAME, doc)
        for p in sorted(self.dir.glob(PART_GLOB)):
            with contextlib.suppress(OSError):
                p.unlink()


def masks_file(image: Path) -> Path:
    """``<preset>/images/x.png`` -> ``<preset>/masks/x.safetensors`` (the people's recorded masks)."""
    return image.parent.parent / "masks" / f"{image.stem}.safetensors"


def load_preset_results_file(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Entries and failures of one results file (no union)."""
    doc = _read_results_file(path)
    entries = {e["key"]: e for e in doc.get("datas", [])}
    failures = {f["key"]: f for f in doc.get("failures", []) or [] if isinstance(f, dict) and isinstance(f.get("key"), str)}
    return entries, failures
