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
from pathlib import Path
from typing import Any

from spatialid import defaults as D
from spatialid.errors import SpatialIDError
from spatialid.pipeline.settings import GenerationSettings
from spatialid.ui import handlers as h
from spatialid.ui import people as ppl
from spatialid.ui._gradio import gr
from spatialid.ui.generation import restore_kept, settings_summary, storage_note
from spatialid.ui.inputs import IdentityCache, UILimits, _path_of, visitor_text
from spatialid.ui.page import Page
from spatialid.ui.storage import ServeFiles
from spatialid.utils.io import atomic_save_image

__all__ = ["TOAST_SECONDS", "PageState", "cost_line", "initial_cost", "storage_note", "wire_events"]

#: Seconds an error popup stays: one at a time, never a pile over the status line.
TOAST_SECONDS = 6

# Runs in the browser when a run starts: the previous run's popups go (the status line keeps the
# last message), so popups never pile up. Passes the event's inputs through unchanged.
_CLOSE_TOASTS = "(...args) => { document.querySelectorAll('.toast-close').forEach((b) => b.click()); return args; }"

# Events that never run a model: off the queue, not in the public API.
_PRIVATE: dict[str, Any] = dict(queue=False, api_visibility="private")


def _working() -> str:
    return "Generating... (if someone else is generating, your place in the queue shows below)"


def _failed(errors: dict[str, str], session: str) -> str:
    message = errors.pop(session, None) or "something went wrong on the server (its log has the details)."
    return f"**Not generated**: {message}"


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
    keep_history: bool = False  # a local server keeping its outputs: the history survives a reload
    active: set[str] = field(default_factory=set)  # sessions with a run queued or running (Stop is on)
    stopped: set[str] = field(default_factory=set)  # sessions whose run was stopped by their Stop
    records: dict[str, dict] = field(default_factory=dict)  # history image -> its run's input files (people.input_record)
    kept: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # session -> kept copies of its history

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
                h._check_cost(req.settings, req.compare, state.limits)  # an init image sets the size
            result = h.run_generation(
                state.pipe, req, out_root, progress=report, lock=state.lock, identity_cache=state.identities,
                should_stop=lambda: stops.asked(run_id),
            )
            copies = files.archive(result.files)  # --output-dir (a local server's default): a kept copy, never served
            session = _session(request)
            state.seeds[session] = int(result.settings.get("seed", req.settings.seed))
            state.history[session] = h.add_to_history(state.history.get(session, []), result.image_files, result.settings)
            for path in result.image_files:  # the last few hundred runs' inputs, for a click on their history entry
                state.records[str(path)] = ppl.input_record(extras)
            while len(state.records) > 512:
                state.records.pop(next(iter(state.records)))
            if state.keep_history:
                by_name = {p.name: str(p) for p in copies}
                kept = [(by_name[Path(p).name], c) for p, c in h.add_to_history([], result.image_files, result.settings)
                        if Path(p).name in by_name]
                state.kept[session] = (kept + state.kept.get(session, []))[: h.HISTORY_SIZE]
        except h.GenerationStopped:
            errors[_session(request)] = "stopped"
            raise gr.Error("Stopped.", title="Stopped", duration=2, visible=False, print_exception=False) from None
        except SpatialIDError as exc:
            # shown once, in the status line (no popup; the page's CSS hides the outputs' error badges)
            message = visitor_text(str(exc), files.root, state.limits.lora_dir)  # no server path in it
            errors[_session(request)] = message
            raise gr.Error(message, title="Cannot generate", visible=False, print_exception=False) from None
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
            settings_summary(result.settings),
            result.status,
        )

    return on_generate


def wire_events(demo: Any, page: Page, state: PageState) -> None:
    """Connect every component of ``page`` (inside ``demo``'s context), section by section."""
    _wire_generation(page, state)
    _wire_photos(page, state)
    _wire_loading(demo, page, state)
    _wire_form(page, state)
    _wire_people(page, state)
    _wire_edit(page, state)
    _wire_unload(demo, state)


# After an example or a history click: the result column's top comes into view (at 1280x720 the
# examples and the history are far below it).
_SHOW_RESULT = "() => { const e = document.getElementById('status'); if (e) e.scrollIntoView({block: 'start'}); }"

