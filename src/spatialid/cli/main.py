"""Entry point of the ``spatialid`` command.

Each sub-command lives in its own module ``spatialid.cli.cmd_<name>`` exposing
``register(subparsers) -> None`` (which adds the parser and sets ``func`` to a callable taking the
parsed arguments and returning an exit code). Modules are imported here only to build the parser;
they must keep heavy imports (torch, diffusers) inside their run functions so ``--help`` and
argument errors stay instant.

Errors caused by the user or the environment (:class:`spatialid.errors.SpatialIDError`) print as
one line ``spatialid: error: ...`` and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from spatialid import __version__

# Order shown in --help.
SUBCOMMANDS = ("generate", "encode", "info", "demo", "bench", "eval", "merge", "serve")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatialid",
        description="Identity-preserving FLUX.1 generation with SpatialID (spatially scheduled PuLID).",
    )
    parser.add_argument("--version", action="version", version=f"spatialid {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"spatialid.cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"spatialid.cli.cmd_{name}":
                continue  # sub-command not part of this build
            raise
        module.register(subparsers)
    return parser


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="spatialid: %(levelname)s: %(message)s",
    )
    # Third-party libraries are chatty at INFO; keep their warnings only.
    for noisy in ("diffusers", "transformers", "huggingface_hub", "timm", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _configure_logging(args.quiet)
    from spatialid.errors import SpatialIDError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("spatialid: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SpatialIDError as exc:
        if args.debug:
            raise
        print(f"spatialid: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        if args.debug:
            raise
        print(f"spatialid: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if args.debug or exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"spatialid: error: {exc.strerror or exc}{where}: {_ENVIRONMENT_ERRNOS[exc.errno]}", file=sys.stderr)
        return EXIT_USAGE


_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space (or choose another output folder) and run the same command again",
    errno.EDQUOT: "free some space within your quota and run the same command again",
    errno.EROFS: "the folder is on a read-only file system; choose another output folder",
}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
