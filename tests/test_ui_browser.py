"""End to end: ``spatialid serve --model tiny`` driven in Debian's chromium with Playwright.

Runs a real server process on 127.0.0.1 and a real browser (no browser download: Playwright
launches /usr/bin/chromium, which ``.ci/run`` installs). A visitor's path: upload the astronaut
photo, type a prompt, press Generate, see an image and the mask picture; upload a photo without a
face (coffee cup) and see the one-line error; click an example and see it run. The page must not
request anything outside 127.0.0.1 (the machine may be offline). The screenshot is written to
``test-artifacts/ui.png`` at the repository root.

Run only these tests with ``python -m pytest -m browser``; they skip with the reason when chromium
or Playwright is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
# The machine's network may be closed: without these flags chromium keeps trying to reach Google
# services (updates, sync, QUIC probes) and fills the log with refused connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_TIMEOUT = 90.0  # s: Python + torch + gradio imports and the tiny model on 2 slow cores
GENERATE_TIMEOUT_MS = 60_000

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) to run the browser test",
        allow_module_level=True,
    )
pytest.importorskip("playwright.sync_api", reason="Playwright (python) is not installed: pip install playwright")
pytest.importorskip("gradio", reason="Gradio is not installed: pip install 'spatialid[ui]'")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Poll the page until it answers 200; fail early (with the server log) if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"spatialid serve exited with {proc.returncode} before answering:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"spatialid serve did not answer on {url} within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (gradio may start helper threads/processes), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``spatialid serve --model tiny`` on a free port of 127.0.0.1; always terminated afterwards."""
    work = tmp_path_factory.mktemp("serve")
    port = _free_port()
    log_path = work / "server.log"
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "SPATIALID_CACHE": str(work / "cache"),
        "GRADIO_TEMP_DIR": str(work / "gradio"),
    }
    cmd = [
        sys.executable, "-m", "spatialid", "serve", "--model", "tiny", "--host", "127.0.0.1",
        # no --output-dir: a server on 127.0.0.1 keeps its results in ./outputs by default (cwd: work)
        "--port", str(port), "--device", "cpu", "--max-upload-mb", "1",
        "--max-cost", "2000",  # the queue test asks for every preset at 50 steps and 256 px
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_ready(url, proc, log_path, SERVER_START_TIMEOUT)
        yield {"url": url, "log": log_path, "outputs": work / "outputs", "proc": proc, "gradio_tmp": work / "gradio"}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def photos(photo_dir: Path) -> dict[str, Path]:
    """conftest's shared photos (read-only): the astronaut, the coffee cup (no face), the mirrored astronaut."""
    return {name: photo_dir / f"{name}.png" for name in ("astronaut", "coffee", "mirrored")}


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture()
def page(browser: object, server: dict, request: pytest.FixtureRequest) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    pg = context.new_page()
    pg.set_default_timeout(GENERATE_TIMEOUT_MS)
    outside: list[str] = []

    def record(request: object) -> None:
        host = urlparse(request.url).hostname  # type: ignore[attr-defined]
        if request.url.startswith(("http:", "https:", "ws:", "wss:")) and host not in ("127.0.0.1", "localhost"):  # type: ignore[attr-defined]
            outside.append(request.url)  # type: ignore[attr-defined]

    pg.on("request", record)
    pg.outside_requests = outside  # type: ignore[attr-defined]
    pg.goto(server["url"])
    pg.wait_for_selector("#generate")
    try:
        yield pg
    finally:
        with contextlib.suppress(Exception):  # the page as the test left it, to debug failures
            ARTIFACTS.mkdir(exist_ok=True)
            pg.screenshot(path=str(ARTIFACTS / f"last-{request.node.name}.png"))
        context.close()


def _upload(page: object, photo: Path, box: str = "#id-photo") -> None:
    """Drop ``photo`` on the photo box (replaces the set) or ``#add-photo`` (adds one of the same person)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    field = page.locator(f"{box} input[type=file]")  # type: ignore[attr-defined]
    try:
        field.wait_for(state="attached", timeout=30_000)
    except PlaywrightTimeout:  # once seen on a cold server under load: the image box not hydrated; reload once
        page.reload()  # type: ignore[attr-defined]
        page.wait_for_selector("#generate")  # type: ignore[attr-defined]
    field.set_input_files(str(photo))
    # upload finished: the list of photos used names it, with a download link to the server's copy
    # (the list itself shows once there are two photos to choose from)
    page.locator(f'#id-photos a[download="{photo.name}"]').wait_for(state="attached")  # type: ignore[attr-defined]


def _upload_and_generate(page: object, photo: Path, prompt: str) -> None:
    _upload(page, photo)
    page.locator("#prompt textarea").fill(prompt)  # type: ignore[attr-defined]
    page.locator("#generate").click()  # type: ignore[attr-defined]


def _wait_done(page: object) -> None:
    """Wait for the run to end; a refusal fails at once with the status line (not a 60 s timeout)."""
    status = page.locator("#status")  # type: ignore[attr-defined]
    status.get_by_text("Done:").or_(status.get_by_text("Not generated")).first.wait_for()
    text = status.inner_text()
    assert "Done:" in text, f"the run did not finish: {text.strip()}"
    _wait_chain_end(page)


def _wait_chain_end(page: object) -> None:
    """The run's last event (the used seed back in its box, the history) has run: Stop is off again."""
    page.wait_for_function("() => document.querySelector('#stop').disabled")  # type: ignore[attr-defined]


def _image_loaded(page: object, selector: str) -> dict:
    """Wait until an <img> under ``selector`` has decoded pixels; return its natural size."""
    img = page.locator(f"{selector} img").first  # type: ignore[attr-defined]
    img.wait_for(state="visible")
    page.wait_for_function(  # type: ignore[attr-defined]
        "sel => { const i = document.querySelector(sel + ' img'); return i && i.complete && i.naturalWidth > 0; }",
        arg=selector,
    )
    return img.evaluate("i => ({w: i.naturalWidth, h: i.naturalHeight, src: i.src})")


def test_generate_shows_image_masks_and_no_face_error(page: object, server: dict, photos: dict) -> None:
    started = time.monotonic()
    assert "noise by design" in page.locator("#tiny-notice").inner_text()  # type: ignore[attr-defined]

    # 1. a photo with a face: image, mask picture, aligned face, downloads, settings.
    _upload_and_generate(page, photos["astronaut"], "portrait photo of a woman wearing a space suit")
    _wait_done(page)
    image = _image_loaded(page, "#images")
    masks = _image_loaded(page, "#mask-picture")
    face = _image_loaded(page, "#aligned-face")
    assert (image["w"], image["h"]) == (128, 128)  # the tiny model's default size in the UI
    assert masks["w"] > image["w"]  # final image + early/mid/late heat maps side by side
    assert face["w"] > 0
    settings = page.locator("#settings textarea").input_value()  # type: ignore[attr-defined]
    assert "portrait photo of a woman wearing a space suit" in settings
    assert "preset relaxed" in settings and "photos: astronaut.png" in settings  # the default preset, compact
    assert "null" not in settings and len(settings.splitlines()) <= 5
    note = page.locator("#storage-note").inner_text()  # type: ignore[attr-defined]
    assert "Kept" in note and str(server["outputs"].resolve()) in note  # where the kept results are
    assert page.locator('#downloads a[download$=".png"]').count() == 2  # type: ignore[attr-defined]  # image + masks
    # download names say what each file is, shown in full (not cut to the same prefix)
    used = page.locator("#seed textarea, #seed input").first.input_value()  # type: ignore[attr-defined]
    names = page.locator("#downloads a[download]").evaluate_all("as => as.map(a => a.download)")  # type: ignore[attr-defined]
    assert names == [f"spatialid-s{used}.png", f"spatialid-s{used}_masks.png"]
    cut = page.locator("#downloads td.filename").evaluate_all(  # type: ignore[attr-defined]
        "tds => tds.filter(td => td.scrollWidth > td.clientWidth + 1).length"
    )
    assert cut == 0
    written = sorted(p.name for p in server["outputs"].rglob("*.png"))
    assert any(n.endswith("_masks.png") for n in written) and any(not n.endswith("_masks.png") for n in written)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)  # type: ignore[attr-defined]

    # 2. a photo without a face, dropped on the box: it replaces the astronaut (not added to it),
    # and the one-line error names it.
    _upload_and_generate(page, photos["coffee"], "portrait photo of a person")
    status = page.locator("#status").get_by_text("Not generated")  # type: ignore[attr-defined]
    status.wait_for()
    message = page.locator("#status").inner_text()  # type: ignore[attr-defined]
    assert "no face found in coffee.png" in message and "\n" not in message.strip()
    assert page.locator("#id-photos a[download]").count() == 1  # type: ignore[attr-defined]  # coffee alone
    # one run = one result area: nothing of the astronaut run is left next to the error
    for box in ("#images", "#mask-picture", "#aligned-face"):
        assert page.locator(f"{box} img").count() == 0, box  # type: ignore[attr-defined]
    assert page.locator("#downloads a[download]").count() == 0  # type: ignore[attr-defined]
    assert page.locator("#settings textarea").input_value() == ""  # type: ignore[attr-defined]
    # the refusal is said once, in the status line: no popup, no red badge on the outputs
    page.wait_for_timeout(600)
    assert page.locator(".toast-body:visible").count() == 0  # type: ignore[attr-defined]
    assert page.locator("#images .error:visible, #mask-picture .error:visible").count() == 0  # type: ignore[attr-defined]
    page.screenshot(path=str(ARTIFACTS / "ui-error.png"), full_page=False)  # type: ignore[attr-defined]

    assert page.outside_requests == []  # type: ignore[attr-defined]
    assert time.monotonic() - started < 90


