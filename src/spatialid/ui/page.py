"""The web page's components, one builder per section (no events: :mod:`spatialid.ui.events`).

Each builder creates its section's components inside the current Gradio layout context and
returns them in a small dataclass, so the event wiring names a component by its section
(``page.settings.steps``) and the layout of one section reads on one screen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spatialid import defaults as D
from spatialid.pipeline.settings import MAX_GUIDANCE, GenerationSettings
from spatialid.ui import handlers as h
from spatialid.ui import people as ppl
from spatialid.ui._gradio import GuardedImage, GuardedImageEditor, gr
from spatialid.ui.inputs import UILimits

__all__ = ["PAGE_JS", "Page", "build_page"]

# Runs once in the browser (launch(js=...)): a number typed into a slider's box outside its range is
# refused with a line under it, and the slider keeps its value; Gradio would silently clamp it
# (width 5000 -> 512, -50 -> 64).
PAGE_JS = """() => {
  const check = (event) => {
    const box = event.target;
    if (!(box instanceof HTMLInputElement) || box.type !== 'number' || box.value === '') return;
    const block = box.closest('.block');
    const range = block && block.querySelector('input[type=range]');
    if (!range) return;
    let note = block.querySelector('.range-refused');
    const value = Number(box.value), low = Number(range.min), high = Number(range.max);
    if (value >= low && value <= high) { if (note && event.type === 'change') note.remove(); return; }
    event.stopImmediatePropagation();  // the slider never sees it: its value stays
    if (event.type !== 'change') return;
    box.value = range.value;
    const name = (block.querySelector('[data-testid=block-info]') || {}).innerText || 'this value';
    if (!note) { note = document.createElement('div'); note.className = 'range-refused'; block.appendChild(note); }
    note.textContent = `${value} refused: ${name.trim()} must be between ${low} and ${high} on this server; kept ${range.value}.`;
  };
  document.addEventListener('input', check, true);
  document.addEventListener('change', check, true);
}"""


@dataclass
class PhotoBox:
    """Person 1's identity photo, the thumbnails of the photos used, the face check line, the list and "add"."""

    photo: Any
    preview: Any
    face_check: Any
    add_photo: Any
    photos: Any


@dataclass
class RunBox:
    """The prompt, preset, ID weight, seed, Generate / Stop and the preset comparison switch."""

    prompt: Any
    preset: Any
    id_weight: Any
    seed: Any
    randomize: Any
    reuse_seed: Any
    generate: Any
    stop: Any
    preset_text: Any
    compare: Any
    compare_presets: Any


@dataclass
class SettingsBox:
    """The "Settings" accordion: start step, negative prompt, CFG, steps, guidance, size, images."""

    start_step: Any
    negative_prompt: Any
    true_cfg: Any
    steps: Any
    guidance: Any
    aspect: Any
    width: Any
    height: Any
    num_images: Any
    cost: Any  # what the request costs against this server's cap, updated as the sliders move


@dataclass
class PeopleBox:
    """The "Several people" accordion: person 1's region and one hidden box per added person."""

    accordion: Any  # its header says what is on (people, regions)
    region_1: Any
    count: Any  # people on the page (1 = only the identity photo above)
    boxes: list[Any]
    photos: list[Any]
    previews: list[Any]  # each person's thumbnails and aligned face
    regions: list[Any]
    checks: list[Any]
    removes: list[Any]
    add: Any
    clear: Any
    message: Any  # "at most 4 people", "region of person 1 cleared"


@dataclass
class EditBox:
    """The "Edit a picture / LoRA" accordion: init image with painted mask, mask upload, strength, LoRAs."""

    accordion: Any  # its header says what is on (img2img, inpainting, LoRAs)
    init_image: Any
    mask_upload: Any
    strength: Any
    lora_menu: Any  # a menu of the server's LoRA files
    lora_weight: Any
    loras: Any  # hidden: the NAME:WEIGHT lines Generate takes
    clear: Any
    has_init: Any  # hidden: whether an init image is set (for the "what is on" line)


@dataclass
class MoreBox:
    """Below the form: the examples and loading settings from a PNG."""

    examples: Any
    load_png: Any
    load_message: Any


@dataclass
class ResultsBox:
    """The right column: status line, images, comparison, mask picture, face, downloads, settings, history."""

    active: Any  # what the folded sections make Generate do (img2img, people, regions, LoRAs)
    status: Any
    gallery: Any
    comparison_box: Any
    comparison: Any
    mask_picture: Any
    aligned_face: Any
    downloads: Any
    settings: Any
    history: Any
    kept: Any  # gr.BrowserState: the history's kept files, for a reload


@dataclass
class Page:
    """Every component of the page, by section."""

    photo: PhotoBox
    run: RunBox
    settings: SettingsBox
    people: PeopleBox
    edit: EditBox
    more: MoreBox
    results: ResultsBox


