"""Nothing lost, nothing exposed: the bench output folder under concurrent runs, damaged files,
changed inputs, leftover temporary files, read-only or full disks and NaN identity tokens.

Model-free (HashGenerator / hash_encoder) except where a test says otherwise, so every test runs in
well under a second; the two-process lock test starts one Python process (a few seconds).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialid.bench.datasets import load_identities, load_prompts
from spatialid.bench.grid import ShardSpec, build_grid, select_items
from spatialid.bench.results import BenchStateError, load_preset_results
from spatialid.bench.runner import (
    BenchSettings,
    EmbeddingCache,
    pending_items,
    run_bench,
)
from spatialid.bench.samples import HashGenerator, hash_encoder
from spatialid.cli import cmd_bench
from spatialid.cli.main import main
from spatialid.pipeline.settings import GenerationSettings
from spatialid.utils.io import OutputPathError

SETTINGS = BenchSettings(model="fake", generation=GenerationSettings(steps=2, width=32, height=32))
PRESETS = ["pulid", "paper"]
ALL = ["none", *PRESETS]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(bench_inputs):
    """The sample bench inputs, shared with the session (conftest): read-only (copy before changing)."""
    root, ids_json, prompts_json = bench_inputs
    return root, ids_json, prompts_json, load_identities(ids_json), load_prompts(prompts_json, limit=2)


def _items(inputs, seeds=(42,), presets=PRESETS):
    _, _, _, identities, prompts = inputs
    return build_grid(identities, prompts, presets, list(seeds))


def _run(out, items, gen=None, encode=hash_encoder, part=None):
    gen = gen or HashGenerator()
    return run_bench(items, out, settings=SETTINGS, generate_fn=gen, encode_fn=encode, progress=False, part=part), gen


def _snapshot(out: Path) -> dict[str, bytes]:
    snap = {}
    for preset in ALL:
        if (out / preset).is_dir():
            entries, _ = load_preset_results(out / preset)
            snap.update({k: (out / preset / e["image"]).read_bytes() for k, e in entries.items()})
    return snap


class FakeGenerator:
    """What cmd_bench._build_generator returns, without a model: IdentityEmbedding-backed hash noise."""

    encoder_name = "fake"

    def __init__(self) -> None:
        self.gen = HashGenerator()

    def encode(self, photo):
        import torch

        from spatialid.encoder.embedding import IdentityEmbedding

        tokens = hash_encoder(photo)
        return IdentityEmbedding(tokens=tokens, uncond_tokens=torch.zeros_like(tokens))

    def __call__(self, item, embedding):
        return self.gen(item, None if embedding is None else embedding.tokens)


def _cli_args(ids, prompts, out, *extra):
    return ["bench", "--ids", str(ids), "--prompts", str(prompts), "--limit-prompts", "2", "--presets", "pulid,paper",
            "--model", "tiny", "--out", str(out), "--no-progress", *extra]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.startswith("spatialid: error:")]


def _no_model(*a, **k):
    raise AssertionError("the model must not load")


# ------------------------------------------------------------------------- 5: one run per folder


_HOLDER = r"""
import sys, time
from pathlib import Path
from spatialid.bench.datasets import load_identities, load_prompts
from spatialid.bench.grid import ShardSpec, build_grid, select_items
from spatialid.bench.runner import BenchSettings, run_bench
from spatialid.bench.samples import HashGenerator, hash_encoder
from spatialid.pipeline.settings import GenerationSettings

ids, prompts, out, go = sys.argv[1:5]
items = build_grid(load_identities(ids), load_prompts(prompts, limit=2), ["pulid", "paper"], [42])
gen = HashGenerator()

def slow(item, emb):
    if not gen.calls:
        print("started", flush=True)
        deadline = time.monotonic() + 60
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return gen(item, emb)

settings = BenchSettings(model="fake", generation=GenerationSettings(steps=2, width=32, height=32))
s = run_bench(items, out, settings=settings, generate_fn=slow, encode_fn=hash_encoder, progress=False)
print("done", s.generated + s.reused, flush=True)
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        proc.kill()
        pytest.fail(f"holder process said nothing in {timeout} s")
    return box[0].strip()


