"""PuLID-FLUX checkpoint I/O: official layout, strict loading, and clear errors for wrong files."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import spatialid
from spatialid.errors import CheckpointError, ModelFilesMissingError
from spatialid.models import (
    DEFAULT_FILENAME,
    DEFAULT_REPO_ID,
    PULID_FLUX,
    TINY_PULID,
    build_pulid_modules,
    expected_pulid_layout,
    load_pulid_checkpoint,
    save_pulid_checkpoint,
)
from spatialid.models import checkpoint as ckpt


@pytest.fixture(scope="module")
def tiny_modules():
    torch.manual_seed(0)
    idformer, cas = build_pulid_modules(TINY_PULID)
    # non-trivial LayerNorm parameters so that a swapped norm1/norm2 would show up
    with torch.no_grad():
        for p in list(idformer.parameters()) + list(cas.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    return idformer.eval(), cas.eval()


@pytest.fixture(scope="module")
def tiny_file(tiny_modules, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "pulid_flux_tiny.safetensors"
    save_pulid_checkpoint(*tiny_modules, path)
    return path


def _tiny_state(tiny_modules) -> dict[str, torch.Tensor]:
    idformer, cas = tiny_modules
    sd = {f"pulid_encoder.{k}": v.detach().clone() for k, v in idformer.state_dict().items()}
    for i, ca in enumerate(cas):
        sd.update({f"pulid_ca.{i}.{k}": v.detach().clone() for k, v in ca.state_dict().items()})
    return sd


def _inputs(b=2):
    g = torch.Generator().manual_seed(11)
    cfg = TINY_PULID.idformer
    return (
        torch.randn(b, cfg.id_cond_dim, generator=g),
        [torch.randn(b, 6, cfg.vit_dim, generator=g) for _ in range(5)],
        torch.randn(b, 9, TINY_PULID.ca.dim, generator=g),
    )


# ----------------------------------------------------------------------------- round trip


def test_saved_file_has_official_layout(tiny_file):
    with safe_open(str(tiny_file), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        meta = f.metadata()
    assert shapes == expected_pulid_layout(TINY_PULID)
    # depth 5 instead of 10: 5 fewer layers of 11 tensors than the published 172
    assert sum(k.startswith("pulid_encoder.") for k in shapes) == 172 - 5 * 11
    assert {k.split(".")[1] for k in shapes if k.startswith("pulid_ca.")} == {"0", "1", "2", "3"}
    assert meta["format"] == "pt"


def test_round_trip_is_exact_and_gives_identical_outputs(tiny_modules, tiny_file):
    idformer, cas = tiny_modules
    loaded_idf, loaded_cas = load_pulid_checkpoint(tiny_file, config=TINY_PULID)
    assert isinstance(loaded_idf, spatialid.IDFormer) and isinstance(loaded_cas, torch.nn.ModuleList)
    assert len(loaded_cas) == TINY_PULID.num_ca
    for a, b in zip([idformer, *cas], [loaded_idf, *loaded_cas]):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k  # safetensors round trip: bit copies
    assert not loaded_idf.training and not any(m.training for m in loaded_cas)
    assert not any(p.requires_grad for p in [*loaded_idf.parameters(), *loaded_cas.parameters()])
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded_idf.parameters())

    id_cond, vit, latents = _inputs()
    with torch.no_grad():
        # Same values, but file-backed weights (assign=True) may take other float32 kernel paths.
        tokens = idformer(id_cond, vit)
        torch.testing.assert_close(loaded_idf(id_cond, vit), tokens, rtol=1e-5, atol=1e-5)
        for ca, lca in zip(cas, loaded_cas):
            torch.testing.assert_close(lca(tokens, latents), ca(tokens, latents), rtol=1e-5, atol=1e-5)


def test_file_without_spatialid_metadata_loads(tiny_modules, tmp_path):
    """A file written by other tools in the official key layout (like the published one)."""
    path = tmp_path / "plain.safetensors"
    sd = {k: v.to(torch.bfloat16) for k, v in _tiny_state(tiny_modules).items()}
    save_file(sd, str(path))
    idf, cas = load_pulid_checkpoint(str(path), config=TINY_PULID, dtype=torch.bfloat16)
    assert idf.latents.dtype == torch.bfloat16
    assert torch.equal(cas[3].to_out.weight, sd["pulid_ca.3.to_out.weight"])
    idf32, _ = load_pulid_checkpoint(path, config=TINY_PULID)  # bf16 file, default float32 modules
    assert idf32.proj_out.dtype == torch.float32
    assert torch.equal(idf32.proj_out, sd["pulid_encoder.proj_out"].float())  # bf16 -> float32 is exact


def test_folder_and_filename(tiny_file):
    idf, cas = load_pulid_checkpoint(tiny_file.parent, filename=tiny_file.name, config=TINY_PULID)
    assert len(cas) == 4
    with pytest.raises(CheckpointError, match=DEFAULT_FILENAME.replace(".", r"\.")) as err:
        load_pulid_checkpoint(tiny_file.parent, config=TINY_PULID)
    assert tiny_file.name in str(err.value)  # lists what the folder has


def test_save_casts_and_is_atomic(tiny_modules, tmp_path, monkeypatch):
    path = tmp_path / "sub" / "w.safetensors"
    save_pulid_checkpoint(*tiny_modules, path, dtype=torch.bfloat16)
    with safe_open(str(path), "pt") as f:
        assert f.get_slice("pulid_encoder.latents").get_dtype() == "BF16"
    before = path.read_bytes()
    assert os.listdir(path.parent) == ["w.safetensors"]  # no temporary left

    def boom(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pulid_checkpoint(*tiny_modules, path)
    assert path.read_bytes() == before  # old file intact
    assert os.listdir(path.parent) == ["w.safetensors"]


def test_save_rejects_bad_arguments(tiny_modules, tmp_path):
    idformer, cas = tiny_modules
    with pytest.raises(TypeError):
        save_pulid_checkpoint(cas[0], cas, tmp_path / "x.safetensors")
    with pytest.raises(ValueError):
        save_pulid_checkpoint(idformer, [], tmp_path / "x.safetensors")
    other = spatialid.PerceiverAttentionCA(dim=16, dim_head=4, heads=2, kv_dim=32)
    with pytest.raises(ValueError, match="share one configuration"):
        save_pulid_checkpoint(idformer, [cas[0], other], tmp_path / "x.safetensors")
    meta_idf, meta_cas = build_pulid_modules(TINY_PULID, device="meta")
    with pytest.raises(ValueError, match="meta"):
        save_pulid_checkpoint(meta_idf, meta_cas, tmp_path / "x.safetensors")


def test_published_layout_validates(pulid_layout):
    ckpt.validate_pulid_layout({k: tuple(v) for k, v in pulid_layout.items()}, PULID_FLUX)


# ----------------------------------------------------------------------------- wrong files


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_sdxl_pulid_checkpoint_is_recognised(tmp_path):
    path = _write(
        tmp_path / "pulid_v1.1.safetensors",
        {"id_adapter.body.0.weight": torch.zeros(4, 4), "id_adapter_attn_layers.1.id_to_k.weight": torch.zeros(2)},
    )
    with pytest.raises(CheckpointError, match="SDXL") as err:
        load_pulid_checkpoint(path)
    assert str(path) in str(err.value) and DEFAULT_FILENAME in str(err.value)


@pytest.mark.parametrize("key", ["double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.to_q.weight"])
def test_flux_transformer_checkpoint_is_recognised(tmp_path, key):
    path = _write(tmp_path / "flux1-dev.safetensors", {key: torch.zeros(3, 3), "x_embedder.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="FLUX transformer"):
        load_pulid_checkpoint(path)


def test_unrelated_safetensors_is_recognised(tmp_path):
    path = _write(tmp_path / "other.safetensors", {"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not a PuLID-FLUX checkpoint.*encoder.weight"):
        load_pulid_checkpoint(path)


def test_bare_idformer_state_dict_is_recognised(tiny_modules, tmp_path):
    path = _write(tmp_path / "bare.safetensors", dict(tiny_modules[0].state_dict()))
    with pytest.raises(CheckpointError, match="bare IDFormer"):
        load_pulid_checkpoint(path, config=TINY_PULID)


class _Trap:
    """Unpickling this creates a marker file: proves the loader never unpickles."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle"])
