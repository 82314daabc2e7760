"""IBench's FID per preset (images with identity against images without), with features cached on disk.

FID is a set-level number, so it is computed after the per-image rows, from the files the rows
found readable; the Inception features of each file are kept in ``fid_features.npz`` next to the
report and reused while the file is unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spatialid.bench.grid import BASELINE_PRESET
from spatialid.evaluation.inputs import UnreadableImageError, load_rgb
from spatialid.evaluation.scoring import file_stat
from spatialid.evaluation.sources import EvalItem
from spatialid.evaluation.stats import Summary

__all__ = ["FID_CACHE_NAME", "fid_summaries"]

log = logging.getLogger("spatialid.eval")

FID_CACHE_NAME = "fid_features.npz"


class _FidCache:
    """FID features per image file (path, size, mtime) in one ``.npz`` next to the report."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.feats: dict[str, np.ndarray] = {}
        self.dirty = False
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    if str(z["fingerprint"]) == fingerprint:
                        self.feats = dict(zip((str(k) for k in z["keys"]), z["feats"]))
            except (OSError, ValueError, KeyError):
                log.warning("FID feature cache %s unreadable; computing the features again", path)

    @staticmethod
    def key(path: Path) -> str:
        size, mtime = file_stat(path)
        return f"{path.resolve()}|{size}|{mtime}"

    def get(self, paths: Sequence[Path], extractor: Any, bar: Any = None, bad: dict[str, str] | None = None) -> np.ndarray:
        """Features of the readable ``paths``; an unreadable one is left out and added to ``bad``."""
        out = []
        for p in paths:
            k = self.key(p)
            if k not in self.feats:
                try:
                    image = load_rgb(p)
                except UnreadableImageError as exc:
                    if bad is not None:
                        bad.setdefault(str(p), exc.reason)
                    if bar is not None:
                        bar.update(1)
                    continue
                self.feats[k] = extractor.features([image])[0]
                self.dirty = True
            out.append(self.feats[k])
            if bar is not None:
                bar.update(1)
        return np.stack(out) if out else np.empty((0, extractor.dims), dtype=np.float32)

    def save(self) -> None:
        if not self.dirty or not self.feats:
            return
        import io

        from spatialid.utils.io import atomic_write_bytes

        keys = list(self.feats)
        buffer = io.BytesIO()  # features are small (2048 floats per image): encode, then one atomic write
        np.savez(buffer, fingerprint=np.array(self.fingerprint), keys=np.array(keys), feats=np.stack([self.feats[k] for k in keys]))
        atomic_write_bytes(self.path, buffer.getvalue())


def fid_summaries(
    items: Sequence[EvalItem], order: Sequence[str], extractor: Any, out: Path, progress: bool,
    bad: dict[str, str] | None = None,
) -> tuple[dict[str, Summary], list[str]]:
    """IBench's FID per preset: its images with identity vs the images without identity.

    Files in ``bad`` (unreadable) are left out of both sets; any other found unreadable is added.
    """
    from spatialid.evaluation.fid import fid_from_features, ibench_fid_files

    nan = math.nan
    bad = bad if bad is not None else {}
    sets: dict[str, tuple[list[Path], list[Path]]] = {}
    notes: list[str] = []
    for p in order:
        mine = [it for it in items if it.preset == p and str(it.image) not in bad]
        if p == BASELINE_PRESET or not mine:
            continue
        with_files = ibench_fid_files(it.image for it in mine)
        without_files = ibench_fid_files(
            it.without_id for it in mine if it.without_id is not None and str(it.without_id) not in bad
        )
        lacking = sum(it.without_id is None for it in mine)
        if lacking and without_files:
            notes.append(f"FID of {p}: {lacking} of {len(mine)} images have no image without identity (left out of that set).")
        if without_files:
            sets[p] = (with_files, without_files)
    cache = _FidCache(out / FID_CACHE_NAME, extractor.label)
    bar = None
    if progress and sets:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(a) + len(b) for a, b in sets.values()), desc="fid", unit="img", dynamic_ncols=True)
    result: dict[str, Summary] = {}
    try:
        for p, (with_files, without_files) in sets.items():
            value = fid_from_features(cache.get(with_files, extractor, bar, bad), cache.get(without_files, extractor, bar, bad))
            if math.isfinite(value):
                result[p] = Summary(value, nan, len(with_files), nan, nan)
            elif len(with_files) >= 2 and len(without_files) >= 2:
                notes.append(f"FID of {p} is not computable (the covariance square root is complex), as IBench would fail.")
    finally:
        if bar is not None:
            bar.close()
        cache.save()
    return result, notes
