"""The composition matrix: every FLUX.1 pipeline x 1/2 people x region x eager/compiled x no cache/FBC
x record/replay, through the one identity path the CLI, the web UI and the bench use
(``variant_pipeline`` + ``IdentityPipelineRunner`` on a tiny ``SpatialIDPipeline``).

Each cell generates with identity and checks what that cell promises: finite images that the
identity changed; recorded masks replayed give the same image bit for bit (the replay is the
same computation with the recorded float32 masks); inside inpainting the masks are exactly zero
outside the inpainting mask; compiled (``fullgraph=True``) runs without a graph break and matches
eager; First Block Cache skips steps and still carries the identity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from spatialid.models.configs import TINY_FLUX, TINY_PULID

SIZE = 64
STEPS = 3
C = TINY_FLUX.latent_channels
MODES = ["text2image", "img2img", "inpaint", "fill", "kontext", "controlnet", "control"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("composition")
    paths = {}
    for name, picture in (("init", _photo(0)), ("control", _photo(1))):
        paths[name] = str(root / f"{name}.png")
        picture.save(paths[name])
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, : SIZE // 2] = 255  # repaint the left half
    paths["mask"] = str(root / "mask.png")
    Image.fromarray(mask).save(paths["mask"])
    paths["root"] = str(root)
    return paths


def _wide_transformer(base: Any, in_channels: int) -> Any:
    """The tiny transformer with another input width (Fill / Control concatenate conditions)."""
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    config.update(in_channels=in_channels, out_channels=C * 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return FluxTransformer2DModel(**config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def runners() -> dict[str, Any]:
    """One runner per pipeline, as the app builds them (shared components, the one loader)."""
    import diffusers

    from spatialid.encoder.identity_encoder import tiny_pulid_modules
    from spatialid.pipeline import SpatialIDPipeline
    from spatialid.pipeline.variants import IdentityPipelineRunner, variant_pipeline

    base = SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False)
    base.set_progress_bar_config(disable=True)
    out: dict[str, Any] = {"text2image": base}
    for mode in MODES[1:]:
        owner = base
        if mode in ("fill", "control"):  # a Fill / Canny model: the same pipeline family, a wider transformer
            width = C * 4 * 2 + 8 * 8 * 4 if mode == "fill" else C * 4 * 2
            owner = SpatialIDPipeline(**{**base.flux_components, "transformer": _wide_transformer(base, width)})
            idformer, cas = tiny_pulid_modules(0)
            owner.attach_pulid(cas, idformer=idformer, double_interval=TINY_PULID.double_interval,
                               single_interval=TINY_PULID.single_interval)
            owner.is_tiny = True
        controlnet = None
        if mode == "controlnet":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(4)
                controlnet = diffusers.FluxControlNetModel.from_transformer(
                    base.transformer, num_layers=1, num_single_layers=1,
                    attention_head_dim=TINY_FLUX.attention_head_dim, num_attention_heads=TINY_FLUX.num_attention_heads,
                ).eval().requires_grad_(False)
        runner = IdentityPipelineRunner(variant_pipeline(owner, mode, controlnet), owner, mode)
        runner.set_progress_bar_config(disable=True)
        out[mode] = runner
    return out


@pytest.fixture(scope="module")
def people() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    shape = (1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def _inputs(mode: str, files: dict[str, str]) -> dict[str, Any]:
    return {
        "text2image": {},
        "img2img": {"init_image": files["init"], "strength": 0.8},
        "inpaint": {"init_image": files["init"], "inpaint_mask": files["mask"], "strength": 0.9},
        "fill": {"init_image": files["init"], "inpaint_mask": files["mask"]},
        "kontext": {"init_image": files["init"]},
        "controlnet": {"control_image": files["control"], "controlnet_scale": 0.7},
        "control": {"control_image": files["control"]},
    }[mode]


def _generate(runner: Any, mode: str, files: dict[str, str], people: list[torch.Tensor], count: int, region: bool,
              **extra: Any) -> Any:
    who: dict[str, Any] = {"people": people[:count]} if count > 1 else {"id_embeds": people[0]}
    if region:
        who["regions"] = ["0,0,0.5,1", "0.5,0,1,1"][:count] if count > 1 else ["0.25,0,1,1"]
    args = dict(prompt="two friends", height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=5, preset="paper",
                output_type="np", **_inputs(mode, files), **who)
    args.update(extra)
    with torch.no_grad():
        return runner(**args)


@pytest.mark.parametrize("region", [False, True], ids=["no-region", "region"])
@pytest.mark.parametrize("count", [1, 2], ids=["1-person", "2-people"])
@pytest.mark.parametrize("mode", MODES)
def test_eager_record_and_replay(runners, files, people, tmp_path, mode, count, region):
    runner = runners[mode]
    path = tmp_path / "masks.safetensors"
    first = _generate(runner, mode, files, people, count, region, save_masks=path, return_masks=True)
    plain = _generate(runner, mode, files, people, count, region, id_weight=0.0)
    assert np.isfinite(first.images).all()
    assert np.abs(first.images - plain.images).max() > 1e-4, "the identity changed nothing"
    assert first.masks and path.is_file()
    # replaying the recorded masks is the same computation: the same image, bit for bit
    again = _generate(runner, mode, files, people, count, region, masks_from=path)
    assert np.array_equal(again.images, first.images)
    per_person = torch.stack([m.people if m.people is not None else m.masks.unsqueeze(1) for m in first.masks])
    assert per_person.shape[2] == count
    if mode in ("inpaint", "fill"):  # identity only inside the inpainting mask (its left half)
        assert float(per_person[..., SIZE // 32 :].abs().max()) == 0.0
    if region:
        bound = torch.zeros(count, SIZE // 16, SIZE // 16)
        boxes = [(0, 2), (2, 4)] if count > 1 else [(1, 4)]
        for k, (lo, hi) in enumerate(boxes):
            bound[k, :, lo:hi] = 1
        outside = per_person.float() * (1 - bound[None, None, :, None])
        assert float(outside.abs().max()) == 0.0, "a person's mask leaked outside their region"
    assert first.settings.get("pipeline", "text2image") == mode
    assert (first.settings.get("people") is not None) == (count > 1)


@pytest.fixture()
def compiled(runners):
    """The shared tiny transformers compiled with fullgraph=True (eager backend: dynamo's tracing
    without a C++ build), then back to eager."""
    import torch._dynamo

    from spatialid.app.loading import compile_transformer

    torch._dynamo.reset()
    transformers = {id(r.transformer): r.transformer for r in runners.values()}
    for transformer in transformers.values():
        compile_transformer(transformer, fullgraph=True, backend="eager")
    yield
    for transformer in transformers.values():
        transformer._compiled_call_impl = None
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", MODES)
def test_compiled_fullgraph_two_people_region_recorded(runners, files, people, tmp_path, mode, compiled):
    from torch._dynamo.utils import counters

    runner = runners[mode]
    fallback = runner.transformer._compiled_call_impl
    counters.clear()
    # two steps: the first call (no scheduler step yet) and one more give every graph this needs
    got = _generate(runner, mode, files, people, 2, True, save_masks=tmp_path / "m.safetensors", return_masks=True,
                    num_inference_steps=2)
    assert fallback.failed is None, fallback.failed  # fullgraph=True: any graph break is an error
    assert sum(counters["graph_break"].values()) == 0
    runner.transformer._compiled_call_impl = None
    want = _generate(runner, mode, files, people, 2, True, return_masks=True, num_inference_steps=2)
    runner.transformer._compiled_call_impl = fallback
    np.testing.assert_allclose(got.images, want.images, rtol=0, atol=1e-5)
    assert len(got.masks) == len(want.masks) == 2
    for a, b in zip(got.masks, want.masks):
        # traced constants (priors) are built in float32 on the device: ~1e-4 apart, a wrong mask is >1e-2
        torch.testing.assert_close(a.people, b.people, rtol=0, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_first_block_cache_two_people(runners, files, people, mode):
    from spatialid.injection.step_cache import enable_step_cache

    runner = runners[mode]
    base = runner if mode == "text2image" else runner.base
    plain = _generate(runner, mode, files, people, 2, False, id_weight=0.0).images
    reference = _generate(runner, mode, files, people, 2, False).images
    cache = enable_step_cache(runner.transformer, base.injector, "fbc:0.5", current_timestep=lambda: 0)
    try:
        cached = _generate(runner, mode, files, people, 2, False).images
    finally:
        cache.disable()
    assert cache.cached > 0, "no step was cached"
    effect, cached_effect = reference - plain, cached - plain
    cosine = float(np.dot(effect.ravel(), cached_effect.ravel()) / (np.linalg.norm(effect) * np.linalg.norm(cached_effect)))
    assert cosine > 0.9, "a cached step lost (or doubled) the identity"
