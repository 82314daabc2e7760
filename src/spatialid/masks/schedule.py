"""Temporal-spatial scheduler: which spatial mask modulates identity injection at flow time t.

FLUX's flow-matching time t runs from 1 (pure noise) to 0 (clean image). Early on the activations
carry no layout, so a fixed centre prior is used; in the middle the face region read from the
cross-attention output (the *refined* mask) confines identity features to the face; late, when the
layout is settled, the mask is relaxed towards uniform so the details of the whole head and hair
still receive identity::

    t >  early          -> centre prior
    early >= t > late   -> refined mask
    t <= late           -> late_floor + (1 - late_floor) * refined
    then, if global_floor > 0, clamp from below at global_floor

``PRESETS`` names the configurations used in the paper, the PuLID baseline (``None`` = uniform
injection) and the ablations a researcher needs; ``resolve_preset`` turns a name into a schedule.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Union

import torch

from spatialid.errors import SpatialIDError
from spatialid.masks.compute import PHASES, build_layout, identity_masks, phase_index, time_column
from spatialid.masks.extractor import _check_tokens
from spatialid.masks.fused import fused_identity_masks, use_fused

__all__ = [
    "SOURCES",
    "MODES",
    "PHASES",
    "ScheduleError",
    "SpatialSchedule",
    "PRESETS",
    "PRESET_DESCRIPTIONS",
    "SCHEDULE_FIELDS",
    "apply_overrides",
    "resolve_preset",
]

#: The numeric fields a user may set on top of a preset (``--early``, ``--late-floor``, ...).
SCHEDULE_FIELDS = ("early", "late", "late_floor", "center_sigma", "global_floor")

#: Mask sources: "norm" = L2 norm of the CA output; "entropy" = attention entropy over ID tokens.
SOURCES = ("norm", "entropy")
#: Phase rules: the full schedule, or one of the ablations.
MODES = ("scheduled", "prior", "attention", "no-relax")

TimeLike = Union[float, torch.Tensor]


class ScheduleError(SpatialIDError, ValueError):
    """A schedule setting or preset name is invalid (a ValueError, shown by the CLI as one line)."""


@dataclass(frozen=True)
class SpatialSchedule:
    """SpatialID's temporal-spatial schedule of the identity-injection mask.

    Args:
        early: above this t the centre prior is used (the layout is still noise).
        late: at or below this t the mask is relaxed towards uniform.
        late_floor: value the relaxed mask starts from: ``late_floor + (1 - late_floor) * refined``.
        center_sigma: width of the centre prior on the [-1, 1] x [-1, 1] grid.
        global_floor: lower bound applied to the mask at every t (0 disables it).
        source: ``"norm"`` (per-token L2 norm of the CA output, the default) or ``"entropy"``
            (entropy of the attention over identity tokens; :meth:`mask` then needs ``attn_probs``).
        mode: ``"scheduled"`` (the rule above), or an ablation: ``"prior"`` (centre prior at
            every t), ``"attention"`` (refined mask at every t), ``"no-relax"`` (no late
            relaxation).
    """

    early: float = 0.7
    late: float = 0.3
    late_floor: float = 0.5
    center_sigma: float = 0.3
    global_floor: float = 0.0
    source: str = "norm"
    mode: str = "scheduled"

    def __post_init__(self) -> None:
        for name in ("early", "late", "late_floor", "center_sigma", "global_floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ScheduleError(f"SpatialSchedule.{name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ScheduleError(f"SpatialSchedule.{name} must be finite, got {value!r}")
            object.__setattr__(self, name, value)  # normalise ints to floats (stable to_dict)
        if not 0.0 <= self.late <= self.early <= 1.0:
            raise ScheduleError(
                "SpatialSchedule needs 0 <= late <= early <= 1, "
                f"got early={self.early}, late={self.late}"
            )
        if self.center_sigma <= 0.0:
            raise ScheduleError(
                f"SpatialSchedule.center_sigma must be > 0, got {self.center_sigma}"
            )
        for name in ("late_floor", "global_floor"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ScheduleError(
                    f"SpatialSchedule.{name} must be in [0, 1], got {getattr(self, name)}"
                )
        if self.source not in SOURCES:
            raise ScheduleError(
                f"unknown mask source {self.source!r}; choose one of: {', '.join(SOURCES)}"
            )
        if self.mode not in MODES:
            raise ScheduleError(
                f"unknown schedule mode {self.mode!r}; choose one of: {', '.join(MODES)}"
            )

    # ------------------------------------------------------------------------------------------
    # (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-serialisable values (stored in PNG metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpatialSchedule:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ScheduleError(
                f"a schedule must be a mapping of fields, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScheduleError(
                f"unknown SpatialSchedule field(s) {', '.join(map(str, unknown))}; "
                f"valid fields: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))

    # ------------------------------------------------------------------------------------------
    # phases

    @property
    def needs_attention_probs(self) -> bool:
        """True when :meth:`mask` needs ``attn_probs`` (entropy source and a mode that uses it)."""
        return self.source == "entropy" and self.mode != "prior"

    def phase(self, t: TimeLike) -> str:
        """Label of the mask used at time ``t``: ``"prior"``, ``"attention"`` or ``"relaxed"``.

        Meant for logs and visualisations: a tensor ``t`` must hold one element and is read on
        the host (a device sync), so do not call this inside a compiled step.
        """
        if isinstance(t, torch.Tensor):
            if t.numel() != 1:
                raise ValueError(
                    f"phase() needs a single time value, got a tensor of shape {tuple(t.shape)}"
                )
        else:
            t = _check_time(t)
        return PHASES[int(phase_index(self, time_column(t)).reshape(()))]

    # ------------------------------------------------------------------------------------------
    # the mask

    def mask(
        self,
        t: TimeLike,
        ca_raw: torch.Tensor,
        rows: int,
        cols: int,
        *,
        attn_probs: torch.Tensor | None = None,
        fused: bool | str = "auto",
    ) -> torch.Tensor:
        """Injection mask ``[B, rows*cols, 1]`` in ``ca_raw``'s dtype and device.

        Args:
            t: flow time in [0, 1] (1 = noise). A Python number is validated and only the mask of
                its phase is computed. A tensor (0-d, ``[1]`` or ``[B]``, any float dtype/device,
                e.g. the transformer's ``timestep``) selects the phase per sample with
                ``torch.where`` and is never read on the host, so its range is not checked; it
                is compared with ``early``/``late`` in its own dtype (thresholds rounded to it).
            ca_raw: ``[B, rows*cols, D]`` raw output of the identity cross-attention (before its
                output projection), image tokens in row-major order.
            rows, cols: the image-token grid.
            attn_probs: ``[B, heads, rows*cols, n_id]`` attention probabilities over identity
                tokens; required when ``source == "entropy"`` (see :attr:`needs_attention_probs`).
            fused: for a tensor ``t``, compute the mask with the compiled few-kernel path of
                :mod:`spatialid.masks.fused` (True), this eager reference (False), or the fused
                path where it is faster: on CUDA ("auto", the default).
        """
        if ca_raw.dim() != 3:
            raise ValueError(f"ca_raw must be [B, N, D], got shape {tuple(ca_raw.shape)}")
        batch, n_tokens = ca_raw.shape[:2]
        _check_tokens(n_tokens, rows, cols, "ca_raw")
        if self.needs_attention_probs:
            if attn_probs is None:
                raise ValueError(
                    "SpatialSchedule(source='entropy') needs attn_probs [B, heads, N, n_id]; "
                    "pass the CA attention probabilities or use source='norm'"
                )
            shape = tuple(attn_probs.shape)
            if len(shape) != 4 or shape[0] != batch or shape[2] != n_tokens:
                raise ValueError(
                    f"attn_probs must be [{batch}, heads, {n_tokens}, n_id], got {shape}"
                )

        if isinstance(t, torch.Tensor):
            if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
                raise ValueError(
                    f"t must be a number, a 0-d tensor or a tensor of shape [{batch}], got shape {tuple(t.shape)}"
                )
            compute = fused_identity_masks if use_fused(fused, ca_raw.device) else identity_masks
        else:
            t = _check_time(t)
            compute = identity_masks
        # one person without a region: the case K = 1 of the one mask function
        layout = build_layout(1, rows, cols, self.center_sigma, None, ca_raw.device)
        probs = attn_probs.unsqueeze(0) if self.needs_attention_probs else None
        out = compute(self, t, ca_raw.unsqueeze(0), rows, cols, layout, attn_probs=probs)
        return out[0].unsqueeze(-1).to(dtype=ca_raw.dtype)


def _check_time(t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise ValueError(f"t must be a number in [0, 1] or a tensor, got {type(t).__name__}")
    value = float(t)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"t must be in [0, 1] (1 = pure noise), got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# presets

PRESETS: dict[str, SpatialSchedule | None] = {
    "pulid": None,
    "paper": SpatialSchedule(),
    "relaxed": SpatialSchedule(late_floor=0.8, center_sigma=0.7, global_floor=0.3),
    # The authors' ablation (ablation_study.py): configs C, D and E between paper (B) and relaxed (F).
    "late-floor-0.7": SpatialSchedule(late_floor=0.7, center_sigma=0.5),
    "global-floor-0.3": SpatialSchedule(global_floor=0.3),
    "global-floor-0.5": SpatialSchedule(global_floor=0.5),
    "prior-only": SpatialSchedule(mode="prior"),
    "attention-only": SpatialSchedule(mode="attention"),
    "no-relax": SpatialSchedule(mode="no-relax"),
    "entropy": SpatialSchedule(source="entropy"),
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "pulid": "PuLID baseline: uniform identity injection on every token at every step (no mask).",
    "paper": (
        "SpatialID as published: centre prior (t > 0.7), refined CA-norm mask, "
        "relaxed to 0.5 + 0.5*mask for t <= 0.3."
    ),
    "relaxed": (
        "The paper's IBench setting (authors' config F): prior sigma 0.7, late floor 0.8, "
        "0.3 floor at every step."
    ),
    "late-floor-0.7": "Ablation (authors' config C): paper schedule with late floor 0.7 and prior sigma 0.5.",
    "global-floor-0.3": "Ablation (authors' config D): paper schedule with a 0.3 floor at every step.",
    "global-floor-0.5": "Ablation (authors' config E): paper schedule with a 0.5 floor at every step.",
    "prior-only": "Ablation: the centre prior at every step (no attention-derived mask).",
    "attention-only": "Ablation: the refined CA-norm mask at every step (no prior, no relaxation).",
    "no-relax": "Ablation: paper schedule without late relaxation (refined mask down to t = 0).",
    "entropy": "Paper schedule with the attention-entropy mask source instead of the CA norm.",
}


def resolve_preset(
    name_or_schedule: str | SpatialSchedule | Mapping[str, Any] | None,
) -> SpatialSchedule | None:
    """Turn a preset name (case-insensitive; ``_`` accepted for ``-``), a schedule, a field mapping
    (e.g. from PNG metadata) or None into a :class:`SpatialSchedule` or None (uniform injection)."""
    if name_or_schedule is None or isinstance(name_or_schedule, SpatialSchedule):
        return name_or_schedule
    if isinstance(name_or_schedule, Mapping):
        return SpatialSchedule.from_dict(name_or_schedule)
    if isinstance(name_or_schedule, str):
        key = name_or_schedule.strip().lower().replace("_", "-")
        if key in PRESETS:
            return PRESETS[key]
        raise ScheduleError(
            f"unknown schedule preset {name_or_schedule!r}; valid presets: {', '.join(PRESETS)}"
        )
    raise TypeError(
        "expected a preset name, a SpatialSchedule, a mapping of fields or None, "
        f"got {type(name_or_schedule).__name__}"
    )


def apply_overrides(
    schedule: SpatialSchedule | None, overrides: Mapping[str, Any] | None, *, strict: bool = False, preset: str = "pulid"
) -> SpatialSchedule | None:
    """``schedule`` with the fields in ``overrides`` replaced (``--early``, ``--late-floor``, ...).

    Uniform PuLID (``None``) has no mask to change: it stays uniform, so that one set of overrides
    can apply to every preset of a comparison or a bench run; ``strict=True`` refuses that case
    instead (for the one preset a user asked for).
    """
    if not overrides:
        return schedule
    unknown = sorted(set(overrides) - set(SCHEDULE_FIELDS))
    if unknown:
        raise ScheduleError(f"unknown schedule field(s) {', '.join(unknown)}; valid: {', '.join(SCHEDULE_FIELDS)}")
    if schedule is None:
        if strict:
            raise ScheduleError(
                f"schedule settings ({', '.join(sorted(overrides))}) change a spatial mask, but preset {preset!r} "
                "injects uniformly; pick a spatial preset such as relaxed or paper"
            )
        return None
    return SpatialSchedule(**{**schedule.to_dict(), **{k: float(v) for k, v in overrides.items()}})