_STOPPED = "**Stopped**: nothing was written. Change the settings and press **Generate** again."


def _wire_generation(page: Page, state: PageState) -> None:
    """Generate (button, Enter in the prompt, an example's click) and Stop."""
    run, settings, people, edit, out = page.run, page.settings, page.people, page.edit, page.results
    inputs = [
        page.photo.photos, run.prompt, settings.negative_prompt, run.preset, run.id_weight, settings.start_step,
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

    def start(seed_value: Any, random_on: Any, request: gr.Request) -> tuple:
        """A run starts: the previous run's result goes, so the page never mixes two runs; Stop turns on."""
        state.active.add(_session(request))
        state.stopped.discard(_session(request))
        return (None, gr.update(visible=False), None, None, None, None, "",
                _working(), h.seed_for_run(seed_value, random_on), gr.update(interactive=True))

    def succeeded(request: gr.Request) -> tuple:
        session = _session(request)
        state.active.discard(session)
        state.failed.discard(session)
        used = state.seeds.get(session)
        kept = state.kept.get(session) if state.keep_history else None
        return ((gr.skip() if used is None else str(used)), state.history.get(session, []),
                gr.update(interactive=False), gr.skip() if kept is None else [list(item) for item in kept])

    def failed_status(request: gr.Request) -> tuple:
        session = _session(request)
        state.active.discard(session)
        if session in state.stopped or state.errors.get(session) == "stopped":  # this tab's Stop: say so
            state.stopped.discard(session)
            state.errors.pop(session, None)
            return _STOPPED, gr.update(interactive=False)
        state.failed.add(session)
        return _failed(state.errors, session), gr.update(interactive=False)

    runs: list[Any] = []

    def chain(trigger: Any, **extra: Any) -> None:
        """clear the result area -> generate -> the used seed back in the box, or the error in the status line."""
        started = trigger(start, [run.seed, run.randomize], outputs + [run.seed, run.stop], js=_CLOSE_TOASTS, **_PRIVATE)
        generated = started.then(**event_args, **extra)
        generated.success(succeeded, None, [run.seed, out.history, run.stop, out.kept], **_PRIVATE)
        generated.failure(failed_status, None, [out.status, run.stop], **_PRIVATE)
        runs.append(generated)

    chain(run.generate.click, api_name="generate")
    chain(run.prompt.submit, api_visibility="private")
    rows = state.example_rows

    def pick_example(evt: gr.SelectData) -> tuple:
        if not isinstance(evt.index, int) or not 0 <= evt.index < len(rows):
            return (gr.skip(),) * 6
        path, text, name, weight, first_step = rows[evt.index]
        return path, [path], text, name, weight, first_step

    filled = [page.photo.photo, page.photo.photos, run.prompt, run.preset, run.id_weight, settings.start_step]
    picked = page.more.examples.select(pick_example, None, filled, **_PRIVATE)
    picked.then(None, js=_SHOW_RESULT, **_PRIVATE)  # the run's result is what the visitor looks at next
    chain(picked.then, api_visibility="private")

    def stop_run(request: gr.Request) -> tuple:
        """Stop this tab's queued or running run: the running step finishes, then the run ends and frees the
        GPU for the next in line. Without one (a late click) nothing changes: no "Stopped" next to a result."""
        session = _session(request)
        if session not in state.active:
            return gr.skip(), gr.update(interactive=False)
        state.stopped.add(session)
        state.active.discard(session)
        state.stops.stop(session)  # a queued run is taken off the queue by `cancels`
        return _STOPPED, gr.update(interactive=False)

    run.stop.click(stop_run, None, [out.status, run.stop], cancels=runs, **_PRIVATE)


def initial_cost(defaults: GenerationSettings, limits: UILimits) -> str:
    """The cost line of the form as it first shows."""
    return cost_line(defaults.steps, defaults.width, defaults.height, defaults.num_images, defaults.true_cfg,
                     False, [], defaults.preset, limits)


def cost_line(
    steps: Any, width: Any, height: Any, num_images: Any, true_cfg: Any, compare: Any, compare_presets: Any,
    preset: Any, limits: UILimits,
) -> str:
    """What the form's request costs against this server's cap (``--max-cost``), as one line under the sliders."""
    import types

    try:
        values = types.SimpleNamespace(
            steps=int(steps), width=int(width), height=int(height), num_images=int(num_images),
            true_cfg=float(true_cfg), preset=str(preset),
        )
        presets = h.compare_list(str(preset), compare_presets) if compare else []
    except (TypeError, ValueError, SpatialIDError):
        return ""
    cost = h.request_cost(values, presets, limits)  # type: ignore[arg-type]
    if cost > limits.max_cost * (1 + 1e-9):
        return (f"**Over this server's cap**: this request costs {cost:.3g} default requests, the cap is "
                f"{limits.max_cost:g}; lower the steps, the size, the images or the compared presets.")
    return f"Cost: {cost:.3g} of this server's cap of {limits.max_cost:g} default requests."


def _wire_photos(page: Page, state: PageState) -> None:
    """Person 1's photo box, the "add another photo" button and the photo list with its face check."""
    photo, photos, add_photo = page.photo.photo, page.photo.photos, page.photo.add_photo

    def show_faces(current: Any) -> tuple:
        thumbs, line = h.preview_identity(state.pipe, current, cache=state.identities, limits=state.limits, lock=state.lock)
        several = isinstance(current, (list, tuple)) and len(current) > 1
        return thumbs, line, gr.update(visible=True if several else "hidden")  # the list when one can be removed

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
        show_faces, photos, [page.photo.preview, page.photo.face_check, photos], concurrency_id="faces",
        concurrency_limit=1, show_progress="minimal", api_visibility="private",
    )
    for event in (photo.upload, photo.clear, add_photo.upload, photos.delete, page.run.prompt.input):
        event(clear_error, None, stale, **_PRIVATE)


