"""``spatialid generate --from-png IMAGE``: the settings, people, regions and input pictures of an image, restored.

Files named in the image are looked for where they were recorded, next to the image, then in the
current folder; what cannot be found is listed in one line (exit 2) before anything loads.
Models, LoRAs and ControlNets named in the image are never loaded without the user naming them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

__all__ = ["apply_from_png"]

log = logging.getLogger("spatialid.generate")


_FROM_PNG = (
    ("negative_prompt", "negative_prompt"), ("preset", "preset"), ("id_weight", "id_weight"),
    ("start_step", "start_step"), ("true_cfg", "true_cfg"), ("cfg_start_step", "cfg_start_step"),
    ("guidance", "guidance"), ("steps", "steps"), ("seed", "seed"), ("max_sequence_length", "max_sequence_length"),
    ("noise", "noise"),
)


def apply_from_png(args: argparse.Namespace) -> dict | None:
    """Fill the flags not given on the command line from ``--from-png``'s stored settings.

    Works on the parsed flags (not on the record) so that every later check and default applies
    exactly as if the user had typed them; returns the stored metadata. The input files the
    image names (identity photos or files, people, mask regions, init image, inpainting mask,
    control image) are found again (see :func:`_restore_inputs`); when any is missing this stops
    with one line naming them all, before any model or picture is loaded. No model, LoRA,
    ControlNet or PuLID weights are ever taken from the image; a model, LoRA or ControlNet the
    image was made with that this run does not use is named in a one-line notice.
    """
    if not getattr(args, "from_png", None):
        return None
    from spatialid.app.metadata import read_image_metadata
    from spatialid.cli.options import _SCHEDULE_FLAGS
    from spatialid.pipeline.settings import GenerationSettings

    meta = read_image_metadata(args.from_png)
    stored = GenerationSettings.from_dict(_stored_settings(args.from_png, meta))
    given = getattr(args, "explicit", set())
    for key, dest in _FROM_PNG:
        if dest not in given and meta.get(key) is not None:
            setattr(args, dest, getattr(stored, key))
    if not {"prompt", "prompts"} & given and meta.get("prompt") is not None:
        args.prompt = stored.prompt
    if "size" not in given and stored.width and stored.height:
        args.size = f"{stored.width}x{stored.height}"
    for name in _SCHEDULE_FLAGS:
        value = (stored.schedule_overrides or {}).get(name)
        if name not in given and value is not None:
            setattr(args, name, float(value))
    notices = _model_notices(args, meta)
    notices += _restore_inputs(args, meta, given)  # raises (one line) when a file is missing
    _require_identity(args, meta)
    from spatialid.cli.cmd_info import _safe

    for line in notices:
        log.warning("%s", _safe(line))  # names from the image: escapes shown, never executed
    return meta


def _require_identity(args: argparse.Namespace, meta: dict) -> None:
    """An image made with an identity is never silently re-made without one: restored, given, or a one-line error."""
    from spatialid.errors import SpatialIDError

    if any(getattr(args, k, None) for k in ("id_images", "id_embeds", "people", "people_embeds")):
        return
    identity = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    if identity.get("source") or meta.get("people"):
        raise SpatialIDError(
            f"{args.from_png} was made with an identity whose file is not recorded in it; give it again with "
            "--id PHOTO (or --id-embeds FILE, --person PHOTO)"
        )


# what GenerationSettings.from_dict may read from an image (its file fields are restored as flags instead)
_SETTINGS_KEYS = (
    "prompt", "negative_prompt", "preset", "id_weight", "start_step", "true_cfg", "cfg_start_step", "guidance",
    "steps", "width", "height", "seed", "max_sequence_length", "schedule_overrides", "noise",
)


# the type each restored setting must have in an image's record (anything else is refused in one line)
_TEXT, _WHOLE, _NUMBER = ("prompt", "negative_prompt", "preset", "noise"), (
    "start_step", "cfg_start_step", "steps", "width", "height", "seed", "max_sequence_length"), (
    "id_weight", "true_cfg", "guidance", "strength", "controlnet_scale")


def _is_number(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stored_settings(image: str, meta: dict) -> dict:
    """The settings of ``meta`` that ``GenerationSettings.from_dict`` reads, each of the type it needs.

    A record is outside data: a list as prompt, text as steps, a nested object as schedule override
    is refused with one line (never recorded, never a TypeError later).
    """
    from spatialid.errors import InputImageError

    def refuse(key: str, value: Any, want: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InputImageError(f"{image}: stored setting {key!r} is {shown} ({type(value).__name__}), expected {want}; "
                              "give the setting on the command line or use another image")

    for key in _TEXT + _WHOLE + _NUMBER:
        value = meta.get(key)
        if value is None:
            continue
        if key in _TEXT and not isinstance(value, str):
            refuse(key, value, "text")
        if key in _WHOLE and (isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**64):
            refuse(key, value, "a whole number")
        if key in _NUMBER and not _is_number(value):
            refuse(key, value, "a finite number")
    overrides = meta.get("schedule_overrides")
    if overrides is not None and not (
        isinstance(overrides, dict) and all(isinstance(k, str) and _is_number(v) for k, v in overrides.items())
    ):
        refuse("schedule_overrides", overrides, "an object of numbers")
    return {k: v for k, v in meta.items() if k in _SETTINGS_KEYS}


def _same_model(stored: str, current: str) -> bool:
    if str(stored) == str(current):
        return True
    a, b = Path(str(stored)).expanduser(), Path(str(current)).expanduser()
    try:
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    except OSError:
        return False


def _model_notices(args: argparse.Namespace, meta: dict) -> list[str]:
    """One line per model the image was made with that this run does not use (none is ever loaded from it)."""
    image = args.from_png
    lines = []
    model = meta.get("model")
    if isinstance(model, str) and model and not _same_model(model, args.model):
        lines.append(f"{image} was made with --model {model}; this run uses --model {args.model} (the model is "
                     f"never taken from an image: give --model {model} to use the same one)")
    loras = meta.get("loras")
    if isinstance(loras, (list, tuple)) and loras and not getattr(args, "lora", None):
        lines.append(f"{image} was made with LoRA {', '.join(map(str, loras))}; not loaded from the image: give "
                     "--lora FILE_OR_HUB_ID[:SCALE] for each to use it again")
    controlnet = meta.get("controlnet")
    if isinstance(controlnet, str) and controlnet and not getattr(args, "controlnet", None) \
            and "control_image" not in getattr(args, "explicit", set()):
        lines.append(f"{image} was made with the ControlNet {controlnet}; not loaded from the image, so its control "
                     f"image is not used either: give --controlnet {controlnet} to use them again")
    return lines


def _control_model(model: str) -> bool:
    """A FLUX.1 Canny/Depth model (FluxControlPipeline), as ``check_pipeline_arguments`` decides it."""
    name = str(model or "").lower()
    return any(word in name for word in ("canny", "depth")) and "controlnet" not in name


def _words_of(meta: dict, index: int) -> str:
    """``"@WORDS"`` of the stored person ``index`` bound to words of the prompt, else ``""``."""
    people = (meta.get("identity") or {}).get("people") if isinstance(meta.get("identity"), dict) else None
    entry = people[index] if isinstance(people, list) and 0 <= index < len(people) else None
    words = entry.get("words") if isinstance(entry, dict) else None
    return f"@{words}" if isinstance(words, str) and words.strip() and "@" not in words else ""


def _restore_inputs(args: argparse.Namespace, meta: dict, given: set) -> list[str]:
    """Set the input-file flags the command line left out from ``--from-png``'s record; return notices.

    Each file is looked for at its recorded absolute path, else under the same name next to the
    image, else in the current folder. A flag given on the command line wins (the whole identity:
    ``--id``/``--id-embeds``/``--person``/``--person-embeds`` replace all of the image's people).
    Raises a one-line :class:`SpatialIDError` naming every file that cannot be found.
    """
    from spatialid.app.metadata import StoredFile, stored_inputs
    from spatialid.errors import SpatialIDError

    image = args.from_png
    inputs = stored_inputs(meta)
    notices: list[str] = []
    missing: list[str] = []
    used: list[str] = []
    flags: list[str] = []

    def find(flag: str, item: StoredFile) -> str:
        path = item.locate(image)
        if path is None:
            missing.append(f"{flag} {item.name}")
            if flag.split()[0] not in flags:
                flags.append(flag.split()[0])
            return item.name
        used.append(f"{flag} {path}")
        return str(path)

    # the identity: one person (--id / --id-embeds) or several (--person / --person-embeds)
    identity_flags = {"id_images", "id_embeds", "people", "people_embeds"}
    own = bool(identity_flags & given) or any(getattr(args, k, None) for k in identity_flags)
    if own:
        count = len(getattr(args, "people", None) or []) + len(getattr(args, "people_embeds", None) or [])
        count = count or (1 if args.id_images or args.id_embeds else 0)
    else:
        photos, embeds = inputs.get("people") or [], inputs.get("people_embeds") or []
        if photos or embeds:
            args.people = [",".join(find(f"--person {k}", f) for f in person) + _words_of(meta, k - 1)
                           for k, person in enumerate(photos, 1)] or None
            args.people_embeds = [find(f"--person-embeds {k}", f) + _words_of(meta, k - 1)
                                  for k, f in enumerate(embeds, len(photos) + 1)] or None
            count = len(photos) + len(embeds)
        elif inputs.get("id_images"):
            args.id_images = [find("--id", f) for f in inputs["id_images"]]
            count = 1
        elif inputs.get("id_embeds"):
            args.id_embeds = find("--id-embeds", inputs["id_embeds"])
            count = 1
        else:
            count = 0

    # the regions, one per person: only for as many people as the image had
    regions = inputs.get("regions")
    if regions and "regions" not in given:
        if count == len(regions):
            args.regions = [
                ",".join(repr(v) for v in region) if isinstance(region, tuple) else find(f"--region {k}", region)
                for k, region in enumerate(regions, 1)
            ]
        else:
            notices.append(f"{image} has {len(regions)} region(s) but this run has {count} person(s): its regions "
                           "are not used (give one --region per person)")

    # the pipeline and its input pictures
    pipeline = meta.get("pipeline")
    for key, flag in (("init_image", "--init-image"), ("inpaint_mask", "--inpaint-mask")):
        if key not in given and inputs.get(key):
            setattr(args, key, find(flag, inputs[key]))
    if pipeline == "kontext" and "kontext" not in given and not getattr(args, "kontext", False):
        args.kontext = True
    if "control_image" not in given and inputs.get("control_image"):
        if pipeline == "controlnet" and not getattr(args, "controlnet", None):
            pass  # named in _model_notices: the ControlNet is never loaded from an image
        elif pipeline == "control" and not _control_model(args.model):
            notices.append(f"{image} was made with a FLUX.1 Canny/Depth model and control image "
                           f"{inputs['control_image'].name}; give such a --model to use it again")
        else:
            args.control_image = find("--control-image", inputs["control_image"])
    if pipeline not in (None, "text2image", "controlnet", "control") and not getattr(args, "init_image", None):
        notices.append(f"{image} was made with the {pipeline} pipeline from a picture without a file name: "
                       "give --init-image PATH to use it again")
    if "strength" not in given and meta.get("strength") is not None and getattr(args, "init_image", None):
        args.strength = float(meta["strength"])
    if "controlnet_scale" not in given and meta.get("controlnet_scale") is not None and getattr(args, "controlnet", None) \
            and getattr(args, "control_image", None):
        args.controlnet_scale = float(meta["controlnet_scale"])

    if missing:
        raise SpatialIDError(
            f"{image} names {len(missing)} file(s) that cannot be found: {'; '.join(missing)} (looked at the recorded "
            f"path, next to {Path(image).name} and in the current folder); pass them explicitly "
            f"({', '.join(f + ' PATH' for f in flags)})"
        )
    if used:
        from spatialid.cli.cmd_info import _safe

        log.info("%s", _safe(f"{image}: using {'; '.join(used)}"))
    return notices


