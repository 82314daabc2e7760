"""The models behind the evaluation's metric columns: IBench's real ones, or offline tiny ones.

:class:`MetricModels` is built before scoring (``real`` fails early, with one line, for a model that
is not available) and names every column group in the report (``labels``), so a report always
says which model produced which number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spatialid.errors import SpatialIDError
from spatialid.evaluation.contamination import LpipsDistance

__all__ = ["AESTHETIC_CLIPS", "MetricModels"]

AESTHETIC_CLIPS = ("ViT-L-14", "ViT-L-14-quickgelu")  # open_clip names of OpenAI's ViT-L/14
COLUMNS_VERSION = 2  # 2: count accuracy, ID-Conf, Sim(Ref/GT), CP, LandmarkDiff, PoseDiv, ExprDiv


@dataclass
class MetricModels:
    """The models behind the metric columns (``None`` = column left out)."""

    clip: Any
    face: Any = None
    quality: Any = None
    lpips: Any = None
    aesthetic: Any = None
    fid: Any = None
    notes: list[str] = field(default_factory=list)

    def _groups(self) -> dict[str, Any]:
        return {"clip": self.clip, "face": self.face, "quality": self.quality, "lpips": self.lpips,
                "aesthetic": self.aesthetic, "fid": self.fid}

    @property
    def random_weights(self) -> bool:
        return bool(self.random_groups())

    def random_groups(self) -> list[str]:
        """Model groups (report column groups) whose model has random weights."""
        return [g for g, m in self._groups().items() if m is not None and getattr(m, "random_weights", False)]

    def labels(self) -> dict[str, str]:
        return {
            "clip": self.clip.label,
            "face": self.face.label if self.face is not None else "n/a (no face model)",
            "quality": self.quality.label if self.quality is not None else "n/a (--iq-metric none)",
            "lpips": self.lpips.label if self.lpips is not None else "n/a (lpips not installed or --no-lpips)",
            "aesthetic": self.aesthetic.label if self.aesthetic is not None else "n/a (--no-aesthetic)",
            "fid": self.fid.label if self.fid is not None else "n/a (--no-fid)",
            "pixels": "plain pixel arithmetic (no model)",
        }

    def fingerprint(self) -> str:
        """What cached rows depend on: every model's label, and the columns' version (rows cached before
        the field's columns existed lack them, so they are scored again)."""
        return "|".join([f"columns={COLUMNS_VERSION}"] + [f"{k}={v}" for k, v in sorted(self.labels().items()) if k != "fid"])

    @classmethod
    def tiny(cls, *, device: str | None = None, seed: int = 0) -> MetricModels:
        """Offline models: random-weight CLIP, aesthetic head, IQ, FID and LPIPS backbones; dlib faces."""
        from spatialid.evaluation.aesthetic import AestheticScorer
        from spatialid.evaluation.clip_metrics import ClipScorer
        from spatialid.evaluation.face_metrics import DlibFaceEmbedder
        from spatialid.evaluation.fid import FidExtractor
        from spatialid.evaluation.quality import load_quality

        notes = [
            (
                "Tiny evaluation: CLIP, Aesthetic, IQ, FID and the LPIPS backbone have random weights; faces use dlib "
                "(real weights) with a centred box where no face is found (the tiny model's images are noise)."
            )
        ]
        lp = None
        try:
            lp = LpipsDistance(random_backbone=True, device=device, seed=seed)
        except SpatialIDError as exc:
            notes.append(f"BG LPIPS left out: {exc}")
        clip = ClipScorer.tiny(seed, device=device)
        return cls(
            clip=clip,
            face=DlibFaceEmbedder(fallback="center"),
            quality=load_quality(device=device, random_weights=True),
            lpips=lp,
            aesthetic=AestheticScorer.tiny(clip, seed),
            fid=FidExtractor.tiny(seed=seed, device=device),
            notes=notes,
        )

    @classmethod
    def real(
        cls,
        *,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str | None = "openai",
        clip_precision: str = "auto",
        clip_antialias: bool = True,
        face_model: str = "antelopev2",
        iq_metric: str = "musiq-spaq",
        aesthetic: bool = True,
        fid: bool = True,
        lpips: bool | None = None,
        face_fallback: str = "none",
        device: str | None = None,
        models_dir: str | None = None,
        offline: bool | None = None,
        cache_dir: str | None = None,
    ) -> MetricModels:
        """IBench's models; each one fails early with a one-line error if unavailable.

        ``lpips=None`` uses LPIPS when the package is installed (else notes that the column is out).
        """
        import importlib.util

        from spatialid.evaluation.aesthetic import load_aesthetic
        from spatialid.evaluation.clip_metrics import ClipScorer
        from spatialid.evaluation.face_metrics import load_face_embedder
        from spatialid.evaluation.fid import FidExtractor
        from spatialid.evaluation.quality import load_quality

        notes: list[str] = []
        clip = ClipScorer.from_open_clip(clip_model, clip_pretrained, device=device, precision=clip_precision,
                                         antialias=clip_antialias, cache_dir=cache_dir)
        if (clip_model, clip_pretrained) != ("ViT-L-14", "openai"):
            notes.append(f"CLIP columns use {clip_model}/{clip_pretrained}, not IBench's OpenAI ViT-L/14.")
        face = load_face_embedder(face_model, device=device, fallback=face_fallback, models_dir=models_dir, offline=offline)
        if face_model == "dlib":
            notes.append("Every face column uses dlib's recognition model (--face-model dlib, offline alternative: HOG + "
                         "CNN detector, 68 landmarks, 128-d descriptor): not comparable with ArcFace numbers in papers.")
        quality = load_quality(iq_metric, device=device, offline=offline)
        aes = None
        if aesthetic:
            aes_clip = clip
            if clip_model not in AESTHETIC_CLIPS or clip_pretrained != "openai":
                aes_clip = ClipScorer.from_open_clip("ViT-L-14", "openai", device=device, precision=clip_precision,
                                                     cache_dir=cache_dir)
            aes = load_aesthetic(aes_clip, models_dir=models_dir, offline=offline)
        fid_model = FidExtractor.real(device=device, offline=offline) if fid else None
        lp = None
        if lpips is None:
            lpips = importlib.util.find_spec("lpips") is not None
            if not lpips:
                notes.append("BG LPIPS left out: the lpips package is not installed (`pip install lpips`).")
        if lpips:
            lp = LpipsDistance(device=device)
        return cls(clip=clip, face=face, quality=quality, lpips=lp, aesthetic=aes, fid=fid_model, notes=notes)
