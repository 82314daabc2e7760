"""Property-based fuzzing of every reader of outside data (issue 20, "make it a habit").

Each reader gets hostile input drawn by hypothesis and must either return a valid record or raise
the project's one-line error (:class:`~spatialid.errors.SpatialIDError`): no other exception, no
path outside its folder. Memory bombs are in ``tests/test_memory_ceiling.py``.

``READERS`` maps a reader's name to ``(strategy, check)``; the tests below run each with a small,
derandomized number of examples (the whole file in well under a minute), and
``benchmarks/fuzz_readers.py N`` runs the same checks with N examples each.

Readers covered (found with ``grep -rn "read_text\\|read_bytes\\|json.loads\\|safe_open\\|Image.open"``):

* ``png_settings``: ``app.metadata.read_image_metadata`` (PNG tEXt/zTXt/iTXt), then
  ``GenerationSettings.from_dict(...).check()``, ``spatialid info`` and the web UI's
  ``handlers.settings_from_file``; ``exif_settings``: the same for JPEG/WebP EXIF UserComment;
* ``settings_dict``: ``GenerationSettings.from_dict`` on any JSON object;
* ``from_png``: ``spatialid generate --from-png`` (``cli/from_png.py``) up to the model load;
* ``identity_file``: ``encoder.embedding.IdentityEmbedding.load``;
* ``mask_file``: ``injection.people.load_mask_file`` / ``mask_replay_table`` and
  ``injection.words.layout_replay_table``;
* ``bench_results``: ``bench.results.load_manifest`` / ``load_preset_results``; ``merge``:
  ``bench.merge.merge_runs`` (no file written or changed outside ``--out``); ``integrity``:
  ``bench.integrity.damaged_images``;
* ``prompts_file``: ``bench.datasets.load_prompts`` (JSON and text) and ``cli`` ``--prompts``
  (``cmd_generate.read_prompts``); ``ids_file``: ``bench.datasets.load_identities`` (IBench lists
  and groups); ``index_list``: ``parse_index_list`` / ``parse_prompt_ids``;
* ``region_box``: ``parse_box`` and the web UI's ``parse_region``; ``region_mask``:
  ``regions_tensor`` on mask pictures;
* ``lora_names``: ``loaders.names.parse_lora``, ``app.loading.check_lora_files`` and the web UI's
  ``parse_lora_lines`` (only files of its ``--lora-dir``);
* ``web_form``: ``ui.handlers.build_request`` / ``parse_seed`` on any form values.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from spatialid.errors import SpatialIDError

# --------------------------------------------------------------------------- the contract


def one_line(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """``(True, result)``, or ``(False, error)`` for the project's one-line error; anything else escapes."""
    try:
        return True, call(*args, **kwargs)
    except SpatialIDError as exc:
        text = str(exc)
        assert text.strip(), f"empty message from {type(exc).__name__}"
        assert "\n" not in text.strip(), text
        return False, exc


@contextlib.contextmanager
def folder() -> Any:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        yield Path(tmp)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime_ns), to prove a reader wrote nothing where it must not."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                st_ = p.lstat()
                out[str(p)] = (st_.st_size, st_.st_mtime_ns)
    return out


# --------------------------------------------------------------------------- value strategies

_scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    | st.sampled_from(["", " ", "\x1b[31mred", "../../etc/passwd", "/etc", "a\0b", "\ud800", "1e999", "nan", "-1",
                       "pulid", "tiny", "x.safetensors", "images/a.png"])
)
json_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)

def mostly(good: st.SearchStrategy, bad: st.SearchStrategy, percent: int = 85) -> st.SearchStrategy:
    """``good`` in ``percent`` % of the draws, else ``bad`` (so whole valid records are drawn often too)."""
    return st.integers(0, 99).flatmap(lambda i: good if i < percent else bad)


