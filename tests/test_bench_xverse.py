"""XVerseBench and MultiHuman-Testbench files as bench inputs (`bench --ids`), in their real formats.

The fixtures below are written in the formats of ``bytedance/XVerse``'s ``eval/tools/XVerseBench_*.json``
and ``Qualcomm-AI-research/MultiHuman-Testbench``'s ``data/multihuman_metadata.json`` (field for
field, a few items), with the shared astronaut photos standing in for the faces.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from spatialid.bench.datasets import BenchInputError
from spatialid.bench.datasets_multi import MULTIHUMAN, XVERSE, ids_format, load_bench_inputs
from spatialid.bench.grid import build_grid

pytestmark = pytest.mark.usefixtures("one_thread")

FACES = ("astronaut.png", "mirrored.png")  # conftest's photo_dir


def _xverse_entry(index: int, prompt: str, inputs: list[tuple[str, str]], use_words: list[list]) -> dict:
    """One item as XVerseBench_multi.json writes it (keys, nesting and constants of the real file)."""
    return {
        "index": index,
        "input_images": [],
        "position_delta": [0, -32],
        "prompt": prompt,
        "modulation": [{
            "type": "adapter",
            "src_inputs": [{"image_path": path, "caption": caption} for path, caption in inputs],
            "use_words": use_words,
        }],
    }


def _faces(photo_dir: Path, bench_inputs: tuple[Path, Path, Path], folder: Path, names: list[str]) -> None:
    """Three different face photos saved as JPEGs under ``folder`` with the benchmark's names."""
    sources = [photo_dir / FACES[0], photo_dir / FACES[1], bench_inputs[0] / "photos" / "astronaut_mirror.png"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in zip(names, sources):
        Image.open(src).convert("RGB").save(folder / name, quality=90)


@pytest.fixture()
def xverse(photo_dir: Path, bench_inputs: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A miniature XVerse checkout: ``(checkout root, eval/tools/XVerseBench_multi.json)``; objects'
    photos are absent, as in the real repository."""
    root = tmp_path / "XVerse"
    human = "assets/XVerseBench/human"
    _faces(photo_dir, bench_inputs, root / human, ["05_man.jpg", "11_man.jpg", "15_woman.jpg"])
    items = [
        _xverse_entry(0, "A man is riding a motorcycle.",
                      [(f"{human}/05_man.jpg", "a man"), ("assets/XVerseBench/object/00_motorcycle.jpg", "a motorcycle")],
                      [[0, "man", "man"], [1, "motorcycle", "motorcycle"]]),
        _xverse_entry(1, "A dog and a cat play on the grass.",
                      [("assets/XVerseBench/animal/00_dog.jpg", "a dog"), ("assets/XVerseBench/animal/01_cat.jpg", "a cat")],
                      [[0, "dog", "dog"], [1, "cat", "cat"]]),
        _xverse_entry(2, "A man is standing beside another man.",
                      [(f"{human}/05_man.jpg", "a man"), (f"{human}/11_man.jpg", "a man")],
                      [[0, "man", "man"], [1, "man", "man", 2]]),
        _xverse_entry(3, "A man, a man, and a woman are standing in a park chatting.",
                      [(f"{human}/05_man.jpg", "a man"), (f"{human}/11_man.jpg", "a man"), (f"{human}/15_woman.jpg", "a woman")],
                      [[0, "man", "man"], [1, "man", "man", 2], [2, "woman", "woman"]]),
    ]
    path = root / "eval" / "tools" / "XVerseBench_multi.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(items), encoding="utf-8")
    return root, path


def _mh_entry(faces: list[str], prompt: str, identifiers: list[str]) -> dict:
    """One sample as multihuman_metadata.json writes it (every key of the real file)."""
    refs = " ".join(f"The person is <img><|image_{i + 1}|></img>." for i in range(len(faces)))
    return {
        "people": faces,
        "prompt": prompt,
        "attributes": [[3, 2, 1] for _ in faces],
        "omnigen_prompt": f"{prompt} {refs}",
        "identifier": identifiers,
        "vlm_questions": ["are the people in this image sprinting in a race? Choices: 0(No), 9(Yes), 4(Partially)."],
        "pose_image": "data/poses/0.png",
        "omnigen_pose_prompt": f"{prompt} {refs}. Their pose is <img><|image_1|></img>.",
    }


@pytest.fixture()
def multihuman(photo_dir: Path, bench_inputs: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A miniature MultiHuman-Testbench checkout: ``(root, data/multihuman_metadata.json)``, faces in data/faces/."""
    root = tmp_path / "MultiHuman-Testbench"
    names = ["ffhq_3075.jpg", "sfhq_34189.jpg", "celeba_hq_1057.jpg"]
    _faces(photo_dir, bench_inputs, root / "data" / "faces", names)
    f = [f"data/faces/{n}" for n in names]
    samples = [
        _mh_entry([f[0]], "A person seated at a table in a grand library reading a book. Ultra-Realistic. 8K.", ["woman"]),
        _mh_entry(f, "Three athletes sprinting in a race. Portrait picture. Ultra-Realistic. 8K.", ["woman", "man", "man"]),
        _mh_entry([*f, "data/faces/ffhq_1.jpg", "data/faces/ffhq_2.jpg"], "Five friends at a picnic. Ultra-Realistic. 8K.",
                  ["man", "man", "woman", "woman", "man"]),
    ]
    path = root / "data" / "multihuman_metadata.json"
    path.write_text(json.dumps(samples), encoding="utf-8")
    return root, path


# ----------------------------------------------------------------------------------- reading


def test_xverse_people_keep_their_words_objects_are_not_used(xverse: tuple[Path, Path]) -> None:
    root, path = xverse
    assert ids_format(path) == XVERSE
    inputs = load_bench_inputs(path, id_root=root)
    one, two, three = inputs.identities
    # the item without a person (dog and cat) is skipped; the others keep the file's indices
    assert [p.index for p in inputs.prompts] == [0, 2, 3] == [i.index for i in inputs.identities]
    assert inputs.prompts[1].template == "A man is standing beside another man."
    assert not one.is_group and one.words == "man" and one.gender == "male"
    assert one.not_used == ("assets/XVerseBench/object/00_motorcycle.jpg",) and one.prompt_ids == (0,)
    assert [(m.words, m.occurrence) for m in two.members] == [("man", 1), ("man", 2)]
    assert [m.path.name for m in three.members] == ["05_man.jpg", "11_man.jpg", "15_woman.jpg"]
    assert inputs.note == (
        "XVerseBench: 3 items used (1 with 1 person, 1 with 2 people, 1 with 3 people); 1 item without a person "
        "skipped; 1 object/animal input of the items used not used (identity photos only)"
    )
    # one identity per item, each with its own prompt: 3 units, not 3 x 3
    items = build_grid(inputs.identities, inputs.prompts, ["paper"], [1], baseline=False)
    assert [(it.identity.index, it.prompt.index) for it in items] == [(0, 0), (2, 2), (3, 3)]
    assert items[1].people_words == (("man", 1), ("man", 2)) and items[0].people_words == (("man", 1),)
    assert items[2].identity.to_dict()["people"][1]["occurrence"] == 2
    # --prompt-ids selects items by their index; --limit-ids keeps the first N of those
    picked = load_bench_inputs(path, id_root=root, prompt_ids=[2, 3], limit_ids=1)
    assert [i.index for i in picked.identities] == [2] and picked.counts == {2: 1}


def test_multihuman_samples_are_groups_of_their_faces(multihuman: tuple[Path, Path]) -> None:
    root, path = multihuman
    assert ids_format(path) == MULTIHUMAN
    inputs = load_bench_inputs(path, id_root=root)
    single, group = inputs.identities
    assert single.gender == "female" and single.words is None and single.path.name == "ffhq_3075.jpg"
    assert [m.gender for m in group.members] == ["female", "male", "male"] and group.prompt_ids == (1,)
    assert inputs.counts == {1: 1, 3: 1}
    assert "1 item with more than 4 people skipped" in inputs.note
    # the faces folder itself as --id-root finds them too (trailing parts of data/faces/x.jpg)
    assert len(load_bench_inputs(path, id_root=root / "data" / "faces").identities) == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d[2]["modulation"][0]["src_inputs"][1].update(image_path="assets/XVerseBench/human/99_man.jpg"),
         "1 face photo of XVerseBench file .* not found under --id-root .* \\(first: assets/XVerseBench/human/99_man.jpg\\)"),
        (lambda d: d[2].pop("prompt"), 'item 2 has no "prompt" text'),
        (lambda d: d[2]["modulation"][0]["use_words"].append([7, "man", "man"]), '"use_words" entry is \\[input'),
        (lambda d: d[2]["modulation"][0]["src_inputs"][1].update(image_path="assets/XVerseBench/human/05_man.jpg"),
         "same photo twice"),
    ],
)
def test_bad_xverse_file_is_one_line(xverse: tuple[Path, Path], change, message: str) -> None:
    root, path = xverse
    doc = json.loads(path.read_text(encoding="utf-8"))
    change(doc)
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(BenchInputError, match=message) as err:
        load_bench_inputs(path, id_root=root)
    assert "\n" not in str(err.value)


