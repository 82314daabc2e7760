"""Readers for benchmark inputs: identities (photos) and prompts.

Two layouts are accepted for each input:

* IBench's JSON files. Identities: ``{"datas": [{"num": 0, "id": "/abs/path/photo.jpg", "gender": "male"}],
  "tags": {"category": "imageid"}}`` (``data/images/chineseid_images.json``); prompts: ``{"datas":
  [{"num": 0, "prompt": "...", "prompt_attr": [...], "prompt_style": [...]}]}``. Some IBench prompt
  files write ``{person}`` and ``[...]`` notes (``unsplash50_template.json``: "[portrait,] a {person}
  wearing a spacesuit"); ``human_longer_template.json`` writes "man" / "woman" into the text and has
  neither.
* Plain files: a folder of photos (one identity per photo, gender unknown -> "person") or a single
  photo, and a text file with one prompt per line (blank lines and lines starting with ``#`` skipped).

Prompts are rendered exactly as the SpatialID authors' ``test_ibench_spatial.py`` (``process_prompts``)
and ``ablation_study.py`` do, so the text generated and written to the results is theirs byte for
byte: :func:`render_prompt`.

Several people per image: an identities JSON with ``{"groups": [...]}`` lists groups instead of
single photos; each group is one "identity" of the grid whose members are generated together
(``people=`` of the pipeline), see :func:`load_identities`.

Benchmark files that pair people with their own prompts (XVerseBench, MultiHuman-Testbench) are read
by :mod:`spatialid.bench.datasets_multi`, whose ``load_bench_inputs`` reads any ``--ids`` / ``--prompts``.

IBench's identity files hold absolute paths from the machine they were made on; ``id_root`` lets a
relocated checkout be used without editing the JSON (see :func:`resolve_photo_path`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spatialid.errors import SpatialIDError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_GROUP_SIZE",
    "BenchInputError",
    "check_unique_keys",
    "Identity",
    "PromptSpec",
    "identity_key",
    "load_identities",
    "load_prompts",
    "parse_prompt_ids",
    "PERSON_WORDS",
    "WHOLE_IMAGE",
    "region_boxes",
    "person_word",
    "render_prompt",
    "resolve_photo_path",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MAX_GROUP_SIZE = 4  # people per image (the pipeline's limit)

# test_ibench_spatial.py / ablation_study.py: re.sub(r'\[.*?\]', '', prompt) -- shortest bracket
# pair, no newline inside, replaced by nothing.
_BRACKETS = re.compile(r"\[.*?\]")
# their mapping {"female": "woman", "male": "man"}, anything else -> "person" (case-sensitive)
PERSON_WORDS: Mapping[str, str] = {"female": "woman", "male": "man"}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class BenchInputError(SpatialIDError, ValueError):
    """A benchmark input file (identities, prompts, grid options) is missing or malformed."""


# ---------------------------------------------------------------------------------------- prompts


def person_word(gender: str | None) -> str:
    """The word that replaces ``{person}``: the authors' mapping, exactly (``"Female"`` -> "person").

    Exact rather than forgiving so that a prompt the bench generates is the prompt the authors'
    script generates for the same identities file.
    """
    return PERSON_WORDS.get(gender, "person") if isinstance(gender, str) else "person"


def render_prompt(template: str, gender: str | None) -> str:
    """The authors' ``process_prompts``: drop ``[...]`` notes, fill ``{person}``, strip the ends.

    Nothing else is tidied (inner double spaces and a space before a comma stay), because IBench's
    CLIP-T scores the text written in the results file, and that must be the text generated.
    """
    text = _BRACKETS.sub("", template)
    text = text.replace("{person}", person_word(gender))
    return text.strip()


@dataclass(frozen=True)
class PromptSpec:
    """One prompt template; ``index`` is its position in the prompts file (part of item keys).

    ``prompt_attr`` / ``prompt_style`` keep the prompts file's values (lists as tuples, so the spec
    stays hashable); the results file copies them back unchanged.
    """

    index: int
    template: str
    prompt_attr: Any = ()
    prompt_style: Any = ()

    def render(self, gender: str | None) -> str:
        return render_prompt(self.template, gender)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "prompt": self.template,
            "prompt_attr": as_json_value(self.prompt_attr),
            "prompt_style": as_json_value(self.prompt_style),
        }


def _frozen(value: Any) -> Any:
    """A prompts-file value made hashable: lists (nested too) become tuples, missing becomes ()."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) if isinstance(v, (list, tuple)) else v for v in value)
    return value


