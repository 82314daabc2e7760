"""The SpatialID paper's IBench numbers, quoted for the report's "paper" block (never computed here).

Source of every number: the "Key Results (IBench: 100 IDs × 41 Prompts)" table of the README of
github.com/leeguandong/SpatialID (a README version that has the table; later versions dropped it),
accompanying arXiv:2602.13994. Its columns are ``IQ↑ | CLIP-I↑ | CLIP-T↑ | FaceSim↑``:

    | PuLID (Krea)  | 0.505 | 0.793 | 0.277 | 0.495 |
    | Dreamo        | 0.510 | 0.805 | 0.266 | 0.398 |
    | DVI           | 0.515 | 0.804 | 0.269 | 0.557 |
    | **SpatialID** | 0.523 | 0.827 | 0.281 | 0.533 |

The authors score with IBench's evaluator (their ``config_spatialid.py``: AestheticScore,
ImagingQuality, FaceSim, AntiFaceSim, LandmarkDiff, ClipI, ClipT, PoseDiv, ExprDiv), so these
columns are IBench's ImagingQuality, ClipI, ClipT and FaceSim, i.e. our ``iq``, ``clip_i``,
``clip_t`` and ``face_sim``. The table gives no Aesthetic, AntiFaceSim or FID numbers, so none are
quoted. Rows map to presets: SpatialID's IBench script (``test_ibench_spatial.py``, "Config F -
best trade-off": late_floor 0.8, center_sigma 0.7, global_floor 0.3) is our ``relaxed``; PuLID is
our ``pulid``. The README labels that row "PuLID (Krea)", which suggests a FLUX.1 Krea base model,
not the FLUX.1-dev our bench uses by default. Dreamo and DVI are other methods with no preset here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OTHER_BENCHMARK_ROWS", "OTHER_BENCHMARK_SOURCE", "PAPER_ROWS", "PAPER_SOURCE", "PaperRow", "paper_rows_for"]

PAPER_SOURCE = (
    "SpatialID README (github.com/leeguandong/SpatialID, table 'Key Results (IBench: 100 IDs × 41 Prompts)'), "
    "arXiv:2602.13994"
)


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's table: its name there and its numbers by our metric keys."""

    name: str
    values: dict[str, float] = field(default_factory=dict)
    note: str = ""


# preset -> the paper's row (numbers copied from the README table quoted in the module docstring)
PAPER_ROWS: dict[str, PaperRow] = {
    "pulid": PaperRow(
        "PuLID (Krea)",
        {"iq": 0.505, "clip_i": 0.793, "clip_t": 0.277, "face_sim": 0.495},
        note="the README's row is 'PuLID (Krea)' (possibly FLUX.1 Krea as base model)",
    ),
    "relaxed": PaperRow("SpatialID", {"iq": 0.523, "clip_i": 0.827, "clip_t": 0.281, "face_sim": 0.533}),
}


def paper_rows_for(presets: list[str]) -> dict[str, PaperRow]:
    """The paper rows of the presets present in a run, in run order."""
    return {p: PAPER_ROWS[p] for p in presets if p in PAPER_ROWS}


# ------------------------------------------------------------------ another benchmark's numbers

#: WithAnyone (ICLR 2026, FLUX.1 [dev], trained; face boxes required) on its own MultiID-Bench, as
#: quoted in this project's issue tracker from the paper: Sim(GT) and CP per group size, and PuLID's
#: CP. Another benchmark (other prompts, people and ArcFace model): for orientation only, never
#: comparable with a run of ours number for number (and not at all with --face-model dlib).
OTHER_BENCHMARK_SOURCE = "WithAnyone (arXiv:2510.14975), MultiID-Bench: another benchmark, numbers quoted as published"
OTHER_BENCHMARK_ROWS: tuple[dict[str, object], ...] = (
    {"method": "WithAnyone", "group": "1", "sim_gt": 0.460, "copy_paste": 0.144},
    {"method": "WithAnyone", "group": "2", "sim_gt": 0.405, "copy_paste": 0.161},
    {"method": "WithAnyone", "group": "3-4", "sim_gt": 0.414, "copy_paste": 0.171},
    {"method": "PuLID", "group": None, "sim_gt": None, "copy_paste": 0.315},
)
