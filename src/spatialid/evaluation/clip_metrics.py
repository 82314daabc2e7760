"""CLIP-T (prompt-image) and CLIP-I (reference photo-image) similarity with open_clip.

Both are plain cosine similarities of L2-normalised CLIP embeddings (no x100 or x2.5 rescaling),
the convention of IBench-style tables (e.g. CLIP-T 0.28, CLIP-I 0.83). The default model is the
one a user would reach for, OpenAI's ViT-L/14 through open_clip
(``create_model_and_transforms("ViT-L-14", pretrained="openai")``); any open_clip model name and
pretrained tag, local checkpoint file or ``hf-hub:`` id can be chosen instead.

:meth:`ClipScorer.tiny` builds a two-layer CLIP with random weights in code (and open_clip's own
BPE tokenizer, which ships inside the package), for offline tests. Its numbers mean nothing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from spatialid.errors import ModelFilesMissingError, SpatialIDError

__all__ = ["DEFAULT_CLIP_MODEL", "DEFAULT_CLIP_PRETRAINED", "TINY_CLIP_CONFIG", "ClipScorer"]

DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"

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


class ClipScorer:
    """Image and text embeddings of one CLIP model, and the CLIP-T / CLIP-I similarities.

    Args:
        model: an open_clip ``CLIP`` (or compatible: ``encode_image``/``encode_text``).
        preprocess: PIL image -> normalised tensor ``[3, S, S]``.
        tokenizer: list of str -> token ids ``[N, context]``.
        name: label for reports; random_weights: True for test models (flagged in every report).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Any,
        tokenizer: Any,
        *,
        name: str,
        random_weights: bool = False,
        device: torch.device | str | None = None,
        batch_size: int = 16,
    ) -> None:
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.random_weights = random_weights
        self.batch_size = batch_size
        self.dtype = next(model.parameters()).dtype

    @property
    def label(self) -> str:
        return f"{self.name} (RANDOM WEIGHTS: test stand-in, numbers are meaningless)" if self.random_weights else self.name

    # --------------------------------------------------------------------------- constructors

    @classmethod
    def from_open_clip(
        cls,
        model_name: str = DEFAULT_CLIP_MODEL,
        pretrained: str | os.PathLike[str] | None = DEFAULT_CLIP_PRETRAINED,
        *,
        device: torch.device | str | None = None,
        precision: str = "fp32",
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 16,
    ) -> ClipScorer:
        """Load a pretrained open_clip model (downloaded into the Hugging Face cache when online).

        ``pretrained`` may be a tag (``"openai"``, ``"laion2b_s32b_b82k"``...) or a local checkpoint
        file. Offline without the weights: :class:`ModelFilesMissingError` naming model, tag and
        the repository to fetch.
        """
        open_clip = _open_clip()
        tag = os.fspath(pretrained) if pretrained is not None else None
        if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
            raise SpatialIDError(
                f"unknown open_clip model {model_name!r}; e.g. ViT-L-14, ViT-B-32, ViT-H-14 (see open_clip.list_models())"
            )
        looks_like_file = bool(tag) and (os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")))
        if looks_like_file and not os.path.isfile(tag):
            raise SpatialIDError(f"CLIP checkpoint file {tag} does not exist")
        if tag and not os.path.isfile(tag) and not model_name.startswith("hf-hub:"):
            known = open_clip.list_pretrained_tags_by_model(model_name)
            if tag not in known:
                raise SpatialIDError(
                    f"open_clip has no pretrained tag {tag!r} for {model_name}; known: {', '.join(known) or 'none'} "
                    "(or give a checkpoint file)"
                )
        logging.disable(logging.ERROR)  # open_clip logs its own download errors on the root logger
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=tag, device=device or "cpu", precision=precision,
                cache_dir=os.fspath(cache_dir) if cache_dir else None,
            )
        except RuntimeError as exc:
            if tag and os.path.isfile(tag):
                raise SpatialIDError(f"cannot load CLIP checkpoint {tag} into {model_name}: {' '.join(str(exc).split())[:300]}") from None
            cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
            hub = cfg.get("hf_hub", "").rstrip("/")
            m = re.search(r"download file \(([^)]+)\)", str(exc))
            what = f" (file {m.group(1)} of Hugging Face repo {hub})" if m and hub else (f" (Hugging Face repo {hub})" if hub else "")
            fetch = f" or `huggingface-cli download {hub}`" if hub else ""
            raise ModelFilesMissingError(
                f"CLIP weights {model_name}/{tag}{what} are not in the local cache and could not be downloaded; "
                f"run once online{fetch}, or give --clip-pretrained /path/to/checkpoint"
            ) from None
        finally:
            logging.disable(logging.NOTSET)
        tokenizer = open_clip.get_tokenizer(model_name)
        name = f"open_clip {model_name} ({os.path.basename(tag) if tag and os.path.isfile(tag) else tag})"
        return cls(model, preprocess, tokenizer, name=name, device=device, batch_size=batch_size)

    @classmethod
    def tiny(cls, seed: int = 0, *, device: torch.device | str | None = None) -> ClipScorer:
        """A random-weight toy CLIP built from :data:`TINY_CLIP_CONFIG` (offline; for tests)."""
        open_clip = _open_clip()
        cfg = TINY_CLIP_CONFIG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.CLIP(
                embed_dim=cfg["embed_dim"], vision_cfg=dict(cfg["vision_cfg"]), text_cfg=dict(cfg["text_cfg"]),
                quick_gelu=cfg["quick_gelu"],
            )
        preprocess = open_clip.image_transform(
            cfg["vision_cfg"]["image_size"], is_train=False,
            mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD,
        )
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        return cls(model, preprocess, tokenizer, name="tiny open_clip CLIP", random_weights=True, device=device)

    # -------------------------------------------------------------------------------- features

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings ``[N, D]`` (float32, CPU)."""
        feats = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + self.batch_size]])
            f = self.model.encode_image(batch.to(self.device, self.dtype)).float()
            feats.append(torch.nn.functional.normalize(f, dim=-1).cpu())
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
        """Cosine similarity of each image with its prompt."""
        return (self.image_features(images) * self.text_features(prompts)).sum(-1).numpy()

    def clip_i(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> np.ndarray:
        """Cosine similarity of each image with its reference photo."""
        return (self.image_features(images) * self.image_features(references)).sum(-1).numpy()