def as_json_value(value: Any) -> Any:
    """Inverse of :func:`_frozen` for writing JSON: tuples back to lists."""
    if isinstance(value, tuple):
        return [as_json_value(v) for v in value]
    return value


# An identities or prompts file is at most a few MB (IBench's are kB); larger ones, /dev/zero or a
# fifo under that name, are refused after this many bytes instead of filling the memory.
MAX_INPUT_FILE_BYTES = 16 * 2**20


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of an input file of at most :data:`MAX_INPUT_FILE_BYTES` (one line otherwise)."""
    from spatialid.utils.io import read_bounded

    try:
        data = read_bounded(path, MAX_INPUT_FILE_BYTES, text=True)
    except OSError as exc:
        raise BenchInputError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # too large, /dev/zero, NUL bytes
        raise BenchInputError(f"{what} file {path} {exc}; give a text file of at most {MAX_INPUT_FILE_BYTES // 2**20} MB") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BenchInputError(f"{what} file {path} is not UTF-8 text") from None


def _read_json(path: Path, what: str) -> Any:
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchInputError(f"{what} file {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (ValueError, RecursionError):  # a 5000-digit number, nesting thousands deep
        raise BenchInputError(f"{what} file {path} holds JSON no {what} file has (huge numbers or deep nesting)") from None


def _datas(doc: Any, path: Path, what: str) -> list[Any]:
    datas = doc.get("datas") if isinstance(doc, dict) else doc if isinstance(doc, list) else None
    if not isinstance(datas, list):
        raise BenchInputError(f'{what} file {path} must hold {{"datas": [...]}} (IBench format) or a JSON list')
    if not datas:
        raise BenchInputError(f"{what} file {path} lists no entries")
    return datas


def parse_index_list(text: str | Sequence[int], *, what: str, example: str, max_span: int = 10000) -> list[int]:
    """``"0,1,5"`` / ``"0-4"`` / mixed (or a sequence of ints) -> distinct non-negative ints in the order given.

    One parser for ``--seeds`` and ``--prompt-ids``; a range spans at most ``max_span`` values.
    """
    items: list[int] = []
    parts = text.split(",") if isinstance(text, str) else list(text)
    for part in parts:
        if isinstance(part, int):
            values = [part]
        else:
            p = part.strip()
            if not p:
                continue
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", p)
            if m and int(m.group(1)) <= int(m.group(2)) <= int(m.group(1)) + max_span:
                values = list(range(int(m.group(1)), int(m.group(2)) + 1))
            elif re.fullmatch(r"\d+", p):
                values = [int(p)]
            else:
                raise BenchInputError(f"{what} must look like {example}, got {part!r}")
        for v in values:
            if v < 0:
                raise BenchInputError(f"{what}: values count from 0, got {v}")
            if v not in items:
                items.append(int(v))
    return items


def parse_prompt_ids(text: str | Sequence[int] | None) -> list[int] | None:
    """``"0,1,5,10,20"`` / ``"0-4"`` / mixed -> sorted distinct prompt indices; None or "" -> None (all).

    Sorted because the grid keeps the prompts file's order whatever order they are named in.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    out = parse_index_list(text, what="--prompt-ids", example="0,1,5 or 0-4 (indices from 0)")
    if not out:
        raise BenchInputError("--prompt-ids names no prompt; e.g. --prompt-ids 0,1,5,10,20")
    return sorted(out)


