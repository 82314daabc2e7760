"""Photo -> PuLID-FLUX identity tokens.

:class:`IdentityEncoder` reproduces PuLID-FLUX v0.9.x's ``get_id_embedding``:

1. identity vector: the raw 512-d ArcFace embedding of the largest face (insightface
   ``antelopev2``); when insightface finds no face, ArcFace of the aligned crop of step 2;
2. the face nearest the photo centre aligned onto the FFHQ 512 template (facexlib RetinaFace + 5
   points), parsed with BiSeNet; background classes painted white, the rest in grayscale;
3. EVA02-CLIP-L-14-336 on that image (bicubic 336, CLIP mean/std): L2-normalised class embedding
   (768) and the inputs of blocks 4, 8, 12, 16, 20 (five ``[1, 577, 1024]``);
4. ``tokens = IDFormer(cat(arcface, eva), hidden)`` -> ``[1, 32, 2048]``;
   ``uncond_tokens = IDFormer(zeros, zeros)`` (PuLID's negative for true CFG).

Several photos of one person: tokens are averaged (and the uncond tokens, identical anyway).

Two configurations:

* :meth:`IdentityEncoder.from_pretrained`: the real models (see :mod:`spatialid.encoder.model_files`
  for the files and offline layout). When facexlib or its weights are absent, detection/alignment
  falls back to dlib and parsing to a landmark outline, with a warning. ArcFace has no substitute:
  the published IDFormer was trained on its 512-d vectors.
* :meth:`IdentityEncoder.tiny`: fully offline, seconds on a CPU: dlib for faces, dlib's 128-d face
  descriptor as the identity vector, a tiny random-weight EVA02 tower and the tiny IDFormer.

Photos larger than :data:`MAX_PHOTO_SIDE` (1024 px on the long side) are first shrunk to it, as
PuLID-FLUX's app does before encoding; face boxes are reported in the original photo's pixels.

Which face, when a photo has several: PuLID-FLUX's own rule (``pulid/pipeline_flux.py``
``get_id_embedding``). The identity vector comes from the *largest* face box (insightface
``app.get``, sorted by box area, last kept); alignment, parsing and EVA-CLIP from the face whose box
centre is *nearest the photo centre* (facexlib ``get_face_landmarks_5(only_center_face=True)``).
The two can be different people; PuLID does not check, we keep its choice (its checkpoint and the
paper's numbers come from it) and log a warning saying so. The dlib path applies the same two rules
to dlib's faces: descriptor from the largest, alignment from the centre-most. The reported face box
is the identity face's.

Small faces are used, not refused (PuLID refuses none): a face whose box (in the shrunk photo) is
under ``min_face_size`` (:data:`MIN_FACE_SIZE` = 64 px on the shorter side) gets one warning naming
the photo and the size, since ArcFace works on 112 px crops and EVA on a 512 px crop upsampled from
the photo, so its identity is unreliable. Only a photo where no detector finds a face raises
:class:`~spatialid.errors.FaceNotFoundError`.

The face stage (that choice, alignment, parsing, the identity vector) is
:mod:`spatialid.encoder.face_stacks`; this module loads the models and turns faces into tokens.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from spatialid.encoder.embedding import IdentityEmbedding
from spatialid.encoder.eva_clip import (
    EVA02_CLIP_L_336,
    TINY_EVA,
    EvaVisionConfig,
    EvaVisionTower,
    load_eva_vision_tower,
)
from spatialid.encoder.face_dlib import shared_dlib_analyzer
from spatialid.encoder.face_stacks import (  # noqa: F401  (the face stage; its names stay importable from here)
    ALIGNED_SIZE,
    DLIB_ID_DIM,
    MIN_FACE_SIZE,
    FaceAnalysis,
    _DlibStack,
    _PuLIDStack,
)
from spatialid.encoder.parsing import eva_preprocess, face_features_image
from spatialid.errors import SpatialIDError
from spatialid.utils.images import ImageInput, describe_source, load_image

__all__ = [
    "MIN_FACE_SIZE",
    "MAX_PHOTO_SIDE",
    "ALIGNED_SIZE",
    "DLIB_ID_DIM",
    "IdentityEncoder",
    "FaceAnalysis",
    "tiny_pulid_modules",
    "tiny_encoder_config",
    "resize_long_side",
]

logger = logging.getLogger(__name__)

MAX_PHOTO_SIDE = 1024  # photos are shrunk to this long side first, as PuLID-FLUX's app does
_DLIB_WARNING = (
    "identity encoder uses the dlib face path ({what}); identity fidelity differs from PuLID's "
    "insightface/facexlib pipeline"
)


def tiny_pulid_modules(seed: int = 0) -> tuple[nn.Module, nn.ModuleList]:
    """The tiny IDFormer and the ``TINY_PULID.num_ca`` CA modules, deterministic in ``seed``.

    Built inside ``torch.random.fork_rng`` with ``manual_seed(seed)``, so the result does not depend
    on (nor disturb) the caller's random state: ``spatialid encode --model tiny --seed S`` and
    ``spatialid generate --model tiny --seed S`` share identical modules in any process.
    """
    from spatialid.models.checkpoint import build_pulid_modules
    from spatialid.models.configs import TINY_PULID

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        idformer, cas = build_pulid_modules(TINY_PULID)
    idformer.eval().requires_grad_(False)
    cas.eval().requires_grad_(False)
    return idformer, cas


def tiny_encoder_config() -> dict[str, int]:
    """The IDFormer input sizes the tiny encoder produces (``TINY_PULID.idformer`` must match)."""
    return {"id_cond_dim": DLIB_ID_DIM + TINY_EVA.output_dim, "vit_dim": TINY_EVA.width}


# ----------------------------------------------------------------------------- encoder


class IdentityEncoder:
    """Identity photo(s) -> :class:`IdentityEmbedding` (PuLID-FLUX identity tokens).

    Build it with :meth:`from_pretrained` (real models) or :meth:`tiny` (offline toy), then call
    :meth:`encode`. The EVA tower and the IDFormer live on ``device`` in ``dtype``; face models run
    on the CPU (dlib, onnxruntime CPU) or on CUDA where their runtime supports it.
    """

    def __init__(
        self,
        *,
        face_stack: Any,
        eva: EvaVisionTower,
        idformer: nn.Module,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        min_face_size: int = MIN_FACE_SIZE,
        max_side: int | None = MAX_PHOTO_SIDE,
        metadata: dict[str, str] | None = None,
    ) -> None:
        # The typed sizes (IDFormer.config is diffusers' FrozenDict); other modules are not checked.
        cfg = getattr(idformer, "pulid_config", None)
        if cfg is not None:
            want = face_stack.id_dim + eva.config.output_dim
            if cfg.id_cond_dim != want or cfg.vit_dim != eva.config.width:
                raise ValueError(
                    f"IDFormer expects id_cond_dim={cfg.id_cond_dim}, vit_dim={cfg.vit_dim} but this encoder "
                    f"produces id_cond_dim={want} ({face_stack.id_dim} identity + {eva.config.output_dim} EVA) "
                    f"and vit_dim={eva.config.width}"
                )
        self.face_stack = face_stack
        self.eva = eva.eval()
        self.idformer = idformer.eval()
        self.min_face_size = int(min_face_size)
        self.max_side = int(max_side) if max_side else None
        self.metadata = dict(metadata or {})
        # Default to where the IDFormer already lives: the pipeline shares its IDFormer with the
        # encoder, and moving it here would silently move the pipeline's module too.
        first = next(idformer.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype
        self.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ construction

    @classmethod
    def tiny(
        cls,
        idformer: nn.Module | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        min_face_size: int = MIN_FACE_SIZE,
    ) -> IdentityEncoder:
        """Offline toy encoder: dlib faces + 128-d dlib descriptor, tiny random EVA02, tiny IDFormer.

        ``idformer`` defaults to :func:`tiny_pulid_modules` ``(seed)[0]``; the EVA tower's random
        weights also come from ``seed`` (deterministic, the global RNG is untouched).
        """
        logger.warning(_DLIB_WARNING.format(what="tiny preset"))
        if idformer is None:
            idformer = tiny_pulid_modules(seed)[0]
        eva = _tiny_eva(int(seed))
        stack = _DlibStack(shared_dlib_analyzer(True), min_face_size)
        meta = {
            "encoder": "tiny",
            "tiny_seed": str(seed),
            "face_backend": stack.name,
            "id_vector": stack.id_name,
            "eva": "tiny-random",
            "eva_config": json.dumps(TINY_EVA.to_dict()),
        }
        if dtype is None:
            dtype = next(idformer.parameters()).dtype
        return cls(face_stack=stack, eva=eva, idformer=idformer, device=device, dtype=dtype,
                   min_face_size=min_face_size, metadata=meta)

    @classmethod
    def from_pretrained(
        cls,
        idformer: nn.Module | Callable[[], nn.Module] | None = None,
        *,
        pulid: str | os.PathLike | None = None,
        pulid_filename: str | None = None,
        eva: str | os.PathLike | None = None,
        eva_filename: str | None = None,
        antelopev2: str | os.PathLike | None = None,
        facexlib: str | os.PathLike | None = None,
        models_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        face_backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        min_face_size: int = MIN_FACE_SIZE,
        eva_config: EvaVisionConfig = EVA02_CLIP_L_336,
    ) -> IdentityEncoder:
        """The real PuLID-FLUX encoder.

        Args:
            idformer: the IDFormer of the loaded PuLID-FLUX checkpoint (the pipeline passes its
                own), or a callable that loads it (called once the other files are located, so a
                missing checkpoint is listed with every other missing file); when None it is
                loaded from ``pulid`` / ``pulid_filename`` (default ``guozinan/PuLID``
                ``pulid_flux_v0.9.1.safetensors``).
            eva: EVA02-CLIP-L-14-336 weights: a file, a folder, or a hub repo id (default
                ``timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k``); ``eva_filename`` picks the
                file in a folder/repo.
            antelopev2: folder with ``scrfd_10g_bnkps.onnx`` and ``glintr100.onnx`` (default
                ``<models_dir>/antelopev2`` or the hub repo ``DIAMONIK7777/antelopev2``).
            facexlib: folder with ``detection_Resnet50_Final.pth`` and ``parsing_bisenet.pth``
                (default ``<models_dir>/facexlib``; downloaded from facexlib's releases when online).
            models_dir: root of the offline layout (default ``$SPATIALID_MODELS_DIR`` or
                ``~/.cache/spatialid/models``); cache_dir: Hugging Face cache folder.
            local_files_only: never download (None: follow ``HF_HUB_OFFLINE``).
            face_backend: ``"auto"`` (facexlib when its package and weights are present, else dlib
                with a warning), ``"facexlib"`` (required) or ``"dlib"``.
            device, dtype: where EVA and the IDFormer run (PuLID uses the pipeline's dtype, bf16);
                default: the given IDFormer's device and dtype (else CPU, the checkpoint's float32).
            min_face_size: face box side (px) under which a warning says the identity is unreliable.
            eva_config: EVA tower shape (only reduced test models change it).

        Raises:
            ModelFilesMissingError: weights absent and not downloadable (lists each file, its source
                and where to put it).
            SpatialIDError: ``insightface`` / ``onnxruntime`` (``spatialid[face]``) not installed.
        """
        from spatialid.encoder import model_files as mf

        if face_backend not in ("auto", "facexlib", "dlib"):
            raise ValueError(f"face_backend must be 'auto', 'facexlib' or 'dlib', got {face_backend!r}")
        mdir = Path(models_dir).expanduser() if models_dir is not None else mf.default_models_dir()
        offline = mf.offline_mode(local_files_only)
        idformer_loader = idformer if callable(idformer) and not isinstance(idformer, nn.Module) else None
        if idformer_loader is not None:
            idformer = None
        if device is not None:
            dev = torch.device(device)
        elif idformer is not None:
            dev = next(idformer.parameters()).device
        else:
            dev = torch.device("cpu")

        from spatialid.encoder.face_insightface import require_face_extra

        require_face_extra("insightface")
        require_face_extra("onnxruntime")

        # ---- locate every file first, so one error lists everything missing
        missing: list[mf.ModelFile] = []
        found: dict[str, Path] = {}

        def locate(spec: mf.ModelFile, override: Any, required: bool = True) -> None:
            path = mf.find_local(spec, mdir, override, cache_dir)
            if path is None and not offline and override is None:
                path = mf.fetch(spec, mdir, cache_dir)
            if path is not None:
                found[spec.key] = path
            elif required:
                missing.append(spec)

        locate(mf.ANTELOPE_DETECTOR, antelopev2)
        locate(mf.ANTELOPE_RECOGNIZER, antelopev2)
        use_facexlib = face_backend != "dlib"
        facexlib_ok = use_facexlib and _has_module("facexlib") and _has_module("cv2")
        if face_backend == "facexlib" and not facexlib_ok:
            require_face_extra("facexlib")
            require_face_extra("cv2")
        if facexlib_ok:
            locate(mf.FACEXLIB_DETECTOR, facexlib, required=face_backend == "facexlib")
            locate(mf.FACEXLIB_PARSER, facexlib, required=face_backend == "facexlib")
        eva_path = _resolve_eva(eva, eva_filename, mdir, cache_dir, offline, missing)
        pulid_path = None
        if idformer_loader is not None:
            from spatialid.errors import ModelFilesMissingError

            try:
                idformer = idformer_loader()
            except ModelFilesMissingError:
                missing.append(_pulid_file_spec(pulid, pulid_filename))
        elif idformer is None:
            from spatialid.errors import ModelFilesMissingError
            from spatialid.models.checkpoint import DEFAULT_FILENAME, resolve_pulid_checkpoint

            local_pulid = mdir / "pulid" / (pulid_filename or DEFAULT_FILENAME)
            if pulid is None and local_pulid.is_file():
                pulid = local_pulid
            try:
                pulid_path = resolve_pulid_checkpoint(
                    pulid, pulid_filename, cache_dir=cache_dir, local_files_only=offline
                )
            except ModelFilesMissingError:
                missing.append(_pulid_file_spec(pulid, pulid_filename))
        if missing:
            raise mf.missing_files_error(missing, mdir, offline)

        # ---- build
        from spatialid.encoder.face_insightface import InsightFaceArcFace

        arcface = InsightFaceArcFace(found["antelopev2_detector"], found["antelopev2_recognizer"], device=str(dev))
        fx = None
        dlib_an = None
        if facexlib_ok and "facexlib_detector" in found and "facexlib_parser" in found:
            from spatialid.encoder.face_facexlib import FacexlibFace

            fx = FacexlibFace(found["facexlib_detector"], found["facexlib_parser"], device=dev)
        else:
            if face_backend == "dlib":
                why = "requested"
            elif not facexlib_ok:
                why = 'facexlib is not installed: pip install "spatialid[face]"'
            else:
                why = "facexlib weights are missing: " + "; ".join(
                    spec.how_to_get(mdir) for spec in (mf.FACEXLIB_DETECTOR, mf.FACEXLIB_PARSER)
                    if spec.key not in found
                )
            logger.warning(_DLIB_WARNING.format(what=f"alignment and parsing; {why}"))
            dlib_an = shared_dlib_analyzer(False)
        stack = _PuLIDStack(arcface, fx, dlib_an, min_face_size)

        if idformer is None:
            from spatialid.models.checkpoint import load_pulid_checkpoint

            idformer, _ = load_pulid_checkpoint(pulid_path, device=dev, dtype=dtype)
        dtype = dtype if dtype is not None else next(idformer.parameters()).dtype
        tower = load_eva_vision_tower(eva_path, eva_config, device=dev, dtype=dtype)
        meta = {
            "encoder": "pulid-flux",
            "face_backend": stack.name,
            "id_vector": stack.id_name,
            "eva": str(eva_path.name),
            "eva_config": json.dumps(eva_config.to_dict()),
        }
        return cls(face_stack=stack, eva=tower, idformer=idformer, device=dev, dtype=dtype,
                   min_face_size=min_face_size, metadata=meta)

    # ------------------------------------------------------------------ devices

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> IdentityEncoder:
        """Move EVA and the IDFormer (and facexlib's networks) to ``device`` / ``dtype``."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.eva.to(device=self.device, dtype=self.dtype)
        self.idformer.to(device=self.device, dtype=self.dtype)
        fx = getattr(self.face_stack, "facexlib", None)
        if fx is not None and device is not None:
            fx.to(self.device)
        return self

    # ------------------------------------------------------------------ encoding

    @torch.no_grad()
    def encode(self, images: ImageInput | Sequence[ImageInput]) -> IdentityEmbedding:
        """Encode one photo, or several photos of ONE person (their tokens are averaged).

        Raises:
            InputImageError: an input cannot be read as a still image.
            FaceNotFoundError: no face found (a face under ``min_face_size`` is used, with a warning).
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise SpatialIDError("no identity photo given; pass at least one image")
        token_list: list[torch.Tensor] = []
        debug: dict[str, Image.Image] = {}
        boxes: list[list[float]] = []
        counts: list[int] = []
        names: list[str] = []
        first: FaceAnalysis | None = None
        first_box: tuple[float, float, float, float] | None = None
        uncond = None
        for i, item in enumerate(items):
            name = describe_source(item)
            pil = load_image(item)
            rgb, (sx, sy) = resize_long_side(np.asarray(pil, dtype=np.uint8), self.max_side)
            face = self.face_stack.analyze(rgb, name)
            box = (face.box[0] / sx, face.box[1] / sy, face.box[2] / sx, face.box[3] / sy)  # original pixels
            tokens, hidden_like, id_cond, features = self._tokens(face)
            if uncond is None:
                uncond = self.idformer(torch.zeros_like(id_cond), [torch.zeros_like(h) for h in hidden_like])
            token_list.append(tokens.float())
            prefix = f"photo{i + 1}_" if len(items) > 1 else ""
            debug[f"{prefix}aligned_face"] = Image.fromarray(face.aligned)
            debug[f"{prefix}face_features"] = _to_pil(features)
            debug[f"{prefix}detection"] = _draw_detection(Image.fromarray(rgb), face)
            boxes.append([round(v, 2) for v in box])
            counts.append(face.num_faces)
            names.append(os.path.basename(str(item)) if isinstance(item, (str, os.PathLike)) else name)
            if first is None:
                first, first_box = face, box
        assert first is not None and uncond is not None
        mean_tokens = torch.stack(token_list).mean(0).to(self.dtype)
        meta = dict(self.metadata)
        meta.update(
            {
                "num_images": str(len(items)),
                "photos": json.dumps(names),
                "face_boxes": json.dumps(boxes),
                "faces_found": json.dumps(counts),
                "idformer_config": json.dumps(getattr(getattr(self.idformer, "pulid_config", None), "to_dict", dict)()),
                "dtype": str(self.dtype).replace("torch.", ""),
            }
        )
        return IdentityEmbedding(
            tokens=mean_tokens,
            uncond_tokens=uncond.to(self.dtype),
            face_box=first_box,
            aligned_face=Image.fromarray(first.aligned),
            debug_images=debug,
            metadata=meta,
        )

    def _tokens(self, face: FaceAnalysis) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(face.aligned).permute(2, 0, 1)[None].to(self.device, torch.float32) / 255.0
        features = face_features_image(img, face.labels.to(self.device))
        cfg: EvaVisionConfig = self.eva.config
        pixels = eva_preprocess(features, cfg.image_size, cfg.mean, cfg.std).to(self.dtype)
        eva_embed, hidden = self.eva(pixels)
        eva_embed = eva_embed / torch.norm(eva_embed, 2, 1, True)
        id_vec = torch.from_numpy(np.asarray(face.id_vector, dtype=np.float32))[None].to(self.device, self.dtype)
        id_cond = torch.cat([id_vec, eva_embed.to(self.dtype)], dim=-1)
        tokens = self.idformer(id_cond, hidden)
        return tokens, hidden, id_cond, features

    def __repr__(self) -> str:
        return (
            f"IdentityEncoder(encoder={self.metadata.get('encoder')!r}, faces={self.face_stack.name!r}, "
            f"device={self.device}, dtype={str(self.dtype).replace('torch.', '')})"
        )


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=4)
def _tiny_eva_cached(seed: int) -> EvaVisionTower:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return EvaVisionTower(TINY_EVA).eval()


def _tiny_eva(seed: int) -> EvaVisionTower:
    """Tiny random EVA02 tower from ``seed`` (built once per seed and process, then copied)."""
    import copy

    return copy.deepcopy(_tiny_eva_cached(seed))


def _pulid_file_spec(pulid: Any, filename: str | None) -> Any:
    """The PuLID-FLUX checkpoint as an entry of the missing-files list."""
    from spatialid.encoder import model_files as mf
    from spatialid.models.checkpoint import DEFAULT_FILENAME, DEFAULT_REPO_ID

    repo = os.fspath(pulid) if pulid is not None else DEFAULT_REPO_ID
    return mf.ModelFile("pulid", filename or DEFAULT_FILENAME, "pulid", "1.1 GB", repo_id=repo)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _resolve_eva(
    eva: str | os.PathLike | None,
    eva_filename: str | None,
    models_dir: Path,
    cache_dir: str | os.PathLike | None,
    offline: bool,
    missing: list,
) -> Path:
    """Local file / folder / hub repo -> path of the EVA weights (appends to ``missing`` if absent)."""
    from spatialid.encoder import model_files as mf
    from spatialid.encoder.eva_clip import EVA_KNOWN_FILENAMES

    names = (eva_filename,) if eva_filename else EVA_KNOWN_FILENAMES
    if eva is not None:
        p = Path(eva).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            for n in names:
                if (p / n).is_file():
                    return p / n
            raise SpatialIDError(f"no EVA-CLIP weights in {p} (looked for {', '.join(names)})")
        text = os.fspath(eva)
        if "/" in text and not p.suffix and not text.startswith((".", "/", "~")):
            spec = mf.ModelFile("eva", names[0], "eva-clip", "856 MB", repo_id=text)
            for n in names:
                cand = mf.ModelFile("eva", n, "eva-clip", "856 MB", repo_id=text)
                hit = mf.find_local(cand, models_dir, None, cache_dir)
                if hit is not None:
                    return hit
            if not offline:
                hit = mf.fetch(spec, models_dir, cache_dir)
                if hit is not None:
                    return hit
            missing.append(spec)
            return Path()
        raise SpatialIDError(f"EVA-CLIP weights not found: {p}; pass a file, a folder or a hub repo id")
    for spec in (mf.EVA_WEIGHTS, mf.EVA_WEIGHTS_ORIGINAL):
        hit = mf.find_local(spec, models_dir, None, cache_dir)
        if hit is not None:
            return hit
    if not offline:
        hit = mf.fetch(mf.EVA_WEIGHTS, models_dir, cache_dir)
        if hit is not None:
            return hit
    missing.append(mf.EVA_WEIGHTS)
    return Path()


def resize_long_side(rgb: np.ndarray, max_side: int | None) -> tuple[np.ndarray, tuple[float, float]]:
    """Shrink ``rgb`` so its longer side is ``max_side`` (never enlarge); returns the per-axis scale.

    Same rule as PuLID-FLUX's ``resize_numpy_image_long(image, 1024)``: sizes truncated to integers,
    Lanczos resampling (OpenCV's LANCZOS4 when OpenCV is installed, else Pillow's Lanczos).
    """
    h, w = rgb.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return rgb, (1.0, 1.0)
    k = max_side / max(h, w)
    nh, nw = max(int(h * k), 1), max(int(w * k), 1)
    try:
        import cv2

        out = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LANCZOS4)
    except ImportError:
        out = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(out), (nw / w, nh / h)


def _to_pil(image01: torch.Tensor) -> Image.Image:
    arr = (image01[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def _draw_detection(photo: Image.Image, face: FaceAnalysis) -> Image.Image:
    """The photo with the chosen face box and landmarks drawn (for --debug-dir)."""
    out = photo.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 300))
    draw.rectangle(face.box, outline=(0, 255, 0), width=width)
    if face.landmarks5 is not None:
        r = width + 1
        for x, y in np.asarray(face.landmarks5).reshape(-1, 2):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 0, 0))
    return out
