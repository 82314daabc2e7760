"""The PuLID weights as SpatialIDPipeline's optional diffusers component ``pulid``.

Registration is what lets diffusers' ``to()``, dtype changes, offloading, ``components`` and
``save_pretrained`` reach the CA modules and the IDFormer without special cases (tiny model, CPU).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

KW = {"height": 64, "width": 64, "num_inference_steps": 2, "seed": 4, "output_type": "np", "max_sequence_length": 32}


def _tiny():
    from spatialid.pipeline import SpatialIDPipeline

    p = SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False)
    p.set_progress_bar_config(disable=True)
    return p


def _tokens(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.fixture(scope="module")
def pipe():
    return _tiny()


def test_pulid_is_a_registered_optional_component(pipe):
    from spatialid.models import TINY_PULID, expected_pulid_layout
    from spatialid.models.pulid_flux import PuLIDFluxModel

    assert "pulid" in pipe._optional_components and "pulid" in pipe._exclude_from_cpu_offload
    assert isinstance(pipe.components["pulid"], PuLIDFluxModel)
    assert list(pipe.config["pulid"]) == ["spatialid.models.pulid_flux", "PuLIDFluxModel"]
    # the old attributes are views of the component
    assert pipe.ca_modules is pipe.pulid.pulid_ca and pipe.idformer is pipe.pulid.pulid_encoder
    assert pipe.injector.ca_modules is pipe.ca_modules
    assert pipe.pulid.pulid_config == TINY_PULID
    layout = {k: tuple(v.shape) for k, v in pipe.pulid.state_dict().items()}
    assert layout == expected_pulid_layout(TINY_PULID)  # the published checkpoint's names
    assert "pulid" not in pipe.flux_components and set(pipe.flux_components) == set(pipe.components) - {"pulid"}


def test_attach_pulid_wraps_the_given_modules_without_copying():
    from spatialid.encoder.identity_encoder import tiny_pulid_modules

    p = _tiny()
    idformer, cas = tiny_pulid_modules(3)
    ptrs = [t.data_ptr() for t in [*idformer.parameters(), *cas.parameters()]]
    p.attach_pulid(list(cas), idformer=idformer, double_interval=2, single_interval=4)
    assert p.idformer is idformer and all(a is b for a, b in zip(p.ca_modules, cas))
    assert [t.data_ptr() for t in p.pulid.parameters()] == ptrs
    assert p.pulid.training is False and not any(t.requires_grad for t in p.pulid.parameters())
    p.detach_pulid()
    assert p.pulid is None and p.ca_modules is None and p.components["pulid"] is None


def test_attach_pulid_refuses_modules_it_cannot_describe():
    from spatialid.pipeline.loading import wrap_pulid_modules

    with pytest.raises(TypeError, match="PerceiverAttentionCA"):
        wrap_pulid_modules(None, [torch.nn.Linear(2, 2)], 2, 4)


@pytest.mark.parametrize(
    "args, kwargs, dtype",
    [((torch.float64,), {}, torch.float64), (("cpu", torch.float64), {}, torch.float64), ((), {"dtype": torch.bfloat16}, torch.bfloat16)],
)
def test_to_dtype_reaches_ca_modules_and_idformer(args, kwargs, dtype):
    p = _tiny()
    p.to(*args, **kwargs)
    assert {t.dtype for t in p.ca_modules.parameters()} == {dtype}
    assert {t.dtype for t in p.idformer.parameters()} == {dtype}
    assert p.transformer.dtype == dtype
    if dtype == torch.float64:  # the injected path runs in the new dtype (bfloat16 is slow on CPUs)
        out = p("a portrait", id_embeds=_tokens(dtype), preset="paper", **{**KW, "num_inference_steps": 1})
        assert np.isfinite(out.images).all()


def test_to_dtype_reaches_the_idformer_shared_with_the_identity_encoder():
    """The encoder's own ``to()`` casts the shared IDFormer to the encoder's dtype: ``pipe.to``
    gives the encoder the dtype too, so the cast reaches the IDFormer and stays."""
    from spatialid.pipeline import SpatialIDPipeline

    p = SpatialIDPipeline.tiny(seed=0)
    encoder = p.identity_encoder
    assert encoder.idformer is p.idformer
    p.to("cpu", torch.float64)
    assert encoder.dtype == torch.float64
    assert {t.dtype for t in p.idformer.parameters()} == {torch.float64}
    assert {t.dtype for t in p.ca_modules.parameters()} == {torch.float64}


def test_components_build_an_injecting_pipeline(pipe):
    """``SpatialIDPipeline(**pipe.components)``: diffusers' weight sharing keeps the identity."""
    from spatialid.pipeline import SpatialIDPipeline

    other = SpatialIDPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    try:
        assert other.pulid is pipe.pulid and other.injector is not None
        want = pipe("a portrait", id_embeds=_tokens(), preset="paper", **KW).images
        got = other("a portrait", id_embeds=_tokens(), preset="paper", **KW).images
        assert np.array_equal(got, want)
    finally:
        other.detach_pulid()  # the transformer is shared with the module's pipe
    with pytest.raises(TypeError, match="pulid"):
        diffusers.FluxPipeline(**pipe.components)  # why flux_components exists