def test_pickles_are_refused_without_unpickling(tmp_path, kind):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"pulid_flux_v0.9.1.{ 'pt' if kind == 'zip' else 'bin'}"
    payload = {"pulid_encoder.latents": torch.zeros(2), "trap": _Trap(str(marker))}
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(CheckpointError, match="pickle") as err:
        load_pulid_checkpoint(path)
    assert "never unpickles" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("low_byte", [0x80, ord("P")])
def test_header_length_resembling_a_magic_byte_is_still_safetensors(tiny_modules, tmp_path, low_byte):
    """A header length whose first byte is 0x80 (pickle) or 'P' (zip) must not be mistaken."""
    sd = _tiny_state(tiny_modules)
    path = tmp_path / "w.safetensors"
    for pad in range(0, 400):
        save_file(sd, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == low_byte:
            break
    else:  # pragma: no cover
        pytest.fail("could not craft the header length")
    idf, cas = load_pulid_checkpoint(path, config=TINY_PULID)
    assert torch.equal(idf.latents, sd["pulid_encoder.latents"])


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty or truncated"),
        (b"\x01\x02", "empty or truncated"),
        (bytes(range(256)) * 4, "not a safetensors file"),
        (b"hello, this is a text file and certainly not weights\n", "not a safetensors file"),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "GGUF"),
    ],
)
def test_non_safetensors_bytes(tmp_path, content, match):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_pulid_checkpoint(path)


