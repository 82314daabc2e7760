"""SpatialID masks: where (spatial mask sources) and when (temporal schedule) to inject identity."""

from spatialid.masks.extractor import (
    center_prior,
    entropy_mask,
    gaussian_kernel1d,
    minmax_normalize,
    norm_mask,
    refine_mask,
)
from spatialid.masks.schedule import (
    MODES,
    PHASES,
    PRESET_DESCRIPTIONS,
    PRESETS,
    SCHEDULE_FIELDS,
    SOURCES,
    ScheduleError,
    SpatialSchedule,
    apply_overrides,
    resolve_preset,
)

__all__ = [
    "MODES",
    "PHASES",
    "PRESETS",
    "PRESET_DESCRIPTIONS",
    "SCHEDULE_FIELDS",
    "SOURCES",
    "apply_overrides",
    "ScheduleError",
    "SpatialSchedule",
    "center_prior",
    "entropy_mask",
    "gaussian_kernel1d",
    "minmax_normalize",
    "norm_mask",
    "refine_mask",
    "resolve_preset",
]
