"""PuLIDFluxModel: diffusers save/load (safetensors only), dtype casts, the official single-file layout."""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import spatialid.models as models
from spatialid.errors import CheckpointError
from spatialid.models import (
    PULID_FLUX,
    TINY_PULID,
    IDFormer,
    PerceiverAttentionCA,
    PuLIDFluxModel,
    build_pulid_model,
    expected_pulid_layout,
    load_pulid_checkpoint,
    load_pulid_model,
    save_pulid_checkpoint,
)


@pytest.fixture(scope="module")
def tiny_model() -> PuLIDFluxModel:
    torch.manual_seed(0)
    model = build_pulid_model(TINY_PULID)
    with torch.no_grad():  # non-trivial LayerNorm parameters, so swapped tensors would show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(3)
    cfg = TINY_PULID.idformer
    return (
        torch.randn(b, cfg.id_cond_dim, generator=g),
        [torch.randn(b, 6, cfg.vit_dim, generator=g) for _ in range(5)],
        torch.randn(b, 9, TINY_PULID.ca.dim, generator=g),
    )


def _outputs(model: PuLIDFluxModel, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    id_cond, vit, latents = _inputs()
    with torch.no_grad():
        tokens = model.pulid_encoder(id_cond.to(dtype), [h.to(dtype) for h in vit])
        return [tokens] + [ca(tokens, latents.to(dtype)) for ca in model.pulid_ca]


def _assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


class _NoPickle:
    """Fails the test if anything pickles or unpickles while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def refuse(*args, **kwargs):
            raise AssertionError("pickle used")

        for owner, name in ((torch, "load"), (torch, "save"), (pickle, "load"), (pickle, "loads"),
                            (pickle, "dump"), (pickle, "dumps")):
            monkeypatch.setattr(owner, name, refuse)


# ----------------------------------------------------------------------------- layout and config


def test_meta_container_state_dict_is_the_published_layout(pulid_layout):
    with torch.device("meta"):
        model = PuLIDFluxModel.from_pulid_config(PULID_FLUX)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == pulid_layout
    assert list(got) == list(expected_pulid_layout(PULID_FLUX))
    assert all(t.is_meta for t in model.state_dict().values())
    assert isinstance(model.pulid_encoder, IDFormer) and isinstance(model.pulid_ca, torch.nn.ModuleList)
    assert len(model.pulid_ca) == 20 and all(isinstance(m, PerceiverAttentionCA) for m in model.pulid_ca)


@pytest.mark.parametrize(
    "cfg",
    [PULID_FLUX, TINY_PULID, replace(TINY_PULID, num_ca=3, double_interval=1, single_interval=2)],
    ids=["full", "tiny", "tiny-3ca"],
)
def test_pulid_config_round_trips_through_json_config(cfg):
    with torch.device("meta"):
        model = PuLIDFluxModel.from_pulid_config(cfg)
    assert model.pulid_config == cfg
    assert model.pulid_encoder.pulid_config == cfg.idformer and model.pulid_ca[0].pulid_config == cfg.ca
    saved = json.loads(model.to_json_string())
    assert saved["_class_name"] == "PuLIDFluxModel"
    assert {k: saved[k] for k in ("idformer", "ca", "num_ca", "double_interval", "single_interval")} == cfg.to_dict()
    with torch.device("meta"):
        assert PuLIDFluxModel.from_config(model.config).pulid_config == cfg


def test_defaults_are_the_published_model_and_dataclasses_are_normalised():
    with torch.device("meta"):
        assert PuLIDFluxModel().pulid_config == PULID_FLUX
        model = PuLIDFluxModel(idformer=TINY_PULID.idformer, ca=TINY_PULID.ca, num_ca=4)
    assert model.config["idformer"] == TINY_PULID.idformer.to_dict()  # plain JSON, not the dataclass
    assert isinstance(model.config["ca"], dict) and model.pulid_config == TINY_PULID
    partial = {k: v for k, v in TINY_PULID.idformer.to_dict().items() if k != "ff_mult"}
    with torch.device("meta"):
        filled = PuLIDFluxModel(idformer=partial, ca=TINY_PULID.ca.to_dict(), num_ca=1)
    assert filled.config["idformer"]["ff_mult"] == 4  # missing keys take the dataclass defaults


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"idformer": {"dim": 8, "width": 3}}, TypeError, "unknown keys"),
        ({"ca": [1, 2]}, TypeError, "PerceiverCAConfig or a dict"),
        ({"num_ca": 0}, ValueError, "num_ca"),
        ({"double_interval": 0}, ValueError, "double_interval"),
        ({"single_interval": 1.5}, ValueError, "single_interval"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with torch.device("meta"), pytest.raises(error, match=match):
        PuLIDFluxModel(**{"idformer": TINY_PULID.idformer, "ca": TINY_PULID.ca, **kwargs})
    with pytest.raises(TypeError, match="PuLIDFluxConfig"):
        PuLIDFluxModel.from_pulid_config(TINY_PULID.to_dict())


# ----------------------------------------------------------------------------- diffusers save / load


def test_save_pretrained_from_pretrained_round_trip(tiny_model, tmp_path, monkeypatch):
    expected = _outputs(tiny_model)
    _NoPickle(monkeypatch)
    tiny_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "PuLIDFluxModel" and config["idformer"]["mapping_dim"] == 32

    loaded = PuLIDFluxModel.from_pretrained(tmp_path)
    assert type(loaded) is PuLIDFluxModel and loaded.pulid_config == TINY_PULID
    _assert_same_tensors(tiny_model, loaded)
    for a, b in zip(expected, _outputs(loaded.eval())):
        # same values, but weights loaded from a file may take other float32 kernel paths
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_diffusers_weights_file_is_in_the_official_layout(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == expected_pulid_layout(TINY_PULID)
    _assert_same_tensors(tiny_model, load_pulid_model(weights, config=TINY_PULID))


def test_from_pretrained_dtype(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = PuLIDFluxModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.bfloat16}


@pytest.mark.parametrize("cls, part", [(IDFormer, "pulid_encoder"), (PerceiverAttentionCA, "pulid_ca.2")])
def test_single_modules_save_and_load_with_diffusers(tiny_model, tmp_path, monkeypatch, cls, part):
    module = tiny_model.get_submodule(part)
    _NoPickle(monkeypatch)
    module.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls and loaded.pulid_config == module.pulid_config
    _assert_same_tensors(module, loaded)


def test_pickle_options_are_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        tiny_model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="save_function"):
        tiny_model.save_pretrained(tmp_path, save_function=torch.save)
    assert not any(tmp_path.iterdir())
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        PuLIDFluxModel.from_pretrained(tmp_path, use_safetensors=False)


def test_folder_with_only_pickled_weights_is_not_unpickled(tiny_model, tmp_path, monkeypatch):
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    _NoPickle(monkeypatch)
    with pytest.raises(OSError):  # diffusers' "no file named diffusion_pytorch_model.safetensors"
        PuLIDFluxModel.from_pretrained(tmp_path)


def test_shard_index_naming_pickles_is_refused(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    index = {"metadata": {}, "weight_map": {"pulid_encoder.latents": "diffusion_pytorch_model-00001.bin"}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="non-safetensors shards"):
        PuLIDFluxModel.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_to_dtype_reaches_every_submodule(tiny_model, dtype, caplog):
    model = PuLIDFluxModel.from_config(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    with caplog.at_level(logging.WARNING):
        assert model.to(dtype=dtype) is model
    assert not any("float32" in r.getMessage() for r in caplog.records)  # diffusers' empty-list warning
    for name, module in model.named_modules():
        for pname, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            assert t.dtype == dtype, f"{name}.{pname}"
    assert model.dtype == model.pulid_encoder.dtype == model.pulid_ca[3].dtype == dtype
    out = _outputs(model.eval(), dtype)
    assert all(o.dtype == dtype and torch.isfinite(o).all() for o in out)


# ----------------------------------------------------------------------------- official single file


def test_official_file_loads_strictly_into_the_container(tiny_model, tmp_path, monkeypatch):
    path = save_pulid_checkpoint(tiny_model.pulid_encoder, tiny_model.pulid_ca, tmp_path / "pulid.safetensors")
    calls = []
    real = PuLIDFluxModel.load_state_dict

    def spy(self, state_dict, strict=True, assign=False):
        calls.append((strict, assign, any(t.is_meta for t in self.state_dict().values())))
        return real(self, state_dict, strict=strict, assign=assign)

    monkeypatch.setattr(PuLIDFluxModel, "load_state_dict", spy)
    _NoPickle(monkeypatch)
    model = PuLIDFluxModel.from_pulid_checkpoint(path, config=TINY_PULID)
    assert calls == [(True, True, True)]  # one strict, assigning load into a meta-built model
    with safe_open(str(path), "pt") as f:
        assert list(model.state_dict()) == list(expected_pulid_layout(TINY_PULID)) and set(f.keys()) == set(
            model.state_dict()
        )
    _assert_same_tensors(tiny_model, model)
    assert model.pulid_config == TINY_PULID and not model.training
    assert not any(p.requires_grad or p.is_meta for p in model.parameters())


def test_plain_state_dict_file_is_the_official_layout(tiny_model, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in tiny_model.state_dict().items()}, str(path))
    model = load_pulid_model(path, config=TINY_PULID, dtype=torch.bfloat16)
    assert model.pulid_encoder.latents.dtype == torch.bfloat16
    assert torch.equal(model.pulid_ca[1].to_q.weight, tiny_model.pulid_ca[1].to_q.weight.to(torch.bfloat16))


def test_load_pulid_checkpoint_returns_the_containers_modules(tiny_model, tmp_path):
    path = save_pulid_checkpoint(tiny_model.pulid_encoder, tiny_model.pulid_ca, tmp_path / "p.safetensors")
    idformer, cas = load_pulid_checkpoint(path, config=TINY_PULID)
    assert type(idformer) is IDFormer and type(cas) is torch.nn.ModuleList and len(cas) == 4
    _assert_same_tensors(tiny_model.pulid_encoder, idformer)
    _assert_same_tensors(tiny_model.pulid_ca, cas)


def test_wrong_file_fails_before_building(tiny_model, tmp_path):
    path = tmp_path / "extra.safetensors"
    sd = dict(tiny_model.state_dict())
    sd["pulid_ca.4.to_q.weight"] = sd["pulid_ca.0.to_q.weight"]
    save_file({k: v.clone() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match="1 unexpected: pulid_ca.4.to_q.weight"):
        PuLIDFluxModel.from_pulid_checkpoint(path, config=TINY_PULID)


def test_hint_for_files_written_before_mapping_dim(tiny_model, tmp_path):
    """Old files recorded no mapping_dim (their MLP width was dim): still recognised as tiny."""
    old = TINY_PULID.idformer.to_dict()
    del old["mapping_dim"]
    meta = {"format": "pt", "spatialid.config": json.dumps(
        {"idformer": old, "ca": TINY_PULID.ca.to_dict(), "num_ca": 4}, sort_keys=True)}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="pass config=spatialid.models.TINY_PULID"):
        load_pulid_model(path)
    from spatialid.models.checkpoint_format import _config_hint

    assert _config_hint(meta, PULID_FLUX).endswith("config=spatialid.models.TINY_PULID")


def test_new_names_are_exported_lazily():
    for name in ("PuLIDFluxModel", "load_pulid_model", "build_pulid_model"):
        assert name in models.__all__ and getattr(models, name) is not None
    assert Path(models.__file__).parent.joinpath("pulid_flux.py").is_file()


# ----------------------------------------------------------------------------- users of pulid_config


def test_encoder_records_the_idformer_config_json():
    """The embedding's ``idformer_config`` is the same JSON as before ModelMixin (plus mapping_dim)."""
    from skimage import data

    from spatialid.encoder.identity_encoder import IdentityEncoder

    emb = IdentityEncoder.tiny(seed=0).encode(data.astronaut())
    assert emb.metadata["idformer_config"] == (
        '{"dim": 32, "depth": 5, "dim_head": 8, "heads": 2, "num_id_token": 2, "num_queries": 4, '
        '"output_dim": 32, "ff_mult": 2, "id_cond_dim": 160, "vit_dim": 32, "mapping_dim": 32}'
    )


def test_save_checks_ca_sizes_with_the_typed_config(tiny_model, tmp_path):
    with torch.device("meta"):
        other = PerceiverAttentionCA.from_config(replace(TINY_PULID.ca, heads=4, dim_head=4))
    with pytest.raises(ValueError, match="share one configuration"):
        save_pulid_checkpoint(tiny_model.pulid_encoder, [*tiny_model.pulid_ca, other], tmp_path / "x.safetensors")
    # Same sizes built with defaults vs explicit values: diffusers' FrozenDicts differ, the sizes do not.
    with torch.device("meta"):
        explicit = PerceiverAttentionCA(dim=3072, dim_head=128, heads=16, kv_dim=2048)
        default = PerceiverAttentionCA()
    assert dict(default.config) != dict(explicit.config)  # "_use_default_values" differs
    assert default.pulid_config == explicit.pulid_config


def test_from_pretrained_accepts_the_default_use_safetensors(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    for value in (None, True):
        assert PuLIDFluxModel.from_pretrained(tmp_path, use_safetensors=value).pulid_config == TINY_PULID
