"""SpatialIDPipeline.from_pretrained on local files, offline errors, quantization options."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from spatialid.errors import ModelFilesMissingError, SpatialIDError
from spatialid.pipeline import loading
from spatialid.pipeline.loading import (
    MissingDependencyError,
    load_flux_transformer,
    parse_quantization,
    resolve_local_files_only,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipe_plain):
    """SpatialIDPipeline.tiny(seed=0, with_identity_encoder=False), shared with the session (conftest)."""
    return tiny_pipe_plain


@pytest.fixture(scope="module")
def saved(tiny_model_dir):
    """The tiny model written as a diffusers folder (flux/) + a PuLID file in the official layout
    (pulid.safetensors); shared with the session (conftest), read-only."""
    return tiny_model_dir


def _gen(pipe, **kw):
    args = dict(height=64, width=64, num_inference_steps=2, seed=4, output_type="np", max_sequence_length=32)
    args.update(kw)
    return pipe("a portrait", **args).images


def test_from_pretrained_local_folder_matches_tiny(tiny_pipe, saved):
    from spatialid.models import TINY_PULID
    from spatialid.pipeline import SpatialIDPipeline

    pipe = SpatialIDPipeline.from_pretrained(
        saved / "flux",
        saved / "pulid.safetensors",
        pulid_config=TINY_PULID,
        torch_dtype=torch.float32,
        load_identity_encoder=False,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, SpatialIDPipeline) and pipe.injector is not None
    tok = torch.randn(1, 4, TINY_PULID.ca.kv_dim, generator=torch.Generator().manual_seed(0))
    # Loaded-from-disk tensors may take other float32 kernel paths than in-memory ones: tolerance, not bits.
    np.testing.assert_allclose(_gen(pipe, id_embeds=tok), _gen(tiny_pipe, id_embeds=tok), rtol=0, atol=1e-5)
    np.testing.assert_allclose(_gen(pipe), _gen(tiny_pipe), rtol=0, atol=1e-5)
    assert pipe.model_info["model"] == str(saved / "flux")
    assert pipe.model_info["pulid"] == str(saved / "pulid.safetensors")
    assert pipe.identity_encoder is None
    out = pipe("x", height=64, width=64, num_inference_steps=1, seed=0, max_sequence_length=32)
    assert out.settings["model"] == str(saved / "flux") and "note" not in out.settings


def test_from_pretrained_wrong_pulid_size_is_a_checkpoint_error(saved):
    from spatialid.errors import CheckpointError
    from spatialid.pipeline import SpatialIDPipeline

    with pytest.raises(CheckpointError):
        SpatialIDPipeline.from_pretrained(
            saved / "flux", saved / "pulid.safetensors", torch_dtype=torch.float32, load_identity_encoder=False
        )


def test_missing_local_folder(tmp_path):
    from spatialid.pipeline import SpatialIDPipeline

    with pytest.raises(ModelFilesMissingError, match="does not exist"):
        SpatialIDPipeline.from_pretrained(tmp_path / "nope", load_identity_encoder=False)


def test_offline_hub_id_names_model_and_remedy(tmp_path, monkeypatch):
    from spatialid.pipeline import SpatialIDPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesMissingError) as info:
        SpatialIDPipeline.from_pretrained(
            "black-forest-labs/FLUX.1-Krea-dev", cache_dir=tmp_path, load_identity_encoder=False
        )
    msg = str(info.value)
    assert "black-forest-labs/FLUX.1-Krea-dev" in msg and "hf download" in msg and "model_index.json" in msg
    assert "\n" not in msg


def test_offline_missing_pulid_weights(saved, tmp_path, monkeypatch):
    from spatialid.pipeline import SpatialIDPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesMissingError, match="guozinan/PuLID"):
        SpatialIDPipeline.from_pretrained(
            saved / "flux", None, torch_dtype=torch.float32, cache_dir=tmp_path, load_identity_encoder=False
        )


def test_identity_encoder_is_built_lazily(saved):
    from spatialid.models import TINY_PULID
    from spatialid.pipeline import SpatialIDPipeline

    calls = []
    pipe = SpatialIDPipeline.from_pretrained(
        saved / "flux", saved / "pulid.safetensors", pulid_config=TINY_PULID, torch_dtype=torch.float32,
        local_files_only=True,
    )
    pipe._identity_encoder_factory = lambda: calls.append(1) or "encoder"
    assert calls == []
    assert pipe.identity_encoder == "encoder" and pipe.identity_encoder == "encoder"
    assert calls == [1]


# ----------------------------------------------------------------------------- quantization options


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, (None, None)),
        ("none", (None, None)),
        ("NF4", ("nf4", None)),
        ("int8", ("int8", None)),
        ("torchao-int8", ("torchao-int8", None)),
        ("torchao-fp8", ("torchao-fp8", None)),
        ("gguf:/models/flux1-dev-Q8_0.gguf", ("gguf", "/models/flux1-dev-Q8_0.gguf")),
    ],
)
def test_parse_quantization(spec, expected):
    assert parse_quantization(spec) == expected


@pytest.mark.parametrize("spec, match", [("q5", "unknown quantization"), ("gguf", "needs a file"), ("nf4:x", "no argument")])
def test_parse_quantization_errors(spec, match):
    with pytest.raises(SpatialIDError, match=match):
        parse_quantization(spec)


@pytest.mark.parametrize("mode, package", [("nf4", "bitsandbytes"), ("int8", "bitsandbytes"), ("torchao-int8", "torchao"), ("gguf:x.gguf", "gguf")])
def test_missing_quantization_package(mode, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(MissingDependencyError, match=r"spatialid\[quant\]"):
        load_flux_transformer("black-forest-labs/FLUX.1-dev", mode)


def test_gguf_code_path_passes_config_and_compute_dtype(monkeypatch, tmp_path):
    gguf_file = tmp_path / "flux1-dev-Q4_K_S.gguf"
    gguf_file.write_bytes(b"GGUF")
    seen = {}

    def fake_single_file(path, **kwargs):
        seen["path"] = path
        seen.update(kwargs)
        return "transformer"

    monkeypatch.setattr(loading, "_require", lambda package, mode: None)
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_single_file", staticmethod(fake_single_file))
    out = load_flux_transformer("some/flux-derivative", f"gguf:{gguf_file}", torch_dtype=torch.bfloat16, local_files_only=True)
    assert out == "transformer"
    assert seen["path"] == str(gguf_file)
    assert seen["config"] == "some/flux-derivative" and seen["subfolder"] == "transformer"
    assert seen["quantization_config"].compute_dtype == torch.bfloat16
    assert seen["torch_dtype"] == torch.bfloat16 and seen["local_files_only"] is True


def test_gguf_hub_file_offline(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "_require", lambda package, mode: None)
    with pytest.raises(ModelFilesMissingError, match="city96/FLUX.1-dev-gguf"):
        load_flux_transformer(
            "black-forest-labs/FLUX.1-dev", "gguf:city96/FLUX.1-dev-gguf/flux1-dev-Q8_0.gguf",
            cache_dir=tmp_path, local_files_only=True,
        )


def test_bitsandbytes_code_path(monkeypatch):
    seen = {}

    class FakeBnb:
        def __init__(self, **kwargs):
            seen["bnb"] = kwargs

    def fake_from_pretrained(source, **kwargs):
        seen["source"] = source
        seen.update(kwargs)
        return "transformer"

    monkeypatch.setattr(loading, "_require", lambda package, mode: None)
    monkeypatch.setattr(diffusers, "BitsAndBytesConfig", FakeBnb)
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_pretrained", staticmethod(fake_from_pretrained))
    assert load_flux_transformer("local/flux", "nf4", torch_dtype=torch.float16) == "transformer"
    assert seen["bnb"] == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float16}
    assert seen["subfolder"] == "transformer" and isinstance(seen["quantization_config"], FakeBnb)
    load_flux_transformer("local/flux", "int8")
    assert seen["bnb"] == {"load_in_8bit": True}


def test_single_file_flux_uses_base_repo_for_other_components(monkeypatch, tiny_pipe):
    from spatialid.pipeline import SpatialIDPipeline, pipeline_spatialid

    seen = {}

    def fake_loader(source, quantization=None, **kwargs):
        seen.update(source=source, quantization=quantization, **kwargs)
        raise ModelFilesMissingError("stop here")

    monkeypatch.setattr(pipeline_spatialid, "load_flux_transformer", fake_loader)
    with pytest.raises(ModelFilesMissingError, match="stop here"):
        SpatialIDPipeline.from_pretrained("/models/flux1-dev.safetensors", load_identity_encoder=False)
    assert seen["source"] == "black-forest-labs/FLUX.1-dev"
    assert seen["single_file"] == "/models/flux1-dev.safetensors" and seen["quantization"] is None
    with pytest.raises(ModelFilesMissingError):
        SpatialIDPipeline.from_pretrained("/models/flux1-dev-Q8_0.gguf", load_identity_encoder=False)
    assert seen["quantization"] == "gguf:/models/flux1-dev-Q8_0.gguf" and seen["single_file"] is None


def test_resolve_local_files_only(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SPATIALID_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_local_files_only(None) is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_local_files_only(None) is True
    assert resolve_local_files_only(False) is False


def test_hub_errors_passes_other_errors_through():
    with pytest.raises(KeyError):
        with loading.hub_errors("FLUX model", "x/y", "hint"):
            raise KeyError("unrelated")
