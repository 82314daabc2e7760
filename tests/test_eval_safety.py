"""Nothing lost, nothing exposed: ``spatialid eval`` on damaged images, killed runs and bad files.

Bench folders are built here with the model-free HashGenerator; the evaluation uses ``--model tiny``
(random-weight metric models, offline). Tests that check "before any model loads" replace the
metric-model constructors by ones that fail the test when called.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest

from spatialid.bench.datasets import load_identities, load_prompts
from spatialid.bench.grid import build_grid
from spatialid.bench.results import update_manifest
from spatialid.bench.runner import BenchSettings, run_bench
from spatialid.bench.samples import HashGenerator, hash_encoder
from spatialid.cli.main import main
from spatialid.pipeline.settings import GenerationSettings

SIZE = 48
PRESETS = ["pulid", "paper"]
SETTINGS = BenchSettings(model="fake", generation=GenerationSettings(steps=1, width=SIZE, height=SIZE))
TINY = ["--model", "tiny", "--no-progress", "--no-plots"]


@pytest.fixture(scope="module")
def grid(bench_inputs):
    _, ids_json, prompts_json = bench_inputs  # shared with the session (conftest): read-only
    identities, prompts = load_identities(ids_json), load_prompts(prompts_json, limit=2)
    return identities, prompts, build_grid(identities, prompts, PRESETS, [1])


def _bench(out: Path, grid, n_items: int | None = None) -> Path:
    """A bench folder of the 2 x 2 x 1 grid (x none, pulid, paper); ``n_items``: a run killed after that many."""
    identities, prompts, items = grid
    update_manifest(out, settings=SETTINGS.to_dict(), identities=identities, prompts=prompts, presets=PRESETS,
                    seeds=[1], baseline=True)
    run_bench(items[:n_items], out, settings=SETTINGS, generate_fn=HashGenerator(SIZE), encode_fn=hash_encoder,
              progress=False)
    return out


@pytest.fixture(scope="module")
def full_bench(tmp_path_factory, grid):
    return _bench(tmp_path_factory.mktemp("full") / "bench", grid)


@pytest.fixture(scope="module")
def killed_bench(tmp_path_factory, grid):
    # units are made in order (baseline, then the presets): killed after 5 of 12 items
    return _bench(tmp_path_factory.mktemp("killed") / "bench", grid, n_items=5)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bench"
    shutil.copytree(src, dst)
    return dst


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, args), *TINY])
    out, err = capsys.readouterr()
    return rc, out, err


def _forbid_models(monkeypatch) -> None:
    from spatialid.evaluation.evaluate import MetricModels

    def boom(*a, **k):
        raise AssertionError("a metric model was loaded before the inputs were checked")

    monkeypatch.setattr(MetricModels, "real", classmethod(boom))
    monkeypatch.setattr(MetricModels, "tiny", classmethod(boom))


def _table(md: str) -> list[str]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Preset | n"))
    return [line for line in lines[start:] if line.startswith("|")][: 2 + 3]


# ------------------------------------------------------------------ 8: unreadable images


def test_unreadable_images_are_skipped_and_counted(full_bench, tmp_path, capsys):
    bench = _copy(full_bench, tmp_path)
    pulid = sorted((bench / "pulid" / "images").glob("*.png"))
    paper = sorted((bench / "paper" / "images").glob("*.png"))
    baseline = sorted((bench / "none" / "images").glob("*.png"))
    damaged = {
        pulid[0]: pulid[0].read_bytes()[: len(pulid[0].read_bytes()) // 2],  # truncated
        paper[1]: b"this is not an image",  # not an image
        baseline[2]: b"",  # zero bytes: also the image without identity of two items
    }
    for path, data in damaged.items():
        path.write_bytes(data)
    rc, _, err = _eval(capsys, bench, "--out", tmp_path / "report")
    assert rc == 0, err
    assert "Traceback" not in err
    assert "3 unreadable image" in err  # the printed summary says so
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    skipped = doc["skipped_images"]
    assert doc["skipped_count"] == 3 and sorted(s["file"] for s in skipped) == sorted(str(p) for p in damaged)
    assert all(s["reason"] for s in skipped)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "3 unreadable image file(s) skipped" in md
    rows = json.loads((tmp_path / "report" / "per_image.json").read_text())["rows"]
    assert len(rows) == 12 - 3
    # the two items whose image without identity is the empty baseline are scored without CLIP-I
    lacking = [r for r in rows if r["preset"] != "none" and "clip_i" not in r]
    assert len(lacking) == 2 and all(r["without_id"] is None for r in lacking)
    # again, from the cache: the same count
    rc, _, err = _eval(capsys, bench, "--out", tmp_path / "report")
    assert rc == 0 and "3 unreadable image" in err


def test_nothing_readable_exits_2(full_bench, tmp_path, capsys):
    bench = _copy(full_bench, tmp_path)
    for p in bench.glob("*/images/*.png"):
        p.write_bytes(b"")
    rc, _, err = _eval(capsys, bench, "--out", tmp_path / "report")
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("spatialid: error:") and "no image could be read" in line and "12" in line


# -------------------------------------------------------------- 9: incomplete results


def test_complete_run_gains_only_the_expected_column(full_bench, tmp_path, capsys):
    rc, out, err = _eval(capsys, full_bench, "--out", tmp_path / "report")
    assert rc == 0, err
    header, _, *rows = _table(out)
    assert header.startswith("| Preset | n | expected | CLIP-T")
    assert all(r.split(" | ")[1:3] == ["4", "4"] for r in rows)
    assert any("**" in r for r in rows)  # a best preset is marked
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert doc["completeness"]["complete"] and doc["completeness"]["expected"] == {"none": 4, "pulid": 4, "paper": 4}
    assert doc["completeness"]["ranked_on"] == "all items" and doc["paired_differences"]
    assert "incomplete" not in (tmp_path / "report" / "report.md").read_text().lower()


def test_killed_run_is_reported_incomplete_and_not_ranked(killed_bench, tmp_path, capsys):
    rc, _, err = _eval(capsys, killed_bench, "--out", tmp_path / "report")
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("spatialid: error:") and "incomplete" in line
    assert "paper has 1 of 4" in line and "re-run" in line and "--allow-incomplete" in line
    # the per-preset numbers are still written, beside the expected grid size, without a "best"
    md = (tmp_path / "report" / "report.md").read_text()
    _, _, *rows = _table(md)
    assert [r.split(" | ")[1:3] for r in rows] == [["2", "4"], ["2", "4"], ["1", "4"]]
    assert not any("**" in r for r in rows)
    assert "## Paired differences" not in md
    assert "paper: 3 missing" in md and "astronaut_mirror" in md
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    c = doc["completeness"]
    assert not c["complete"] and c["expected"]["paper"] == 4 and c["ranked_on"] is None
    assert c["missing"]["paper"]["count"] == 3 and len(c["missing"]["paper"]["keys"]) == 3
    assert all(k.endswith("/paper") for k in c["missing"]["paper"]["keys"])
    assert set(doc["best"].values()) == {None} and doc["paired_differences"] == {}


def test_allow_incomplete_ranks_on_the_common_items(killed_bench, tmp_path, capsys):
    rc, _, err = _eval(capsys, killed_bench, "--out", tmp_path / "report", "--allow-incomplete")
    assert rc == 0, err
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Ranked on the 1 item(s) every preset has" in md
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    c = doc["completeness"]
    assert c["ranked_on"] == "common items" and c["common_items"] == 1
    assert c["common"]["pulid"]["clip_t"]["count"] == 1
    assert any(v is not None for v in doc["best"].values())
    assert doc["paired_differences"]["paper"]["clip_t"]["count"] == 1  # only the unit both have


# ------------------------------------------------------------------ 12: files up front


def test_clip_pretrained_pickles_are_refused_before_any_model_loads(full_bench, tmp_path, capsys, monkeypatch):
    _forbid_models(monkeypatch)
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Evil()}, protocol=4))
    zipped = tmp_path / "evil_zip.pt"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    for bad, what in ((evil, "Python pickle"), (zipped, "pickle archive")):
        rc = main(["eval", str(full_bench), "--clip-pretrained", str(bad), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        assert what in err and "spatialid never unpickles weight files" in err and str(bad) in err
    assert not marker.exists()
    for bad, what in ((tmp_path / "missing.safetensors", "does not exist"), (tmp_path, "not a file")):
        rc = main(["eval", str(full_bench), "--clip-pretrained", str(bad), "--no-progress"])
        assert rc == 2 and what in capsys.readouterr().err


def test_clip_checkpoint_check_accepts_safetensors_only(tmp_path):
    from spatialid.errors import SpatialIDError
    from spatialid.evaluation.clip_metrics import check_clip_checkpoint

    header = b'{"__metadata__":{}}'
    good = tmp_path / "clip.safetensors"
    good.write_bytes(struct.pack("<Q", len(header)) + header)
    check_clip_checkpoint(str(good))
    check_clip_checkpoint("openai")  # a tag, not a file: left to open_clip
    renamed = tmp_path / "clip.bin"
    renamed.write_bytes(good.read_bytes())
    with pytest.raises(SpatialIDError, match=r"clip\.bin.*\.safetensors"):
        check_clip_checkpoint(str(renamed))
    text = tmp_path / "notes.pt"
    text.write_text("hello, world, not weights")
    with pytest.raises(SpatialIDError, match="not a safetensors file"):
        check_clip_checkpoint(str(text))


def test_open_clip_that_would_unpickle_is_refused(monkeypatch):
    import open_clip

    from spatialid.errors import SpatialIDError
    from spatialid.evaluation.clip_metrics import ClipScorer

    def boom(*a, **k):
        raise AssertionError("open_clip must not be asked to load anything")

    monkeypatch.setattr(open_clip, "__version__", "2.24.0")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", boom)
    with pytest.raises(SpatialIDError, match=r"never unpickles weight files.*open-clip-torch>=3"):
        ClipScorer.from_open_clip("ViT-L-14", "openai")


def test_a_bare_name_is_a_tag_unless_open_clip_lacks_it_and_it_is_a_file(tmp_path, monkeypatch):
    import open_clip

    from spatialid.errors import SpatialIDError
    from spatialid.evaluation.clip_metrics import ClipScorer, check_clip_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai").mkdir()  # a folder named like the tag: the tag still wins, as in open_clip
    check_clip_checkpoint("openai")
    (tmp_path / "mymodel").write_bytes(pickle.dumps({"w": 1}, protocol=2))

    def boom(*a, **k):
        raise AssertionError("open_clip must not be asked to load a pickle")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", boom)
    with pytest.raises(SpatialIDError, match="mymodel is a Python pickle.*never unpickles weight files"):
        ClipScorer.from_open_clip("ViT-L-14", "mymodel")


def test_models_dir_and_roots_must_be_folders(full_bench, tmp_path, capsys, monkeypatch):
    _forbid_models(monkeypatch)
    file = tmp_path / "a_file"
    file.write_text("x")
    for flag in ("--models-dir", "--id-root", "--image-root"):
        for bad, what in ((file, "not a folder"), (tmp_path / "nowhere", "does not exist")):
            rc = main(["eval", str(full_bench), flag, str(bad), "--no-progress"])
            err = capsys.readouterr().err
            assert rc == 2 and flag in err and what in err and str(bad) in err, err
    rc = main(["eval", str(full_bench), "--out", str(file), "--no-progress"])
    assert rc == 2 and "--out" in capsys.readouterr().err


def test_sources_are_checked_before_clip_loads(tmp_path, capsys, monkeypatch):
    _forbid_models(monkeypatch)
    plain = tmp_path / "photos"
    plain.mkdir()
    broken = tmp_path / "broken.json"
    broken.write_text('{"datas": [')
    no_datas = tmp_path / "other.json"
    no_datas.write_text('{"images": []}')
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = (
        (plain, "not a spatialid bench output folder (no bench.json)"),
        (broken, "not valid JSON"),
        (no_datas, 'no "datas" list'),
        (text, "neither a bench output folder nor an IBench results .json"),
        (tmp_path / "gone", "does not exist"),
    )
    for src, what in cases:
        for model in ("tiny", "real"):
            rc = main(["eval", str(src), "--model", model, "--no-progress"])
            err = capsys.readouterr().err
            assert rc == 2 and "Traceback" not in err, err
            lines = err.strip().splitlines()
            assert lines[-1].startswith("spatialid: error:") and what in lines[-1] and str(src) in lines[-1]


def test_model_flag_is_a_choice():
    with pytest.raises(SystemExit) as exc:
        main(["eval", ".", "--model", "evil.safetensors"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------- help


def test_eval_help_prints_single_percent(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "95% CI" in out and "%%" not in out
