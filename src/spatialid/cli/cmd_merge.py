"""``spatialid merge``: join bench output folders (``--shard`` parts) into one folder."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="join the output folders of several bench runs (shards) into one",
        description=(
            "Copy the images and results of bench output folders (e.g. the --shard 1/N ... N/N runs) into "
            "--out, uniting them by item key. Runs with different generation settings are refused."
        ),
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="bench output folders to merge")
    p.add_argument("--out", required=True, help="folder to merge into (may be one of DIR)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatialid.bench.merge import merge_runs

    summary = merge_runs(args.dirs, args.out)
    print(summary.line(), file=sys.stderr)
    return 0