_SETTING_VALUES = {
    "prompt": st.text(max_size=30) | st.just("a portrait"),
    "negative_prompt": st.text(max_size=10),
    "preset": st.sampled_from(["pulid", "paper", "nope", "spatialid"]),
    "id_weight": st.floats(-1, 4) | st.just(1.0),
    "start_step": st.integers(-2, 40),
    "true_cfg": st.floats(0, 12) | st.just(1.0),
    "cfg_start_step": st.integers(-2, 5),
    "guidance": st.floats(-1, 40),
    "steps": st.integers(-1, 1200) | st.just(2),
    "width": st.sampled_from([64, 63, 4112, 0, 128]),
    "height": st.sampled_from([64, 63, 4112, 0, 128]),
    "seed": st.integers(-5, 2**64) | st.just(1),
    "num_images": st.integers(-1, 20),
    "max_sequence_length": st.integers(-1, 600),
    "schedule_overrides": st.dictionaries(st.sampled_from(["early", "late_floor", "bogus"]), st.floats(-2, 2), max_size=2),
    "noise": st.sampled_from(["diffusers", "reference", "x"]),
    "people": st.lists(st.lists(st.text(max_size=8), max_size=3), max_size=5),
    "regions": st.lists(st.lists(st.floats(-1, 2), min_size=4, max_size=4) | st.text(max_size=8), max_size=5),
    "pipeline": st.sampled_from(["text2image", "img2img", "kontext", "controlnet", "zzz"]),
    "init_image": st.text(max_size=10),
    "strength": st.floats(-1, 2),
    "loras": st.lists(st.text(max_size=12), max_size=3),
    "model": st.sampled_from(["tiny", "attacker-org/evil-flux", "/etc", "\x1b[2J"]),
    "input_paths": st.fixed_dictionaries({}, optional={
        "id_images": json_values, "id_embeds": json_values, "people": json_values, "regions": json_values,
        "init_image": json_values}),
    "identity": st.fixed_dictionaries({}, optional={"source": st.sampled_from(["image", "embeds", 5]), "files": json_values}),
}
settings_dicts = mostly(st.fixed_dictionaries(
    {}, optional={k: mostly(v, json_values) for k, v in _SETTING_VALUES.items()}
), st.dictionaries(st.text(max_size=8), json_values, max_size=5))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_IHDR = _chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0))
_IDAT = _chunk(b"IDAT", zlib.compress(b"\0\0\0" * 2))
_IEND = _chunk(b"IEND", b"")


@st.composite
def text_payloads(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["json", "settings", "settings", "settings", "bytes", "deep", "bigint"]))
    if kind == "settings":
        return json.dumps(draw(settings_dicts), allow_nan=True).encode("utf-8", "surrogatepass")
    if kind == "json":
        return json.dumps(draw(json_values), allow_nan=True).encode("utf-8", "surrogatepass")
    if kind == "deep":
        return b"[" * draw(st.integers(1, 100_000))
    if kind == "bigint":
        return b'{"seed": ' + b"9" * draw(st.integers(4000, 6000)) + b"}"
    return draw(st.binary(max_size=64))


@st.composite
def png_files(draw: Any) -> bytes:
    """A PNG with hostile text chunks (keyword, compression flag, truncation, damage)."""
    chunks = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from([b"tEXt", b"zTXt", b"iTXt"]))
        keyword = draw(mostly(st.just(b"spatialid"), st.sampled_from([b"parameters", b""]) | st.binary(max_size=8), 70))
        payload = draw(text_payloads())
        if kind == b"tEXt":
            data = keyword + draw(st.sampled_from([b"\0", b""])) + payload
        elif kind == b"zTXt":
            data = keyword + b"\0" + draw(st.sampled_from([b"\0", b"\1"])) + draw(
                st.sampled_from([zlib.compress(payload), payload, zlib.compress(payload)[:-3]]))
        else:
            flag = draw(st.sampled_from([b"\0", b"\1", b""]))
            body = zlib.compress(payload) if flag == b"\1" and draw(st.booleans()) else payload
            data = keyword + b"\0" + flag + draw(st.sampled_from([b"\0", b""])) + b"en\0\0" + body
        chunks.append(_chunk(kind, data))
    blob = b"\x89PNG\r\n\x1a\n" + _IHDR + b"".join(chunks) + _IDAT + _IEND
    cut = draw(st.sampled_from(["none", "none", "none", "cut", "flip", "garbage"]))
    if cut == "cut":
        blob = blob[: draw(st.integers(0, len(blob)))]
    elif cut == "flip":
        i = draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:]
    elif cut == "garbage":
        blob = draw(st.binary(max_size=200))
    return blob


@st.composite
def exif_files(draw: Any) -> tuple[bytes, str]:
    fmt = draw(st.sampled_from(["JPEG", "WEBP"]))
    exif = Image.Exif()
    head = draw(st.sampled_from([b"ASCII\0\0\0", b"UNICODE\0", b"", b"JIS\0\0\0\0\0"]))
    payload = draw(text_payloads())[:30_000]  # JPEG holds at most 64 kB of EXIF
    if head == b"UNICODE\0":
        payload = payload.decode("utf-8", "replace").encode("utf-16-be" if draw(st.booleans()) else "utf-16-le", "replace")
    exif.get_ifd(0x8769)[0x9286] = head + payload
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format=fmt, exif=exif.tobytes())
    blob = buf.getvalue()
    if draw(st.booleans()):
        i = draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + draw(st.binary(max_size=4)) + blob[i + 1:]
    return blob, ".jpg" if fmt == "JPEG" else ".webp"