def test_upload_replaces_shows_face_and_adds_same_person(page: object, photos: dict) -> None:
    """A dropped photo replaces the last one; the face check runs on upload; adding is explicit."""
    assert "One person" in page.locator("#photo-help").inner_text()  # type: ignore[attr-defined]
    _upload(page, photos["coffee"])
    face_check = page.locator("#face-check")  # type: ignore[attr-defined]
    face_check.get_by_text("no face found in coffee.png").wait_for()  # before Generate
    page.locator("#prompt textarea").fill("portrait photo")  # type: ignore[attr-defined]
    page.locator("#generate").click()  # type: ignore[attr-defined]
    page.locator("#status").get_by_text("Not generated").wait_for()  # type: ignore[attr-defined]

    _upload(page, photos["astronaut"])  # the natural next step: drop another photo
    face_check.get_by_text("Face found: 1 photo").wait_for()
    names = page.locator("#id-photos a[download]").evaluate_all("as => as.map(a => a.download)")  # type: ignore[attr-defined]
    assert names == ["astronaut.png"]  # replaced, not appended
    assert "Not generated" not in page.locator("#status").inner_text()  # type: ignore[attr-defined]  # old error gone
    page.wait_for_function("() => document.querySelectorAll('#photo-preview img').length >= 2")  # type: ignore[attr-defined]  # photo + face crop
    assert "astronaut.png" in page.locator("#photo-preview").inner_text()  # type: ignore[attr-defined]
    page.locator("#generate").click()  # type: ignore[attr-defined]
    _wait_done(page)

    page.locator("#add-photo").wait_for()  # type: ignore[attr-defined]
    page.locator("#add-photo").locator("xpath=preceding-sibling::input[1]").set_input_files(str(photos["astronaut"]))  # type: ignore[attr-defined]
    page.wait_for_function("() => document.querySelectorAll('#id-photos a[download]').length == 2")  # type: ignore[attr-defined]
    face_check.get_by_text("2 photos of one person").wait_for()
    # removing one from "Photos used" checks the faces again
    page.locator("#id-photos tr.file").last.locator("button").last.click()  # type: ignore[attr-defined]
    page.wait_for_function("() => document.querySelectorAll('#id-photos a[download]').length == 1")  # type: ignore[attr-defined]
    face_check.get_by_text("Face found: 1 photo").wait_for()
    page.wait_for_function("() => document.querySelectorAll('#photo-preview img').length == 2")  # type: ignore[attr-defined]
    assert page.outside_requests == []  # type: ignore[attr-defined]


