"""What the page's components do: one wiring function per section, plus the Generate event.

Everything that decides something lives in :mod:`spatialid.ui.handlers` (and
:mod:`spatialid.ui.people`); the functions here only move values between components and those
handlers, keep each browser session's state (its last seed, history, error, running generation)
and turn :class:`~spatialid.errors.SpatialIDError` into a one-line ``gr.Error`` popup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from spatialid.errors import SpatialIDError
from spatialid.pipeline.settings import GenerationSettings
from spatialid.ui import handlers as h
from spatialid.ui import people as ppl
from spatialid.ui._gradio import gr
from spatialid.ui.inputs import IdentityCache, UILimits, _path_of
from spatialid.ui.page import Page
from spatialid.ui.storage import ServeFiles
from spatialid.utils.io import atomic_save_image

__all__ = ["TOAST_SECONDS", "PageState", "wire_events"]

#: Seconds an error popup stays: one at a time, never a pile over the status line.
TOAST_SECONDS = 6

# Runs in the browser when a run starts: the previous run's popups go (the status line keeps the
# last message), so popups never pile up. Passes the event's inputs through unchanged.
_CLOSE_TOASTS = "(...args) => { document.querySelectorAll('.toast-close').forEach((b) => b.click()); return args; }"

# Events that never run a model: off the queue, not in the public API.
_PRIVATE: dict[str, Any] = dict(queue=False, api_visibility="private")


def _working() -> str:
    return "Generating... (if someone else is generating, your place in the queue shows below)"


def _failed(errors: dict[str, str]) -> Any:
    def show(request: gr.Request) -> str:
        message = errors.pop(_session(request), None)
        if message is None:
            return "**Not generated**: something went wrong on the server (its log has the details)."
        return f"**Not generated**: {message}"

    return show


def _session(request: Any) -> str:
    return str(getattr(request, "session_hash", None) or "")


def _session_key(request: Any) -> str:
    """The session's id, or a fresh one for an API call without a session (its files then go by retention)."""
    return _session(request) or f"api-{secrets.token_hex(8)}"


def _upload_paths(photos: Any) -> list[str]:
    items = photos if isinstance(photos, (list, tuple)) else [photos]
    paths = []
    for item in items:
        with contextlib.suppress(SpatialIDError):
            paths.append(str(_path_of(item)))
    return paths


class _Stops:
    """Which running generation a Stop click is meant for.

    Each run gets a number; Stop marks the session's running number, and the run's step callback
    asks for its own number. A flag per session would be cleared by the next run's start while
    the stopped run's thread is still finishing its step (Gradio cannot kill a running thread).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0
        self._running: dict[str, int] = {}
        self._asked: set[int] = set()

    def begin(self, session: str) -> int:
        with self._lock:
            self._next += 1
            self._running[session] = self._next
            return self._next

    def stop(self, session: str) -> bool:
        """Ask the session's running generation to stop; False when none is running."""
        with self._lock:
            run = self._running.get(session)
            if run is not None:
                self._asked.add(run)
            return run is not None

    def asked(self, run: int) -> bool:
        return run in self._asked

    def end(self, session: str, run: int) -> None:
        with self._lock:
            self._asked.discard(run)
            if self._running.get(session) == run:
                del self._running[session]


@dataclass
class PageState:
    """What the events of one page share: the model, its files and caps, and each session's state.

    One page serves every visitor; the dicts are keyed by Gradio's session hash and emptied when
    the session's tab closes.
    """

    pipe: Any
    files: ServeFiles
    limits: UILimits
    defaults: GenerationSettings
    example_rows: list[tuple[str, str, str, float, int]]
    ready: str  # the status line before any run
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation / face check at a time
    identities: IdentityCache = field(default_factory=lambda: IdentityCache(maxsize=8))
    errors: dict[str, str] = field(default_factory=dict)  # session -> last error message, for the status line
    seeds: dict[str, int] = field(default_factory=dict)  # session -> seed of its last successful run
    history: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # session -> last results, newest first
    failed: set[str] = field(default_factory=set)  # sessions whose result area shows an error
    stops: _Stops = field(default_factory=_Stops)  # which running generation a Stop click is for

    def hold(self, chosen: list[str], request: Any) -> list[str]:
        """Register the photos with the session now: uploads are shared by content hash, and another
        visitor with the same photo who leaves must not delete this visitor's copy."""
        self.files.note_uploads(_session_key(request), chosen)
        return chosen

    def keep_listed(self, current: Any, request: gr.Request) -> None:
        """Photos dropped straight on a photo list belong to this session too."""
        self.hold(h.photo_set(current, None, add=True), request)


