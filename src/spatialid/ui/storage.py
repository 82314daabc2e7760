"""The files ``spatialid serve`` writes and serves: one private folder per server, one per session.

Gradio serves, to anyone who asks for the path, every file under ``allowed_paths`` and every file
under its upload folder (``GRADIO_TEMP_DIR``, by default the shared, predictable ``/tmp/gradio``).
So the server never names a folder the operator chose; instead :class:`ServeFiles` creates a
fresh folder with an unguessable name that only this user can open (0700, ``mkdtemp``), makes
it Gradio's upload and cache folder, and writes everything it serves inside it:

- ``s/<token>/``: one folder per browser session (``token``: 144 random bits, never the session
  id the client chose), one sub-folder per click; deleted when the session ends (tab closed);
- the visitors' uploads (Gradio's own content-hashed folders);
- ``examples/``: the example photos, written at start-up (no cache shared between runs).

Everything except the examples is deleted once older than the retention time (``--keep-outputs``,
hours), and the whole folder when the server exits (Ctrl-C or SIGTERM); a folder left by a killed
server is removed by the next start. ``--output-dir`` only receives *copies* of the PNGs, which
are kept and never served. Nothing here imports Gradio.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spatialid.errors import SpatialIDError

__all__ = ["DEFAULT_KEEP_HOURS", "SERVE_PREFIX", "ServeFiles", "private_dir", "remove_stale_roots"]

log = logging.getLogger("spatialid.serve")

SERVE_PREFIX = "spatialid-serve-"
DEFAULT_KEEP_HOURS = 1.0
_PID_FILE = ".pid"
_SESSIONS = "s"
_EXAMPLES = "examples"
_EMPTY_DIR_GRACE_S = 60.0  # an empty folder younger than this may be an upload in progress
_UPLOAD_GRACE_S = 3.0  # a closed session's uploads wait this long: the same photo may be arriving for another visitor


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` as a folder only this user can use (0700), or check an existing one.

    An existing folder is used only when it is a real folder (not a symlink), owned by this user
    and writable by nobody else; its mode is then tightened to 0700. Anything else (a folder or a
    symlink another local user planted at a predictable name) raises a one-line error instead of
    being followed.
    """
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    uid = os.getuid() if hasattr(os, "getuid") else None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise SpatialIDError(f"{folder} is a symlink or not a folder; refusing to use it (delete it, or set SPATIALID_CACHE)")
    if uid is not None and info.st_uid != uid:
        raise SpatialIDError(f"{folder} belongs to another user (uid {info.st_uid}); refusing to use it (delete it, or set SPATIALID_CACHE)")
    if info.st_mode & 0o022:
        raise SpatialIDError(
            f"{folder} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}); refusing to use it (chmod 700 it)"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, another user's (or we cannot tell): leave it alone
    return True


def remove_stale_roots(parent: str | os.PathLike[str]) -> list[Path]:
    """Delete server folders under ``parent`` left by a server of this user that no longer runs.

    A server killed with SIGKILL cannot clean up; its folder names its process in ``.pid``. Only
    real folders owned by this user whose process is gone are removed.
    """
    removed: list[Path] = []
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(SERVE_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid):
                continue
            pid = int((Path(entry.path) / _PID_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


@dataclass
class _Session:
    folder: Path
    last_used: float
    uploads: set[Path] = field(default_factory=set)


class ServeFiles:
    """The private folder of one server: sessions, uploads, examples, retention and clean-up.

    ``parent`` is where the folder is created (default: the system temp folder); ``keep_hours``
    is how long a written or uploaded file stays; ``archive_dir`` (``--output-dir``) receives a
    copy of every PNG, kept and never served.
    """

    def __init__(
        self,
        parent: str | os.PathLike[str] | None = None,
        *,
        keep_hours: float = DEFAULT_KEEP_HOURS,
        archive_dir: str | os.PathLike[str] | None = None,
        visitor_upload_bytes: int | None = None,
        total_upload_bytes: int | None = None,
    ) -> None:
        if not keep_hours > 0:
            raise SpatialIDError(f"--keep-outputs must be > 0 hours, got {keep_hours:g}")
        base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        remove_stale_roots(base)
        self.root = Path(tempfile.mkdtemp(prefix=SERVE_PREFIX, dir=base)).resolve()  # 0700, fresh
        (self.root / _PID_FILE).write_text(f"{os.getpid()}\n")
        self.sessions_dir = self.root / _SESSIONS
        self.sessions_dir.mkdir(mode=0o700)
        self.examples_dir = self.root / _EXAMPLES
        self.keep_seconds = float(keep_hours) * 3600.0
        self.archive_dir = Path(archive_dir).expanduser() if archive_dir is not None else None
        self._sessions: dict[str, _Session] = {}
        # the upload quota (None: unbounded): stored upload -> (visitor, bytes counted)
        self.visitor_upload_bytes = visitor_upload_bytes
        self.total_upload_bytes = total_upload_bytes
        self._uploaded: dict[Path, tuple[str, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved_env: dict[str, str | None] | None = None
        self.closed = False

    # ------------------------------------------------------------------ Gradio's folders

    def activate(self) -> None:
        """Make this folder Gradio's upload/cache folder (before any component is built: Gradio
        reads ``GRADIO_TEMP_DIR`` when a component is created and on every request)."""
        if self._saved_env is None:
            self._saved_env = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE")}
        os.environ["GRADIO_TEMP_DIR"] = str(self.root)
        os.environ["GRADIO_EXAMPLES_CACHE"] = str(self.root / "cached-examples")

    def _restore_env(self) -> None:
        if self._saved_env is None:
            return
        for key, value in self._saved_env.items():
            if os.environ.get(key, "").startswith(str(self.root)):
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self._saved_env = None

    # ------------------------------------------------------------------ sessions

    def session_dir(self, key: str) -> Path:
        """The folder of session ``key`` (created on first use; its name is random, not ``key``)."""
        with self._lock:
            now = time.time()
            session = self._sessions.get(key)
            if session is None:
                session = _Session(self.sessions_dir / secrets.token_urlsafe(18), now)
                self._sessions[key] = session
            session.last_used = now
            session.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            return session.folder

    def note_uploads(self, key: str, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Remember the uploads a session holds, to delete them when it ends (only files in here).

        Called on upload, not only on Generate: Gradio stores uploads by content hash, so two
        visitors with the same photo share one file, and the one who leaves first must see that
        the other holds it.
        """
        with self._lock:
            session = self._sessions.get(key)
            if session is None:  # the folder itself is made on first use (session_dir)
                session = _Session(self.sessions_dir / secrets.token_urlsafe(18), time.time())
                self._sessions[key] = session
            for p in paths:
                path = Path(os.path.abspath(p))
                # outputs (sessions' folders) and the examples are never an upload to delete
                if self._inside(path) and not path.is_relative_to(self.examples_dir) and not path.is_relative_to(self.sessions_dir):
                    session.uploads.add(path)

    # ------------------------------------------------------------------ upload quota

    def upload_refusal(self, visitor: str, incoming: int) -> str | None:
        """One line refusing an upload of ``incoming`` bytes by ``visitor``, or None when it fits.

        ``visitor`` is who uploads (a login name, or the address without a login: an upload carries
        no session id). Counted: the uploads of the last ``--keep-outputs`` hours still on disk.
        """
        with self._lock:
            for attempt in range(2):
                mine = sum(n for who, n in self._uploaded.values() if who == visitor)
                total = sum(n for _, n in self._uploaded.values())
                over_visitor = self.visitor_upload_bytes is not None and mine + incoming > self.visitor_upload_bytes
                over_total = self.total_upload_bytes is not None and total + incoming > self.total_upload_bytes
                if not (over_visitor or over_total):
                    return None
                if attempt == 0:  # files may have gone since (a tab closed): count again what is there
                    self._uploaded = {p: v for p, v in self._uploaded.items() if p.exists()}
        mb = 2**20
        if over_visitor:
            return (
                f"upload refused: your uploads on this server already take {mine / mb:.1f} MB, and this one "
                f"({incoming / mb:.1f} MB) would pass the limit of {self.visitor_upload_bytes / mb:g} MB per visitor; "
                "close tabs you no longer use, or wait for old uploads to expire"
            )
        return (
            f"upload refused: this server's uploads take {total / mb:.1f} MB, and this one ({incoming / mb:.1f} MB) "
            f"would pass its limit of {self.total_upload_bytes / mb:g} MB; try again later"
        )

    def record_uploads(self, visitor: str, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Count stored uploads against ``visitor`` (a file stored twice, by content hash, counts once)."""
        with self._lock:
            for p in paths:
                path = Path(os.path.abspath(p))
                if path in self._uploaded or not self._inside(path):
                    continue
                with contextlib.suppress(OSError):
                    self._uploaded[path] = (visitor, max(os.lstat(path).st_size, 1))

    def _forget_upload(self, path: Path) -> None:
        with self._lock:
            self._uploaded.pop(path, None)

    def end_session(self, key: str) -> None:
        """Delete a session's outputs, and its uploads unless another live session uses them."""
        with self._lock:
            session = self._sessions.pop(key, None)
            if session is None:
                return
        shutil.rmtree(session.folder, ignore_errors=True)
        if session.uploads:
            # Later, not now, and only those no live session holds then: another visitor may be
            # uploading the same photo (same content-hashed path) this moment, before their upload
            # event has registered it.
            timer = threading.Timer(_UPLOAD_GRACE_S, self._remove_unheld_uploads, [session.uploads, time.time()])
            timer.daemon = True
            timer.start()

    def _held_uploads(self) -> set[Path]:
        """Uploads some live session holds (call with the lock held)."""
        return set().union(*(s.uploads for s in self._sessions.values()))

    def _remove_unheld_uploads(self, uploads: set[Path], ended: float = math.inf) -> None:
        """Delete the uploads nobody holds, except those written again after the session ``ended``.

        Gradio moves every new upload onto its content-hashed name, so a file newer than the end
        is another visitor's upload of the same photo whose upload event has not registered it
        yet; deleting it would break their page (the retention sweep takes it if nobody claims it).
        """
        with self._lock:
            if self.closed:
                return
            held = self._held_uploads()
        for path in uploads - held:
            with contextlib.suppress(OSError):
                if path.stat().st_mtime > ended:
                    continue
            self._remove_upload(path)

    def _remove_upload(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()
        self._forget_upload(path)
        parent = path.parent
        if parent != self.root and parent.parent == self.root:  # Gradio's <hash>/ folder
            with contextlib.suppress(OSError):
                parent.rmdir()

    def _inside(self, path: Path) -> bool:
        try:
            return path.is_relative_to(self.root) and path != self.root
        except ValueError:
            return False

    # ------------------------------------------------------------------ retention

    def sweep(self, now: float | None = None) -> int:
        """Delete what is older than the retention time (examples excepted); return files deleted.

        Sessions unused for that long are forgotten with their folder; age is taken from the
        newer of a file's mtime and ctime (Gradio's cache copies keep the source's mtime).
        """
        now = time.time() if now is None else now
        deadline = now - self.keep_seconds
        with self._lock:
            expired = [k for k, s in self._sessions.items() if s.last_used < deadline]
            folders = [self._sessions.pop(k).folder for k in expired]
            live = {s.folder for s in self._sessions.values()}
        removed = 0
        for folder in folders:
            removed += sum(len(names) for _, _, names in os.walk(folder))
            shutil.rmtree(folder, ignore_errors=True)
        keep = {self.root, self.sessions_dir, self.examples_dir, self.root / _PID_FILE}
        for top, dirs, files in os.walk(self.root, topdown=False, followlinks=False):
            here = Path(top)
            if here == self.examples_dir or self.examples_dir in here.parents:
                continue
            for name in files:
                path = here / name
                if path in keep:
                    continue
                try:
                    info = os.lstat(path)
                    if max(info.st_mtime, info.st_ctime) < deadline:
                        os.unlink(path)
                        self._forget_upload(path)
                        removed += 1
                except OSError:
                    continue
            if here in keep or here in live:
                continue
            try:
                info = os.lstat(here)
                if max(info.st_mtime, info.st_ctime) < now - min(self.keep_seconds, _EMPTY_DIR_GRACE_S):
                    os.rmdir(here)  # only when empty
            except OSError:
                continue
        return removed

    def start_sweeper(self, interval: float | None = None) -> None:
        """Sweep in a daemon thread every ``interval`` s (default: a tenth of the retention, 1-60 s)."""
        if self._thread is not None:
            return
        every = interval if interval is not None else min(60.0, max(1.0, self.keep_seconds / 10))

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    self.sweep()
                except Exception:  # pragma: no cover - never let the sweeper die silently
                    log.exception("cleaning old web UI files failed")

        self._thread = threading.Thread(target=loop, name="spatialid-serve-sweeper", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the rest

    def archive(self, files: Sequence[str | os.PathLike[str]]) -> list[Path]:
        """Copy one click's PNGs to ``--output-dir`` (kept, never served); [] without one."""
        if self.archive_dir is None or not files:
            return []
        first = Path(files[0])
        target = self.archive_dir / first.parent.name  # the click's folder name: time + random
        target.mkdir(parents=True, exist_ok=True)
        from spatialid.utils.io import atomic_write_bytes

        return [atomic_write_bytes(target / Path(f).name, Path(f).read_bytes()) for f in files]

    def disk_usage(self) -> int:
        """Bytes in the folder (files only), for tests and the log."""
        total = 0
        for top, _, files in os.walk(self.root, followlinks=False):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(top, name)).st_size
        return total

    def close(self) -> None:
        """Stop the sweeper, delete the whole folder and give Gradio its folders back (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
        self._restore_env()