def test_seed_written_back_randomize_and_reuse(page: object, photos: dict) -> None:
    """The used seed shows in the box; "Reuse last seed" repeats it; 64-bit seeds (the CLI's range) work."""
    import re

    assert page.locator("#randomize input[type=checkbox]").is_checked()  # type: ignore[attr-defined]
    _upload_and_generate(page, photos["astronaut"], "portrait photo")
    _wait_done(page)
    used = re.search(r"seed (\d+)", page.locator("#status").inner_text()).group(1)  # type: ignore[attr-defined,union-attr]
    seed_box = page.locator("#seed textarea, #seed input").first  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]
        "s => { const e = document.querySelector('#seed textarea, #seed input'); return e && e.value === s; }", arg=used
    )
    page.locator("#generate").click()  # type: ignore[attr-defined]  # randomize on: a fresh seed
    page.wait_for_function(  # type: ignore[attr-defined]
        "s => /^\\d+$/.test(document.querySelector('#seed textarea, #seed input').value) && "
        "document.querySelector('#seed textarea, #seed input').value !== s", arg=used
    )
    _wait_done(page)
    page.locator("#reuse-seed").click()  # type: ignore[attr-defined]
    page.wait_for_function("() => !document.querySelector('#randomize input').checked")  # type: ignore[attr-defined]
    reused = seed_box.input_value()
    page.locator("#generate").click()  # type: ignore[attr-defined]
    page.locator("#status").get_by_text(f"seed {reused},").wait_for()  # type: ignore[attr-defined]
    _wait_chain_end(page)  # else the seed written back could land after the next fill

    big = "2680261499100305976"  # PuLID's own example seed, > 2**32
    seed_box.fill(big)
    page.locator("#generate").click()  # type: ignore[attr-defined]
    page.locator("#status").get_by_text(f"seed {big},").wait_for()  # type: ignore[attr-defined]
    assert f"Seed {big}," in page.locator("#settings textarea").input_value()  # type: ignore[attr-defined]
    assert seed_box.input_value() == big


