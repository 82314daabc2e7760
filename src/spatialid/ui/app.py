"""The Gradio app behind ``spatialid serve``: components, events, queue and launch settings.

Written for Gradio 6 (``theme``/``css`` are launch arguments there, ``api_visibility`` and
``footer_links`` replace older names). Everything that decides something lives in
:mod:`spatialid.ui.handlers`; this module only lays out the page and turns
:class:`~spatialid.errors.SpatialIDError` into a one-line ``gr.Error`` popup.

Offline by construction: analytics and Gradio's version check are off, no share link is ever
created, and the default theme's fonts are served by the app itself (no Google Fonts request).

Exposed by construction, and no more (docs/security.md): Gradio serves only the files inside the
server's private folder (:class:`~spatialid.ui.storage.ServeFiles`: this session's outputs under
an unguessable name, uploads, the example photos), never a folder the operator named; direct
``/run`` POSTs that would skip the queue are closed; the run-history, monitoring and MCP routes
are off; a login (``auth``) guards every route that runs or serves something.
That last part needs Gradio >= 6.17.3: 6.0-6.16 work too, but their page asks cdnjs for an
iframe-resizer script and Google for the Source Sans Pro font (harmless failures when offline).
Tested with Gradio 6.17.3 and 6.31.0.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import secrets
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spatialid import defaults as D
from spatialid.errors import SpatialIDError
from spatialid.pipeline.settings import MAX_GUIDANCE, GenerationSettings
from spatialid.ui import handlers as h
from spatialid.ui import people as ppl
from spatialid.ui.network import is_loopback
from spatialid.ui.storage import DEFAULT_KEEP_HOURS, SERVE_PREFIX, ServeFiles
from spatialid.utils.io import atomic_save_image

__all__ = ["CSS", "DEFAULT_QUEUE_SIZE", "build_app", "launch"]

#: Default ``--queue-size``: requests waiting for the GPU (each capped by ``--max-cost``).
DEFAULT_QUEUE_SIZE = 16

# Gradio reads these at import and launch time; set them before importing it.
_OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SHARE": "False",
}

CSS = """
#tiny-notice { border-left: 4px solid #f59e0b; padding: 0.2em 0.6em; background: rgba(245,158,11,0.08); font-size: 0.85em; }
#status { min-height: 1.6em; }
#page-title h2 { margin: 0; }
#photo-help, #face-check { font-size: 0.85em; line-height: 1.3; }
#photo-help p, #face-check p { margin: 0; }
#downloads .file-name, #downloads td { white-space: nowrap; }
"""

#: Seconds an error popup stays: one at a time, never a pile over the status line.
TOAST_SECONDS = 6

# Runs in the browser when a run starts: the previous run's popups go (the status line keeps the
# last message), so popups never pile up. Passes the event's inputs through unchanged.
_CLOSE_TOASTS = "(...args) => { document.querySelectorAll('.toast-close').forEach((b) => b.click()); return args; }"


for _key, _value in _OFFLINE_ENV.items():
    os.environ[_key] = _value  # forced: a server that may run offline must never phone home

import gradio as gr  # noqa: E402  (after the environment above)


def _theme() -> Any:
    """Gradio's default look; its fonts are files inside the gradio package (no Google Fonts call)."""
    return gr.themes.Default()


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
            paths.append(str(h._path_of(item)))
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


