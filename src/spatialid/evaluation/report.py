"""Report files: JSON of every number, Markdown and CSV tables, and plots.

Tables have one row per preset and one column per metric; cells are ``mean ± half-width of the 95%
CI``; arrows in the header say whether higher or lower is better and the best identity preset of
each column is in bold (the ``none`` row, generated without identity, is a reference, not a
contender: it trivially wins the text and background columns). FID is one number per preset (a
distance between two image sets), so it has no interval. When any metric model has random weights,
every file says so in its first lines and each such column is marked ``[random]``. Presets the
SpatialID paper reports get a block with the paper's numbers beside the run's, marked as quoted.

Beside each preset's ``n`` stands the ``expected`` number of items of its bench grid, so a killed
run cannot pass for a finished one; missing items and skipped (unreadable) images are listed.
Presets scored on different items are not ranked (no bold, no paired differences), or, with
``--allow-incomplete``, ranked in a second table on the items every preset has.
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

from spatialid.evaluation.columns import METRICS, Metric
from spatialid.evaluation.group_report import group_markdown, other_benchmark_json
from spatialid.evaluation.paper import PAPER_SOURCE, PaperRow
from spatialid.evaluation.stats import CI_METHOD, Summary

__all__ = [
    "METRICS",
    "RANKED_ALL",
    "RANKED_COMMON",
    "Metric",
    "ReportData",
    "best_presets",
    "common_table",
    "markdown_table",
    "paper_table",
    "write_report",
]

REFERENCE_PRESET = "none"
RANKED_ALL = "all items"  # ReportData.ranked_on: every preset has the same items
RANKED_COMMON = "common items"  # --allow-incomplete: ranked on the items every preset has
SHOW = 5  # missing keys / skipped files named in Markdown (report.json lists all)


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
    random_groups: list[str] = field(default_factory=list)  # model groups with random weights
    paper: dict[str, PaperRow] = field(default_factory=dict)  # preset -> the paper's row
    expected: dict[str, int] = field(default_factory=dict)  # bench preset -> items of its grid
    missing: dict[str, dict[str, Any]] = field(default_factory=dict)  # bench preset -> {"count", "failed", "keys"}
    ranked_on: str | None = RANKED_ALL  # RANKED_ALL, RANKED_COMMON or None (presets not ranked)
    common_items: int | None = None  # RANKED_COMMON: how many items every preset has
    common_summaries: dict[str, dict[str, Summary]] = field(default_factory=dict)  # RANKED_COMMON: on those items
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable image files: {"file", "reason"}
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # preset -> group size -> field columns

    def is_random(self, metric: Metric) -> bool:
        return metric.group in self.random_groups

    @property
    def complete(self) -> bool:
        """Every bench preset has every item of its grid (IBench .json methods have no grid)."""
        return not any(m.get("count") for m in self.missing.values())

    def incomplete_message(self) -> str:
        """One line for an incomplete run: what is missing and how to go on."""
        short = {p: m for p, m in self.missing.items() if m.get("count")}
        parts = [f"{p} has {self.expected[p] - m['count']} of {self.expected[p]}" for p, m in short.items()]
        shown = ", ".join(parts[:6]) + (f" and {len(parts) - 6} more presets" if len(parts) > 6 else "")
        first = next(iter(short.values()))["keys"][0] if short else ""
        ranked = "not ranked (the presets have different items)" if self.ranked_on is None else "ranked on the items they have"
        return (
            f"the bench results are incomplete: {shown} expected items (missing e.g. {first}); the report has the "
            f"per-preset numbers, {ranked}: re-run the same `spatialid bench` command to finish the run (or "
            "`spatialid merge` all its shard folders), or pass --allow-incomplete to rank the presets on the items "
            "every one of them has"
        )

    def completeness_json(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "expected": {p: self.expected.get(p) for p in self.presets},
            "missing": self.missing,
            "ranked_on": self.ranked_on,
            "common_items": self.common_items,
            "common": (
                {p: {k: s.to_dict() for k, s in d.items()} for p, d in self.common_summaries.items()}
                if self.ranked_on == RANKED_COMMON else None
            ),
        }

    def paper_json(self) -> dict[str, Any] | None:
        if not self.paper:
            return None
        rows = {}
        for p, row in self.paper.items():
            run = {}
            for k in row.values:
                s = self.summaries.get(p, {}).get(k)
                run[k] = s.mean if s is not None and math.isfinite(s.mean) else None
            rows[p] = {"paper_row": row.name, "paper": dict(row.values), "run": run, "note": row.note or None}
        return {
            "source": PAPER_SOURCE,
            "quoted": "numbers under 'paper' are the paper's, copied from its table; 'run' are this evaluation's means",
            "run_random_weights": self.random_weights,
            "rows": rows,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "random_weights": self.random_weights,
            "warning": RANDOM_WARNING if self.random_weights else None,
            "ci_method": CI_METHOD,
            "models": self.models,
            "settings": self.settings,
            "metrics": [
                {
                    "key": m.key, "title": m.title, "higher_is_better": m.higher_is_better, "ranked": m.ranked,
                    "per_image": m.per_image, "description": m.desc or None, "model": self.models.get(m.group),
                    "random_weights": self.is_random(m),
                }
                for m in self.metrics
            ],
            "presets": {
                p: {m.key: self.summaries[p][m.key].to_dict() for m in self.metrics} for p in self.presets
            },
            "best": best_presets(self),
            "completeness": self.completeness_json(),
            "skipped_count": len(self.skipped),
            "skipped_images": self.skipped,
            "paired_reference": self.paired_reference,
            "paired_differences": {
                p: {k: s.to_dict() for k, s in d.items()} for p, d in self.paired.items()
            },
            "paper": self.paper_json(),
            "groups": self.groups or None,
            "other_benchmark": other_benchmark_json() if self.groups else None,
            "notes": self.notes,
        }


RANDOM_WARNING = (
    "Some metric models have RANDOM WEIGHTS (offline test stand-ins): the numbers below exercise the "
    "evaluation code only and say nothing about image quality or identity."
)


def best_presets(data: ReportData) -> dict[str, str | None]:
    """Best identity preset per metric (``none`` excluded; ties -> first in row order).

    Nobody is best when the presets were scored on different items (``ranked_on`` None); with
    ``--allow-incomplete`` the means over the items every preset has decide.
    """
    best: dict[str, str | None] = {}
    summaries, presets = data.summaries, data.presets
    if data.ranked_on == RANKED_COMMON:
        summaries = data.common_summaries
        presets = [p for p in data.presets if p in summaries]
    for m in data.metrics:
        if not m.ranked or data.ranked_on is None:
            best[m.key] = None
            continue
        candidates = [
            (p, summaries[p][m.key].mean)
            for p in presets
            if p != REFERENCE_PRESET and math.isfinite(summaries[p][m.key].mean)
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


def _header(data: ReportData, m: Metric) -> str:
    return f"{m.header} [random]" if data.is_random(m) else m.header


def markdown_table(data: ReportData) -> str:
    """One row per preset: n, the expected n of its bench grid (— for IBench .json methods), the metrics."""
    best = best_presets(data) if data.ranked_on == RANKED_ALL else {}
    return _table(data, data.presets, data.summaries, best, expected=True)


def common_table(data: ReportData) -> str:
    """``--allow-incomplete``: the bench presets on the items every one of them has, best in bold."""
    presets = [p for p in data.presets if p in data.common_summaries]
    return _table(data, presets, data.common_summaries, best_presets(data), expected=False)


def _table(data: ReportData, presets: Sequence[str], summaries: Mapping[str, Mapping[str, Summary]],
           best: Mapping[str, str | None], *, expected: bool) -> str:
    header = ["Preset", "n"] + (["expected"] if expected else []) + [_header(data, m) for m in data.metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in presets:
        cells = [_preset_label(p), str(_n(summaries[p], data.metrics))]
        if expected:
            cells.append(str(data.expected[p]) if p in data.expected else "—")
        for m in data.metrics:
            c = _cell(m, summaries[p][m.key])
            cells.append(f"**{c}**" if best.get(m.key) == p and c != "n/a" else c)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _n(summaries: Mapping[str, Summary], metrics: Sequence[Metric]) -> int:
    return max((summaries[m.key].count for m in metrics), default=0)


def _completeness_markdown(data: ReportData) -> list[str]:
    """Skipped images, missing items and the ranking status (nothing at all for a complete, readable run)."""
    out: list[str] = []
    if data.skipped:
        named = "; ".join(f"`{s['file']}` ({s['reason']})" for s in data.skipped[:SHOW])
        more = f"; and {len(data.skipped) - SHOW} more" if len(data.skipped) > SHOW else ""
        out += [
            (
                f"**{len(data.skipped)} unreadable image file(s) skipped** (truncated, empty or not an image; left out "
                f"of every column that needs them): {named}{more}. All are listed under `skipped_images` in report.json."
            ),
            "",
        ]
    if not data.complete:
        out += [
            "## Incomplete results",
            "",
            (
                "`expected` is the grid `bench.json` records for each preset (identities x selected prompts x seeds); "
                "these presets lack items:"
            ),
            "",
        ]
        for p, m in data.missing.items():
            if not m.get("count"):
                continue
            failed = f", {m['failed']} of them failed (see `failures` in {p}/results.json)" if m.get("failed") else ""
            keys = ", ".join(f"`{k}`" for k in m["keys"][:SHOW]) + (", ..." if m["count"] > SHOW else "")
            out.append(f"- {p}: {m['count']} missing of {data.expected[p]}{failed}: {keys}")
        out += [
            "",
            (
                "Every missing key is under `completeness.missing` in report.json. Re-run the same `spatialid bench` "
                "command to finish the run (or `spatialid merge` all its shard folders)."
            ),
            "",
        ]
    if data.ranked_on is None:
        counts = ", ".join(f"{p} {_n(data.summaries[p], data.metrics)}" for p in data.presets
                           if p in data.expected and p != REFERENCE_PRESET)
        out += [
            (
                f"**Not ranked**: the presets with identity were scored on different items ({counts}), so no preset "
                "is bold and no paired differences are shown; `--allow-incomplete` ranks them on the items every one "
                "of them has."
            ),
            "",
        ]
    elif data.ranked_on == RANKED_COMMON:
        out += [
            f"## Ranked on the {data.common_items} item(s) every preset has",
            "",
            (
                "`--allow-incomplete`: the table above has each preset's numbers over all its items (not ranked); "
                "this one uses only the items (identity, prompt, seed) that every preset with identity has, and "
                "decides the bold and the paired differences."
            ),
            "",
            common_table(data),
            "",
        ]
    return out


def _paired_table(data: ReportData) -> str:
    metrics = [m for m in data.metrics if m.per_image and m.ranked]
    header = ["Preset"] + [f"Δ {_header(data, m)}" for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p, diffs in data.paired.items():
        cells = [p]
        for m in metrics:
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


def paper_table(data: ReportData) -> str:
    """The paper's numbers and this run's, two rows per preset the paper reports."""
    by_key = {m.key: m for m in METRICS}
    keys = [k for k in ("iq", "clip_i", "clip_t", "face_sim") if any(k in row.values for row in data.paper.values())]
    header = ["Preset", "Numbers"] + [by_key[k].header for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    run_label = "this run (RANDOM-WEIGHT models)" if data.random_weights else "this run"
    for p, row in data.paper.items():
        quoted = [f"{row.values[k]:.3f}" if k in row.values else "—" for k in keys]
        lines.append("| " + " | ".join([p, f"**paper** ({row.name}), quoted", *quoted]) + " |")
        ours = []
        for k in keys:
            s = data.summaries.get(p, {}).get(k)
            ours.append(_cell(by_key[k], s) if s is not None else "n/a")
        lines.append("| " + " | ".join([p, run_label, *ours]) + " |")
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
        "same prompt and seed generated without identity, outside the face region (see docs/benchmark.md). "
        "FID is one number per preset (no interval)."
        + (" `[random]` = column computed with a RANDOM-WEIGHT stand-in model." if data.random_groups else ""),
        "",
    ]
    out += _completeness_markdown(data)
    out += group_markdown(data.groups, data.models.get("face", "n/a"))
    if data.paper:
        notes = [f"{p}: {row.note}" for p, row in data.paper.items() if row.note]
        out += [
            "## The paper's numbers (quoted, not computed here)",
            "",
            (
                f"Source: {PAPER_SOURCE}. The paper's rows are copied from its table; the rows below them are this "
                "run's means of the same IBench metrics."
            ),
            "",
            paper_table(data),
            "",
        ]
        if notes:
            out += [f"Note: {'; '.join(notes)}.", ""]
    if data.paired:
        out += [
            f"## Paired differences vs `{data.paired_reference}` (same identity, prompt and seed"
            + (f"; the {data.common_items} item(s) every preset has" if data.ranked_on == RANKED_COMMON else "") + ")",
            "",
            _paired_table(data),
            "",
            "`*` = the 95% interval of the paired difference excludes 0.",
            "",
        ]
    out += ["## Metric models", ""]
    for m in data.metrics:
        what = f"{m.desc}. " if m.desc else ""
        out.append(f"- **{m.title}**: {what}Model: {data.models.get(m.group, 'n/a')}")
    out.append("")
    if data.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in data.notes] + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(out)


def csv_table(data: ReportData) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    header = ["preset", "random_weights", "expected"]
    for m in data.metrics:
        header += [f"{m.key}_mean", f"{m.key}_std", f"{m.key}_n", f"{m.key}_ci_low", f"{m.key}_ci_high"]
    w.writerow(header)
    for p in data.presets:
        row: list[Any] = [p, int(data.random_weights), data.expected.get(p, "")]
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
        placed: list[tuple[str, float, float]] = []
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
            placed.append((p, fs.mean, ct.mean))
        ax.autoscale_view()
        _annotate_apart(fig, ax, placed)
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


#: Where a point's label may go, in points from the point (right-up first, then around it).
_LABEL_SPOTS = ((5, 5), (5, -11), (-5, 5), (-5, -11), (0, 12), (0, -18), (12, 0), (-12, 0), (10, 16), (-10, -24))


def label_positions(points: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Offsets (from :data:`_LABEL_SPOTS`) so that no two label boxes overlap where avoidable.

    ``points`` are display positions and ``sizes`` the labels' (width, height), both in points.
    Greedy: each label takes the first spot that overlaps no label placed before it (the
    least-overlapping spot when all do), so close presets on the trade-off plot stay readable.
    """
    boxes: list[tuple[float, float, float, float]] = []
    chosen: list[tuple[float, float]] = []

    def box(x: float, y: float, dx: float, dy: float, w: float, h: float) -> tuple[float, float, float, float]:
        left = x + dx if dx >= 0 else x + dx - w
        left = left - w / 2 if dx == 0 else left
        return left, y + dy, left + w, y + dy + h

    def overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    for (x, y), (w, h) in zip(points, sizes):
        best, best_cost = _LABEL_SPOTS[0], math.inf
        for dx, dy in _LABEL_SPOTS:
            candidate = box(x, y, dx, dy, w, h)
            cost = sum(overlap(candidate, other) for other in boxes)
            if cost < best_cost:
                best, best_cost = (dx, dy), cost
            if cost == 0:
                break
        boxes.append(box(x, y, *best, w, h))
        chosen.append(best)
    return chosen


def _annotate_apart(fig: Any, ax: Any, placed: Sequence[tuple[str, float, float]], fontsize: float = 8) -> None:
    """Label each point with its preset name, the labels moved apart (:func:`label_positions`)."""
    if not placed:
        return
    to_points = 72.0 / fig.dpi
    points = [tuple(v * to_points for v in ax.transData.transform((x, y))) for _, x, y in placed]
    sizes = [(0.6 * fontsize * len(name), fontsize * 1.2) for name, _, _ in placed]  # a font's usual box
    for (name, x, y), (dx, dy) in zip(placed, label_positions(points, sizes)):
        ax.annotate(
            name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
            ha="left" if dx > 0 else ("right" if dx < 0 else "center"),
        )


def _save_fig(fig: Any, path: Path) -> None:
    from spatialid.utils.io import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with atomic_write(path) as handle:
        handle.write(buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    from spatialid.utils.io import atomic_write

    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))


def write_report(data: ReportData, out_dir: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.csv``, ``per_image.json`` and plots."""
    from spatialid.utils.io import atomic_write_json

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