def test_example_click_runs_generation(page: object) -> None:
    """One click on an example thumbnail fills photo, prompt and its tuned settings, and generates."""
    thumbs = page.locator("#examples button.thumbnail-item")  # type: ignore[attr-defined]
    assert thumbs.count() == 3 and page.locator("#examples img").count() == 3  # type: ignore[attr-defined]
    assert "start step 4" in page.locator("#examples").inner_text()  # type: ignore[attr-defined]
    thumbs.nth(1).click()  # the stylised prompt: PuLID's advice is start step 0-1
    _wait_done(page)
    assert _image_loaded(page, "#images")["w"] == 128
    assert page.locator("#prompt textarea").input_value().startswith("oil painting")  # type: ignore[attr-defined]
    settings = page.locator("#settings textarea").input_value()  # type: ignore[attr-defined]
    assert "start step 1" in settings and "ID weight 1.2" in settings
    thumbs.nth(0).click()  # the photo: start step 4
    page.locator("#status").get_by_text("Generating").wait_for()  # type: ignore[attr-defined]
    _wait_done(page)
    assert "start step 4" in page.locator("#settings textarea").input_value()  # type: ignore[attr-defined]
    assert page.locator("#prompt textarea").input_value().startswith("portrait photo")  # type: ignore[attr-defined]
    # the last example is a photo without a face: one click shows why it cannot work
    thumbs.nth(2).click()
    page.locator("#status").get_by_text("Not generated").wait_for()  # type: ignore[attr-defined]
    assert "no face found in coffee.png" in page.locator("#status").inner_text()  # type: ignore[attr-defined]
    assert page.outside_requests == []  # type: ignore[attr-defined]


def test_compare_presets_side_by_side(page: object, server: dict, photos: dict) -> None:
    """Compare mode: the chosen preset first, then the compared ones, each with its image and mask row."""
    from spatialid.app.metadata import read_image_metadata

    page.locator("#preset input").fill("paper")  # type: ignore[attr-defined]
    page.locator("#preset input").press("Enter")  # type: ignore[attr-defined]
    page.locator("#preset-help").get_by_text("paper").first.wait_for()  # type: ignore[attr-defined]
    page.locator("#compare input[type=checkbox]").check()  # type: ignore[attr-defined]
    page.locator("#compare-presets").wait_for(state="visible")  # type: ignore[attr-defined]
    for label in page.locator("#compare-presets label").all():  # type: ignore[attr-defined]
        box = label.locator("input")
        if label.inner_text().strip() in ("pulid", "relaxed"):
            box.check()
        else:
            box.uncheck()
    _upload_and_generate(page, photos["astronaut"], "portrait photo, oil painting")
    _wait_done(page)
    grid = _image_loaded(page, "#comparison")
    assert grid["w"] >= 4 * 256  # identity photo + paper + pulid + relaxed, tiles of >= 256 px
    assert grid["h"] >= 4 * 256  # the image row, then three mask rows
    assert "preset comparison" in page.locator("#status").inner_text()  # type: ignore[attr-defined]
    assert page.locator("#comparison [data-testid=block-label]:visible").count() == 0  # type: ignore[attr-defined]  # no label over the title
    used = page.locator("#seed textarea, #seed input").first.input_value()  # type: ignore[attr-defined]
    compare_png = next(server["outputs"].rglob(f"spatialid-s{used}_compare.png"))
    meta = read_image_metadata(compare_png)
    assert meta["presets_shown"] == ["paper", "pulid", "relaxed"]
    page.locator("#comparison").scroll_into_view_if_needed()  # type: ignore[attr-defined]
    page.screenshot(path=str(ARTIFACTS / "ui-compare.png"))  # type: ignore[attr-defined]


