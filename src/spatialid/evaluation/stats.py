"""Summary statistics of per-image metric values: mean, standard deviation, count and 95% CI.

The confidence interval is the Student-t interval of the mean, ``mean ± t(0.975, n-1) * std / sqrt(n)``
with the sample standard deviation (``ddof=1``). It treats images as independent draws, which is
the usual reading of a benchmark table; images of one identity are correlated, so the interval is
somewhat optimistic for few identities. :func:`paired_difference` compares two presets on the
items they share (same identity, prompt and seed), which removes most of that between-item
variance and is the right test for "is preset A better than B".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["CI_METHOD", "Summary", "paired_difference", "summarize", "t_quantile"]

CI_METHOD = "Student-t 95% interval of the mean (ddof=1); NaN values (metric not available for an image) excluded"


def t_quantile(df: int, q: float = 0.975) -> float:
    """Quantile of Student's t distribution (scipy when present; normal approximation otherwise)."""
    try:
        from scipy import stats

        return float(stats.t.ppf(q, df))
    except ImportError:  # pragma: no cover - scipy comes with scikit-image
        z = 1.959963984540054
        # Cornish-Fisher style correction, accurate to ~1e-3 for df >= 3
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Summary:
    """Statistics of one metric over one preset's images."""

    mean: float
    std: float
    count: int
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    def to_dict(self) -> dict[str, float | int | None]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def summarize(values: Iterable[float | None]) -> Summary:
    """Mean, sample std, count and t-interval of the finite values (n=0 -> NaN; n=1 -> no interval)."""
    arr = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(arr.mean())
    if n == 1:
        return Summary(mean, math.nan, 1, math.nan, math.nan)
    std = float(arr.std(ddof=1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return Summary(mean, std, n, mean - half, mean + half)


def paired_difference(a: Mapping[str, float], b: Mapping[str, float]) -> Summary:
    """Statistics of ``a[k] - b[k]`` over the keys both have with finite values."""
    diffs = [a[k] - b[k] for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None]
    return summarize(diffs)
