"""``spatialid generate --preset paper --compare pulid,relaxed``: the grid shows every preset, the main one first,
each with its image and its mask row (issue 13, point 4)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from spatialid.app.metadata import read_image_metadata


# ``astronaut``: the shared identity photo of conftest.py.
def test_cli_compare_shows_the_main_preset_first_with_masks(tmp_path, astronaut: Path, capsys):
    from spatialid.cli.main import main

    out = tmp_path / "me.png"
    argv = ["generate", "--model", "tiny", "--size", "64x64", "--steps", "3", "--id", str(astronaut), "--prompt", "astronaut",
            "--seed", "1", "--out", str(out), "--preset", "paper", "--compare", "pulid,relaxed"]  # no --masks
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    # one progress bar per preset, each named by its preset (not three bars all called "denoising")
    for label in ("preset 1/3 (paper): denoising", "preset 2/3 (pulid): denoising", "preset 3/3 (relaxed): denoising"):
        assert label in err, err[-2000:]
    grid_file = out.with_name("me_compare.png")
    meta = read_image_metadata(grid_file)
    assert meta["presets_shown"] == ["paper", "pulid", "relaxed"]
    assert meta["compare"] == ["pulid", "relaxed"]  # what was asked, as given
    with Image.open(grid_file) as grid:
        width, height = grid.size
    # identity photo + 3 presets per row, tiles scaled up to 256 px; the image row and 3 mask rows
    assert width >= 4 * 256 and height >= 4 * 256
    assert not out.with_name("me_masks.png").exists()  # the mask picture itself only with --masks