def test_unknown_formats_and_prompts_mixups_are_one_line(xverse: tuple[Path, Path], bench_inputs, tmp_path: Path) -> None:
    root, path = xverse
    _, ibench_ids, ibench_prompts = bench_inputs
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"samples": [1, 2]}), encoding="utf-8")
    cases = [
        (lambda: load_bench_inputs(odd, ibench_prompts), "unknown format; give an IBench identities"),
        (lambda: load_bench_inputs(path, ibench_prompts, id_root=root), "leave out --prompts"),
        (lambda: load_bench_inputs(ibench_ids), "--prompts is required"),
        (lambda: load_bench_inputs(path, id_root=root, prompt_ids=[9]), "--prompt-ids 9: XVerseBench file .* has 4 items"),
        (lambda: load_bench_inputs(path, id_root=root, prompt_ids=[1]), "no item with 1 to 4 people"),
    ]
    for call, message in cases:
        with pytest.raises(BenchInputError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    # the same file given as --prompts too is accepted
    assert len(load_bench_inputs(path, path, id_root=root).identities) == 3


def test_multihuman_missing_faces_name_the_download(multihuman: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = multihuman
    with pytest.raises(BenchInputError, match="4 face photos of MultiHuman-Testbench .* download_faces.py") as err:
        load_bench_inputs(path, id_root=tmp_path / "elsewhere")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------- bench runs


def test_bench_cli_tiny_over_xverse_then_eval_grid(xverse: tuple[Path, Path], tmp_path: Path, caplog) -> None:
    """`spatialid bench --ids XVerseBench_multi.json --id-root XVerse --model tiny`: 1 and 3 people end to end."""
    from spatialid.bench.results import load_manifest, load_preset_results
    from spatialid.cli.main import main
    from spatialid.evaluation.evaluate import expected_units

    root, path = xverse
    out = tmp_path / "bench"
    caplog.set_level("INFO", logger="spatialid.bench")
    code = main(["bench", "--model", "tiny", "--ids", str(path), "--id-root", str(root), "--prompt-ids", "0,3",
                 "--presets", "paper", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    assert "XVerseBench: 2 items used (1 with 1 person, 1 with 3 people)" in caplog.text
    assert "2 identity-prompt pairs x 1 seed x 1 preset + baseline = 4 items" in caplog.text
    entries, failures = load_preset_results(out / "paper")
    assert not failures
    by_prompt = {e["prompt"]: e for e in entries.values()}
    assert set(by_prompt) == {"A man is riding a motorcycle.", "A man, a man, and a woman are standing in a park chatting."}
    three = by_prompt["A man, a man, and a woman are standing in a park chatting."]
    assert len(three["people"]) == 3 and three["prompt_index"] == 3
    manifest = load_manifest(out)
    words = [[p.get("words") for p in i.get("people", [i])] for i in manifest["identities"].values()]
    assert sorted(words) == [["man"], ["man", "man", "woman"]]
    # eval's expected grid is exactly what was generated: each item with its own prompt
    assert sorted(expected_units(manifest)) == sorted(e["key"].rsplit("/", 1)[0] for e in entries.values())


def test_bench_cli_missing_photo_is_exit_2_before_any_model(xverse: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    from spatialid.cli import cmd_bench
    from spatialid.cli.main import main

    root, path = xverse
    (root / "assets/XVerseBench/human/15_woman.jpg").unlink()
    monkeypatch.setattr(cmd_bench, "_build_generator", lambda *a, **k: pytest.fail("the model must not load"))
    code = main(["bench", "--model", "tiny", "--ids", str(path), "--id-root", str(root), "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spatialid: error:")]
    assert code == 2 and len(err) == 1 and "15_woman.jpg" in err[0] and "--id-root" in err[0], err


def test_bench_over_multihuman_one_embedding_per_face(multihuman: tuple[Path, Path], tmp_path: Path) -> None:
    from spatialid.bench.results import load_preset_results
    from spatialid.bench.runner import BenchSettings, run_bench
    from spatialid.bench.samples import HashGenerator, hash_encoder
    from spatialid.pipeline.settings import GenerationSettings

    root, path = multihuman
    inputs = load_bench_inputs(path, id_root=root)
    items = build_grid(inputs.identities, inputs.prompts, ["paper"], [3])
    settings = BenchSettings(model="fake", generation=GenerationSettings(steps=2, width=32, height=32))
    seen: list[int] = []

    def generate(item, embedding):  # type: ignore[no-untyped-def]
        if not item.is_baseline:
            seen.append(len(embedding) if isinstance(embedding, list) else 1)
        return HashGenerator()(item, embedding)

    summary = run_bench(items, tmp_path / "run", settings=settings, generate_fn=generate, encode_fn=hash_encoder, progress=False)
    assert summary.failed == 0
    assert sorted(seen) == [1, 3]
    entries, _ = load_preset_results(tmp_path / "run" / "paper")
    assert sorted(len(e.get("people", [e["id"]])) for e in entries.values()) == [1, 3]
