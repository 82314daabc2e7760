"""The bench against IBench's real file formats (model-free generator): inputs, results, resume, merge.

The input files are written in IBench's exact layouts (``samples.write_ibench_inputs``): an
identities file of absolute paths from another machine, resolved with ``id_root``; prompts in
``human_longer_template.json``'s form (gender in the text) and ``unsplash50_template.json``'s form
(``{person}`` and ``[portrait,]`` notes). The results are checked against what IBench's evaluator
(``IbenchMain.py --config config/imageid.py --data results.json``) reads from them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from spatialid.bench.datasets import (
    BenchInputError,
    identity_key,
    load_identities,
    load_prompts,
    parse_prompt_ids,
    resolve_photo_path,
)
from spatialid.bench.grid import ShardSpec, build_grid, select_items
from spatialid.bench.merge import merge_runs
from spatialid.bench.results import (
    IBENCH_KEYS,
    BenchStateError,
    PresetResults,
    load_manifest,
    update_manifest,
)
from spatialid.bench.runner import BenchSettings, consolidate, pending_items, run_bench
from spatialid.bench.samples import IBENCH_FOREIGN_ROOT, HashGenerator, hash_encoder, write_ibench_inputs
from spatialid.pipeline.settings import GenerationSettings

SETTINGS = BenchSettings(model="fake", generation=GenerationSettings(steps=2, width=32, height=32))
PRESETS = ["pulid", "paper"]
OURS = {"key", "preset", "seed", "identity_key", "identity_index", "prompt_index", "gender", "image", "id_path"}


@pytest.fixture(scope="module")
def ibench(tmp_path_factory):
    return write_ibench_inputs(tmp_path_factory.mktemp("checkout"))


@pytest.fixture(scope="module")
def grid_inputs(ibench):
    identities = load_identities(ibench["ids"], id_root=ibench["root"])
    prompts = load_prompts(ibench["longer"], ids=[0, 2])
    return identities, prompts


def _grid(grid_inputs, presets=PRESETS, seeds=(42,), baseline=True):
    identities, prompts = grid_inputs
    return build_grid(identities, prompts, presets, list(seeds), baseline=baseline)


def _run(out, items, gen=None, **kw):
    gen = gen or HashGenerator()
    summary = run_bench(items, out, settings=SETTINGS, generate_fn=gen, encode_fn=hash_encoder, progress=False, **kw)
    return summary, gen


def _manifest(out, grid_inputs, **kw):
    identities, prompts = grid_inputs
    return update_manifest(out, settings=SETTINGS.to_dict(), identities=identities, prompts=prompts, presets=PRESETS,
                           seeds=[42], baseline=True, **kw)


def ibench_consumes(results: Path, cwd: Path) -> list[dict]:
    """Read ``results`` the way IBench's evaluator does, from ``cwd``; returns its datas.

    What its code touches (ibench/instances/data.py, ibench/metrics/*): ``tags["category"]``
    must be "imageid"; fid copies ``imagewithid`` and ``imagewithoutid`` of every entry into two
    folders by base name (a name that is not a string, or is missing, stops the evaluator);
    clipi/clipt/aesthetic/imaging_quality open both images and read ``prompt``; facesim,
    antifacesim, posediv, exprdiv and landmarkdiff open ``id`` (and skip the entry silently when
    they cannot).
    """
    old = os.getcwd()
    os.chdir(cwd)
    try:
        data = json.load(open(results, encoding="utf-8"))
        assert data["tags"]["category"] == "imageid"
        datas = data["datas"]
        for field in ("imagewithid", "imagewithoutid"):
            names = [Path(item[field]).name for item in datas]
            assert len(set(names)) == len(names), f"fid copies {field} by base name: names must be unique"
            for item in datas:
                assert isinstance(item[field], str) and not item[field].startswith("http")
                with Image.open(item[field]) as img:
                    img.convert("RGB")
        assert all(isinstance(item["prompt"], str) and isinstance(item["id"], str) for item in datas)
        return datas
    finally:
        os.chdir(old)


# ------------------------------------------------------------------------------------- inputs


def test_ibench_identities_file_resolved_with_id_root(ibench, tmp_path, monkeypatch):
    root = ibench["root"]
    with pytest.raises(BenchInputError, match=r"2 of 2 identity photos not found.*first: /home/gdli7/IBench/.*--id-root"):
        load_identities(ibench["ids"])
    # the checkout, its parent, or the photo folder itself; relative to the current folder too
    monkeypatch.chdir(root.parent)
    for id_root in (root, root.parent, root / "data" / "images" / "chineseid", Path("IBench")):
        identities = load_identities(ibench["ids"], id_root=id_root)
        assert [i.path for i in identities] == [(root / "data/images/chineseid" / n).resolve() for n in ("R (9).jpg", "female2.jpg")]
    # verbatim id (what the results write), file order, IBench's genders
    assert [i.id for i in identities] == [f"{IBENCH_FOREIGN_ROOT}/data/images/chineseid/R (9).jpg",
                                          f"{IBENCH_FOREIGN_ROOT}/data/images/chineseid/female2.jpg"]
    assert [i.index for i in identities] == [0, 1] and [i.gender for i in identities] == ["male", "female"]
    assert identities[0].key == identity_key(identities[0].id)
    assert [i.key for i in load_identities(ibench["ids"], id_root=root, limit=1)] == [identities[0].key]
    # a path written on Windows
    found = resolve_photo_path("D:\\data\\IBench\\data\\images\\chineseid\\female2.jpg", tmp_path, root)
    assert found == (root / "data/images/chineseid/female2.jpg").resolve()


def test_ibench_prompt_files(ibench):
    longer = load_prompts(ibench["longer"])
    assert [p.index for p in longer] == [0, 1, 2, 3]
    assert longer[0].prompt_attr == ("long",) and longer[0].prompt_style == ("human_longer",)
    # gender in the text, no {person}: the text is generated as written, for every identity
    assert all(p.render("female") == p.render("male") == p.template.strip() for p in longer)
    assert longer[3].render("male").endswith("leg exercise , wearing a black tank top.")  # nothing tidied
    short = load_prompts(ibench["short"])
    assert [p.render("female") for p in short] == [
        "a woman wearing a spacesuit", "3D Animation, Disney style,cute,popmart blindbox", "an angry woman,old",
    ]
    assert short[2].render("male") == "an angry man,old" and short[0].render("unknown") == "a person wearing a spacesuit"


def test_prompt_ids_select_by_index(ibench, tmp_path):
    assert parse_prompt_ids("0,1,5,10,20") == [0, 1, 5, 10, 20]
    assert parse_prompt_ids("0-4") == [0, 1, 2, 3, 4]
    assert parse_prompt_ids(" 3, 1-2 ,3") == [1, 2, 3] and parse_prompt_ids(None) is None and parse_prompt_ids("") is None
    for bad in ("x", "1,-2", "4-2", "1.5", " , "):
        with pytest.raises(BenchInputError, match="--prompt-ids"):
            parse_prompt_ids(bad)
    chosen = load_prompts(ibench["longer"], ids=[3, 1])
    assert [p.index for p in chosen] == [1, 3]  # file order, the file's indices (keys do not change)
    assert [p.index for p in load_prompts(ibench["longer"], ids=[0, 2, 3], limit=2)] == [0, 2]
    with pytest.raises(BenchInputError, match=r"--prompt-ids 20: prompts file .* has 4 prompts \(indices 0-3\)"):
        load_prompts(ibench["longer"], ids=[0, 20])
    txt = tmp_path / "p.txt"
    txt.write_text("# c\nfirst {person}\n\nsecond [x]\nthird\n")
    assert [p.template for p in load_prompts(txt, ids=[2, 0])] == ["first {person}", "third"]


# ------------------------------------------------------------------------------------ results


def test_results_are_what_ibench_reads(ibench, grid_inputs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    items = _grid(grid_inputs)
    _manifest(out, grid_inputs, inputs={"prompt_ids": "0,2"})
    _run(out, items)
    identities, prompts = grid_inputs
    source = json.loads(ibench["longer"].read_text())["datas"]
    for preset in ["none", *PRESETS]:
        path = out / preset / "results.json"
        doc = json.loads(path.read_text())
        assert set(doc) == {"datas", "tags", "failures"} and doc["tags"]["category"] == "imageid"
        datas = doc["datas"]
        assert [e["num"] for e in datas] == list(range(4))
        for e in datas:
            assert tuple(e)[: len(IBENCH_KEYS)] == IBENCH_KEYS and set(e) == set(IBENCH_KEYS) | OURS
            assert e["preset"] == preset
        # file order = identities file, then prompt index (as the authors' loop)
        assert [(e["identity_index"], e["prompt_index"]) for e in datas] == [(0, 0), (0, 2), (1, 0), (1, 2)]
        assert [e["id"] for e in datas] == [identities[0].id] * 2 + [identities[1].id] * 2
        assert [e["prompt"] for e in datas] == [source[0]["prompt"], source[2]["prompt"]] * 2
        assert all(e["prompt_attr"] == ["long"] and e["prompt_style"] == ["human_longer"] for e in datas)
        for e in datas:
            assert Path(e["imagewithid"]).is_absolute() and Path(e["imagewithid"]) == (out / preset / e["image"]).resolve()
            assert Path(e["imagewithoutid"]) == (out / "none" / "images" / Path(e["image"]).name).resolve()
            assert Path(e["id_path"]).is_file()
        # absolute paths: readable from any folder
        ibench_consumes(path, tmp_path)
    none = {e["key"].rsplit("/", 1)[0]: e for e in json.loads((out / "none" / "results.json").read_text())["datas"]}
    for e in json.loads((out / "paper" / "results.json").read_text())["datas"]:
        assert none[e["key"].rsplit("/", 1)[0]]["imagewithid"] == e["imagewithoutid"]  # same prompt and seed
    manifest = load_manifest(out)
    assert manifest["prompt_ids"] == [0, 2] and manifest["paths"] == "absolute" and manifest["format_version"] == 2
    assert manifest["inputs"] == {"prompt_ids": "0,2"}


def test_relative_paths_resolve_from_the_run_folder(grid_inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items = _grid(grid_inputs)
    _run(Path("runs/rel"), items, paths="relative")
    path = tmp_path / "runs/rel/paper/results.json"
    datas = ibench_consumes(path, tmp_path)
    assert all(e["imagewithid"].startswith("runs/rel/paper/images/") for e in datas)
    assert all(e["imagewithoutid"].startswith("runs/rel/none/images/") for e in datas)
    assert json.loads(path.read_text())["tags"]["paths"] == "relative"
    # the same folder resumed with absolute paths: nothing generated, every file rewritten
    summary, gen = _run(Path("runs/rel"), items, paths="absolute")
    assert gen.calls == [] and summary.already_done == len(items)
    ibench_consumes(path, tmp_path / "runs")
    assert all(Path(e["imagewithid"]).is_absolute() for e in json.loads(path.read_text())["datas"])


def test_shards_merge_into_one_ibench_file(grid_inputs, tmp_path):
    items = _grid(grid_inputs, seeds=(42, 43))
    single = tmp_path / "single"
    _manifest(single, grid_inputs)
    _run(single, items)
    shards = []
    for k in (1, 2):
        d = tmp_path / f"shard{k}"
        _manifest(d, grid_inputs)
        _run(d, select_items(items, ShardSpec(k, 2)))
        shards.append(d)
    # a shard's own file is numbered 0.. in its own order
    assert [e["num"] for e in json.loads((shards[1] / "paper/results.json").read_text())["datas"]] == [0, 1, 2, 3]
    merged = tmp_path / "merged"
    merge_runs(shards, merged)
    for preset in ["none", *PRESETS]:
        got = json.loads((merged / preset / "results.json").read_text())["datas"]
        want = json.loads((single / preset / "results.json").read_text())["datas"]
        strip = lambda e: {k: v for k, v in e.items() if k not in ("imagewithid", "imagewithoutid")}  # noqa: E731
        assert [strip(e) for e in got] == [strip(e) for e in want]  # same order, nums, fields
        assert all(Path(e["imagewithoutid"]).parent == (merged / "none" / "images").resolve() for e in got)
        ibench_consumes(merged / preset / "results.json", tmp_path)


def test_process_parts_fold_into_one_ibench_file(grid_inputs, tmp_path):
    items = _grid(grid_inputs)
    for rank in (0, 1):
        _run(tmp_path, select_items(items, ShardSpec(), rank, 2), part=rank)
    assert not (tmp_path / "paper" / "results.json").exists()
    consolidate(tmp_path, ["none", *PRESETS], SETTINGS, items=items)
    datas = ibench_consumes(tmp_path / "paper" / "results.json", tmp_path)
    assert [e["num"] for e in datas] == [0, 1, 2, 3] and not list((tmp_path / "paper").glob("results.part*"))


# ----------------------------------------------------------------------- older folders / resume


def _to_old_format(out: Path, items) -> None:
    """Rewrite a folder's results as spatialid 0.1 wrote them: num = grid unit, no imagewithoutid, ..."""
    unit = {it.key: it.unit for it in items}
    for path in out.glob("*/results.json"):
        doc = json.loads(path.read_text())
        for e in doc["datas"]:
            for k in ("imagewithoutid", "identity_index", "id_path"):
                e.pop(k)
            e["num"] = unit[e["key"]]
        doc["datas"].reverse()
        doc["tags"] = {k: v for k, v in doc["tags"].items() if k not in ("results_version", "paths")}
        doc = {"tags": doc["tags"], "datas": doc["datas"], "failures": doc["failures"]}
        path.write_text(json.dumps(doc))


def test_older_results_are_read_and_rewritten(grid_inputs, tmp_path):
    items = _grid(grid_inputs)
    _run(tmp_path / "ref", items)
    out = tmp_path / "old"
    _run(out, items)
    _to_old_format(out, items)
    assert pending_items(out, items) == []  # read: nothing to generate
    summary, gen = _run(out, items)
    assert gen.calls == [] and summary.already_done == len(items)
    for preset in ["none", *PRESETS]:
        got = json.loads((out / preset / "results.json").read_text())
        want = json.loads((tmp_path / "ref" / preset / "results.json").read_text())
        rel = lambda e: {**e, "imagewithid": Path(e["imagewithid"]).name, "imagewithoutid": Path(e["imagewithoutid"]).name}  # noqa: E731
        assert [rel(e) for e in got["datas"]] == [rel(e) for e in want["datas"]]
        assert got["tags"]["results_version"] == 2


def test_older_results_outside_this_grid_are_upgraded_by_consolidate(grid_inputs, tmp_path):
    items = _grid(grid_inputs)
    _run(tmp_path, items)
    _to_old_format(tmp_path, items)
    consolidate(tmp_path, ["none", *PRESETS], SETTINGS)  # no items: still numbered and linked
    datas = ibench_consumes(tmp_path / "pulid" / "results.json", tmp_path)
    assert [e["num"] for e in datas] == [0, 1, 2, 3]
    assert [e["key"] for e in datas] == sorted((it.key for it in items if it.preset == "pulid"),
                                                key=lambda k: next(it.unit for it in items if it.key == k))


def test_prompt_rendered_by_an_older_rule_is_generated_again(grid_inputs, tmp_path):
    """An image made from another text than today's rendering gives is not today's item."""
    from spatialid.app.metadata import read_png_metadata, save_png_with_metadata

    items = _grid(grid_inputs)
    _run(tmp_path, items)
    path = tmp_path / "paper" / "results.json"
    doc = json.loads(path.read_text())
    entry = doc["datas"][1]
    old_prompt = entry["prompt"] + " [older rendering]"
    entry["prompt"] = old_prompt
    path.write_text(json.dumps(doc))
    image = tmp_path / "paper" / entry["image"]
    with Image.open(image) as img:
        save_png_with_metadata(img.convert("RGB"), image, {**read_png_metadata(image), "prompt": old_prompt})
    assert [it.key for it in pending_items(tmp_path, items)] == [entry["key"]]
    summary, gen = _run(tmp_path, items)
    assert gen.calls == [entry["key"]] and summary.generated == 1
    assert json.loads(path.read_text())["datas"][1]["prompt"] == next(it.prompt_text for it in items if it.key == entry["key"])
    assert read_png_metadata(image)["prompt"] != old_prompt


def test_baseline_made_later_is_linked(grid_inputs, tmp_path):
    _run(tmp_path, _grid(grid_inputs, baseline=False))
    assert all("imagewithoutid" not in e for e in json.loads((tmp_path / "paper/results.json").read_text())["datas"])
    summary, gen = _run(tmp_path, _grid(grid_inputs))
    # presets not generated again; human_longer prompts do not depend on the gender, so the two
    # identities' baselines are one image per prompt (generated once, saved for both)
    assert all(k.endswith("/none") for k in gen.calls) and len(gen.calls) == 2 and summary.reused == 2
    ibench_consumes(tmp_path / "paper" / "results.json", tmp_path)


def test_results_not_written_by_the_bench_are_refused(grid_inputs, tmp_path):
    (tmp_path / "pulid").mkdir()
    authors = {"datas": [{"num": 0, "id": "/x/1.jpg", "prompt": "p", "prompt_attr": ["long"],
                          "prompt_style": ["human_longer"], "imagewithid": "/x/out.png"}], "tags": {"category": "imageid"}}
    (tmp_path / "pulid" / "results.json").write_text(json.dumps(authors))
    with pytest.raises(BenchStateError, match=r"entry 0 has no bench \"key\".*move that file out") as err:
        _run(tmp_path, _grid(grid_inputs))
    assert "\n" not in str(err.value)
    with pytest.raises(BenchStateError, match="not written by spatialid bench"):
        PresetResults(tmp_path, "pulid", tags={})
