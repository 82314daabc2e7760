"""``spatialid info IMAGE``: the settings stored in an image written by spatialid.

By default a short summary and a ready-to-paste ``spatialid generate`` command that makes the
same image again (the identity photos are named, not stored: they must be given again);
``--full`` lists every stored key, ``--json`` prints the stored document.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Mapping
from typing import Any

__all__ = ["register", "run", "format_settings", "format_summary", "reproduce_command"]

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
    "pipeline",
    "init_image",
    "strength",
    "inpaint_mask",
    "control_image",
    "controlnet",
    "controlnet_scale",
    "loras",
    "model",
    "pulid",
    "version",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="show the generation settings stored in a spatialid image, and the command that reproduces it",
        description="Print a summary of the settings stored in images written by spatialid (PNG, JPEG, WebP) and a "
        "`spatialid generate` command that makes the same image again (`generate --from-png IMAGE` does the same).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s) written by spatialid")
    p.add_argument("--full", action="store_true", help="list every stored setting (preset parameters, models, versions, ...)")
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


def person_words(settings: Mapping[str, Any]) -> list[str | None]:
    """Each stored person's words of the prompt (``--person PHOTO@WORDS``), None for a person without."""
    identity = settings.get("identity") if isinstance(settings.get("identity"), Mapping) else {}
    entries = identity.get("people") if isinstance(identity.get("people"), list) else []
    words = [e.get("words") if isinstance(e, Mapping) and isinstance(e.get("words"), str) else None for e in entries]
    return words + [None] * max(0, len(settings.get("people") or []) - len(words))


def _recorded(settings: dict, key: str, names: list[str]) -> list[str]:
    """The identity files where the run found them (``input_paths``, so the command works from any folder),
    else their names."""
    paths = settings.get("input_paths")
    value = paths.get(key) if isinstance(paths, dict) else None
    value = [value] if isinstance(value, str) else value
    if isinstance(value, list) and len(value) == len(names) and all(isinstance(v, str) and v for v in value):
        return value
    return names


def reproduce_command(settings: Mapping[str, Any]) -> str:
    """A shell-quoted ``spatialid generate`` command for the stored settings (identity by file name)."""
    from spatialid.cli.options import _SCHEDULE_FLAGS

    s = settings
    argv = ["spatialid", "generate"]

    def add(flag: str, key: str) -> None:
        if s.get(key) not in (None, ""):
            value = s[key]
            argv.extend([flag, f"{value:g}" if isinstance(value, float) else str(value)])

    add("--model", "model")
    if s.get("quantization"):
        argv.extend(["--quantize", str(s["quantization"])])
    identity = s.get("identity") or {}
    files = [str(f) for f in identity.get("files") or []]
    people = s.get("people") or []
    if people:  # several people: --person photos first, then --person-embeds files, in stored order
        words = [f"@{w}" if w else "" for w in person_words(s)]
        for k, names in enumerate(people):
            if not any(str(n).lower().endswith(".safetensors") for n in names):
                argv.extend(["--person", (",".join(map(str, names)) or "PHOTO") + words[k]])
        for k, names in enumerate(people):
            if any(str(n).lower().endswith(".safetensors") for n in names):
                argv.extend(["--person-embeds", str(names[0]) + words[k]])
    elif identity.get("source") == "embeds" and files:
        argv.extend(["--id-embeds", _recorded(s, "id_embeds", [files[0]])[0]])
    else:
        for f in _recorded(s, "id_images", files):
            argv.extend(["--id", f])
    for region in s.get("regions") or []:
        argv.extend(["--region", ",".join(f"{float(v):g}" for v in region) if isinstance(region, list) else str(region)])
    argv.append(f"--prompt={s.get('prompt', '')}")  # "=": a prompt starting with "-" stays a value
    add("--preset", "preset")
    overrides = s.get("schedule_overrides") or {}
    for name in _SCHEDULE_FLAGS:
        if overrides.get(name) is not None:
            argv.extend([f"--{name.replace('_', '-')}", f"{float(overrides[name]):g}"])
    add("--seed", "seed")
    add("--steps", "steps")
    if s.get("width") and s.get("height"):
        argv.extend(["--size", f"{s['width']}x{s['height']}"])
    add("--guidance", "guidance")
    add("--id-weight", "id_weight")
    add("--start-step", "start_step")
    if float(s.get("true_cfg") or 1) > 1:
        add("--true-cfg", "true_cfg")
        if s.get("negative_prompt"):
            argv.append(f"--negative-prompt={s['negative_prompt']}")
        add("--cfg-start-step", "cfg_start_step")
    add("--noise", "noise")
    add("--max-sequence-length", "max_sequence_length")
    argv.extend(_pipeline_flags(s))
    return " ".join(shlex.quote(a) for a in argv)


