"""Example identity photos for the web UI, taken from scikit-image's bundled test images.

scikit-image ships its sample pictures inside the package, so the examples work offline and
need no download. ``astronaut`` (Eileen Collins' NASA portrait, public domain) has a clear frontal
face and shows the whole path working; ``coffee`` (a cup, no person) shows the no-face message.
The photos are written once as PNG files into a cache folder because Gradio's examples take file
paths, and Gradio only serves files from folders it was told about.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EXAMPLES", "ExamplePhoto", "default_cache_dir", "write_example_photos"]


@dataclass(frozen=True)
class ExamplePhoto:
    """One clickable example: a skimage picture, the prompt to go with it, and what it shows."""

    name: str  # skimage.data function name, also the file stem
    prompt: str
    label: str  # shown in the examples row


EXAMPLES: tuple[ExamplePhoto, ...] = (
    ExamplePhoto(
        name="astronaut",
        prompt="portrait photo of a woman wearing a space suit, studio light",
        label="astronaut (a face: works)",
    ),
    ExamplePhoto(
        name="coffee",
        prompt="portrait photo of a person reading a book in a cafe",
        label="coffee cup (no face: shows the error)",
    ),
)


def default_cache_dir() -> Path:
    """``$SPATIALID_CACHE/ui-examples`` if set, else a per-user folder in the system temp dir."""
    root = os.environ.get("SPATIALID_CACHE")
    if root:
        return Path(root) / "ui-examples"
    user = os.environ.get("USER") or os.environ.get("USERNAME") or str(os.getuid() if hasattr(os, "getuid") else "")
    return Path(tempfile.gettempdir()) / f"spatialid-ui-examples-{user}"


def write_example_photos(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Write the example photos as PNGs (once; existing files are reused) and return name -> path.

    Files are written atomically so two servers starting at the same time never see a partial file.
    """
    import skimage.data
    from PIL import Image

    from spatialid.pipeline.metadata import atomic_save_image

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for example in EXAMPLES:
        path = folder / f"{example.name}.png"
        if not path.is_file() or path.stat().st_size == 0:
            array = getattr(skimage.data, example.name)()
            atomic_save_image(Image.fromarray(array).convert("RGB"), path, format="PNG")
        paths[example.name] = path.resolve()
    return paths
