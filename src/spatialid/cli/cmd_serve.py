"""``spatialid serve``: the web UI (Gradio) on this machine.

The model is loaded once, before the server starts listening, so the first visitor does not wait
for it and a broken model setup fails at the command line with a one-line error instead of in the
browser. The server listens on 127.0.0.1 unless ``--host`` names another address: anyone who can
reach that address can then use the GPU, so it is an explicit choice and the command warns.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from spatialid.cli.cmd_generate import add_model_arguments

__all__ = ["register", "run", "is_loopback", "check_port_free"]

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
    p.add_argument("--output-dir", default=None, help="folder for the PNGs offered as downloads (default: a temporary folder)")
    add_model_arguments(p)
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost')."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Fail now, with a one-line hint, if ``host:port`` cannot be bound (in use, or not our address)."""
    import socket

    from spatialid.errors import SpatialIDError

    try:
        infos = socket.getaddrinfo(host.strip().strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SpatialIDError(f"--host {host}: unknown address ({exc.strerror}); use 127.0.0.1 or an address of this machine") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise SpatialIDError(f"cannot listen on {host}:{port} ({reason}); choose another --port (or --host)") from None


def _check_args(args: argparse.Namespace) -> None:
    from spatialid.errors import SpatialIDError

    if not 0 < args.port < 65536:
        raise SpatialIDError(f"--port must be between 1 and 65535, got {args.port}")
    if not args.host.strip():
        raise SpatialIDError("--host is empty; use 127.0.0.1 (this machine) or an address of this machine")
    if not args.max_upload_mb > 0:
        raise SpatialIDError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from spatialid.errors import SpatialIDError

    _check_args(args)
    if importlib.util.find_spec("gradio") is None:
        raise SpatialIDError("the web UI needs Gradio, which is not installed; run: pip install 'spatialid[ui]'")
    check_port_free(args.host, args.port)  # before a model load that may take minutes

    from spatialid.ui.app import launch, load_pipeline

    if not is_loopback(args.host):
        print(
            f"spatialid: warning: listening on {args.host}: anyone who can reach this address can use "
            "the UI and this machine's GPU (there is no login). Use --host 127.0.0.1 to keep it local.",
            file=sys.stderr,
        )
    log.info("loading model %s ...", args.model)
    if args.model == "tiny":
        print(
            "spatialid: note: --model tiny uses random weights at toy size: the images are noise by design "
            "(it shows the whole path working)",
            file=sys.stderr,
        )
    pipe = load_pipeline(
        args.model,
        pulid=args.pulid,
        offload=args.offload,
        quantize=args.quantize,
        device=args.device,
        dtype=args.dtype,
        offline=args.offline,
        cache_dir=args.cache_dir,
    )
    launch(
        pipe,
        model_name=args.model,
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        output_dir=args.output_dir,
    )
    return 0
