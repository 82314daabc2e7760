"""SHA-256 of the tiny model's outputs for a fixed set of single-person text-to-image calls.

Used to show that a refactor keeps the images bit-identical: run it before and after (e.g. with
``PYTHONPATH=<old checkout>/src``) and compare the printed JSON. CPU, float32 (and one bf16 case).
"""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import torch


def _digest(images, masks=None) -> str:
    h = hashlib.sha256()
    for image in images:
        h.update(np.asarray(image).tobytes())
    for step in masks or []:
        h.update(step.masks.float().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="also write the hashes to this file")
    args = parser.parse_args()
    from skimage.data import astronaut

    from spatialid import SpatialIDPipeline

    torch.set_num_threads(1)
    pipe = SpatialIDPipeline.tiny(seed=0)
    pipe.set_progress_bar_config(disable=True)
    emb = pipe.encode_identity(astronaut())
    base = dict(prompt="a portrait", id_embeds=emb, height=128, width=96, num_inference_steps=6, seed=3)
    cases = {
        "pulid": dict(preset="pulid"),
        "paper": dict(preset="paper"),
        "relaxed": dict(preset="relaxed"),
        "entropy": dict(preset="entropy"),
        "prior-only": dict(preset="prior-only"),
        "attention-only": dict(preset="attention-only"),
        "no-relax": dict(preset="no-relax"),
        "paper-start2": dict(preset="paper", start_step=2),
        "paper-weight0.6": dict(preset="paper", id_weight=0.6),
        "paper-batch2": dict(preset="paper", num_images_per_prompt=2),
        "relaxed-truecfg": dict(preset="relaxed", true_cfg=3.0),
        "paper-masks": dict(preset="paper", return_masks=True),
        "pulid-masks": dict(preset="pulid", return_masks=True),
        "no-identity": dict(preset="paper", id_weight=0.0),
        "square-64": dict(preset="relaxed", height=64, width=64),
    }
    out = {}
    for name, extra in cases.items():
        kwargs = {**base, **extra}
        result = pipe(**kwargs)
        out[name] = _digest(result.images, result.masks)
    bf16 = SpatialIDPipeline.tiny(seed=0, dtype=torch.bfloat16)
    bf16.set_progress_bar_config(disable=True)
    result = bf16(**{**base, "preset": "paper", "id_embeds": bf16.encode_identity(astronaut())})
    out["bf16-paper"] = _digest(result.images)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
