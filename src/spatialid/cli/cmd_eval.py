"""``spatialid eval``: score bench outputs and write the report (JSON, Markdown, CSV, plots)."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["register", "run"]

log = logging.getLogger("spatialid.eval")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score bench outputs: CLIP-T, CLIP-I, FaceSim, IQ, background contamination; tables and plots",
        description=(
            "Compute per-image metrics for every preset of a bench output folder (and/or IBench results .json "
            "files of other methods), then per-preset mean, std, count and 95%% CI, written as report.json, "
            "report.md, report.csv and plots/ in --out. '--model tiny' uses offline random-weight metric models "
            "(labelled as such in every file): for testing the evaluation only."
        ),
    )
    p.add_argument("sources", nargs="+", metavar="DIR", help="bench output folder(s) or IBench results .json file(s)")
    p.add_argument("--out", default=None, help="report folder (default: DIR/report)")
    p.add_argument("--model", choices=("real", "tiny"), default="real", help="real metric models (default) or tiny random-weight ones (offline tests)")
    p.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name for CLIP-T/CLIP-I (default ViT-L-14)")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag or checkpoint file (default openai)")
    p.add_argument("--face-model", choices=("arcface", "dlib"), default="arcface", help="FaceSim backend: arcface (insightface antelopev2, as papers) or dlib (offline alternative, labelled)")
    p.add_argument("--iq-metric", default="musiq-spaq", help="pyiqa no-reference metric for IQ (default musiq-spaq, reported /100), or 'none'")
    p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=None, help="background LPIPS (default: when the lpips package is installed)")
    p.add_argument("--face-fallback", choices=("none", "center"), default=None, help="score images without a detected face on a centred box (default: none; tiny: center)")
    p.add_argument("--presets", default=None, help="only these presets (comma-separated)")
    p.add_argument("--reference", default="pulid", help="preset for the paired-difference table (default pulid)")
    p.add_argument("--id-root", default=None, help="folder to look for reference photos whose recorded paths do not exist here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--models-dir", default=None, help="folder with the antelopev2 ONNX files (default $SPATIALID_MODELS_DIR or ~/.cache/spatialid/models)")
    p.add_argument("--offline", action="store_true", help="never download metric weights")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spatialid.bench.results import BenchStateError
    from spatialid.cli.cmd_generate import resolve_device
    from spatialid.evaluation.evaluate import MetricModels, evaluate

    for src in args.sources:
        p = Path(src)
        if not p.exists():
            raise BenchStateError(f"{p} does not exist (give a bench --out folder or an IBench results .json)")
    out = Path(args.out) if args.out else Path(args.sources[0]) / "report"
    if Path(args.sources[0]).is_file() and not args.out:
        out = Path(args.sources[0]).parent / "report"
    presets = [s.strip() for s in args.presets.split(",") if s.strip()] if args.presets else None
    device = resolve_device(args.device)
    if args.model == "tiny":
        log.warning("--model tiny: random-weight metric models; the numbers test the evaluation code only")
        models = MetricModels.tiny(device=device)
        if args.face_fallback == "none":
            models.face.fallback = "none"
    else:
        models = MetricModels.real(
            clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained,
            face_model=args.face_model,
            iq_metric=args.iq_metric,
            lpips=args.lpips,
            face_fallback=args.face_fallback or "none",
            device=device,
            models_dir=args.models_dir,
            offline=True if args.offline else None,
        )
    data, files = evaluate(
        args.sources,
        models,
        out,
        presets=presets,
        id_root=args.id_root,
        reference_preset=args.reference,
        progress=not args.no_progress and not args.quiet,
        plots=not args.no_plots,
    )
    from spatialid.evaluation.report import markdown_table

    print(markdown_table(data))
    if data.random_weights:
        print("(random-weight metric models: test values only)", file=sys.stderr)
    print(f"report written to {files['markdown']} (also report.json, report.csv, plots/)", file=sys.stderr)
    return 0
