"""What ``spatialid serve`` exposes, over real HTTP: files, logins, caps, retention, clean-up.

Each test starts the app in this process with ``--model tiny`` on a free port of 127.0.0.1 and
talks to it with ``httpx`` (never any other address; proxies from the environment are ignored).
Servers are few (each ~1-3 s to start after the first) and always closed. The attacks are the
issue's: a home folder given as ``--output-dir``, a symlink planted in the predictable examples
cache, an anonymous request that costs 100 default requests, outputs that outlive their session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from spatialid.errors import SpatialIDError

gr = pytest.importorskip("gradio", reason="Gradio is not installed: pip install 'spatialid[ui]'")
httpx = pytest.importorskip("httpx")

HTTP_TIMEOUT = 120.0  # s: one tiny generation on 2 busy cores


# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ``tiny_pipe`` and the ``astronaut`` photo come from conftest.py: built once per session and shared.


@contextlib.contextmanager
def _serving(pipe: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``ui.app.launch`` on 127.0.0.1 in this process; yields (demo, client); always closed."""
    from spatialid.ui import app

    port = _free_port()
    demo = app.launch(pipe, model_name="tiny", host="127.0.0.1", port=port, prevent_thread_lock=True, **kwargs)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=HTTP_TIMEOUT)
    try:
        yield demo, client
    finally:
        client.close()
        demo.close()
        files = getattr(demo, "_spatialid_files", None)
        if files is not None:
            files.close()


def _upload(client: Any, photo: Path) -> dict:
    with open(photo, "rb") as fh:
        r = client.post("/gradio_api/upload", files=[("files", (photo.name, fh, "image/png"))])
    assert r.status_code == 200, r.text
    return {"path": r.json()[0], "orig_name": photo.name, "meta": {"_type": "gradio.FileData"}}


def _form(photo: dict, **overrides: Any) -> list:
    values: dict[str, Any] = {
        "photos": [photo], "prompt": "portrait photo", "negative_prompt": "", "preset": "paper", "id_weight": 1.0,
        "start_step": 0, "true_cfg": 1.0, "steps": 2, "guidance": 4.0, "width": 128, "height": 128, "seed": "7",
        "num_images": 1, "compare": False, "compare_presets": [],
        # several people, init image / mask, strength, LoRAs (spatialid.ui.people): unused here
        "region_1": "", "people_count": 1, "photos_2": None, "photos_3": None, "photos_4": None,
        "region_2": "", "region_3": "", "region_4": "", "init_image": None, "mask_upload": None,
        "strength": 0.8, "loras": "",
    }
    values.update(overrides)
    return list(values.values())


def _call(client: Any, data: list, session_hash: str | None = None) -> tuple[str, Any]:
    """POST /gradio_api/call/generate, then read its event stream: (``complete`` | ``error``, data)."""
    body: dict[str, Any] = {"data": data}
    if session_hash:
        body["session_hash"] = session_hash
    r = client.post("/gradio_api/call/generate", json=body)
    assert r.status_code == 200, r.text
    event_id = r.json()["event_id"]
    r = client.get(f"/gradio_api/call/generate/{event_id}")
    last: tuple[str, Any] = ("none", None)
    event = None
    for line in r.text.splitlines():
        if line.startswith("event: "):
            event = line[7:].strip()
        elif line.startswith("data: ") and event in ("complete", "error"):
            last = (event, json.loads(line[6:]))
    return last


def _file_url(path: str | Path) -> str:
    return f"/gradio_api/file={path}"


def _served_paths(output: list) -> list[str]:
    """Every file path in the generate output (gallery, comparison, masks, face, downloads)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("path"), str):
                found.append(value["path"])
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(output)
    return sorted(set(found))


# ----------------------------------------------------------------------------- 1. --output-dir is never served


def test_output_dir_is_never_served(tiny_pipe: Any, astronaut: Path, tmp_path: Path) -> None:
    """``--output-dir ~`` used to publish the home folder: a planted key came back with 200."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY----- planted")
    (home / "notes.png").write_bytes(astronaut.read_bytes())
    with _serving(tiny_pipe, output_dir=home) as (demo, client):
        assert client.get(_file_url(home / ".ssh" / "id_rsa")).status_code == 403
        assert client.get(_file_url(home / "notes.png")).status_code == 403
        event, output = _call(client, _form(_upload(client, astronaut)))
        assert event == "complete", output
        served = _served_paths(output)
        assert served and all(Path(p).is_relative_to(demo._spatialid_files.root) for p in served)
        for path in served:  # what this server wrote is served...
            assert client.get(_file_url(path)).status_code == 200
        kept = sorted(p.name for p in home.rglob("*.png") if p.name != "notes.png")
        assert any(n.endswith("_masks.png") for n in kept)  # ...and kept in --output-dir, unserved
        for path in home.rglob("*.png"):
            assert client.get(_file_url(path)).status_code == 403


