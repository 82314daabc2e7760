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
    SOURCES,
    ScheduleError,
    SpatialSchedule,
    resolve_preset,
)

__all__ = [
    "MODES",
    "PHASES",
    "PRESETS",
    "PRESET_DESCRIPTIONS",
    "SOURCES",
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
