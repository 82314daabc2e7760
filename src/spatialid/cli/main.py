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
import contextlib
import difflib
import errno
import importlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from spatialid import __version__

# Order shown in --help.
SUBCOMMANDS = ("generate", "encode", "info", "demo", "bench", "eval", "merge", "serve")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + 15  # as a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, systemd) raised in the main thread, as Ctrl-C raises KeyboardInterrupt.

    A KeyboardInterrupt, so every ``except BaseException`` clean-up that SIGINT runs (the output
    names a job reserved are released, temporary files removed) runs for SIGTERM too: no empty or
    partial image is left under its final name.
    """


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while a command runs; a second Ctrl-C quits at once.

    Python raises KeyboardInterrupt only between bytecodes, so a long torch operation (one attention
    of a 4096x4096 image on a CPU runs for minutes) delays the first Ctrl-C until it returns. The
    signal's wake-up byte reaches a watcher thread at once, though: it says that the run stops after
    the current operation and, on a second Ctrl-C, removes the job's unwritten (empty) output names
    and exits with 130. The old handlers are restored after the command.
    """
    import signal
    import threading

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        before = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (embedded use): keep the default
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):  # pragma: no cover - not the main thread
        old_wakeup = None
    threading.Thread(target=_watch_interrupts, args=(read_fd,), daemon=True, name="spatialid-ctrl-c").start()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        if old_wakeup is not None:
            signal.set_wakeup_fd(old_wakeup)
        os.close(write_fd)  # ends the watcher (it reads EOF)


def _watch_interrupts(read_fd: int) -> None:
    import signal

    presses = 0
    try:
        while True:
            data = os.read(read_fd, 64)
            if not data:
                return
            presses += data.count(bytes([signal.SIGINT]))
            if presses == 1 and signal.SIGINT in data:
                os.write(2, b"\nspatialid: stopping at the next step (Ctrl-C again quits at once)\n")
            elif presses >= 2:
                from spatialid.app.job import release_unwritten

                release_unwritten()
                os.write(2, b"spatialid: interrupted\n")
                os._exit(EXIT_INTERRUPTED)
    finally:
        os.close(read_fd)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a typo costs one line and a suggestion, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"spatialid: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # The sub-command's leftovers reach the top parser as "unrecognized arguments": suggest the
        # closest option of that sub-command instead.
        if self.prog == "spatialid":
            _options_before_command(self, list(sys.argv[1:] if args is None else args))
        ns, extras = super().parse_known_args(args, namespace)
        if extras and self.prog == "spatialid" and getattr(ns, "command", None):
            sub = _subparser(self, ns.command)
            if sub is not None:
                argv = list(sys.argv[1:] if args is None else args)
                sub.error(_repeat_message(sub, argv, extras) or _unknown_message(sub, extras))
        return ns, extras


_GLOBAL_OPTIONS = ("-h", "--help", "--version", "--debug", "-q", "--quiet")


def _options_before_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``spatialid --model tiny generate``: say that a sub-command's options go after it (argparse says
    "invalid choice: 'tiny'")."""
    command = next((i for i, a in enumerate(argv) if a in SUBCOMMANDS), None)
    if command is None:
        return
    early = [a for a in argv[:command] if a.startswith("-") and a.split("=", 1)[0] not in _GLOBAL_OPTIONS]
    if early:
        rest = " ".join(argv[:command] and [a for a in argv[:command] if a not in _GLOBAL_OPTIONS])
        parser.error(f"{early[0]} is an option of `spatialid {argv[command]}`: put it after the sub-command, "
                     f"e.g. spatialid {argv[command]} {rest} ...")


def _repeat_message(sub: argparse.ArgumentParser, argv: list[str], extras: Sequence[str]) -> str | None:
    """``--id a.png b.png``: the second value of a one-value flag; say to repeat the flag (or quote a text)."""
    first = extras[0]
    if first.startswith("-") or first not in argv:
        return None
    index = argv.index(first)
    flag = next((argv[i] for i in range(index - 1, -1, -1) if argv[i].startswith("-")), None)
    action = sub._option_string_actions.get(flag.split("=", 1)[0]) if flag else None
    if action is None or action.nargs not in (None, "?"):
        return None
    values = [a for a in extras if not a.startswith("-")]
    if isinstance(action, argparse._AppendAction):
        example = " ".join(f"{flag} {v}" for v in [argv[index - 1], *values][:3])
        return f"{flag} takes one value; repeat {flag} for each: {example}"
    return f"{flag} takes one value, got more ({' '.join(values)}); quote a value with spaces: {flag} \"...\""


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
        with _stop_signals():
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except Terminated:
        print("spatialid: stopped (SIGTERM); nothing half-written was kept", file=sys.stderr)
        return EXIT_TERMINATED
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
    except RuntimeError as exc:  # pathlib's expanduser on "~nosuchuser/...", from any of the path flags
        if args.debug or "home directory" not in str(exc):
            raise
        print("spatialid: error: a path starts with ~NAME, and no user NAME exists here; write the path out in full",
              file=sys.stderr)
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