def test_folders_unlisted_unguessable_and_extra_routes_off(tiny_pipe: Any, astronaut: Path) -> None:
    with _serving(tiny_pipe) as (demo, client):
        assert client.get("/gradio_api/runs").status_code == 404  # run history off
        assert client.get("/monitoring").status_code == 403  # traffic dashboard off
        files = demo._spatialid_files
        assert stat.S_IMODE(os.lstat(files.root).st_mode) == 0o700
        event, output = _call(client, _form(_upload(client, astronaut)), session_hash="visitor1")
        assert event == "complete", output
        image = Path(_served_paths(output)[0])
        session_folder = image.parent.parent
        assert session_folder.parent == files.sessions_dir
        assert "visitor1" not in str(image) and len(session_folder.name) >= 24  # 144 random bits
        for folder in (files.root, files.sessions_dir, session_folder, image.parent):
            r = client.get(_file_url(folder))
            assert r.status_code == 403 and image.name not in r.text


# ----------------------------------------------------------------------------- 2. the examples cache


@pytest.fixture()
def planted_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Another local user planted the predictable examples folder, with a symlink into a secret."""
    import tempfile

    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    monkeypatch.setenv("USER", "victim")
    monkeypatch.delenv("SPATIALID_CACHE", raising=False)
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    secret = tmp_path / "victim-home"
    secret.mkdir()
    (secret / "id_rsa").write_text("planted secret")
    target = secret / "astronaut.png"
    Image.new("RGB", (8, 8), "red").save(target)
    cache = shared_tmp / "spatialid-ui-examples-victim"
    cache.mkdir()
    (cache / "astronaut.png").symlink_to(target)
    return {"cache": cache, "secret": secret, "target": target, "tmp": shared_tmp}


def test_planted_example_symlink_exposes_nothing(tiny_pipe: Any, planted_cache: dict[str, Path]) -> None:
    secret = planted_cache["secret"]
    before = planted_cache["target"].read_bytes()
    with _serving(tiny_pipe) as (_, client):
        assert client.get(_file_url(secret / "id_rsa")).status_code == 403
        assert client.get(_file_url(planted_cache["target"])).status_code == 403
    assert planted_cache["target"].read_bytes() == before  # never written through


def test_example_cache_is_private_and_symlinks_are_not_followed(planted_cache: dict[str, Path], tmp_path: Path) -> None:
    from spatialid.ui.examples import default_cache_dir, write_example_photos

    fresh = write_example_photos(tmp_path / "fresh")
    assert stat.S_IMODE(os.lstat(tmp_path / "fresh").st_mode) == 0o700
    assert all(p.parent == tmp_path / "fresh" for p in fresh.values())

    # a symlink where a photo should be (in a folder of ours): replaced, never followed
    assert default_cache_dir() == planted_cache["cache"]
    os.chmod(planted_cache["cache"], 0o755)
    paths = write_example_photos()
    assert not paths["astronaut"].is_symlink() and paths["astronaut"].parent == planted_cache["cache"]
    with Image.open(paths["astronaut"]) as im:
        assert im.size == (512, 512)
    with Image.open(planted_cache["target"]) as im:
        assert im.size == (8, 8)

    # the folder itself a symlink, or writable by others: refused with one line
    linked = planted_cache["tmp"] / "linked"
    linked.symlink_to(planted_cache["secret"], target_is_directory=True)
    with pytest.raises(SpatialIDError, match="symlink") as info:
        write_example_photos(linked)
    assert "\n" not in str(info.value)
    open_dir = planted_cache["tmp"] / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(SpatialIDError, match="writable by other users"):
        write_example_photos(open_dir)


# ----------------------------------------------------------------------------- 3. logins and caps


def test_parse_auth_and_auth_file(tmp_path: Path) -> None:
    from spatialid.ui.network import host_warning, parse_auth

    assert parse_auth(["alice:pa:ss"]) == [("alice", "pa:ss")]
    good = tmp_path / "logins"
    good.write_text("# team\nalice:one\n\nbob:two\n")
    os.chmod(good, 0o600)
    assert parse_auth(["carol:three"], good) == [("carol", "three"), ("alice", "one"), ("bob", "two")]
    os.chmod(good, 0o644)
    with pytest.raises(SpatialIDError, match=r"readable or writable by every user .*chmod 600") as info:
        parse_auth(None, good)
    assert "\n" not in str(info.value)
    for bad, pattern in ((["alice"], "expected USER:PASS"), (["alice:"], "expected USER:PASS"),
                         (["a:hunter2", "a:2"], "given twice")):
        with pytest.raises(SpatialIDError, match=pattern) as info:
            parse_auth(bad)
        assert "hunter2" not in str(info.value)  # a password is never echoed
    with pytest.raises(SpatialIDError, match="no such file"):
        parse_auth(None, tmp_path / "missing")
    assert host_warning("127.0.0.1", 0) is None
    assert "no login is required" in host_warning("0.0.0.0", 0)
    assert "a login is required" in host_warning("0.0.0.0", 2)


def test_auth_guards_api_and_files(tiny_pipe: Any, astronaut: Path) -> None:
    with _serving(tiny_pipe, auth=[("alice", "s3cret")]) as (demo, client):
        example = next(demo._spatialid_files.examples_dir.glob("*.png"))
        assert client.get("/config").status_code == 401
        assert client.get(_file_url(example)).status_code == 401
        assert client.post("/gradio_api/call/generate", json={"data": []}).status_code == 401
        with open(astronaut, "rb") as fh:
            assert client.post("/gradio_api/upload", files=[("files", ("a.png", fh, "image/png"))]).status_code == 401
        assert client.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
        assert client.post("/login", data={"username": "alice", "password": "s3cret"}).status_code == 200
        assert client.get(_file_url(example)).status_code == 200
        config = client.get("/config")
        assert config.status_code == 200 and config.json()["components"]


def test_caps_are_enforced_over_http(tiny_pipe: Any, astronaut: Path) -> None:
    """Every value within its slider, the product too expensive: refused, saying the cap and the flag."""
    with _serving(tiny_pipe, queue_size=3) as (demo, client):
        assert demo._queue.max_size == 3
        photo = _upload(client, astronaut)
        # 40 steps x 4 images at the tiny default 128x128 = 40 default requests (cap 10)
        event, output = _call(client, _form(photo, steps=40, num_images=4))
        assert event == "error"
        message = json.dumps(output)
        assert "over this server's cap of 10" in message and "--max-cost" in message
        # a path outside the upload folder is never read: the API cannot fetch server files
        outside = {**photo, "path": str(astronaut)}  # a readable photo, but not uploaded
        event, output = _call(client, _form(outside))
        assert event == "error" and "not uploaded by a user" in json.dumps(output)
        # the queue cannot be skipped with a direct POST (it would bypass --queue-size)
        assert client.post("/gradio_api/run/generate", json={"data": _form(photo)}).status_code == 404
        assert not list(demo._spatialid_files.sessions_dir.rglob("*.png"))
    with _serving(tiny_pipe, max_cost=50) as (_, client):  # the operator raised it
        event, output = _call(client, _form(_upload(client, astronaut), steps=5, num_images=4))
        assert event == "complete", output


def test_cap_messages_name_the_flag(astronaut: Path) -> None:
    from spatialid.ui import handlers as h

    limits = h.UILimits(max_steps=30, max_images=2, max_side=512, max_cost=3, unit_steps=4, unit_width=128, unit_height=128)
    base = {"photos": [str(astronaut)], "prompt": "p", "steps": 4, "width": 128, "height": 128, "seed": "1", "limits": limits}
    for change, pattern in (
        ({"steps": 31}, "steps 31 is over this server's cap of 30; .*--max-steps N"),
        ({"num_images": 3}, "number of images 3 is over this server's cap of 2; .*--max-images N"),
        ({"width": 1024}, "width 1024 is over this server's cap of 512 px; .*--max-side N"),
        ({"num_images": 2, "true_cfg": 2.0}, r"costs 4 default requests \(4 steps x 2 images at 128x128, doubled by true CFG\), over this server's cap of 3"),
        ({"compare": True, "compare_presets": ["pulid", "paper", "relaxed", "entropy"]}, "3 compared presets.*--max-cost N"),
    ):
        with pytest.raises(h.UIInputError, match=pattern) as info:
            h.build_request(**{**base, **change})
        assert "\n" not in str(info.value)
    settings = h.build_request(**base).settings
    assert h.request_cost(settings, (), limits) == 1.0
    # the worst case with the old limits: 100 steps x (4 images + 9 presets) x 2048^2 x CFG
    real = h.UILimits()
    worst = settings.replace(steps=100, num_images=4, width=2048, height=2048, true_cfg=2.0)
    assert h.request_cost(worst, h.preset_choices(), real) == 520.0 > real.max_cost


def test_serve_flags_reach_launch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from spatialid.app.loading import Models
    from spatialid.cli import cmd_serve
    from spatialid.cli.main import main
    from spatialid.ui import app

    class _Pipe:
        def set_progress_bar_config(self, **kw: Any) -> None:
            pass

    launched: list[dict] = []
    monkeypatch.setattr(cmd_serve, "check_port_free", lambda host, port: None)
    monkeypatch.setattr(Models, "pipeline", lambda self: _Pipe())
    monkeypatch.setattr(app, "launch", lambda pipe, **kw: launched.append(kw))
    logins = tmp_path / "logins"
    logins.write_text("alice:one\n")
    os.chmod(logins, 0o600)
    argv = ["serve", "--model", "tiny", "--host", "0.0.0.0", "--auth-file", str(logins), "--max-steps", "80",
            "--max-images", "8", "--max-side", "1024", "--max-cost", "40", "--queue-size", "4", "--keep-outputs", "0.5",
            "--visitor-upload-mb", "60", "--total-upload-mb", "300"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "a login is required" in err
    kw = launched[-1]
    assert kw["auth"] == [("alice", "one")]
    assert (kw["max_steps"], kw["max_images"], kw["max_side"], kw["max_cost"], kw["queue_size"], kw["keep_outputs_hours"]) == (80, 8, 1024, 40.0, 4, 0.5)
    assert (kw["visitor_upload_mb"], kw["total_upload_mb"]) == (60.0, 300.0)
    assert main(["serve", "--model", "tiny", "--host", "0.0.0.0"]) == 0
    assert "no login is required" in capsys.readouterr().err and launched[-1]["auth"] is None
    os.chmod(logins, 0o604)
    assert main(["serve", "--model", "tiny", "--auth-file", str(logins)]) == 2
    err = capsys.readouterr().err.strip()
    assert "chmod 600" in err and len(err.splitlines()) == 1
    for bad, pattern in ((["--max-side", "100"], "multiple of 16"), (["--max-cost", "0"], "--max-cost must be > 0"),
                         (["--queue-size", "0"], "--queue-size must be >= 1"), (["--auth", "nopass"], "expected USER:PASS"),
                         (["--total-upload-mb", "nan"], "--total-upload-mb must be > 0"),
                         (["--visitor-upload-mb", "10"], "--visitor-upload-mb (10) is below --max-upload-mb (20)")):
        assert main(["serve", "--model", "tiny", *bad]) == 2
        assert pattern in capsys.readouterr().err


# ----------------------------------------------------------------------------- 4. nothing outlives its time


def test_session_files_deleted_when_the_tab_closes(
    tiny_pipe: Any, astronaut: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradio's heartbeat ends when the tab closes; the unload hook then deletes the session's files."""
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.3")
    with _serving(tiny_pipe) as (demo, client):
        session = "tab-one"
        stop = threading.Event()

        def heartbeat() -> None:  # what the open browser tab keeps doing
            with (
                httpx.Client(base_url=str(client.base_url), trust_env=False, timeout=30) as hb,
                hb.stream("GET", f"/gradio_api/heartbeat/{session}") as stream,
            ):
                for _ in stream.iter_lines():
                    if stop.is_set():
                        return

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        photo = _upload(client, astronaut)
        event, output = _call(client, _form(photo), session_hash=session)
        assert event == "complete", output
        served = _served_paths(output)
        assert client.get(_file_url(served[0])).status_code == 200
        stop.set()  # the tab closes
        beat.join(timeout=10)
        deadline = time.monotonic() + 20
        gone = [*served, photo["path"]]  # the outputs, and its upload (a few seconds later)
        while time.monotonic() < deadline and any(Path(p).exists() for p in gone):
            time.sleep(0.2)
        assert not any(Path(p).exists() for p in served)
        assert not Path(photo["path"]).exists()
        assert client.get(_file_url(served[0])).status_code == 403
        assert client.get(_file_url(next(demo._spatialid_files.examples_dir.glob("*.png")))).status_code == 200


