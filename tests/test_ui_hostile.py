"""Hostile visitors of ``spatialid serve``, round two (issue 20, the web UI's points 3, 4, 5, 8, 10, 14).

Over real HTTP like tests/test_ui_security.py (whose helpers these tests use): a picture bomb as
init image / mask, an upload flood, anonymous calls to every route of a server with a login (the
heartbeat that ends a session among them), server paths in messages, LoRA names that are not
``.safetensors``, one session's leaving deleting another's init image, hostile settings in a PNG
dropped on "Load settings".
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="Gradio is not installed: pip install 'spatialid[ui]'")
httpx = pytest.importorskip("httpx")

from test_ui_security import _call, _form, _serving, _upload  # noqa: E402  (same folder; pytest puts it on the path)


def _png_bomb(path: Path, side: int = 10000) -> Path:
    """A real ``side`` x ``side`` grayscale PNG of zeros (~100 KB for 10000 px), written row by row
    so the test itself never holds the decoded picture."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def _file_data(path: str, name: str) -> dict:
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def _files_under(root: Path) -> set[Path]:
    """Files under ``root``, less Gradio's upload temp files (``tmp*``, renamed in the background)."""
    return {p for p in root.rglob("*") if p.is_file() and not p.name.startswith("tmp")}


# ----------------------------------------------------------------------------- 3. picture bombs


def test_picture_bomb_is_refused_from_its_header_and_nothing_is_written(
    tiny_pipe: Any, astronaut: Path, tmp_path: Path
) -> None:
    """A 10000x10000 PNG (~100 KB) as init image or as mask: refused from its header, in one line,
    before Gradio decodes it (the old code decoded it into ~1.5 GB and wrote a copy to disk)."""
    bomb = _png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000
    with _serving(tiny_pipe) as (demo, client):
        root = demo._spatialid_files.root
        photo = _upload(client, astronaut)
        uploaded = _upload(client, bomb)["path"]
        before = _files_under(root)
        editor = {"background": _file_data(uploaded, "bomb.png"), "layers": [], "composite": None}
        event, output = _call(client, _form(photo, init_image=editor))
        assert event == "error", output
        text = json.dumps(output)
        assert "10000x10000 pixels" in text and "megapixels" in text, text
        assert _files_under(root) == before  # nothing decoded and written (no cache copy, no outputs)
        # the same as a painted layer of a good init image, and as the mask picture
        good = {"background": _file_data(photo["path"], "astronaut.png"), "layers": [], "composite": None}
        for form in (
            _form(photo, init_image={**good, "layers": [_file_data(uploaded, "layer.png")]}),
            _form(photo, init_image=good, mask_upload=_file_data(uploaded, "bomb.png")),
        ):
            event, output = _call(client, form)
            assert event == "error" and "10000x10000 pixels" in json.dumps(output), output
        assert not list(demo._spatialid_files.sessions_dir.rglob("*.png"))