def load_prompts(
    source: str | os.PathLike[str],
    limit: int | None = None,
    *,
    ids: Sequence[int] | None = None,
) -> list[PromptSpec]:
    """Read prompts from an IBench JSON file or a text file (one prompt per line).

    ``ids`` keeps the prompts at these indices (position in the file, from 0, e.g. the authors'
    ablation picks 0, 1, 5, 10, 20); ``limit`` then keeps the first N. Indices stay those of the
    file either way, so item keys do not change and a partial run can later be completed.
    """
    path = Path(source)
    if not path.exists():
        raise BenchInputError(f"prompts file {path} does not exist")
    if path.is_dir():
        raise BenchInputError(f"prompts {path} is a folder; give an IBench prompts .json or a .txt with one prompt per line")
    prompts: list[PromptSpec] = []
    if path.suffix.lower() == ".json":
        for i, entry in enumerate(_datas(_read_json(path, "prompts"), path, "prompts")):
            if isinstance(entry, str):
                entry = {"prompt": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise BenchInputError(f'prompts file {path}: entry {i} has no "prompt" text')
            if not render_prompt(entry["prompt"], None):
                raise BenchInputError(f"prompts file {path}: entry {i} is empty once [...] notes are removed")
            prompts.append(
                PromptSpec(i, entry["prompt"], _frozen(entry.get("prompt_attr")), _frozen(entry.get("prompt_style")))
            )
    else:
        lines = _read_text(path, "prompts").splitlines()
        index = 0
        for line in lines:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if render_prompt(text, None):
                prompts.append(PromptSpec(index, text))
                index += 1
    if not prompts:
        raise BenchInputError(f"prompts file {path} holds no prompt")
    if ids is not None:
        wanted = sorted(set(int(i) for i in ids))
        beyond = [i for i in wanted if i >= len(prompts)]
        if beyond:
            raise BenchInputError(
                f"--prompt-ids {beyond[0]}: prompts file {path} has {len(prompts)} prompts (indices 0-{len(prompts) - 1})"
            )
        prompts = [prompts[i] for i in wanted]
    return prompts[:limit] if limit else prompts


# ------------------------------------------------------------------------------------- identities


def identity_key(id_string: str) -> str:
    """Stable file-safe name of an identity: the photo's stem plus a short hash of the full id.

    The hash keeps two photos named ``001.jpg`` in different folders apart; the stem keeps the
    output files readable.
    """
    stem = Path(id_string.replace("\\", "/")).stem or "id"
    slug = _KEY_UNSAFE.sub("-", stem).strip("-")[:40] or "id"
    digest = hashlib.sha1(id_string.encode("utf-8")).hexdigest()[:6]
    return f"{slug}-{digest}"


@dataclass(frozen=True)
class Identity:
    """One identity: the photo to encode and the gender used to fill ``{person}``.

    ``id`` is the string from the identities file, kept verbatim: the results' ``id`` is that string,
    as the authors' script writes it; ``path`` is where the photo was found on this machine.
    ``index`` is the identity's position in the identities file: the results are ordered by it, so
    that they follow the file as the authors' loop does.
    """

    key: str
    id: str
    path: Path
    gender: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    index: int = 0
    #: a group of people generated together (``id`` joins theirs with " + "); empty for one person
    members: tuple[Identity, ...] = ()
    #: per member, an optional region ``(x0, y0, x1, y1)`` in fractions of the image (groups only)
    regions: tuple[tuple[float, float, float, float] | None, ...] = ()
    #: the prompt indices this identity or group is used with (None: every prompt)
    prompt_ids: tuple[int, ...] | None = None
    #: the prompt's words this person is bound to (XVerseBench's ``use_words``), None when unbound;
    #: ``occurrence`` says which time they appear in the prompt (1 = first; "another man" is the 2nd "man")
    words: str | None = None
    occurrence: int = 1
    #: inputs of a benchmark item that are not used (XVerseBench's objects and animals), as written
    not_used: tuple[str, ...] = ()

    @property
    def person(self) -> str:
        return person_word(self.gender)

    @property
    def is_group(self) -> bool:
        return bool(self.members)

    def uses_prompt(self, index: int) -> bool:
        return self.prompt_ids is None or index in self.prompt_ids

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "path": str(self.path), "gender": self.gender, "index": self.index}
        if self.members:
            out["people"] = [m.to_dict() for m in self.members]
            if any(r is not None for r in self.regions):
                out["regions"] = [list(r) if r is not None else None for r in self.regions]
        if self.prompt_ids is not None:  # eval's expected grid reads it (a benchmark item has its own prompt)
            out["prompt_ids"] = list(self.prompt_ids)
        if self.words is not None:
            out["words"] = self.words
            if self.occurrence != 1:
                out["occurrence"] = self.occurrence
        if self.not_used:
            out["not_used"] = list(self.not_used)
        return out