def build_page(
    *,
    model_label: str,
    tiny: bool,
    limits: UILimits,
    defaults: GenerationSettings,
    example_rows: list[tuple[str, str, str, float, int]],
    example_labels: list[str],
    ready: str,
    storage_note: str = "",
    cost_text: str = "",
) -> Page:
    """Lay out the page inside the current ``gr.Blocks``; the left column keeps what a first run needs
    above the fold of a 1280x720 screen."""
    gr.Markdown(
        f"## SpatialID <small>put a person into a FLUX.1 picture from one photo, and see where the identity "
        f"goes (model `{model_label}`)</small>",
        elem_id="page-title",
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            photo = _photo_box(limits)
            run = _run_box(defaults)
            settings = _settings_box(limits, defaults, cost_text)
            people = _people_box(limits)
            edit = _edit_box(limits)
            more = _more_box(example_rows, example_labels)
        with gr.Column(scale=7):
            results = _results_box(tiny, ready, storage_note)
    return Page(photo, run, settings, people, edit, more, results)


def _photo_box(limits: UILimits) -> PhotoBox:
    """Person 1's photos in one place: the drop box, the thumbnails with the face found, the button that
    adds another photo of the same person and, with two or more, their list (remove one with its x)."""
    with gr.Row(equal_height=False):
        photo = gr.Image(
            label="Identity photo (drop a new one to replace)", type="filepath", sources=["upload"],
            format="png", height=140, elem_id="id-photo",
        )
        preview = gr.Gallery(
            label="Photos used and the face found", columns=2, height=140,
            object_fit="contain", interactive=False, format="png", buttons=[], elem_id="photo-preview",
            elem_classes=["face-preview"],
        )
    with gr.Row(equal_height=False):
        gr.Markdown(
            f"**One person**, 1-{limits.max_photos} photos (averaged); a new photo **replaces** the set. "
            f"Max {limits.max_upload_mb:g} MB.",
            elem_id="photo-help",
        )
        add_photo = gr.UploadButton(
            "+ Add a photo of the same person", file_types=["image"], file_count="single",
            size="sm", elem_id="add-photo", scale=0, min_width=210,
        )
    face_check = gr.Markdown("", elem_id="face-check")
    # the photos Generate uses; shown (to remove one with its x) once there are two or more
    photos = gr.File(
        label="Photos used (all of one person; remove one with its x)", file_count="multiple",
        file_types=["image"], interactive=True, elem_id="id-photos", height=80, visible="hidden",
    )
    return PhotoBox(photo, preview, face_check, add_photo, photos)


def _run_box(defaults: GenerationSettings) -> RunBox:
    presets = h.preset_choices()
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
        # enabled only while this tab's run is queued or running (events.py turns it on and off)
        stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80, interactive=False)
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
    return RunBox(
        prompt, preset, id_weight, seed, randomize, reuse_seed, generate, stop, preset_text, compare, compare_presets
    )


