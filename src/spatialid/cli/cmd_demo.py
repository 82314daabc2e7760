"""``spatialid demo``: the whole SpatialID path offline, in well under a minute on a laptop CPU.

Runs the tiny model (real FLUX / VAE / CLIP / T5 / PuLID architectures at toy size with random
weights: the pictures are noise by design) with scikit-image's astronaut photo as the identity,
and writes three pictures into one folder: the generated image, the comparison grid of presets
(pulid vs paper vs relaxed) and the mask-schedule picture. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from spatialid import defaults as D

__all__ = ["register", "run", "DEMO_PROMPT", "DEMO_PRESETS"]

_DEMO = D.size_steps("generate", tiny=True)  # the tiny model's own defaults

DEMO_PROMPT = "portrait of an astronaut, studio light"
DEMO_PRESETS = ("pulid", "paper", "relaxed")  # the grid shows the run's preset (relaxed) first, then the others


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline demo on the tiny model: image, preset comparison grid and mask picture",
        description=(
            "Run SpatialID end to end offline on the tiny random-weight model with scikit-image's astronaut "
            "photo as the identity. The images are noise by design (random weights); the demo shows every "
            "stage working: identity encoding, injection, mask schedule, comparison, PNG metadata."
        ),
    )
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=_DEMO.steps, help=f"denoising steps (default {_DEMO.steps})")
    p.add_argument(
        "--size", default=f"{_DEMO.width}x{_DEMO.height}", metavar="WxH",
        help=f"image size (default {_DEMO.width}x{_DEMO.height})",
    )
    p.add_argument("--id", dest="photo", default=None, metavar="PHOTO", help="use this photo instead of the astronaut")
    p.add_argument(
        "--model", choices=D.TINY_MODELS, default=D.TINY_MODEL,
        help="tiny (FLUX.1's architecture, default) or tiny-chroma (Chroma's), both at toy size with random weights",
    )
    p.set_defaults(func=run)


def _astronaut():  # -> PIL.Image.Image
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut())
    img.filename = "skimage.data.astronaut"  # type: ignore[attr-defined]
    return img


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from spatialid.app.job import GenerationJob, check_outputs, compare_order, run_job
    from spatialid.pipeline.settings import GenerationSettings, parse_size
    from spatialid.utils.io import check_writable

    width, height = parse_size(args.size)
    settings = GenerationSettings(
        prompt=DEMO_PROMPT, steps=args.steps, width=width, height=height, seed=args.seed
    ).check()
    out_dir = Path(args.out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        from spatialid.errors import SpatialIDError

        raise SpatialIDError(f"{out_dir}: exists and is not a folder; give --out a folder")
    check_writable(out_dir / "demo.png")

    if args.photo:
        from spatialid.utils.images import load_image

        photo = load_image(args.photo)
        photo_path = Path(args.photo).expanduser()
    else:
        photo = _astronaut()
        photo_path = out_dir / "astronaut.png"  # on disk, so the printed command reproduces the image

    from spatialid.app.job import record_input_paths

    job = GenerationJob(
        settings=settings,
        out=out_dir / "demo.png",
        masks=True,
        compare=list(DEMO_PRESETS),
        identity_files=[photo_path.name],
        identity_source="image",
        reference_image=photo,
        input_paths=record_input_paths(id_images=[str(photo_path)]),
        protected=(photo_path,),  # earlier demos are kept (demo-2.png, ...), as generate keeps its images
    )
    check_outputs(job, reserve=False)
    print(
        "spatialid demo: tiny model with random weights -- the pictures are noise by design; "
        "they show every stage of the pipeline working offline.",
        file=sys.stderr,
    )
    if not args.photo and not photo_path.is_file():
        from spatialid.utils.io import atomic_path

        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(photo_path) as tmp:
            photo.save(tmp, format="PNG")
    from spatialid.app.loading import Models, ModelSpec

    pipe = Models(ModelSpec(model=getattr(args, "model", D.TINY_MODEL), device="cpu")).pipeline()
    pipe.set_progress_bar_config(disable=bool(getattr(args, "quiet", False)), desc="denoising", leave=False)
    identity = pipe.encode_identity(photo)
    result = run_job(pipe, job, identity, extra_settings={"device": "cpu", "demo": True})
    elapsed = time.perf_counter() - started
    order = " | ".join(compare_order(settings.preset, DEMO_PRESETS))
    labels = {result.images[0]: "image", result.compare: f"comparison grid, left to right: {order}"}
    for path in result.files:
        kind = labels.get(path, "mask schedule (early / mid / late steps)")
        print(f"{path}  ({kind})")
    print(f"spatialid demo: done in {elapsed:.1f} s (wall time); inspect settings with: spatialid info {result.images[0]}")
    return 0
