"""The identity of one pipeline call: :class:`PuLIDIdentity`.

One object says everything the injection does in a call: who (one or several people's identity
tokens, true CFG's zero-identity tokens), where (per-person regions, one bound for everybody such
as an inpainting mask, recorded masks to replay), when (schedule preset, start step, true-CFG
warm-up) and how strongly (``id_weight``). It travels with the call as
``joint_attention_kwargs["identity"]`` (the way diffusers' IP-Adapter passes its embeddings),
so every FLUX.1 pipeline of diffusers carries it to the transformer unchanged, two calls cannot
mix their people, and nothing stays switched on after an exception.

The object also receives what the call produced: with ``record_masks=True`` the injector writes
every mask into preallocated tensors (no host copies inside the step, so recording works in
compiled graphs too), read afterwards as :attr:`PuLIDIdentity.records`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import torch

from spatialid import defaults as D
from spatialid.errors import SpatialIDError

__all__ = ["IDENTITY_KEY", "IdentityError", "InjectionRecord", "PuLIDIdentity", "resolve_person"]

#: The key of ``joint_attention_kwargs`` that carries the identity.
IDENTITY_KEY = "identity"


class IdentityError(SpatialIDError, ValueError):
    """An identity or pipeline-call argument is invalid (also a ``ValueError``, as diffusers'
    ``check_inputs`` raises; the CLI shows it as one line)."""


@dataclass
class InjectionRecord:
    """One recorded mask: which transformer call (step, branch), at what t, at which injection point.

    ``mask`` is on the CPU in the identity's ``record_dtype``: ``[B, rows * cols]`` for one person
    without a region, else ``[K, B, rows * cols]`` (one mask per person).
    """

    call_index: int
    step: int
    branch: str
    t: float
    point: int
    phase: str
    mask: torch.Tensor


def resolve_person(source: Any, uncond: Any = None) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """One person's encoded identity -> ``(tokens [1|B, n, dim], uncond tokens or None, info)``.

    ``source`` is a tokens tensor, an ``IdentityEmbedding`` (its ``uncond_tokens`` come along) or
    a ``.safetensors`` file written by ``spatialid encode``. ``info`` describes it for the
    settings record. Raises :class:`IdentityError` on a damaged or malformed identity.
    """
    info: dict[str, Any] = {"source": "embeds"}
    if isinstance(source, (str, os.PathLike)):
        from spatialid.encoder.embedding import IdentityEmbedding

        info["files"] = [Path(source).name]
        source = IdentityEmbedding.load(Path(source))
    if isinstance(source, torch.Tensor):
        tokens = source
    else:
        tokens = getattr(source, "tokens", None)
        if not isinstance(tokens, torch.Tensor):
            raise IdentityError(
                f"identity tokens must be a tensor, an IdentityEmbedding or an embedding file, got {type(source).__name__}"
            )
        uncond = uncond if uncond is not None else getattr(source, "uncond_tokens", None)
        meta = getattr(source, "metadata", None)
        if isinstance(meta, dict) and meta:
            info["embedding"] = {k: str(v) for k, v in meta.items()}
    if tokens.ndim == 2:
        tokens = tokens.unsqueeze(0)
    if tokens.ndim != 3:
        raise IdentityError(f"identity tokens must be [batch, tokens, dim], got shape {tuple(tokens.shape)}")
    if tokens.device.type != "meta" and not bool(torch.isfinite(tokens).all()):
        raise IdentityError("the identity tokens hold NaN or Inf values (a damaged identity file); re-encode the photo")
    if uncond is not None:
        if not isinstance(uncond, torch.Tensor):
            raise IdentityError(f"uncond tokens must be a tensor, got {type(uncond).__name__}")
        if uncond.ndim == 2:
            uncond = uncond.unsqueeze(0)
        if uncond.ndim != 3 or uncond.shape[1:] != tokens.shape[1:]:
            raise IdentityError(
                f"uncond tokens {tuple(uncond.shape)} do not match the identity tokens {tuple(tokens.shape)}"
            )
    return tokens, uncond, info


def _people_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor) and value.ndim == 4:
        return list(value.unbind(0))
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass
class PuLIDIdentity:
    """The identity of one pipeline call (``joint_attention_kwargs["identity"]``).

    Args:
        tokens: one person (a tokens tensor ``[1|B, n, dim]``, an ``IdentityEmbedding`` or an
            embedding file from ``spatialid encode``), a list of them (several people, left to
            right unless ``regions`` say where), a ``[K, 1|B, n, dim]`` tensor, or None (no
            identity: only the true-CFG warm-up applies).
        uncond_tokens: true CFG's zero-identity tokens (PuLID-FLUX's ``IDFormer(0, 0)``), one per
            person; default: those of each ``IdentityEmbedding``.

    Keyword-only:
        id_weight: identity strength (0 gives the plain pipeline's output bit for bit).
        preset: SpatialID schedule: a preset name, a ``SpatialSchedule``, a field mapping or None
            (uniform PuLID injection).
        schedule_overrides: schedule fields set on top of ``preset``.
        start_step: first executed denoising step (0-based) with identity.
        cfg_start_step: with true CFG, the first step whose negative branch is computed; before
            it the negative branch returns the positive output (PuLID-FLUX's
            ``timestep_to_start_cfg``). 0 = from the first step.
        regions: one region per person (a box ``(x0, y0, x1, y1)`` / ``"x0,y0,x1,y1"`` in
            fractions, a mask picture or an ``[H, W]`` tensor in [0, 1]): each person's early
            prior and upper bound.
        region: one upper bound for every person, e.g. the inpainting mask (white = may change).
        record_masks: keep every mask of the call (read :attr:`records` afterwards).
        record_dtype: dtype of recorded masks (float32 replays bit for bit).
        masks_from: a mask file written with ``save_masks`` to replay instead of computing masks.
        height, width: the generated image's size; default: read from the call's ``img_ids``
            (one host read per call). Give them to keep a compiled transformer free of host reads.
        word_tokens: people bound to words of the prompt: one entry per person, None (no words:
            the strip rule) or the positions of that person's words among the text tokens (one
            list, or one list per prompt); the pipelines find them from ``people=[(photo,
            "words"), ...]`` (:mod:`spatialid.injection.words`). A bound person's layout prior and
            territory come from FLUX's attention to those tokens during the layout steps.
    """

    tokens: Any = None
    uncond_tokens: Any = None
    _: KW_ONLY
    id_weight: float = D.DEFAULT_ID_WEIGHT
    preset: Any = D.DEFAULT_PRESET
    schedule_overrides: Mapping[str, float] | None = None
    start_step: int = D.DEFAULT_START_STEP
    cfg_start_step: int = 0
    regions: Any = None
    region: Any = None
    record_masks: bool = False
    record_dtype: torch.dtype = torch.float16
    masks_from: Any = None
    height: int | None = None
    width: int | None = None
    word_tokens: Any = None

    def __post_init__(self) -> None:
        from spatialid.masks import apply_overrides, resolve_preset

        for name in ("start_step", "cfg_start_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise IdentityError(f"{name} must be a whole number >= 0, got {value!r}")
        weight = self.id_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0.0 <= float(weight) <= 10.0):
            raise IdentityError(f"id_weight must be a number in [0, 10], got {weight!r}")
        self.id_weight = float(weight)
        # Everything the hooks read is made here, eagerly: under torch.compile a hook that filled
        # a cache on the object would change what the graph guards on and recompile.
        self._weight = torch.tensor(self.id_weight, dtype=torch.float32)  # a tensor: no recompile per weight
        self._grid_regions: tuple[tuple[int, int], torch.Tensor | None] | None = None
        self._record: tuple[torch.Tensor, ...] | None = None
        self._positive: tuple[int, torch.Tensor] | None = None  # true CFG warm-up: (step, positive output)
        self._generated_tokens: int | None = None
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 16):
                raise IdentityError(f"{name} must be a whole number of pixels >= 16, got {value!r}")
        self.schedule = apply_overrides(resolve_preset(self.preset), self.schedule_overrides)
        people = _people_list(self.tokens)
        if len(people) > 1 or self.regions is not None:
            from spatialid.injection.people import check_people_count

            check_people_count(len(people))
        unconds = _people_list(self.uncond_tokens)
        if unconds and len(unconds) != len(people):
            raise IdentityError(f"{len(unconds)} uncond token set(s) for {len(people)} person(s); give one per person")
        resolved = [resolve_person(p, unconds[i] if unconds else None) for i, p in enumerate(people)]
        self.info = [r[2] for r in resolved]
        self._people: torch.Tensor | None = None
        self._uncond: torch.Tensor | None = None
        if resolved:
            tokens = [r[0] for r in resolved]
            if any(t.shape[1:] != tokens[0].shape[1:] for t in tokens):
                raise IdentityError("every person's identity tokens must have the same [tokens, dim]; encode them with one model")
            batch = max(t.shape[0] for t in tokens)
            if any(t.shape[0] not in (1, batch) for t in tokens):
                raise IdentityError("each person's tokens must have batch 1 or the batch of the call")
            self._people = torch.stack([t.expand(batch, -1, -1) for t in tokens])
            if all(r[1] is not None for r in resolved):
                self._uncond = torch.stack([r[1].expand(batch, -1, -1) for r in resolved])
        # a bool, not the weight: a compiled graph guards on this, not on the weight's value
        self._injects = self._people is not None and self.id_weight != 0.0
        self._replay: tuple[torch.Tensor, list[int]] | None = None
        if self.masks_from is not None:
            if not self.injects:
                raise IdentityError("masks_from replays an identity's masks; give the identity tokens too")
            from spatialid.injection.people import mask_replay_table

            self._replay = mask_replay_table(self.masks_from)
        if self.height is not None and self.width is not None and self.injects:
            self.region_grid(self.height // 16, self.width // 16)  # read the region files now, not inside a step
        if self.regions is not None:
            from spatialid.injection.people import RegionError, region_list

            count = len(region_list(self.regions))
            if count != len(people):
                raise RegionError(f"{count} region(s) for {len(people)} person(s); give one region per person, in order")
        self._words: tuple[torch.Tensor, torch.Tensor, tuple[bool, ...], int] | None = None
        self._word_state: dict[str, torch.Tensor] = {}  # accumulated maps, the step's source, records
        self._replay_maps: torch.Tensor | None = None
        if self.word_tokens is not None and self.injects:
            from spatialid.injection.words import word_table

            if self.regions is not None:
                raise IdentityError("give each person regions or words, not both (words place the people themselves)")
            self._words = word_table(list(self.word_tokens), self.count)
            if self.masks_from is not None:
                from spatialid.injection.words import layout_replay_table

                self._replay_maps = layout_replay_table(self.masks_from)

    # ------------------------------------------------------------------ what the injector reads
    @property
    def count(self) -> int:
        """Number of people (0: no identity)."""
        return 0 if self._people is None else int(self._people.shape[0])

    @property
    def injects(self) -> bool:
        """Whether this identity adds anything (people given and a non-zero weight)."""
        return self._injects

    @property
    def people_tokens(self) -> torch.Tensor | None:
        """``[K, 1|B, n, dim]`` identity tokens."""
        return self._people

    @property
    def uncond_people_tokens(self) -> torch.Tensor | None:
        """``[K, 1|B, n, dim]`` zero-identity tokens, or None."""
        return self._uncond

    @property
    def simple(self) -> bool:
        """One person without region or replay (its masks are recorded as ``[B, N]``)."""
        return self.count == 1 and self.regions is None and self.region is None and self.masks_from is None

    @property
    def binds_words(self) -> bool:
        """Whether some person is bound to words of the prompt (their layout comes from attention)."""
        return self._words is not None

    @property
    def bound(self) -> tuple[bool, ...]:
        """Per person, whether they are bound to words."""
        return self._words[2] if self._words is not None else (False,) * self.count

    @property
    def layout_maps(self) -> dict[int, torch.Tensor]:
        """The word maps each recorded step's layout came from: ``{step: [K, B, N] float32}`` (CPU;
        the accumulated attention of the steps before it; zeros: the strip rule's step)."""
        record = self._word_state.get("record")
        if record is None:
            return {}
        filled = self._word_state["filled"].cpu()
        maps = record.cpu()
        return {step: maps[step].clone() for step in range(filled.shape[0]) if bool(filled[step])}

    def region_grid(self, rows: int, cols: int) -> torch.Tensor | None:
        """Each person's upper bound on the token grid ``[K, rows, cols]`` (regions ∩ region), or None.

        Read once per grid (host work: pictures are loaded and resized); made when the identity is
        created if its ``height``/``width`` are given.
        """
        if self._grid_regions is not None and self._grid_regions[0] == (rows, cols):
            return self._grid_regions[1]
        grid = None
        if self.regions is not None or self.region is not None:
            from spatialid.injection.people import regions_tensor

            if self.regions is not None:
                grid = regions_tensor(self.regions, self.count, rows, cols)
            if self.region is not None:
                bound = regions_tensor([self.region], 1, rows, cols)
                grid = bound.expand(self.count, rows, cols).clone() if grid is None else grid * bound
        self._grid_regions = ((rows, cols), grid)
        return grid

    def prepare_records(self, steps: int, points: int, batch: int, tokens: int, device: torch.device | str) -> None:
        """Allocate the record buffers for ``steps`` steps (the pipeline does, before the call; else the
        first recorded call does): masks ``[steps, 2, points, K, batch, tokens]``, then per (step,
        branch) the time, the phase, whether it was recorded and the transformer call's index."""
        shape = (steps, 2, points, self.count, batch, tokens)
        self._record = (
            torch.zeros(shape, dtype=self.record_dtype, device=device),
            torch.full((steps, 2), float("nan"), dtype=torch.float32, device=device),
            torch.full((steps, 2), -1, dtype=torch.int64, device=device),
            torch.zeros(steps, 2, dtype=torch.bool, device=device),
            torch.zeros(steps, 2, dtype=torch.int64, device=device),
        )

    def replay_table(self, points: int, batch: int, rows: int, cols: int, steps: Sequence[int]) -> torch.Tensor | None:
        """The replayed masks ``[last_step + 1, points, K, B, N]`` (see ``masks_from``), or None.

        The file is read when the identity is made; here only its shape is compared with the run.
        """
        if self._replay is None:
            return None
        from spatialid.injection.people import check_replay

        table, recorded = self._replay
        check_replay(
            Path(str(self.masks_from)).name, table, recorded, points=points, persons=self.count, batch=batch,
            rows=rows, cols=cols, steps=steps,
        )
        return table.reshape(*table.shape[:4], rows * cols)

    # ------------------------------------------------------------------ what the call produced
    @property
    def records(self) -> list[InjectionRecord]:
        """Every recorded mask of the call, in (step, branch, point) order (``record_masks=True``)."""
        if self._record is None:
            return []
        masks, times, phases, filled, calls = (buffer.cpu() for buffer in self._record)
        from spatialid.masks.compute import PHASES

        records = []
        for step in range(filled.shape[0]):
            for b, branch in enumerate(("cond", "uncond")):
                if not bool(filled[step, b]):
                    continue
                phase_code = int(phases[step, b])
                phase = "uniform" if phase_code < 0 else PHASES[phase_code]
                for point in range(masks.shape[2]):
                    mask = masks[step, b, point]
                    if self.simple:
                        mask = mask[0]
                    records.append(
                        InjectionRecord(int(calls[step, b]), step, branch, float(times[step, b]), point, phase, mask.clone())
                    )
        records.sort(key=lambda r: (r.call_index, r.point))  # in the order the calls ran
        return records

    def reset_records(self) -> None:
        """Forget what an earlier call recorded (an identity object reused for another call)."""
        self._record = None
        self._word_state = {}


def as_identity(value: Any) -> PuLIDIdentity:
    """``joint_attention_kwargs["identity"]`` as a :class:`PuLIDIdentity` (a mapping of its fields,
    or a bare tensor / embedding / file for one person, are accepted too)."""
    if isinstance(value, PuLIDIdentity):
        return value
    if isinstance(value, Mapping):
        args = dict(value)
        if "embedding" in args:
            args["tokens"] = args.pop("embedding")
        known = set(PuLIDIdentity.__dataclass_fields__) - {"_"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise IdentityError(f"unknown identity argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return PuLIDIdentity(**args)
    return PuLIDIdentity(value)
