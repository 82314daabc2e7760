"""Other photos of the same person ("GT"): what CP (copy-paste) and Sim(GT) compare against.

WithAnyone's MultiID-Bench pairs each reference photo with a ground-truth photo of the same person;
CP and Sim(GT) need one. Where they come from (checked before any metric model loads):

* ``eval --gt FOLDER``: for a reference ``.../alice.jpg``, every image in ``FOLDER/alice/`` and any
  ``FOLDER/alice.<ext>`` (a same-named photo in another folder, i.e. another photo of alice);
* ``eval --gt FILE.json``: an IBench-style identities file with several photos per identity,
  ``{"datas": [{"id": ["alice_1.jpg", "alice_2.jpg"]}, {"id": "bob.jpg", "gt": ["bob_2.jpg"]}]}``
  (the first photo of a list is the reference, the others its GT), or a plain mapping
  ``{"alice_1.jpg": ["alice_2.jpg"], ...}``; relative paths are read from the file's folder (or
  ``--id-root``);
* a results entry's own ``gt`` / ``gt_paths`` (a path or a list; per person for group entries).

A reference is looked up by its full path, then its file name, then its stem. A GT that is the
reference file itself is dropped (it would make CP 0 by definition, not by merit).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from spatialid.bench.datasets import IMAGE_SUFFIXES, resolve_photo_path
from spatialid.evaluation.inputs import EvalInputError

__all__ = ["GtIndex", "attach_gt", "entry_gt", "load_gt_index"]


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise EvalInputError(f"a GT photo must be a path or a list of paths, got {type(value).__name__}")


class GtIndex:
    """Reference photo -> other photos of that person (see the module text)."""

    def __init__(self, folder: Path | None = None, table: dict[str, tuple[Path, ...]] | None = None) -> None:
        self.folder = folder
        self.table = table or {}

    def lookup(self, photo: Path) -> tuple[Path, ...]:
        photo = Path(photo)
        found: list[Path] = []
        for key in (str(photo.resolve()), photo.name, photo.stem):
            if key in self.table:
                found = list(self.table[key])
                break
        if self.folder is not None:
            sub = self.folder / photo.stem
            if sub.is_dir():
                found += sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            found += sorted(p for p in self.folder.iterdir()
                            if p.is_file() and p.stem == photo.stem and p.suffix.lower() in IMAGE_SUFFIXES)
        own = photo.resolve()
        return tuple(dict.fromkeys(p for p in found if p.resolve() != own))


def _resolve(value: str, base: Path, id_root: str | None, where: str) -> Path:
    found = resolve_photo_path(value, base, id_root)
    if found is None:
        raise EvalInputError(f"GT photo {value} ({where}) not found; fix the path or pass --id-root with its folder")
    return found


def load_gt_index(path: str | os.PathLike[str], id_root: str | None = None) -> GtIndex:
    """Read ``--gt`` (a folder or a JSON file); every photo it names must exist (one-line error otherwise)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalInputError(f"--gt {p} does not exist; give a folder of other photos per person or a JSON file")
    if p.is_dir():
        return GtIndex(folder=p)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalInputError(f"--gt {p} is not a readable JSON file ({type(exc).__name__}); give a folder or a JSON file") from None
    pairs: list[tuple[str, list[str], str]] = []
    if isinstance(doc, dict) and isinstance(doc.get("datas"), list):
        for i, e in enumerate(doc["datas"]):
            if not isinstance(e, dict):
                raise EvalInputError(f"--gt {p}: datas[{i}] is not an object")
            ids = _as_list(e.get("id"))
            if not ids:
                raise EvalInputError(f"--gt {p}: datas[{i}] has no id")
            pairs.append((ids[0], ids[1:] + _as_list(e.get("gt")), f"datas[{i}]"))
    elif isinstance(doc, dict):
        pairs = [(str(k), _as_list(v), str(k)) for k, v in doc.items()]
    else:
        raise EvalInputError(f'--gt {p}: expected {{"datas": [...]}} or {{"reference": ["other photo", ...]}}')
    table: dict[str, tuple[Path, ...]] = {}
    for ref, gts, where in pairs:
        paths = tuple(_resolve(g, p.parent, id_root, where) for g in gts)
        ref_path = resolve_photo_path(ref, p.parent, id_root)
        keys = [str(ref_path.resolve())] if ref_path is not None else []
        keys += [Path(ref).name, Path(ref).stem]
        for key in keys:
            table[key] = tuple(dict.fromkeys(table.get(key, ()) + paths))
    return GtIndex(table=table)


def entry_gt(entry: dict, base: Path, id_root: str | None, people: int) -> tuple[tuple[Path, ...], ...]:
    """A results entry's own ``gt`` / ``gt_paths``: per person (a list of lists for a group)."""
    value = entry.get("gt_paths", entry.get("gt"))
    if value is None:
        return ()
    per = value if people > 1 and isinstance(value, list) and all(isinstance(v, list) for v in value) else [value]
    return tuple(tuple(_resolve(g, base, id_root, f"entry {entry.get('key', '')}") for g in _as_list(v)) for v in per)


def attach_gt(items: Iterable[Any], index: GtIndex | None) -> list[Any]:
    """Each item with its people's GT photos (an entry's own ones first, then ``--gt``'s)."""
    out = []
    for item in items:
        persons: Sequence[Path] = item.people or ((item.reference,) if item.reference is not None else ())
        own = list(item.gt) + [()] * (len(persons) - len(item.gt))
        gt = tuple(
            tuple(dict.fromkeys(list(own[j]) + (list(index.lookup(ph)) if index is not None else [])))
            for j, ph in enumerate(persons)
        )
        out.append(replace(item, gt=gt) if any(gt) else item)
    return out