def test_retention_bounds_disk_use(tiny_pipe: Any, astronaut: Path) -> None:
    """API calls never close a tab: their files go after --keep-outputs hours (swept here by clock)."""
    with _serving(tiny_pipe, keep_outputs_hours=0.5) as (demo, client):
        files = demo._spatialid_files
        baseline = files.disk_usage()  # the example photos, kept
        served = []
        for i in range(3):
            event, output = _call(client, _form(_upload(client, astronaut), seed=str(i)))
            assert event == "complete", output
            served += _served_paths(output)
        assert files.disk_usage() > baseline
        assert files.sweep(now=time.time() + 0.4 * 3600) == 0  # younger than the retention: kept
        assert files.sweep(now=time.time() + 0.5 * 3600 + 5) >= len(served)
        assert files.disk_usage() == baseline
        assert all(client.get(_file_url(p)).status_code == 403 for p in served)


def test_sigterm_removes_the_server_folder(tiny_pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``kill PID`` (systemd, docker stop) ends ``serve`` like Ctrl-C: its folder is deleted."""
    from spatialid.ui import app

    parent = tmp_path / "gradio-tmp"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(parent))
    port = _free_port()
    seen: dict[str, Any] = {"default_handler": False, "roots": []}

    def fallback(signum: int, frame: Any) -> None:  # reached only if launch() does not handle SIGTERM
        seen["default_handler"] = True
        raise KeyboardInterrupt

    def kill_when_up() -> None:
        deadline = time.monotonic() + 120
        with httpx.Client(trust_env=False, timeout=2) as probe:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if probe.get(f"http://127.0.0.1:{port}/").status_code == 200:
                        seen["roots"] = sorted(p.name for p in parent.iterdir())
                        time.sleep(0.5)  # let launch() reach its wait
                        os.kill(os.getpid(), signal.SIGTERM)
                        return
                time.sleep(0.2)

    previous = signal.signal(signal.SIGTERM, fallback)
    killer = threading.Thread(target=kill_when_up, daemon=True)
    killer.start()
    try:
        app.launch(tiny_pipe, model_name="tiny", host="127.0.0.1", port=port)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        killer.join(timeout=5)
    assert seen["roots"], "the server never answered"
    assert seen["default_handler"] is False
    assert not any(p.name.startswith("spatialid-serve-") for p in parent.iterdir())
    assert os.environ.get("GRADIO_TEMP_DIR") == str(parent)


def test_stale_folder_of_a_killed_server_is_removed(tmp_path: Path) -> None:
    from spatialid.ui.storage import ServeFiles

    dead = tmp_path / "spatialid-serve-dead"
    dead.mkdir()
    (dead / ".pid").write_text("999999999\n")  # no such process
    alive = tmp_path / "spatialid-serve-alive"
    alive.mkdir()
    (alive / ".pid").write_text(f"{os.getppid()}\n")
    foreign = tmp_path / "spatialid-serve-nopid"
    foreign.mkdir()
    files = ServeFiles(tmp_path)
    try:
        assert not dead.exists() and alive.exists() and foreign.exists()
        assert files.root.parent == tmp_path and stat.S_IMODE(os.lstat(files.root).st_mode) == 0o700
    finally:
        files.close()
    assert not files.root.exists()


def test_shared_upload_survives_the_other_visitor_leaving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradio stores uploads by content hash: two visitors with the same photo share one file.

    The one who leaves first must not delete it while the other holds it, even when the other's
    upload is registered just after the first session ended (the race the browser test once hit).
    """
    from spatialid.ui import storage
    from spatialid.ui.storage import ServeFiles

    monkeypatch.setattr(storage, "_UPLOAD_GRACE_S", 0.3)
    files = ServeFiles(tmp_path)
    try:
        shared = files.root / "0123abcd" / "astronaut.png"
        shared.parent.mkdir()
        shared.write_bytes(b"same photo")
        alone = files.root / "4567ef01" / "mine.png"
        alone.parent.mkdir()
        alone.write_bytes(b"only mine")
        files.note_uploads("visitor-a", [shared, alone])
        files.session_dir("visitor-a")
        files.end_session("visitor-a")  # A closes the tab ...
        files.note_uploads("visitor-b", [shared])  # ... while B's upload of the same photo registers
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alone.exists():
            time.sleep(0.05)
        assert not alone.exists() and not alone.parent.exists()  # A's own upload went
        assert shared.exists()  # B's did not
        files.end_session("visitor-b")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and shared.exists():
            time.sleep(0.05)
        assert not shared.exists()
    finally:
        files.close()
