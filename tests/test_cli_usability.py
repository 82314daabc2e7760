"""The CLI as practitioners expect it: random seeds, output folders and formats, warnings for
settings that do nothing, short typo errors, `info`'s reproduce command, `--from-png`, prompt files."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spatialid.app.metadata import read_image_metadata, read_png_metadata
from spatialid.cli.main import main

FAST = ["--model", "tiny", "--size", "64x64", "--steps", "2"]


@pytest.fixture(scope="module")
def embeds_file(tmp_path_factory) -> Path:
    from spatialid.encoder.embedding import IdentityEmbedding
    from spatialid.models.configs import TINY_PULID

    g = torch.Generator().manual_seed(0)
    shape = (1, TINY_PULID.idformer.num_queries, TINY_PULID.ca.kv_dim)
    emb = IdentityEmbedding(tokens=torch.randn(shape, generator=g), uncond_tokens=torch.randn(shape, generator=g))
    return emb.save(tmp_path_factory.mktemp("embeds") / "me.safetensors")


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spatialid: error:"), err
    return lines[0]


# ----------------------------------------------------------------------------- 8: random seeds


@pytest.mark.parametrize("seed", ["random", "-1"])
def test_seed_random_and_minus_one_draw_a_printed_and_stored_seed(tmp_path, capsys, seed):
    out = tmp_path / "r.png"
    code, _, err = _run(["generate", *FAST, "--prompt", "x", "--seed", seed, "--out", out], capsys)
    assert code == 0, err
    stored = read_image_metadata(out)["seed"]
    assert stored >= 0 and f"seed {stored}," in err


def test_seed_text_is_a_one_line_error(capsys):
    assert "invalid seed 'abc'" in _usage_error(["generate", *FAST, "-p", "x", "--seed", "abc"], capsys)


# ----------------------------------------------------------------------------- 9: outputs


def test_out_without_image_suffix_is_a_created_folder(tmp_path, capsys):
    folder = tmp_path / "newdir"
    code, stdout, err = _run(["generate", *FAST, "-p", "x", "-s", 4, "-o", folder], capsys)
    assert code == 0, err
    (path,) = [Path(p) for p in stdout.split()]
    assert path.parent == folder and path.suffix == ".png" and path.name.endswith("-s4.png")


def test_existing_output_gets_a_numbered_name(tmp_path, capsys):
    out = tmp_path / "same.png"
    for _ in range(2):
        assert _run(["generate", *FAST, "-p", "x", "-s", 1, "-o", out], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same-2.png", "same.png"]


def test_jpeg_and_webp_keep_the_settings(tmp_path, embeds_file, capsys):
    jpg = tmp_path / "a.jpg"
    code, stdout, err = _run(
        ["generate", *FAST, "--id-embeds", embeds_file, "-p", "café ☃", "-s", 7, "-o", jpg, "--masks"], capsys
    )
    assert code == 0, err
    assert [Path(p) for p in stdout.split()] == [jpg, tmp_path / "a_masks.png"]
    with Image.open(jpg) as im:
        assert im.format == "JPEG"
    s = read_image_metadata(jpg)
    assert s["prompt"] == "café ☃" and s["seed"] == 7 and s["identity"]["files"] == ["me.safetensors"]
    assert read_png_metadata(jpg) == s  # the old name still works
    assert read_image_metadata(tmp_path / "a_masks.png")["kind"] == "mask schedule"

    code, stdout, err = _run(["generate", *FAST, "-p", "w", "-s", 8, "-o", tmp_path / "web", "--format", "webp"], capsys)
    assert code == 0, err
    (webp,) = [Path(p) for p in stdout.split()]
    with Image.open(webp) as im:
        assert im.format == "WEBP" and webp.suffix == ".webp"
    code, stdout, _ = _run(["info", "--json", webp], capsys)
    assert code == 0 and '"seed": 8' in stdout


# ----------------------------------------------------------------------------- 10: settings that do nothing


def test_unused_settings_warn_and_summary_says_plain_flux(tmp_path, capsys, caplog):
    code, _, err = _run(["generate", *FAST, "-p", "x", "-s", 2, "-o", tmp_path / "n.png", "--negative-prompt", "blur"], capsys)
    assert code == 0, err
    assert "--negative-prompt does nothing without --true-cfg > 1" in caplog.text
    assert "no identity: plain FLUX" in err and "preset relaxed" not in err


# ----------------------------------------------------------------------------- 11: mistakes


def test_mistyped_flag_suggests_the_right_one(capsys):
    assert "did you mean --prompt" in _usage_error(["generate", *FAST, "--promt", "x"], capsys)
    line = _usage_error(["info", "--jsn", "x.png"], capsys)
    assert "did you mean --json" in line


def test_global_flags_after_the_sub_command_and_short_flags(tmp_path, capsys):
    out = tmp_path / "q.png"
    code, stdout, err = _run(["generate", "-q", *FAST, "-p", "x", "-s", 3, "-n", 2, "-o", out], capsys)
    assert code == 0, err
    assert [Path(p).name for p in stdout.split()] == ["q_0.png", "q_1.png"]
    assert "image(s)" not in err  # quiet: no summary line
    from spatialid.pipeline.settings import GenerationSettingsError

    with pytest.raises(GenerationSettingsError):
        main(["generate", "--debug", *FAST, "-p", "x", "--steps", "0", "-o", str(out)])


# ----------------------------------------------------------------------------- 13: info and --from-png


def test_info_prints_a_command_that_reproduces_the_image(tmp_path, embeds_file, capsys):
    first = tmp_path / "first.png"
    code, _, err = _run(
        ["generate", *FAST, "--id-embeds", embeds_file, "-p", "-a 'quoted' prompt", "-s", 11, "-o", first,
         "--preset", "paper", "--early", 0.6, "--id-weight", 0.7, "--true-cfg", 2, "--negative-prompt", "blurry"],
        capsys,
    )
    assert code == 0, err
    code, stdout, _ = _run(["info", first], capsys)
    assert code == 0
    assert "given again" in stdout or "give the same file" in stdout
    (command,) = [ln.strip() for ln in stdout.splitlines() if ln.strip().startswith("spatialid generate")]
    argv = shlex.split(command)
    assert argv[argv.index("--id-embeds") + 1] == str(embeds_file)  # where it was: the command works from any folder
    for flag in ("--preset", "--early", "--seed", "--steps", "--size", "--guidance", "--id-weight", "--start-step",
                 "--true-cfg", "--noise", "--max-sequence-length"):
        assert flag in argv, flag
    argv[argv.index("--id-embeds") + 1] = str(embeds_file)
    again = tmp_path / "again.png"
    code, _, err = _run([*argv[1:], "--out", again], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))

    code, stdout, _ = _run(["info", "--full", first], capsys)
    assert "schedule.early" in stdout


def test_from_png_reuses_the_settings_and_flags_win(tmp_path, embeds_file, capsys, caplog):
    first = tmp_path / "first.png"
    code, _, err = _run(
        ["generate", *FAST, "--id-embeds", embeds_file, "-p", "a portrait", "-s", 5, "-o", first,
         "--preset", "paper", "--late-floor", 0.6, "--guidance", 3.5],
        capsys,
    )
    assert code == 0, err
    same = tmp_path / "same.png"
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", first, "--id-embeds", embeds_file, "-o", same], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(same)))
    changed = tmp_path / "changed.png"
    code, _, err = _run(["generate", "--model", "tiny", "--from-png", first, "--seed", 6, "--guidance", 4, "-o", changed], capsys)
    assert code == 0, err
    s = read_image_metadata(changed)
    assert s["seed"] == 6 and s["guidance"] == 4.0  # given explicitly (4 is also the default): they win
    assert s["prompt"] == "a portrait" and s["preset"] == "paper" and s["schedule_overrides"] == {"late_floor": 0.6}
    assert s["identity"]["source"] == "embeds" and s["identity"]["files"] == ["me.safetensors"]  # found again


# ----------------------------------------------------------------------------- 14: prompt files


def test_prompts_file_generates_each_prompt(tmp_path, capsys):
    file = tmp_path / "prompts.txt"
    file.write_text("# my prompts\n\nfirst prompt\n  # skipped too\nzweiter Prompt ü\n", encoding="utf-8")
    out = tmp_path / "b.png"
    code, stdout, err = _run(["generate", *FAST, "--prompts", file, "-s", 3, "-o", out], capsys)
    assert code == 0, err
    files = [Path(p) for p in stdout.split()]
    assert [f.name for f in files] == ["b-p1.png", "b-p2.png"]
    assert [read_image_metadata(f)["prompt"] for f in files] == ["first prompt", "zweiter Prompt ü"]
    assert {read_image_metadata(f)["seed"] for f in files} == {3}


def test_prompts_file_errors(tmp_path, capsys):
    assert "not allowed with" in _usage_error(["generate", *FAST, "-p", "x", "--prompts", "f.txt"], capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    for path, match in ((empty, "no prompts"), (tmp_path / "missing.txt", "not found")):
        code, _, err = _run(["generate", *FAST, "--prompts", path, "-o", tmp_path / "o.png"], capsys)
        assert code == 2 and match in err and "Traceback" not in err
    code, _, err = _run(["generate", *FAST, "-o", tmp_path / "o.png"], capsys)
    assert code == 2 and "give --prompt" in err
    assert not (tmp_path / "o.png").exists()


# ----------------------------------------------------------------------------- 15: serve and bench wording


def test_serve_hides_gradios_share_hint(capsys):
    from spatialid.cli.cmd_serve import no_share_hint

    with no_share_hint():
        print("* Running on local URL:  http://127.0.0.1:7860")
        print("* To create a public link, set `share=True` in `launch()`.")
        print("after", end="")
    out = capsys.readouterr().out
    assert out == "* Running on local URL:  http://127.0.0.1:7860\nafter"


def test_bench_log_counts_read_as_english():
    from spatialid.cli.cmd_bench import _count

    assert _count(1, "identity", "identities") == "1 identity"
    assert _count(2, "identity", "identities") == "2 identities"
    assert _count(1, "prompt") == "1 prompt" and _count(3, "seed") == "3 seeds"