@pytest.mark.parametrize("cut", [100, 1000])
def test_truncated_safetensors(tiny_file, tmp_path, cut):
    data = tiny_file.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[:-cut])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pulid_checkpoint(path, config=TINY_PULID)


def test_truncated_inside_header(tiny_file, tmp_path):
    path = tmp_path / "head.safetensors"
    path.write_bytes(tiny_file.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pulid_checkpoint(path, config=TINY_PULID)


def test_missing_paths(tmp_path):
    for p in [tmp_path / "nope.safetensors", str(tmp_path / "nope.safetensors"), "nope/pulid.safetensors"]:
        with pytest.raises(CheckpointError, match="not found") as err:
            load_pulid_checkpoint(p)
        assert "nope" in str(err.value)


def test_missing_extra_and_misshaped_tensors_are_named(tiny_modules, tmp_path):
    sd = _tiny_state(tiny_modules)
    del sd["pulid_encoder.layers.3.1.1.weight"]
    del sd["pulid_ca.2.norm1.bias"]
    sd["pulid_ca.1.extra_scale"] = torch.ones(1)
    sd["pulid_encoder.proj_out"] = torch.zeros(32, 31)
    path = _write(tmp_path / "bad.safetensors", sd)
    with pytest.raises(CheckpointError) as err:
        load_pulid_checkpoint(path, config=TINY_PULID)
    msg = str(err.value)
    assert "2 missing: pulid_encoder.layers.3.1.1.weight, pulid_ca.2.norm1.bias" in msg
    assert "1 unexpected: pulid_ca.1.extra_scale" in msg
    assert "1 mis-shaped: pulid_encoder.proj_out [32, 31] (expected [32, 32])" in msg
    assert "\n" not in msg


def test_many_problems_are_counted_not_all_listed(tiny_modules, tmp_path):
    sd = {k: v for k, v in _tiny_state(tiny_modules).items() if not k.startswith("pulid_encoder.layers.")}
    path = _write(tmp_path / "bad.safetensors", sd)
    with pytest.raises(CheckpointError, match=r"55 missing: .*\(\+50 more\)"):
        load_pulid_checkpoint(path, config=TINY_PULID)


def test_wrong_number_of_ca_modules(tiny_modules, tmp_path):
    sd = {k: v for k, v in _tiny_state(tiny_modules).items() if not k.startswith("pulid_ca.3.")}
    path = _write(tmp_path / "three.safetensors", sd)
    with pytest.raises(CheckpointError, match="3 CA modules, the configuration expects 4"):
        load_pulid_checkpoint(path, config=TINY_PULID)
    idf, cas = load_pulid_checkpoint(path, config=replace(TINY_PULID, num_ca=3))
    assert len(cas) == 3


def test_non_float_tensor_is_refused(tiny_modules, tmp_path):
    sd = _tiny_state(tiny_modules)
    sd["pulid_ca.0.norm2.weight"] = sd["pulid_ca.0.norm2.weight"].long()
    path = _write(tmp_path / "int.safetensors", sd)
    with pytest.raises(CheckpointError, match="not floating point: pulid_ca.0.norm2.weight I64"):
        load_pulid_checkpoint(path, config=TINY_PULID)


def test_tiny_file_with_full_config_fails_fast_with_hint(tiny_file, monkeypatch):
    """Validation reads the header only: no full-size module is ever allocated."""
    built = []
    real = ckpt.build_pulid_model

    def spy(config=PULID_FLUX, device=None, dtype=None):
        built.append(str(device))
        return real(config, device=device, dtype=dtype)

    from spatialid.models import pulid_flux  # where the layout is computed (ckpt re-exports it)

    monkeypatch.setattr(pulid_flux, "build_pulid_model", spy)
    pulid_flux._expected_layout_cached.cache_clear()
    with pytest.raises(CheckpointError, match="mis-shaped.*pass config=spatialid.models.TINY_PULID"):
        load_pulid_checkpoint(tiny_file)
    assert built and set(built) <= {"meta"}  # only the layout is computed, on the meta device


def test_load_to_meta_free_assignment_keeps_no_meta_tensors(tiny_file):
    idf, cas = load_pulid_checkpoint(tiny_file, config=TINY_PULID, device="cpu", dtype=torch.float64)
    tensors = [*idf.state_dict().values(), *cas.state_dict().values()]
    assert all(not t.is_meta and t.dtype == torch.float64 for t in tensors)
    assert all(isinstance(p, torch.nn.Parameter) for p in idf.parameters())


# ----------------------------------------------------------------------------- hub


def test_hub_offline_with_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesMissingError) as err:
        load_pulid_checkpoint(cache_dir=tmp_path / "hf")
    msg = str(err.value)
    assert DEFAULT_REPO_ID in msg and DEFAULT_FILENAME in msg
    assert f"`hf download {DEFAULT_REPO_ID} {DEFAULT_FILENAME} --cache-dir {tmp_path / 'hf'}`" in msg
    assert f"huggingface-cli download {DEFAULT_REPO_ID} {DEFAULT_FILENAME}" in msg
    assert "local path" in msg and "\n" not in msg
    assert isinstance(err.value, spatialid.SpatialIDError)


