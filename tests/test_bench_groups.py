"""Several people per image in the bench: groups files, grid, embeddings, results and eval's grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spatialid.bench.datasets import BenchInputError, load_identities, load_prompts
from spatialid.bench.grid import build_grid
from spatialid.bench.results import load_preset_results, update_manifest
from spatialid.bench.runner import BenchSettings, run_bench
from spatialid.bench.samples import HashGenerator, hash_encoder
from spatialid.evaluation.evaluate import expected_units
from spatialid.pipeline.settings import GenerationSettings

SETTINGS = BenchSettings(model="fake", generation=GenerationSettings(steps=2, width=32, height=32))


@pytest.fixture()
def groups(bench_inputs: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A groups file next to a copy of the shared sample inputs (conftest's ``bench_inputs``), which tests change."""
    root, _, shared_prompts = bench_inputs
    shutil.copytree(root / "photos", tmp_path / "photos")
    prompts = Path(shutil.copy(shared_prompts, tmp_path / shared_prompts.name))
    doc = {
        "groups": [
            ["photos/astronaut.png", "photos/astronaut_mirror.png"],
            {
                "people": [{"id": "photos/astronaut_mirror.png", "gender": "male"}, "photos/astronaut.png"],
                "regions": [[0.0, 0.0, 0.5, 1.0], None],
                "prompt_ids": [1],
            },
        ]
    }
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path, prompts


def test_groups_file_gives_group_identities(groups: tuple[Path, Path]) -> None:
    path, _ = groups
    idents = load_identities(path)
    assert [i.is_group for i in idents] == [True, True]
    first, second = idents
    assert [m.path.name for m in first.members] == ["astronaut.png", "astronaut_mirror.png"]
    assert first.id == "photos/astronaut.png + photos/astronaut_mirror.png"
    assert first.key != second.key and first.key.startswith("group-")
    assert second.regions == ((0.0, 0.0, 0.5, 1.0), None) and second.prompt_ids == (1,)
    assert second.members[0].gender == "male"


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"groups": [["photos/astronaut.png"]]}, "2 to 4"),
        ({"groups": [["photos/astronaut.png", "photos/astronaut.png"]]}, "same photo twice"),
        ({"groups": [["photos/astronaut.png", "photos/nobody.png"]]}, "not found"),
        ({"groups": [{"people": ["photos/astronaut.png", "photos/astronaut_mirror.png"], "regions": [[0, 0, 2, 1], None]}]}, "0 <= x0 < x1 <= 1"),
        ({"groups": [{"people": ["photos/astronaut.png", "photos/astronaut_mirror.png"], "regions": [None]}]}, "one region"),
        ({"groups": []}, "non-empty list"),
    ],
)
def test_bad_groups_are_one_line(groups: tuple[Path, Path], doc: dict, message: str) -> None:
    path, _ = groups
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(BenchInputError, match=message) as err:
        load_identities(path)
    assert "\n" not in str(err.value)


def test_group_run_passes_one_embedding_per_person_and_records_people(groups: tuple[Path, Path], tmp_path: Path) -> None:
    path, prompts_path = groups
    idents = load_identities(path)
    prompts = load_prompts(prompts_path, limit=2)
    items = build_grid(idents, prompts, ["paper"], [7])
    # group 0 x 2 prompts + group 1 x prompt 1 only, each with a baseline
    assert len({it.unit for it in items}) == 3
    seen: list[int] = []

    class Recording(HashGenerator):
        def __call__(self, item, embedding):  # type: ignore[no-untyped-def]
            if not item.is_baseline:
                assert isinstance(embedding, list)
                seen.append(len(embedding))
            return super().__call__(item, embedding)

    out = tmp_path / "run"
    summary = run_bench(items, out, settings=SETTINGS, generate_fn=Recording(), encode_fn=hash_encoder, progress=False)
    assert summary.failed == 0 and seen == [2, 2, 2]
    entries, _ = load_preset_results(out / "paper")
    people = sorted(tuple(e["people"]) for e in entries.values())
    assert people[0] == ("photos/astronaut.png", "photos/astronaut_mirror.png")
    assert all(len(e["people_paths"]) == 2 and Path(e["people_paths"][0]).is_file() for e in entries.values())
    update_manifest(out, settings=SETTINGS.to_dict(), identities=idents, prompts=prompts, presets=["paper"], seeds=[7],
                    baseline=True, paths="absolute", inputs={"ids": str(path)})
    manifest = json.loads((out / "bench.json").read_text())
    assert sorted(expected_units(manifest)) == sorted({it.unit_key for it in items})


