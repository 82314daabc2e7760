"""Temporal-spatial schedule, presets and mask() (spatialid.masks.schedule)."""

from __future__ import annotations

import json

import pytest
import torch

import spatialid
from spatialid.errors import SpatialIDError
from spatialid.masks import (
    PRESET_DESCRIPTIONS,
    PRESETS,
    ScheduleError,
    SpatialSchedule,
    center_prior,
    entropy_mask,
    norm_mask,
    refine_mask,
    resolve_preset,
)
from spatialid.masks import extractor

ROWS, COLS = 5, 6
N = ROWS * COLS


@pytest.fixture()
def ca_raw() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, N, 16, generator=gen)
    x[0, 14] *= 6.0  # a strong "face" token per sample
    x[1, 3] *= 4.0
    return x


def refined_of(x: torch.Tensor) -> torch.Tensor:
    return refine_mask(norm_mask(x), ROWS, COLS)


def prior_of(sigma: float = 0.3) -> torch.Tensor:
    return center_prior(ROWS, COLS, sigma)


# ---------------------------------------------------------------------------------------------
# dataclass


def test_defaults_and_public_names():
    s = SpatialSchedule()
    assert (s.early, s.late, s.late_floor, s.center_sigma, s.global_floor) == (0.7, 0.3, 0.5, 0.3, 0.0)
    assert (s.source, s.mode) == ("norm", "scheduled")
    assert spatialid.SpatialSchedule is SpatialSchedule
    assert spatialid.PRESETS is PRESETS and spatialid.resolve_preset is resolve_preset
    with pytest.raises(AttributeError):
        s.early = 0.5  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"early": 0.2, "late": 0.3}, "late <= early"),
        ({"early": 1.2}, "late <= early"),
        ({"late": -0.1}, "late <= early"),
        ({"early": float("nan")}, "finite"),
        ({"center_sigma": 0.0}, "center_sigma"),
        ({"center_sigma": -1.0}, "center_sigma"),
        ({"late_floor": 1.5}, "late_floor"),
        ({"late_floor": -0.5}, "late_floor"),
        ({"global_floor": -0.1}, "global_floor"),
        ({"global_floor": 1.01}, "global_floor"),
        ({"source": "l1"}, "norm, entropy"),
        ({"mode": "prior-only"}, "scheduled, prior, attention, no-relax"),
        ({"early": "0.7"}, "number"),
        ({"late": True}, "number"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ScheduleError, match=match) as info:
        SpatialSchedule(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SpatialIDError)


def test_edge_values_accepted_and_ints_normalised():
    s = SpatialSchedule(early=1, late=0, late_floor=1, global_floor=0)
    assert isinstance(s.early, float) and s.to_dict()["early"] == 1.0
    assert SpatialSchedule(early=0.5, late=0.5).phase(0.5) == "relaxed"


def test_to_dict_from_dict_roundtrip_through_json():
    for schedule in PRESETS.values():
        if schedule is None:
            continue
        d = json.loads(json.dumps(schedule.to_dict()))
        assert SpatialSchedule.from_dict(d) == schedule
    assert SpatialSchedule().to_dict() == {
        "early": 0.7,
        "late": 0.3,
        "late_floor": 0.5,
        "center_sigma": 0.3,
        "global_floor": 0.0,
        "source": "norm",
        "mode": "scheduled",
    }
    assert SpatialSchedule.from_dict({"late_floor": 0.8}) == SpatialSchedule(late_floor=0.8)
    with pytest.raises(ScheduleError, match="unknown SpatialSchedule field"):
        SpatialSchedule.from_dict({"erly": 0.7})
    with pytest.raises(ScheduleError, match="mapping"):
        SpatialSchedule.from_dict([("early", 0.7)])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# phases