def test_editor_parts_in_memory_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The editor's parts the browser parks in memory (``accept_blobs``): a layer number of 10**9 (a
    list of a billion entries) and a picture bomb are refused; old parts go past the byte bound."""
    from types import SimpleNamespace

    from spatialid.ui import _gradio

    with gr.Blocks():
        editor = _gradio.GuardedImageEditor(type="filepath")

    def blob(kind: str, index: Any, data: bytes, key: str = "a") -> Any:
        return SimpleNamespace(data={"type": kind, "index": index, "id": key}, files=[("f.png", data)])

    small = io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, format="PNG")
    with pytest.raises(gr.Error, match="at most 8 painted layers"):
        editor.accept_blobs(blob("layer", str(10**9), small.getvalue()))
    big = io.BytesIO()
    Image.new("1", (5000, 5000)).save(big, format="PNG")
    with pytest.raises(gr.Error, match="5000x5000 pixels"):
        editor.accept_blobs(blob("background", None, big.getvalue()))
    assert editor.blob_storage == {}
    with pytest.raises(gr.Error, match="5000x5000 pixels"):  # the event naming that picture says so too
        editor.preprocess(SimpleNamespace(id="a"))
    editor.accept_blobs(blob("background", None, small.getvalue()))
    assert editor.blob_storage["a"].background == small.getvalue()
    # parked parts stay under the byte bound: the oldest go first
    monkeypatch.setattr(_gradio, "MAX_EDITOR_BLOB_BYTES", 3 * len(small.getvalue()))
    for key in "bcde":
        editor.accept_blobs(blob("background", None, small.getvalue(), key))
    assert list(editor.blob_storage) == ["c", "d", "e"]


# ----------------------------------------------------------------------------- 4. upload quota


def test_upload_quota_per_visitor_and_in_total(tiny_pipe: Any, tmp_path: Path) -> None:
    """20 quick uploads used to all be stored; now a visitor (a login) and the server have a bound,
    refused with one line (413), and freed when the uploads go."""
    blobs = []
    for i in range(4):
        path = tmp_path / f"u{i}.png"
        path.write_bytes(os.urandom(900_000))  # distinct bytes: Gradio stores each once
        blobs.append(path)
    logins = [("alice", "a-pass"), ("bob", "b-pass")]
    with _serving(tiny_pipe, auth=logins, max_upload_mb=1, visitor_upload_mb=2.5, total_upload_mb=3.2) as (demo, client):
        other = httpx.Client(base_url=str(client.base_url), trust_env=False, timeout=60)
        try:
            for c, (user, password) in zip((client, other), logins):
                assert c.post("/login", data={"username": user, "password": password}).status_code == 200

            def upload(c: Any, path: Path) -> Any:
                with open(path, "rb") as fh:
                    return c.post("/gradio_api/upload", files=[("files", (path.name, fh, "image/png"))])

            assert upload(client, blobs[0]).status_code == 200
            assert upload(client, blobs[1]).status_code == 200
            refused = upload(client, blobs[2])  # alice: 1.7 MB stored + 0.9 MB > 2.5 MB
            assert refused.status_code == 413
            assert refused.text.startswith("upload refused:") and "per visitor" in refused.text
            assert "\n" not in refused.text.strip()
            assert upload(other, blobs[2]).status_code == 200  # bob has his own bound ...
            refused = upload(other, blobs[3])  # ... but all together: 2.6 MB + 0.9 MB > 3.2 MB
            assert refused.status_code == 413 and "its limit of 3.2 MB" in refused.text
            stored = [p for p in _files_under(demo._spatialid_files.root) if p.stat().st_size == 900_000]
            assert len(stored) == 3
            demo._spatialid_files.sweep(now=time.time() + 2 * 3600)  # the retention takes them ...
            assert upload(other, blobs[3]).status_code == 200  # ... and the room is back
        finally:
            other.close()


# ----------------------------------------------------------------------------- 5. the login on every route


def _all_routes(routes: Any) -> list[Any]:
    """Every route, those of included routers too (newer FastAPI keeps them as one entry)."""
    found = []
    for route in routes:
        inner = getattr(route, "original_router", None) or (getattr(route, "app", None) if not hasattr(route, "methods") else None)
        if inner is not None and hasattr(inner, "routes"):
            found += _all_routes(inner.routes)
        else:
            found.append(route)
    return found


def test_every_route_but_static_files_needs_the_login(tiny_pipe: Any, astronaut: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``/gradio_api/heartbeat/<session>`` (whose end deletes that session's files), ``/cancel``,
    ``/stream``... answered anonymous clients; now every route but the static files says 401."""
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.3")
    with _serving(tiny_pipe, auth=[("alice", "s3cret")]) as (demo, client):
        assert client.post("/login", data={"username": "alice", "password": "s3cret"}).status_code == 200
        event, output = _call(client, _form(_upload(client, astronaut)), session_hash="victim")
        assert event == "complete", output
        folder = next(demo._spatialid_files.sessions_dir.iterdir())
        with httpx.Client(base_url=str(client.base_url), trust_env=False, timeout=10) as anonymous:
            with anonymous.stream("GET", "/gradio_api/heartbeat/victim") as r:  # (an open one never ends)
                assert r.status_code == 401 and "Not authenticated" in r.read().decode()
            time.sleep(1.5)  # what an ended heartbeat would have done by now
            assert folder.is_dir() and any(folder.rglob("*.png"))  # the victim's files are still there
            from spatialid.ui.network import is_public

            checked = []
            for route in _all_routes(demo.server_app.routes):
                path = getattr(route, "path", "")
                methods = sorted(getattr(route, "methods", None) or ["GET"])
                if not path or is_public(path) or is_public(path.split("{")[0]):
                    continue
                method = "GET" if "GET" in methods else methods[0]
                url = re.sub(r"\{[^}]+\}", "x", path)
                with anonymous.stream(method, url) as r:
                    assert r.status_code == 401, (method, url, r.status_code)
                checked.append(url)
            assert {"/gradio_api/heartbeat/x", "/gradio_api/cancel", "/gradio_api/upload", "/config"} <= set(checked)
            for public in ("/", "/favicon.ico", "/gradio_api/theme.css"):
                assert anonymous.get(public).status_code != 401, public  # the login page and static files
        assert client.get("/config").status_code == 200  # logged in: everything as before


# ----------------------------------------------------------------------------- 8. no server paths, LoRA files only


def test_lora_dir_offers_only_its_safetensors_and_messages_hide_its_path(tmp_path: Path) -> None:
    from spatialid.ui.inputs import UIInputError
    from spatialid.ui.people import parse_lora_lines

    folder = tmp_path / "operator-private-loras"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a LoRA")
    (folder / "old.bin").write_bytes(b"\x80\x04pickle")
    (folder / "broken.safetensors").write_bytes(b"not safetensors at all")
    for name in ("notes.txt", "old.bin", "../operator-private-loras/old.bin"):
        with pytest.raises(UIInputError, match="is not one of this server's LoRA files") as info:
            parse_lora_lines(name, folder)
        assert str(folder) not in str(info.value) and str(tmp_path) not in str(info.value)
    with pytest.raises(UIInputError) as info:
        parse_lora_lines("broken:0.5", folder)
    assert "broken.safetensors" in str(info.value) and str(tmp_path) not in str(info.value)
    with pytest.raises(UIInputError, match="scale must be") as info:
        parse_lora_lines("broken.safetensors:99", folder)
    assert str(tmp_path) not in str(info.value)