# --------------------------------------------------------------------------- settings in images


def _settings_record(meta: dict) -> None:
    """``GenerationSettings.from_dict`` then ``check``: a record of the declared types, or one line."""
    from spatialid.pipeline.settings import GenerationSettings

    ok, record = one_line(GenerationSettings.from_dict, meta)
    if not ok:
        return
    assert isinstance(record.prompt, str) and isinstance(record.preset, str) and isinstance(record.noise, str)
    for name in ("start_step", "cfg_start_step", "num_images"):
        assert isinstance(getattr(record, name), int), name
    for name in ("steps", "width", "height", "seed", "max_sequence_length"):
        assert getattr(record, name) is None or isinstance(getattr(record, name), int), name
    for name in ("id_weight", "true_cfg", "guidance"):
        assert isinstance(getattr(record, name), (int, float)) and math.isfinite(getattr(record, name)), name
    one_line(record.check, prompt=False)


def _check_image_settings(path: Path) -> None:
    from spatialid.app.metadata import read_image_metadata, stored_inputs
    from spatialid.ui.handlers import settings_from_file

    ok, meta = one_line(read_image_metadata, path)
    if ok:
        assert isinstance(meta, dict)
        _settings_record(meta)
        stored_inputs(meta)  # never raises: odd entries are left out
    values, line = settings_from_file(path)  # the web UI: never raises, one line for the page
    assert isinstance(line, str) and "\n" not in line.strip()
    assert values is None or isinstance(values["prompt"], str)
    from spatialid.cli.main import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["info", str(path)])
    assert code in (0, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()


def check_png_settings(blob: bytes) -> None:
    with folder() as tmp:
        path = tmp / "x.png"
        path.write_bytes(blob)
        _check_image_settings(path)


def check_exif_settings(item: tuple[bytes, str]) -> None:
    blob, suffix = item
    with folder() as tmp:
        path = tmp / f"x{suffix}"
        path.write_bytes(blob)
        _check_image_settings(path)


def check_settings_dict(meta: dict) -> None:
    _settings_record(meta)


OUTCOMES: collections.Counter = collections.Counter()  # for benchmarks/fuzz_readers.py: how far examples got


class _Reached(BaseException):
    """The model load was reached: everything read from the image was accepted as valid."""


def check_from_png(meta: dict) -> None:
    """``generate --from-png``: exit 2 in one line, or the model load is reached with checked flags."""
    from spatialid.app import loading
    from spatialid.app.metadata import save_png_with_metadata
    from spatialid.cli.main import main

    def reached(*_a: Any, **_k: Any) -> None:
        raise _Reached

    with folder() as tmp:
        image = tmp / "in.png"
        save_png_with_metadata(Image.new("RGB", (2, 2)), image, meta)
        (tmp / "a.png").write_bytes((tmp / "in.png").read_bytes())  # a file the record may name
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loading.Models, "__init__", reached)
            mp.chdir(tmp)
            err = io.StringIO()
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                    code = main(["generate", "--model", "tiny", "--from-png", str(image), "-o", str(tmp / "out.png")])
            except _Reached:
                OUTCOMES["from_png: model load reached"] += 1
                return
        OUTCOMES["from_png: refused"] += 1
        assert code == 2, err.getvalue()
        lines = [line for line in err.getvalue().splitlines() if line.startswith("spatialid: error")]
        assert len(lines) == 1 and "\x1b" not in lines[0], err.getvalue()


# --------------------------------------------------------------------------- safetensors files

_DTYPES = ["F32", "F16", "BF16", "U8", "I64", "F64", "BOOL", "X9"]


@st.composite
def safetensors_files(draw: Any, names: tuple[str, ...], meta: st.SearchStrategy) -> bytes:
    """A safetensors file with hostile header, shapes, offsets and metadata (often consistent)."""
    header: dict[str, Any] = {}
    data = b""
    for name in draw(st.lists(st.sampled_from(names), max_size=len(names) + 1, unique=True)):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 5), max_size=7))
        size = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "F64": 8, "BOOL": 1}.get(dtype, 1) * math.prod(shape)
        begin = len(data)
        raw = draw(st.sampled_from([b"\0", b"\x7f", b"\xff"])) * size  # zeros, large values, NaN
        data += raw
        offsets = [begin, len(data)]
        if draw(st.integers(0, 5)) == 0:
            offsets = draw(st.lists(st.integers(-1, 2**40), min_size=0, max_size=3))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    m = draw(meta)
    if m is not None:
        header["__metadata__"] = m
    text = json.dumps(header).encode()
    if draw(st.integers(0, 6)) == 0:
        text = draw(st.binary(max_size=30))
    length = len(text)
    if draw(st.integers(0, 6)) == 0:
        length = draw(st.integers(0, 2**64 - 1))
    blob = struct.pack("<Q", length) + text + data
    if draw(st.integers(0, 6)) == 0:
        blob = blob[: draw(st.integers(0, len(blob)))]
    return blob


