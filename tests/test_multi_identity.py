"""Several people in one image (issue 14) on the tiny random-weight model: masks, regions, mask files, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spatialid.masks import SpatialSchedule, multi

pytest.importorskip("diffusers")

PROMPT = "two people"
STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    from spatialid.pipeline import SpatialIDPipeline

    p = SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def ids(pipe):
    g = torch.Generator().manual_seed(11)
    kv = pipe.ca_modules[0].kv_dim
    return [torch.randn(1, 4, kv, generator=g) for _ in range(3)], torch.randn(1, 4, kv, generator=g)


def run(pipe, **kw):
    args = {"height": 64, "width": 96, "num_inference_steps": STEPS, "seed": 3, "output_type": "np", "preset": "paper"}
    args.update(kw)
    return pipe(PROMPT, **args)


# ----------------------------------------------------------------------------- masks.multi


def test_competition_keeps_sum_at_most_one_and_soft_borders():
    m = torch.rand(3, 2, 50, generator=torch.Generator().manual_seed(0))
    out = multi.compete(m)
    assert bool((out.sum(0) <= m.max(0).values + 1e-6).all()) and bool((out >= 0).all())
    equal = multi.compete(torch.full((2, 1, 4), 0.8))
    assert torch.allclose(equal, torch.full_like(equal, 0.4))  # a tie splits the token
    clear = multi.compete(torch.tensor([[[0.9]], [[0.1]]]))
    assert float(clear[0]) > 0.89 and float(clear[1]) < 1e-3  # a clear winner keeps its mask


def test_layout_priors_spread_left_to_right_and_one_person_is_the_centre_prior():
    from spatialid.masks import center_prior

    priors = multi.layout_priors(3, 5, 9, 0.3).reshape(3, 5, 9)
    peaks = [int(p.sum(0).argmax()) for p in priors]
    assert peaks == sorted(peaks) and peaks[0] < 4 < peaks[2]
    assert torch.allclose(multi.layout_priors(1, 5, 7, 0.3)[0], center_prior(5, 7, 0.3))


def test_box_regions_cover_cells_by_area():
    r = multi.box_region((0.0, 0.0, 0.5, 1.0), 2, 3)
    assert r.tolist() == [[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]]
    with pytest.raises(ValueError, match="x0 < x1"):
        multi.box_region((0.6, 0, 0.5, 1), 2, 3)


# ----------------------------------------------------------------------------- injector


@pytest.fixture(scope="module")
def model_and_cas():
    from spatialid.models import PerceiverAttentionCA
    from spatialid.models.configs import TINY_FLUX, TINY_PULID
    from spatialid.pipeline.tiny import build_tiny_transformer

    torch.manual_seed(0)
    model = build_tiny_transformer(TINY_FLUX).eval()
    torch.manual_seed(1)
    cas = torch.nn.ModuleList(PerceiverAttentionCA.from_config(TINY_PULID.ca) for _ in range(TINY_PULID.num_ca)).eval()
    for p in cas.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model, cas


def _drive(injector, image, embeds, t=0.5, **active):
    with injector.active(embeds, schedule=active.pop("schedule", SpatialSchedule()), record_masks=True, **active) as s:
        injector.begin_call(image, torch.tensor([t] * image.shape[0]))
        out = injector.inject(1, image)
    return out, s.records


def test_residual_is_zero_outside_each_region(model_and_cas):
    from spatialid.injection import IdentityInjector

    model, cas = model_and_cas
    inj = IdentityInjector(model, cas)
    try:
        rows, cols = 3, 4
        g = torch.Generator().manual_seed(5)
        image = torch.randn(2, rows * cols, cas[0].dim, generator=g)
        people = [torch.randn(1, 4, cas[0].kv_dim, generator=g) for _ in range(2)]
        regions = torch.stack([multi.box_region((0, 0, 0.5, 1), rows, cols), multi.box_region((0.5, 0, 1, 1), rows, cols)])
        for t in (0.9, 0.5, 0.1):  # prior, attention, relaxed
            out, records = _drive(inj, image, people, t, grid=(rows, cols), regions=regions)
            masks = records[0].mask  # [K, B, N]
            flat = regions.reshape(2, 1, -1)
            assert bool((masks[flat.expand_as(masks) == 0] == 0).all())
            assert bool((masks.sum(0) <= 1 + 1e-6).all())
            # each person alone: zero residual outside their region
            for k in range(2):
                alone, _ = _drive(inj, image, [people[k]], t, grid=(rows, cols), regions=regions[k : k + 1])
                outside = flat[k, 0] == 0
                assert torch.equal(alone[:, outside], image[:, outside])
                assert not torch.equal(alone[:, ~outside], image[:, ~outside])
            assert not torch.equal(out, image)
        # Kontext-style appended tokens pass through untouched
        extra = torch.randn(2, 5, cas[0].dim, generator=g)
        longer = torch.cat([image, extra], dim=1)
        out, _ = _drive(inj, longer, people, 0.5, grid=(rows, cols), regions=regions, generated_tokens=rows * cols)
        assert torch.equal(out[:, rows * cols :], extra)
        assert torch.equal(out[:, : rows * cols], _drive(inj, image, people, 0.5, grid=(rows, cols), regions=regions)[0])
    finally:
        inj.detach()


def test_one_person_in_a_list_is_the_single_identity_path(model_and_cas):
    from spatialid.injection import IdentityInjector

    model, cas = model_and_cas
    inj = IdentityInjector(model, cas)
    try:
        g = torch.Generator().manual_seed(6)
        image = torch.randn(1, 12, cas[0].dim, generator=g)
        person = torch.randn(1, 4, cas[0].kv_dim, generator=g)
        a, _ = _drive(inj, image, person, grid=(3, 4))
        b, _ = _drive(inj, image, [person], grid=(3, 4))
        assert torch.equal(a, b)
    finally:
        inj.detach()


def test_bf16_odd_grid_and_entropy_source(model_and_cas):
    from spatialid.injection import IdentityInjector

    model, cas = model_and_cas
    cas16 = torch.nn.ModuleList([c for c in cas]).to(torch.bfloat16)
    inj = IdentityInjector(model, cas16)
    try:
        g = torch.Generator().manual_seed(7)
        image = torch.randn(2, 15, cas[0].dim, generator=g).to(torch.bfloat16)
        people = [torch.randn(2, 4, cas[0].kv_dim, generator=g) for _ in range(3)]
        for schedule in (SpatialSchedule(), SpatialSchedule(source="entropy"), None):
            out, records = _drive(inj, image, people, 0.5, grid=(3, 5), schedule=schedule)
            assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out.float()).all())
            assert tuple(records[0].mask.shape) == (3, 2, 15)
            assert bool((records[0].mask.float().sum(0) <= 1 + 1e-2).all())
    finally:
        cas.to(torch.float32)
        inj.detach()


# ----------------------------------------------------------------------------- pipeline


def test_one_person_reproduces_todays_output_bit_for_bit(pipe, ids):
    (a, _, _), _ = ids
    today = run(pipe, id_embeds=a, return_masks=True)
    assert np.array_equal(run(pipe, people=[a]).images, today.images)
    assert today.masks[0].people is None


def test_two_people_masks_sum_to_one_and_follow_the_order(pipe, ids):
    (a, b, _), _ = ids
    out = run(pipe, people=[a, b], return_masks=True)
    assert out.settings["identity"]["source"] == "people" and out.settings["identity_injected"]
    assert len(out.masks) == STEPS
    for m in out.masks:
        assert tuple(m.people.shape) == (len(pipe.injector.points), 2, 1, 4, 6)
        assert float(m.people.sum(dim=1).max()) <= 1.0 + 1e-6
    prior = next(m for m in out.masks if m.phase == "prior").people.mean(dim=0)[:, 0]  # [K, rows, cols]
    left = prior[..., :3].sum(dim=(-1, -2)) / prior.sum(dim=(-1, -2))
    assert float(left[0]) > 0.8 and float(left[1]) < 0.2
    swapped = run(pipe, people=[b, a], return_masks=True).masks[0].people.mean(dim=0)[:, 0]
    assert torch.allclose(swapped[0], prior[0]) and not np.array_equal(run(pipe, people=[b, a]).images, out.images)


def test_mask_file_replay_is_bit_identical(pipe, ids, tmp_path):
    from spatialid.pipeline.people import load_mask_file

    (a, b, c), _ = ids
    path = tmp_path / "m.safetensors"
    first = run(pipe, people=[a, b, c], save_masks=path, start_step=1)
    masks, meta = load_mask_file(path)
    assert tuple(masks.shape) == (STEPS - 1, len(pipe.injector.points), 3, 1, 4, 6) and masks.dtype == torch.float32
    assert meta["steps"] == [1, 2, 3] and len(meta["phases"]) == 3
    again = run(pipe, people=[a, b, c], masks_from=path, start_step=1)
    assert np.array_equal(again.images, first.images)
    # edited masks change the image; a file of another shape is refused in one line
    from safetensors.torch import save_file

    save_file({"masks": torch.flip(masks, dims=[2]).contiguous()}, str(tmp_path / "edit.safetensors"),
              metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    assert not np.array_equal(run(pipe, people=[a, b, c], masks_from=tmp_path / "edit.safetensors", start_step=1).images, first.images)
    from spatialid.errors import SpatialIDError

    with pytest.raises(SpatialIDError, match="persons"):
        run(pipe, people=[a, b], masks_from=path, start_step=1)
    # one identity too, with true CFG (its negative branch computes its own masks again)
    single = run(pipe, id_embeds=a, uncond_id_embeds=ids[1], true_cfg=2.0, save_masks=path)
    assert np.array_equal(run(pipe, id_embeds=a, uncond_id_embeds=ids[1], true_cfg=2.0, masks_from=path).images, single.images)


def test_batch_two_with_true_cfg_and_regions(pipe, ids, tmp_path):
    (a, b, _), uncond = ids
    path = tmp_path / "m.safetensors"
    out = run(
        pipe, people=[a, b], regions=["0,0,0.5,1", (0.5, 0.0, 1.0, 1.0)], true_cfg=2.0, uncond_id_embeds=uncond,
        num_images_per_prompt=2, return_masks=True, save_masks=path, height=80, width=112,
    )
    assert out.images.shape == (2, 80, 112, 3)
    assert out.settings["regions"] == [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]
    people = torch.stack([m.people for m in out.masks])  # [S, P, K, B, 5, 7] (an odd grid)
    assert people.shape[3] == 2 and float(people[:, :, 0, :, :, 4:].abs().max()) == 0.0
    assert float(people[:, :, 1, :, :, :3].abs().max()) == 0.0
    replay = run(
        pipe, people=[a, b], regions=["0,0,0.5,1", (0.5, 0.0, 1.0, 1.0)], true_cfg=2.0, uncond_id_embeds=uncond,
        num_images_per_prompt=2, masks_from=path, height=80, width=112,
    )
    assert np.array_equal(replay.images, out.images)


def test_single_identity_region_bounds_its_mask(pipe, ids):
    (a, _, _), _ = ids
    mask = torch.zeros(64, 96)
    mask[:, :48] = 1.0
    out = run(pipe, id_embeds=a, regions=[mask], return_masks=True)
    for m in out.masks:
        assert float(m.people[:, 0, :, :, 3:].abs().max()) == 0.0
    assert not np.array_equal(out.images, run(pipe, id_embeds=a).images)


def test_people_argument_errors(pipe, ids):
    from spatialid.errors import SpatialIDError

    (a, b, c), _ = ids
    with pytest.raises(SpatialIDError, match="at most|between 1 and 4"):
        run(pipe, people=[a, b, c, a, b])
    with pytest.raises(SpatialIDError, match="not both"):
        run(pipe, people=[a], id_embeds=b)
    with pytest.raises(SpatialIDError, match="one region per person"):
        run(pipe, people=[a, b], regions=["0,0,1,1"])
    with pytest.raises(SpatialIDError, match="x0 < x1"):
        run(pipe, people=[a], regions=["0.5,0,0.2,1"])


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def embeds_files(tmp_path_factory):
    from spatialid.encoder.embedding import IdentityEmbedding
    from spatialid.models.configs import TINY_PULID

    g = torch.Generator().manual_seed(0)
    shape = (1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim)
    folder = tmp_path_factory.mktemp("people")
    return [
        IdentityEmbedding(tokens=torch.randn(shape, generator=g), uncond_tokens=torch.randn(shape, generator=g)).save(
            folder / f"{name}.safetensors"
        )
        for name in ("alice", "bob")
    ]


def _cli(argv, capsys):
    from spatialid.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--model", "tiny", "--size", "112x80", "--steps", "3", "--seed", "4"]


def test_cli_two_people_masks_and_replay(tmp_path, embeds_files, capsys):
    from PIL import Image

    from spatialid.app.metadata import read_image_metadata

    alice, bob = embeds_files
    people = ["--person-embeds", alice, "--person-embeds", bob, "--region", "0,0,0.6,1", "--region", "0.4,0,1,1"]
    out, masks = tmp_path / "two.png", tmp_path / "two.safetensors"
    code, stdout, err = _cli(["generate", *FAST, *people, "-p", PROMPT, "--masks", "--save-masks", masks, "-o", out], capsys)
    assert code == 0, err
    assert (tmp_path / "two_masks.png").is_file() and masks.is_file()
    meta = read_image_metadata(out)
    assert meta["people"] == [["alice.safetensors"], ["bob.safetensors"]]
    assert meta["regions"] == [[0.0, 0.0, 0.6, 1.0], [0.4, 0.0, 1.0, 1.0]]
    code, stdout, _ = _cli(["info", out], capsys)
    assert code == 0 and "2 people" in stdout and "person 2  bob.safetensors" in stdout and "--person-embeds" in stdout
    again = tmp_path / "again.png"
    code, _, err = _cli(["generate", *FAST, *people, "-p", PROMPT, "--masks-from", masks, "-o", again], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--person", "a.jpg", "--id", "b.jpg"], "not both"),
        (["--person", ",", "-p", "x"], "names no photo"),
        (["--person-embeds", "{e}"] * 5, "at most 4"),
        (["--person-embeds", "{e}", "--region", "0.5,0,0.2,1"], "x0 < x1"),
        (["--person-embeds", "{e}", "--region", "0,0,1"], "four fractions"),
        (["--person-embeds", "{e}", "--region", "0,0,1,1", "--region", "0,0,1,1"], "one --region per person"),
        (["--region", "0,0,1,1"], "needs an identity"),
        (["--person-embeds", "{e}", "--region", "{missing}"], "missing.png"),
        (["--person-embeds", "{e}", "--save-masks", "m.npz"], ".safetensors"),
        (["--person-embeds", "{e}", "--masks-from", "{missing_masks}"], "not found"),
        (["--person-embeds", "{e}", "--masks-from", "{e}"], "masks"),
        (["--person-embeds", "{missing_masks}"], "not found"),
    ],
)
def test_cli_people_errors_exit_2_with_one_line(tmp_path, embeds_files, capsys, extra, match):
    values = {"e": embeds_files[0], "missing": tmp_path / "missing.png", "missing_masks": tmp_path / "none.safetensors"}
    argv = [str(a).format(**values) for a in extra]
    if "-p" not in argv:
        argv += ["-p", "x"]
    code, _, err = _cli(["generate", *FAST, "-o", tmp_path / "x.png", *argv], capsys)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("spatialid: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match.lower() in lines[0].lower(), lines[0]
    assert not (tmp_path / "x.png").exists()


def test_several_people_trace_under_torch_compile_fullgraph(model_and_cas):
    """The multi-identity path has no host syncs or data-dependent branches: one full graph."""
    from spatialid.injection import IdentityInjector

    torch._dynamo.reset()
    model, cas = model_and_cas
    inj = IdentityInjector(model, cas)
    try:
        rows, cols = 3, 5
        g = torch.Generator().manual_seed(8)
        n = rows * cols
        img_ids = torch.zeros(n, 3)
        img_ids[:, 1] = torch.arange(rows).repeat_interleave(cols).float()
        img_ids[:, 2] = torch.arange(cols).repeat(rows).float()
        from spatialid.models.configs import TINY_FLUX

        inputs = {
            "hidden_states": torch.randn(2, n, TINY_FLUX.latent_channels * 4, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, TINY_FLUX.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(2, TINY_FLUX.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([0.5, 0.9]), "img_ids": img_ids, "txt_ids": torch.zeros(5, 3),
            "guidance": torch.full((2,), 3.5), "return_dict": False,
        }
        people = [torch.randn(1, 4, cas[0].kv_dim, generator=g) for _ in range(2)]
        regions = torch.stack([multi.box_region((0, 0, 0.6, 1), rows, cols), multi.box_region((0.4, 0, 1, 1), rows, cols)])
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            with inj.active(people, schedule=SpatialSchedule(), grid=(rows, cols), regions=regions):
                eager = model(**inputs)[0]
            with inj.active(people, schedule=SpatialSchedule(), grid=(rows, cols), regions=regions):
                traced = compiled(**inputs)[0]
        assert torch.allclose(traced, eager, atol=1e-5)
    finally:
        inj.detach()
        torch._dynamo.reset()
