"""Every reader of outside data, fed the bombs, stays under a fixed RSS increase (issue 20).

The bombs: a zlib bomb in a PNG's zTXt and iTXt settings chunk (512 MB inflated from 0.5 MB),
decompression-bomb dimensions (a 100000x100000 header; a whole 10000x10000 PNG, 100 MP, which
Pillow only warns about), a 2 GB JSON file (sparse) as results, manifest, prompts and identities,
``/dev/zero`` as a prompts, identities, results and identity file, and a safetensors header
length of 2**63 and of 90 MB (with a file that long) as identity, mask and LoRA file.

They are measured in a fresh Python process so the peak is clean: every module is imported and
every reader run once on a harmless file first, then for each (bomb, reader) the peak RSS is reset
(``/proc/self/clear_refs``) and ``VmHWM - VmRSS before`` is the reader's peak increase. The peaks
are printed (``pytest -s``) and written to ``memory_peaks.json`` in the test's folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

CEILING_MB = 50.0  # the example is 100 MB; every bomb is refused within a few MB

_CHILD = textwrap.dedent(
    r'''
    import contextlib, io, json, os, struct, sys, zlib
    from pathlib import Path

    root = Path(sys.argv[1])

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
        raise KeyError(field)

    # ----------------------------------------------------------------- the bombs (built before measuring)
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def zeros_deflated(megabytes):
        """A zlib stream of ``megabytes`` MB of zeros, built from one flushed block repeated (fast)."""
        c = zlib.compressobj(9)
        block = bytes(2**20)
        first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
        again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
        adler = 1
        for _ in range(megabytes):
            adler = zlib.adler32(block, adler)
        return first + again * (megabytes - 1) + c.flush()[:-4] + adler.to_bytes(4, "big")

    def png(width, height, extra=b"", idat=None):
        ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        data = idat if idat is not None else zlib.compress(bytes(3 * width + 1))
        return b"\x89PNG\r\n\x1a\n" + ihdr + extra + chunk(b"IDAT", data) + chunk(b"IEND", b"")

    bomb = zeros_deflated(512)
    (root / "ztxt.png").write_bytes(png(2, 2, chunk(b"zTXt", b"spatialid\0\0" + bomb)))
    (root / "itxt.png").write_bytes(png(2, 2, chunk(b"iTXt", b"spatialid\0\1\0en\0\0" + bomb)))
    (root / "dims.png").write_bytes(png(100000, 100000))
    (root / "mp100.png").write_bytes(png(10000, 10000, idat=zeros_deflated(287)[:-4] + b"\0\0\0\0"))
    for name in ("results.json", "bench.json", "prompts.json", "ids.json", "huge.txt"):
        with open(root / name, "wb") as fh:
            fh.truncate(2 * 2**30)  # sparse: no disk used
    bench = root / "bench"
    (bench / "pulid").mkdir(parents=True)
    (bench / "bench.json").write_text(json.dumps({"format": "spatialid-bench", "format_version": 2}))
    os.symlink(root / "results.json", bench / "pulid" / "results.json")
    zero_bench = root / "zero_bench"
    (zero_bench / "pulid").mkdir(parents=True)
    os.symlink("/dev/zero", zero_bench / "pulid" / "results.part0.json")
    huge_manifest = root / "huge_manifest"
    huge_manifest.mkdir()
    os.symlink(root / "bench.json", huge_manifest / "bench.json")
    os.symlink("/dev/zero", root / "zero.json")
    os.symlink("/dev/zero", root / "zero.safetensors")
    (root / "len63.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with open(root / "len90m.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", 90 * 2**20) + b"{" + b" " * 16)
        fh.truncate(8 + 90 * 2**20)  # a header that long really is there (spaces, then zeros)
    os.symlink(root / "len90m.safetensors", root / "lora90m.safetensors")
    (root / "lora63.safetensors").write_bytes((root / "len63.safetensors").read_bytes())

    # ----------------------------------------------------------------- the readers
    from PIL import Image

    from spatialid.app.metadata import read_image_metadata
    from spatialid.app.loading import check_lora_files
    from spatialid.bench.datasets import load_identities, load_prompts
    from spatialid.bench.integrity import damaged_images
    from spatialid.bench.merge import merge_runs
    from spatialid.bench.results import load_manifest, load_preset_results
    from spatialid.cli.cmd_generate import read_prompts
    from spatialid.cli.main import main
    from spatialid.encoder.embedding import IdentityEmbedding
    from spatialid.errors import SpatialIDError
    from spatialid.injection.people import load_mask_file, regions_tensor
    from spatialid.ui.handlers import settings_from_file
    from spatialid.ui.inputs import collect_photos

    def cli(*argv):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return main([str(a) for a in argv])

    READERS = {
        "png": [
            ("read_image_metadata", read_image_metadata),
            ("spatialid info", lambda p: cli("info", p)),
            ("generate --from-png", lambda p: cli("generate", "--model", "tiny", "--from-png", p, "-o", root / "o.png")),
            ("ui settings_from_file", settings_from_file),
        ],
        "picture": [
            ("read_image_metadata", read_image_metadata),
            ("region mask (regions_tensor)", lambda p: regions_tensor([str(p)], 1, 4, 4)),
            ("ui collect_photos", lambda p: collect_photos([str(p)])),
            ("bench integrity (full decode)", lambda p: damaged_images([p], full_decode=1)),
        ],
    }
    BOMBS = [
        ("zTXt zlib bomb (512 MB)", root / "ztxt.png", READERS["png"]),
        ("iTXt zlib bomb (512 MB)", root / "itxt.png", READERS["png"]),
        ("PNG 100000x100000 header", root / "dims.png", READERS["picture"]),
        ("PNG 10000x10000 (100 MP)", root / "mp100.png", READERS["picture"]),
        ("2 GB JSON", None, [
            ("bench results.json", lambda _: load_preset_results(bench / "pulid")),
            ("bench merge", lambda _: merge_runs([bench], root / "merged")),
            ("bench.json manifest", lambda _: load_manifest(huge_manifest)),
            ("bench prompts .json", lambda _: load_prompts(root / "prompts.json")),
            ("bench prompts .txt", lambda _: load_prompts(root / "huge.txt")),
            ("bench identities .json", lambda _: load_identities(root / "ids.json")),
            ("generate --prompts", lambda _: read_prompts(str(root / "huge.txt"))),
        ]),
        ("/dev/zero", None, [
            ("generate --prompts", lambda _: read_prompts("/dev/zero")),
            ("bench prompts", lambda _: load_prompts("/dev/zero")),
            ("bench identities .json", lambda _: load_identities(root / "zero.json")),
            ("bench results.json", lambda _: load_preset_results(zero_bench / "pulid")),
            ("identity file", lambda _: IdentityEmbedding.load(root / "zero.safetensors")),
        ]),
        ("safetensors header 2**63", None, [
            ("identity file", lambda _: IdentityEmbedding.load(root / "len63.safetensors")),
            ("mask file", lambda _: load_mask_file(root / "len63.safetensors")),
            ("LoRA file", lambda _: check_lora_files([str(root / "lora63.safetensors")])),
        ]),
        ("safetensors header 90 MB", None, [
            ("identity file", lambda _: IdentityEmbedding.load(root / "len90m.safetensors")),
            ("mask file", lambda _: load_mask_file(root / "len90m.safetensors")),
            ("LoRA file", lambda _: check_lora_files([str(root / "lora90m.safetensors")])),
        ]),
    ]

    def outcome(fn, arg):
        try:
            result = fn(arg)
        except SpatialIDError as exc:
            return "refused: " + " ".join(str(exc).split())[:150]
        except Exception as exc:  # reported, and failed by the test
            return f"ERROR {type(exc).__name__}: {exc}"[:200]
        return f"returned {result!r}"[:150]

    # warm-up: imports and first-call caches must not count as a reader's memory
    Image.new("RGB", (8, 8)).save(root / "small.png")
    (root / "small.json").write_text("[]")
    for _, _, readers in BOMBS:
        for _, fn in readers:
            outcome(fn, root / "small.png")

    results = []
    for bomb, path, readers in BOMBS:
        for reader, fn in readers:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            before = status("VmRSS")
            result = outcome(fn, path)
            results.append({"bomb": bomb, "reader": reader, "peak_mb": round(status("VmHWM") - before, 1), "outcome": result})
    print(json.dumps(results))
    '''
)


def test_every_reader_stays_under_the_memory_ceiling_on_the_bombs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "SPATIALID_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    (tmp_path / "memory_peaks.json").write_text(json.dumps(results, indent=1))
    print()
    for r in results:
        print(f"{r['peak_mb']:7.1f} MB  {r['bomb']:<26} {r['reader']:<30} {r['outcome'][:90]}")
    assert len(results) == 34
    errors = [r for r in results if r["outcome"].startswith("ERROR")]
    assert not errors, errors
    over = [r for r in results if r["peak_mb"] >= CEILING_MB]
    assert not over, over
    # the bombs are refused, not read: each reader says what is wrong in one line
    for r in results:
        if r["reader"] in ("spatialid info", "generate --from-png"):
            assert r["outcome"] == "returned 2", r
        elif r["reader"] == "ui settings_from_file":
            assert "No settings loaded" in r["outcome"], r
        elif r["reader"] == "bench integrity (full decode)":
            assert "pixels" in r["outcome"] or "IHDR" in r["outcome"], r
        else:
            assert r["outcome"].startswith("refused: "), r