@st.composite
def mutated_safetensors(draw: Any, make: Callable[[], bytes]) -> bytes:
    """A valid file from ``make`` with one hostile change: a header field, a flipped byte, a cut (or none)."""
    blob = make()
    n = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    op = draw(st.sampled_from(["same", "meta", "tensor", "flip", "cut"]))
    if op == "meta":
        meta = header.setdefault("__metadata__", {})
        meta[draw(st.sampled_from([*sorted(meta), "x"]))] = draw(st.text(max_size=8) | json_values)
    elif op == "tensor":
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(st.sampled_from(_DTYPES) | st.lists(st.integers(0, 70), max_size=4) | json_values)
    if op in ("meta", "tensor"):
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + data
    if op == "flip":
        i = draw(st.integers(0, len(blob) - 1))
        return blob[:i] + bytes([blob[i] ^ draw(st.integers(1, 255))]) + blob[i + 1:]
    if op == "cut":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    return blob


_VALID: dict[str, bytes] = {}


def valid_embedding() -> bytes:
    """A small valid identity file (2 tokens of 4 values, a 2x2 face)."""
    if "embedding" not in _VALID:
        import torch

        from spatialid.encoder.embedding import IdentityEmbedding

        emb = IdentityEmbedding(tokens=torch.ones(1, 2, 4), uncond_tokens=torch.zeros(1, 2, 4), face_box=(0, 0, 1, 1),
                                aligned_face=Image.new("RGB", (2, 2)), metadata={"idformer_config": '{"num_queries": 2}'})
        _VALID["embedding"] = emb.to_bytes()
    return _VALID["embedding"]


def valid_mask_file() -> bytes:
    """A small valid mask file: 2 steps, 1 point, 1 person, batch 1, a 2x2 grid."""
    if "masks" not in _VALID:
        import torch
        from safetensors.torch import save

        meta = {"format": "spatialid-masks/1", "steps": "[0, 1]", "times": "[1.0, 0.5]", "phases": '["early", "late"]',
                "persons": "1", "grid": "2x2"}
        _VALID["masks"] = save({"masks": torch.rand(2, 1, 1, 1, 2, 2), "layout_maps": torch.rand(2, 1, 1, 2, 2)},
                               metadata={**meta, "words": '["a man"]'})
    return _VALID["masks"]


_embed_meta = st.none() | json_values | st.fixed_dictionaries(
    {"format": st.sampled_from(["spatialid.identity_embedding", "x"]), "format_version": st.sampled_from(["1", "2"])},
    optional={"num_images": st.sampled_from(["1", "x", "-3", "9" * 30]), "idformer_config": st.sampled_from(
        ['{"num_queries": 2}', "[1]", "{", '{"num_queries": "x"}']), "face_backend": st.text(max_size=5)})


def check_identity_file(blob: bytes) -> None:
    from spatialid.encoder.embedding import IdentityEmbedding

    with folder() as tmp:
        path = tmp / "me.safetensors"
        path.write_bytes(blob)
        ok, emb = one_line(IdentityEmbedding.load, path)
        if ok:  # a valid record: finite float [1, N, D] tokens of one shape, usable number of photos
            assert emb.tokens.ndim == 3 and emb.tokens.shape == emb.uncond_tokens.shape and emb.tokens.is_floating_point()
            assert emb.num_images >= 1
            repr(emb)


_mask_meta = st.none() | json_values | st.fixed_dictionaries(
    {"format": st.just("spatialid-masks/1")},
    optional={"steps": st.sampled_from(["[0]", "[0, 1]", "[]", "[-1]", "[1e30]", '["a"]', "[99999999]", "{", "[true]"]),
              "times": st.sampled_from(["[1.0]", "x", "5", "null"]), "phases": st.sampled_from(['["early"]', "{}", "7"])})


def check_mask_file(blob: bytes) -> None:
    from spatialid.injection.people import mask_replay_table

    with folder() as tmp:
        path = tmp / "masks.safetensors"
        path.write_bytes(blob)
        ok, result = one_line(mask_replay_table, path)
        if ok:
            table, steps = result
            assert table.dim() == 6 and all(isinstance(s, int) and 0 <= s < table.shape[0] for s in steps)
        from spatialid.injection.words import layout_replay_table

        ok, maps = one_line(layout_replay_table, path)  # the word maps beside the masks (people bound to words)
        assert not ok or maps is None or (maps.dim() == 4 and bool((maps >= 0).all()))