def _settings_box(limits: UILimits, defaults: GenerationSettings, cost_text: str) -> SettingsBox:
    with gr.Accordion("Settings", open=False, elem_id="settings-box"):
        start_step = gr.Slider(
            0, max(1, defaults.steps - 1), value=defaults.start_step, step=1, label="Start step",
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
        cost = gr.Markdown(cost_text, elem_id="cost")
    return SettingsBox(start_step, negative_prompt, true_cfg, steps, guidance, aspect, width, height, num_images, cost)


def _people_box(limits: UILimits) -> PeopleBox:
    with gr.Accordion(f"Several people (up to {ppl.MAX_PEOPLE})", open=False, elem_id="people-box") as box:
        gr.Markdown(
            "Person 1 is the identity photo above. Each added person has their own photos and their own "
            "place: left to right in this order, or the region you type as x0,y0,x1,y1 fractions of the "
            "width and height (0,0,0.5,1 = the left half; a region for every person or for none), or words of "
            "the prompt typed in the same field (e.g. the boy): that person goes where FLUX draws those words.",
            elem_id="people-help",
        )
        region_1 = gr.Textbox(
            label="Region or words of person 1 (optional)", placeholder="e.g. 0,0,0.5,1 or the boy", max_lines=1,
            elem_id="region-1",
        )
        # a hidden number, not a gr.State, so the page's config stays plain JSON
        count = gr.Number(value=1, precision=0, visible=False, elem_id="people-count")
        boxes, photos, previews, regions, checks, removes = [], [], [], [], [], []
        for number in range(2, ppl.MAX_PEOPLE + 1):
            with gr.Group(visible=False, elem_id=f"person-{number}") as person_box:
                with gr.Row(equal_height=False):
                    photos.append(gr.File(
                        label=f"Person {number}: photos of that person (1-{limits.max_photos})",
                        file_count="multiple", file_types=["image"], height=100, elem_id=f"person-{number}-photos",
                    ))
                    previews.append(gr.Gallery(
                        label=f"Person {number}: photos and the face found", columns=4, height=100,
                        object_fit="contain", interactive=False, format="png", buttons=[],
                        elem_id=f"person-{number}-preview", elem_classes=["face-preview"],
                    ))
                regions.append(gr.Textbox(
                    label=f"Region or words of person {number} (optional)", placeholder="e.g. 0.5,0,1,1 or the girl",
                    max_lines=1,
                    elem_id=f"region-{number}",
                ))
                checks.append(gr.Markdown("", elem_id=f"person-{number}-check"))
                removes.append(gr.Button(f"Remove person {number}", size="sm", elem_id=f"remove-person-{number}"))
            boxes.append(person_box)
        with gr.Row():
            add = gr.Button("+ Add a person", size="sm", elem_id="add-person")
            clear = gr.Button("Clear people and regions", size="sm", elem_id="clear-people")
        message = gr.Markdown("", elem_id="people-message")
    return PeopleBox(box, region_1, count, boxes, photos, previews, regions, checks, removes, add, clear, message)


def _edit_box(limits: UILimits) -> EditBox:
    with gr.Accordion("Edit a picture / LoRA", open=False, elem_id="edit-box") as box:
        init_image = GuardedImageEditor(  # checked from its header before Gradio decodes it
            label="Init image (img2img; the output takes its size); paint over a part to redraw only that part (inpainting)",
            type="filepath", sources=["upload"], format="png", layers=False, transforms=(), height=260,
            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="init-image",
        )
        mask_upload = GuardedImage(
            label="... or upload an inpainting mask (white = redraw; the init image's size)", type="filepath",
            sources=["upload"], format="png", height=120, elem_id="inpaint-mask",
        )
        strength = gr.Slider(
            0.05, 1, value=D.DEFAULT_IMG2IMG_STRENGTH, step=0.05, label="Strength (share of the init image redrawn)",
            elem_id="strength",
        )
        offered = ppl.lora_choices(limits.lora_dir)
        with gr.Row(equal_height=True):
            lora_menu = gr.Dropdown(
                offered, value=[], multiselect=True, max_choices=ppl.MAX_LORAS,
                label=("LoRAs (this server's, for this run only)" if offered else
                       "LoRAs: none on this server (its operator offers a folder with serve --lora-dir DIR)"),
                interactive=bool(offered), elem_id="loras", scale=3,
            )
            lora_weight = gr.Slider(
                -ppl.MAX_LORA_SCALE, ppl.MAX_LORA_SCALE, value=1.0, step=0.05, label="LoRA weight",
                interactive=bool(offered), elem_id="lora-weight", scale=2,
            )
        # what Generate (and the API) takes: one NAME:WEIGHT per line, written from the menu and the slider
        loras = gr.Textbox(visible=False, elem_id="lora-lines")
        clear = gr.Button("Clear init image, mask and LoRAs", size="sm", elem_id="clear-edit")
        has_init = gr.Number(value=0, precision=0, visible=False, elem_id="has-init")  # 1 while an init image is set
    return EditBox(box, init_image, mask_upload, strength, lora_menu, lora_weight, loras, clear, has_init)


def _more_box(example_rows: list[tuple[str, str, str, float, int]], example_labels: list[str]) -> MoreBox:
    examples = gr.Gallery(
        value=[(row[0], label) for row, label in zip(example_rows, example_labels)],
        label="Examples: a click fills the form with tuned settings and runs it",
        columns=len(example_rows), height=170, object_fit="cover", allow_preview=False,
        interactive=False, format="png", buttons=[], elem_id="examples",
    )
    load_png = gr.UploadButton(
        "Load settings from a PNG written by SpatialID", file_count="single",
        file_types=[".png", ".jpg", ".jpeg", ".webp"], size="sm", elem_id="load-settings",
    )
    load_message = gr.Markdown("", elem_id="load-message")
    return MoreBox(examples, load_png, load_message)


def _results_box(tiny: bool, ready: str, storage_note: str) -> ResultsBox:
    if tiny:
        gr.Markdown(h.TINY_NOTICE, elem_id="tiny-notice")
    active = gr.Markdown(ppl.active_modes().line, elem_id="active-mode")
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
        label="Aligned face the encoder used (one per person)", type="filepath", format="png", interactive=False,
        height=160, elem_id="aligned-face",
    )
    gr.Markdown(storage_note, elem_id="storage-note")
    downloads = gr.File(
        label="Downloads: the image, its masks (_masks) and the comparison (_compare); settings inside "
        "(`spatialid info FILE`)",
        file_count="multiple", interactive=False, elem_id="downloads",
    )
    settings = gr.Textbox(
        label="Settings (the PNG holds them all: spatialid info FILE)", lines=4, max_lines=10, interactive=False,
        buttons=["copy"], elem_id="settings",
    )
    history = gr.Gallery(
        label=f"This tab's last {h.HISTORY_SIZE} results (click one to see it and load its settings)", columns=8,
        fit_columns=False,
        height=150, object_fit="contain", interactive=False, allow_preview=False, format="png",
        buttons=[], elem_id="history",
    )
    # the kept results' files (local server only), so the history survives a reload of the tab
    kept = gr.BrowserState([], storage_key="spatialid-history")
    return ResultsBox(
        active, status, gallery, comparison_box, comparison, mask_picture, aligned_face, downloads, settings, history, kept
    )
