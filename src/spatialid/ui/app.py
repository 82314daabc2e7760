"""The Gradio app behind ``spatialid serve``: components, events, queue and launch settings.

Written for Gradio 6 (``theme``/``css`` are launch arguments there, ``api_visibility`` and
``footer_links`` replace older names). Everything that decides something lives in
:mod:`spatialid.ui.handlers`; this module only lays out the page and turns
:class:`~spatialid.errors.SpatialIDError` into a one-line ``gr.Error`` popup.

Offline by construction: analytics and Gradio's version check are off, no share link is ever
created, and the default theme's fonts are served by the app itself (no Google Fonts request).
That last part needs Gradio >= 6.17.3: 6.0-6.16 work too, but their page asks cdnjs for an
iframe-resizer script and Google for the Source Sans Pro font (harmless failures when offline).
Tested with Gradio 6.17.3 and 6.31.0.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from spatialid.cli.cmd_serve import is_loopback
from spatialid.errors import SpatialIDError
from spatialid.pipeline.settings import MAX_GUIDANCE
from spatialid.ui import handlers as h

__all__ = ["build_app", "launch", "load_pipeline", "CSS"]

# Gradio reads these at import and launch time; set them before importing it.
_OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SHARE": "False",
}

CSS = """
#tiny-notice { border-left: 4px solid #f59e0b; padding: 0.4em 0.8em; background: rgba(245,158,11,0.08); }
#status { min-height: 1.6em; }
"""


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


def _generate_fn(
    pipe: Any,
    *,
    limits: h.UILimits,
    out_root: Path,
    lock: threading.Lock,
    errors: dict[str, str],
    identities: h.IdentityCache,
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
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        def report(done: int, total: int, desc: str) -> None:
            progress((done, total), desc=desc, unit="steps")

        try:
            req = h.build_request(
                photos, prompt, negative_prompt, preset, id_weight, start_step, true_cfg, steps,
                guidance, width, height, seed, num_images, compare, compare_presets, limits=limits,
            )
            result = h.run_generation(
                pipe, req, out_root, progress=report, lock=lock, identity_cache=identities
            )
        except SpatialIDError as exc:
            message = " ".join(str(exc).split())
            errors[_session(request)] = message
            raise gr.Error(message, title="Cannot generate", print_exception=False) from None
        compare_file = next((p for p in result.files if p.stem.endswith("_compare")), None)
        mask_file = next((p for p in result.files if p.stem.endswith("_masks")), None)
        return (
            [(str(p), c) for p, c in zip(result.image_files, result.captions)],
            gr.update(value=str(compare_file) if compare_file else None, visible=compare_file is not None),
            str(mask_file) if mask_file else None,
            result.aligned_face,
            [str(p) for p in result.files],
            h.settings_text(result.settings),
            result.status,
        )

    return on_generate


def load_pipeline(
    model: str = "tiny",
    *,
    pulid: str | None = None,
    offload: str = "none",
    quantize: str | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    offline: bool = False,
    cache_dir: str | None = None,
) -> Any:
    """Load the model once for the server, exactly as ``spatialid generate`` does."""
    from spatialid.cli.cmd_generate import load_pipeline as _load
    from spatialid.cli.cmd_generate import resolve_device, resolve_dtype

    dev = resolve_device(device or "auto")
    torch_dtype = resolve_dtype(dtype or "auto", dev)
    pipe = _load(
        model,
        pulid=pulid,
        offload=offload,
        quantize=quantize,
        device=dev,
        dtype=torch_dtype,
        offline=offline,
        cache_dir=cache_dir,
    )
    pipe.set_progress_bar_config(disable=True)  # the page shows progress; keep the server log clean
    return pipe


def _example_rows(example_dir: Path | None) -> tuple[list[list[Any]], list[str]]:
    from spatialid.ui.examples import EXAMPLES, write_example_photos

    paths = write_example_photos(example_dir)
    rows = [[[str(paths[e.name])], e.prompt] for e in EXAMPLES]
    return rows, [e.label for e in EXAMPLES]


def build_app(
    pipe: Any,
    *,
    model_name: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    example_dir: str | os.PathLike[str] | None = None,
    limits: h.UILimits | None = None,
    defaults: h.UIDefaults | None = None,
) -> Any:
    """Lay out the page for ``pipe`` (loaded once, shared by every visitor) and wire the events.

    Returns a ``gr.Blocks`` with its queue configured (one generation at a time, waiting visitors
    see their place). ``output_dir`` holds the PNGs offered for download (a temp folder if None).
    """
    auto_defaults, auto_limits = h.defaults_for(pipe)
    defaults = defaults or auto_defaults
    limits = limits or auto_limits
    out_root = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="spatialid-serve-"))
    out_root.mkdir(parents=True, exist_ok=True)
    example_rows, example_labels = _example_rows(Path(example_dir) if example_dir is not None else None)
    tiny = bool(getattr(pipe, "is_tiny", False))
    model_label = model_name or (getattr(pipe, "model_info", None) or {}).get("model", "FLUX.1")
    gpu_lock = threading.Lock()
    errors: dict[str, str] = {}  # session -> last error message, for the status line
    identities = h.IdentityCache(maxsize=8)
    presets = h.preset_choices()

    with gr.Blocks(title="SpatialID", analytics_enabled=False) as demo:
        gr.Markdown(
            "# SpatialID\n"
            "Put a person into a FLUX.1 picture from one photo (PuLID-FLUX), and **see where the identity "
            "goes**: SpatialID confines it to the face region over the denoising steps. "
            f"Model: `{model_label}`."
        )
        if tiny:
            gr.Markdown(h.TINY_NOTICE, elem_id="tiny-notice")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                photos = gr.File(
                    label=f"Identity photos: one person, 1-{limits.max_photos} photos (JPEG, PNG, WebP; max {limits.max_upload_mb:g} MB each)",
                    file_count="multiple",
                    file_types=["image"],
                    elem_id="id-photos",
                    height=140,
                )
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder="portrait photo of a woman in a space suit, studio light",
                    lines=2,
                    elem_id="prompt",
                )
                preset = gr.Dropdown(
                    presets,
                    value=defaults.preset,
                    label="Where the identity goes (preset)",
                    elem_id="preset",
                )
                preset_text = gr.Markdown(h.preset_help(defaults.preset), elem_id="preset-help")
                compare = gr.Checkbox(
                    value=False,
                    label="Compare presets: also draw the same seed with other presets, side by side",
                    elem_id="compare",
                )
                compare_presets = gr.CheckboxGroup(
                    presets,
                    value=["pulid", "paper"],
                    label="Presets to compare",
                    visible=False,
                    elem_id="compare-presets",
                )
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                examples = gr.Examples(
                    examples=example_rows,
                    inputs=[photos, prompt],
                    example_labels=example_labels,
                    label="Examples: one click runs them (photos from scikit-image)",
                    cache_examples=False,
                    elem_id="examples",
                )
                with gr.Accordion("Settings", open=False):
                    negative_prompt = gr.Textbox(
                        label="Negative prompt (used when true CFG > 1)", lines=1, elem_id="negative-prompt"
                    )
                    id_weight = gr.Slider(
                        0, 3, value=defaults.id_weight, step=0.05, label="ID weight",
                        info="identity strength; 0 = plain FLUX", elem_id="id-weight",
                    )
                    start_step = gr.Slider(
                        0, limits.max_steps - 1, value=defaults.start_step, step=1, label="Start step",
                        info="first step with identity; 0 = all (PuLID suggests 4 for photos)", elem_id="start-step",
                    )
                    true_cfg = gr.Slider(
                        1, 10, value=defaults.true_cfg, step=0.1, label="True CFG",
                        info="1 = off; > 1 uses the negative prompt and doubles the time", elem_id="true-cfg",
                    )
                    steps = gr.Slider(1, limits.max_steps, value=defaults.steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=defaults.guidance, step=0.1, label="Guidance", elem_id="guidance")
                    with gr.Row():
                        width = gr.Slider(64, limits.max_side, value=defaults.width, step=16, label="Width", elem_id="width")
                        height = gr.Slider(64, limits.max_side, value=defaults.height, step=16, label="Height", elem_id="height")
                    with gr.Row():
                        seed = gr.Textbox(
                            value="random", label="Seed", info="a whole number, or 'random'", elem_id="seed"
                        )
                        num_images = gr.Slider(
                            1, limits.max_images, value=defaults.num_images, step=1, label="Images", elem_id="num-images"
                        )
            with gr.Column(scale=7):
                status = gr.Markdown("Upload a photo, write a prompt, press **Generate**.", elem_id="status")
                gallery = gr.Gallery(
                    label="Images", columns=2, fit_columns=False, height="auto", object_fit="contain", format="png",
                    interactive=False,
                    elem_id="images",
                )
                comparison = gr.Image(
                    label="Preset comparison (same seed)", type="filepath", format="png",
                    interactive=False, visible=False, elem_id="comparison",
                )
                gr.Markdown(
                    "**Where the identity went.** The final image, then the identity mask at an early, a middle "
                    "and a late denoising step drawn over it (yellow = full identity, dark = none). With the pulid "
                    "preset it is uniform; SpatialID starts from a centred blob, follows the face, then relaxes."
                )
                mask_picture = gr.Image(
                    label="Identity masks",
                    type="filepath", format="png", interactive=False, elem_id="mask-picture",
                )
                with gr.Row():
                    aligned_face = gr.Image(
                        label="Aligned face the encoder used", type="pil", format="png", interactive=False,
                        height=200, elem_id="aligned-face",
                    )
                    downloads = gr.File(
                        label="PNG downloads (settings inside: `spatialid info FILE`)", file_count="multiple",
                        interactive=False, elem_id="downloads", height=200,
                    )
                settings = gr.Textbox(
                    label="Settings", lines=6, max_lines=24, interactive=False, buttons=["copy"], elem_id="settings"
                )

        inputs = [
            photos, prompt, negative_prompt, preset, id_weight, start_step, true_cfg, steps,
            guidance, width, height, seed, num_images, compare, compare_presets,
        ]
        outputs = [gallery, comparison, mask_picture, aligned_face, downloads, settings, status]

        on_generate = _generate_fn(
            pipe, limits=limits, out_root=out_root, lock=gpu_lock, errors=errors, identities=identities
        )
        event_args = dict(
            fn=on_generate,
            inputs=inputs,
            outputs=outputs,
            concurrency_id="gpu",
            concurrency_limit=1,
            show_progress="full",
            show_progress_on=[gallery, mask_picture],
        )

        def chain(trigger: Any, **extra: Any) -> None:
            """status "working" -> generate -> on failure, the error also in the status line."""
            (
                trigger(_working, None, status, queue=False, api_visibility="private")
                .then(**event_args, **extra)
                .failure(_failed(errors), None, status, queue=False, api_visibility="private")
            )

        chain(generate.click, api_name="generate")
        chain(prompt.submit, api_visibility="private")
        chain(examples.load_input_event.then, api_visibility="private")
        preset.change(h.preset_help, preset, preset_text, queue=False, api_visibility="private")
        compare.change(
            lambda on: gr.update(visible=bool(on)), compare, compare_presets, queue=False, api_visibility="private"
        )

    demo.queue(default_concurrency_limit=1, max_size=64)
    demo._spatialid_allowed_paths = [str(out_root), str(Path(example_rows[0][0][0]).parent)]  # for launch()
    demo._spatialid_output_dir = out_root
    return demo


def launch(
    pipe: Any,
    *,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_mb: float = 20.0,
    output_dir: str | os.PathLike[str] | None = None,
    prevent_thread_lock: bool = False,
) -> Any:
    """Build the app and serve it (blocks until Ctrl-C unless ``prevent_thread_lock``)."""
    _, limits = h.defaults_for(pipe)
    limits = h.UILimits(**{**limits.__dict__, "max_upload_mb": float(max_upload_mb)})
    demo = build_app(pipe, model_name=model_name, output_dir=output_dir, limits=limits)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            max_file_size=f"{max_upload_mb:g}mb",
            allowed_paths=demo._spatialid_allowed_paths,
            footer_links=["api", "settings"],
            show_error=is_loopback(host),  # unexpected errors' text only for a local visitor
            quiet=False,
            ssr_mode=False,
            prevent_thread_lock=prevent_thread_lock,
            theme=_theme(),
            css=CSS,
        )
    except OSError as exc:  # port in use, address not on this machine
        raise SpatialIDError(
            f"cannot listen on {host}:{port} ({' '.join(str(exc).split())}); choose another --port or --host"
        ) from None
    return demo