# --------------------------------------------------------------------------- bench folders

_paths = st.sampled_from(["images/a.png", "images/missing.png", "../../victim.txt", "/tmp/fuzz-abs-victim.txt", "images/../../x",
                          "", "a\0b", "images", ".", "..", "\ud800"]) | st.text(max_size=10) | json_values


@st.composite
def results_docs(draw: Any) -> Any:
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        entry = draw(st.fixed_dictionaries({"key": st.sampled_from(["k1", "k2"]) | json_values},
                                           optional={"image": _paths, "imagewithid": _paths, "num": json_values,
                                                     "identity_index": json_values, "prompt_index": json_values,
                                                     "seed": json_values, "prompt_attr": json_values}))
        entries.append(entry)
    doc = {"datas": entries, "tags": draw(st.none() | json_values | st.just({"preset": "pulid"})),
           "failures": draw(st.lists(st.fixed_dictionaries({"key": json_values}) | json_values, max_size=2))}
    return draw(st.just(doc) | json_values)


@st.composite
def manifests(draw: Any) -> Any:
    base = {"format": "spatialid-bench", "format_version": 2, "settings": {"steps": 2},
            "identities": {"id-1": {"id": "a.png"}}, "prompts": {"0": {"prompt": "a photo"}},
            "presets": ["pulid"], "seeds": [0], "paths": "absolute"}
    for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=3, unique=True)):
        base[key] = draw(json_values)
    return base


def _write_bench(root: Path, manifest: Any, results: Any) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench.json").write_text(json.dumps(manifest), encoding="utf-8")
    preset = root / "pulid"
    (preset / "images").mkdir(parents=True)
    (preset / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _IHDR + _IDAT + _IEND)
    (preset / "results.json").write_text(json.dumps(results).encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
                                         encoding="utf-8")


def check_bench_results(item: tuple[Any, Any]) -> None:
    from spatialid.bench.results import find_presets, load_manifest, load_preset_results

    manifest, results = item
    with folder() as tmp:
        _write_bench(tmp / "run", manifest, results)
        ok, doc = one_line(load_manifest, tmp / "run")
        assert not ok or doc is None or isinstance(doc, dict)
        for preset in find_presets(tmp / "run"):
            ok, got = one_line(load_preset_results, tmp / "run" / preset)
            if ok:
                entries, failures = got
                assert all(isinstance(k, str) for k in entries)


def check_merge(item: tuple[Any, Any, Any]) -> None:
    """``merge_runs``: a summary or one line; nothing outside ``--out`` written or changed."""
    from spatialid.bench.merge import merge_runs

    manifest, results, second = item
    with folder() as tmp:
        (tmp / "victim.txt").write_text("keep me")
        _write_bench(tmp / "a" / "b" / "run", manifest, results)
        _write_bench(tmp / "a" / "b" / "run2", manifest, second)
        before = snapshot(tmp)
        ok, summary = one_line(merge_runs, [tmp / "a" / "b" / "run", tmp / "a" / "b" / "run2"], tmp / "a" / "b" / "out")
        after = snapshot(tmp)
        out = str(tmp / "a" / "b" / "out")
        changed = [p for p in after if before.get(p) != after[p] and not p.startswith(out + os.sep)]
        assert not changed, changed
        assert (tmp / "victim.txt").read_text() == "keep me"
        assert not Path("/tmp/fuzz-abs-victim.txt").exists()


def check_integrity(blobs: list[bytes]) -> None:
    from spatialid.bench.integrity import damaged_images

    with folder() as tmp:
        paths = []
        for i, blob in enumerate(blobs):
            paths.append(tmp / f"{i}.png")
            paths[-1].write_bytes(blob)
        paths.append(tmp / "missing.png")
        damaged = damaged_images(paths, full_decode=len(paths))
        assert tmp / "missing.png" in damaged and all(isinstance(v, str) and "\n" not in v for v in damaged.values())


# --------------------------------------------------------------------------- prompts, ids, index lists

_text_files = st.binary(max_size=300) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")) | st.sampled_from(
    [b"", b"\n\n#x\n", b"a\0b", b"\xff\xfe", b"[person] \n", "\u2028\u0085".encode()])


def check_prompts_file(item: tuple[str, Any]) -> None:
    from spatialid.bench.datasets import PromptSpec, load_prompts
    from spatialid.cli.cmd_generate import read_prompts

    suffix, content = item
    with folder() as tmp:
        path = tmp / f"prompts{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(json.dumps(content), encoding="utf-8", errors="surrogatepass")
        ok, prompts = one_line(load_prompts, path)
        if ok:
            assert prompts and all(isinstance(p, PromptSpec) and isinstance(p.template, str) for p in prompts)
            hash(tuple(prompts))  # hashable values (the grid keys on them)
        ok, lines = one_line(read_prompts, str(path))
        if ok:
            assert lines and all(isinstance(p, str) and p.strip() and "\n" not in p for p in lines)


