"""Where the web UI listens and who may use it: loopback detection, an early port check, logins,
and :class:`ServerGuard`, the gate in front of every route of the running server.

No Gradio needed: the ``serve`` command checks all of this before a model load that may take
minutes, so a typo fails in a second with one line. The guard is plain ASGI: it reads Gradio's
login tokens from the app it guards, not from Gradio's code.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import json
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spatialid.errors import SpatialIDError

if TYPE_CHECKING:
    from spatialid.ui.storage import ServeFiles

__all__ = [
    "PUBLIC_PATHS",
    "PUBLIC_PREFIXES",
    "ServerGuard",
    "check_port_free",
    "host_warning",
    "is_loopback",
    "parse_auth",
    "read_auth_file",
]


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


# ----------------------------------------------------------------------------- the gate in front of every route

#: What anyone may fetch when a login is required: the page (which then shows the login form), the
#: login itself and Gradio's static files, and ``startup-events`` (Gradio's own start-up probe; it
#: starts the queue once and answers ``true``). Everything else answers 401 until the visitor logs in.
PUBLIC_PATHS = frozenset({
    "/", "/login", "/login/", "/logout", "/favicon.ico", "/manifest.json", "/robots.txt", "/theme.css",
    "/gradio_api/theme.css", "/gradio_api/startup-events",
})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")

_UPLOAD_PATH = "/gradio_api/upload"
# where events arrive, their inputs (uploaded files' paths included) in a JSON body
_EVENT_PREFIXES = ("/gradio_api/queue/join", "/gradio_api/run/", "/gradio_api/call/", "/gradio_api/api/")
_EVENT_BODY_LIMIT = 8 * 2**20  # larger bodies are passed on unread (no form of ours sends one)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def is_public(path: str) -> bool:
    """True for the routes :class:`ServerGuard` lets through without a login."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


async def _respond(send: Send, status: int, body: Any) -> None:
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    kind = b"text/plain; charset=utf-8" if isinstance(body, str) else b"application/json"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _file_paths(value: Any, found: list[str]) -> list[str]:
    """Every ``{"path": ...}`` in an event's inputs (Gradio's FileData, an image editor's parts)."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str):
            found.append(value["path"])
        for item in value.values():
            _file_paths(item, found)
    elif isinstance(value, list):
        for item in value:
            _file_paths(item, found)
    return found


class ServerGuard:
    """ASGI middleware in front of all of Gradio's routes (``launch(app_kwargs={"middleware": ...})``).

    - **Login.** With ``--auth``/``--auth-file``, every route except :data:`PUBLIC_PATHS` and
      :data:`PUBLIC_PREFIXES` (static files, the login) answers 401 to a visitor who has not
      logged in. Gradio itself leaves some routes open (``/gradio_api/heartbeat/<session>``, whose
      end deletes that session's files, ``/cancel``, ``/stream``, ...); the guard closes them all,
      including any a later Gradio adds.
    - **Upload quota.** ``POST /gradio_api/upload`` must say its size (Content-Length) and is
      refused (413, one line) when the visitor's stored uploads, or everyone's, would pass
      :meth:`ServeFiles.upload_refusal`'s limits; what was stored is counted afterwards.
    - **Held uploads.** Every uploaded file an event names (photos, init image, mask, a PNG to load
      settings from) is registered as held by that event's session *before* Gradio reads it, so
      another session that ends never deletes a file this one still uses.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], files: ServeFiles | None = None) -> None:
        self.app = app
        self.files = files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path") or "/")
        required, user = await self._login(scope)
        if required and user is None and not is_public(path):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            message = getattr(_blocks(scope), "auth_message", None)
            await _respond(send, 401, {"detail": {"error": "Not authenticated", "auth_message": message}})
            return
        method = scope.get("method", "GET")
        if self.files is not None and method == "POST" and path.rstrip("/") == _UPLOAD_PATH:
            await self._upload(scope, receive, send, user or f"address {(scope.get('client') or ('?',))[0]}")
            return
        if self.files is not None and method == "POST" and path.startswith(_EVENT_PREFIXES):
            receive = await self._hold_inputs(receive)
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope) -> tuple[bool, str | None]:
        """(whether this server requires a login, the logged-in user or None), as Gradio decides it."""
        app = scope.get("app")
        dependency = getattr(app, "auth_dependency", None)
        if getattr(app, "auth", None) is None and dependency is None:
            return False, None
        from starlette.requests import Request

        request = Request(scope)
        if dependency is not None:
            user = dependency(request)
            if inspect.isawaitable(user):
                user = await user
            return True, user
        cookie_id = getattr(app, "cookie_id", "")
        token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(f"access-token-unsecure-{cookie_id}")
        return True, getattr(app, "tokens", {}).get(token) if token else None

    async def _upload(self, scope: Scope, receive: Receive, send: Send, visitor: str) -> None:
        assert self.files is not None
        headers = dict(scope.get("headers") or [])
        try:
            size = int(headers.get(b"content-length", b""))
        except ValueError:
            await _respond(send, 411, "upload refused: send the upload with its size (a Content-Length header)")
            return
        refusal = self.files.upload_refusal(visitor, size)
        if refusal is not None:
            await _respond(send, 413, refusal)
            return
        status: list[int] = []
        chunks: list[bytes] = []

        async def keep(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            elif message["type"] == "http.response.body" and sum(map(len, chunks)) < 2**20:
                chunks.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, keep)  # returns after Gradio's background move into its folders
        if status and status[0] == 200:
            with contextlib.suppress(ValueError, TypeError):
                stored = json.loads(b"".join(chunks))
                self.files.record_uploads(visitor, [p for p in stored if isinstance(p, str)])

    async def _hold_inputs(self, receive: Receive) -> Receive:
        """Read the event's body, register its files with its session, and hand the body on unchanged."""
        assert self.files is not None
        messages: list[dict[str, Any]] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if not message.get("more_body") or size > _EVENT_BODY_LIMIT:
                break
        if size <= _EVENT_BODY_LIMIT:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                body = json.loads(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request"))
                paths = _file_paths(body.get("data"), [])
                if paths:
                    session = body.get("session_hash")
                    key = session if isinstance(session, str) and session else f"api-{secrets.token_hex(8)}"
                    self.files.note_uploads(key, paths)

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        return replay


def _blocks(scope: Scope) -> Any:
    app = scope.get("app")
    with contextlib.suppress(Exception):
        return app.get_blocks()  # type: ignore[union-attr]
    return None
