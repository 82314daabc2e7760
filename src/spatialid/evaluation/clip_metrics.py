"""CLIP-T, CLIP-I and CLIP-ref with open_clip, preprocessed exactly as IBench does.

IBench (typemovie/IBench, ``ibench/metrics/imageid/clipeval.py``) scores with OpenAI's ViT-L/14
(``clip.load("ViT-L-14.pt", jit=False)``). Its image path, per image (``ClipI.evaluate``,
``ClipT.evaluate``, ``ClipModel.__init__``):

1. ``ToTensor()(PIL RGB) * 2 - 1``, then ``Normalize(mean=-1, std=2)`` back to [0, 1];
2. ``clip_preprocess.transforms[:2] + [4:]``: ``Resize(224, BICUBIC)`` and ``CenterCrop(224)`` on
   that *tensor* (so torchvision's tensor resize, whose antialias default is on since torchvision
   0.17 and off before), then ``Normalize`` with OpenAI's mean/std;
3. ``encode_image``, L2-normalised; on a GPU ``clip.load`` keeps the fp16 weights (it calls
   ``model.float()`` only on the CPU).

CLIP-T is the cosine with the prompt's text embedding (``clip.tokenize(truncate=True)``); CLIP-I is
the cosine between the image *with* identity and the image *without* identity of the same prompt
(``imagewithid`` vs ``imagewithoutid``). The cosine of the generated image with the reference photo,
which this project used to call CLIP-I, is reported as CLIP-ref.

open_clip's ``ViT-L-14``/``openai`` tag holds the same OpenAI weights (Hugging Face
``timm/vit_large_patch14_clip_224.openai``). Those weights were trained with QuickGELU; open_clip 3
no longer switches the activation for the tag, so the loader forces QuickGELU whenever the tag's
config says so (without it the features differ from ``clip.load``'s).

:meth:`ClipScorer.tiny` builds a two-layer CLIP with random weights in code (and open_clip's own
BPE tokenizer, which ships inside the package), for offline tests. Its numbers mean nothing.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from spatialid.errors import CheckpointError, ModelFilesMissingError, SpatialIDError
from spatialid.utils.weights import NEVER_UNPICKLE, sniff_safetensors

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "TINY_CLIP_CONFIG",
    "ClipScorer",
    "aesthetic_clip_input",
    "check_clip_checkpoint",
    "ibench_clip_input",
    "resolve_precision",
]

DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"
# OpenAI CLIP's normalisation (clip/clip.py `_transform`; IBench aesthetic.py `clip_transform`).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = ("auto", "fp32", "fp16")

# open_clip model config (same schema as open_clip/model_configs/*.json) at toy size. The text tower
# keeps CLIP's real vocabulary and context so the packaged SimpleTokenizer can be used unchanged.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise SpatialIDError(
            "CLIP metrics need open_clip; install the evaluation extra with `pip install \"spatialid[eval]\"`"
        ) from None
    return open_clip


# Suffixes open_clip reads as checkpoint files; a value with one of them (or a path separator) is
# meant as a file, never as a pretrained tag (tags look like "openai", "laion2b_s32b_b82k").
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz", ".npy")
_NEVER_UNPICKLE = NEVER_UNPICKLE
_CLIP_FIX = "convert it to safetensors (safetensors.torch.save_file of its state dict) or give a pretrained tag such as openai"


def _names_a_file(pretrained: str) -> bool:
    return os.sep in pretrained or "/" in pretrained or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES)


def check_clip_checkpoint(pretrained: str | os.PathLike[str] | None, *, file: bool | None = None) -> None:
    """Refuse a ``--clip-pretrained`` file that is missing or not safetensors, reading only its first bytes.

    open_clip would ``torch.load`` any other file. Even with ``weights_only=True`` that runs
    pickle's machinery on untrusted bytes, and older open_clip releases unpickle fully. ``file=None``
    takes a value with a path separator or a checkpoint suffix for a file and leaves anything else
    to open_clip as a tag (:meth:`ClipScorer.from_open_clip` checks a bare name that is no known tag
    but exists on disk with ``file=True``). open_clip picks its loader by the name, so a
    safetensors file must also be named ``*.safetensors``.
    """
    if pretrained is None:
        return
    tag = os.fspath(pretrained)
    if not tag or not (file or (file is None and _names_a_file(tag))):
        return
    path = os.path.expanduser(tag)
    if not os.path.exists(path):
        raise CheckpointError(f"--clip-pretrained {tag} does not exist; give a CLIP .safetensors file or a pretrained tag such as openai")
    if not os.path.isfile(path):
        raise CheckpointError(f"--clip-pretrained {tag} is not a file; give a CLIP .safetensors file or a pretrained tag such as openai")
    sniff_safetensors(path, _CLIP_FIX, name=tag)
    if not path.lower().endswith(".safetensors"):
        raise CheckpointError(
            f"{tag} is a safetensors file but open_clip picks its loader by the name and would torch.load it; "
            "rename it to end in .safetensors"
        )


def _check_open_clip_loads_safely(open_clip: Any) -> dict[str, Any]:
    """``{"weights_only": True}`` for open_clip's factory, or a refusal where it would unpickle.

    open_clip 3 downloads every tag's weights (OpenAI's too, from Hugging Face, safetensors when
    the repository has them) and reads non-safetensors files with ``torch.load(weights_only=True)``.
    Releases before 3 read the ``openai`` tag with ``torch.jit.load``/``torch.load`` of OpenAI's
    pickle, without ``weights_only``.
    """
    version = str(getattr(open_clip, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < 3:
        raise SpatialIDError(
            f"open_clip {version} loads CLIP weights by unpickling them (torch.load without weights_only); "
            f"{_NEVER_UNPICKLE}: upgrade it with `pip install -U \"open-clip-torch>=3\"`"
        )
    params = inspect.signature(open_clip.create_model_and_transforms).parameters.values()
    if any(p.name == "weights_only" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {"weights_only": True}  # open_clip's default today; explicit, so a changed default cannot bite
    return {}


def ibench_clip_input(
    image: Image.Image,
    size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    *,
    antialias: bool = True,
) -> torch.Tensor:
    """``[3, size, size]`` CLIP input made the way IBench's ClipI/ClipT make it (module docstring).

    The ``*2-1`` / ``Normalize(-1, 2)`` round trip is kept because it is not exactly the identity in
    float32 for every pixel value; it moves values by at most one ulp.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    t = TF.to_tensor(image.convert("RGB")).unsqueeze(0) * 2.0 - 1.0
    t = TF.normalize(t, [-1.0, -1.0, -1.0], [2.0, 2.0, 2.0])
    t = TF.resize(t, [size], interpolation=InterpolationMode.BICUBIC, antialias=antialias)
    t = TF.center_crop(t, [size, size])
    return TF.normalize(t, list(mean), list(std))[0]