def test_wrong_file_type_is_refused(page: object, tmp_path: Path) -> None:
    """A text file is refused by the upload box itself; Generate then says a photo is missing."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page.locator("#id-photo input[type=file]").set_input_files(str(notes))  # type: ignore[attr-defined]
    page.locator(".toast-body").filter(has_text="Invalid file type").first.wait_for(state="visible")  # type: ignore[attr-defined]
    page.locator("#prompt textarea").fill("portrait")  # type: ignore[attr-defined]
    page.locator("#generate").click()  # type: ignore[attr-defined]
    page.locator("#status").get_by_text("Not generated").wait_for()  # type: ignore[attr-defined]
    assert "no identity photo" in page.locator("#status").inner_text()  # type: ignore[attr-defined]


def test_too_large_upload_is_refused(page: object, tmp_path: Path) -> None:
    """The server runs with --max-upload-mb 1: a 3 MB photo never reaches the model."""
    import numpy as np
    from PIL import Image

    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 2 * 2**20
    page.locator("#id-photo input[type=file]").set_input_files(str(big))  # type: ignore[attr-defined]
    toast = page.locator(".toast-body").filter(has_text="exceed the maximum allowed size")  # type: ignore[attr-defined]
    toast.first.wait_for(state="visible")
    assert "big.png" in toast.first.inner_text()
    assert page.locator('#id-photos a[download="big.png"]').count() == 0  # type: ignore[attr-defined]


def test_queue_shows_waiting_visitor_their_place(browser: object, server: dict, photos: dict) -> None:
    """One generation at a time: a second visitor sees "queue: 1/1" until the first one is done."""
    import re

    pages = []
    contexts = [browser.new_context(viewport={"width": 1200, "height": 900}) for _ in range(2)]  # type: ignore[attr-defined]
    try:
        for ctx in contexts:
            pg = ctx.new_page()
            pg.set_default_timeout(GENERATE_TIMEOUT_MS)
            pg.goto(server["url"])
            pg.wait_for_selector("#generate")
            pages.append(pg)
        first, second = pages
        # the first visitor asks for a long job: every preset compared, at the most steps the tiny
        # model allows (7 runs of 50 steps), so it is still running when the second one asks
        first.get_by_role("button", name=re.compile("^Settings")).first.click()
        steps_box = first.locator("#steps input[type=number]")
        steps_box.fill("50")
        steps_box.press("Enter")
        for side in ("#width", "#height"):  # 4x the tokens: the job outlasts a slow second upload
            box = first.locator(f"{side} input[type=number]")
            box.fill("256")
            box.press("Enter")
        first.locator("#compare input[type=checkbox]").check()
        for label in first.locator("#compare-presets label").all():
            label.locator("input").check()
        _upload_and_generate(first, photos["astronaut"], "portrait photo")
        first.locator("#images").get_by_text(re.compile(r"processing|\d+/\d+ steps")).first.wait_for()
        _upload_and_generate(second, photos["astronaut"], "portrait photo")
        second.locator("#images").get_by_text(re.compile(r"queue: 1/\d")).first.wait_for(timeout=45_000)
        first.locator("#status").get_by_text("Done:").wait_for()
        second.locator("#status").get_by_text("Done:").wait_for()
        assert "preset comparison" in first.locator("#status").inner_text()
    finally:
        for ctx in contexts:
            ctx.close()


def test_first_screen_fits_1280x720_enter_generates(browser: object, server: dict, photos: dict) -> None:
    """At 1280x720 the photo, prompt, preset, ID weight, seed and Generate are in view without scrolling;
    Enter in the prompt generates, Shift+Enter starts a new line; aspect ratios set the size."""
    context = browser.new_context(viewport={"width": 1280, "height": 720})  # type: ignore[attr-defined]
    try:
        pg = context.new_page()
        pg.set_default_timeout(GENERATE_TIMEOUT_MS)
        pg.goto(server["url"])
        pg.wait_for_selector("#generate")
        pg.wait_for_timeout(500)  # let the layout settle

        def in_view(when: str) -> None:
            for box in ("#id-photo", "#prompt", "#preset", "#id-weight", "#seed", "#generate", "#stop"):
                bb = pg.locator(box).first.bounding_box()
                assert bb is not None and bb["y"] >= 0 and bb["y"] + bb["height"] <= 720, (when, box, bb)
            assert pg.evaluate("() => window.scrollY") == 0

        in_view("fresh page")
        assert "Shift+Enter" in pg.locator("#prompt").inner_text()

        _upload(pg, photos["astronaut"])
        prompt = pg.locator("#prompt textarea")
        prompt.fill("portrait photo")
        prompt.press("Shift+Enter")
        prompt.type("studio light")
        assert prompt.input_value() == "portrait photo\nstudio light"  # a new line, no run
        assert "Generating" not in pg.locator("#status").inner_text()
        prompt.press("Enter")
        _wait_done(pg)
        assert _image_loaded(pg, "#images")["w"] == 128
        in_view("after a run, with the face check line and a two-line prompt")

        pg.get_by_role("button", name=re.compile("^Settings")).first.click()
        pg.locator("#aspect label").filter(has_text="3:4").click()
        pg.wait_for_function("() => document.querySelector('#width input[type=number]').value === '112'")
        assert pg.locator("#height input[type=number]").input_value() == "144"  # 3:4 at the default's pixels
        pg.get_by_role("button", name=re.compile("^Settings")).first.click()  # fold it again
        pg.evaluate("() => window.scrollTo(0, 0)")
        pg.wait_for_timeout(300)
        ARTIFACTS.mkdir(exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / "ui-1280x720.png"))  # the finished page (docs/images/web-ui.png)

        def result_in_view(when: str) -> None:
            _image_loaded(pg, "#images")
            for box in ("#status", "#images"):
                bb = pg.locator(box).first.bounding_box()
                assert bb is not None and bb["y"] >= 0 and bb["y"] + min(bb["height"], 150) <= 720, (when, box, bb)

        # an example far below the result column: after its click the run's result is what is in view
        pg.locator("#examples").scroll_into_view_if_needed()
        pg.locator("#examples button.thumbnail-item").nth(1).click()
        pg.locator("#status").get_by_text("Generating").wait_for()
        _wait_done(pg)
        result_in_view("after an example click")
        # a history click far below: the clicked image is shown large, in view
        pg.locator("#history").scroll_into_view_if_needed()
        pg.locator("#history button.thumbnail-item").nth(1).click()
        pg.locator("#status").get_by_text("Loaded the settings of").wait_for()
        result_in_view("after a history click")
    finally:
        context.close()


def test_stop_cancels_and_frees_the_queue(page: object, server: dict, photos: dict) -> None:
    """Stop is on only while this tab's run is queued or running; it ends a long run between two steps and
    says "Stopped" (never "something went wrong"), and the next run starts at once."""
    stop = page.locator("#stop")  # type: ignore[attr-defined]
    assert stop.is_disabled()  # idle: nothing to stop
    page.get_by_role("button", name=re.compile("^Settings")).first.click()  # type: ignore[attr-defined]
    width = page.locator("#width input[type=number]")  # type: ignore[attr-defined]
    width.fill("5000")  # typed past the slider's end: refused with a line, not silently made 512
    width.press("Enter")
    page.locator("#width").get_by_text("5000 refused: Width must be between 64 and 512").wait_for()  # type: ignore[attr-defined]
    assert width.input_value() == "128"
    steps_box = page.locator("#steps input[type=number]")  # type: ignore[attr-defined]
    steps_box.fill("50")
    steps_box.press("Enter")
    for side in ("#width", "#height"):  # 4x the tokens: long enough to be stopped on a fast machine too
        box = page.locator(f"{side} input[type=number]")  # type: ignore[attr-defined]
        box.fill("256")
        box.press("Enter")
    page.locator("#compare input[type=checkbox]").check()  # type: ignore[attr-defined]  # pulid + relaxed: 2 runs
    page.locator("#cost").get_by_text(re.compile(r"^Cost: [\d.]+ of this server's cap of 2000")).wait_for()  # type: ignore[attr-defined]
    seed_box = page.locator("#seed textarea, #seed input").first  # type: ignore[attr-defined]
    page.locator("#randomize input").uncheck()  # type: ignore[attr-defined]
    seed_box.fill("4242424242")  # the stopped run's files would be named by it
    _upload_and_generate(page, photos["astronaut"], "portrait photo")
    page.locator("#images").get_by_text(re.compile(r"denoising step")).first.wait_for()  # type: ignore[attr-defined]
    assert stop.is_enabled()
    started = time.monotonic()
    stop.click()
    page.locator("#status").get_by_text("Stopped").wait_for()  # type: ignore[attr-defined]
    page.wait_for_function("() => document.querySelector('#stop').disabled")  # type: ignore[attr-defined]
    page.wait_for_timeout(500)  # the cancelled event's own end comes after the click's answer
    status = page.locator("#status").inner_text()  # type: ignore[attr-defined]
    assert "Stopped" in status and "went wrong" not in status
    # the queue is free again: a small run finishes quickly (it would wait for 7 x 50 steps otherwise)
    steps_box.fill("2")
    steps_box.press("Enter")
    page.locator("#compare input[type=checkbox]").uncheck()  # type: ignore[attr-defined]
    seed_box.fill("4242424243")
    page.locator("#generate").click()  # type: ignore[attr-defined]
    _wait_done(page)
    assert time.monotonic() - started < 30  # (the stopped job: 2 x 50 steps at 256 px)
    page.wait_for_function("() => document.querySelector('#stop').disabled")  # type: ignore[attr-defined]
    assert "Stopped" not in page.locator("#status").inner_text()  # type: ignore[attr-defined]  # no stale words
    assert not list(server["outputs"].rglob("spatialid-s4242424242*"))  # nothing of the stopped run was kept


def test_load_settings_from_png_and_history(page: object, server: dict, photos: dict, tmp_path: Path) -> None:
    """A PNG written by spatialid dropped on "Load settings" fills the form and says so in the status line;
    the tab's history does too, shows the image large, and survives a reload (a local server keeps its files)."""
    big = "1234567890123456789"  # a 64-bit seed no other test uses (their PNGs share the outputs folder)
    seed_box = page.locator("#seed textarea, #seed input").first  # type: ignore[attr-defined]
    _upload(page, photos["astronaut"])
    page.locator("#prompt textarea").fill("a knight in armour, oil painting")  # type: ignore[attr-defined]
    page.locator("#randomize input").uncheck()  # type: ignore[attr-defined]
    seed_box.fill(big)
    page.locator("#people-box").get_by_text("Several people").first.click()  # type: ignore[attr-defined]
    page.locator("#region-1 input, #region-1 textarea").first.fill("0,0,1,1")  # type: ignore[attr-defined]
    page.locator("#generate").click()  # type: ignore[attr-defined]
    _wait_done(page)
    written = next(server["outputs"].rglob(f"spatialid-s{big}.png"))
    page.locator("#history img").first.wait_for()  # type: ignore[attr-defined]
    page.locator("#prompt textarea").fill("something else")  # type: ignore[attr-defined]
    page.locator("#randomize input").check()  # type: ignore[attr-defined]
    page.locator("#region-1 input, #region-1 textarea").first.fill("")  # type: ignore[attr-defined]

    page.locator("#load-settings").locator("xpath=preceding-sibling::input[1]").set_input_files(str(written))  # type: ignore[attr-defined]
    page.locator("#status").get_by_text("Loaded the settings of").wait_for()  # type: ignore[attr-defined]
    assert page.locator("#prompt textarea").input_value() == "a knight in armour, oil painting"  # type: ignore[attr-defined]
    assert seed_box.input_value() == big
    assert not page.locator("#randomize input").is_checked()  # type: ignore[attr-defined]  # the loaded seed is kept
    assert page.locator("#region-1 input, #region-1 textarea").first.input_value() == "0,0,1,1"  # type: ignore[attr-defined]

    page.locator("#load-settings").locator("xpath=preceding-sibling::input[1]").set_input_files(str(photos["coffee"]))  # type: ignore[attr-defined]
    page.locator("#status").get_by_text("No settings loaded").wait_for()  # type: ignore[attr-defined]
    assert "coffee.png" in page.locator("#load-message").inner_text()  # type: ignore[attr-defined]

    page.reload()  # type: ignore[attr-defined]  # the history survives it (this server keeps its results)
    page.wait_for_selector("#generate")  # type: ignore[attr-defined]
    page.locator("#history img").first.wait_for()  # type: ignore[attr-defined]
    assert f"seed {big}" in page.locator("#history").inner_text()  # type: ignore[attr-defined]
    page.locator("#prompt textarea").fill("something else")  # type: ignore[attr-defined]
    page.locator("#history button.thumbnail-item").first.click()  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => document.querySelector('#prompt textarea').value === 'a knight in armour, oil painting'"
    )
    _image_loaded(page, "#images")  # the clicked result, large
    assert f"Seed {big}" in page.locator("#settings textarea").input_value()  # type: ignore[attr-defined]


