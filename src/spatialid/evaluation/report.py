"""Report files: JSON of every number, Markdown and CSV tables, and plots.

Tables have one row per preset and one column per metric; cells are ``mean ± half-width of the 95%
CI``; arrows in the header say whether higher or lower is better and the best identity preset of
each column is in bold (the ``none`` row, generated without identity, is a reference, not a
contender: it trivially wins the text and background columns). When any metric model has random
weights, every file says so in its first lines.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spatialid.evaluation.stats import CI_METHOD, Summary

__all__ = ["METRICS", "Metric", "ReportData", "best_presets", "write_report"]

REFERENCE_PRESET = "none"


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    higher_is_better: bool
    group: str  # which model computes it (key into ReportData.models)
    fmt: str = "{:.3f}"

    @property
    def header(self) -> str:
        return f"{self.title} {'↑' if self.higher_is_better else '↓'}"


METRICS: tuple[Metric, ...] = (
    Metric("clip_t", "CLIP-T", True, "clip"),
    Metric("clip_i", "CLIP-I", True, "clip"),
    Metric("face_sim", "FaceSim", True, "face"),
    Metric("face_det", "Face det.", True, "face"),
    Metric("iq", "IQ", True, "quality"),
    Metric("bg_lpips", "BG LPIPS", False, "lpips"),
    Metric("bg_clip_dist", "BG CLIP dist.", False, "clip", "{:.4f}"),
    Metric("bg_mae", "BG MAE", False, "pixels"),
    Metric("bg_clip_t", "BG CLIP-T", True, "clip"),
)


@dataclass
class ReportData:
    """Everything a report shows; built by :func:`spatialid.evaluation.evaluate.evaluate`."""

    sources: list[str]
    presets: list[str]
    metrics: list[Metric]
    summaries: dict[str, dict[str, Summary]]  # preset -> metric key -> summary
    models: dict[str, str]  # group -> label of the model used
    random_weights: bool
    per_image: list[dict[str, Any]] = field(default_factory=list)
    paired: dict[str, dict[str, Summary]] = field(default_factory=dict)  # preset -> metric -> (preset - reference)
    paired_reference: str | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "random_weights": self.random_weights,
            "warning": RANDOM_WARNING if self.random_weights else None,
            "ci_method": CI_METHOD,
            "models": self.models,
            "settings": self.settings,
            "metrics": [
                {"key": m.key, "title": m.title, "higher_is_better": m.higher_is_better, "model": self.models.get(m.group)}
                for m in self.metrics
            ],
            "presets": {
                p: {m.key: self.summaries[p][m.key].to_dict() for m in self.metrics} for p in self.presets
            },
            "best": best_presets(self),
            "paired_reference": self.paired_reference,
            "paired_differences": {
                p: {k: s.to_dict() for k, s in d.items()} for p, d in self.paired.items()
            },
            "notes": self.notes,
        }


RANDOM_WARNING = (
    "Some metric models have RANDOM WEIGHTS (offline test stand-ins): the numbers below exercise the "
    "evaluation code only and say nothing about image quality or identity."
)


def best_presets(data: ReportData) -> dict[str, str | None]:
    """Best identity preset per metric (``none`` excluded; ties -> first in row order)."""
    best: dict[str, str | None] = {}
    for m in data.metrics:
        candidates = [
            (p, data.summaries[p][m.key].mean)
            for p in data.presets
            if p != REFERENCE_PRESET and math.isfinite(data.summaries[p][m.key].mean)
        ]
        if not candidates:
            best[m.key] = None
            continue
        if len({round(v, 12) for _, v in candidates}) == 1 and len(candidates) > 1:
            best[m.key] = None  # all equal: nobody is best
            continue
        pick = max if m.higher_is_better else min
        best[m.key] = pick(candidates, key=lambda pv: pv[1])[0]
    return best


def _cell(metric: Metric, s: Summary) -> str:
    if s.count == 0 or not math.isfinite(s.mean):
        return "n/a"
    text = metric.fmt.format(s.mean)
    if math.isfinite(s.half_width):
        text += " ± " + metric.fmt.format(s.half_width)
    return text


def _preset_label(p: str) -> str:
    return f"{p} (no identity, reference)" if p == REFERENCE_PRESET else p


def markdown_table(data: ReportData) -> str:
    best = best_presets(data)
    header = ["Preset", "n"] + [m.header for m in data.metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in data.presets:
        n = max((data.summaries[p][m.key].count for m in data.metrics), default=0)
        cells = [_preset_label(p), str(n)]
        for m in data.metrics:
            c = _cell(m, data.summaries[p][m.key])
            cells.append(f"**{c}**" if best.get(m.key) == p and c != "n/a" else c)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired_table(data: ReportData) -> str:
    header = ["Preset"] + [f"Δ {m.header}" for m in data.metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p, diffs in data.paired.items():
        cells = [p]
        for m in data.metrics:
            s = diffs.get(m.key)
            if s is None or s.count == 0 or not math.isfinite(s.mean):
                cells.append("n/a")
                continue
            text = f"{s.mean:+.3f}"
            if math.isfinite(s.half_width):
                text += f" ± {s.half_width:.3f}"
                if s.ci_low > 0 or s.ci_high < 0:
                    text += " *"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(data: ReportData, plots: Sequence[str] = ()) -> str:
    out = ["# SpatialID benchmark report", ""]
    if data.random_weights:
        out += [f"> **WARNING:** {RANDOM_WARNING}", ""]
    out += [f"Sources: {', '.join(f'`{s}`' for s in data.sources)}", ""]
    if data.settings:
        s = data.settings
        bits = [f"{k}={s[k]}" for k in ("model", "pulid", "steps", "width", "height", "guidance", "id_weight", "true_cfg") if k in s]
        out += [f"Generation settings: {', '.join(bits)}", ""]
    out += [markdown_table(data), ""]
    out += [
        "Cells: mean ± half-width of the 95% confidence interval (Student t over images); ↑ higher is better, "
        "↓ lower is better; **bold** = best preset with identity. `BG` columns compare each image with the "
        "same prompt and seed generated without identity, outside the face region (see docs/benchmark.md).",
        "",
    ]
    if data.paired:
        out += [
            f"## Paired differences vs `{data.paired_reference}` (same identity, prompt and seed)",
            "",
            _paired_table(data),
            "",
            "`*` = the 95% interval of the paired difference excludes 0.",
            "",
        ]
    out += ["## Metric models", ""]
    for m in data.metrics:
        out.append(f"- **{m.title}**: {data.models.get(m.group, 'n/a')}")
    out.append("")
    if data.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in data.notes] + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(out)


def csv_table(data: ReportData) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    header = ["preset", "random_weights"]
    for m in data.metrics:
        header += [f"{m.key}_mean", f"{m.key}_std", f"{m.key}_n", f"{m.key}_ci_low", f"{m.key}_ci_high"]
    w.writerow(header)
    for p in data.presets:
        row: list[Any] = [p, int(data.random_weights)]
        for m in data.metrics:
            s = data.summaries[p][m.key]
            row += [_num(s.mean), _num(s.std), s.count, _num(s.ci_low), _num(s.ci_high)]
        w.writerow(row)
    return buf.getvalue()


def _num(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else ""


# ----------------------------------------------------------------------------------------- plots


def _plots(data: ReportData, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    colors = plt.get_cmap("tab10")
    suffix = "\n(RANDOM-WEIGHT metric models: test values only)" if data.random_weights else ""

    metrics = data.metrics
    cols = min(3, max(1, len(metrics)))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        means, errs = [], []
        for p in data.presets:
            s = data.summaries[p][m.key]
            means.append(s.mean if math.isfinite(s.mean) else 0.0)
            errs.append(s.half_width if math.isfinite(s.half_width) else 0.0)
        x = range(len(data.presets))
        ax.bar(x, means, yerr=errs, capsize=3, color=[colors(i % 10) for i in x])
        ax.set_xticks(list(x))
        ax.set_xticklabels(data.presets, rotation=30, ha="right", fontsize=8)
        ax.set_title(m.header, fontsize=10)
        for i, p in enumerate(data.presets):
            if data.summaries[p][m.key].count == 0:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Metrics per preset (bars: mean, whiskers: 95% CI)" + suffix, fontsize=11)
    fig.tight_layout()
    path = folder / "metrics_bars.png"
    _save_fig(fig, path)
    plt.close(fig)
    written.append(path)

    keys = {m.key for m in metrics}
    if {"face_sim", "clip_t"} <= keys:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        any_point = False
        for i, p in enumerate(data.presets):
            fs, ct = data.summaries[p]["face_sim"], data.summaries[p]["clip_t"]
            if not (math.isfinite(fs.mean) and math.isfinite(ct.mean)):
                continue
            any_point = True
            ax.errorbar(
                fs.mean, ct.mean,
                xerr=fs.half_width if math.isfinite(fs.half_width) else None,
                yerr=ct.half_width if math.isfinite(ct.half_width) else None,
                fmt="o", capsize=3, color=colors(i % 10), label=_preset_label(p),
            )
            ax.annotate(p, (fs.mean, ct.mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if not any_point:
            ax.text(0.5, 0.5, "no preset has both FaceSim and CLIP-T", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("FaceSim ↑ (identity)")
        ax.set_ylabel("CLIP-T ↑ (text)")
        ax.set_title("Identity vs text trade-off (95% CI)" + suffix, fontsize=10)
        fig.tight_layout()
        path = folder / "tradeoff_facesim_clipt.png"
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)
    return [str(p) for p in written]


def _save_fig(fig: Any, path: Path) -> None:
    from spatialid.pipeline.metadata import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with atomic_write(path) as handle:
        handle.write(buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    from spatialid.pipeline.metadata import atomic_write

    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))


def write_report(data: ReportData, out_dir: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.csv``, ``per_image.json`` and plots."""
    from spatialid.bench.results import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    plot_paths = _plots(data, out / "plots") if plots else []
    rel_plots = [os.path.relpath(p, out) for p in plot_paths]
    doc = data.to_json()
    doc["plots"] = rel_plots
    atomic_write_json(out / "report.json", doc)
    files["json"] = out / "report.json"
    atomic_write_json(out / "per_image.json", {"random_weights": data.random_weights, "rows": data.per_image})
    files["per_image"] = out / "per_image.json"
    _write_text(out / "report.md", markdown_report(data, rel_plots))
    files["markdown"] = out / "report.md"
    _write_text(out / "report.csv", csv_table(data))
    files["csv"] = out / "report.csv"
    for p in plot_paths:
        files[Path(p).stem] = Path(p)
    return files


def summaries_for(rows: Sequence[Mapping[str, Any]], presets: Sequence[str], metrics: Sequence[Metric]) -> dict[str, dict[str, Summary]]:
    """Per-preset summaries of per-image rows."""
    from spatialid.evaluation.stats import summarize

    return {
        p: {m.key: summarize(r.get(m.key) for r in rows if r["preset"] == p) for m in metrics} for p in presets
    }