def aesthetic_clip_input(
    image: Image.Image, size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
) -> torch.Tensor:
    """``[3, size, size]`` CLIP input of IBench's AestheticScore (``aesthetic.py``, ``clip_transform``).

    The uint8 pixels become 0-255 floats, ``Resize(size, BICUBIC, antialias=False)``,
    ``CenterCrop(size)``, then ``/255`` and OpenAI's ``Normalize``, in that order.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    arr = np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32)
    t = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()
    t = TF.resize(t, [size], interpolation=InterpolationMode.BICUBIC, antialias=False)
    t = TF.center_crop(t, [size, size])
    return TF.normalize(t.div(255.0), list(mean), list(std))[0]


def resolve_precision(precision: str, device: torch.device | str | None) -> str:
    """``"auto"`` -> what ``clip.load`` does (fp16 weights on CUDA, fp32 on the CPU); else as given."""
    if precision not in PRECISIONS:
        raise SpatialIDError(f"CLIP precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "fp16" if torch.device(device or "cpu").type == "cuda" else "fp32"


def _image_size(model: torch.nn.Module) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    conv = getattr(getattr(model, "visual", None), "conv1", None)
    if conv is not None and hasattr(conv, "weight"):
        return conv.weight.dtype  # what OpenAI's encode_image casts its input to
    return next(model.parameters()).dtype


class ClipScorer:
    """Image and text embeddings of one CLIP model, and the cosine similarities built on them.

    Args:
        model: an open_clip ``CLIP`` (or compatible: ``encode_image``/``encode_text``, ``visual``).
        tokenizer: list of str -> token ids ``[N, context]`` (truncating, EOT kept last).
        name: label for reports; random_weights: True for test models (flagged in every report).
        mean, std: the model's normalisation; antialias: torchvision's tensor-resize antialiasing
            for CLIP-T/CLIP-I/CLIP-ref (module docstring, step 2).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        antialias: bool = True,
        random_weights: bool = False,
        device: torch.device | str | None = None,
        batch_size: int = 16,
        precision: str = "fp32",
    ) -> None:
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.antialias = bool(antialias)
        self.random_weights = random_weights
        self.batch_size = batch_size
        self.precision = precision
        self.image_size = _image_size(model)
        self.dtype = _input_dtype(model)
        self.embed_dim = int(self.encode_tensors(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1])

    @property
    def label(self) -> str:
        text = (
            f"{self.name}, {self.precision}, IBench preprocessing (tensor bicubic resize to {self.image_size}, "
            f"antialias {'on' if self.antialias else 'off'}, centre crop)"
        )
        return f"{text} (RANDOM WEIGHTS: test stand-in, numbers are meaningless)" if self.random_weights else text

    # --------------------------------------------------------------------------- constructors

    @classmethod
    def from_open_clip(
        cls,
        model_name: str = DEFAULT_CLIP_MODEL,
        pretrained: str | os.PathLike[str] | None = DEFAULT_CLIP_PRETRAINED,
        *,
        device: torch.device | str | None = None,
        precision: str = "auto",
        antialias: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 16,
    ) -> ClipScorer:
        """Load a pretrained open_clip model (downloaded into the Hugging Face cache when online).

        ``pretrained`` may be a tag (``"openai"``, ``"laion2b_s32b_b82k"``...) or a local checkpoint
        file. ``precision="auto"`` is what ``clip.load`` does: fp16 on CUDA, fp32 elsewhere.
        Offline without the weights: :class:`ModelFilesMissingError` naming model, tag and the
        repository to fetch.
        """
        open_clip = _open_clip()
        prec = resolve_precision(precision, device)
        dev = torch.device(device or "cpu")
        tag = os.path.expanduser(os.fspath(pretrained)) if pretrained is not None else None
        if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
            raise SpatialIDError(
                f"unknown open_clip model {model_name!r}; e.g. ViT-L-14, ViT-B-32, ViT-H-14 (see open_clip.list_models())"
            )
        hub = model_name.startswith(("hf-hub:", "local-dir:"))
        known = [] if hub else list(open_clip.list_pretrained_tags_by_model(model_name))
        tag_cfg: dict = {}
        if tag and tag in known:  # open_clip resolves a known tag before any file of that name
            tag_cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
        elif tag and (_names_a_file(tag) or os.path.exists(tag)):
            check_clip_checkpoint(tag, file=True)  # any other file open_clip would torch.load
        elif tag and not hub:
            raise SpatialIDError(
                f"open_clip has no pretrained tag {tag!r} for {model_name}; known: {', '.join(known) or 'none'} "
                "(or give a .safetensors checkpoint file)"
            )
        safe = _check_open_clip_loads_safely(open_clip)
        # a checkpoint file of OpenAI weights needs a -quickgelu model name (e.g. ViT-L-14-quickgelu)
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        logging.disable(logging.ERROR)  # open_clip logs its own download errors on the root logger
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                model_name, pretrained=tag, device=dev, precision=prec, force_quick_gelu=quick_gelu,
                cache_dir=os.fspath(cache_dir) if cache_dir else None, **safe,
            )
        except RuntimeError as exc:
            if tag and os.path.isfile(tag):
                raise SpatialIDError(f"cannot load CLIP checkpoint {tag} into {model_name}: {' '.join(str(exc).split())[:300]}") from None
            hub = tag_cfg.get("hf_hub", "").rstrip("/")
            m = re.search(r"download file \(([^)]+)\)", str(exc))
            what = f" (file {m.group(1)} of Hugging Face repo {hub})" if m and hub else (f" (Hugging Face repo {hub})" if hub else "")
            fetch = f" or `huggingface-cli download {hub}`" if hub else ""
            raise ModelFilesMissingError(
                f"CLIP weights {model_name}/{tag}{what} are not in the local cache and could not be downloaded; "
                f"run once online{fetch}, or give --clip-pretrained /path/to/checkpoint"
            ) from None
        finally:
            logging.disable(logging.NOTSET)
        cfg = open_clip.get_model_preprocess_cfg(model) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
        mean = tuple(cfg.get("mean") or tag_cfg.get("mean") or OPENAI_MEAN)
        std = tuple(cfg.get("std") or tag_cfg.get("std") or OPENAI_STD)
        tokenizer = open_clip.get_tokenizer(model_name)
        shown = os.path.basename(tag) if tag and os.path.isfile(tag) else tag
        name = f"open_clip {model_name} ({shown}{', QuickGELU' if quick_gelu else ''})"
        return cls(model, tokenizer, name=name, mean=mean, std=std, antialias=antialias, device=dev,
                   batch_size=batch_size, precision=prec)

    @classmethod
    def tiny(cls, seed: int = 0, *, device: torch.device | str | None = None, antialias: bool = True) -> ClipScorer:
        """A random-weight toy CLIP built from :data:`TINY_CLIP_CONFIG` (offline; for tests)."""
        open_clip = _open_clip()
        cfg = TINY_CLIP_CONFIG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.CLIP(
                embed_dim=cfg["embed_dim"], vision_cfg=dict(cfg["vision_cfg"]), text_cfg=dict(cfg["text_cfg"]),
                quick_gelu=cfg["quick_gelu"],
            )
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        return cls(model, tokenizer, name="tiny open_clip CLIP", random_weights=True, device=device, antialias=antialias)

    # -------------------------------------------------------------------------------- features

    @torch.no_grad()
    def encode_tensors(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw (not normalised) float32 image embeddings of preprocessed inputs ``[N, 3, S, S]``."""
        return self.model.encode_image(batch.to(self.device, self.dtype)).float().cpu()

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image], *, antialias: bool | None = None) -> torch.Tensor:
        """L2-normalised image embeddings ``[N, D]`` (float32, CPU), IBench's ClipEval preprocessing."""
        aa = self.antialias if antialias is None else antialias
        feats = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack(
                [ibench_clip_input(im, self.image_size, self.mean, self.std, antialias=aa) for im in images[i : i + self.batch_size]]
            )
            feats.append(torch.nn.functional.normalize(self.encode_tensors(batch), dim=-1))
        return torch.cat(feats) if feats else torch.empty(0)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, D]`` (prompts longer than 77 tokens are truncated)."""
        feats = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
            f = self.model.encode_text(tokens).float()
            feats.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        return torch.cat(feats) if feats else torch.empty(0)

    # ---------------------------------------------------------------------------------- scores

    def clip_t(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """IBench CLIP-T: cosine of each image with its prompt."""
        return (self.image_features(images) * self.text_features(prompts)).sum(-1).numpy()

    def clip_i(self, with_id: Sequence[Image.Image], without_id: Sequence[Image.Image]) -> np.ndarray:
        """IBench CLIP-I: cosine of each image with identity and its image without identity."""
        if len(with_id) != len(without_id):
            raise SpatialIDError(f"CLIP-I needs one image without identity per image ({len(with_id)} vs {len(without_id)})")
        return (self.image_features(with_id) * self.image_features(without_id)).sum(-1).numpy()

    def clip_ref(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> np.ndarray:
        """CLIP-ref (not an IBench metric): cosine of each image with its reference photo."""
        return (self.image_features(images) * self.image_features(references)).sum(-1).numpy()
