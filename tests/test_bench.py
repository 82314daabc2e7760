"""Bench mechanics with a model-free generator: inputs, grid, resume, failures, shards, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spatialid.bench.datasets import (
    BenchInputError,
    identity_key,
    load_identities,
    load_prompts,
    person_word,
    render_prompt,
)
from spatialid.bench.grid import (
    BASELINE_PRESET,
    ShardSpec,
    build_grid,
    parse_presets,
    parse_seeds,
    parse_shard,
    select_items,
)
from spatialid.bench.merge import merge_runs
from spatialid.bench.results import (
    BenchStateError,
    PresetResults,
    load_manifest,
    load_preset_results,
    update_manifest,
)
from spatialid.bench.runner import BenchSettings, EmbeddingCache, pending_items, run_bench
from spatialid.bench.samples import HashGenerator, hash_encoder, write_sample_inputs
from spatialid.errors import FaceNotFoundError, SpatialIDError

SETTINGS = BenchSettings(model="fake", steps=2, width=32, height=32)
PRESETS = ["pulid", "paper"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    ids_json, prompts_json = write_sample_inputs(root)
    identities = load_identities(ids_json)
    prompts = load_prompts(prompts_json, limit=2)
    return root, identities, prompts


def _grid(inputs, presets=PRESETS, seeds=(42,), baseline=True):
    _, identities, prompts = inputs
    return build_grid(identities, prompts, presets, list(seeds), baseline=baseline)


def _run(out, items, gen=None, encode=hash_encoder, part=None, settings=SETTINGS):
    gen = gen or HashGenerator()
    summary = run_bench(items, out, settings=settings, generate_fn=gen, encode_fn=encode, progress=False, part=part)
    return summary, gen


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    """key -> (num, image bytes) over every preset of a bench folder."""
    snap = {}
    for preset_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "embeddings"):
        entries, _ = load_preset_results(preset_dir)
        for key, e in entries.items():
            assert key not in snap
            snap[key] = (e["num"], (preset_dir / e["image"]).read_bytes())
    return snap


# ------------------------------------------------------------------------------------ inputs


def test_render_prompt_person_and_brackets():
    assert person_word("female") == "woman" and person_word("Male") == "man" and person_word("") == "person"
    t = "portrait of a {person} in a red jacket , city street [scene] [long]"
    assert render_prompt(t, "female") == "portrait of a woman in a red jacket, city street"
    assert render_prompt(t, "male") == "portrait of a man in a red jacket, city street"
    assert render_prompt(t, "nonbinary") == "portrait of a person in a red jacket, city street"
    assert render_prompt("[only a note]", "male") == ""


def test_load_ibench_inputs(inputs):
    root, identities, prompts = inputs
    assert [i.gender for i in identities] == ["female", "male"]
    assert identities[0].path == (root / "photos" / "astronaut.png").resolve()
    assert identities[0].id == "photos/astronaut.png"  # verbatim, as IBench's results use it
    assert identities[0].key.startswith("astronaut-") and identities[0].key != identities[1].key
    assert [p.index for p in prompts] == [0, 1]
    assert prompts[0].prompt_attr == ("clothing", "scene")
    assert prompts[1].render("male") == "a man reading a book in a library, oil painting"


def test_identity_paths_relocated_with_id_root(tmp_path):
    photos = tmp_path / "checkout" / "data" / "images"
    photos.mkdir(parents=True)
    (photos / "p1.jpg").write_bytes(b"x")
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"datas": [{"id": "/old/machine/IBench/data/images/p1.jpg", "gender": "male"}]}))
    with pytest.raises(BenchInputError, match=r"1 of 1 identity photos not found.*--id-root"):
        load_identities(ids)
    (ident,) = load_identities(ids, id_root=tmp_path / "checkout")
    assert ident.path == (photos / "p1.jpg").resolve() and ident.id == "/old/machine/IBench/data/images/p1.jpg"
    assert ident.key == identity_key("/old/machine/IBench/data/images/p1.jpg")


def test_identity_folder_and_single_photo(inputs):
    root, _, _ = inputs
    folder = load_identities(root / "photos")
    assert [i.path.name for i in folder] == ["astronaut.png", "astronaut_mirror.png"]
    assert all(i.gender == "" for i in folder)
    single = load_identities(root / "photos" / "astronaut.png")
    assert single[0].key == folder[0].key  # key from the file name: same whatever the path spelling


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"datas": []}', "lists no entries"),
        ('{"items": []}', "IBench format"),
        ('{"datas": [{"gender": "male"}]}', 'has no "id"'),
    ],
)
def test_bad_identity_files(tmp_path, content, message):
    path = tmp_path / "ids.json"
    path.write_text(content)
    with pytest.raises(BenchInputError, match=message):
        load_identities(path)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(BenchInputError, match="does not exist"):
        load_identities(tmp_path / "nope.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchInputError, match="holds no photo"):
        load_identities(tmp_path / "empty")
    with pytest.raises(BenchInputError, match="unsupported file type"):
        (tmp_path / "ids.csv").write_text("a")
        load_identities(tmp_path / "ids.csv")
    txt = tmp_path / "p.txt"
    txt.write_text("# comment only\n\n")
    with pytest.raises(BenchInputError, match="holds no prompt"):
        load_prompts(txt)
    with pytest.raises(BenchInputError, match="does not exist"):
        load_prompts(tmp_path / "none.txt")


def test_text_prompts_and_limit(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# my prompts\nportrait of a {person}\n\n  a {person} on a beach [note]  \nthird\n")
    prompts = load_prompts(txt)
    assert [p.template for p in prompts] == ["portrait of a {person}", "a {person} on a beach [note]", "third"]
    assert [p.index for p in prompts] == [0, 1, 2]
    assert len(load_prompts(txt, limit=2)) == 2


# -------------------------------------------------------------------------------------- grid


def test_parse_options():
    assert parse_seeds("42, 43,42") == [42, 43]
    assert parse_seeds("1-3") == [1, 2, 3]
    assert parse_presets("Pulid, paper,,prior_only", known=["pulid", "paper", "prior-only"]) == ["pulid", "paper", "prior-only"]
    assert parse_presets("none") == ["none"]
    assert parse_shard("2/4") == ShardSpec(2, 4) and parse_shard(None) == ShardSpec(1, 1)
    for bad in ("0/2", "3/2", "1/0", "a/b", "1"):
        with pytest.raises(BenchInputError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(BenchInputError, match="unknown preset 'bogus'"):
        parse_presets("paper,bogus", known=["paper"])
    with pytest.raises(BenchInputError, match="seeds must look like"):
        parse_seeds("x")
    with pytest.raises(BenchInputError, match="no seed"):
        parse_seeds(" , ")


def test_grid_keys_units_and_splits(inputs):
    items = _grid(inputs, seeds=(42, 7))
    # 2 identities x 2 prompts x 2 seeds = 8 units, each with baseline + 2 presets
    assert len(items) == 24 and len({it.key for it in items}) == 24
    assert {it.unit for it in items} == set(range(8))
    assert [it.preset for it in items[:3]] == [BASELINE_PRESET, "pulid", "paper"]
    assert items[1].key == f"{items[1].identity.key}/p000/s42/pulid"
    # shards partition the grid and never split a unit
    parts = [select_items(items, ShardSpec(k, 3)) for k in (1, 2, 3)]
    assert sorted(it.key for p in parts for it in p) == sorted(it.key for it in items)
    for p in parts:
        units = {it.unit for it in p}
        assert all(sum(1 for it in p if it.unit == u) == 3 for u in units)
    # processes of one machine partition a shard
    shard = select_items(items, ShardSpec(1, 2))
    procs = [select_items(items, ShardSpec(1, 2), r, 2) for r in (0, 1)]
    assert sorted(it.key for p in procs for it in p) == sorted(it.key for it in shard)
    assert not {it.key for it in procs[0]} & {it.key for it in procs[1]}
    assert len(_grid(inputs, baseline=False)) == 8


# --------------------------------------------------------------------------------- run / resume


def test_full_run_writes_ibench_results(inputs, tmp_path):
    items = _grid(inputs)
    encodes = []

    def encode(photo):
        encodes.append(photo)
        return hash_encoder(photo)

    summary, gen = _run(tmp_path, items, encode=encode)
    assert summary.generated + summary.reused == 12 and summary.failed == 0 and not summary.interrupted
    # baselines: both identities differ in gender, so 4 distinct (prompt, seed) baselines -> none shared
    assert len(gen.calls) == 12
    assert len(encodes) == 2  # once per photo
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 2
    for preset in ["none", *PRESETS]:
        doc = json.loads((tmp_path / preset / "results.json").read_text())
        assert doc["tags"]["category"] == "imageid" and doc["tags"]["preset"] == preset
        assert len(doc["datas"]) == 4 and doc["failures"] == []
        e = doc["datas"][0]
        assert set(e) >= {"num", "id", "prompt", "prompt_attr", "prompt_style", "imagewithid"}
        assert Path(e["imagewithid"]).is_absolute() and Path(e["imagewithid"]).is_file()
        assert [d["num"] for d in doc["datas"]] == [0, 1, 2, 3]
        assert e["prompt"] == "portrait of a woman in a red jacket, city street at night"
    # image metadata names the item
    from spatialid.pipeline.metadata import read_png_metadata

    meta = read_png_metadata(tmp_path / "paper" / "images" / items[2].image_name)
    assert meta["bench_key"] == items[2].key and meta["preset"] == "paper" and meta["seed"] == 42

    # a second run does nothing and encodes nothing
    encodes.clear()
    again, gen2 = _run(tmp_path, items, encode=encode)
    assert again.already_done == 12 and gen2.calls == [] and encodes == []
    assert pending_items(tmp_path, items) == []


def test_embedding_cache_survives_processes(inputs, tmp_path):
    _, identities, _ = inputs
    calls = []
    enc = lambda p: calls.append(p) or hash_encoder(p)  # noqa: E731
    first = EmbeddingCache(tmp_path, enc, encoder_name="m1")
    a = first.get(identities[0])
    second = EmbeddingCache(tmp_path, enc, encoder_name="m1")
    b = second.get(identities[0])
    assert len(calls) == 1 and second.loaded == 1 and (a == b).all()
    EmbeddingCache(tmp_path, enc, encoder_name="m2").get(identities[0])  # another encoder: new entry
    assert len(calls) == 2


def test_interrupt_and_resume_without_duplicates_or_loss(inputs, tmp_path):
    items = _grid(inputs)
    reference_dir = tmp_path / "ref"
    _run(reference_dir, items)
    reference = _snapshot(reference_dir)

    out = tmp_path / "run"
    gen = HashGenerator()
    k = 5

    def flaky(item, emb):
        if len(gen.calls) == k:
            raise KeyboardInterrupt
        return gen(item, emb)

    with pytest.raises(KeyboardInterrupt):
        run_bench(items, out, settings=SETTINGS, generate_fn=flaky, encode_fn=hash_encoder, progress=False)
    assert sum(len(load_preset_results(out / p)[0]) for p in ["none", *PRESETS]) == k
    assert not list(out.rglob("*.part"))  # no temporary file left behind
    summary, gen2 = _run(out, items)
    assert summary.already_done == k and len(gen2.calls) == 12 - k
    assert _snapshot(out) == reference  # same keys, same nums, identical bytes


def test_image_written_but_json_not_is_adopted(inputs, tmp_path):
    items = _grid(inputs)
    _run(tmp_path, items)
    # simulate a kill between the image write and the JSON write for one item
    path = tmp_path / "paper" / "results.json"
    doc = json.loads(path.read_text())
    doc["datas"] = doc["datas"][1:]
    path.write_text(json.dumps(doc))
    summary, gen = _run(tmp_path, items)
    assert gen.calls == [] and summary.reused == 1
    assert len(load_preset_results(tmp_path / "paper")[0]) == 4


def test_failures_recorded_run_continues_and_retry(inputs, tmp_path):
    items = _grid(inputs)
    bad = items[4].key  # one item of the second unit
    gen = HashGenerator()

    def sometimes(item, emb):
        if item.key == bad:
            raise RuntimeError("CUDA out of memory (simulated)")
        return gen(item, emb)

    summary = run_bench(items, tmp_path, settings=SETTINGS, generate_fn=sometimes, encode_fn=hash_encoder, progress=False)
    assert summary.failed == 1 and summary.generated == 11
    preset = items[4].preset
    doc = json.loads((tmp_path / preset / "results.json").read_text())
    assert doc["failures"][0]["key"] == bad and "out of memory" in doc["failures"][0]["error"]
    summary2, gen2 = _run(tmp_path, items)
    assert gen2.calls == [bad] and summary2.failed == 0
    assert json.loads((tmp_path / preset / "results.json").read_text())["failures"] == []


def test_encoder_failure_fails_identity_items_once(inputs, tmp_path):
    items = _grid(inputs)
    calls = []

    def encode(photo):
        calls.append(photo)
        if "mirror" in str(photo):
            raise FaceNotFoundError(f"{photo}: no face found")
        return hash_encoder(photo)

    summary, _ = _run(tmp_path, items, encode=encode)
    assert summary.failed == 4  # 2 prompts x 2 presets of the mirrored identity; its baselines are fine
    assert len(calls) == 2  # the failing photo is not re-encoded for every item
    fails = load_preset_results(tmp_path / "paper")[1]
    assert all("no face found" in f["error"] for f in fails.values())


def test_shared_baselines_are_generated_once(inputs, tmp_path):
    _, identities, prompts = inputs
    same_gender = [identities[0], type(identities[1])(identities[1].key, identities[1].id, identities[1].path, "female")]
    items = build_grid(same_gender, prompts, ["paper"], [42])
    summary, gen = _run(tmp_path, items)
    baseline_calls = [k for k in gen.calls if k.endswith("/none")]
    assert len(baseline_calls) == 2 and summary.reused == 2  # 2 prompts; 2nd identity re-saves them
    a = load_preset_results(tmp_path / "none")[0]
    assert len(a) == 4


def test_shards_merge_to_the_single_run(inputs, tmp_path):
    items = _grid(inputs, seeds=(42, 43))
    single = tmp_path / "single"
    _run(single, items)
    _, identities, prompts = inputs
    shard_dirs = []
    for k in (1, 2):
        d = tmp_path / f"shard{k}"
        update_manifest(d, settings=SETTINGS.to_dict(), identities=identities, prompts=prompts, presets=PRESETS, seeds=[42, 43], baseline=True)
        _run(d, select_items(items, ShardSpec(k, 2)))
        shard_dirs.append(d)
    update_manifest(single, settings=SETTINGS.to_dict(), identities=identities, prompts=prompts, presets=PRESETS, seeds=[42, 43], baseline=True)
    merged = tmp_path / "merged"
    summary = merge_runs(shard_dirs, merged)
    assert sum(summary.presets.values()) == len(items) and not summary.conflicts
    assert _snapshot(merged) == _snapshot(single)
    # merged entries point at the merged copies
    doc = json.loads((merged / "paper" / "results.json").read_text())
    assert all(Path(e["imagewithid"]).parent == (merged / "paper" / "images").resolve() for e in doc["datas"])
    assert load_manifest(merged)["seeds"] == [42, 43]
    # merging again (into one of the sources) is idempotent
    merge_runs([shard_dirs[1]], shard_dirs[0])
    assert _snapshot(shard_dirs[0]) == _snapshot(single)


def test_merge_refuses_other_settings(inputs, tmp_path):
    _, identities, prompts = inputs
    for name, steps in (("a", 2), ("b", 3)):
        s = BenchSettings(model="fake", steps=steps, width=32, height=32)
        update_manifest(tmp_path / name, settings=s.to_dict(), identities=identities, prompts=prompts, presets=PRESETS, seeds=[42], baseline=True)
    with pytest.raises(BenchStateError, match=r"different settings \(steps: 2 -> 3\)"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(BenchStateError, match="no bench.json"):
        (tmp_path / "c").mkdir()
        merge_runs([tmp_path / "c"], tmp_path / "m")


def test_manifest_guards_resume(inputs, tmp_path):
    _, identities, prompts = inputs
    kw = dict(identities=identities, prompts=prompts, presets=PRESETS, seeds=[42], baseline=True)
    update_manifest(tmp_path, settings=SETTINGS.to_dict(), **kw)
    # extending the grid is fine
    doc = update_manifest(tmp_path, settings=SETTINGS.to_dict(), **{**kw, "presets": ["relaxed"], "seeds": [1]})
    assert doc["presets"] == [*PRESETS, "relaxed"] and doc["seeds"] == [42, 1]
    other = BenchSettings(model="fake", steps=9, width=32, height=32)
    # no image yet (e.g. the model failed to load): the settings may still change
    assert update_manifest(tmp_path, settings=other.to_dict(), **kw, write=False)["settings"]["steps"] == 9
    _run(tmp_path, _grid(inputs)[:1])
    with pytest.raises(BenchStateError, match="other settings.*steps: 2 -> 9.*new --out"):
        update_manifest(tmp_path, settings=other.to_dict(), **kw)
    changed = [type(prompts[0])(0, "something else")]
    with pytest.raises(BenchStateError, match="prompts file changed"):
        update_manifest(tmp_path, settings=SETTINGS.to_dict(), **{**kw, "prompts": changed})
    assert isinstance(BenchStateError("x"), SpatialIDError)


def test_damaged_results_file_is_reported(inputs, tmp_path):
    items = _grid(inputs)
    _run(tmp_path, items[:3])
    (tmp_path / "paper" / "results.json").write_text('{"datas": [')
    with pytest.raises(BenchStateError, match="not valid JSON"):
        _run(tmp_path, items)


def test_process_parts_are_consolidated(inputs, tmp_path):
    items = _grid(inputs, seeds=(42, 43))
    for rank in (0, 1):
        _run(tmp_path, select_items(items, ShardSpec(), rank, 2), part=rank)
    assert (tmp_path / "paper" / "results.part0.json").is_file()
    assert not (tmp_path / "paper" / "results.json").exists()
    assert len(load_preset_results(tmp_path / "paper")[0]) == 8  # readers see the union already
    # a later single-process run adopts the parts into results.json and has nothing to generate
    summary, gen = _run(tmp_path, items)
    assert gen.calls == [] and summary.already_done == len(items)
    assert not list((tmp_path / "paper").glob("results.part*.json"))
    assert len(json.loads((tmp_path / "paper" / "results.json").read_text())["datas"]) == 8


def test_generate_fn_must_return_an_image(inputs, tmp_path):
    items = _grid(inputs)[:2]
    summary = run_bench(items, tmp_path, settings=SETTINGS, generate_fn=lambda it, e: None, encode_fn=hash_encoder, progress=False)
    assert summary.failed == 2
    assert "expected a PIL image" in PresetResults(tmp_path, "none", tags={}).failures[items[0].key]["error"]


def test_process_split_from_accelerate_or_launcher_env(monkeypatch):
    import accelerate

    from spatialid.bench.grid import ProcessInfo, process_split

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_split() == ProcessInfo(0, 1, None, False)

    class FakeState:
        def __init__(self, index, count, device):
            self.process_index, self.num_processes, self.device = index, count, device

    import torch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(accelerate, "PartialState", lambda: FakeState(1, 2, torch.device("cuda", 1)))
    assert process_split() == ProcessInfo(1, 2, "cuda:1", True)
    # launcher set WORLD_SIZE but accelerate made no process group (e.g. CPU processes): use the env
    monkeypatch.setattr(accelerate, "PartialState", lambda: FakeState(0, 1, torch.device("cpu")))
    assert process_split() == ProcessInfo(1, 2, None, False)