def test_two_people_generate_with_their_mask_picture(page: object, photos: dict) -> None:
    """Add a person (thumbnails and face found), generate: one colour per person in the mask picture, both
    aligned faces, both in the settings; the mode shows; removing person 2 clears person 1's region."""
    mirrored = photos["mirrored"]
    _upload(page, photos["astronaut"])
    page.locator("#people-box").get_by_text("Several people").first.click()  # type: ignore[attr-defined]
    page.locator("#add-person").click()  # type: ignore[attr-defined]
    page.locator("#person-2-photos input[type=file]").set_input_files(str(mirrored))  # type: ignore[attr-defined]
    page.locator("#person-2-check").get_by_text("Person 2: face found (1 photo)").wait_for()  # type: ignore[attr-defined]
    page.wait_for_function("() => document.querySelectorAll('#person-2-preview img').length >= 2")  # type: ignore[attr-defined]  # photo + face
    page.locator("#region-1 input, #region-1 textarea").first.fill("0,0,0.5,1")  # type: ignore[attr-defined]
    page.locator("#region-2 input, #region-2 textarea").first.fill("0.5,0,1,1")  # type: ignore[attr-defined]
    page.locator("#active-mode").get_by_text("2 people").wait_for()  # type: ignore[attr-defined]
    assert "regions" in page.locator("#active-mode").inner_text()  # type: ignore[attr-defined]
    page.locator("#prompt textarea").fill("two astronauts side by side")  # type: ignore[attr-defined]
    page.locator("#generate").click()  # type: ignore[attr-defined]
    _wait_done(page)
    assert "2 people" in page.locator("#status").inner_text()  # type: ignore[attr-defined]
    masks = _image_loaded(page, "#mask-picture")
    assert masks["w"] > 128  # final image + one tile per phase, one colour per person
    face = _image_loaded(page, "#aligned-face")
    assert face["w"] >= 2 * face["h"] - 2  # both people's aligned faces, side by side
    settings = page.locator("#settings textarea").input_value()  # type: ignore[attr-defined]
    assert "people: astronaut.png | mirrored.png" in settings and "regions: 0,0,0.5,1 | 0.5,0,1,1" in settings
    page.locator("#remove-person-2").click()  # type: ignore[attr-defined]
    page.locator("#person-2").first.wait_for(state="hidden")  # type: ignore[attr-defined]
    page.locator("#people-message").get_by_text("region of person 1 was cleared").wait_for()  # type: ignore[attr-defined]
    assert page.locator("#region-1 input, #region-1 textarea").first.input_value() == ""  # type: ignore[attr-defined]
    page.locator("#active-mode").get_by_text("text to image").wait_for()  # type: ignore[attr-defined]
    for _ in range(3):
        page.locator("#add-person").click()  # type: ignore[attr-defined]
    page.locator("#person-4").first.wait_for()  # type: ignore[attr-defined]
    page.locator("#add-person").click()  # type: ignore[attr-defined]  # a fifth: said, not silently ignored
    page.locator("#people-message").get_by_text("At most 4 people").wait_for()  # type: ignore[attr-defined]
    page.locator("#clear-people").click()  # type: ignore[attr-defined]
    page.locator("#person-2").first.wait_for(state="hidden")  # type: ignore[attr-defined]
    assert page.outside_requests == []  # type: ignore[attr-defined]