def _wire_loading(demo: Any, page: Page, state: PageState) -> None:
    """Settings back into the form: from a dropped PNG, or from a click on the history (which also shows
    that image large). People, regions, init image, strength and LoRAs come back where they can; the
    message says what could not, in the status line (in view) and under the button."""
    run, settings, more, people, edit, out = page.run, page.settings, page.more, page.people, page.edit, page.results
    restored = [
        run.prompt, settings.negative_prompt, run.preset, run.id_weight, settings.start_step, settings.true_cfg,
        settings.guidance, settings.steps, settings.width, settings.height, run.seed,
    ]
    extras = [
        people.count, *people.boxes, *people.photos, people.region_1, *people.regions, edit.init_image,
        edit.mask_upload, edit.strength, edit.lora_menu, edit.lora_weight, edit.loras, edit.has_init,
    ]
    form = [*restored, run.randomize, *extras, more.load_message, out.status]
    n_boxes = len(people.boxes)

    def fill_form(path: Any, record: dict | None) -> tuple:
        values, message = h.settings_from_file(path, state.limits)
        if values is None:
            return (*([gr.skip()] * (len(form) - 2)), message, message)
        from spatialid.app.metadata import read_image_metadata

        try:
            data = read_image_metadata(_path_of(path))
        except SpatialIDError:
            data = {}
        more_values, missing = ppl.restore_inputs(data, record, lora_dir=state.limits.lora_dir)
        count = more_values["count"]
        regions = more_values["regions"]
        strength = more_values["strength"]
        weight = more_values["lora_weight"]
        extra_values = (
            count, *(gr.update(visible=i + 2 <= count) for i in range(n_boxes)), *more_values["photos"],
            regions[0], *regions[1:], more_values["init_image"], more_values["inpaint_mask"],
            gr.skip() if strength is None else strength, more_values["loras"], gr.skip() if weight is None else weight,
            ppl.lora_lines(more_values["loras"], weight), 1 if more_values["init_image"] else 0,
        )
        if missing:
            message = message[:-1] + "; not restored: " + "; ".join(missing) + "."
        # a loaded seed is meant to be reused: Randomize off
        return (*(values[key] for key in h._RESTORED), False, *extra_values, message, message)

    def load_settings(file: Any, request: gr.Request) -> tuple:
        """Fill the form from the dropped file."""
        if not file:
            return (gr.skip(),) * len(form)
        state.files.note_uploads(_session_key(request), _upload_paths(file))
        return fill_form(file, None)

    def from_history(evt: gr.SelectData, request: gr.Request) -> tuple:
        """Show the clicked result large, with its settings, and put them back in the form."""
        items = state.history.get(_session(request), [])
        if not isinstance(evt.index, int) or not 0 <= evt.index < len(items):
            return (gr.skip(),) * (len(form) + 6)
        path, caption = items[evt.index]
        from spatialid.app.metadata import read_image_metadata

        try:
            summary = settings_summary(read_image_metadata(Path(path)))
        except SpatialIDError:
            summary = ""
        masks = Path(path).with_name(f"{Path(path).stem}_masks.png")  # its own mask picture, nothing of another run
        shown = [str(p) for p in (Path(path), masks) if p.is_file()]
        return (*fill_form(path, state.records.get(str(path))), [(path, caption)], summary,
                str(masks) if masks.is_file() else None, None, shown, gr.update(visible=False))

    more.load_png.upload(load_settings, more.load_png, form, **_PRIVATE)
    shown = out.history.select(
        from_history, None,
        [*form, out.gallery, out.settings, out.mask_picture, out.aligned_face, out.downloads, out.comparison_box],
        **_PRIVATE,
    )
    shown.then(None, js=_SHOW_RESULT, **_PRIVATE)

    def reload_history(kept: Any, request: gr.Request) -> Any:
        """A reload on a local server that keeps its outputs: the history comes back from the kept copies."""
        session = _session(request)
        if not state.keep_history or not session or not isinstance(kept, list):
            return gr.skip()
        history, state.kept[session] = restore_kept(state.files, session, kept, h.HISTORY_SIZE)
        if not history:
            return gr.skip()
        state.history[session] = history
        return history

    demo.load(reload_history, out.kept, out.history, **_PRIVATE)


