"""Per-image metric values of one evaluation item (:class:`_Scorer`), and what a cached row depends on.

Features and faces are cached per file while scoring (a baseline is shared by every preset), and
an unreadable file only leaves out the columns that need it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from PIL import Image

from spatialid.bench.datasets import region_boxes
from spatialid.errors import SpatialIDError
from spatialid.evaluation.contamination import background_change, face_region_mask
from spatialid.evaluation.face_metrics import cosine
from spatialid.evaluation.inputs import UnreadableImageError, load_rgb
from spatialid.evaluation.metric_models import MetricModels
from spatialid.evaluation.sources import EvalItem

__all__ = ["file_stat", "file_stats"]

log = logging.getLogger("spatialid.eval")

# ------------------------------------------------------------------------------------- scoring


def file_stat(path: Path) -> list[int]:
    """Size and modification time: a cached value is reused only while both are unchanged."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def file_stats(item: EvalItem) -> dict[str, Any]:
    """What a cached row depends on: the image, its image without identity, its baseline (and GT photos)."""
    stats = {
        "image": file_stat(item.image),
        "without_id": [str(item.without_id), *file_stat(item.without_id)] if item.without_id is not None else None,
        "baseline": [str(item.baseline), *file_stat(item.baseline)] if item.baseline is not None and item.baseline.is_file() else None,
    }
    if any(item.gt):  # only then: rows cached before GT photos existed stay valid without them
        stats["gt"] = [[[str(p), *file_stat(p)] for p in per] for per in item.gt]
    return stats