_ids = st.sampled_from(["a.png", "./a.png", "b.png", "sub/../a.png", "missing.jpg", "", " ", "\ud800", "a\0.png", "/"]) | json_values


@st.composite
def identity_docs(draw: Any) -> Any:
    good = st.sampled_from(["a.png", "./a.png", "b.png", "sub/../a.png"])
    person = mostly(good | st.fixed_dictionaries({"id": good}, optional={"gender": st.sampled_from(["man", "woman", ""])}),
                    _ids | st.fixed_dictionaries({"id": _ids}, optional={"gender": json_values}))
    kind = draw(st.sampled_from(["datas", "list", "groups", "any"]))
    if kind == "datas":
        return {"datas": draw(st.lists(person, max_size=4))}
    if kind == "list":
        return draw(st.lists(person, max_size=4))
    if kind == "groups":
        group = st.lists(person, max_size=5) | st.fixed_dictionaries(
            {"people": st.lists(person, max_size=5) | json_values},
            optional={"regions": st.lists(st.none() | st.lists(st.floats(-1, 2) | json_values, max_size=5), max_size=5) | json_values,
                      "prompt_ids": st.lists(st.integers(-1, 3) | json_values, max_size=3) | json_values})
        return {"groups": draw(st.lists(group, max_size=3) | json_values)}
    return draw(json_values)


def check_ids_file(doc: Any) -> None:
    from spatialid.bench.datasets import Identity, check_unique_keys, load_identities

    with folder() as tmp:
        (tmp / "a.png").write_bytes(b"x")
        (tmp / "b.png").write_bytes(b"y")
        (tmp / "sub").mkdir()
        path = tmp / "ids.json"
        path.write_text(json.dumps(doc), encoding="utf-8", errors="surrogatepass")
        ok, identities = one_line(load_identities, path)
        if ok:
            assert all(isinstance(i, Identity) and isinstance(i.id, str) and i.path.is_file() for i in identities)
            for ident in identities:
                ident.to_dict()
                if ident.members:  # one photo at most once per group
                    assert len({m.path.resolve() for m in ident.members}) == len(ident.members)
            one_line(check_unique_keys, identities)


def check_index_list(text: Any) -> None:
    from spatialid.bench.datasets import parse_index_list, parse_prompt_ids

    ok, values = one_line(parse_index_list, text, what="--seeds", example="0,1")
    if ok:
        assert all(isinstance(v, int) and v >= 0 for v in values)
    ok, values = one_line(parse_prompt_ids, text)
    if ok and values is not None:
        assert values == sorted(set(values))


# --------------------------------------------------------------------------- regions and LoRA names

_box_texts = st.text(alphabet="0123456789.,-+eE x", max_size=24) | st.sampled_from(
    ["0,0,0.5,1", "1e999,0,1,1", "0,0,1e-400,1", "1,1,0,0", "0,0,1,1", "-0,0,1,1"]) | st.text(max_size=10)


def check_region_box(text: str) -> None:
    from spatialid.injection.people import parse_box, regions_tensor
    from spatialid.ui.people import parse_region

    ok, box = one_line(parse_box, text)
    if ok and box is not None:
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        grid = regions_tensor([text], 1, 4, 4)
        assert grid.shape == (1, 4, 4) and float(grid.max()) > 0
    ok, box = one_line(parse_region, text, 1)
    assert not ok or box is None or len(box) == 4


@st.composite
def mask_pictures(draw: Any) -> bytes:
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "1", "I;16", "F", "P"]))
    w, h = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    img = Image.new(mode, (w, h), draw(st.sampled_from([0, 1, 255])))
    buf = io.BytesIO()
    fmt = draw(st.sampled_from(["PNG", "TIFF", "GIF"] if mode != "F" else ["TIFF"]))
    with contextlib.suppress(OSError):
        img.save(buf, format=fmt)
    blob = buf.getvalue()
    if draw(st.booleans()) and blob:
        i = draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + draw(st.binary(max_size=3)) + blob[i + 1:]
    return blob


def check_region_mask(blob: bytes) -> None:
    from spatialid.injection.people import regions_tensor

    with folder() as tmp:
        path = tmp / "mask.png"
        path.write_bytes(blob)
        ok, grid = one_line(regions_tensor, [str(path)], 1, 4, 4)
        if ok:
            assert grid.shape == (1, 4, 4) and bool(((grid >= 0) & (grid <= 1)).all()) and float(grid.max()) > 0


