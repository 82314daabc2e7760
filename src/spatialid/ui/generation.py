"""One web-UI generation: encode (or reuse) the identity, run the job, collect what the page shows.

Generation goes through the same :func:`spatialid.app.job.run_job` as ``spatialid generate``, so
the PNGs a visitor downloads carry exactly the CLI's metadata (readable with ``spatialid info``).
The form is checked before this (:func:`spatialid.ui.handlers.build_request`, and
:mod:`spatialid.ui.people` for several people, an init image or LoRAs); this module only runs it.
No Gradio here.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from spatialid.errors import SpatialIDError
from spatialid.pipeline.settings import GenerationSettings
from spatialid.ui.inputs import IdentityCache

__all__ = ["GenerationRequest", "GenerationResult", "GenerationStopped", "ProgressFn", "restore_kept", "run_generation", "settings_summary", "storage_note"]

#: ``progress(done, total, description)``; ``done``/``total`` count denoising steps.
ProgressFn = Callable[[int, int, str], None]


class GenerationStopped(SpatialIDError):
    """The visitor pressed Stop: the run ended between two denoising steps and wrote nothing."""


@dataclass(frozen=True)
class GenerationRequest:
    """A checked form: the identity photos, the settings record and the presets to compare."""

    photos: tuple[Path, ...]
    settings: GenerationSettings
    compare: tuple[str, ...] = ()
    # several people, an init image / inpainting mask, LoRAs (spatialid.ui.people.PictureInputs); None = one person
    extras: Any = None

    @property
    def total_steps(self) -> int:
        """Denoising steps of the whole request (the comparison reruns only presets not yet drawn)."""
        extra = sum(1 for name in self.compare if name != self.settings.preset)
        return int(self.settings.steps or 0) * (1 + extra)


@dataclass
class GenerationResult:
    """Everything the page shows after one click."""

    images: list[Image.Image]
    image_files: list[Path]
    mask_picture: Image.Image | None
    comparison: Image.Image | None
    aligned_face: Image.Image | None
    files: list[Path]  # every PNG offered for download (images, mask pictures, comparison)
    settings: dict[str, Any] = field(default_factory=dict)  # metadata of the first PNG
    messages: list[str] = field(default_factory=list)  # notes from the run (e.g. no masks recorded)
    seconds: float = 0.0

    @property
    def captions(self) -> list[str]:
        seeds = self.settings.get("seeds") or [self.settings.get("seed")] * len(self.images)
        return [f"seed {s}" for s in seeds[: len(self.images)]]

    @property
    def status(self) -> str:
        n = len(self.images)
        what = f"{n} image{'s' if n != 1 else ''}"
        if self.comparison is not None:
            what += " + preset comparison"
        line = f"Done: {what} in {self.seconds:.1f} s, seed {self.settings.get('seed')}, preset {self.settings.get('preset')}"
        mode = []
        pipeline = self.settings.get("pipeline")
        if pipeline in ("img2img", "inpaint"):
            mode.append(f"{'inpainting' if pipeline == 'inpaint' else 'img2img'} (strength {self.settings.get('strength')})")
        if self.settings.get("people"):
            mode.append(f"{len(self.settings['people'])} people")
        if self.settings.get("regions"):
            mode.append("regions")
        if self.settings.get("loras"):
            mode.append(f"LoRA {', '.join(map(str, self.settings['loras']))}")
        line += (", " + ", ".join(mode) + ".") if mode else "."
        if self.settings.get("note"):
            line += " Tiny model: the images are noise by design."
        for message in self.messages:
            line += f" Note: {message}."
        return line


class _StepCounter:
    """Wraps the pipeline so each call reports its denoising steps to ``progress``.

    :func:`run_job` makes one pipeline call for the images and one per extra compared preset;
    the counter keeps a running total over all of them so the bar moves from 0 to 100 % once.
    """

    def __init__(
        self,
        pipe: Any,
        progress: ProgressFn | None,
        total: int,
        *,
        calls: int = 1,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.pipe = pipe
        self.progress = progress
        self.total = max(1, total)
        self.expected_calls = max(1, calls)
        self.should_stop = should_stop
        self.done = 0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        call_no = self.calls
        steps = int(kwargs.get("num_inference_steps") or 0)
        if self.progress is not None or self.should_stop is not None:
            def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
                # raising here ends the run between two steps (diffusers calls this after each one)
                if self.should_stop is not None and self.should_stop():
                    raise GenerationStopped("stopped by the visitor")
                self.done = min(self.total, self.done + 1)
                label = f"denoising step {step + 1}/{steps or '?'}"
                if self.expected_calls > 1:  # one bar over the whole comparison, named by preset
                    label = f"preset {min(call_no, self.expected_calls)}/{self.expected_calls} ({kwargs.get('preset')}): {label}"
                if self.progress is not None:
                    self.progress(self.done, self.total, label)
                return callback_kwargs

            kwargs["callback_on_step_end"] = on_step_end
        return self.pipe(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else: the real pipeline
        return getattr(self.pipe, name)


def _pipe_device(pipe: Any) -> str:
    device = getattr(pipe, "_execution_device", None)
    return str(device) if device is not None else "cpu"


def run_generation(
    pipe: Any,
    request: GenerationRequest,
    out_root: str | os.PathLike[str],
    *,
    progress: ProgressFn | None = None,
    lock: threading.Lock | None = None,
    identity_cache: IdentityCache | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Encode the photos, generate, write PNGs (with the CLI's metadata) and the pictures.

    Files go to a fresh folder under ``out_root`` per request, so two visitors never overwrite each
    other's downloads. ``lock`` serialises pipeline use when several events share one model;
    ``identity_cache`` skips the encoder when the same photos come again. ``should_stop`` is
    asked after every denoising step: when it says yes the run raises :class:`GenerationStopped`
    and its folder is deleted (no half-finished set of files is left).
    """
    import shutil

    from spatialid.utils.images import load_image

    started = time.perf_counter()
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root))
    out = folder / f"spatialid-s{request.settings.seed}.png"
    names = [p.name for p in request.photos]
    reference = load_image(request.photos[0])

    guard = lock if lock is not None else threading.Lock()
    try:
        result, identity, messages = _generate_locked(
            pipe, request, out, names, reference, guard, progress, identity_cache, should_stop
        )
    except GenerationStopped:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return _result(result, identity, messages, started)