class _Scorer:
    """Per-image metrics, with features and faces cached per file (baselines are shared by presets).

    Unreadable files are remembered in ``bad`` (path -> reason): an item whose own image is
    unreadable is skipped (:meth:`score` returns None); an unreadable image without identity,
    baseline or reference photo only leaves the columns that need it out of that item's row.
    """

    def __init__(self, models: MetricModels) -> None:
        self.m = models
        self._text: dict[str, Any] = {}
        self._feat: dict[Path, Any] = {}
        self._face: dict[Path, Any] = {}
        self._ref_face: dict[Path, Any] = {}
        self._all: dict[Path, list[Any]] = {}
        self._geo: dict[tuple[Path, tuple[float, ...]], Any] = {}
        self.bad: dict[Path, str] = {}
        self._ok: set[Path] = set()

    def load(self, path: Path) -> Image.Image | None:
        """The image, or None (recorded in ``bad``) when it cannot be decoded."""
        if path in self.bad:
            return None
        try:
            image = load_rgb(path)
        except UnreadableImageError as exc:
            self.bad[path] = exc.reason
            log.warning("skipping unreadable image %s (%s)", path, exc.reason)
            return None
        self._ok.add(path)
        return image

    def readable(self, path: Path | None) -> bool:
        """Whether ``path`` decodes (checked once per file; face models then read it themselves)."""
        if path is None:
            return False
        return path in self._ok or self.load(path) is not None

    def text(self, prompt: str) -> Any:
        if prompt not in self._text:
            self._text[prompt] = self.m.clip.text_features([prompt])[0]
        return self._text[prompt]

    def feature(self, path: Path, image: Image.Image | None = None) -> Any:
        if path not in self._feat:
            self._feat[path] = self.m.clip.image_features([image if image is not None else load_rgb(path)])[0]
        return self._feat[path]

    def face(self, path: Path) -> Any:
        if path not in self._face:
            self._face[path] = self.m.face.analyze_path(path)
        return self._face[path]

    def ref_face(self, path: Path) -> Any:
        if path not in self._ref_face:
            # references are real photos: never use the centre fallback for them
            saved = getattr(self.m.face, "fallback", "none")
            try:
                self.m.face.fallback = "none"
                self._ref_face[path] = self.m.face.analyze_path(path)
            finally:
                self.m.face.fallback = saved
        return self._ref_face[path]

    def all_faces(self, path: Path, image: Image.Image) -> list[Any]:
        """Every detected face of a generated image, highest score first (no centre fallback)."""
        import numpy as np

        if path not in self._all:
            self._all[path] = self.m.face.analyze_all(np.asarray(image.convert("RGB")))
        return self._all[path]

    def geometry(self, path: Path, face: Any, image: Image.Image | None = None) -> Any:
        """Landmarks, head pose and expression class of ``face`` in the image at ``path`` (cached)."""
        import numpy as np

        from spatialid.evaluation.face_geometry import geometry_of

        if face is None:
            return None
        key = (path, tuple(face.box))
        if key not in self._geo:
            self._geo[key] = geometry_of(face, np.asarray(image if image is not None else load_rgb(path)))
        return self._geo[key]

    def _field_columns(self, item: EvalItem, image: Image.Image) -> dict[str, Any]:
        """The field's columns for one image (any number of people): count accuracy, ID-Conf, Sim(Ref),
        Sim(GT) and CP, LandmarkDiff / PoseDiv / ExprDiv (see :mod:`.multi_metrics`, :mod:`.face_geometry`)."""
        from spatialid.evaluation.multi_metrics import score_persons

        persons = list(item.people) or ([item.reference] if item.reference is not None else [])
        if not persons or not all(self.readable(p) for p in persons):
            return {}
        refs = [self.ref_face(p) for p in persons]
        row: dict[str, Any] = {"group_size": len(persons)}
        if any(r is None for r in refs):
            return row  # a reference without a face: nothing to compare with
        faces = self.all_faces(item.image, image)
        found = len(faces)
        if not faces and getattr(self.m.face, "fallback", "none") == "center":
            stand_in = self.face(item.image)  # the tiny evaluation's centre box: every column gets a value
            faces = [stand_in] if stand_in is not None else []
        gts = []
        for j in range(len(persons)):
            paths = [g for g in (item.gt[j] if j < len(item.gt) else ()) if self.readable(g)]
            gts.append([f.embedding for f in (self.ref_face(g) for g in paths) if f is not None])
        columns, people = score_persons(
            [f.embedding for f in faces], [r.embedding for r in refs], gts,
            [self.geometry(item.image, f, image) for f in faces], [self.geometry(p, r) for p, r in zip(persons, refs)],
            faces_found=found,
        )
        row.update(columns)
        row["persons"] = people
        return row

    @staticmethod
    def _mask_inside(item: EvalItem) -> list[float]:
        """Share of each person's recorded mask inside their region (bench groups with regions)."""
        from spatialid.app.metadata import read_png_metadata
        from spatialid.bench.results import masks_file
        from spatialid.evaluation.multi_person import mask_share_inside
        from spatialid.pipeline.people import load_mask_file, regions_tensor

        path = masks_file(item.image)
        if not path.is_file():
            return []
        try:
            boxes = region_boxes(read_png_metadata(item.image).get("regions") or [])
            if boxes is None:
                return []
            masks, _ = load_mask_file(path)
            rows, cols = masks.shape[-2:]
            grid = regions_tensor(boxes, len(boxes), int(rows), int(cols)).reshape(len(boxes), int(rows), int(cols))
            return mask_share_inside(masks.numpy(), grid.numpy())
        except SpatialIDError as exc:
            log.warning("mask in region of %s not scored: %s", item.key, exc)
            return []

    def _people_columns(self, item: EvalItem, image: Image.Image) -> dict[str, Any]:
        """Several people: faces matched to the people (Hungarian), per-person FaceSim and leakage."""
        import numpy as np

        from spatialid.evaluation.multi_person import score_people

        refs = [self.ref_face(p) for p in item.people]
        if any(r is None for r in refs):
            return {"people_ref_faces": sum(r is not None for r in refs)}
        faces = self.all_faces(item.image, image)
        scores = score_people(
            np.stack([f.embedding for f in faces]) if faces else np.zeros((0, len(refs[0].embedding))),
            np.stack([r.embedding for r in refs]),
            boxes=[f.box for f in faces],
        )
        inside = self._mask_inside(item)
        if inside:
            scores.mask_inside = inside
        return {
            **({"mask_in_region": float(np.nanmean(inside))} if inside and not all(math.isnan(v) for v in inside) else {}),
            "person_face_sim": scores.mean_facesim,
            "identity_leakage": scores.mean_leakage,
            "people_found": float(sum(i is not None for i in scores.face_index)) / len(refs),
            "people_swapped": 1.0 if scores.swapped else 0.0,
            "people": scores.to_dict(),
        }

    def score(self, item: EvalItem) -> dict[str, Any] | None:
        """The item's row, or None when its own image cannot be read (``bad`` says why)."""
        try:
            return self._score(item)
        except UnreadableImageError as exc:  # decoded by PIL, refused by a face model's own reader
            self.bad[exc.path] = exc.reason
            log.warning("skipping %s: %s", item.key, exc)
            return None

    def _score(self, item: EvalItem) -> dict[str, Any] | None:
        image = self.load(item.image)
        if image is None:
            return None
        row: dict[str, Any] = {
            "preset": item.preset, "key": item.key, "unit": item.unit_key, "identity": item.identity,
            "prompt": item.prompt, "image": str(item.image),
            "without_id": None,
            "file_stats": file_stats(item),
        }
        unreadable: dict[str, str] = {}
        without_id, baseline_path, reference = item.without_id, item.baseline, item.reference
        for path in {p for p in (without_id, baseline_path, reference) if p is not None and p.is_file()}:
            if not self.readable(path):
                unreadable[str(path)] = self.bad[path]
        if without_id is not None and str(without_id) in unreadable:
            without_id = None
        if baseline_path is not None and str(baseline_path) in unreadable:
            baseline_path = None
        if reference is not None and str(reference) in unreadable:
            reference = None
        if unreadable:
            row["unreadable"] = unreadable  # kept with the cached row: still reported when it is reused
        row["without_id"] = str(without_id) if without_id is not None else None
        feat = self.feature(item.image, image)
        row["clip_t"] = float((feat * self.text(item.prompt)).sum())
        row["clip_ref"] = float((feat * self.feature(reference)).sum()) if reference else math.nan
        if without_id is not None:
            row["clip_i"] = float((feat * self.feature(without_id)).sum())
        face = None
        if self.m.face is not None:
            face = self.face(item.image)
            ref_face = self.ref_face(reference) if reference else None
            ref_emb = ref_face.embedding if ref_face is not None else None
            row["face_det"] = 1.0 if face is not None and face.detected else 0.0
            row["face_source"] = face.source if face is not None else "none"
            row["face_sim"] = cosine(face.embedding, ref_emb) if face is not None else math.nan
            if reference is not None:
                row["ref_face_found"] = ref_face is not None
            if without_id is not None:
                other = self.face(without_id)
                row["anti_face_sim"] = cosine(other.embedding, ref_emb) if other is not None else math.nan
                row["without_id_face_source"] = other.source if other is not None else "none"
        if self.m.face is not None and hasattr(self.m.face, "analyze_all"):
            row.update(self._field_columns(item, image))
            if item.people:
                row.update(self._people_columns(item, image))
        if self.m.quality is not None:
            from spatialid.evaluation.quality import IBENCH_VALUE_RANGE

            row["iq"] = float(self.m.quality.score([image], value_range=IBENCH_VALUE_RANGE)[0])
            row["iq_01"] = float(self.m.quality.score([image], value_range=1.0)[0])
        if self.m.aesthetic is not None:
            row["aesthetic"] = float(self.m.aesthetic.score([image])[0])
        if baseline_path is not None and baseline_path.is_file():
            baseline = load_rgb(baseline_path)
            boxes = [face.box] if face is not None else []
            base_face = self.face(baseline_path) if self.m.face is not None else None
            if base_face is not None and base_face.detected:
                boxes.append(base_face.box)
            if boxes:
                mask = face_region_mask(image.width, image.height, boxes)
                row.update(background_change(image, baseline, mask, clip=self.m.clip, lpips_model=self.m.lpips, prompt=item.prompt))
        return row