def _generate_fn(
    pipe: Any,
    *,
    limits: h.UILimits,
    files: ServeFiles,
    lock: threading.Lock,
    errors: dict[str, str],
    identities: h.IdentityCache,
    seeds: dict[str, int],
    stops: _Stops,
    history: dict[str, list[tuple[str, str]]],
) -> Any:
    """The Generate event: validate, run, map the result onto the output components.

    A :class:`SpatialIDError` becomes a one-line ``gr.Error`` popup (and is kept for the status
    line, which the failure listener fills in); anything else is a bug and keeps its traceback.
    """

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
                guidance, width, height, seed, num_images, compare, compare_presets, limits=limits,
            )
            for extra_photos in (photos_2, photos_3, photos_4):
                files.note_uploads(key, _upload_paths(extra_photos) if extra_photos else [])
            extras = ppl.build_inputs(
                req.photos, first_region=region_1, people_count=people_count,
                others=[(photos_2, region_2), (photos_3, region_3), (photos_4, region_4)],
                init_image=init_image, mask_upload=mask_upload, strength=strength, loras=loras,
                folder=out_root / f"inputs-{secrets.token_hex(6)}", limits=limits,
            )
            if extras != ppl.PictureInputs():
                req = dataclasses.replace(req, settings=extras.apply(req.settings), extras=extras)
            result = h.run_generation(
                pipe, req, out_root, progress=report, lock=lock, identity_cache=identities,
                should_stop=lambda: stops.asked(run_id),
            )
            files.archive(result.files)  # --output-dir: a kept copy, never served
            seeds[_session(request)] = int(result.settings.get("seed", req.settings.seed))
            history[_session(request)] = h.add_to_history(
                history.get(_session(request), []), result.image_files, result.settings
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


def _example_rows(example_dir: Path, steps: int) -> list[tuple[str, str, str, float, int]]:
    """One row per example: photo, prompt, preset, id weight, start step (kept below the form's steps)."""
    from spatialid.ui.examples import EXAMPLES, write_example_photos

    paths = write_example_photos(example_dir)
    return [
        (str(paths[e.photo]), e.prompt, e.preset, e.id_weight, min(e.start_step, max(0, steps - 1)))
        for e in EXAMPLES
    ]


def _example_labels() -> list[str]:
    from spatialid.ui.examples import EXAMPLES

    return [f"{e.label}, start step {e.start_step}" for e in EXAMPLES]


def build_app(
    pipe: Any,
    *,
    model_name: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    example_dir: str | os.PathLike[str] | None = None,
    limits: h.UILimits | None = None,
    defaults: GenerationSettings | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    keep_outputs_hours: float = DEFAULT_KEEP_HOURS,
) -> Any:
    """Lay out the page for ``pipe`` (loaded once, shared by every visitor) and wire the events.

    Returns a ``gr.Blocks`` with its queue configured (one generation at a time, at most
    ``queue_size`` waiting, who see their place). Everything served lives in a fresh private
    folder (``demo._spatialid_files``, a :class:`ServeFiles`; close it when done) that becomes
    Gradio's upload folder; ``output_dir`` only receives kept copies of the PNGs, never served.
    ``example_dir`` (default: inside the private folder) must be a private folder.
    """
    auto_defaults, auto_limits = h.defaults_for(pipe)
    defaults = defaults or auto_defaults
    limits = limits or auto_limits
    if int(queue_size) < 1:
        raise SpatialIDError(f"--queue-size must be >= 1, got {queue_size}")
    files = ServeFiles(_files_parent(), keep_hours=keep_outputs_hours, archive_dir=output_dir)
    files.activate()  # before any component exists: Gradio reads its folder when one is created
    atexit.register(files.close)
    try:
        demo = _build(pipe, files, model_name, example_dir, limits, defaults, int(queue_size))
    except BaseException:
        files.close()
        raise
    return demo


def _files_parent() -> str | None:
    """Where the private folder goes: ``GRADIO_TEMP_DIR`` if the user set one, else the temp dir."""
    current = os.environ.get("GRADIO_TEMP_DIR")
    if not current:
        return None
    path = Path(current)
    return str(path.parent if path.name.startswith(SERVE_PREFIX) else path)  # not inside another server's


def _build(
    pipe: Any,
    files: ServeFiles,
    model_name: str | None,
    example_dir: str | os.PathLike[str] | None,
    limits: h.UILimits,
    defaults: GenerationSettings,
    queue_size: int,
) -> Any:
    example_rows = _example_rows(Path(example_dir) if example_dir is not None else files.examples_dir, defaults.steps)
    tiny = bool(getattr(pipe, "is_tiny", False))
    model_label = model_name or (getattr(pipe, "model_info", None) or {}).get("model", "FLUX.1")
    gpu_lock = threading.Lock()
    errors: dict[str, str] = {}  # session -> last error message, for the status line
    identities = h.IdentityCache(maxsize=8)
    presets = h.preset_choices()
    ready = "Upload a photo, write a prompt, press **Generate** (or Enter in the prompt)."

    with gr.Blocks(title="SpatialID", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## SpatialID <small>put a person into a FLUX.1 picture from one photo, and see where the identity "
            f"goes (model `{model_label}`)</small>",
            elem_id="page-title",
        )
        with gr.Row(equal_height=False):
            # the left column keeps everything a first run needs above the fold of a 1280x720 screen
            with gr.Column(scale=5):
                with gr.Row(equal_height=False):
                    photo = gr.Image(
                        label="Identity photo (drop a new one to replace)", type="filepath", sources=["upload"],
                        format="png", height=150, elem_id="id-photo",
                    )
                    preview = gr.Gallery(
                        label="Photos used and the face found", columns=3, height=150,
                        object_fit="contain", interactive=False, format="png", elem_id="photo-preview",
                    )
                gr.Markdown(
                    f"The **same person** in every photo (1-{limits.max_photos}, averaged); a new photo **replaces** "
                    f"the set. Max {limits.max_upload_mb:g} MB.",
                    elem_id="photo-help",
                )
                face_check = gr.Markdown("", elem_id="face-check")
                prompt = gr.Textbox(
                    label="Prompt (Enter generates, Shift+Enter starts a new line)",
                    placeholder="portrait photo of a woman in a space suit, studio light",
                    lines=1,
                    max_lines=4,
                    elem_id="prompt",
                )
                with gr.Row(equal_height=True):
                    preset = gr.Dropdown(
                        presets, value=defaults.preset, label="Where the identity goes (preset)", elem_id="preset",
                        scale=3,
                    )
                    id_weight = gr.Slider(
                        0, 3, value=defaults.id_weight, step=0.05, label="ID weight",
                        elem_id="id-weight", scale=2,
                    )
                with gr.Row(equal_height=False):
                    seed = gr.Textbox(
                        value="random", label="Seed (the used one shows here)", max_lines=1,
                        placeholder="random, or 0 to 2**63 - 1 (the CLI's range)", elem_id="seed", scale=3,
                    )
                    randomize = gr.Checkbox(value=True, label="Randomize", elem_id="randomize", scale=1, min_width=100)
                    reuse_seed = gr.Button("Reuse last seed", size="sm", elem_id="reuse-seed", scale=1, min_width=100)
                with gr.Row(equal_height=True):
                    generate = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
                preset_text = gr.Markdown(h.preset_help(defaults.preset), elem_id="preset-help")
                compare = gr.Checkbox(
                    value=False,
                    label="Compare presets: also draw the same seed with other presets, side by side, with their masks",
                    elem_id="compare",
                )
                compare_presets = gr.CheckboxGroup(
                    presets, value=list(D.BENCH_PRESETS), label="Presets to compare (the chosen preset comes first)",
                    visible=False, elem_id="compare-presets",
                )
                with gr.Accordion("Settings", open=False):
                    start_step = gr.Slider(
                        0, limits.max_steps - 1, value=defaults.start_step, step=1, label="Start step",
                        info="first step with identity; 0 = all (PuLID: 4 for photos, 0-1 for stylised prompts)",
                        elem_id="start-step",
                    )
                    negative_prompt = gr.Textbox(
                        label="Negative prompt (used when true CFG > 1)", lines=1, elem_id="negative-prompt"
                    )
                    true_cfg = gr.Slider(
                        1, 10, value=defaults.true_cfg, step=0.1, label="True CFG",
                        info="1 = off; > 1 uses the negative prompt and doubles the time", elem_id="true-cfg",
                    )
                    steps = gr.Slider(1, limits.max_steps, value=defaults.steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=defaults.guidance, step=0.1, label="Guidance", elem_id="guidance")
                    aspect = gr.Radio(
                        list(h.ASPECT_RATIOS), value=None, label="Aspect ratio (width:height, about the default's pixels)",
                        elem_id="aspect",
                    )
                    with gr.Row():
                        width = gr.Slider(64, limits.max_side, value=defaults.width, step=16, label="Width", elem_id="width")
                        height = gr.Slider(64, limits.max_side, value=defaults.height, step=16, label="Height", elem_id="height")
                    num_images = gr.Slider(
                        1, limits.max_images, value=defaults.num_images, step=1, label="Images", elem_id="num-images"
                    )
                with gr.Accordion(f"Several people (up to {ppl.MAX_PEOPLE})", open=False, elem_id="people-box"):
                    gr.Markdown(
                        "Person 1 is the identity photo above. Each added person has their own photos and their own "
                        "place: left to right in this order, or the region you type as x0,y0,x1,y1 fractions of the "
                        "width and height (0,0,0.5,1 = the left half; a region for every person or for none).",
                        elem_id="people-help",
                    )
                    region_1 = gr.Textbox(
                        label="Region of person 1 (optional)", placeholder="e.g. 0,0,0.5,1", max_lines=1, elem_id="region-1"
                    )
                    # people on the page (1 = only the identity photo above); a hidden number, not a gr.State, so
                    # the page's config stays plain JSON
                    people_count = gr.Number(value=1, precision=0, visible=False, elem_id="people-count")
                    person_boxes, person_photos, person_regions, person_checks, person_removes = [], [], [], [], []
                    for number in range(2, ppl.MAX_PEOPLE + 1):
                        with gr.Group(visible=False, elem_id=f"person-{number}") as person_box:
                            person_photos.append(gr.File(
                                label=f"Person {number}: photos of that person (1-{limits.max_photos})",
                                file_count="multiple", file_types=["image"], height=100, elem_id=f"person-{number}-photos",
                            ))
                            person_regions.append(gr.Textbox(
                                label=f"Region of person {number} (optional)", placeholder="e.g. 0.5,0,1,1", max_lines=1,
                                elem_id=f"region-{number}",
                            ))
                            person_checks.append(gr.Markdown("", elem_id=f"person-{number}-check"))
                            person_removes.append(gr.Button(f"Remove person {number}", size="sm", elem_id=f"remove-person-{number}"))
                        person_boxes.append(person_box)
                    add_person = gr.Button("+ Add a person", size="sm", elem_id="add-person")
                with gr.Accordion("Edit a picture / LoRA", open=False, elem_id="edit-box"):
                    init_image = gr.ImageEditor(
                        label="Init image (img2img); paint over a part to redraw only that part (inpainting)",
                        type="filepath", sources=["upload"], format="png", layers=False, transforms=(), height=260,
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="init-image",
                    )
                    mask_upload = gr.Image(
                        label="... or upload an inpainting mask (white = redraw; the init image's size)", type="filepath",
                        sources=["upload"], format="png", height=120, elem_id="inpaint-mask",
                    )
                    strength = gr.Slider(
                        0.05, 1, value=D.DEFAULT_IMG2IMG_STRENGTH, step=0.05, label="Strength (share of the init image redrawn)",
                        elem_id="strength",
                    )
                    offered = sorted(p.name for p in Path(limits.lora_dir).glob("*.safetensors")) if limits.lora_dir else []
                    loras = gr.Textbox(
                        label=(
                            "LoRAs: one NAME[:SCALE] per line, loaded for this run only; this server offers: "
                            + (", ".join(offered[:12]) or "none")
                            if limits.lora_dir else "LoRAs: off on this server (its operator enables them with serve --lora-dir DIR)"
                        ),
                        lines=2, placeholder=f"{offered[0]}:0.8" if offered else "", elem_id="loras",
                        interactive=bool(limits.lora_dir),
                    )
                examples = gr.Gallery(
                    value=[(row[0], label) for row, label in zip(example_rows, _example_labels())],
                    label="Examples (scikit-image's photos): a click fills the form with tuned settings and runs it",
                    columns=len(example_rows), height=170, object_fit="cover", allow_preview=False,
                    interactive=False, format="png", buttons=[], elem_id="examples",
                )
                add_photo = gr.UploadButton(
                    "+ Add another photo of the same person", file_types=["image"], file_count="single",
                    size="sm", elem_id="add-photo",
                )
                photos = gr.File(
                    label="Photos used (all of one person; remove one with its x)", file_count="multiple",
                    file_types=["image"], interactive=True, elem_id="id-photos", height=120,
                )
                load_png = gr.File(
                    label="Load settings from a PNG written by SpatialID (drop it here)", file_count="single",
                    file_types=[".png", ".jpg", ".jpeg", ".webp"], elem_id="load-settings", height=90,
                )
                load_message = gr.Markdown("", elem_id="load-message")
            with gr.Column(scale=7):
                if tiny:
                    gr.Markdown(h.TINY_NOTICE, elem_id="tiny-notice")
                status = gr.Markdown(ready, elem_id="status")
                gallery = gr.Gallery(
                    label="Images", columns=2, fit_columns=False, height="auto", object_fit="contain", format="png",
                    interactive=False, elem_id="images",
                )
                with gr.Column(visible=False, elem_id="comparison-box") as comparison_box:
                    gr.Markdown(
                        "**Preset comparison** (same seed and prompt): each preset's image, then where its identity "
                        "went at an early, a middle and a late step. The numbers are in the picture's footer."
                    )
                    comparison = gr.Image(
                        show_label=False, type="filepath", format="png", interactive=False, elem_id="comparison",
                    )
                gr.Markdown(
                    "**Where the identity went.** The final image, then the identity mask at an early, a middle "
                    "and a late denoising step drawn over it (yellow = full identity, dark = none). With the pulid "
                    "preset it is uniform; SpatialID starts from a centred blob, follows the face, then relaxes."
                )
                mask_picture = gr.Image(
                    show_label=False, type="filepath", format="png", interactive=False, elem_id="mask-picture",
                )
                aligned_face = gr.Image(
                    label="Aligned face the encoder used", type="pil", format="png", interactive=False,
                    height=160, elem_id="aligned-face",
                )
                downloads = gr.File(
                    label="Downloads: the image, its masks (_masks) and the comparison (_compare); settings inside "
                    "(`spatialid info FILE`)",
                    file_count="multiple", interactive=False, elem_id="downloads",
                )
                settings = gr.Textbox(
                    label="Settings", lines=6, max_lines=24, interactive=False, buttons=["copy"], elem_id="settings"
                )
                history_gallery = gr.Gallery(
                    label=f"This tab's last {h.HISTORY_SIZE} results (click one to load its settings)", columns=8,
                    fit_columns=False,
                    height=130, object_fit="contain", interactive=False, allow_preview=False, format="png",
                    buttons=[], elem_id="history",
                )

        inputs = [
            photos, prompt, negative_prompt, preset, id_weight, start_step, true_cfg, steps,
            guidance, width, height, seed, num_images, compare, compare_presets,
            region_1, people_count, *person_photos, *person_regions, init_image, mask_upload, strength, loras,
        ]
        outputs = [gallery, comparison_box, comparison, mask_picture, aligned_face, downloads, settings, status]

        seeds: dict[str, int] = {}  # session -> seed of its last successful run
        stops = _Stops()  # which running generation a Stop click is for
        history: dict[str, list[tuple[str, str]]] = {}  # session -> its last results, newest first
        on_generate = _generate_fn(
            pipe, limits=limits, files=files, lock=gpu_lock, errors=errors, identities=identities, seeds=seeds,
            stops=stops, history=history,
        )
        event_args = dict(
            fn=on_generate,
            inputs=inputs,
            outputs=outputs,
            concurrency_id="gpu",
            concurrency_limit=1,
            show_progress="full",
            show_progress_on=[gallery],  # one bar for the whole run (all presets of a comparison)
        )
        failed: set[str] = set()  # sessions whose result area shows an error (cleared when the input changes)
        private = dict(queue=False, api_visibility="private")

        def start(seed_value: Any, random_on: Any) -> tuple:
            """A run starts: the previous run's result goes, so the page never mixes two runs."""
            return (None, gr.update(visible=False), None, None, None, None, "",
                    _working(), h.seed_for_run(seed_value, random_on))

        def succeeded(request: gr.Request) -> tuple:
            failed.discard(_session(request))
            used = seeds.get(_session(request))
            return (gr.skip() if used is None else str(used)), history.get(_session(request), [])

        def failed_status(request: gr.Request) -> Any:
            if errors.get(_session(request)) == "stopped":
                errors.pop(_session(request), None)
                return gr.skip()  # the Stop button has already written the status line
            failed.add(_session(request))
            return _failed(errors)(request)

        runs: list[Any] = []

        def chain(trigger: Any, **extra: Any) -> None:
            """clear the result area -> generate -> the used seed back in the box, or the error in the status line."""
            run = trigger(start, [seed, randomize], outputs + [seed], js=_CLOSE_TOASTS, **private).then(**event_args, **extra)
            run.success(succeeded, None, [seed, history_gallery], **private)
            run.failure(failed_status, None, status, **private)
            runs.append(run)

        chain(generate.click, api_name="generate")
        chain(prompt.submit, api_visibility="private")
        def pick_example(evt: gr.SelectData) -> tuple:
            if not isinstance(evt.index, int) or not 0 <= evt.index < len(example_rows):
                return (gr.skip(),) * 6
            path, text, name, weight, first_step = example_rows[evt.index]
            return path, [path], text, name, weight, first_step

        chain(
            examples.select(pick_example, None, [photo, photos, prompt, preset, id_weight, start_step], **private).then,
            api_visibility="private",
        )

        def stop_run(request: gr.Request) -> str:
            """Stop: the running step finishes, then the run ends and frees the GPU for the next in line."""
            stops.stop(_session(request))  # a queued run is taken off the queue by `cancels`
            return "**Stopped**: nothing was written. Change the settings and press **Generate** again."

        stop.click(stop_run, None, status, cancels=runs, **private)

        def show_faces(current: Any) -> tuple:
            return h.preview_identity(pipe, current, cache=identities, limits=limits, lock=gpu_lock)

        def clear_error(request: gr.Request) -> tuple:
            """The input changed after a failed run: the old error and its badges go."""
            if _session(request) not in failed:
                return (gr.skip(),) * 3
            failed.discard(_session(request))
            return None, None, ready

        def hold(chosen: list[str], request: gr.Request) -> list[str]:
            """Register the photos with the session now: uploads are shared by content hash, and another
            visitor with the same photo who leaves must not delete this visitor's copy."""
            files.note_uploads(_session_key(request), chosen)
            return chosen

        def replace_photo(new: Any, request: gr.Request) -> list[str]:
            return hold(h.photo_set(None, new, add=False), request)

        def add_one(current: Any, new: Any, request: gr.Request) -> list[str]:
            return hold(h.photo_set(current, new, add=True), request)

        def keep_listed(current: Any, request: gr.Request) -> None:
            """Photos dropped straight on the "Photos used" list belong to this session too."""
            hold(h.photo_set(current, None, add=True), request)

        stale = [gallery, mask_picture, status]
        photo.upload(replace_photo, photo, photos, **private)
        photo.clear(list, None, photos, **private)
        add_photo.upload(add_one, [photos, add_photo], photos, **private)
        photos.upload(keep_listed, photos, None, **private)
        # every change of the list (upload, replace, add, a photo removed with its x): check the faces again
        photos.change(
            show_faces, photos, [preview, face_check], concurrency_id="faces", concurrency_limit=1,
            show_progress="minimal", api_visibility="private",
        )
        for event in (photo.upload, photo.clear, add_photo.upload, photos.delete, prompt.input):
            event(clear_error, None, stale, **private)

        restored = [prompt, negative_prompt, preset, id_weight, start_step, true_cfg, guidance, steps, width, height, seed]

        def fill_form(values: dict[str, Any] | None, message: str) -> tuple:
            if values is None:
                return (*([gr.skip()] * len(restored)), gr.skip(), message)
            return (*(values[key] for key in h._RESTORED), False, message)  # a loaded seed is meant to be reused

        def load_settings(file: Any, request: gr.Request) -> tuple:
            """Fill the form from the dropped file, then empty the box for the next one."""
            if not file:
                return (*([gr.skip()] * len(restored)), gr.skip(), "", gr.skip())
            files.note_uploads(_session_key(request), _upload_paths(file))
            return (*fill_form(*h.settings_from_file(file, limits)), None)

        def from_history(evt: gr.SelectData, request: gr.Request) -> tuple:
            items = history.get(_session(request), [])
            if not isinstance(evt.index, int) or not 0 <= evt.index < len(items):
                return (*([gr.skip()] * len(restored)), gr.skip(), "")
            return fill_form(*h.settings_from_file(items[evt.index][0], limits))

        load_png.upload(load_settings, load_png, [*restored, randomize, load_message, load_png], **private)
        history_gallery.select(from_history, None, [*restored, randomize, load_message], **private)

        def reuse(request: gr.Request) -> tuple:
            used = seeds.get(_session(request))
            if used is None:
                gr.Info("No run yet in this tab: generate once, then its seed can be reused.", duration=TOAST_SECONDS)
                return gr.skip(), gr.skip()
            return str(used), False

        def sized(ratio: Any) -> tuple:
            if not ratio:
                return gr.skip(), gr.skip()
            return h.aspect_size(str(ratio), defaults.width, defaults.height, max_side=limits.max_side)

        reuse_seed.click(reuse, None, [seed, randomize], **private)
        seed.input(lambda: False, None, randomize, **private)  # typing a seed means "use this one"
        aspect.change(sized, aspect, [width, height], **private)
        preset.change(h.preset_help, preset, preset_text, queue=False, api_visibility="private")
        compare.change(
            lambda on: gr.update(visible=bool(on)), compare, compare_presets, queue=False, api_visibility="private"
        )

        def add_a_person(count: Any) -> tuple:
            """Show the next person's box (up to MAX_PEOPLE)."""
            count = int(count or 1)
            if count >= ppl.MAX_PEOPLE:
                gr.Info(f"At most {ppl.MAX_PEOPLE} people per image.", duration=TOAST_SECONDS)
                return (gr.skip(),) * (1 + len(person_boxes))
            count += 1
            return (count, *(gr.update(visible=i + 2 <= count) for i in range(len(person_boxes))))

        def remover(index: int) -> Any:
            def remove(count: Any, *values: Any) -> tuple:
                """Drop one person: the ones after move up, the last box hides."""
                n = len(person_boxes)
                kept, regions = list(values[:n]), list(values[n:])
                del kept[index], regions[index]
                count = max(1, int(count or 1) - 1)
                return (count, *(gr.update(visible=i + 2 <= count) for i in range(n)), *kept, None, *regions, "")

            return remove

        def checker(number: int) -> Any:
            def check(current: Any) -> str:
                return ppl.person_check(pipe, current, number, cache=identities, limits=limits, lock=gpu_lock)

            return check

        add_person.click(add_a_person, people_count, [people_count, *person_boxes], **private)
        for index, (button, person_files) in enumerate(zip(person_removes, person_photos)):
            button.click(
                remover(index), [people_count, *person_photos, *person_regions],
                [people_count, *person_boxes, *person_photos, *person_regions], **private,
            )
            person_files.upload(keep_listed, person_files, None, **private)  # this session's uploads
            person_files.change(
                checker(index + 2), person_files, person_checks[index], concurrency_id="faces", concurrency_limit=1,
                show_progress="minimal", api_visibility="private",
            )

        def on_unload(request: gr.Request) -> None:
            """The tab was closed (Gradio's heartbeat ended): delete this session's files."""
            key = _session(request)
            if key:
                files.end_session(key)
                failed.discard(key)
                seeds.pop(key, None)
                history.pop(key, None)

        demo.unload(on_unload)

    # api_open=False: a direct POST to /gradio_api/run/... would skip the queue and its size cap
    demo.queue(default_concurrency_limit=1, max_size=queue_size, api_open=False)
    demo._spatialid_files = files
    demo._spatialid_limits = limits
    return demo


def _blocked_paths(files: ServeFiles) -> list[str]:
    """``--output-dir`` is never served; block it outright unless the private folder is inside it."""
    archive = files.archive_dir
    if archive is None:
        return []
    archive = archive.resolve()
    return [] if files.root.is_relative_to(archive) else [str(archive)]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Any:
    """SIGTERM (systemd, docker stop, kill) ends the server like Ctrl-C, so the clean-up runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch(
    pipe: Any,
    *,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_mb: float = 20.0,
    output_dir: str | os.PathLike[str] | None = None,
    auth: Sequence[tuple[str, str]] | None = None,
    max_steps: int | None = None,
    max_images: int | None = None,
    max_side: int | None = None,
    max_cost: float | None = None,
    lora_dir: str | os.PathLike[str] | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    keep_outputs_hours: float = DEFAULT_KEEP_HOURS,
    prevent_thread_lock: bool = False,
) -> Any:
    """Build the app and serve it; blocks until Ctrl-C or SIGTERM unless ``prevent_thread_lock``.

    The caps (``max_*``; None = the model's default, :func:`~spatialid.ui.handlers.defaults_for`)
    bound what one request may cost; ``auth`` (``[(user, password), ...]``) requires a login.
    The private folder is deleted when this returns (or at exit with ``prevent_thread_lock``:
    then call ``demo.close()`` and ``demo._spatialid_files.close()`` yourself).
    """
    _, limits = h.defaults_for(pipe)
    limits = limits.replace(
        max_upload_mb=float(max_upload_mb), max_steps=max_steps, max_images=max_images, max_side=max_side, max_cost=max_cost,
        lora_dir=None if lora_dir is None else str(Path(lora_dir).expanduser().resolve()),
    )
    demo = build_app(
        pipe, model_name=model_name, output_dir=output_dir, limits=limits,
        queue_size=queue_size, keep_outputs_hours=keep_outputs_hours,
    )
    files: ServeFiles = demo._spatialid_files
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            auth=list(auth) if auth else None,
            auth_message="This SpatialID server requires a login (ask its operator)." if auth else None,
            max_file_size=f"{max_upload_mb:g}mb",
            allowed_paths=[],  # served: only the private folder (Gradio's upload folder)
            blocked_paths=_blocked_paths(files),
            run_history=False,  # no run records in browsers, no Hugging Face bucket routes
            mcp_server=False,
            enable_monitoring=False,  # no /monitoring dashboard of everyone's events
            footer_links=["api", "settings"],
            show_error=is_loopback(host),  # unexpected errors' text only for a local visitor
            quiet=False,
            ssr_mode=False,
            prevent_thread_lock=True,  # we block below, so the clean-up runs after Ctrl-C / SIGTERM
            theme=_theme(),
            css=CSS,
        )
    except OSError as exc:  # port in use, address not on this machine
        files.close()
        raise SpatialIDError(
            f"cannot listen on {host}:{port} ({' '.join(str(exc).split())}); choose another --port or --host"
        ) from None
    except BaseException:
        files.close()
        raise
    files.start_sweeper()
    if prevent_thread_lock:
        return demo
    try:
        with _sigterm_as_interrupt():
            demo.block_thread()
    finally:
        demo.close()
        files.close()
    return demo
