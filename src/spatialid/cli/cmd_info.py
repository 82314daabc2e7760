"""``spatialid info IMAGE``: print the settings stored in a PNG written by spatialid."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register", "run", "format_settings"]

# Shown first, in this order; anything else follows alphabetically.
_ORDER = (
    "prompt",
    "negative_prompt",
    "seed",
    "preset",
    "schedule",
    "id_weight",
    "start_step",
    "true_cfg",
    "cfg_start_step",
    "guidance",
    "steps",
    "width",
    "height",
    "identity",
    "model",
    "pulid",
    "version",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="show the generation settings stored in a spatialid PNG",
        description="Print the settings (prompt, seed, preset and its parameters, models, ...) stored in PNGs written by spatialid.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG file(s) written by spatialid")
    p.add_argument("--json", action="store_true", help="print the settings as JSON (one object, or a list for several files)")
    p.set_defaults(func=run)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t"}


def _safe(text: str) -> str:
    """Control characters (ANSI escapes, carriage returns, ...) printed visibly, never executed by the terminal."""
    return str(text).translate(_CONTROL)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        if not value:
            out.append((prefix, "-"))
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out.append((prefix, ", ".join(str(v) for v in value) if value else "-"))
    elif value is None:
        out.append((prefix, "-"))
    else:
        out.append((prefix, str(value)))


def format_settings(settings: dict[str, Any]) -> str:
    """Aligned ``key: value`` lines, nested values as ``schedule.early`` etc."""
    keys = [k for k in _ORDER if k in settings] + sorted(k for k in settings if k not in _ORDER)
    rows: list[tuple[str, str]] = []
    for key in keys:
        _flatten(key, settings[key], rows)
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{_safe(k).ljust(width)}  {_safe(v)}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from spatialid.app.metadata import read_png_metadata

    results = [(path, read_png_metadata(path)) for path in args.images]
    if args.json:
        data = results[0][1] if len(results) == 1 else [{"file": p, **s} for p, s in results]
        print(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False))
        return 0
    for i, (path, settings) in enumerate(results):
        if len(results) > 1:
            print(("\n" if i else "") + f"== {_safe(path)}")
        print(format_settings(settings))
    return 0