def test_generate_errors_never_show_server_paths(tiny_pipe: Any, astronaut: Path, tmp_path: Path) -> None:
    """A damaged mask upload and a bad LoRA: the line names the files, never the private folder, a
    session's random folder or ``--lora-dir``."""
    loras = tmp_path / "operator-private-loras"
    loras.mkdir()
    (loras / "broken.safetensors").write_bytes(b"not safetensors")
    fake = tmp_path / "mask.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n this is no picture")
    with _serving(tiny_pipe, lora_dir=loras) as (demo, client):
        photo = _upload(client, astronaut)
        good = {"background": _file_data(photo["path"], "astronaut.png"), "layers": [], "composite": None}
        forms = (
            _form(photo, loras="broken:0.5"),
            _form(photo, init_image=good, mask_upload=_file_data(_upload(client, fake)["path"], "mask.png")),
        )
        for form in forms:
            event, output = _call(client, form, session_hash="someone")
            assert event == "error", output
            text = json.dumps(output)
            for secret in (str(demo._spatialid_files.root), str(loras), "/s/"):
                assert secret not in text, (secret, text)


# ----------------------------------------------------------------------------- 10. uploads held per session


def test_init_image_held_by_its_session_survives_another_leaving(
    tiny_pipe: Any, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B uploads photo X and leaves; A uses the same X (same content-hashed upload) as its init image.
    B's leaving used to delete it ("Could not preprocess input component at index 23")."""
    from spatialid.ui import storage

    monkeypatch.setattr(storage, "_UPLOAD_GRACE_S", 0.2)
    with _serving(tiny_pipe) as (demo, client):
        files = demo._spatialid_files
        shared = _upload(client, photo_dir / "mirrored.png")
        own = _upload(client, photo_dir / "astronaut.png")
        event, output = _call(client, _form(shared), session_hash="visitor-b")
        assert event == "complete", output
        editor = {"background": _file_data(shared["path"], "mirrored.png"), "layers": [], "composite": None}
        form = _form(own, init_image=editor, strength=0.5)
        event, output = _call(client, form, session_hash="visitor-a")
        assert event == "complete", output
        files.end_session("visitor-b")  # B closes the tab
        time.sleep(1.0)
        assert Path(shared["path"]).exists()  # A holds it
        event, output = _call(client, form, session_hash="visitor-a")  # A's next click works
        assert event == "complete", output
        files.end_session("visitor-a")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(shared["path"]).exists():
            time.sleep(0.1)
        assert not Path(shared["path"]).exists()  # the last holder gone: deleted


# ----------------------------------------------------------------------------- 14. hostile settings in a PNG


def _png_with_settings(path: Path, record: Any) -> Path:
    from PIL.PngImagePlugin import PngInfo

    from spatialid.app.metadata import METADATA_KEY

    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(record))
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": ["a", "list"], "seed": 1, "preset": "paper"},
        {"prompt": "p", "seed": 1, "steps": "many"},
        {"prompt": "p", "seed": 1, "width": {"a": 1}},
        {"prompt": "p", "seed": 1, "preset": ["paper"]},
        {"prompt": "p", "seed": 1, "people": 5},
        {"prompt": "p", "seed": "1e400"},
        [1, 2, 3],
    ],
)
def test_load_settings_of_a_hostile_png_is_one_line_without_traceback(
    record: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from spatialid.ui import handlers as h

    path = _png_with_settings(tmp_path / "hostile.png", record)
    with caplog.at_level(logging.DEBUG):
        values, message = h.settings_from_file(str(path))
    assert values is None, values
    assert message.startswith("**No settings loaded**") and "\n" not in message
    assert str(tmp_path) not in message and "Traceback" not in message
    assert not any(r.exc_info for r in caplog.records)


def test_load_settings_never_shows_an_exception_text(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever a reader raises on a visitor's file, the page shows one line of ours and the log no traceback."""
    from spatialid.app import metadata
    from spatialid.ui import handlers as h

    def broken(path: Any) -> Any:
        raise IndexError("list index out of range in /very/private/path")

    monkeypatch.setattr(metadata, "read_image_metadata", broken)
    with caplog.at_level(logging.DEBUG):
        values, message = h.settings_from_file(str(_png_with_settings(tmp_path / "x.png", {"prompt": "p", "seed": 1})))
    assert values is None and "damaged spatialid settings" in message
    assert "list index" not in message and "/very/private" not in message
    assert not any(r.exc_info for r in caplog.records)
