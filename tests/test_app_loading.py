"""The application layer loads each weight file once per process, whatever the front-end does."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def saved(tiny_model_dir):
    """The tiny model as a diffusers folder (flux/) + a PuLID file in the official single-file layout
    (pulid.safetensors); shared with the session (conftest), read-only."""
    return tiny_model_dir


class _ReadCounter:
    """Counts, per file, how many times its tensors were read (one count per open that reads data)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import safetensors

        self.reads: collections.Counter[str] = collections.Counter()
        original = safetensors.safe_open
        counter = self

        class Counting:
            def __init__(self, filename, *args, **kwargs):
                self._name = str(Path(filename).resolve())
                self._inner = original(filename, *args, **kwargs)
                self._counted = False

            def __enter__(self):
                self._inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self._inner.__exit__(*exc)

            def get_tensor(self, key):
                if not self._counted:
                    counter.reads[self._name] += 1
                    self._counted = True
                return self._inner.get_tensor(key)

            def __getattr__(self, name):
                return getattr(self._inner, name)

        monkeypatch.setattr(safetensors, "safe_open", Counting)

    def of(self, path: Path) -> int:
        return self.reads[str(Path(path).resolve())]


def _spy(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_pulid_file_read_once_for_encoder_and_pipeline(saved, monkeypatch):
    """``Models``: the encoder's IDFormer and the pipeline's CA modules come from one read of the file."""
    from spatialid.app.loading import Models, ModelSpec
    from spatialid.encoder.identity_encoder import IdentityEncoder

    reads = _ReadCounter(monkeypatch)
    flux_loads = _spy(monkeypatch, diffusers.FluxPipeline, "from_pretrained")

    def fake_real_encoder(idformer, **kwargs):  # the real one needs insightface; same contract
        return IdentityEncoder.tiny(idformer=idformer() if callable(idformer) else idformer, device=kwargs["device"])

    monkeypatch.setattr(IdentityEncoder, "from_pretrained", staticmethod(fake_real_encoder))
    models = Models(ModelSpec(model=str(saved / "flux"), pulid=str(saved / "pulid.safetensors"), device="cpu"))
    encoder = models.encoder()
    pipe = models.pipeline()
    assert pipe.idformer is encoder.idformer
    assert pipe.identity_encoder is encoder  # the pipeline encodes with the same encoder
    assert models.pipeline() is pipe and models.encoder() is encoder
    assert reads.of(saved / "pulid.safetensors") == 1
    assert len(flux_loads) == 1


def test_generate_reads_each_file_once(saved, tmp_path, monkeypatch, capsys):
    """``spatialid generate`` with a photo and a real-model folder: PuLID once, FLUX once."""
    from skimage import data
    from PIL import Image

    from spatialid.cli.main import main
    from spatialid.encoder.identity_encoder import IdentityEncoder

    Image.fromarray(data.astronaut()).save(tmp_path / "me.png")
    reads = _ReadCounter(monkeypatch)
    flux_loads = _spy(monkeypatch, diffusers.FluxPipeline, "from_pretrained")
    built = []

    def fake_real_encoder(idformer, **kwargs):
        built.append(kwargs)
        return IdentityEncoder.tiny(idformer=idformer() if callable(idformer) else idformer, device=kwargs["device"])

    monkeypatch.setattr(IdentityEncoder, "from_pretrained", staticmethod(fake_real_encoder))
    argv = [
        "-q", "generate", "--model", str(saved / "flux"), "--pulid", str(saved / "pulid.safetensors"),
        "--id", str(tmp_path / "me.png"), "--prompt", "a portrait", "--steps", "1", "--size", "64x64",
        "--seed", "1", "--max-sequence-length", "32", "--out", str(tmp_path / "out.png"), "--device", "cpu",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "out.png").is_file()
    assert reads.of(saved / "pulid.safetensors") == 1
    assert len(flux_loads) == 1 and len(built) == 1


def test_offline_rule_is_the_same_everywhere(monkeypatch):
    """``--offline`` and each of the three variables mean "local files only" for every loader."""
    from spatialid.encoder.model_files import offline_mode
    from spatialid.pipeline.loading import resolve_local_files_only
    from spatialid.utils.offline import OFFLINE_ENV_VARS, is_offline

    rules = (is_offline, offline_mode, resolve_local_files_only)
    for name in OFFLINE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert [rule(None) for rule in rules] == [False] * 3
    assert [rule(True) for rule in rules] == [True] * 3
    for name in OFFLINE_ENV_VARS:
        monkeypatch.setenv(name, "1")
        assert [rule(None) for rule in rules] == [True] * 3, name
        assert [rule(False) for rule in rules] == [False] * 3, name  # an explicit flag wins
        monkeypatch.delenv(name)


def test_model_spec_checks_before_loading():
    from spatialid.app.loading import ModelSpec
    from spatialid.errors import SpatialIDError

    with pytest.raises(SpatialIDError, match="--quantize applies to real FLUX weights"):
        ModelSpec(model="tiny", quantize="nf4").check()
    with pytest.raises(SpatialIDError, match="unknown quantization"):
        ModelSpec(quantize="int3").check()
    with pytest.raises(SpatialIDError, match="needs --device cuda"):
        ModelSpec(model="tiny", offload="model", device="cpu").check()
    assert ModelSpec(model="tiny", device="cpu").check().is_tiny


def test_models_tiny_pipeline_equals_tiny_constructor():
    """The app layer's tiny pipeline is SpatialIDPipeline.tiny (same weights, same images)."""
    import numpy as np

    from spatialid.app.loading import Models, ModelSpec
    from spatialid.pipeline import SpatialIDPipeline

    a = Models(ModelSpec(model="tiny", device="cpu")).pipeline()
    b = SpatialIDPipeline.tiny(seed=0)
    for p in (a, b):
        p.set_progress_bar_config(disable=True)
    tok = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(height=64, width=64, num_inference_steps=2, seed=3, output_type="np", max_sequence_length=32, id_embeds=tok)
    # Same seed -> same random weights built by the same code: the same computation.
    assert np.array_equal(a("a portrait", **kw).images, b("a portrait", **kw).images)