# pipeline inputs stored by `generate` (docs/pipelines.md), as (metadata key, flag)
_PIPELINE_FLAGS = (
    ("init_image", "--init-image"), ("strength", "--strength"), ("inpaint_mask", "--inpaint-mask"),
    ("control_image", "--control-image"), ("controlnet", "--controlnet"), ("controlnet_scale", "--controlnet-scale"),
)


def _pipeline_flags(s: Mapping[str, Any]) -> list[str]:
    """The flags of the stored pipeline and its inputs (file names, given again like the identity)."""
    argv: list[str] = []
    if s.get("pipeline") == "kontext":
        argv.append("--kontext")
    for key, flag in _PIPELINE_FLAGS:
        if s.get(key) not in (None, ""):
            value = s[key]
            argv.extend([flag, f"{value:g}" if isinstance(value, float) else str(value)])
    for lora in s.get("loras") or []:
        argv.extend(["--lora", str(lora)])
    return argv


def _pipeline_lines(s: Mapping[str, Any]) -> list[str]:
    """Summary lines of a pipeline other than text-to-image, and of LoRAs."""
    lines = []
    mode = s.get("pipeline")
    if mode not in (None, "text2image"):
        parts = [f"{key.replace('_', ' ')} {s[key]}" for key, _ in _PIPELINE_FLAGS if s.get(key) not in (None, "")]
        lines.append(f"pipeline  {mode}" + (f": {', '.join(parts)}" if parts else ""))
    if s.get("loras"):
        lines.append(f"loras     {', '.join(map(str, s['loras']))}")
    return lines


def format_summary(settings: Mapping[str, Any]) -> str:
    """A few lines a person reads: what was drawn, how, and the command that draws it again."""
    s = settings
    identity = s.get("identity") or {}
    files = [str(f) for f in identity.get("files") or []]
    size = f"{s.get('width')}x{s.get('height')}" if s.get("width") else "-"
    lines = [
        f"prompt    {s.get('prompt', '-')}",
        (
            f"model     {s.get('model', '-')}, seed {s.get('seed', '-')}, {s.get('steps', '-')} steps, {size}, "
            f"guidance {s.get('guidance', '-')}"
        ),
        "identity  " + (
            f"{', '.join(files)} (preset {s.get('preset')}, id weight {s.get('id_weight')}, start step {s.get('start_step')})"
            if files else "none: plain FLUX"
        ),
    ]
    people = s.get("people") or []
    if people:
        regions = s.get("regions") or []
        lines[2] = f"identity  {len(people)} people (preset {s.get('preset')}, id weight {s.get('id_weight')})"
        for k, names in enumerate(people):
            where = regions[k] if k < len(regions) else "automatic layout"
            if isinstance(where, list):
                where = "box " + ",".join(f"{float(v):g}" for v in where)
            bound = person_words(s)[k]
            where = f"bound to {bound!r}" if bound else where
            lines.append(f"person {k + 1}  {', '.join(map(str, names)) or '-'} ({where})")
    if float(s.get("true_cfg") or 1) > 1:
        lines.append(f"true cfg  {s.get('true_cfg')}, negative prompt: {s.get('negative_prompt') or '-'}")
    lines.extend(_pipeline_lines(s))
    if s.get("kind"):
        lines.append(f"kind      {s['kind']}")
    lines.append("")
    lines.append("reproduce (or: spatialid generate --from-png FILE):")
    lines.append("  " + reproduce_command(s))
    if files or people:
        lines.append("  (the identity " + ("photos are" if identity.get("source") != "embeds" else "file is")
                     + " not stored in the image: give the same file(s) again)")
    return "\n".join(_safe(line) for line in lines)


def run(args: argparse.Namespace) -> int:
    from spatialid.app.metadata import read_image_metadata

    results = [(path, read_image_metadata(path)) for path in args.images]
    if args.json:
        data = results[0][1] if len(results) == 1 else [{"file": p, **s} for p, s in results]
        # json escapes C0 controls itself; C1 controls (e.g. U+009B, a CSI) are escaped too
        print(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False).translate(_C1_JSON))
        return 0
    texts = [_summary(path, settings, full=args.full) for path, settings in results]
    for i, ((path, _), text) in enumerate(zip(results, texts)):
        if len(results) > 1:
            print(("\n" if i else "") + f"== {_safe(path)}")
        print(text)
    return 0


_C1_JSON = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}


def _summary(path: str, settings: dict[str, Any], *, full: bool = False) -> str:
    """:func:`format_summary` (or ``format_settings``), one line when the settings have shapes no spatialid writes."""
    from spatialid.errors import InputImageError

    try:
        return format_settings(settings) if full else format_summary(settings)
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, OverflowError, RecursionError) as exc:
        raise InputImageError(
            f"{path}: stored settings have an unexpected shape ({type(exc).__name__}: {' '.join(str(exc).split())[:80]}); "
            f"`spatialid info --json {path}` prints them as stored"
        ) from None