_lora_text = st.text(max_size=30) | st.sampled_from(
    ["style.safetensors", "style.safetensors:0.5", "../style.safetensors", "/etc/passwd", "x:nan", "x:1e999", "notes.txt",
     "link.safetensors", ".hidden.safetensors", "sub/style.safetensors", "a\0b.safetensors", "\ud800.safetensors", ":2"])


def check_lora_names(lines: list[str]) -> None:
    from spatialid.app.loading import check_lora_files
    from spatialid.loaders.names import parse_lora
    from spatialid.ui.people import parse_lora_lines

    for line in lines:
        source, scale = parse_lora(line)
        assert isinstance(source, str) and isinstance(scale, float)
    with folder() as tmp:
        loras = tmp / "loras"
        loras.mkdir()
        from safetensors.torch import save_file
        import torch

        save_file({"lora_A.weight": torch.zeros(1)}, str(loras / "style.safetensors"))
        (loras / "notes.txt").write_text("x")
        (tmp / "outside.safetensors").write_bytes((loras / "style.safetensors").read_bytes())
        (loras / "link.safetensors").symlink_to(tmp / "outside.safetensors")
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp)
            one_line(check_lora_files, lines)
            ok, resolved = one_line(parse_lora_lines, "\n".join(lines), loras)
        if ok:
            for line in resolved:
                source, scale = parse_lora(line)
                assert Path(source).parent == loras.resolve() and Path(source).suffix == ".safetensors", line
                assert math.isfinite(scale)


# --------------------------------------------------------------------------- the web form

_form_values = json_values | st.sampled_from(["", "4", "4.0", "4.5", "1e400", "-0", "random", 10**30, float("nan")])


def check_web_form(item: tuple[Any, ...]) -> None:
    from spatialid.ui.handlers import build_request, parse_seed

    photo, prompt, preset, id_weight, start, cfg, steps, guidance, width, height, seed, n, compare = item
    with folder() as tmp:
        Image.new("RGB", (8, 8)).save(tmp / "face.png")
        photos = {"ok": [str(tmp / "face.png")], "none": None, "dir": [str(tmp)], "txt": [str(tmp / "x.txt")],
                  "dict": [{"path": str(tmp / "face.png")}]}.get(photo, photo) if isinstance(photo, str) else photo
        ok, request = one_line(build_request, photos, prompt, "", preset, id_weight, start, cfg, steps, guidance,
                               width, height, seed, n, compare, ["pulid", "paper"])
        if ok:
            s = request.settings
            s.check()  # the record the form built is valid as is
            assert isinstance(s.prompt, str) and s.prompt.strip()
        one_line(parse_seed, seed)


web_forms = st.tuples(
    mostly(st.sampled_from(["ok", "dict"]), st.sampled_from(["none", "dir", "txt"]) | json_values),
    mostly(st.text(min_size=1, max_size=20), json_values),
    mostly(st.sampled_from(["pulid", "paper"]), json_values),
    *(mostly(good, _form_values, 90) for good in (
        st.floats(0, 3) | st.just("1.5"), st.integers(0, 1), st.floats(1, 10), st.integers(1, 4) | st.just("2"),
        st.floats(0, 30), st.sampled_from([64, 128, "64", 64.0]), st.sampled_from([64, 128]),
        st.integers(0, 2**63 - 1) | st.sampled_from(["random", "", None, "-1", "12"]), st.integers(1, 4))),
    st.booleans(),
)


# --------------------------------------------------------------------------- the registry and the tests

READERS: dict[str, tuple[st.SearchStrategy, Callable[[Any], None], int]] = {
    # name: (strategy, check, examples in the test suite)
    "png_settings": (png_files(), check_png_settings, 50),
    "exif_settings": (exif_files(), check_exif_settings, 30),
    "settings_dict": (settings_dicts, check_settings_dict, 60),
    "from_png": (st.builds(lambda extra: {"prompt": "a portrait", "steps": 2, "seed": 1, "width": 64, "height": 64, **extra},
                           settings_dicts), check_from_png, 15),
    "identity_file": (safetensors_files(("tokens", "uncond_tokens", "face_box", "aligned_face"), _embed_meta)
                      | mutated_safetensors(valid_embedding), check_identity_file, 100),
    "mask_file": (safetensors_files(("masks", "layout_maps", "other"), _mask_meta) | mutated_safetensors(valid_mask_file), check_mask_file, 100),
    "bench_results": (st.tuples(manifests(), results_docs()), check_bench_results, 30),
    "merge": (st.tuples(manifests(), results_docs(), results_docs()), check_merge, 20),
    "integrity": (st.lists(png_files() | st.binary(max_size=80), max_size=3), check_integrity, 50),
    "prompts_file": (st.tuples(st.sampled_from([".json", ".txt"]), _text_files | json_values), check_prompts_file, 100),
    "ids_file": (identity_docs(), check_ids_file, 60),
    "index_list": (st.text(max_size=20) | st.lists(st.integers(-3, 5), max_size=4), check_index_list, 100),
    "region_box": (_box_texts, check_region_box, 100),
    "region_mask": (mask_pictures(), check_region_mask, 30),
    "lora_names": (st.lists(_lora_text, max_size=4), check_lora_names, 40),
    "web_form": (web_forms, check_web_form, 60),
}


