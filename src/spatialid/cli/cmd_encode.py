"""``spatialid encode``: identity photo(s) -> identity tokens file, to generate many times from.

Encoding loads the face models, EVA-CLIP and the PuLID IDFormer but not FLUX, so it is the cheap
step; ``spatialid generate --id-embeds FILE`` then skips all face models. Photos are checked before
any model is loaded, and the output file is written atomically.

``--model tiny`` is the offline toy configuration (dlib faces, tiny random EVA02 and IDFormer from
``--seed``, default 0 = the weights ``generate --model tiny`` uses). Any other ``--model`` (a FLUX.1
id or folder, only recorded in the file) selects the real encoder, whose IDFormer comes from the
PuLID-FLUX checkpoint ``--pulid``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from spatialid import defaults as D
from spatialid.cli.options import model_spec

__all__ = ["register", "run"]

log = logging.getLogger("spatialid.encode")



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode",
        help="encode identity photo(s) into an identity file for `generate --id-embeds`",
        description=(
            "Detect and align the face in each --id photo, run the PuLID-FLUX identity encoder and write "
            "the identity tokens (and the unconditional tokens used by true CFG) to --out (.safetensors). "
            "Several --id photos must show the same person: their tokens are averaged. "
            "'--model tiny' runs offline with dlib and random weights (a toy; identity differs from PuLID's)."
        ),
    )
    p.add_argument("--id", dest="id_images", action="append", required=True, metavar="PHOTO",
                   help="photo of the person (repeat for several photos of the same person)")
    p.add_argument("--out", required=True, metavar="EMBEDS",
                   help="output identity file (.safetensors); an existing file is kept and the new one gets a "
                   "free numbered name (me-2.safetensors) unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--model", default=D.DEFAULT_FLUX_MODEL,
                   help="'tiny' for the offline toy encoder, else the FLUX.1 id/folder you will generate with "
                   f"(recorded in the file; default {D.DEFAULT_FLUX_MODEL})")
    p.add_argument("--pulid", default=None,
                   help="PuLID-FLUX weights (its IDFormer encodes the face): .safetensors file, folder or hub id "
                   f"(default {D.PULID_REPO_ID} {D.PULID_FILENAME})")
    p.add_argument("--eva", default=None,
                   help="EVA02-CLIP-L-14-336 weights: file, folder or hub id "
                   "(default timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k)")
    p.add_argument("--models-dir", default=None,
                   help="folder with the offline face/EVA weights layout (default $SPATIALID_MODELS_DIR or "
                   "~/.cache/spatialid/models): antelopev2/, facexlib/, eva-clip/")
    p.add_argument("--face-backend", choices=("auto", "facexlib", "dlib"), default="auto",
                   help="face alignment/parsing: facexlib as PuLID (auto: when installed), or the dlib fallback")
    p.add_argument("--debug-dir", default=None, metavar="DIR",
                   help="also write the aligned face, the parsing-masked face and the detection drawing as PNGs")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="EVA/IDFormer dtype (default: bfloat16 on GPU, float32 on CPU; tiny: float32)")
    p.add_argument("--seed", type=int, default=0,
                   help="tiny model only: seed of its random weights (default 0, as `generate --model tiny`)")
    p.add_argument("--offline", action="store_true", help="never download: use local files only (like HF_HUB_OFFLINE=1)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder for downloaded weights")
    p.set_defaults(func=run)


def _check_paths(args: argparse.Namespace) -> Path:
    from spatialid.errors import SpatialIDError
    from spatialid.utils.images import load_image

    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".safetensors":
        raise SpatialIDError(f"--out {out}: the identity file must end in .safetensors")
    if out.is_dir():
        raise SpatialIDError(f"--out {out} is a folder; give a file name ending in .safetensors")
    for photo in args.id_images:
        load_image(photo)  # fail on a bad photo before loading any model
    if args.debug_dir is not None and Path(args.debug_dir).is_file():
        raise SpatialIDError(f"--debug-dir {args.debug_dir} is a file; give a folder")
    return out


def run(args: argparse.Namespace) -> int:
    from spatialid.app.loading import Models

    from spatialid.cli.prechecks import model_name_error
    from spatialid.errors import SpatialIDError

    if model_name_error(args.model):  # `--model tny`: a suggestion, not a hub error
        raise SpatialIDError(model_name_error(args.model))
    out = _check_paths(args)
    spec = model_spec(args, tiny_seed=args.seed)
    if spec.is_tiny and spec.dtype == "auto":
        spec = spec.replace(dtype="float32")  # the tiny encoder runs in float32 on any device
    models = Models(spec.check())
    emb = models.encoder().encode(list(args.id_images))
    from spatialid.app.job import claim_output

    wanted, out = out, claim_output(out, overwrite=args.overwrite)  # named once the tokens exist
    if out != wanted:
        log.warning("%s exists: kept; the new identity file is %s (--overwrite replaces it)", wanted, out)
    emb.metadata["model"] = args.model
    if not spec.is_tiny:
        emb.metadata["pulid"] = args.pulid or D.PULID_REPO_ID
    try:
        emb.save(out)
    except BaseException:
        if out.is_file() and out.stat().st_size == 0:
            out.unlink()  # the claimed name, never written
        raise

    if args.debug_dir is not None:
        import io

        from spatialid.utils.io import atomic_write_bytes

        folder = Path(args.debug_dir).expanduser()
        for name, image in emb.debug_images.items():
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            atomic_write_bytes(folder / f"{name}.png", buf.getvalue())
        log.info("debug images written to %s", folder)

    x0, y0, x1, y1 = emb.face_box or (0, 0, 0, 0)
    photos = f"{emb.num_images} photo{'s' if emb.num_images != 1 else ''}"
    print(
        f"wrote {out} ({photos}, tokens {list(emb.tokens.shape)}, face {x1 - x0:.0f}x{y1 - y0:.0f} px "
        f"at ({x0:.0f}, {y0:.0f}), encoder {emb.metadata.get('encoder')})"
    )
    return 0