def test_phase_boundaries():
    s = SpatialSchedule()
    assert s.phase(1.0) == "prior"
    assert s.phase(0.7000001) == "prior"
    assert s.phase(0.7) == "attention"  # early >= t
    assert s.phase(0.3000001) == "attention"
    assert s.phase(0.3) == "relaxed"  # t <= late
    assert s.phase(0.0) == "relaxed"
    assert s.phase(torch.tensor([0.5])) == "attention"
    # a tensor t is compared in its own dtype: float32(0.3) > 0.3 in float64, yet it means 0.3
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert s.phase(torch.tensor(0.3, dtype=dtype)) == "relaxed"
        assert s.phase(torch.tensor(0.7, dtype=dtype)) == "attention"
    with pytest.raises(ValueError, match="single time"):
        s.phase(torch.tensor([0.5, 0.5]))


def test_phase_per_mode():
    assert [SpatialSchedule(mode="prior").phase(t) for t in (1.0, 0.5, 0.0)] == ["prior"] * 3
    assert [SpatialSchedule(mode="attention").phase(t) for t in (1.0, 0.5, 0.0)] == ["attention"] * 3
    assert [SpatialSchedule(mode="no-relax").phase(t) for t in (1.0, 0.5, 0.0)] == [
        "prior",
        "attention",
        "attention",
    ]


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), "0.5", None])
def test_bad_time_rejected(bad, ca_raw):
    s = SpatialSchedule()
    with pytest.raises(ValueError, match="t must be"):
        s.mask(bad, ca_raw, ROWS, COLS)
    with pytest.raises(ValueError, match="t must be"):
        s.phase(bad)


# ---------------------------------------------------------------------------------------------
# mask()


def test_mask_follows_the_schedule(ca_raw):
    s = SpatialSchedule()
    refined = refined_of(ca_raw)
    prior = prior_of().expand(2, N)
    expected = {
        1.0: prior,
        0.71: prior,
        0.7: refined,
        0.5: refined,
        0.31: refined,
        0.3: 0.5 + 0.5 * refined,
        0.0: 0.5 + 0.5 * refined,
    }
    for t, exp in expected.items():
        m = s.mask(t, ca_raw, ROWS, COLS)
        assert m.shape == (2, N, 1) and m.dtype == torch.float32
        torch.testing.assert_close(m[..., 0], exp, msg=f"t={t}")


def test_mask_relaxed_preset_and_global_floor(ca_raw):
    s = PRESETS["relaxed"]
    refined = refined_of(ca_raw)
    prior = center_prior(ROWS, COLS, 0.7).expand(2, N)
    torch.testing.assert_close(s.mask(0.9, ca_raw, ROWS, COLS)[..., 0], prior.clamp_min(0.3))
    torch.testing.assert_close(s.mask(0.5, ca_raw, ROWS, COLS)[..., 0], refined.clamp_min(0.3))
    torch.testing.assert_close(s.mask(0.1, ca_raw, ROWS, COLS)[..., 0], 0.8 + 0.2 * refined)
    assert float(s.mask(0.9, ca_raw, ROWS, COLS).min()) == pytest.approx(0.3)
    # a full late floor is uniform injection at the end
    assert torch.equal(SpatialSchedule(late_floor=1.0).mask(0.1, ca_raw, ROWS, COLS), torch.ones(2, N, 1))


def test_ablation_modes(ca_raw):
    refined = refined_of(ca_raw)
    prior = prior_of().expand(2, N)
    for t in (1.0, 0.5, 0.0):
        torch.testing.assert_close(PRESETS["prior-only"].mask(t, ca_raw, ROWS, COLS)[..., 0], prior)
        torch.testing.assert_close(PRESETS["attention-only"].mask(t, ca_raw, ROWS, COLS)[..., 0], refined)
    nr = PRESETS["no-relax"]
    torch.testing.assert_close(nr.mask(0.9, ca_raw, ROWS, COLS)[..., 0], prior)
    torch.testing.assert_close(nr.mask(0.1, ca_raw, ROWS, COLS)[..., 0], refined)


def test_tensor_time_selects_phase_per_sample(ca_raw):
    s = SpatialSchedule(global_floor=0.05)
    refined = refined_of(ca_raw)
    prior = prior_of()
    m = s.mask(torch.tensor([0.9, 0.5]), ca_raw, ROWS, COLS)[..., 0]
    torch.testing.assert_close(m[0], prior.clamp_min(0.05))
    torch.testing.assert_close(m[1], refined[1].clamp_min(0.05))
    # exact boundaries as a tensor: 0.7 -> refined, 0.3 -> relaxed
    m = s.mask(torch.tensor([0.7, 0.3]), ca_raw, ROWS, COLS)[..., 0]
    torch.testing.assert_close(m[0], refined[0].clamp_min(0.05))
    torch.testing.assert_close(m[1], (0.5 + 0.5 * refined[1]).clamp_min(0.05))


