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
import difflib
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


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a typo costs one line and a suggestion, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"spatialid: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # The sub-command's leftovers reach the top parser as "unrecognized arguments": suggest the
        # closest option of that sub-command instead.
        ns, extras = super().parse_known_args(args, namespace)
        if extras and self.prog == "spatialid" and getattr(ns, "command", None):
            sub = _subparser(self, ns.command)
            if sub is not None:
                sub.error(_unknown_message(sub, extras))
        return ns, extras


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _unknown_message(sub: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    flags = [a for a in extras if a.startswith("-")] or list(extras)
    first = flags[0].split("=", 1)[0]
    known = [o for o in sub._option_string_actions if o.startswith("--")]
    close = difflib.get_close_matches(first, known, n=2, cutoff=0.6) if first.startswith("-") else []
    what = f"unrecognized argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}"
    return what + (f"; did you mean {' or '.join(close)}?" if close else "")


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str], command: str) -> set[str]:
    """The ``dest`` of every option given on the command line (so ``--from-png`` knows what wins).

    The sub-command's arguments are parsed once more with every default suppressed; what is left
    in the namespace was typed by the user, even when it equals the default.
    """
    sub = _subparser(parser, command)
    if sub is None or command not in argv:
        return set()
    tokens = list(argv)[list(argv).index(command) + 1 :]
    saved = [(a, a.default, a.required) for a in sub._actions]
    try:
        for action, _, _ in saved:
            action.default, action.required = argparse.SUPPRESS, False
        ns, _ = argparse.ArgumentParser.parse_known_args(sub, tokens, argparse.Namespace())
    except SystemExit:  # pragma: no cover - the first parse accepted the same tokens
        return set()
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
    return {a.dest for a in sub._actions if hasattr(ns, a.dest)}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    for sub in subparsers.choices.values():
        # Global flags also after the sub-command (`spatialid generate -q ...`); SUPPRESS keeps the
        # value given before it.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only print warnings and errors")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    args.explicit = explicit_flags(parser, argv, args.command)
    _configure_logging(args.quiet)
    from spatialid.errors import SpatialIDError

    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
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


EXIT_BROKEN_PIPE = 128 + 13  # as a Unix tool killed by SIGPIPE (`spatialid info FILE | head -1`)


def _closed_pipe() -> int:
    """The reader of stdout went away: stop quietly, as Unix tools do (no traceback, no message).

    stdout is pointed at /dev/null so that Python's final flush at exit does not complain again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass  # stdout is no file (tests, embedding): nothing will flush it at exit
    return EXIT_BROKEN_PIPE


def _one_line(exc: BaseException) -> str:
    """The message on one line, control characters (ANSI escapes from files' metadata) shown, not executed."""
    from spatialid.cli.cmd_info import _safe

    return _safe(" ".join(str(exc).split()) or type(exc).__name__)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
