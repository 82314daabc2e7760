"""Where the identity encoder's real weights come from and where they go for offline use.

Offline layout (``models_dir``: ``$SPATIALID_MODELS_DIR``, default ``~/.cache/spatialid/models``)::

    <models_dir>/
      antelopev2/
        scrfd_10g_bnkps.onnx         16.9 MB  insightface detector    (hf: DIAMONIK7777/antelopev2)
        glintr100.onnx               261 MB   ArcFace recognition     (hf: DIAMONIK7777/antelopev2)
      facexlib/
        detection_Resnet50_Final.pth  104 MB  RetinaFace-R50 detector (github: xinntao/facexlib v0.1.0)
        parsing_bisenet.pth            53 MB  BiSeNet face parser     (github: xinntao/facexlib v0.2.0)
      eva-clip/
        open_clip_model.safetensors   856 MB  EVA02-CLIP-L-14-336 (hf: timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k)
        (or EVA02_CLIP_L_336_psz14_s6B.pt, 856 MB, hf: QuanSun/EVA-CLIP: the same weights as a pickle)

Hugging Face files may instead sit in the Hugging Face cache (``huggingface-cli download REPO FILE``);
they are downloaded there automatically when online. facexlib's ``.pth`` files are pickles: they are
opened with ``torch.load(weights_only=True)`` only (tensors and plain containers; never arbitrary
objects). When a file is absent and downloading is off, :class:`ModelFilesMissingError` lists every
missing file with its source and the folder to put it in.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from spatialid.errors import ModelFilesMissingError
from spatialid.utils.offline import is_offline

__all__ = [
    "ModelFile",
    "ANTELOPE_DETECTOR",
    "ANTELOPE_RECOGNIZER",
    "FACEXLIB_DETECTOR",
    "FACEXLIB_PARSER",
    "EVA_WEIGHTS",
    "EVA_WEIGHTS_ORIGINAL",
    "default_models_dir",
    "offline_mode",
    "find_local",
    "fetch",
    "missing_files_error",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFile:
    """One weights file: its local place and where to get it."""

    key: str
    filename: str
    subdir: str  # folder under models_dir
    size: str  # approximate, for messages
    repo_id: str | None = None  # Hugging Face hub source
    url: str | None = None  # direct download source

    @property
    def source(self) -> str:
        if self.repo_id:
            return f"https://huggingface.co/{self.repo_id} (file {self.filename})"
        return str(self.url)

    def how_to_get(self, models_dir: Path) -> str:
        target = models_dir / self.subdir
        if self.repo_id:
            return (
                f"{self.subdir}/{self.filename} (~{self.size}) from {self.source}: "
                f"`huggingface-cli download {self.repo_id} {self.filename} --local-dir {target}`"
            )
        return f"{self.subdir}/{self.filename} (~{self.size}) from {self.url}: download it into {target}/"


ANTELOPE_DETECTOR = ModelFile("antelopev2_detector", "scrfd_10g_bnkps.onnx", "antelopev2", "17 MB", repo_id="DIAMONIK7777/antelopev2")
ANTELOPE_RECOGNIZER = ModelFile("antelopev2_recognizer", "glintr100.onnx", "antelopev2", "261 MB", repo_id="DIAMONIK7777/antelopev2")
FACEXLIB_DETECTOR = ModelFile(
    "facexlib_detector", "detection_Resnet50_Final.pth", "facexlib", "104 MB",
    url="https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
)
FACEXLIB_PARSER = ModelFile(
    "facexlib_parser", "parsing_bisenet.pth", "facexlib", "53 MB",
    url="https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
)
EVA_WEIGHTS = ModelFile(
    "eva", "open_clip_model.safetensors", "eva-clip", "856 MB",
    repo_id="timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k",
)
EVA_WEIGHTS_ORIGINAL = ModelFile("eva_original", "EVA02_CLIP_L_336_psz14_s6B.pt", "eva-clip", "856 MB", repo_id="QuanSun/EVA-CLIP")


def default_models_dir() -> Path:
    """``$SPATIALID_MODELS_DIR`` or ``~/.cache/spatialid/models``."""
    env = os.environ.get("SPATIALID_MODELS_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/spatialid/models").expanduser()


def offline_mode(local_files_only: bool | None) -> bool:
    """The one offline rule (:func:`spatialid.utils.offline.is_offline`)."""
    return is_offline(local_files_only)


def find_local(spec: ModelFile, models_dir: Path, override: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The file if present locally: ``override`` (file or folder), ``models_dir/subdir``, HF cache."""
    candidates: list[Path] = []
    if override is not None:
        p = Path(override).expanduser()
        candidates += [p] if p.suffix else [p / spec.filename, p / spec.subdir / spec.filename]
    candidates.append(models_dir / spec.subdir / spec.filename)
    for c in candidates:
        if c.is_file():
            return c
    if spec.repo_id and override is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(spec.repo_id, spec.filename, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
        except Exception:  # pragma: no cover - cache probing must never be fatal
            pass
    return None


def fetch(spec: ModelFile, models_dir: Path, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Download ``spec`` (hub: into the HF cache or ``cache_dir``; URL: into ``models_dir``).

    Returns None when the download fails (the caller reports every missing file at once).
    """
    try:
        if spec.repo_id:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec.repo_id, spec.filename, cache_dir=cache_dir))
        if spec.url:
            from torch.hub import download_url_to_file

            target = models_dir / spec.subdir / spec.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            logger.info("downloading %s from %s", spec.filename, spec.url)
            download_url_to_file(spec.url, str(target), progress=False)  # writes to a temp file, then renames
            return target
    except Exception as exc:
        logger.warning("could not download %s (%s: %s)", spec.filename, type(exc).__name__, exc)
    return None


def missing_files_error(missing: list[ModelFile], models_dir: Path, offline: bool) -> ModelFilesMissingError:
    why = "downloading is off (offline mode)" if offline else "they could not be downloaded"
    items = "; ".join(spec.how_to_get(models_dir) for spec in missing)
    return ModelFilesMissingError(
        f"identity-encoder weights missing and {why}: {items} "
        f"(or pass --models-dir / models_dir=... pointing at a folder with this layout)"
    )
