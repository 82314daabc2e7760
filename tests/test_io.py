"""One atomic-write mechanism for every file spatialid writes, with normal file modes."""

from __future__ import annotations

import os
import stat

import pytest

from spatialid.utils.io import atomic_path, atomic_write_bytes, atomic_write_json


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_the_mode_open_would_give(tmp_path, umask_022):
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    with atomic_path(tmp_path / "c.safetensors") as tmp:
        tmp.write_bytes(b"y")
    assert [_mode(tmp_path / n) for n in ("a.bin", "b.json", "c.safetensors")] == [0o644] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json", "c.safetensors"]  # no leftovers


def test_replacing_keeps_the_existing_mode(tmp_path, umask_022):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o600


def test_failed_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_identity_file_and_checkpoint_are_world_readable(tmp_path, umask_022):
    """``spatialid encode`` files used to be 0600 (mkstemp); now 0644 like the PNGs."""
    import torch

    from spatialid.encoder.embedding import IdentityEmbedding
    from spatialid.models import TINY_PULID, build_pulid_modules, save_pulid_checkpoint

    emb = IdentityEmbedding(tokens=torch.zeros(1, 4, 32), uncond_tokens=torch.zeros(1, 4, 32))
    emb.save(tmp_path / "me.safetensors")
    idformer, cas = build_pulid_modules(TINY_PULID)
    save_pulid_checkpoint(idformer, cas, tmp_path / "pulid.safetensors")
    assert _mode(tmp_path / "me.safetensors") == 0o644
    assert _mode(tmp_path / "pulid.safetensors") == 0o644