def run_reader(name: str, max_examples: int | None = None, **extra: Any) -> None:
    """Run one reader's property with hypothesis (derandomized: the same examples on every run)."""
    strategy, check, examples = READERS[name]
    conf = settings(max_examples=max_examples or examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), **extra)
    conf(given(strategy)(check))()


@pytest.mark.parametrize("name", list(READERS))
def test_reader_returns_a_record_or_one_line(name: str) -> None:
    run_reader(name)


# --------------------------------------------------------------------------- what the fuzzing found (each failed before its fix)


def _png_with_settings(text: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _IHDR + _chunk(b"tEXt", b"spatialid\0" + text) + _IDAT + _IEND


def _embedding_with_count(count: str) -> bytes:
    import torch
    from safetensors.torch import save

    meta = {"format": "spatialid.identity_embedding", "format_version": "1", "num_images": count}
    return save({"tokens": torch.ones(1, 2, 4), "uncond_tokens": torch.zeros(1, 2, 4)}, metadata=meta)


_BASE_MANIFEST = {"format": "spatialid-bench", "format_version": 2, "settings": {"steps": 2}, "identities": {},
                  "prompts": {"0": {"prompt": "a photo"}}, "presets": ["pulid"], "seeds": [0], "paths": "absolute"}
_EMPTY_RESULTS = {"datas": [], "tags": None, "failures": []}
_BASE_RECORD = {"prompt": "a portrait", "steps": 2, "seed": 1, "width": 64, "height": 64}

FOUND = [
    # a list or text where a number or a name belongs was kept in the record (TypeError later, or recorded as is)
    ("png_settings", _png_with_settings(b'{"width": []}')),
    ("settings_dict", {"guidance": []}),
    ("settings_dict", {"preset": []}),
    ("settings_dict", {"prompt": ["a", "list"]}),
    # a lone surrogate in a record could not be written back into a PNG (UnicodeEncodeError)
    ("from_png", {**_BASE_RECORD, "negative_prompt": "\ud800"}),
    # recorded input paths of the wrong type: TypeError in stored_inputs
    ("from_png", {**_BASE_RECORD, "input_paths": {"people": 1.5}}),
    # safetensors metadata that is no object: AttributeError; a photo count that is no number: ValueError
    ("identity_file", b'\x16\x00\x00\x00\x00\x00\x00\x00{"__metadata__": true}'),
    ("identity_file", _embedding_with_count("x")),
    # a failure whose key is a list: TypeError (unhashable)
    ("bench_results", (_BASE_MANIFEST, {**_EMPTY_RESULTS, "failures": [{"key": []}]})),
    # a manifest with "settings": null: TypeError in merge
    ("merge", ({**_BASE_MANIFEST, "settings": None}, _EMPTY_RESULTS, _EMPTY_RESULTS)),
    # an id that names no file (lone surrogate): UnicodeEncodeError
    ("ids_file", {"datas": ["\ud800"]}),
    # 1e999 is Inf: a bare ValueError; a typed region with a line break: a two-line message
    ("region_box", "1e999,0,1,1"),
    ("region_box", "k\x14\no/"),
    # a NUL byte in a LoRA name: ValueError from the path's resolve; "~user" of no user: RuntimeError
    ("lora_names", ["a\x00b.safetensors"]),
    ("lora_names", ["~6<#x.Ig", ":2"]),
    # a TIFF without its sizes as a region mask: TypeError from Pillow
    ("region_mask", "tiff-without-sizes"),
]


def _tiff_without_sizes() -> bytes:
    """A 5x2 TIFF whose first IFD offset byte is damaged, so Pillow finds no ImageWidth tag."""
    buf = io.BytesIO()
    Image.new("RGB", (5, 2)).save(buf, format="TIFF")
    blob = buf.getvalue()
    return blob[:8] + b"\x09" + blob[9:]


@pytest.mark.parametrize(("name", "example"), FOUND, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FOUND)])
def test_what_the_fuzzing_found_stays_fixed(name: str, example: Any) -> None:
    READERS[name][1](_tiff_without_sizes() if example == "tiff-without-sizes" else example)
