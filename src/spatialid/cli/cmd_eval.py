"""``spatialid eval``: score bench outputs (or any IBench results JSON) with IBench's metrics and write the report."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["register", "run"]

log = logging.getLogger("spatialid.eval")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score bench outputs with IBench's metrics (CLIP-T, CLIP-I, FaceSim, IQ, Aesthetic, FID...) and background contamination",
        description=(
            "Compute IBench's metrics (CLIP-T, CLIP-I = image with vs without identity, FaceSim, AntiFaceSim, IQ, "
            "Aesthetic, FID) plus CLIP-ref, face detection rate, IQ-01 and background contamination for every preset "
            "of a bench output folder (and/or IBench results .json files of any method), then per-preset mean, std, "
            "count and 95% CI, written as report.json, report.md, report.csv and plots/ in --out, with the SpatialID "
            "paper's numbers beside the matching presets. '--model tiny' uses offline random-weight metric models "
            "(labelled as such in every file): for testing the evaluation only. Every source and file is checked "
            "before any metric model loads; unreadable images are skipped and listed; a bench run missing items of "
            "its grid is reported with its expected size and exits with status 2 unless --allow-incomplete."
        ),
    )
    p.add_argument("sources", nargs="+", metavar="DIR", help="bench output folder(s) or IBench results .json file(s)")
    p.add_argument("--out", default=None, help="report folder (default: DIR/report)")
    p.add_argument("--model", choices=("real", "tiny"), default="real", help="real metric models (default) or tiny random-weight ones (offline tests)")
    p.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name for the CLIP columns (default ViT-L-14, IBench's)")
    p.add_argument("--clip-pretrained", default="openai",
                   help="open_clip pretrained tag or a .safetensors checkpoint file (default openai; pickles are refused)")
    p.add_argument("--clip-precision", choices=("auto", "fp32", "fp16"), default="auto",
                   help="CLIP weights' precision; auto = fp16 on CUDA, fp32 on CPU, as IBench's clip.load (default)")
    p.add_argument("--clip-antialias", action=argparse.BooleanOptionalAction, default=True,
                   help="antialias IBench's tensor resize for CLIP-T/CLIP-I (torchvision >= 0.17 default; "
                        "--no-clip-antialias reproduces IBench on older torchvision)")
    p.add_argument("--face-model", choices=("antelopev2", "dlib", "arcface"), default="antelopev2",
                   help="model of every face column: antelopev2 (insightface ArcFace, as IBench and papers; 'arcface' is "
                        "the same) or dlib (face-recognition-models: offline on the CPU, not comparable with ArcFace "
                        "numbers in papers)")
    p.add_argument("--gt", default=None, metavar="PATH",
                   help="other photos of each person, for CP (copy-paste) and Sim(GT): a folder (FOLDER/<photo stem>/* "
                        "or FOLDER/<photo stem>.*) or a JSON file (IBench-style ids with several photos per identity, "
                        "or {reference: [other photos]})")
    p.add_argument("--iq-metric", default="musiq-spaq", help="pyiqa no-reference network for IQ and IQ-01 (default musiq-spaq, reported /100), or 'none'")
    p.add_argument("--aesthetic", action=argparse.BooleanOptionalAction, default=True, help="IBench's AestheticScore (LAION head on CLIP ViT-L/14)")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True, help="IBench's FID, images with vs without identity (pytorch-fid)")
    p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=None, help="background LPIPS (default: when the lpips package is installed)")
    p.add_argument("--face-fallback", choices=("none", "center"), default=None, help="score images without a detected face on a centred box (default: none; tiny: center)")
    p.add_argument("--presets", default=None, help="only these presets (comma-separated)")
    p.add_argument("--reference", default="pulid", help="preset for the paired-difference table (default pulid)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="accept bench results missing items of their grid (a killed run): rank the presets on the items "
                        "every one of them has, and exit 0")
    p.add_argument("--id-root", default=None, help="folder to look for reference photos whose recorded paths do not exist here")
    p.add_argument("--image-root", default=None, help="folder to look for generated images of IBench .json sources whose recorded paths do not exist here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--models-dir", default=None, help="folder with the antelopev2 ONNX files and the LAION aesthetic head (default $SPATIALID_MODELS_DIR or ~/.cache/spatialid/models)")
    p.add_argument("--offline", action="store_true", help="never download metric weights")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spatialid.app.loading import resolve_device
    from spatialid.evaluation.clip_metrics import check_clip_checkpoint
    from spatialid.evaluation.evaluate import MetricModels, evaluate
    from spatialid.evaluation.inputs import (
        IncompleteResultsError,
        check_folder,
        check_output_folder,
        check_source,
    )

    # Everything given is checked first: the metric models take minutes to load.
    for src in args.sources:
        check_source(src)
    out = Path(args.out) if args.out else Path(args.sources[0]) / "report"
    if Path(args.sources[0]).is_file() and not args.out:
        out = Path(args.sources[0]).parent / "report"
    check_output_folder(out)
    check_folder(args.models_dir, "--models-dir", "the folder holding antelopev2/ and laion-aesthetic/ (or leave it out "
                 "for $SPATIALID_MODELS_DIR or ~/.cache/spatialid/models)")
    check_folder(args.id_root, "--id-root", "the folder holding the reference photos")
    check_folder(args.image_root, "--image-root", "the folder holding the generated images of the .json sources")
    check_clip_checkpoint(args.clip_pretrained)
    gt = None
    if args.gt is not None:
        from spatialid.evaluation.gt_photos import load_gt_index

        gt = load_gt_index(args.gt, args.id_root)
    presets = [s.strip() for s in args.presets.split(",") if s.strip()] if args.presets else None
    device = resolve_device(args.device)

    def load_models() -> MetricModels:
        """Called by evaluate once the sources have been read (a bad one fails before this)."""
        if args.model == "tiny":
            log.warning("--model tiny: random-weight metric models; the numbers test the evaluation code only")
            models = MetricModels.tiny(device=device)
            if args.face_fallback == "none":
                models.face.fallback = "none"
            if not args.aesthetic:
                models.aesthetic = None
            if not args.fid:
                models.fid = None
            if args.iq_metric.strip().lower() == "none":
                models.quality = None
            return models
        return MetricModels.real(
            clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained,
            clip_precision=args.clip_precision,
            clip_antialias=args.clip_antialias,
            face_model=args.face_model,
            iq_metric=args.iq_metric,
            aesthetic=args.aesthetic,
            fid=args.fid,
            lpips=args.lpips,
            face_fallback=args.face_fallback or "none",
            device=device,
            models_dir=args.models_dir,
            offline=True if args.offline else None,
        )

    data, files = evaluate(
        args.sources,
        load_models,
        out,
        presets=presets,
        id_root=args.id_root,
        image_root=args.image_root,
        reference_preset=args.reference,
        progress=not args.no_progress and not args.quiet,
        plots=not args.no_plots,
        allow_incomplete=args.allow_incomplete,
        gt=gt,
    )
    from spatialid.evaluation.report import RANKED_COMMON, common_table, markdown_table

    print(markdown_table(data))
    if data.ranked_on == RANKED_COMMON:
        print(f"\nRanked on the {data.common_items} item(s) every preset has (--allow-incomplete):")
        print(common_table(data))
    if data.paper:
        from spatialid.evaluation.report import paper_table

        print("\nThe paper's numbers (quoted from its table, not computed here) beside this run's:")
        print(paper_table(data))
    if data.random_weights:
        print("(random-weight metric models: test values only)", file=sys.stderr)
    if data.skipped:
        print(f"spatialid: {len(data.skipped)} unreadable image file(s) skipped (truncated, empty or not an image; "
              f"listed under skipped_images in {files['json']})", file=sys.stderr)
    if data.ranked_on is None:
        print("spatialid: presets not ranked: they were scored on different items (see report.md)", file=sys.stderr)
    print(f"report written to {files['markdown']} (also report.json, report.csv, plots/)", file=sys.stderr)
    if not data.complete and not args.allow_incomplete:
        raise IncompleteResultsError(data.incomplete_message())
    return 0
