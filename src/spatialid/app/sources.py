"""Where a LoRA or ControlNet named by a user comes from, checked before anything loads (no torch).

One check for ``--lora`` (the command line's early checks and ``ModelSpec.check``) and the web UI's
LoRA list, so every front-end refuses the same inputs with the same line.
"""

from __future__ import annotations

import os
from typing import Any

from spatialid import defaults as D
from spatialid.errors import SpatialIDError

__all__ = ["check_lora_files", "in_hub_cache", "looks_local"]


def looks_local(source: str) -> bool:
    """A LoRA/ControlNet source names a local path (else it is a hub id)."""
    from pathlib import Path

    path = Path(os.path.expanduser(source))  # never raises: Path.expanduser does for "~nosuchuser"
    return (path.exists() or source.startswith(("/", "./", "../", "~"))
            or path.suffix.lower() in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"))


def in_hub_cache(repo_id: str, cache_dir: str | os.PathLike[str] | None) -> bool:
    """Whether a hub repository has anything in the local Hugging Face cache (read from the folder names only)."""
    from pathlib import Path

    from huggingface_hub.constants import HF_HUB_CACHE

    folder = Path(cache_dir or HF_HUB_CACHE).expanduser() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


def check_lora_files(loras: Any, *, offline: bool = False, cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Each ``FILE_OR_HUB_ID[:SCALE]``: a finite scale within the bound; a local file must be a
    ``.safetensors`` LoRA (first bytes and header keys, no torch); a hub id must be in the local
    cache when ``offline`` (else it is checked when it loads).

    Shared by ``--lora`` (before torch is imported, and again in ``ModelSpec.check``) and the web
    UI's LoRA list, so all refuse the same inputs before anything loads.
    """
    import math
    from pathlib import Path

    from spatialid.loaders.names import parse_lora
    from spatialid.utils.weights import read_safetensors_header, sniff_safetensors

    for text in loras:
        source, scale = parse_lora(text)
        if not math.isfinite(scale) or abs(scale) > D.MAX_LORA_SCALE:
            raise SpatialIDError(f"--lora {text}: the scale must be a number between -{D.MAX_LORA_SCALE:g} and "
                                 f"{D.MAX_LORA_SCALE:g} (beyond it a LoRA only breaks the image), got {scale:g}")
        if not looks_local(source):
            if offline and not in_hub_cache(source, cache_dir):
                raise SpatialIDError(f"--lora {source}: this hub LoRA is not available offline (not in the Hugging "
                                     f"Face cache); download it on a connected machine with `hf download {source}`, "
                                     "or give a .safetensors file")
            continue  # a hub id: checked when it loads
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise SpatialIDError(f"--lora {source}: no such LoRA file")
        # first bytes, with a LoRA's fix (a pickle is no LoRA; PuLID's download hint would mislead)
        fix = "give a FLUX.1 LoRA saved as .safetensors"
        sniff_safetensors(path, fix, name=f"--lora {source}: this file")
        if path.suffix.lower() != ".safetensors":
            raise SpatialIDError(f"--lora {source}: not a .safetensors LoRA file; give the LoRA's .safetensors file")
        header = read_safetensors_header(path, fix, name=f"--lora {source}: this file")
        if not any("lora" in key.lower() for key in header if key != "__metadata__"):
            raise SpatialIDError(f"--lora {source}: no LoRA weights in this file (no lora_A/lora_B or lora_down/lora_up keys)")