def _generate_locked(
    pipe: Any,
    request: GenerationRequest,
    out: Path,
    names: list[str],
    reference: Image.Image,
    guard: threading.Lock,
    progress: ProgressFn | None,
    identity_cache: IdentityCache | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[Any, Any, list[str]]:
    """The part of a run that holds the GPU lock: encode (or reuse) the identity, then run the job."""
    from spatialid.app.job import GenerationJob, run_job

    with guard:
        if should_stop is not None and should_stop():
            raise GenerationStopped("stopped by the visitor")
        if progress is not None:
            progress(0, request.total_steps, "finding the face")
        from spatialid.ui import people  # numpy and the picture checks load on the first run only

        extras = request.extras if request.extras is not None else people.PictureInputs()
        cache = identity_cache if identity_cache is not None else IdentityCache(maxsize=1)
        identity = people.identity_for(pipe, request.photos, extras, cache)
        job = GenerationJob(
            settings=request.settings,
            out=out,
            masks=True,
            compare=list(request.compare) or None,
            identity_files=names,
            identity_source="people" if extras.several else "image",
            reference_image=reference,
            people_files=[list(n) for n in extras.names] if extras.several else None,
        )
        model_info = getattr(pipe, "model_info", None) or {}
        extra = {"device": _pipe_device(pipe), "quantization": model_info.get("quantization"), "interface": "web",
                 **people.extra_metadata(request.settings)}
        calls = 1 + sum(1 for name in request.compare if name != request.settings.preset)
        runner = people.pipeline_for(pipe, extras)  # img2img / inpainting on the same components
        counter = _StepCounter(runner, progress, request.total_steps, calls=calls, should_stop=should_stop)
        messages: list[str] = []
        with people.loras_loaded(pipe, extras.loras):  # for this run only
            result = run_job(counter, job, identity, log=messages.append, extra_settings=extra)
    return result, identity, messages


def _result(result: Any, identity: Any, messages: list[str], started: float) -> GenerationResult:
    from spatialid.app.metadata import read_png_metadata

    images = [_open(p) for p in result.images]
    try:
        file_settings = read_png_metadata(result.images[0])  # exactly what the download carries
    except SpatialIDError:  # pragma: no cover - run_job always writes it
        file_settings = dict(result.settings)
    mask_picture = _open(result.masks[0]) if result.masks else None
    comparison = _open(result.compare) if result.compare else None
    return GenerationResult(
        images=images,
        image_files=list(result.images),
        mask_picture=mask_picture,
        comparison=comparison,
        aligned_face=_aligned_faces(identity),
        files=list(result.files),
        settings=file_settings,
        messages=messages,
        seconds=time.perf_counter() - started,
    )


def storage_note(files: Any, local: bool) -> str:
    """Where this page's results are kept (``files``: the server's ``ServeFiles``), or that they go: said next to the downloads."""
    if local and files.archive_dir is not None:
        return (f"**Kept**: every result is also saved, its settings inside, in `{files.archive_dir}` (a dated folder "
                "per click); this tab's history comes back after a reload.")
    hours = files.keep_seconds / 3600
    return (f"**Your files are deleted when you close this tab** (or after {hours:g} h): download what you want "
            "to keep. The settings are inside each PNG.")


def restore_kept(files: Any, session: str, kept: Any, size: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A reloaded tab's history from the kept copies its browser names (``gr.BrowserState``).

    ``files`` is the server's :class:`~spatialid.ui.storage.ServeFiles`. The browser's list is not
    trusted: only PNGs inside the server's output folder are taken, copied back into the session's
    own (served) folder. Returns the history (served copies, captions) and the kept sources.
    """
    import shutil

    archive = getattr(files, "archive_dir", None)
    if archive is None or not isinstance(kept, list):
        return [], []
    root = Path(archive).resolve()
    history: list[tuple[str, str]] = []
    sources: list[tuple[str, str]] = []
    for item in kept[:size]:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            continue
        try:
            source = Path(str(item[0])).resolve()
        except (OSError, ValueError):
            continue
        if source.suffix.lower() != ".png" or not source.is_relative_to(root) or not source.is_file():
            continue
        target = files.session_dir(session) / "restored" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        caption = " ".join(str(item[1]).split())[:80]
        history.append((str(target), caption))
        sources.append((str(source), caption))
    return history, sources


def _aligned_faces(identity: Any) -> Image.Image | None:
    """The aligned face the encoder used; for several people, theirs side by side (person 1 first)."""
    if not isinstance(identity, (list, tuple)):
        return getattr(identity, "aligned_face", None)
    faces = [f for f in (getattr(i, "aligned_face", None) for i in identity) if isinstance(f, Image.Image)]
    if len(faces) <= 1:
        return faces[0] if faces else None
    side = max(f.height for f in faces)
    row = Image.new("RGB", (sum(round(f.width * side / f.height) for f in faces), side), "white")
    x = 0
    for face in faces:
        tile = face.convert("RGB").resize((round(face.width * side / face.height), side))
        row.paste(tile, (x, 0))
        x += tile.width
    return row


def settings_summary(settings: Mapping[str, Any]) -> str:
    """The settings as a visitor reads them: a few short lines, no nulls, img2img/strength/LoRAs/people
    included (the downloaded PNG keeps the full record; ``spatialid info FILE`` prints it)."""
    s = settings

    def has(key: str) -> bool:
        return s.get(key) not in (None, "", [], {})

    lines = [str(s.get("prompt", ""))]
    if has("negative_prompt") and float(s.get("true_cfg") or 1) > 1:
        lines.append(f"Negative: {s['negative_prompt']}")
    first = [f"Seed {s.get('seed')}", f"{s.get('width')}x{s.get('height')}", f"{s.get('steps')} steps",
             f"preset {s.get('preset')}", f"ID weight {s.get('id_weight')}", f"start step {s.get('start_step')}",
             f"guidance {s.get('guidance')}"]
    if float(s.get("true_cfg") or 1) > 1:
        first.append(f"true CFG {s.get('true_cfg')}")
    lines.append(", ".join(first))
    mode = []
    pipeline = s.get("pipeline")
    if pipeline and pipeline != "text2image":
        part = {"img2img": "img2img", "inpaint": "inpainting"}.get(str(pipeline), str(pipeline))
        if has("init_image"):
            part += f" from {s['init_image']}"
        if has("strength"):
            part += f", strength {s['strength']}"
        if has("inpaint_mask"):
            part += f", mask {s['inpaint_mask']}"
        mode.append(part)
    if has("people"):
        mode.append("people: " + " | ".join(", ".join(map(str, p)) for p in s["people"]))
    elif isinstance(s.get("identity"), Mapping) and s["identity"].get("files"):
        mode.append("photos: " + ", ".join(map(str, s["identity"]["files"])))
    if has("regions"):
        mode.append("regions: " + " | ".join(",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in r)
                                               if isinstance(r, (list, tuple)) else str(r) for r in s["regions"]))
    if has("loras"):
        mode.append("LoRAs: " + ", ".join(map(str, s["loras"])))
    if has("compare"):
        mode.append("compared: " + ", ".join(map(str, s.get("presets_shown") or s["compare"])))
    if mode:
        lines.append("; ".join(mode))
    model = ", ".join(str(s[k]) for k in ("model", "pulid") if has(k))
    if model:
        lines.append(f"Model {model}" + (f", spatialid {s['version']}" if has("version") else ""))
    return "\n".join(lines)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()
