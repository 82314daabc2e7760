"""Example identity photos for the web UI, taken from scikit-image's bundled test images.

scikit-image ships its sample pictures inside the package, so the examples work offline and
need no download. ``astronaut`` (Eileen Collins' NASA portrait, public domain) has a clear frontal
face and shows the whole path working; ``coffee`` (a cup, no person) shows the no-face message.
The photos are written as PNG files because Gradio's examples take file paths. ``spatialid serve``
writes them into its own private folder at start-up (:class:`spatialid.ui.storage.ServeFiles`),
so no cache shared between runs or users is ever served. An explicit cache folder is used only
when it is private (a real folder of this user that nobody else can write, see
:func:`spatialid.ui.storage.private_dir`), and files in it are read only when they are plain files,
never symlinks: a predictable ``/tmp`` name cannot be used to make the server follow a link.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EXAMPLES", "ExamplePhoto", "default_cache_dir", "write_example_photos"]


@dataclass(frozen=True)
class ExamplePhoto:
    """One clickable example: a skimage picture, the prompt to go with it, and settings tuned for it.

    The start step follows PuLID's advice: 4 for photo-realistic prompts (the layout settles
    before the identity comes in, so the picture stays natural), 0-1 for stylised ones (the style
    needs the identity from the start to carry the face).
    """

    photo: str  # skimage.data function name, also the file stem
    prompt: str
    label: str  # what the example shows
    preset: str = "relaxed"
    id_weight: float = 1.0
    start_step: int = 4

    @property
    def name(self) -> str:  # the photo file's stem (several examples may share a photo)
        return self.photo


EXAMPLES: tuple[ExamplePhoto, ...] = (
    ExamplePhoto(
        photo="astronaut",
        prompt="portrait photo of a woman wearing a space suit, studio light",
        label="photo",
        start_step=4,
    ),
    ExamplePhoto(
        photo="astronaut",
        prompt="oil painting portrait of a woman, impressionist, thick brush strokes",
        label="stylised",
        id_weight=1.2,
        start_step=1,
    ),
    ExamplePhoto(
        photo="coffee",
        prompt="portrait photo of a person reading a book in a cafe",
        label="no face (error)",
        preset="paper",
        start_step=4,
    ),
)


def default_cache_dir() -> Path:
    """``$SPATIALID_CACHE/ui-examples`` if set, else a per-user folder in the system temp dir.

    The temp-dir name is predictable, so :func:`write_example_photos` checks it before use.
    """
    root = os.environ.get("SPATIALID_CACHE")
    if root:
        return Path(root) / "ui-examples"
    user = os.environ.get("USER") or os.environ.get("USERNAME") or str(os.getuid() if hasattr(os, "getuid") else "")
    return Path(tempfile.gettempdir()) / f"spatialid-ui-examples-{user}"


def _plain_file(path: Path) -> bool:
    """A non-empty regular file, judged without following a symlink."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size > 0


def write_example_photos(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Write the example photos as PNGs (once; existing plain files are reused); return name -> path.

    The folder must be private (created 0700, or an existing one owned by this user and writable
    by nobody else; else a one-line :class:`~spatialid.errors.SpatialIDError`). A symlink where a
    photo should be is replaced, never followed. Files are written atomically so two servers
    starting at the same time never see a partial file. Paths are returned as written (inside the
    folder), not resolved.
    """
    import skimage.data
    from PIL import Image

    from spatialid.ui.storage import private_dir
    from spatialid.utils.io import atomic_save_image

    folder = private_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    folder = folder.parent.resolve() / folder.name  # an absolute path; the folder itself is not followed
    paths: dict[str, Path] = {}
    for example in EXAMPLES:
        if example.photo in paths:
            continue
        path = folder / f"{example.photo}.png"
        if not _plain_file(path):
            if os.path.lexists(path) and not os.path.isdir(path):
                os.unlink(path)  # a symlink or an empty file: never written through
            array = getattr(skimage.data, example.photo)()
            atomic_save_image(Image.fromarray(array).convert("RGB"), path, format="PNG")
        paths[example.photo] = path
    return paths