def _photo_id(value: Any) -> bool:
    """A usable photo path from an identities file: text, not blank, no NUL, encodable as a file name."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        return False
    try:
        value.encode("utf-8")  # a lone surrogate ("\ud800" in the JSON) names no file
    except UnicodeEncodeError:
        return False
    return True


def resolve_photo_path(id_string: str, base_dir: Path, id_root: str | os.PathLike[str] | None = None) -> Path | None:
    """Find an identity photo: as written, relative to the identities file, then under ``id_root``.

    Under ``id_root`` the path's trailing parts are tried from longest to shortest, so IBench's
    ``/home/gdli7/IBench/data/images/chineseid/R (9).jpg`` is found with ``--id-root IBench`` (the
    checkout) as ``IBench/data/images/chineseid/R (9).jpg``, and equally with the checkout's parent
    or the ``chineseid`` folder itself as root. Backslash paths (made on Windows) are split too.
    """
    raw = Path(os.path.expanduser(id_string))
    candidates = [raw] if raw.is_absolute() else [base_dir / raw, raw]
    if id_root is not None:
        root = Path(os.path.expanduser(str(id_root)))
        tail = id_string.replace("\\", "/")
        parts = [p for p in tail.split("/") if p not in ("", ".") and not (len(p) == 2 and p[1] == ":")]
        candidates += [root.joinpath(*parts[i:]) for i in range(len(parts))]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


def _photo_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def load_identities(
    source: str | os.PathLike[str],
    *,
    id_root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[Identity]:
    """Read identities from an IBench JSON file, a folder of photos, or one photo.

    Every photo must exist (checked now, before hours of generation): a missing one raises
    :class:`BenchInputError` naming how many are missing, the first one, and ``--id-root``.
    """
    path = Path(source)
    if not path.exists():
        raise BenchInputError(f"identities {path} does not exist (give an IBench identities .json, a folder of photos or one photo)")
    identities: list[Identity] = []
    if path.is_dir():
        files = _photo_files(path)
        if not files:
            raise BenchInputError(f"identities folder {path} holds no photo ({', '.join(IMAGE_SUFFIXES)})")
        # keys from the file name only, so shards on machines with other mount points agree
        identities = [Identity(identity_key(f.name), str(f), f.resolve(), "", index=i) for i, f in enumerate(files)]
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        identities = [Identity(identity_key(path.name), str(path), path.resolve(), "")]
    elif path.suffix.lower() == ".json" and isinstance(doc := _read_json(path, "identities"), dict) and "groups" in doc:
        identities = _load_groups(doc["groups"], path, id_root)
    elif path.suffix.lower() == ".json":
        missing: list[str] = []
        seen: set[str] = set()
        for i, entry in enumerate(_datas(_read_json(path, "identities"), path, "identities")):
            if isinstance(entry, str):
                entry = {"id": entry}
            if not isinstance(entry, dict) or not _photo_id(entry.get("id")):
                raise BenchInputError(f'identities file {path}: entry {i} has no "id" (path of the photo)')
            id_string = entry["id"]
            if id_string in seen:
                continue  # the same photo twice adds nothing but duplicate keys
            seen.add(id_string)
            gender = entry.get("gender") or ""
            if not isinstance(gender, str):
                raise BenchInputError(f'identities file {path}: entry {i} has a non-text "gender"')
            found = resolve_photo_path(id_string, path.parent, id_root)
            if found is None:
                missing.append(id_string)
                found = Path(id_string)
            extra = {k: v for k, v in entry.items() if k not in ("id", "gender")}
            identities.append(Identity(identity_key(id_string), id_string, found, gender, extra, index=i))
            if limit and len(identities) >= limit:
                break
        if missing:
            where = f" under --id-root {id_root}" if id_root is not None else ""
            raise BenchInputError(
                f"{len(missing)} of {len(identities)} identity photos not found{where} (first: {missing[0]}); "
                "pass --id-root with the folder that holds them (e.g. your IBench checkout)"
            )
    else:
        raise BenchInputError(
            f"identities {path}: unsupported file type {path.suffix or '(none)'}; "
            "give an IBench identities .json, a folder of photos or one photo"
        )
    return identities[:limit] if limit else identities


WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)  # a group member listed without a region may be anywhere


def region_boxes(regions: Sequence[Any]) -> list[Any] | None:
    """A group's regions for ``people``/``regions=``: None when none is given, else one box per
    person with the members listed without one (null) given the whole image."""
    if not any(r is not None for r in regions):
        return None
    return [r if r is not None else WHOLE_IMAGE for r in regions]


def _region(value: Any, where: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise BenchInputError(f"{where}: a region is [x0, y0, x1, y1] in fractions of the image (0-1), got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise BenchInputError(f"{where}: region {value!r} needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return (x0, y0, x1, y1)


def _load_groups(groups: Any, path: Path, id_root: str | os.PathLike[str] | None) -> list[Identity]:
    """``{"groups": [["a.jpg", "b.jpg"], {"people": [...], "regions": [...], "prompt_ids": [0, 2]}]}``.

    A group is 2-4 people (a person: a photo path or ``{"id": path, "gender": ...}``) generated in one
    image; ``regions`` (optional, one ``[x0, y0, x1, y1]`` or null per person) are their user regions;
    ``prompt_ids`` (optional) the indices of the prompts file this group is used with.
    """
    if not isinstance(groups, list) or not groups:
        raise BenchInputError(f'identities file {path}: "groups" must be a non-empty list of groups of people')
    out: list[Identity] = []
    missing: list[str] = []
    for g, group in enumerate(groups):
        where = f"identities file {path}: group {g}"
        entry = {"people": group} if isinstance(group, list) else group
        if not isinstance(entry, dict) or not isinstance(entry.get("people"), list):
            raise BenchInputError(f'{where} must be a list of photos or {{"people": [...]}}')
        people = entry["people"]
        if not 2 <= len(people) <= MAX_GROUP_SIZE:
            raise BenchInputError(f"{where} has {len(people)} people; a group has 2 to {MAX_GROUP_SIZE} (one person: list the photo outside groups)")
        members: list[Identity] = []
        for j, person in enumerate(people):
            person = {"id": person} if isinstance(person, str) else person
            if not isinstance(person, dict) or not _photo_id(person.get("id")):
                raise BenchInputError(f'{where}, person {j}: give the photo path (or {{"id": path}})')
            gender = person.get("gender") or ""
            found = resolve_photo_path(person["id"], path.parent, id_root)
            if found is None:
                missing.append(person["id"])
                found = Path(person["id"])
            members.append(Identity(identity_key(person["id"]), person["id"], found, str(gender), index=j))
        # by the file found (resolved), so "a.png" and "./a.png" or a symlink are the same photo
        if len({str(m.path) if m.path.is_absolute() else os.path.normpath(m.id) for m in members}) != len(members):
            raise BenchInputError(f"{where} lists the same photo twice; a group is different people")
        regions_raw = entry.get("regions")
        if regions_raw is not None and (not isinstance(regions_raw, list) or len(regions_raw) != len(members)):
            raise BenchInputError(f"{where}: give one region (or null) per person in \"regions\"")
        regions = tuple(_region(r, where) for r in regions_raw) if regions_raw else ()
        prompt_ids = entry.get("prompt_ids")
        if prompt_ids is not None:
            if not isinstance(prompt_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in prompt_ids):
                raise BenchInputError(f'{where}: "prompt_ids" must be a list of prompt indices (from 0)')
            prompt_ids = tuple(sorted(set(prompt_ids)))
        group_id = " + ".join(m.id for m in members)
        slug = "+".join(m.key.rsplit("-", 1)[0][:12] for m in members)
        key = f"group-{slug}-{hashlib.sha1(group_id.encode('utf-8')).hexdigest()[:6]}"
        out.append(Identity(key, group_id, members[0].path, "", index=g, members=tuple(members), regions=regions, prompt_ids=prompt_ids))
    if missing:
        where = f" under --id-root {id_root}" if id_root is not None else ""
        raise BenchInputError(
            f"{len(missing)} photos of the groups in {path} not found{where} (first: {missing[0]}); "
            "pass --id-root with the folder that holds them"
        )
    return out


def check_unique_keys(identities: Sequence[Identity]) -> None:
    """Two different ids must not map to one key (a SHA-1 prefix collision: practically never)."""
    seen: dict[str, str] = {}
    for ident in identities:
        other = seen.setdefault(ident.key, ident.id)
        if other != ident.id:
            raise BenchInputError(f"identities {other!r} and {ident.id!r} map to the same key {ident.key}; rename one photo")
