"""Where the web UI listens and who may use it: loopback detection, an early port check, logins.

No Gradio needed: the ``serve`` command checks all of this before a model load that may take
minutes, so a typo fails in a second with one line.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from spatialid.errors import SpatialIDError

__all__ = ["check_port_free", "host_warning", "is_loopback", "parse_auth", "read_auth_file"]


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


def _credential(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    user = user.strip()
    if not sep or not user or not password:
        raise SpatialIDError(f"{where}: expected USER:PASS (a user name, a colon, a password), got {_masked(text)!r}")
    return user, password


def _masked(text: str) -> str:
    """Never echo a password back: keep what is left of the first colon."""
    user, sep, _ = text.partition(":")
    return f"{user}:***" if sep else (text[:2] + "***" if len(text) > 2 else "***")


def read_auth_file(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The logins in ``path``: one ``USER:PASS`` per line; blank lines and ``#`` comments skipped.

    Refuses a file every user of this machine can read or write (the passwords would be public
    on a shared machine) with a one-line error that says the fix (``chmod 600``).
    """
    file = Path(path).expanduser()
    try:
        info = file.stat()
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpatialIDError(f"--auth-file {path}: no such file (one USER:PASS per line)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpatialIDError(f"--auth-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if os.name == "posix" and info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise SpatialIDError(
            f"--auth-file {path} is readable or writable by every user of this machine "
            f"(mode {stat.S_IMODE(info.st_mode):o}); run: chmod 600 {path}"
        )
    logins = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            logins.append(_credential(line, f"--auth-file {path} line {number}"))
    if not logins:
        raise SpatialIDError(f"--auth-file {path} holds no USER:PASS line")
    return logins


def parse_auth(values: Sequence[str] | None = None, auth_file: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """The logins from ``--auth USER:PASS`` (repeatable) and ``--auth-file FILE``; [] = no login.

    A user name given twice is an error (which password would win is not obvious).
    """
    logins = [_credential(v, "--auth") for v in values or []]
    if auth_file is not None:
        logins += read_auth_file(auth_file)
    seen: set[str] = set()
    for user, _ in logins:
        if user in seen:
            raise SpatialIDError(f"user {user!r} is given twice in --auth / --auth-file; keep one password per user")
        seen.add(user)
    return logins


def host_warning(host: str, logins: int) -> str | None:
    """The start-up warning for a host others can reach (None on loopback): says whether a login is required."""
    if is_loopback(host):
        return None
    if logins:
        return (
            f"warning: listening on {host}: anyone who can reach this address sees the login page "
            f"(a login is required; {logins} user{'s' if logins != 1 else ''}). Passwords and images travel "
            "unencrypted: put a reverse proxy with TLS in front (docs/security.md)."
        )
    return (
        f"warning: listening on {host}: anyone who can reach this address can use the UI and this "
        "machine's GPU (no login is required: add --auth-file FILE). Use --host 127.0.0.1 to keep it local."
    )