def _generate_fn(state: PageState) -> Any:
    """The Generate event: validate, run, map the result onto the output components.

    A :class:`SpatialIDError` becomes a one-line ``gr.Error`` popup (and is kept for the status
    line, which the failure listener fills in); anything else is a bug and keeps its traceback.
    """
    files, stops, errors = state.files, state.stops, state.errors

    def on_generate(
        photos: Any,
        prompt: Any,
        negative_prompt: Any,
        preset: Any,
        id_weight: Any,
        start_step: Any,
        true_cfg: Any,
        steps: Any,
        guidance: Any,
        width: Any,
        height: Any,
        seed: Any,
        num_images: Any,
        compare: Any,
        compare_presets: Any,
        region_1: Any,
        people_count: Any,
        photos_2: Any,
        photos_3: Any,
        photos_4: Any,
        region_2: Any,
        region_3: Any,
        region_4: Any,
        init_image: Any,
        mask_upload: Any,
        strength: Any,
        loras: Any,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        def report(done: int, total: int, desc: str) -> None:
            progress((done, total), desc=desc, unit="steps")

        key = _session_key(request)
        run_id = stops.begin(_session(request))
        try:
            out_root = files.session_dir(key)  # random name, deleted when the session ends
            files.note_uploads(key, _upload_paths(photos) if photos else [])
            req = h.build_request(
                photos, prompt, negative_prompt, preset, id_weight, start_step, true_cfg, steps,
                guidance, width, height, seed, num_images, compare, compare_presets, limits=state.limits,
            )
            for extra_photos in (photos_2, photos_3, photos_4):
                files.note_uploads(key, _upload_paths(extra_photos) if extra_photos else [])
            extras = ppl.build_inputs(
                req.photos, first_region=region_1, people_count=people_count,
                others=[(photos_2, region_2), (photos_3, region_3), (photos_4, region_4)],
                init_image=init_image, mask_upload=mask_upload, strength=strength, loras=loras,
                folder=out_root / f"inputs-{secrets.token_hex(6)}", limits=state.limits,
            )
            if extras != ppl.PictureInputs():
                req = dataclasses.replace(req, settings=extras.apply(req.settings), extras=extras)
            result = h.run_generation(
                state.pipe, req, out_root, progress=report, lock=state.lock, identity_cache=state.identities,
                should_stop=lambda: stops.asked(run_id),
            )
            files.archive(result.files)  # --output-dir: a kept copy, never served
            state.seeds[_session(request)] = int(result.settings.get("seed", req.settings.seed))
            state.history[_session(request)] = h.add_to_history(
                state.history.get(_session(request), []), result.image_files, result.settings
            )
        except h.GenerationStopped:
            errors[_session(request)] = "stopped"
            raise gr.Error("Stopped.", title="Stopped", duration=2, visible=False, print_exception=False) from None
        except SpatialIDError as exc:
            message = " ".join(str(exc).split())
            errors[_session(request)] = message
            raise gr.Error(message, title="Cannot generate", duration=TOAST_SECONDS, print_exception=False) from None
        finally:
            stops.end(_session(request), run_id)
        compare_file = next((p for p in result.files if p.stem.endswith("_compare")), None)
        mask_file = next((p for p in result.files if p.stem.endswith("_masks")), None)
        face_file = None
        if result.aligned_face is not None and result.image_files:
            # in the click's folder (not Gradio's cache), so it goes when the session ends
            face_file = result.image_files[0].parent / "aligned-face.png"
            atomic_save_image(result.aligned_face, face_file, format="PNG")
        return (
            [(str(p), c) for p, c in zip(result.image_files, result.captions)],
            gr.update(visible=compare_file is not None),
            str(compare_file) if compare_file else None,
            str(mask_file) if mask_file else None,
            str(face_file) if face_file else None,
            [str(p) for p in result.files],
            h.settings_text(result.settings),
            result.status,
        )

    return on_generate


def wire_events(demo: Any, page: Page, state: PageState) -> None:
    """Connect every component of ``page`` (inside ``demo``'s context), section by section."""
    _wire_generation(page, state)
    _wire_photos(page, state)
    _wire_loading(page, state)
    _wire_form(page, state)
    _wire_people(page, state)
    _wire_unload(demo, state)


def _wire_generation(page: Page, state: PageState) -> None:
    """Generate (button, Enter in the prompt, an example's click) and Stop."""
    run, settings, people, edit, out = page.run, page.settings, page.people, page.edit, page.results
    inputs = [
        page.more.photos, run.prompt, settings.negative_prompt, run.preset, run.id_weight, settings.start_step,
        settings.true_cfg, settings.steps, settings.guidance, settings.width, settings.height, run.seed,
        settings.num_images, run.compare, run.compare_presets,
        people.region_1, people.count, *people.photos, *people.regions,
        edit.init_image, edit.mask_upload, edit.strength, edit.loras,
    ]
    outputs = [
        out.gallery, out.comparison_box, out.comparison, out.mask_picture, out.aligned_face, out.downloads,
        out.settings, out.status,
    ]
    event_args = dict(
        fn=_generate_fn(state),
        inputs=inputs,
        outputs=outputs,
        concurrency_id="gpu",
        concurrency_limit=1,
        show_progress="full",
        show_progress_on=[out.gallery],  # one bar for the whole run (all presets of a comparison)
    )

    def start(seed_value: Any, random_on: Any) -> tuple:
        """A run starts: the previous run's result goes, so the page never mixes two runs."""
        return (None, gr.update(visible=False), None, None, None, None, "",
                _working(), h.seed_for_run(seed_value, random_on))

    def succeeded(request: gr.Request) -> tuple:
        state.failed.discard(_session(request))
        used = state.seeds.get(_session(request))
        return (gr.skip() if used is None else str(used)), state.history.get(_session(request), [])

    def failed_status(request: gr.Request) -> Any:
        if state.errors.get(_session(request)) == "stopped":
            state.errors.pop(_session(request), None)
            return gr.skip()  # the Stop button has already written the status line
        state.failed.add(_session(request))
        return _failed(state.errors)(request)

    runs: list[Any] = []

    def chain(trigger: Any, **extra: Any) -> None:
        """clear the result area -> generate -> the used seed back in the box, or the error in the status line."""
        started = trigger(start, [run.seed, run.randomize], outputs + [run.seed], js=_CLOSE_TOASTS, **_PRIVATE)
        generated = started.then(**event_args, **extra)
        generated.success(succeeded, None, [run.seed, out.history], **_PRIVATE)
        generated.failure(failed_status, None, out.status, **_PRIVATE)
        runs.append(generated)

    chain(run.generate.click, api_name="generate")
    chain(run.prompt.submit, api_visibility="private")
    rows = state.example_rows

    def pick_example(evt: gr.SelectData) -> tuple:
        if not isinstance(evt.index, int) or not 0 <= evt.index < len(rows):
            return (gr.skip(),) * 6
        path, text, name, weight, first_step = rows[evt.index]
        return path, [path], text, name, weight, first_step

    filled = [page.photo.photo, page.more.photos, run.prompt, run.preset, run.id_weight, settings.start_step]
    chain(page.more.examples.select(pick_example, None, filled, **_PRIVATE).then, api_visibility="private")

    def stop_run(request: gr.Request) -> str:
        """Stop: the running step finishes, then the run ends and frees the GPU for the next in line."""
        state.stops.stop(_session(request))  # a queued run is taken off the queue by `cancels`
        return "**Stopped**: nothing was written. Change the settings and press **Generate** again."

    run.stop.click(stop_run, None, out.status, cancels=runs, **_PRIVATE)


def _wire_photos(page: Page, state: PageState) -> None:
    """Person 1's photo box, the "add another photo" button and the photo list with its face check."""
    photo, photos, add_photo = page.photo.photo, page.more.photos, page.more.add_photo

    def show_faces(current: Any) -> tuple:
        return h.preview_identity(state.pipe, current, cache=state.identities, limits=state.limits, lock=state.lock)

    def clear_error(request: gr.Request) -> tuple:
        """The input changed after a failed run: the old error and its badges go."""
        if _session(request) not in state.failed:
            return (gr.skip(),) * 3
        state.failed.discard(_session(request))
        return None, None, state.ready

    def replace_photo(new: Any, request: gr.Request) -> list[str]:
        return state.hold(h.photo_set(None, new, add=False), request)

    def add_one(current: Any, new: Any, request: gr.Request) -> list[str]:
        return state.hold(h.photo_set(current, new, add=True), request)

    stale = [page.results.gallery, page.results.mask_picture, page.results.status]
    photo.upload(replace_photo, photo, photos, **_PRIVATE)
    photo.clear(list, None, photos, **_PRIVATE)
    add_photo.upload(add_one, [photos, add_photo], photos, **_PRIVATE)
    photos.upload(state.keep_listed, photos, None, **_PRIVATE)
    # every change of the list (upload, replace, add, a photo removed with its x): check the faces again
    photos.change(
        show_faces, photos, [page.photo.preview, page.photo.face_check], concurrency_id="faces",
        concurrency_limit=1, show_progress="minimal", api_visibility="private",
    )
    for event in (photo.upload, photo.clear, add_photo.upload, photos.delete, page.run.prompt.input):
        event(clear_error, None, stale, **_PRIVATE)


def _wire_loading(page: Page, state: PageState) -> None:
    """Settings back into the form: from a dropped PNG, or from a click on the history."""
    run, settings, more = page.run, page.settings, page.more
    restored = [
        run.prompt, settings.negative_prompt, run.preset, run.id_weight, settings.start_step, settings.true_cfg,
        settings.guidance, settings.steps, settings.width, settings.height, run.seed,
    ]

    def fill_form(values: dict[str, Any] | None, message: str) -> tuple:
        if values is None:
            return (*([gr.skip()] * len(restored)), gr.skip(), message)
        return (*(values[key] for key in h._RESTORED), False, message)  # a loaded seed is meant to be reused

    def load_settings(file: Any, request: gr.Request) -> tuple:
        """Fill the form from the dropped file, then empty the box for the next one."""
        if not file:
            return (*([gr.skip()] * len(restored)), gr.skip(), "", gr.skip())
        state.files.note_uploads(_session_key(request), _upload_paths(file))
        return (*fill_form(*h.settings_from_file(file, state.limits)), None)

    def from_history(evt: gr.SelectData, request: gr.Request) -> tuple:
        items = state.history.get(_session(request), [])
        if not isinstance(evt.index, int) or not 0 <= evt.index < len(items):
            return (*([gr.skip()] * len(restored)), gr.skip(), "")
        return fill_form(*h.settings_from_file(items[evt.index][0], state.limits))

    more.load_png.upload(
        load_settings, more.load_png, [*restored, run.randomize, more.load_message, more.load_png], **_PRIVATE
    )
    page.results.history.select(from_history, None, [*restored, run.randomize, more.load_message], **_PRIVATE)


def _wire_form(page: Page, state: PageState) -> None:
    """The seed box, the aspect ratio buttons, the preset's help line and the comparison switch."""
    run, settings = page.run, page.settings

    def reuse(request: gr.Request) -> tuple:
        used = state.seeds.get(_session(request))
        if used is None:
            gr.Info("No run yet in this tab: generate once, then its seed can be reused.", duration=TOAST_SECONDS)
            return gr.skip(), gr.skip()
        return str(used), False

    def sized(ratio: Any) -> tuple:
        if not ratio:
            return gr.skip(), gr.skip()
        return h.aspect_size(str(ratio), state.defaults.width, state.defaults.height, max_side=state.limits.max_side)

    run.reuse_seed.click(reuse, None, [run.seed, run.randomize], **_PRIVATE)
    run.seed.input(lambda: False, None, run.randomize, **_PRIVATE)  # typing a seed means "use this one"
    settings.aspect.change(sized, settings.aspect, [settings.width, settings.height], **_PRIVATE)
    run.preset.change(h.preset_help, run.preset, run.preset_text, queue=False, api_visibility="private")
    run.compare.change(
        lambda on: gr.update(visible=bool(on)), run.compare, run.compare_presets, queue=False, api_visibility="private"
    )


def _wire_people(page: Page, state: PageState) -> None:
    """Add and remove people; each added person's photos are held by the session and face-checked."""
    people = page.people
    boxes = people.boxes

    def add_a_person(count: Any) -> tuple:
        """Show the next person's box (up to MAX_PEOPLE)."""
        count = int(count or 1)
        if count >= ppl.MAX_PEOPLE:
            gr.Info(f"At most {ppl.MAX_PEOPLE} people per image.", duration=TOAST_SECONDS)
            return (gr.skip(),) * (1 + len(boxes))
        count += 1
        return (count, *(gr.update(visible=i + 2 <= count) for i in range(len(boxes))))

    def remover(index: int) -> Any:
        def remove(count: Any, *values: Any) -> tuple:
            """Drop one person: the ones after move up, the last box hides."""
            n = len(boxes)
            kept, regions = list(values[:n]), list(values[n:])
            del kept[index], regions[index]
            count = max(1, int(count or 1) - 1)
            return (count, *(gr.update(visible=i + 2 <= count) for i in range(n)), *kept, None, *regions, "")

        return remove

    def checker(number: int) -> Any:
        def check(current: Any) -> str:
            return ppl.person_check(
                state.pipe, current, number, cache=state.identities, limits=state.limits, lock=state.lock
            )

        return check

    people.add.click(add_a_person, people.count, [people.count, *boxes], **_PRIVATE)
    for index, (button, person_files) in enumerate(zip(people.removes, people.photos)):
        button.click(
            remover(index), [people.count, *people.photos, *people.regions],
            [people.count, *boxes, *people.photos, *people.regions], **_PRIVATE,
        )
        person_files.upload(state.keep_listed, person_files, None, **_PRIVATE)  # this session's uploads
        person_files.change(
            checker(index + 2), person_files, people.checks[index], concurrency_id="faces", concurrency_limit=1,
            show_progress="minimal", api_visibility="private",
        )


def _wire_unload(demo: Any, state: PageState) -> None:
    def on_unload(request: gr.Request) -> None:
        """The tab was closed (Gradio's heartbeat ended): delete this session's files."""
        key = _session(request)
        if key:
            state.files.end_session(key)
            state.failed.discard(key)
            state.seeds.pop(key, None)
            state.history.pop(key, None)

    demo.unload(on_unload)
