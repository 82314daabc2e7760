"""Benchmark files that pair people with their own prompts: XVerseBench and MultiHuman-Testbench.

Both list *items*: one prompt and the photos of the people (and, in XVerseBench, objects) to put in
it. Each item becomes one identity of the grid (a group of people for 2+) limited to its own prompt
(``prompt_ids``), and its prompt becomes a :class:`PromptSpec` whose index is the item's position in
the file, so ``--prompt-ids`` / ``--limit-prompts`` / ``--limit-ids`` select items and keys stay those
of the file. The format is told from the content (:func:`ids_format`), never from the file name.

* XVerseBench (``bytedance/XVerse``, ``eval/tools/XVerseBench_single.json`` and
  ``XVerseBench_multi.json``): a JSON list of ``{"index", "prompt", "input_images", "position_delta",
  "modulation": [{"type": "adapter", "src_inputs": [{"image_path":
  "assets/XVerseBench/human/05_man.jpg", "caption": "a man"}, ...], "use_words": [[0, "man", "man"],
  [1, "man", "man", 2]]}]}``. ``use_words`` binds input ``i`` to words of the prompt (XVerse's
  ``generate.py``: ``[input, caption word, prompt word, occurrence]``, occurrence 1 when left out,
  so ``[1, "man", "man", 2]`` in "A man is standing beside another man." is the second "man").
  People are the inputs under a ``human/`` folder (the repository's ``assets/XVerseBench/{human,
  object,animal}`` layout); their prompt words are kept (:attr:`Identity.words`), the other inputs are
  listed as not used (:attr:`Identity.not_used`; their photos are not in the repository and are not
  looked for), and items without a person are skipped. Paths are relative to the XVerse checkout:
  ``--id-root XVerse``.
* MultiHuman-Testbench (``Qualcomm-AI-research/MultiHuman-Testbench``,
  ``data/multihuman_metadata.json``): a JSON list of ``{"people": ["data/faces/ffhq_36466.jpg", ...],
  "prompt", "identifier": ["woman", "man", ...], "attributes", "vlm_questions", "pose_image",
  "omnigen_prompt", "omnigen_pose_prompt"}``, 1,800 samples of 1-5 people whose faces are downloaded
  separately (its ``data_generation/download_faces.py`` writes ``data/faces/``): ``--id-root`` the
  checkout (or the faces folder). Its OmniGen prompt names the people left to right, as the
  pipeline places unbound people; its prompt binds no words. Samples with more people than the
  pipeline takes (:data:`MAX_GROUP_SIZE`) are skipped, and counted in the note.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spatialid.bench.datasets import (
    IMAGE_SUFFIXES,
    MAX_GROUP_SIZE,
    BenchInputError,
    Identity,
    PromptSpec,
    _photo_id,
    _read_json,
    identity_key,
    load_identities,
    load_prompts,
    render_prompt,
    resolve_photo_path,
)

__all__ = [
    "BenchInputs",
    "IBENCH",
    "MULTIHUMAN",
    "XVERSE",
    "ids_format",
    "load_bench_inputs",
    "read_items",
]

XVERSE = "xversebench"
MULTIHUMAN = "multihuman-testbench"
IBENCH = "ibench"  # IBench's {"datas": [...]}, a plain JSON list of photos, or {"groups": [...]}
_ITEM_FORMATS = (XVERSE, MULTIHUMAN)
_KEY_TAG = {XVERSE: "xv", MULTIHUMAN: "mh"}
# MultiHuman-Testbench's identifier -> the gender word IBench's files use (fills {person}; its prompts have none)
_IDENTIFIER_GENDER = {"woman": "female", "man": "male", "girl": "female", "boy": "male"}
_MALE_WORDS = {"man", "boy", "men", "boys", "gentleman", "father", "husband", "son", "king", "guy"}
_FEMALE_WORDS = {"woman", "girl", "women", "girls", "lady", "mother", "wife", "daughter", "queen"}
_UNKNOWN = (
    "give an IBench identities .json, a {\"groups\": [...]} file, XVerseBench's XVerseBench_multi.json / "
    "XVerseBench_single.json, MultiHuman-Testbench's multihuman_metadata.json, a folder of photos or one photo"
)


@dataclass(frozen=True)
class _Person:
    id: str
    gender: str = ""
    words: str | None = None
    occurrence: int = 1
    caption: str | None = None


@dataclass(frozen=True)
class _Item:
    index: int
    prompt: str
    people: tuple[_Person, ...]
    not_used: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchInputs:
    """What ``--ids`` (and ``--prompts``) give the bench: the identities, the prompts, the format read,
    and one line on what was left out (XVerseBench's objects, items without a person), or ""."""

    identities: list[Identity]
    prompts: list[PromptSpec]
    format: str
    note: str = ""
    counts: dict[int, int] = field(default_factory=dict)  # people per item -> items used (item files)


# ----------------------------------------------------------------------------------- detection


def _kind(doc: Any) -> str | None:
    """The item format of a parsed JSON document, or None when it is not an item file."""
    if not isinstance(doc, list) or not doc or not isinstance(doc[0], dict):
        return None
    first = doc[0]
    if "modulation" in first and "prompt" in first:
        return XVERSE
    if "people" in first and "prompt" in first:
        return MULTIHUMAN
    return None


def ids_format(source: str | os.PathLike[str]) -> str:
    """``"folder"``, ``"photo"``, ``"ibench"`` (IBench's ids, a JSON list of photos, or a groups file),
    ``"xversebench"`` or ``"multihuman-testbench"``, told from the content; a one-line error otherwise."""
    path = Path(source)
    if not path.exists():
        raise BenchInputError(f"identities {path} does not exist ({_UNKNOWN})")
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "photo"
    if path.suffix.lower() != ".json":
        raise BenchInputError(f"identities {path}: unsupported file type {path.suffix or '(none)'}; {_UNKNOWN}")
    doc = _read_json(path, "identities")
    kind = _kind(doc)
    if kind is not None:
        return kind
    if isinstance(doc, dict) and ("datas" in doc or "groups" in doc):
        return IBENCH
    if isinstance(doc, list) and doc and all(isinstance(e, str) or (isinstance(e, dict) and "id" in e) for e in doc):
        return IBENCH
    raise BenchInputError(f"identities file {path}: unknown format; {_UNKNOWN}")


# ------------------------------------------------------------------------------------- parsing


def _gender_of(words: str | None) -> str:
    last = (words or "").strip().lower().split(" ")[-1:]
    if last and last[0] in _MALE_WORDS:
        return "male"
    if last and last[0] in _FEMALE_WORDS:
        return "female"
    return ""


def _is_human(image_path: str) -> bool:
    """XVerseBench keeps people under ``assets/XVerseBench/human/`` (objects and animals beside it)."""
    parts = image_path.replace("\\", "/").split("/")
    return len(parts) >= 2 and parts[-2].lower() == "human"


def _xverse_item(i: int, entry: Any, where: str) -> _Item:
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise BenchInputError(f'{where}: item {i} has no "prompt" text (XVerseBench format)')
    mods = entry.get("modulation")
    if not isinstance(mods, list) or not mods or not isinstance(mods[0], dict):
        raise BenchInputError(f'{where}: item {i} has no "modulation" list (XVerseBench format)')
    inputs = mods[0].get("src_inputs")
    if not isinstance(inputs, list) or not all(isinstance(s, dict) and _photo_id(s.get("image_path")) for s in inputs):
        raise BenchInputError(f'{where}: item {i}: "src_inputs" must list {{"image_path": ..., "caption": ...}}')
    use_words = mods[0].get("use_words") or []
    if not isinstance(use_words, list):
        raise BenchInputError(f'{where}: item {i}: "use_words" must be a list of [input, caption word, prompt word(, occurrence)]')
    bound: dict[int, tuple[str, int]] = {}
    for u in use_words:
        ok = isinstance(u, list) and len(u) in (3, 4) and isinstance(u[0], int) and not isinstance(u[0], bool)
        ok = ok and isinstance(u[2], str) and bool(u[2].strip()) and (len(u) == 3 or (isinstance(u[3], int) and not isinstance(u[3], bool) and u[3] >= 1))
        if not ok or not 0 <= u[0] < len(inputs):
            raise BenchInputError(
                f'{where}: item {i}: a "use_words" entry is [input, caption word, prompt word, occurrence], got {u!r}'
            )
        if u[0] in bound:
            raise BenchInputError(f'{where}: item {i} binds input {u[0]} to words twice in "use_words"')
        bound[u[0]] = (u[2], u[3] if len(u) == 4 else 1)
    people, not_used = [], []
    for j, src in enumerate(inputs):
        if not _is_human(src["image_path"]):
            not_used.append(src["image_path"])
            continue
        words, occurrence = bound.get(j, (None, 1))
        caption = src.get("caption") if isinstance(src.get("caption"), str) else None
        people.append(_Person(src["image_path"], _gender_of(words or caption), words, occurrence, caption))
    return _Item(i, entry["prompt"], tuple(people), tuple(not_used))


def _multihuman_item(i: int, entry: Any, where: str) -> _Item:
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise BenchInputError(f'{where}: sample {i} has no "prompt" text (MultiHuman-Testbench format)')
    faces = entry.get("people")
    if not isinstance(faces, list) or not faces or not all(_photo_id(f) for f in faces):
        raise BenchInputError(f'{where}: sample {i}: "people" must list the face photos (e.g. "data/faces/ffhq_1.jpg")')
    names = entry.get("identifier")
    if names is not None and (not isinstance(names, list) or len(names) != len(faces)):
        raise BenchInputError(f'{where}: sample {i}: "identifier" must give one word per person of "people"')
    names = names or [None] * len(faces)
    people = tuple(_Person(f, _IDENTIFIER_GENDER.get(str(n).lower(), "") if n else "", None, 1, n if isinstance(n, str) else None) for f, n in zip(faces, names))
    return _Item(i, entry["prompt"], people)


def read_items(path: str | os.PathLike[str]) -> tuple[str, list[_Item]]:
    """``(format, items)`` of an XVerseBench or MultiHuman-Testbench file, every item checked."""
    path = Path(path)
    doc = _read_json(path, "identities")
    kind = _kind(doc)
    if kind is None:
        raise BenchInputError(f"{path} is not an XVerseBench or MultiHuman-Testbench file; {_UNKNOWN}")
    where = f"{'XVerseBench' if kind == XVERSE else 'MultiHuman-Testbench'} file {path}"
    parse = _xverse_item if kind == XVERSE else _multihuman_item
    items = [parse(i, entry, where) for i, entry in enumerate(doc)]
    for item in items:
        if len({os.path.normpath(p.id) for p in item.people}) != len(item.people):
            raise BenchInputError(f"{where}: item {item.index} lists the same photo twice; its people are different people")
        if not render_prompt(item.prompt, None):
            raise BenchInputError(f"{where}: item {item.index}'s prompt is empty once [...] notes are removed")
    return kind, items


# ------------------------------------------------------------------------------------ identities


def _item_identity(kind: str, item: _Item, found: Sequence[Path]) -> Identity:
    members = tuple(
        Identity(identity_key(p.id), p.id, f, p.gender, {"caption": p.caption} if p.caption else {}, index=j, words=p.words, occurrence=p.occurrence)
        for j, (p, f) in enumerate(zip(item.people, found))
    )
    ident_id = " + ".join(m.id for m in members)
    slug = "+".join(m.key.rsplit("-", 1)[0][:12] for m in members)
    digest = hashlib.sha1(f"{kind}|{item.index}|{ident_id}".encode("utf-8")).hexdigest()[:6]
    # one key per item (not per photo): the manifest records each item's own prompt and words under it
    key = f"{_KEY_TAG[kind]}{item.index:04d}-{slug}-{digest}"
    common: dict[str, Any] = {"index": item.index, "prompt_ids": (item.index,), "not_used": item.not_used}
    if len(members) == 1:
        (m,) = members
        return Identity(key, m.id, m.path, m.gender, m.extra, words=m.words, occurrence=m.occurrence, **common)
    return Identity(key, ident_id, members[0].path, "", members=members, **common)


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _load_items(
    path: Path,
    *,
    id_root: str | os.PathLike[str] | None,
    ids: Sequence[int] | None,
    limit: int | None,
) -> BenchInputs:
    kind, items = read_items(path)
    name = "XVerseBench" if kind == XVERSE else "MultiHuman-Testbench"
    if ids is not None:
        beyond = [i for i in sorted(set(ids)) if i >= len(items)]
        if beyond:
            raise BenchInputError(f"--prompt-ids {beyond[0]}: {name} file {path} has {len(items)} items (indices 0-{len(items) - 1})")
        wanted = set(ids)
        items = [it for it in items if it.index in wanted]
    no_person = [it for it in items if not it.people]
    too_many = [it for it in items if len(it.people) > MAX_GROUP_SIZE]
    used = [it for it in items if 1 <= len(it.people) <= MAX_GROUP_SIZE]
    if limit:
        used = used[:limit]
    if not used:
        raise BenchInputError(f"{name} file {path}: no item with 1 to {MAX_GROUP_SIZE} people among those selected")
    missing: list[str] = []
    identities: list[Identity] = []
    for item in used:
        found = []
        for person in item.people:
            photo = resolve_photo_path(person.id, path.parent, id_root)
            if photo is None:
                missing.append(person.id)
            found.append(photo or Path(person.id))
        identities.append(_item_identity(kind, item, found))
    if missing:
        where = f" under --id-root {id_root}" if id_root is not None else ""
        hint = "your XVerse checkout" if kind == XVERSE else "your MultiHuman-Testbench checkout, after its download_faces.py"
        raise BenchInputError(
            f"{_plural(len(missing), 'face photo')} of {name} file {path} not found{where} (first: {missing[0]}); "
            f"pass --id-root with the folder that holds them ({hint})"
        )
    prompts = [PromptSpec(item.index, item.prompt) for item in used]
    counts: dict[int, int] = {}
    for item in used:
        counts[len(item.people)] = counts.get(len(item.people), 0) + 1
    parts = [f"{name}: {_plural(len(used), 'item')} used ("
             + ", ".join(f"{counts[k]} with {_plural(k, 'person', 'people')}" for k in sorted(counts)) + ")"]
    if no_person:
        parts.append(f"{_plural(len(no_person), 'item')} without a person skipped")
    if too_many:
        parts.append(f"{_plural(len(too_many), 'item')} with more than {MAX_GROUP_SIZE} people skipped (the pipeline's limit)")
    objects = sum(len(it.not_used) for it in used)
    if objects:
        parts.append(f"{_plural(objects, 'object/animal input')} of the items used not used (identity photos only)")
    return BenchInputs(identities, prompts, kind, "; ".join(parts), counts)


def load_bench_inputs(
    ids: str | os.PathLike[str],
    prompts: str | os.PathLike[str] | None = None,
    *,
    id_root: str | os.PathLike[str] | None = None,
    limit_ids: int | None = None,
    limit_prompts: int | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> BenchInputs:
    """Read ``--ids`` and ``--prompts`` whatever their format (see the module text).

    IBench's files, groups files, folders and photos need ``prompts``; XVerseBench and
    MultiHuman-Testbench files carry theirs (``prompts`` left out, or the same file). For those,
    ``prompt_ids`` selects items by position, and ``limit_prompts`` / ``limit_ids`` keep the first N
    items left; only the photos of the items kept must exist.
    """
    kind = ids_format(ids)
    if kind not in _ITEM_FORMATS:
        if prompts is None:
            raise BenchInputError(
                f"--prompts is required with --ids {ids} (IBench identities, groups, a folder or a photo); "
                "only XVerseBench and MultiHuman-Testbench files carry their own prompts"
            )
        identities = load_identities(ids, id_root=id_root, limit=limit_ids)
        return BenchInputs(identities, load_prompts(prompts, limit=limit_prompts, ids=prompt_ids), kind)
    if prompts is not None and Path(prompts).resolve() != Path(ids).resolve():
        raise BenchInputError(
            f"--ids {ids} is {'an XVerseBench' if kind == XVERSE else 'a MultiHuman-Testbench'} file, whose items pair "
            "people with their own prompts: leave out --prompts (select items with --prompt-ids / --limit-ids)"
        )
    limits = [n for n in (limit_ids, limit_prompts) if n]
    return _load_items(Path(ids), id_root=id_root, ids=prompt_ids, limit=min(limits) if limits else None)