def test_ca_modules_on_another_device_is_a_clear_error():
    """The injector no longer moves the CA modules; a misplaced module names the fix."""
    p = _tiny()
    p.ca_modules.to("meta")
    with pytest.raises(RuntimeError, match=r"CA modules are on meta.*pipe\.to\('cpu'\)"):
        p("a portrait", id_embeds=_tokens(), **KW)


# ----------------------------------------------------------------------------- offloading


def test_model_offload_places_pulid_on_the_execution_device_and_keeps_it_there():
    """Excluded from offload: placed (not hooked), and placed again by maybe_free_model_hooks."""
    p = _tiny()
    p.enable_model_cpu_offload(device="cpu")
    assert not hasattr(p.pulid, "_hf_hook") and not any(hasattr(m, "_hf_hook") for m in p.pulid.modules())
    assert all(hasattr(p, n) and hasattr(getattr(p, n), "_hf_hook") for n in ("transformer", "vae"))
    assert p._execution_device.type == "cpu"
    p("a portrait", id_embeds=_tokens(), **KW)
    assert not hasattr(p.pulid, "_hf_hook") and p._offload_mode == "model"
    assert {t.device.type for t in p.idformer.parameters()} == {"cpu"}


def test_attach_after_offload_uses_the_offload_device():
    from spatialid.encoder.identity_encoder import tiny_pulid_modules

    p = _tiny()
    p.enable_model_cpu_offload(device="cpu")
    idformer, cas = tiny_pulid_modules(0)
    p.attach_pulid(cas, idformer=idformer)
    assert {t.device.type for t in p.ca_modules.parameters()} == {p._offload_device.type}


def test_sequential_offload_leaves_pulid_unhooked_on_the_execution_device():
    """accelerate's sequential hooks park weights on "meta"; ``pulid`` is excluded from them.

    (Running sequential offload needs an accelerator: on the CPU, accelerate hands Embedding
    weights back as plain tensors; see test_pipeline.py.)
    """
    p = _tiny()
    p.enable_sequential_cpu_offload(device="cpu")
    assert {t.device.type for t in p.transformer.parameters()} == {"meta"}  # hooked, offloaded
    assert {t.device.type for t in p.ca_modules.parameters()} == {"cpu"}
    assert {t.device.type for t in p.idformer.parameters()} == {"cpu"}
    assert not any(hasattr(m, "_hf_hook") for m in p.pulid.modules())
    assert p._offload_mode == "sequential"


def test_why_pulid_is_not_sequentially_offloaded():
    """accelerate's per-submodule hooks do fire for a direct CA call (they sit on its Linear and
    LayerNorm leaves), but they leave the parameters on "meta", where the injector takes its device
    and dtype from: hooked CA modules would need a device-following injector again."""
    import copy

    from accelerate import cpu_offload

    from spatialid.encoder.identity_encoder import tiny_pulid_modules

    _, cas = tiny_pulid_modules(0)
    ref = cas[0]
    hooked = copy.deepcopy(ref)
    cpu_offload(hooked, execution_device=torch.device("cpu"), offload_buffers=False)
    e, x = torch.randn(1, 4, 32), torch.randn(1, 16, 32)
    assert torch.equal(hooked(e, x), ref(e, x))
    assert {t.device.type for t in hooked.parameters()} == {"meta"}


# ----------------------------------------------------------------------------- save_pretrained


def test_save_pretrained_writes_safetensors_and_loads_back(pipe, tmp_path):
    from spatialid.pipeline import SpatialIDPipeline

    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert {f.suffix for f in files} <= {".json", ".safetensors"}  # no pickles
    assert (folder / "pulid" / "config.json").is_file()
    assert json.loads((folder / "model_index.json").read_text())["pulid"] == [
        "spatialid.models.pulid_flux", "PuLIDFluxModel"
    ]
    back = SpatialIDPipeline.from_pretrained(folder, torch_dtype=torch.float32, load_identity_encoder=False, local_files_only=True)
    back.set_progress_bar_config(disable=True)
    assert back.model_info["pulid"] == str(folder / "pulid")
    assert back.pulid.pulid_config == pipe.pulid.pulid_config
    for (ka, a), (kb, b) in zip(back.pulid.state_dict().items(), pipe.pulid.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    tok = _tokens()
    np.testing.assert_allclose(
        back("a portrait", id_embeds=tok, **KW).images, pipe("a portrait", id_embeds=tok, **KW).images, rtol=0, atol=1e-5
    )
    plain = diffusers.FluxPipeline.from_pretrained(folder)  # ignores `pulid` (with a warning)
    assert "pulid" not in plain.components


def test_save_pretrained_refuses_pickles_before_writing(pipe, tmp_path):
    folder = tmp_path / "unsafe"
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(folder, safe_serialization=False)
    assert not folder.exists() or not any(folder.rglob("*"))