@pytest.mark.parametrize("preset", ["paper", "relaxed", "prior-only", "attention-only", "no-relax"])
@pytest.mark.parametrize("t", [1.0, 0.75, 0.7, 0.5, 0.3, 0.25, 0.0])
def test_tensor_time_equals_float_time(preset, t, ca_raw):
    s = PRESETS[preset]
    expected = s.mask(t, ca_raw, ROWS, COLS)
    for tt in (torch.tensor(t), torch.tensor([t]), torch.tensor([t, t]), torch.tensor([t, t]).bfloat16()):
        # exact: both paths build the candidates with the same functions; torch.where only selects
        torch.testing.assert_close(s.mask(tt, ca_raw, ROWS, COLS), expected, rtol=0, atol=0)


def test_tensor_time_bad_shape(ca_raw):
    for preset in ("paper", "prior-only"):
        with pytest.raises(ValueError, match="shape"):
            PRESETS[preset].mask(torch.tensor([0.5, 0.5, 0.5]), ca_raw, ROWS, COLS)
        with pytest.raises(ValueError, match="shape"):
            PRESETS[preset].mask(torch.full((2, 1), 0.5), ca_raw, ROWS, COLS)


def test_tensor_time_has_no_host_sync(ca_raw):
    # fullgraph=True fails on .item(), bool(tensor) or Python branching on tensor values.
    s = SpatialSchedule(global_floor=0.1)
    compiled = torch.compile(lambda t, x: s.mask(t, x, ROWS, COLS), backend="eager", fullgraph=True)
    t = torch.tensor([0.9, 0.2])
    torch.testing.assert_close(compiled(t, ca_raw), s.mask(t, ca_raw, ROWS, COLS))


def test_dtypes_follow_input(ca_raw):
    s = SpatialSchedule()
    ref = s.mask(0.5, ca_raw.bfloat16().float(), ROWS, COLS)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        m = s.mask(0.5, ca_raw.to(dtype), ROWS, COLS)
        assert m.dtype == dtype
        torch.testing.assert_close(m.float(), ref, rtol=0, atol=1e-2)
    assert s.mask(0.9, ca_raw.bfloat16(), ROWS, COLS).dtype == torch.bfloat16
    tb = torch.tensor(0.5, dtype=torch.bfloat16)
    assert s.mask(tb, ca_raw.bfloat16(), ROWS, COLS).dtype == torch.bfloat16


def test_batch_statistics_are_per_sample(ca_raw):
    s = SpatialSchedule()
    both = s.mask(0.5, ca_raw, ROWS, COLS)
    torch.testing.assert_close(both[0:1], s.mask(0.5, ca_raw[0:1], ROWS, COLS))
    torch.testing.assert_close(both[1:2], s.mask(0.5, ca_raw[1:2], ROWS, COLS))


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 3), (3, 1), (1, 4)])
@pytest.mark.parametrize("t", [0.9, 0.5, 0.1])
def test_tiny_grids(rows, cols, t):
    x = torch.randn(2, rows * cols, 8)
    m = SpatialSchedule().mask(t, x, rows, cols)
    assert m.shape == (2, rows * cols, 1)
    assert torch.isfinite(m).all() and float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    if rows * cols == 1:
        # one token: prior 1; raw min-max of a constant is 0 -> refined 0 -> relaxed late_floor
        assert float(m.flatten()[0]) == {0.9: 1.0, 0.5: 0.0, 0.1: 0.5}[t]


def test_mask_bad_arguments(ca_raw):
    s = SpatialSchedule()
    with pytest.raises(ValueError, match="grid is 4x4"):
        s.mask(0.5, ca_raw, 4, 4)
    with pytest.raises(ValueError, match="grid is 4x4"):
        s.mask(0.9, ca_raw, 4, 4)  # checked in every phase
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        s.mask(0.5, ca_raw[0], ROWS, COLS)