def test_eval_scores_each_person_of_a_group(groups: tuple[Path, Path], tmp_path: Path) -> None:
    """Faces in a two-person image are matched to the group's people: Person FaceSim, leakage, swaps."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from spatialid.evaluation.clip_metrics import ClipScorer
    from spatialid.evaluation.evaluate import MetricModels, evaluate
    from spatialid.evaluation.face_metrics import DlibFaceEmbedder

    path, prompts_path = groups
    doc = {"groups": [["photos/astronaut.png", "photos/astronaut_mirror.png"]]}
    path.write_text(json.dumps(doc), encoding="utf-8")
    face = skimage.data.astronaut()[:300, 80:380]

    def two_people(item, embedding):  # type: ignore[no-untyped-def]
        # person 0 (the astronaut) right, person 1 (her mirror image) left: a swap the report must show
        return Image.fromarray(np.ascontiguousarray(np.concatenate([face[:, ::-1], face], axis=1)))

    idents = load_identities(path)
    prompts = load_prompts(prompts_path, limit=1)
    out = tmp_path / "run"
    items = build_grid(idents, prompts, ["paper"], [1], baseline=False)
    assert run_bench(items, out, settings=SETTINGS, generate_fn=two_people, encode_fn=hash_encoder, progress=False).failed == 0
    update_manifest(out, settings=SETTINGS.to_dict(), identities=idents, prompts=prompts, presets=["paper"], seeds=[1],
                    baseline=False, paths="absolute", inputs={"ids": str(path)})
    models = MetricModels(clip=ClipScorer.tiny(0), face=DlibFaceEmbedder())
    report, _ = evaluate([out], models, tmp_path / "report", progress=False, plots=False, reference_preset=None)
    row = report.per_image[0]
    assert row["people_found"] == 1.0 and row["people_swapped"] == 1.0
    assert row["person_face_sim"] > row["identity_leakage"]
    assert {"person_face_sim", "identity_leakage"} <= {m.key for m in report.metrics}


def test_bench_cli_tiny_group_with_regions_and_eval(groups: tuple[Path, Path], tmp_path: Path) -> None:
    """`spatialid bench --model tiny` on a groups file: people= generation, masks kept, eval's mask column."""
    from spatialid.bench.results import masks_file
    from spatialid.cli.main import main

    path, prompts_path = groups
    doc = {"groups": [{"people": ["photos/astronaut.png", "photos/astronaut_mirror.png"],
                       "regions": [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]}]}
    path.write_text(json.dumps(doc), encoding="utf-8")
    out = tmp_path / "bench"
    code = main(["bench", "--model", "tiny", "--ids", str(path), "--prompts", str(prompts_path), "--limit-prompts", "1",
                 "--presets", "paper", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    entries, _ = load_preset_results(out / "paper")
    (entry,) = entries.values()
    image = out / "paper" / entry["image"]
    assert entry["people"] == ["photos/astronaut.png", "photos/astronaut_mirror.png"]
    assert masks_file(image).is_file()

    from spatialid.evaluation.clip_metrics import ClipScorer
    from spatialid.evaluation.evaluate import MetricModels, evaluate
    from spatialid.evaluation.face_metrics import DlibFaceEmbedder

    models = MetricModels(clip=ClipScorer.tiny(0), face=DlibFaceEmbedder())
    report, _ = evaluate([out], models, tmp_path / "report", progress=False, plots=False, reference_preset=None)
    (row,) = [r for r in report.per_image if r["preset"] == "paper"]
    assert 0.99 <= row["mask_in_region"] <= 1.0  # a region is an upper bound: nothing outside it