def test_img2img_from_an_init_image_with_strength(page: object, photos: dict) -> None:
    """An init image in "Edit a picture / LoRA" with a strength: img2img at the init image's size, said on the
    folded section's header and above the status line; its Clear ends it."""
    assert "Reuse last seed" in page.locator("#reuse-seed").inner_text()  # type: ignore[attr-defined]
    page.locator("#reuse-seed").click()  # type: ignore[attr-defined]  # before any run: says why nothing happens
    page.locator("#status").get_by_text("No run yet in this tab").wait_for()  # type: ignore[attr-defined]
    _upload(page, photos["astronaut"])
    page.locator("#edit-box").get_by_text("Edit a picture / LoRA").first.click()  # type: ignore[attr-defined]
    assert page.locator("#loras input").first.is_disabled()  # type: ignore[attr-defined]  # no --lora-dir: looks off
    page.locator("#init-image").get_by_text("Upload an image").wait_for()  # type: ignore[attr-defined]  # the editor is ready
    with page.expect_file_chooser() as chooser:  # type: ignore[attr-defined]  # as a visitor: click, pick the file
        page.locator("#init-image").get_by_text("Upload an image").click()  # type: ignore[attr-defined]
    chooser.value.set_files(str(photos["coffee"]))
    page.wait_for_function(  # type: ignore[attr-defined]  # the editor shows the picture (its upload prompt goes)
        "() => !document.querySelector('#init-image').innerText.includes('Upload an image')"
    )
    strength = page.locator("#strength input[type=number]")  # type: ignore[attr-defined]
    strength.fill("0.6")
    strength.press("Enter")
    page.locator("#active-mode").get_by_text("img2img, strength 0.6").wait_for()  # type: ignore[attr-defined]
    page.locator("#edit-box").get_by_text("Edit a picture / LoRA").first.click()  # type: ignore[attr-defined]  # fold it
    page.locator("#edit-box").get_by_text("Edit a picture / LoRA: ON, img2img").wait_for()  # type: ignore[attr-defined]  # the closed header says so
    page.locator("#prompt textarea").fill("portrait in a coffee shop")  # type: ignore[attr-defined]
    page.locator("#generate").click()  # type: ignore[attr-defined]
    _wait_done(page)
    image = _image_loaded(page, "#images")
    assert (image["w"], image["h"]) == (144, 96)  # the init image's 150x100, in multiples of 16 (as the CLI)
    assert "img2img (strength 0.6)" in page.locator("#status").inner_text()  # type: ignore[attr-defined]
    settings = page.locator("#settings textarea").input_value()  # type: ignore[attr-defined]
    assert "img2img from init-image.png, strength 0.6" in settings
    page.locator("#edit-box").get_by_text("Edit a picture / LoRA").first.click()  # type: ignore[attr-defined]
    page.locator("#clear-edit").click()  # type: ignore[attr-defined]
    page.locator("#active-mode").get_by_text("text to image").wait_for()  # type: ignore[attr-defined]
    assert page.outside_requests == []  # type: ignore[attr-defined]


def _files_under(root: Path) -> list[Path]:
    """Files below ``root``; folders the server deletes meanwhile (a closed tab's session) are skipped."""
    return [Path(d) / f for d, _, names in os.walk(root) for f in names]


def test_stopping_the_server_deletes_what_it_served(server: dict) -> None:
    """Last in this file: SIGTERM (as systemd or docker stop send it) removes uploads and outputs.

    The PNG copies in --output-dir stay (the operator asked for them); Gradio's upload folder
    (GRADIO_TEMP_DIR) is left without a file of this server.
    """
    served = _files_under(server["gradio_tmp"])
    assert served, "the tests above uploaded photos and generated images"
    _stop(server["proc"])
    assert server["proc"].returncode is not None
    assert _files_under(server["gradio_tmp"]) == []
    assert list(server["outputs"].rglob("*.png"))
