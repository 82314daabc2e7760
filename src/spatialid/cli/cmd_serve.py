"""``spatialid serve``: the web UI (Gradio) on this machine.

The model is loaded once, before the server starts listening, so the first visitor does not wait
for it and a broken model setup fails at the command line with a one-line error instead of in the
browser. The server listens on 127.0.0.1 unless ``--host`` names another address: anyone who can
reach that address can then use the GPU, so it is an explicit choice and the command warns (and
says whether ``--auth`` / ``--auth-file`` requires a login). What one request may cost is capped
(``--max-steps``, ``--max-images``, ``--max-side``, ``--max-cost``, ``--queue-size``); what the
server writes is deleted after ``--keep-outputs`` hours and at exit. See docs/security.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from spatialid import defaults as D
from spatialid.cli.options import add_model_arguments, add_speed_arguments, model_spec
from spatialid.ui.network import check_port_free, host_warning, parse_auth

__all__ = ["register", "run"]

log = logging.getLogger("spatialid.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="start the web UI (Gradio) on this machine",
        description=(
            "Start the SpatialID web UI. The model loads once at start-up; one generation runs at a "
            "time and other visitors wait in a queue that shows their place. Listens on 127.0.0.1 "
            "unless --host says otherwise. '--model tiny' needs no download (random weights: its "
            "images are noise by design; it shows the whole path working)."
        ),
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default 127.0.0.1: this machine only; anything else is reachable by others and prints a warning)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default 7860)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted photo upload in MB (default 20)")
    p.add_argument(
        "--visitor-upload-mb", type=float, default=None,
        help="upload bytes one visitor (login, or address without one) may hold at once (default 5 x --max-upload-mb)",
    )
    p.add_argument(
        "--total-upload-mb", type=float, default=None,
        help="upload bytes all visitors may hold at once (default 50 x --max-upload-mb)",
    )
    p.add_argument(
        "--output-dir", default=None,
        help="also keep a copy of every PNG here (never served, never deleted; default: ./outputs on 127.0.0.1 "
        "without a login, none on a shared address or with --auth/--auth-file; 'none': keep none)",
    )
    access = p.add_argument_group("access and limits (docs/security.md)")
    access.add_argument(
        "--auth", action="append", metavar="USER:PASS", default=None,
        help="require a login (repeatable); visible in 'ps': prefer --auth-file",
    )
    access.add_argument(
        "--auth-file", metavar="FILE", default=None,
        help="require a login: FILE holds one USER:PASS per line (# comments); must not be world-readable",
    )
    access.add_argument("--max-steps", type=int, default=None, help="most denoising steps per request (default 50)")
    access.add_argument("--max-images", type=int, default=None, help="most images per request (default 4)")
    access.add_argument("--max-side", type=int, default=None, help="largest width or height in px (default 2048; tiny model 512)")
    access.add_argument(
        "--max-cost", type=float, default=None,
        help="most a request may cost, in default requests: steps x (images + compared presets) x pixels x 2 with true CFG, relative to the form's defaults (default 10)",
    )
    access.add_argument("--queue-size", type=int, default=None, help="most requests waiting for the GPU (default 16)")
    access.add_argument(
        "--lora-dir", default=None, metavar="DIR",
        help="offer the LoRA .safetensors files of DIR in the page (visitors name them; no other path or hub id). Default: LoRAs off",
    )
    access.add_argument(
        "--keep-outputs", type=float, default=None, metavar="HOURS",
        help="delete served outputs and uploads after this many hours (default 1; also when a visitor's tab closes, and at exit)",
    )
    add_model_arguments(p)
    add_speed_arguments(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    from spatialid.errors import SpatialIDError

    if not 0 < args.port < 65536:
        raise SpatialIDError(f"--port must be between 1 and 65535, got {args.port}")
    if not args.host.strip():
        raise SpatialIDError("--host is empty; use 127.0.0.1 (this machine) or an address of this machine")
    for flag in ("max_upload_mb", "visitor_upload_mb", "total_upload_mb"):
        value = getattr(args, flag, None)
        if value is not None and not 0 < value < float("inf"):
            raise SpatialIDError(f"--{flag.replace('_', '-')} must be > 0 (a finite number of MB), got {value}")
    for small, large in (("max_upload_mb", "visitor_upload_mb"), ("visitor_upload_mb", "total_upload_mb")):
        a, b = getattr(args, small, None), getattr(args, large, None)
        if a is not None and b is not None and b < a:
            raise SpatialIDError(f"--{large.replace('_', '-')} ({b:g}) is below --{small.replace('_', '-')} ({a:g}); "
                                 "no upload could fit: raise it")
    for flag, low in (("max_steps", 1), ("max_images", 1), ("max_side", 64), ("queue_size", 1)):
        value = getattr(args, flag, None)
        if value is not None and value < low:
            raise SpatialIDError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    max_side = getattr(args, "max_side", None)
    if max_side is not None and max_side % 16:
        raise SpatialIDError(f"--max-side must be a multiple of 16 (FLUX draws 16x16-pixel patches), got {max_side}")
    lora_dir = getattr(args, "lora_dir", None)
    if lora_dir is not None and not Path(lora_dir).expanduser().is_dir():
        raise SpatialIDError(f"--lora-dir {lora_dir} is not a folder; give the folder that holds the LoRA .safetensors files")
    max_cost = getattr(args, "max_cost", None)
    if max_cost is not None and not max_cost > 0:
        raise SpatialIDError(f"--max-cost must be > 0, got {max_cost:g}")
    keep = getattr(args, "keep_outputs", None)
    if keep is not None and not keep * 60 >= 1:  # shorter: files could go before the visitor downloads them
        raise SpatialIDError(f"--keep-outputs must be at least 1/60 hour (one minute), got {keep:g}")


class _DropLines(io.TextIOBase):
    """A stdout that forwards everything but lines containing ``marker`` (whole lines are judged)."""

    def __init__(self, target: io.TextIOBase, marker: str) -> None:
        self._target, self._marker, self._pending = target, marker, ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        kept = [line + "\n" for line in lines if self._marker not in line]
        if kept:
            self._target.write("".join(kept))
        return len(text)

    def flush(self) -> None:
        if self._pending and self._marker not in self._pending:
            self._target.write(self._pending)
            self._pending = ""
        self._target.flush()

    def isatty(self) -> bool:
        return self._target.isatty()


@contextlib.contextmanager
def no_share_hint() -> Iterator[None]:
    """Hide Gradio's "To create a public link, set `share=True` in `launch()`" line.

    ``Blocks.launch`` prints it whenever ``share`` is off and ``quiet`` is not set; sharing through
    gradio.live is no option of ``spatialid serve`` (the server must not be exposed by a side door),
    and ``quiet=True`` would also hide the local URL, so only that line is dropped.
    """
    original = sys.stdout
    sys.stdout = _DropLines(original, "share=True")
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = original


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from spatialid.errors import SpatialIDError

    from spatialid.cli.prechecks import model_name_error

    problem = model_name_error(args.model)  # `--model tny`: a suggestion at once, not a hub error after a wait
    if problem:
        raise SpatialIDError(problem)
    _check_args(args)
    logins = parse_auth(args.auth, args.auth_file)  # a bad auth file fails before the model loads
    if importlib.util.find_spec("gradio") is None:
        raise SpatialIDError("the web UI needs Gradio, which is not installed; run: pip install 'spatialid[ui]'")
    check_port_free(args.host, args.port)  # before a model load that may take minutes

    from spatialid.app.loading import Models
    from spatialid.ui.app import DEFAULT_QUEUE_SIZE, launch
    from spatialid.ui.storage import DEFAULT_KEEP_HOURS

    warning = host_warning(args.host, len(logins))
    if warning:
        print(f"spatialid: {warning}", file=sys.stderr)
    log.info("loading model %s ...", args.model)
    if args.model in D.TINY_MODELS:
        print(
            f"spatialid: note: --model {args.model} uses random weights at toy size: the images are noise by design "
            "(it shows the whole path working)",
            file=sys.stderr,
        )
    pipe = Models(model_spec(args).check()).pipeline()
    pipe.set_progress_bar_config(disable=True)  # the page shows progress; keep the server log clean
    with no_share_hint():
        _launch(launch, pipe, args, logins, DEFAULT_QUEUE_SIZE, DEFAULT_KEEP_HOURS)
    return 0


def default_output_dir(host: str, logins: object = None) -> str | None:
    """A server on the loopback address keeps every result (settings inside each PNG) in ./outputs, as
    Fooocus and A1111 do, and says where; a shared one (another address, or a login: a proxy in front)
    keeps only its private folder, deleted per tab."""
    from spatialid.ui.network import is_loopback

    if not is_loopback(host) or logins:
        return None
    path = Path("outputs").resolve()
    print(f"spatialid: keeping every result, its settings inside, in {path} (--output-dir DIR to change)", file=sys.stderr)
    return str(path)


def _launch(launch, pipe, args: argparse.Namespace, logins, default_queue: int, default_keep: float) -> None:
    launch(
        pipe,
        model_name=args.model,
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        output_dir=(None if args.output_dir == "none" else args.output_dir) if args.output_dir is not None
        else default_output_dir(args.host, logins),
        auth=logins or None,
        max_steps=args.max_steps,
        max_images=args.max_images,
        max_side=args.max_side,
        max_cost=args.max_cost,
        lora_dir=args.lora_dir,
        queue_size=args.queue_size if args.queue_size is not None else default_queue,
        keep_outputs_hours=args.keep_outputs if args.keep_outputs is not None else default_keep,
        visitor_upload_mb=getattr(args, "visitor_upload_mb", None),
        total_upload_mb=getattr(args, "total_upload_mb", None),
    )
