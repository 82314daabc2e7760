"""Small offline benchmark inputs and a model-free generator, for tests and for trying the bench.

:func:`write_sample_inputs` writes two identity photos made from scikit-image's astronaut photo
(the original, female, and a mirrored close crop labelled male so that both ``{person}`` words are
exercised) and a prompts file in IBench's formats. :class:`HashGenerator` draws a deterministic
noise picture from an item's prompt, seed, preset and embedding: it stands in for a model where
only the bench mechanics (resume, shards, merge, failures) are under test.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spatialid.bench.grid import BenchItem

__all__ = ["HashGenerator", "SAMPLE_PROMPTS", "hash_encoder", "write_sample_inputs"]

SAMPLE_PROMPTS = [
    {
        "prompt": "portrait of a {person} in a red jacket, city street at night [scene]",
        "prompt_attr": ["clothing", "scene"],
        "prompt_style": ["photo"],
    },
    {
        "prompt": "a {person} reading a book in a library, oil painting [style] [long]",
        "prompt_attr": ["action"],
        "prompt_style": ["painting"],
    },
    {
        "prompt": "close-up photo of a {person} wearing glasses, snow mountain background",
        "prompt_attr": ["accessory", "scene"],
        "prompt_style": ["photo"],
    },
]


def write_sample_inputs(folder: str | os.PathLike[str], *, relative: bool = True) -> tuple[Path, Path]:
    """Write ``ids.json``, ``prompts.json`` and two photos into ``folder``; returns the two JSON paths."""
    from skimage import data

    root = Path(folder)
    (root / "photos").mkdir(parents=True, exist_ok=True)
    astronaut = data.astronaut()
    Image.fromarray(astronaut).save(root / "photos" / "astronaut.png")
    # A second identity photo: mirrored and cropped closer to the face (dlib still finds it).
    Image.fromarray(np.ascontiguousarray(astronaut[0:320, ::-1][:, 96:416])).save(root / "photos" / "astronaut_mirror.png")
    ids = [
        {"id": "photos/astronaut.png" if relative else str((root / "photos" / "astronaut.png").resolve()), "gender": "female"},
        {"id": "photos/astronaut_mirror.png" if relative else str((root / "photos" / "astronaut_mirror.png").resolve()), "gender": "male"},
    ]
    ids_path = root / "ids.json"
    prompts_path = root / "prompts.json"
    ids_path.write_text(json.dumps({"datas": ids}, indent=2), encoding="utf-8")
    prompts_path.write_text(json.dumps({"datas": SAMPLE_PROMPTS}, indent=2), encoding="utf-8")
    return ids_path, prompts_path


def _digest(*parts: Any) -> int:
    h = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")


def hash_encoder(photo: Path) -> Any:
    """A fake identity encoder: a [1, 4, 8] tensor derived from the photo's bytes."""
    import torch

    seed = _digest(hashlib.sha256(Path(photo).read_bytes()).hexdigest())
    g = torch.Generator().manual_seed(seed % (2**63))
    return torch.randn(1, 4, 8, generator=g)


class HashGenerator:
    """Deterministic fake ``generate_fn``: noise seeded by (prompt, seed, preset, embedding).

    Baselines depend on prompt and seed only, like a real model without identity. ``calls`` lists
    the keys generated, so tests can count work done.
    """

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self.calls: list[str] = []

    def __call__(self, item: BenchItem, embedding: Any) -> Image.Image:
        self.calls.append(item.key)
        emb = "" if embedding is None else f"{float(embedding.sum()):.6f}"
        rng = np.random.default_rng(_digest(item.prompt_text, item.seed, item.preset, emb))
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))