def test_mask_output_never_aliases_the_cache(ca_raw):
    s = PRESETS["prior-only"]
    first = s.mask(0.5, ca_raw, ROWS, COLS)
    first.zero_()
    first_t = s.mask(torch.tensor(0.5), ca_raw, ROWS, COLS)
    first_t.zero_()
    torch.testing.assert_close(s.mask(0.5, ca_raw, ROWS, COLS)[..., 0], prior_of().expand(2, N))


def test_prior_is_cached_across_calls(ca_raw):
    extractor._center_prior_cached.cache_clear()
    s = SpatialSchedule()
    for _ in range(3):
        s.mask(torch.tensor(0.5), ca_raw, ROWS, COLS)
    info = extractor._center_prior_cached.cache_info()
    assert info.misses == 1 and info.hits == 2


# ---------------------------------------------------------------------------------------------
# entropy source


def test_entropy_source(ca_raw):
    s = PRESETS["entropy"]
    assert s.needs_attention_probs and not SpatialSchedule().needs_attention_probs
    assert not SpatialSchedule(source="entropy", mode="prior").needs_attention_probs
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(2, 3, N, 4, generator=gen) * 3, dim=-1)
    refined = refine_mask(entropy_mask(probs, ROWS, COLS), ROWS, COLS)
    torch.testing.assert_close(s.mask(0.5, ca_raw, ROWS, COLS, attn_probs=probs)[..., 0], refined)
    torch.testing.assert_close(
        s.mask(0.1, ca_raw, ROWS, COLS, attn_probs=probs)[..., 0], 0.5 + 0.5 * refined
    )
    with pytest.raises(ValueError, match="attn_probs"):
        s.mask(0.5, ca_raw, ROWS, COLS)
    with pytest.raises(ValueError, match="attn_probs"):
        s.mask(0.9, ca_raw, ROWS, COLS)  # required in every phase, not only when used
    with pytest.raises(ValueError, match="attn_probs must be"):
        s.mask(0.5, ca_raw, ROWS, COLS, attn_probs=probs[:, :, :-1])
    # the norm source ignores attn_probs
    torch.testing.assert_close(
        SpatialSchedule().mask(0.5, ca_raw, ROWS, COLS, attn_probs=probs),
        SpatialSchedule().mask(0.5, ca_raw, ROWS, COLS),
    )


# ---------------------------------------------------------------------------------------------
# presets


def test_presets_table():
    assert list(PRESETS) == [
        "pulid",
        "paper",
        "relaxed",
        "late-floor-0.7",
        "global-floor-0.3",
        "global-floor-0.5",
        "prior-only",
        "attention-only",
        "no-relax",
        "entropy",
    ]
    assert PRESETS["pulid"] is None
    assert PRESETS["paper"] == SpatialSchedule()
    assert PRESETS["relaxed"] == SpatialSchedule(late_floor=0.8, center_sigma=0.7, global_floor=0.3)
    assert PRESETS["prior-only"].mode == "prior"
    assert PRESETS["attention-only"].mode == "attention"
    assert PRESETS["no-relax"].mode == "no-relax"
    assert PRESETS["entropy"] == SpatialSchedule(source="entropy")
    assert set(PRESET_DESCRIPTIONS) == set(PRESETS)
    for text in PRESET_DESCRIPTIONS.values():
        assert text and "\n" not in text and len(text) < 120


def test_resolve_preset():
    assert resolve_preset(None) is None
    assert resolve_preset("pulid") is None
    assert resolve_preset("paper") is PRESETS["paper"]
    assert resolve_preset(" Prior_Only ") is PRESETS["prior-only"]
    custom = SpatialSchedule(early=0.8)
    assert resolve_preset(custom) is custom
    assert resolve_preset({"early": 0.8}) == custom
    with pytest.raises(ScheduleError, match="valid presets: pulid, paper, relaxed") as info:
        resolve_preset("papr")
    assert isinstance(info.value, ValueError)
    with pytest.raises(TypeError):
        resolve_preset(3)  # type: ignore[arg-type]
