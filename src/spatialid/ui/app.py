"""The Gradio app behind ``spatialid serve``: components, events, queue and launch settings.

Written for Gradio 6 (``theme``/``css`` are launch arguments there, ``api_visibility`` and
``footer_links`` replace older names). Everything that decides something lives in
:mod:`spatialid.ui.handlers`; the page's components are laid out in :mod:`spatialid.ui.page` and
wired in :mod:`spatialid.ui.events` (which turns :class:`~spatialid.errors.SpatialIDError` into a
one-line ``gr.Error`` popup); this module builds the app from them and serves it.

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
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlette.middleware import Middleware

from spatialid.errors import SpatialIDError
from spatialid.pipeline.settings import GenerationSettings
from spatialid.ui import handlers as h
from spatialid.ui._gradio import gr
from spatialid.ui.events import TOAST_SECONDS, PageState, initial_cost, storage_note, wire_events  # noqa: F401  (TOAST_SECONDS: importable from here too)
from spatialid.ui.network import ServerGuard, is_loopback
from spatialid.ui.page import PAGE_JS, build_page
from spatialid.ui.storage import DEFAULT_KEEP_HOURS, SERVE_PREFIX, ServeFiles

__all__ = ["CSS", "DEFAULT_QUEUE_SIZE", "build_app", "launch"]

#: Default ``--queue-size``: requests waiting for the GPU (each capped by ``--max-cost``).
DEFAULT_QUEUE_SIZE = 16

CSS = """
#tiny-notice { border-left: 4px solid #f59e0b; padding: 0.2em 0.6em; background: rgba(245,158,11,0.08); font-size: 0.85em; }
#status { min-height: 1.6em; }
#page-title h2 { margin: 0; }
#photo-help, #face-check { font-size: 0.85em; line-height: 1.3; }
#photo-help p, #face-check p { margin: 0; }
#downloads .file-name, #downloads td { white-space: nowrap; }
#active-mode, #storage-note, #cost, #people-message, #load-message, .range-refused { font-size: 0.85em; }
.range-refused { color: #b91c1c; }
#active-mode p, #storage-note p, #cost p { margin: 0; }
.caption-label { white-space: normal !important; overflow: visible !important; text-overflow: clip !important; }
.face-preview .grid-wrap { overflow-y: auto; overflow-x: hidden; }
[data-testid=upload-text] .prompt { white-space: normal !important; text-overflow: clip !important; text-align: center; }
#images .error, #mask-picture .error, #aligned-face .error, #downloads .error, #settings .error, #comparison .error { display: none; }
"""


def _theme() -> Any:
    """Gradio's default look; its fonts are files inside the gradio package (no Google Fonts call)."""
    return gr.themes.Default()


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
    local: bool = False,
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
    files = ServeFiles(
        _files_parent(), keep_hours=keep_outputs_hours, archive_dir=output_dir,
        visitor_upload_bytes=limits.visitor_upload_bytes, total_upload_bytes=limits.total_upload_bytes,
    )
    files.activate()  # before any component exists: Gradio reads its folder when one is created
    atexit.register(files.close)
    try:
        demo = _build(pipe, files, model_name, example_dir, limits, defaults, int(queue_size), local)
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
    local: bool = False,
) -> Any:
    example_rows = _example_rows(Path(example_dir) if example_dir is not None else files.examples_dir, defaults.steps)
    model_label = model_name or (getattr(pipe, "model_info", None) or {}).get("model", "FLUX.1")
    state = PageState(
        pipe, files, limits, defaults, example_rows,
        ready="Upload a photo, write a prompt, press **Generate** (or Enter in the prompt).",
        keep_history=local and files.archive_dir is not None,
    )
    with gr.Blocks(title="SpatialID", analytics_enabled=False) as demo:
        page = build_page(
            model_label=model_label, tiny=bool(getattr(pipe, "is_tiny", False)), limits=limits, defaults=defaults,
            example_rows=example_rows, example_labels=_example_labels(), ready=state.ready,
            storage_note=storage_note(files, local), cost_text=initial_cost(defaults, limits),
        )
        wire_events(demo, page, state)

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
    visitor_upload_mb: float | None = None,
    total_upload_mb: float | None = None,
    prevent_thread_lock: bool = False,
) -> Any:
    """Build the app and serve it; blocks until Ctrl-C or SIGTERM unless ``prevent_thread_lock``.

    The caps (``max_*``; None = the model's default, :func:`~spatialid.ui.handlers.defaults_for`)
    bound what one request may cost; ``auth`` (``[(user, password), ...]``) requires a login on every
    route but static files. ``visitor_upload_mb`` / ``total_upload_mb`` bound the uploads one visitor
    (a login, or an address) and all visitors may have stored at once (default 5x / 50x ``max_upload_mb``).
    The private folder is deleted when this returns (or at exit with ``prevent_thread_lock``:
    then call ``demo.close()`` and ``demo._spatialid_files.close()`` yourself).
    """
    _, limits = h.defaults_for(pipe)
    limits = limits.replace(
        max_upload_mb=float(max_upload_mb), max_steps=max_steps, max_images=max_images, max_side=max_side, max_cost=max_cost,
        lora_dir=None if lora_dir is None else str(Path(lora_dir).expanduser().resolve()),
        visitor_upload_mb=visitor_upload_mb, total_upload_mb=total_upload_mb,
    )
    demo = build_app(
        pipe, model_name=model_name, output_dir=output_dir, limits=limits, local=is_loopback(host) and not auth,
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
            js=PAGE_JS,  # typed slider values out of range: refused with a line, not silently clamped
            # in front of every route: the login everywhere but static files, the upload quota,
            # uploads held by the session whose event names them (network.ServerGuard)
            app_kwargs={"middleware": [Middleware(ServerGuard, files=files)]},
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