def test_second_run_on_a_folder_in_use_is_refused(inputs, tmp_path, monkeypatch, capsys):
    """Two bench processes on one --out (seeds 42 and 43): the second is refused naming the first's
    PID (exit 2, one line, no model loaded); once the first ends, the second runs; no entry is lost."""
    _, ids, prompts, _, _ = inputs
    out, go = tmp_path / "out", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(ids), str(prompts), str(out), str(go)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert _read_line(proc, 120) == "started"
        with pytest.raises(BenchStateError, match=rf"in use by another spatialid bench \(PID {proc.pid}\b"):
            _run(out, _items(inputs, seeds=(43,)))
        monkeypatch.setattr(cmd_bench, "_build_generator", _no_model)
        assert main(_cli_args(ids, prompts, out, "--seeds", "43")) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and f"PID {proc.pid}" in err[0] and "another --out" in err[0], err
        go.touch()
        assert _read_line(proc, 60) == "done 12"
        assert proc.wait(timeout=30) == 0
    finally:
        go.touch()
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    summary, _ = _run(out, _items(inputs, seeds=(43,)))
    assert summary.generated + summary.reused == 12
    assert len(_snapshot(out)) == 24  # both runs' entries, none vanished


def test_processes_of_one_launch_share_the_folder(inputs, tmp_path):
    """accelerate launch: ranks hold the folder lock shared and their own part lock exclusively, so
    they run side by side; a single-process run or a second launch's same rank is refused."""
    from spatialid.bench.lock import bench_lock

    out = tmp_path / "out"
    items = _items(inputs, seeds=(42, 43))
    with bench_lock(out, part=0), bench_lock(out, part=1):
        with pytest.raises(BenchStateError, match="in use by another spatialid bench"), bench_lock(out):
            pass
        assert _in_child(lambda: bench_lock(out, part=0)) == "refused"  # a second launch's rank 0
        assert _in_child(lambda: bench_lock(out, part=2)) == "locked"  # a rank of this launch's size
        # the loop under a held lock of its own rank does not deadlock
        s0, _ = _run(out, select_items(items, ShardSpec(), 0, 2), part=0)
        s1, _ = _run(out, select_items(items, ShardSpec(), 1, 2), part=1)
        assert s0.generated + s0.reused + s1.generated + s1.reused == 24
        with pytest.raises(BenchStateError):
            _run(out, items)  # a single writer would fold (and delete) the part files being written
    summary, gen = _run(out, items)  # all released: the single writer folds the parts
    assert summary.already_done == 24 and gen.calls == []
    assert not list((out / "paper").glob("results.part*.json"))


