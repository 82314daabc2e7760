"""Shared test fixtures. Everything runs offline on CPU with small random-weight models.

The expensive inputs are built once per test session and shared by every test file that needs them:
the tiny pipeline (with and without its identity encoder), the tiny identity encoder and the
astronaut's embedding, the photos, a random identity file, the sample bench inputs and the tiny model
written as a diffusers folder. They are shared, so tests treat them as read-only: write outputs to
``tmp_path``, copy a folder before damaging it. The session checks that at its end (the files and the
pipelines' weights are fingerprinted when built and compared when the session closes), so a test
that changes one fails loudly instead of silently changing what later tests see.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
# A copy of the project's shared reference (../shared/reference/), kept here so a clone runs it.
LAYOUT_FILE = DATA / "pulid_flux_checkpoint_layout.json"


# ----------------------------------------------------------------------------- guards


def _folder_fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _weights_fingerprint(pipe: Any) -> str:
    """One hash over every tensor of the pipeline's modules (FLUX components, IDFormer, CA modules)."""
    import torch

    digest = hashlib.sha256()
    for name, module in sorted(pipe.components.items()):
        if isinstance(module, torch.nn.Module):
            for key, tensor in module.state_dict().items():
                digest.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _shared_folder(folder: Path) -> Iterator[Path]:
    """Yield ``folder``; at the end of the session, fail if a test changed, added or removed a file."""
    before = _folder_fingerprint(folder)
    yield folder
    after = _folder_fingerprint(folder)
    assert after == before, f"a test changed the shared folder {folder}: copy it to tmp_path before changing it"


def _shared_pipe(pipe: Any, what: str) -> Iterator[Any]:
    before = _weights_fingerprint(pipe)
    yield pipe
    assert _weights_fingerprint(pipe) == before, f"a test changed the weights of the shared {what}"


# ----------------------------------------------------------------------------- reference data


@pytest.fixture(scope="session")
def pulid_layout_doc() -> dict[str, Any]:
    """The whole reference document (``about``, ``num_tensors``, ``num_parameters``, ``tensors``)."""
    return json.loads(LAYOUT_FILE.read_text())


@pytest.fixture(scope="session")
def pulid_layout() -> dict[str, list[int]]:
    """Tensor name -> shape of the published PuLID-FLUX checkpoint (tests/data, from the shared reference)."""
    return json.loads(LAYOUT_FILE.read_text())["tensors"]


# ----------------------------------------------------------------------------- photos


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Read-only photos: ``astronaut.png`` (skimage's, 512x512, one face), ``mirrored.png`` (the same,
    mirrored) and ``coffee.png`` (skimage's coffee cup shrunk to 150x100: no face; small because a photo
    without a face also runs dlib's CNN detector, ~1.5 s at full size on a CPU, ~0.4 s at this size)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    astronaut = data.astronaut()
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(folder / "mirrored.png")
    Image.fromarray(data.coffee()).resize((150, 100), Image.BICUBIC).save(folder / "coffee.png")
    yield from _shared_folder(folder)


@pytest.fixture(scope="session")
def astronaut(photo_dir: Path) -> Path:
    """The astronaut photo (read-only, see ``photo_dir``)."""
    return photo_dir / "astronaut.png"


# ----------------------------------------------------------------------------- identities


@pytest.fixture(scope="session")
def embeds_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``me.safetensors``: an identity file of random tiny-model tokens (seed 0), read-only."""
    import torch

    from spatialid.encoder.embedding import IdentityEmbedding
    from spatialid.models.configs import TINY_PULID

    g = torch.Generator().manual_seed(0)
    shape = (1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim)
    emb = IdentityEmbedding(tokens=torch.randn(shape, generator=g), uncond_tokens=torch.randn(shape, generator=g))
    path = emb.save(tmp_path_factory.mktemp("embeds") / "me.safetensors")
    for _ in _shared_folder(path.parent):
        yield path


@pytest.fixture(scope="session")
def tiny_encoder() -> Any:
    """``IdentityEncoder.tiny(seed=0)`` (dlib + tiny EVA02 + tiny IDFormer), shared: do not move or cast it."""
    from spatialid.encoder import IdentityEncoder

    return IdentityEncoder.tiny(seed=0)


@pytest.fixture(scope="session")
def astronaut_embedding(tiny_encoder: Any) -> Any:
    """The tiny encoder's embedding of skimage's astronaut (the array, as ``encode(data.astronaut())``)."""
    from skimage import data

    return tiny_encoder.encode(data.astronaut())


# ----------------------------------------------------------------------------- pipelines


def _tiny_pipeline(**kwargs: Any) -> Any:
    from spatialid.pipeline.pipeline_spatialid import SpatialIDPipeline

    pipe = SpatialIDPipeline.tiny(seed=0, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe() -> Iterator[Any]:
    """``SpatialIDPipeline.tiny(seed=0)`` with its identity encoder, progress bars off, shared by the session.

    Run it, build the UI's img2img / inpainting variants on it (they share its weights), serve it;
    do not change its weights, dtype, device, adapters or progress-bar setting (build your own for that).
    Like the web UI's tests always did, it caps torch at 2 threads (from its first use on).
    """
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield from _shared_pipe(_tiny_pipeline(), "tiny_pipe")


@pytest.fixture(scope="session")
def tiny_pipe_plain() -> Iterator[Any]:
    """``SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False)``, progress bars off; same rules as ``tiny_pipe``."""
    yield from _shared_pipe(_tiny_pipeline(with_identity_encoder=False), "tiny_pipe_plain")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_pipe_plain: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny model on disk, read-only: ``flux/`` (a diffusers FluxPipeline folder) and
    ``pulid.safetensors`` (PuLID's official single-file layout)."""
    import diffusers

    from spatialid.models import save_pulid_checkpoint

    root = tmp_path_factory.mktemp("weights")
    diffusers.FluxPipeline(**tiny_pipe_plain.flux_components).save_pretrained(root / "flux")
    save_pulid_checkpoint(tiny_pipe_plain.idformer, tiny_pipe_plain.ca_modules, root / "pulid.safetensors")
    yield from _shared_folder(root)


# ----------------------------------------------------------------------------- bench


@pytest.fixture(scope="session")
def bench_inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """``write_sample_inputs``' folder, read-only: ``(root, ids.json, prompts.json)`` with ``root/photos/``
    holding ``astronaut.png`` and ``astronaut_mirror.png``."""
    from spatialid.bench.samples import write_sample_inputs

    root = tmp_path_factory.mktemp("bench_inputs")
    ids_json, prompts_json = write_sample_inputs(root)
    for folder in _shared_folder(root):
        yield folder, ids_json, prompts_json


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Toy-size ops: one thread is ~10x faster than several fighting over 2 shared cores.

    Use it per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
