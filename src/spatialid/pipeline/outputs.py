"""What an identity call returns: the output record, the masks of each step, seeds.

Shared by :class:`~spatialid.pipeline.SpatialIDPipeline` and the other FLUX.1 pipelines
(:mod:`spatialid.pipeline.variants`), which return the same record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

__all__ = ["SpatialIDPipelineOutput", "StepMasks", "TINY_NOTE", "collect_step_masks", "seed_generators"]

TINY_NOTE = (
    "tiny model: random weights at toy size, the images are noise by design; it exercises the full "
    "pipeline offline and proves nothing about image quality"
)


@dataclass
class StepMasks:
    """Identity masks of one denoising step (positive branch), one per injection point."""

    step: int  # 0-based denoising step
    t: float  # the sigma the pipeline passed to the transformer
    phase: str  # schedule phase at t ("prior", "attention", "relaxed"; "uniform" without schedule)
    masks: torch.Tensor  # float16 CPU [num_points, batch, rows, cols] (all people together)
    # several people or regions: each person's mask, float32 CPU [num_points, persons, batch, rows, cols]
    people: torch.Tensor | None = None

    def mean(self) -> torch.Tensor:
        """Mask averaged over injection points, float32 ``[batch, rows, cols]``."""
        return self.masks.float().mean(dim=0)


@dataclass
class SpatialIDPipelineOutput(FluxPipelineOutput):
    """FluxPipeline's output plus the recorded masks (``return_masks=True``) and the call's settings."""

    masks: list[StepMasks] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def seed_generators(seed: int, count: int) -> list[torch.Generator]:
    """Image ``i`` of a batch uses seed ``seed + i`` on a CPU generator (device-independent noise),
    so any single image can be regenerated alone with ``seed=seed + i``."""
    return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(count)]


def collect_step_masks(records: Sequence[Any], rows: int, cols: int) -> list[StepMasks]:
    """Group an identity's records by denoising step, keeping the positive (identity) branch."""
    by_step: dict[int, list[Any]] = {}
    for rec in records:
        if rec.branch != "uncond":
            by_step.setdefault(rec.step, []).append(rec)
    result = []
    for step in sorted(by_step):
        recs = sorted(by_step[step], key=lambda r: r.point)
        people = None
        if recs[0].mask.dim() == 3:  # one mask per person: [K, B, N] per point
            per_person = torch.stack([r.mask.float() for r in recs])  # [P, K, B, N]
            people = per_person.reshape(*per_person.shape[:3], rows, cols)
            stack = per_person.sum(dim=1).clamp_(max=1.0).to(torch.float16)  # [P, B, N]
        else:
            stack = torch.stack([r.mask.to(torch.float16) for r in recs])  # [P, B, N]
        result.append(
            StepMasks(
                step=step,
                t=float(recs[0].t),
                phase=str(recs[0].phase),
                masks=stack.reshape(stack.shape[0], stack.shape[1], rows, cols),
                people=people,
            )
        )
    return result