def _in_child(make_lock) -> str:
    """Try a lock in a forked process (another process, same files); bounded in time."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, just the lock attempt
        os.close(r)
        try:
            with make_lock():
                word = b"locked"
        except BenchStateError:
            word = b"refused"
        except BaseException:  # noqa: BLE001 - anything else must reach the parent as a word, not a hang
            word = b"error"
        os.write(w, word)
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as fh:
        return fh.read().decode()


def test_rank_zero_folds_after_the_barrier_without_deadlock(inputs, tmp_path, monkeypatch, capsys):
    """Synchronized launch: each rank releases its locks before the barrier, so rank 0 can take the
    folder exclusively to fold the part files (were a lock still held, rank 0 would be refused)."""
    from spatialid.bench import grid as grid_mod
    from spatialid.bench.lock import bench_lock

    _, ids, prompts, _, _ = inputs
    out = tmp_path / "out"
    free_at_barrier = []

    def barrier(self):
        free_at_barrier.append(_in_child(lambda: bench_lock(out)))

    monkeypatch.setattr(grid_mod.ProcessInfo, "wait_for_everyone", barrier)
    monkeypatch.setattr(cmd_bench, "_build_generator", lambda *a, **k: FakeGenerator())
    for rank in (1, 0):
        monkeypatch.setattr(grid_mod, "process_split", lambda r=rank: grid_mod.ProcessInfo(r, 2, None, True))
        assert main(_cli_args(ids, prompts, out)) == 0
    assert free_at_barrier == ["locked", "locked"]
    assert sorted(p.name for p in (out / "paper").glob("results*.json")) == ["results.json"]
    assert len(_snapshot(out)) == 12


def test_merge_takes_the_target_lock(inputs, tmp_path):
    from spatialid.bench.lock import bench_lock
    from spatialid.bench.merge import merge_runs
    from spatialid.bench.results import update_manifest

    _, _, _, identities, prompts = inputs
    src = tmp_path / "src"
    update_manifest(src, settings=SETTINGS.to_dict(), identities=identities, prompts=prompts, presets=PRESETS, seeds=[42], baseline=True)
    _run(src, _items(inputs))
    # a bench process is writing into the target
    with bench_lock(tmp_path / "target", part=0), pytest.raises(BenchStateError, match="in use"):
        merge_runs([src], tmp_path / "target")
    assert sum(merge_runs([src], tmp_path / "target").presets.values()) == 12


# ------------------------------------------------------------------------- 8: damaged images


def test_damaged_images_are_generated_again(inputs, tmp_path, caplog):
    items = _items(inputs)
    _run(tmp_path / "ref", items)
    reference = _snapshot(tmp_path / "ref")
    out = tmp_path / "out"
    _run(out, items)
    images = sorted((out / "paper" / "images").glob("*.png"))
    truncated, garbage, bad_pixels = images[0], images[1], (out / "pulid" / "images").glob("*.png").__next__()
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a copy cut short
    garbage.write_bytes(b"not a png at all" * 10)
    raw = bytearray(bad_pixels.read_bytes())  # header and IEND intact, pixel data scrambled
    idat = raw.index(b"IDAT")
    raw[idat + 4 : idat + 40] = b"\xff" * 36
    bad_pixels.write_bytes(bytes(raw))
    now = time.time()
    os.utime(bad_pixels, (now + 10, now + 10))  # the most recent: fully decoded on resume

    assert {it.key for it in pending_items(out, items)} == {
        it.key for it in items if (out / it.preset / "images" / it.image_name) in (truncated, garbage, bad_pixels)
    }  # so the CLI loads a model to repair them
    with caplog.at_level("WARNING", logger="spatialid.bench"):
        summary, gen = _run(out, items)
    assert summary.damaged == 3 and len(gen.calls) == 3 and summary.already_done == 9
    assert "3 of 12 recorded images are damaged" in caplog.text
    assert _snapshot(out) == reference
    again, gen2 = _run(out, items)
    assert again.already_done == 12 and gen2.calls == []


def test_orphan_image_is_adopted_only_when_intact(inputs, tmp_path):
    items = _items(inputs)
    _run(tmp_path, items)
    path = tmp_path / "paper" / "results.json"
    doc = json.loads(path.read_text())
    dropped = doc["datas"].pop(0)
    path.write_text(json.dumps(doc))
    img = tmp_path / "paper" / dropped["image"]
    img.write_bytes(img.read_bytes()[:-200])  # text chunks readable, pixels cut short
    summary, gen = _run(tmp_path, items)
    assert summary.reused == 0 and gen.calls == [dropped["key"]]


# ------------------------------------------------------------------- 9: the grid a folder began with


def test_photo_removed_from_ids_folder_is_refused(inputs, tmp_path, monkeypatch, capsys):
    root, _, prompts, _, _ = inputs
    photos = tmp_path / "photos"
    shutil.copytree(root / "photos", photos)
    out = tmp_path / "out"
    monkeypatch.setattr(cmd_bench, "_build_generator", lambda *a, **k: FakeGenerator())
    assert main(_cli_args(photos, prompts, out)) == 0
    capsys.readouterr()
    kept = photos / "astronaut_mirror.png"
    moved = tmp_path / "moved.png"
    kept.rename(moved)
    monkeypatch.setattr(cmd_bench, "_build_generator", _no_model)
    assert main(_cli_args(photos, prompts, out)) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert "astronaut_mirror.png" in err[0] and "restore" in err[0] and "new --out" in err[0], err
    moved.rename(kept)  # restored: the same command resumes (nothing left to do)
    assert main(_cli_args(photos, prompts, out)) == 0
    assert "nothing to do" in capsys.readouterr().err
    # a deliberately smaller grid (another selection) is still allowed
    assert main(_cli_args(photos, prompts, out, "--limit-ids", "1")) == 0


def test_prompt_removed_from_prompts_file_is_refused(inputs, tmp_path, monkeypatch, capsys):
    _, ids, _, _, _ = inputs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {person} on a beach\na {person} in a forest\n")
    out = tmp_path / "out"
    monkeypatch.setattr(cmd_bench, "_build_generator", lambda *a, **k: FakeGenerator())
    assert main(_cli_args(ids, prompts, out, "--limit-ids", "1")) == 0
    prompts.write_text("a {person} on a beach\n")
    assert main(_cli_args(ids, prompts, out, "--limit-ids", "1")) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "prompt 1" in err[0] and "new --out" in err[0], err


# ------------------------------------------------------------------------ 10: leftover temp files


def test_leftover_temporary_files_are_removed_on_resume(inputs, tmp_path):
    items = _items(inputs)
    out = tmp_path / "out"
    _run(out, items)
    ours = [
        out / "paper" / "images" / ".x_p000_s42.png.k2j4h5g6.part",  # atomic_path (mkstemp)
        out / "paper" / "images" / ".x_p001_s42.png.part",  # older fixed-name temp
        out / "paper" / ".results.json.ab12cd34.part",
        out / "embeddings" / ".x-0123.safetensors.ab12cd34.tmp",  # older embedding writer
        out / ".bench.json.1234.abcdef12.tmp",  # checkpoint-style pid.uuid name
        out / ".spatialid-write-test.ab12cd34",  # check_writable probe
    ]
    foreign = [
        out / "paper" / "images" / "notes.part",  # not hidden: not ours
        out / "paper" / ".keep",
        out / ".cache.part",  # no target name of ours inside
        out / "paper" / "images" / "deep" / ".x.png.ab12cd34.part",  # not a folder the bench writes
        tmp_path / ".x.png.ab12cd34.part",  # outside the out folder
    ]
    for p in ours + foreign:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * 4096)
    summary, gen = _run(out, items)
    assert gen.calls == [] and summary.already_done == 12
    assert [p for p in ours if p.exists()] == []
    assert all(p.exists() for p in foreign)
    # a process of a multi-process run holds the folder shared: others' temporary files are in use
    from spatialid.bench.lock import bench_lock

    ours[0].write_bytes(b"\0")
    with bench_lock(out, part=3):
        _run(out, [], part=4)
    assert ours[0].exists()


# ------------------------------------------------------------------- 11: read-only and full disks


def test_read_only_out_is_refused_before_the_model_loads(inputs, tmp_path, monkeypatch, capsys):
    _, ids, prompts, _, _ = inputs
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse new files instead
        import tempfile

        real = tempfile.mkstemp

        def mkstemp(*a, dir=None, **k):
            if dir is not None and Path(dir).resolve() == out.resolve():
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        real_open = os.open

        def os_open(path, flags, *a, **k):
            if Path(path).parent.resolve() == out.resolve() and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", os_open)
    else:
        out.chmod(0o555)
    monkeypatch.setattr(cmd_bench, "_build_generator", _no_model)
    try:
        assert main(_cli_args(ids, prompts, out)) == 2
    finally:
        out.chmod(0o755)
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "cannot write" in err[0] and str(out) in err[0], err


class DiskFull:
    """The disk fills up at the PNG after ``after`` images: that write and every later one fail (ENOSPC)."""

    def __init__(self, monkeypatch, after: int) -> None:
        import contextlib

        import spatialid.utils.io as io_mod

        self.after, self.pngs, self.full = after, 0, False
        real = io_mod.atomic_write
        outer = self

        @contextlib.contextmanager
        def atomic_write(path, mode="wb"):
            if str(path).endswith(".png"):
                outer.full = outer.full or outer.pngs >= outer.after
                outer.pngs += 1
            with real(path, mode) as handle:
                if outer.full:
                    handle.write(b"\0" * 100)  # a partial temp file that must not stay behind
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                yield handle

        monkeypatch.setattr(io_mod, "atomic_write", atomic_write)


def test_full_disk_stops_the_run_with_its_state_saved(inputs, tmp_path, monkeypatch):
    items = _items(inputs)
    out = tmp_path / "out"
    DiskFull(monkeypatch, after=4)
    gen = HashGenerator()
    with pytest.raises(OutputPathError, match=r"no space left.*8 items left, which need about [\d.]+ kB \([\d.]+ kB per image"):
        run_bench(items, out, settings=SETTINGS, generate_fn=gen, encode_fn=hash_encoder, progress=False)
    assert len(gen.calls) == 5  # stopped at the first failed write, not generating the rest for nothing
    monkeypatch.undo()
    assert len(_snapshot(out)) == 4  # results consistent with the images on disk
    assert not [p for p in out.rglob(".*") if p.name.endswith((".part", ".tmp"))]
    assert all(not load_preset_results(out / p)[1] for p in ALL)  # a full disk is not the items' fault
    from spatialid.bench.lock import bench_lock

    with bench_lock(out):  # released
        pass
    summary, gen2 = _run(out, items)
    assert len(gen2.calls) + summary.reused == 8 and summary.already_done == 4


def test_full_disk_is_exit_2_one_line(inputs, tmp_path, monkeypatch, capsys):
    _, ids, prompts, _, _ = inputs
    monkeypatch.setattr(cmd_bench, "_build_generator", lambda *a, **k: FakeGenerator())
    DiskFull(monkeypatch, after=2)
    assert main(_cli_args(ids, prompts, tmp_path / "out")) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "no space left" in err[0] and "need about" in err[0] and "re-run" in err[0], err


# ---------------------------------------------------------------- 7: NaN tokens and blank images


def test_constant_or_non_finite_image_is_a_failure_and_retried(inputs, tmp_path):
    items = _items(inputs)
    black, nan = items[1].key, items[2].key
    gen = HashGenerator()

    def broken(item, emb):
        if item.key == black:
            return Image.new("RGB", (32, 32))  # what NaN latents decode to
        if item.key == nan:
            return Image.fromarray(np.full((32, 32), np.nan, dtype=np.float32), mode="F")
        return gen(item, emb)

    summary = run_bench(items, tmp_path, settings=SETTINGS, generate_fn=broken, encode_fn=hash_encoder, progress=False)
    assert summary.failed == 2
    fails = {**load_preset_results(tmp_path / items[1].preset)[1], **load_preset_results(tmp_path / items[2].preset)[1]}
    assert "constant" in fails[black]["error"] and "NaN/Inf" in fails[nan]["error"]
    assert black not in load_preset_results(tmp_path / items[1].preset)[0]
    again, gen2 = _run(tmp_path, items)
    assert sorted(gen2.calls) == sorted([black, nan]) and again.failed == 0


def test_damaged_cached_embedding_is_encoded_again(inputs, tmp_path):
    import torch
    from safetensors.torch import save_file

    _, _, _, identities, _ = inputs
    calls = []
    enc = lambda p: calls.append(p) or hash_encoder(p)
    cache = EmbeddingCache(tmp_path, enc, encoder_name="m")
    good = cache.get(identities[0])
    path = cache.path_for(identities[0])
    for bad in (torch.full((1, 4, 8), float("nan")), torch.full((1, 4, 8), float("inf")), torch.zeros(4, 8)):
        save_file({"embedding": bad}, str(path))
        again = EmbeddingCache(tmp_path, enc, encoder_name="m").get(identities[0])
        assert torch.equal(again, good)
    assert len(calls) == 4  # each broken file re-encoded (and rewritten)
    assert EmbeddingCache(tmp_path, enc, encoder_name="m").get(identities[0]) is not None and len(calls) == 4


def test_encoder_giving_nan_fails_its_items(inputs, tmp_path):
    import torch

    items = _items(inputs)
    summary, _ = _run(tmp_path, items, encode=lambda p: torch.full((1, 4, 8), float("nan")))
    assert summary.failed == 8 and all("NaN/Inf" in f["error"] for f in summary.failures)
    assert not list((tmp_path / "embeddings").glob("*.safetensors"))  # nothing broken cached
