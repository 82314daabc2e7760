"""Small offline benchmark inputs and a model-free generator, for tests and for trying the bench.

:func:`write_sample_inputs` writes two identity photos made from scikit-image's astronaut photo
(the original, female, and a mirrored close crop labelled male so that both ``{person}`` words are
exercised) and a prompts file in IBench's formats. :func:`write_ibench_inputs` lays the same photos
out as a miniature IBench checkout, with files in IBench's exact formats (an identities file of
absolute paths from another machine, a ``human_longer_template.json``-style prompts file with the
gender in the text, and an ``unsplash50_template.json``-style one with ``{person}`` and ``[...]``). :class:`HashGenerator` draws a deterministic
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

__all__ = [
    "HashGenerator",
    "IBENCH_FOREIGN_ROOT",
    "SAMPLE_PROMPTS",
    "hash_encoder",
    "write_ibench_inputs",
    "write_sample_inputs",
]

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


# Where IBench's identities file says its photos are (the machine it was made on).
IBENCH_FOREIGN_ROOT = "/home/gdli7/IBench"

# human_longer_template.json's form: num, gender written in the text, no {person}, no [...] notes.
_LONGER_PROMPTS = [
    "A solitary man, clad in a long, dark trench coat and a wide-brimmed hat, walks through a dimly lit alleyway.",
    "A woman stands in a cozy, sunlit kitchen, wearing a floral apron over a casual outfit.",
    "A young boy with tousled hair kneels in a sunlit garden, surrounded by vibrant blooms.",
    "A focused individual in a modern gym setting performs a leg exercise , wearing a black tank top.",
]
# unsplash50_template.json's form: "[portrait,]" notes and {person}.
_SHORT_PROMPTS = [
    ("[portrait,] a {person} wearing a spacesuit", "Clothing"),
    ("[portrait,]3D Animation, Disney style,cute,popmart blindbox", "Style"),
    ("[portrait,] an angry {person},old", "Attribute"),
]


def write_ibench_inputs(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write a miniature IBench checkout under ``folder/IBench`` in IBench's exact file formats.

    ``data/images/chineseid_images.json`` lists the two sample photos by absolute paths under
    :data:`IBENCH_FOREIGN_ROOT` (which do not exist here: ``--id-root`` must map them), with
    IBench's ``num``/``id``/``gender`` entries and ``tags``. Returns the paths by name: ``root``,
    ``ids``, ``longer`` (human_longer_template-style prompts) and ``short`` (unsplash50-style).
    """
    from skimage import data

    root = Path(folder) / "IBench"
    photos = root / "data" / "images" / "chineseid"
    prompts_dir = root / "data" / "prompts"
    photos.mkdir(parents=True, exist_ok=True)
    prompts_dir.mkdir(parents=True, exist_ok=True)
    astronaut = data.astronaut()
    # names and genders of the real file's first two entries (num 0 "R (9).jpg" male, num 3 "female2.jpg")
    Image.fromarray(np.ascontiguousarray(astronaut[0:320, ::-1][:, 96:416])).save(photos / "R (9).jpg", quality=95)
    Image.fromarray(astronaut).save(photos / "female2.jpg", quality=95)
    ids = {
        "datas": [
            {"num": 0, "id": f"{IBENCH_FOREIGN_ROOT}/data/images/chineseid/R (9).jpg", "gender": "male"},
            {"num": 1, "id": f"{IBENCH_FOREIGN_ROOT}/data/images/chineseid/female2.jpg", "gender": "female"},
        ],
        "tags": {"category": "imageid"},
    }
    longer = {
        "datas": [
            {"num": i, "prompt": text, "prompt_attr": ["long"], "prompt_style": ["human_longer"]}
            for i, text in enumerate(_LONGER_PROMPTS)
        ]
    }
    short = {
        "datas": [
            {"num": i, "prompt": text, "prompt_attr": ["short"], "prompt_style": [style]}
            for i, (text, style) in enumerate(_SHORT_PROMPTS)
        ],
        "tags": {"category": "imageid"},
    }
    paths = {
        "root": root,
        "ids": root / "data" / "images" / "chineseid_images.json",
        "longer": prompts_dir / "human_longer_template.json",
        "short": prompts_dir / "unsplash50_template.json",
    }
    paths["ids"].write_text(json.dumps(ids, indent=2), encoding="utf-8")
    paths["longer"].write_text(json.dumps(longer, indent=2), encoding="utf-8")
    paths["short"].write_text(json.dumps(short, indent=2), encoding="utf-8")
    return paths


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
        parts = embedding if isinstance(embedding, list) else [] if embedding is None else [embedding]  # a group: one per person
        emb = "|".join(f"{float(e.sum()):.6f}" for e in parts)
        rng = np.random.default_rng(_digest(item.prompt_text, item.seed, item.preset, emb))
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))
