"""`spatialid bench / merge / eval` end to end on the real tiny pipeline (offline, CPU).

Done-when of the benchmark issue: a 2 identities x 2 prompts x 2 presets bench completes, is
interrupted and resumed without duplicates or loss, shards merge to the same result as one run,
and `eval` writes the table and plots with every metric column (random-weight models, labelled).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spatialid.bench.results import load_manifest, load_preset_results
from spatialid.cli import cmd_bench
from spatialid.cli.main import EXIT_INTERRUPTED, main

PRESETS = ("none", "pulid", "paper")
_ORIGINAL_BUILD = cmd_bench._build_generator
_SHARED: dict[str, object] = {}


def _shared_build(args, settings, device=None):
    """Build the tiny pipeline once per test session (the first build goes through the real code)."""
    if "gen" not in _SHARED:
        _SHARED["gen"] = _ORIGINAL_BUILD(args, settings, device)
    return _SHARED["gen"]


@pytest.fixture(scope="module")
def inputs(bench_inputs):
    """ids.json and prompts.json of the sample bench inputs, shared with the session (conftest): read-only."""
    _, ids, prompts = bench_inputs
    return ids, prompts


def _bench_args(inputs, out, *extra):
    ids, prompts = inputs
    return ["bench", "--ids", str(ids), "--prompts", str(prompts), "--limit-prompts", "2", "--presets", "pulid,paper",
            "--model", "tiny", "--out", str(out), "--no-progress", *extra]


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    snap = {}
    for preset in PRESETS:
        entries, failures = load_preset_results(out / preset)
        assert not failures
        for key, e in entries.items():
            assert key not in snap
            snap[key] = (e["num"], (out / preset / e["image"]).read_bytes())
    return snap


@pytest.fixture(scope="module")
def full_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    mp = pytest.MonkeyPatch()
    mp.setattr(cmd_bench, "_build_generator", _shared_build)
    try:
        assert main(_bench_args(inputs, out)) == 0
    finally:
        mp.undo()
    return out


def test_tiny_bench_completes(full_run, capsys):
    snap = _snapshot(full_run)
    assert len(snap) == 12  # 2 ids x 2 prompts x 1 seed x (2 presets + baseline)
    doc = json.loads((full_run / "paper" / "results.json").read_text())
    assert [e["num"] for e in doc["datas"]] == [0, 1, 2, 3]
    assert doc["tags"]["settings"]["model"] == "tiny" and doc["tags"]["settings"]["steps"] == 2
    assert {e["prompt"].split(" ")[3] for e in doc["datas"] if e["prompt"].startswith("portrait")} == {"woman", "man"}
    manifest = load_manifest(full_run)
    assert manifest["settings"]["width"] == 64 and manifest["presets"] == ["pulid", "paper"]
    # "auto" is recorded as what it resolved to, so CPU and GPU shards never merge silently.
    assert manifest["settings"]["dtype"] == "float32"
    assert len(list((full_run / "embeddings").glob("*.safetensors"))) == 2
    from spatialid.app.metadata import read_png_metadata

    meta = read_png_metadata(next((full_run / "pulid" / "images").glob("*.png")))
    assert meta["model"] == "tiny" and meta["preset"] == "pulid" and meta["steps"] == 2


def test_rerun_has_nothing_to_do_and_loads_no_model(full_run, inputs, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("a finished grid must not load a model")

    monkeypatch.setattr(cmd_bench, "_build_generator", no_model)
    assert main(_bench_args(inputs, full_run)) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_interrupted_shards_resume_and_merge_to_the_single_run(full_run, inputs, tmp_path, monkeypatch, capsys):
    """Shard 1/2 is interrupted (Ctrl-C) after k images and resumed; with shard 2/2 it merges to the full run."""
    import shutil

    parts = [tmp_path / "shard1", tmp_path / "shard2"]
    for d in parts:  # identity embeddings come from the cache (encoding is tested by the full run)
        shutil.copytree(full_run / "embeddings", d / "embeddings")
    k = 2
    calls = []

    def build_flaky(args, settings, device=None):
        gen = _shared_build(args, settings, device)

        class Flaky:
            encode = gen.encode
            encoder_name = gen.encoder_name

            def __call__(self, item, emb):
                if len(calls) == k:
                    raise KeyboardInterrupt
                calls.append(item.key)
                return gen(item, emb)

        return Flaky()

    monkeypatch.setattr(cmd_bench, "_build_generator", build_flaky)
    assert main(_bench_args(inputs, parts[0], "--shard", "1/2")) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    done = {p: load_preset_results(parts[0] / p)[0] for p in PRESETS if (parts[0] / p).is_dir()}
    assert sum(len(v) for v in done.values()) == k
    assert not list(parts[0].rglob("*.part"))  # no half-written file

    monkeypatch.setattr(cmd_bench, "_build_generator", _shared_build)
    assert main(_bench_args(inputs, parts[0], "--shard", "1/2")) == 0
    err = capsys.readouterr().err
    assert re.search(rf"{6 - k} generated, 0 reused, {k} already done", err), err
    assert main(_bench_args(inputs, parts[1], "--shard", "2/2")) == 0
    assert [len(_snapshot(d)) for d in parts] == [6, 6]
    merged = tmp_path / "merged"
    assert main(["merge", *map(str, parts), "--out", str(merged)]) == 0
    assert "merged 12 images" in capsys.readouterr().err
    # same keys, nums and byte-identical images as the single run: no duplicate, no loss (same
    # pipeline object and seeds; the cached embeddings the shards read are bit copies)
    assert _snapshot(merged) == _snapshot(full_run)


def test_processes_of_one_machine_split_and_fold(full_run, inputs, tmp_path, monkeypatch, capsys):
    """Two `accelerate launch` processes (simulated in turn) split the grid; a later plain run folds their files."""
    import shutil

    from spatialid.bench.grid import ProcessInfo

    out = tmp_path / "multi"
    shutil.copytree(full_run / "embeddings", out / "embeddings")
    monkeypatch.setattr(cmd_bench, "_build_generator", _shared_build)
    for rank in (0, 1):
        monkeypatch.setattr("spatialid.bench.grid.process_split", lambda r=rank: ProcessInfo(r, 2, None, False))
        assert main(_bench_args(inputs, out, "--limit-ids", "1")) == 0
        assert "3 generated, 0 reused, 0 already done, 0 failed of 3 items" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "paper").glob("results*.json")) == ["results.part0.json", "results.part1.json"]
    monkeypatch.undo()
    monkeypatch.setattr(cmd_bench, "_build_generator", _shared_build)
    assert main(_bench_args(inputs, out, "--limit-ids", "1")) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "paper").glob("results*.json")) == ["results.json"]
    full = _snapshot(full_run)
    part = {k: v for k, v in full.items() if k.startswith(load_manifest(out)["identities"].popitem()[0])}
    assert _snapshot(out) == part and len(part) == 6


def test_eval_tiny_writes_table_and_plots(full_run, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["eval", str(full_run), "--model", "tiny", "--out", str(report), "--no-progress"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| Preset"))
    for title in ("CLIP-T", "CLIP-I", "FaceSim", "Face det.", "IQ", "BG CLIP dist.", "BG MAE", "BG CLIP-T"):
        assert title in header
    md = (report / "report.md").read_text()
    assert "RANDOM WEIGHTS" in md and "| none (no identity, reference) |" in md
    assert (report / "report.csv").is_file() and (report / "plots" / "metrics_bars.png").is_file()
    assert (report / "plots" / "tradeoff_facesim_clipt.png").is_file()
    doc = json.loads((report / "report.json").read_text())
    assert doc["random_weights"] is True
    # every column has numbers for the identity presets (centre-fallback faces on noise images)
    for preset in ("pulid", "paper"):
        assert all(v["count"] == 4 for v in doc["presets"][preset].values())


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--ids": "missing.json"}, "does not exist"),
        ({"--presets": "paper,bogus"}, "unknown preset 'bogus'"),
        ({"--shard": "3/2"}, "--shard 3/2"),
        ({"--size": "65x64"}, "multiple of 16"),
        ({"--steps": "0"}, "steps must be between"),
        ({"--limit-ids": "0"}, "--limit-ids must be >= 1"),
        ({"--seeds": "x"}, "seeds must look like"),
        ({"--id-weight": "9"}, "id weight must be between"),
        ({"--prompt-ids": "1,x"}, "--prompt-ids must look like"),
        ({"--prompt-ids": "0,99"}, "--prompt-ids 99: prompts file"),
        ({"--paths": "cwd"}, "--paths must be absolute or relative"),
    ],
)
def test_bad_bench_input_is_one_line_exit_2(inputs, tmp_path, capsys, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    args = _bench_args(inputs, tmp_path / "out")
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spatialid: error:") and message in err[0], err


def test_other_bad_inputs(full_run, inputs, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (_bench_args(inputs, a_file), "not a folder"),
        (_bench_args(inputs, full_run, "--steps", "3"), "other settings (steps: 2 -> 3"),
        (["eval", str(tmp_path / "nope"), "--model", "tiny"], "does not exist"),
        (["eval", str(tmp_path), "--model", "tiny"], "no bench.json"),
        (["merge", str(tmp_path), "--out", str(tmp_path / "m")], "no bench.json"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)


def test_failed_model_load_leaves_no_manifest(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = _bench_args(inputs, out)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-flux")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spatialid: error:"), err  # which file is named first may vary
    assert not (out / "bench.json").exists()  # a corrected command can use the same --out


def test_quantize_with_tiny_model_is_refused(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_bench_args(inputs, out, "--quantize", "nf4")) == 2
    assert "--quantize applies to real FLUX weights" in capsys.readouterr().err
    assert not (out / "bench.json").exists()


# ------------------------------------------------------------------------- IBench's real formats


def test_tiny_bench_over_ibench_files_writes_ibench_results(tmp_path, monkeypatch, capsys):
    """IBench-format identities (absolute paths of another machine) + --id-root + a human_longer-style
    prompts file + --prompt-ids: each preset's results.json is IBench's evaluator format."""
    from spatialid.bench.results import IBENCH_KEYS
    from spatialid.bench.samples import write_ibench_inputs

    ibench = write_ibench_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cmd_bench, "_build_generator", _shared_build)
    args = ["bench", "--ids", "IBench/data/images/chineseid_images.json", "--prompts",
            "IBench/data/prompts/human_longer_template.json", "--id-root", "IBench", "--prompt-ids", "0,2",
            "--presets", "pulid", "--model", "tiny", "--out", "runs/ibench", "--no-progress"]
    assert main(args) == 0
    # 2 identities x prompts 0, 2: pulid 4 + baselines 2; the other identity's 2 baselines are the same
    # images (gender-free prompts), re-saved
    assert "6 generated, 2 reused, 0 already done, 0 failed of 8 items" in capsys.readouterr().err
    ids = json.loads(ibench["ids"].read_text())["datas"]
    prompts = json.loads(ibench["longer"].read_text())["datas"]
    out = tmp_path / "runs" / "ibench"
    ours = {"key", "preset", "seed", "identity_key", "identity_index", "prompt_index", "gender", "image", "id_path"}
    for preset in ("none", "pulid"):
        doc = json.loads((out / preset / "results.json").read_text())
        assert set(doc) == {"datas", "tags", "failures"} and doc["tags"]["category"] == "imageid"
        assert doc["failures"] == []
        datas = doc["datas"]
        assert [e["num"] for e in datas] == [0, 1, 2, 3]
        for e, (i, p) in zip(datas, [(0, 0), (0, 2), (1, 0), (1, 2)]):
            assert tuple(e)[:7] == IBENCH_KEYS and set(e) == set(IBENCH_KEYS) | ours
            assert e["id"] == ids[i]["id"] and e["id"].startswith("/home/gdli7/IBench/")  # as the ids file writes it
            assert e["prompt"] == prompts[p]["prompt"]  # exactly the text generated
            assert (e["prompt_attr"], e["prompt_style"]) == (prompts[p]["prompt_attr"], prompts[p]["prompt_style"])
            assert Path(e["imagewithid"]).is_absolute() and Path(e["imagewithid"]).is_file()
            assert Path(e["imagewithoutid"]).is_absolute() and Path(e["imagewithoutid"]).is_file()
            assert Path(e["imagewithoutid"]).parent == (out / "none" / "images").resolve()
            from spatialid.app.metadata import read_png_metadata

            assert read_png_metadata(e["imagewithid"])["prompt"] == e["prompt"]
    manifest = load_manifest(out)
    assert manifest["prompt_ids"] == [0, 2] and manifest["inputs"]["prompt_ids"] == "0,2"
    assert manifest["inputs"]["id_root"] == "IBench" and manifest["paths"] == "absolute"

    # the same folder with --paths relative: nothing to generate, the files are rewritten
    monkeypatch.setattr(cmd_bench, "_build_generator", lambda *a, **k: pytest.fail("nothing to generate"))
    assert main([*args, "--paths", "relative"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    datas = json.loads((out / "pulid" / "results.json").read_text())["datas"]
    assert all(e["imagewithid"].startswith("runs/ibench/pulid/images/") and Path(e["imagewithid"]).is_file() for e in datas)
    assert all(e["imagewithoutid"].startswith("runs/ibench/none/images/") and Path(e["imagewithoutid"]).is_file() for e in datas)