def _wire_form(page: Page, state: PageState) -> None:
    """The seed box, the aspect ratio buttons, the preset's help line, the comparison switch and the cost line."""
    run, settings = page.run, page.settings

    def reuse(request: gr.Request) -> tuple:
        used = state.seeds.get(_session(request))
        if used is None:  # said in the status line: a popup of an off-queue event never shows
            return gr.skip(), gr.skip(), "No run yet in this tab: generate once, then **Reuse last seed** puts its seed back."
        return str(used), False, gr.skip()

    def sized(ratio: Any) -> tuple:
        if not ratio:
            return gr.skip(), gr.skip()
        return h.aspect_size(str(ratio), state.defaults.width, state.defaults.height, max_side=state.limits.max_side)

    run.reuse_seed.click(reuse, None, [run.seed, run.randomize, page.results.status], **_PRIVATE)
    run.seed.input(lambda: False, None, run.randomize, **_PRIVATE)  # typing a seed means "use this one"
    settings.aspect.change(sized, settings.aspect, [settings.width, settings.height], **_PRIVATE)
    run.preset.change(h.preset_help, run.preset, run.preset_text, queue=False, api_visibility="private")
    run.compare.change(
        lambda on: gr.update(visible=bool(on)), run.compare, run.compare_presets, queue=False, api_visibility="private"
    )
    priced = [settings.steps, settings.width, settings.height, settings.num_images, settings.true_cfg, run.compare,
              run.compare_presets, run.preset]
    for component in priced:
        component.change(lambda *v: cost_line(*v, limits=state.limits), priced, settings.cost, **_PRIVATE)
    # the start step can only be one of the steps: its slider ends at steps - 1 (a loaded value stays, and is refused)
    settings.steps.change(lambda n: gr.update(maximum=max(1, int(n or 1) - 1)), settings.steps, settings.start_step, **_PRIVATE)