def test_hub_local_files_only_explicit(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ModelFilesMissingError, match="someone/pulid-copy"):
        load_pulid_checkpoint("someone/pulid-copy", "w.safetensors", cache_dir=tmp_path, local_files_only=True)


def test_hub_cached_file_loads_offline(tiny_file, tmp_path, monkeypatch):
    """A file already in the hub cache is found through the repo id without network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "models--guozinan--PuLID"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    (snap / DEFAULT_FILENAME).write_bytes(tiny_file.read_bytes())
    idf, cas = load_pulid_checkpoint(config=TINY_PULID, cache_dir=tmp_path)
    assert len(cas) == 4
    assert ckpt.resolve_pulid_checkpoint(DEFAULT_REPO_ID, cache_dir=tmp_path) == snap / DEFAULT_FILENAME


def test_public_exports():
    for name in ("IDFormer", "PerceiverAttentionCA", "load_pulid_checkpoint", "CheckpointError"):
        assert getattr(spatialid, name) is not None
    import spatialid.models as models

    for name in ("IDFormer", "PerceiverAttentionCA", "load_pulid_checkpoint", "save_pulid_checkpoint",
                 "IDFormerConfig", "PerceiverCAConfig", "PuLIDFluxConfig", "PULID_FLUX", "TINY_PULID"):
        assert name in models.__all__ and getattr(models, name) is not None