def _wire_people(page: Page, state: PageState) -> None:
    """Add and remove people; each added person's photos are held by the session and face-checked."""
    people = page.people
    boxes = people.boxes
    n = len(boxes)

    def add_a_person(count: Any) -> tuple:
        """Show the next person's box (up to MAX_PEOPLE); past it, say why nothing opens."""
        count = int(count or 1)
        if count >= ppl.MAX_PEOPLE:
            return (*(gr.skip(),) * (1 + n), f"At most {ppl.MAX_PEOPLE} people per image (the injector's limit).")
        count += 1
        return (count, *(gr.update(visible=i + 2 <= count) for i in range(n)), "")

    def remover(index: int) -> Any:
        def remove(count: Any, region_1: Any, *values: Any) -> tuple:
            """Drop one person: the ones after move up, the last box hides. Back to one person, person 1's
            region no longer applies (it would confine the identity to that part): it is cleared, and said."""
            kept, regions, previews = list(values[:n]), list(values[n : 2 * n]), list(values[2 * n :])
            del kept[index], regions[index], previews[index]
            count = max(1, int(count or 1) - 1)
            note = ""
            if count == 1 and str(region_1 or "").strip():
                region_1, note = "", "Back to one person: the region of person 1 was cleared (it would confine the identity)."
            return (count, *(gr.update(visible=i + 2 <= count) for i in range(n)), *kept, None, *regions, "",
                    *previews, None, region_1, note)

        return remove

    def clear_people() -> tuple:
        return (1, *(gr.update(visible=False) for _ in range(n)), *([None] * n), *([""] * n), *([None] * n),
                "", "People and regions cleared: one person, placed by the preset.")

    def checker(number: int) -> Any:
        def check(current: Any) -> tuple:
            return ppl.person_preview(
                state.pipe, current, number, cache=state.identities, limits=state.limits, lock=state.lock
            )

        return check

    people.add.click(add_a_person, people.count, [people.count, *boxes, people.message], **_PRIVATE)
    people.clear.click(
        clear_people, None,
        [people.count, *boxes, *people.photos, *people.regions, *people.previews, people.region_1, people.message],
        **_PRIVATE,
    )
    for index, (button, person_files) in enumerate(zip(people.removes, people.photos)):
        button.click(
            remover(index), [people.count, people.region_1, *people.photos, *people.regions, *people.previews],
            [people.count, *boxes, *people.photos, *people.regions, *people.previews, people.region_1, people.message],
            **_PRIVATE,
        )
        person_files.upload(state.keep_listed, person_files, None, **_PRIVATE)  # this session's uploads
        person_files.change(
            checker(index + 2), person_files, [people.previews[index], people.checks[index]], concurrency_id="faces",
            concurrency_limit=1, show_progress="minimal", api_visibility="private",
        )


def _wire_edit(page: Page, state: PageState) -> None:
    """The LoRA menu and weight (written as the NAME:WEIGHT lines Generate takes), the section's Clear,
    and what the folded sections make Generate do, on their headers and above the status line."""
    people, edit, out = page.people, page.edit, page.results

    for component in (edit.lora_menu, edit.lora_weight):  # the slider keeps the weight a number
        component.change(ppl.lora_lines, [edit.lora_menu, edit.lora_weight], edit.loras, **_PRIVATE)
    edit.clear.click(
        lambda: (None, None, D.DEFAULT_IMG2IMG_STRENGTH, [], 1.0, "", 0), None,
        [edit.init_image, edit.mask_upload, edit.strength, edit.lora_menu, edit.lora_weight, edit.loras, edit.has_init],
        **_PRIVATE,
    )
    # the editor itself is no input here: an event reading it while its upload is processed loses the upload
    edit.init_image.upload(lambda: 1, None, edit.has_init, **_PRIVATE)
    edit.init_image.clear(lambda: 0, None, edit.has_init, **_PRIVATE)
    watched = [edit.has_init, edit.mask_upload, edit.strength, people.count, people.region_1, *people.regions,
               edit.lora_menu, edit.lora_weight]

    def modes(init: Any, mask: Any, strength: Any, count: Any, *rest: Any) -> tuple:
        regions, (names, weight) = rest[: len(people.regions) + 1], rest[len(people.regions) + 1 :]
        found = ppl.active_modes(init_image=init or None, mask_upload=mask, strength=strength, people_count=count,
                                 regions=regions, loras=names, lora_weight=weight)
        return found.line, gr.update(label=found.people_header), gr.update(label=found.edit_header)

    for component in watched:
        component.change(modes, watched, [out.active, people.accordion, edit.accordion], **_PRIVATE)


def _wire_unload(demo: Any, state: PageState) -> None:
    def on_unload(request: gr.Request) -> None:
        """The tab was closed (Gradio's heartbeat ended): delete this session's files."""
        key = _session(request)
        if key:
            state.files.end_session(key)
            for forget in (state.failed, state.active, state.stopped):
                forget.discard(key)
            for per_session in (state.seeds, state.history, state.kept):
                per_session.pop(key, None)

    demo.unload(on_unload)
