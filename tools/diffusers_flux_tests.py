#!/usr/bin/env python3
"""diffusers' own FLUX.1 (and Chroma) pipeline tests, run without PuLID and with it loaded on every pipeline.

    python tools/diffusers_flux_tests.py --source ~/src/diffusers             # a diffusers checkout
    python tools/diffusers_flux_tests.py                                     # the sdist of the installed version
    python tools/diffusers_flux_tests.py --source DIR --offline-substitutes --out table.md

The tests come from ``tests/`` of a diffusers source tree that should match the installed release
(``--source``: a git checkout at tag ``v<installed version>``). Without ``--source`` the script
tries ``pip download diffusers==<installed> --no-binary :all:``; diffusers' sdists (0.42.1 checked)
carry only ``tests/testing_utils.py``, not ``tests/pipelines``, so it then says so and stops.

Each mode runs ``tests/pipelines/flux``, ``tests/pipelines/controlnet_flux`` and
``tests/pipelines/chroma`` once (tools/diffusers_pulid_plugin.py does the loading):

* ``plain``: the suite as diffusers ships it;
* ``loaded``: ``load_pulid`` on every Flux*/Chroma* pipeline built, no identity passed;
* ``weight0``: loaded, and every call carries an identity of weight 0.

The report is a Markdown table: per mode, how many tests passed, failed and were skipped, and every
test that passes in ``plain`` but not in that mode (what PuLID would break). Exit status 1 when there
is any such test. The dummy components read two tiny hub models (``hf-internal-testing/tiny-random-t5``
and ``-clip``); ``--offline-substitutes`` makes them in code instead, for machines without hub access.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
SUITES = ("tests/pipelines/flux", "tests/pipelines/controlnet_flux", "tests/pipelines/chroma")
MODES = ("plain", "loaded", "weight0")


def _installed() -> str:
    import diffusers

    return diffusers.__version__


def _source_from_sdist(version: str, work: Path) -> Path:
    """The diffusers sdist of ``version`` unpacked, if it carries the pipeline tests."""
    dl = work / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"diffusers=={version}", "--no-binary", ":all:",
                    "--no-deps", "-d", str(dl)], check=True)
    archive = next(dl.glob("diffusers-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(work / "src", filter="data")
    root = next((work / "src").iterdir())
    if not (root / SUITES[0]).is_dir():
        sys.exit(f"diffusers_flux_tests: the sdist of diffusers {version} has no {SUITES[0]} (diffusers ships only "
                 f"tests/testing_utils.py there); pass --source with a git checkout of diffusers at tag v{version}")
    return root


def _source_version(root: Path) -> str | None:
    setup = root / "setup.py"
    if not setup.is_file():
        return None
    for line in setup.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("version="):
            return line.split("=", 1)[1].split(",")[0].strip().strip("\"'")
    return None


def _outcomes(xml: Path, log: Path) -> dict[str, str]:
    """test id -> passed / failed / skipped (errors count as failed), from the verbose log (so a run
    stopped by ``--budget`` counts the tests that finished), else from the JUnit XML."""
    result: dict[str, str] = {}
    if xml.is_file() and not log.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            tags = {child.tag for child in case}
            result[name] = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        return result
    words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped", "XFAIL": "skipped",
             "XPASS": "passed"}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in words:
            path, _, rest = parts[0].partition("::")
            result[f"{path[:-3].replace('/', '.')}.{rest.replace('::', '::', 1)}"] = words[parts[1]]
    return result


def _run(
    mode: str, tests: Path, suites: list[str], substitutes: bool, extra: list[str], budget: float | None, keep: Path | None
) -> tuple[dict[str, str], float]:
    xml = tests.parent / f"junit-{mode}.xml"
    env = dict(os.environ, SPATIALID_PULID_MODE=mode, SPATIALID_OFFLINE_SUBSTITUTES="1" if substitutes else "0")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(TOOLS), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "diffusers_pulid_plugin",
           "--continue-on-collection-errors",
           f"--junitxml={xml}", "-o", "addopts=", *suites, *extra]
    print(f"[{mode}] {' '.join(cmd[3:])}", flush=True)
    log_path = tests.parent / f"log-{mode}.txt"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=tests.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:  # --budget: report the tests that finished
            proc.kill()
            proc.wait()
    seconds = time.perf_counter() - started
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for f in (xml, log_path):
            if f.is_file():
                shutil.copy2(f, keep / f.name)
    return _outcomes(xml, log_path), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, help="a diffusers source tree (git checkout at the installed version's tag)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)} (plain always runs)")
    p.add_argument("--offline-substitutes", action="store_true", help="make the two tiny hub models in code")
    p.add_argument("--out", type=Path, help="write the Markdown report here too")
    p.add_argument("--parallel", action="store_true", help="run the modes at the same time (one pytest each)")
    p.add_argument("--budget", type=float, help="stop each mode after this many seconds and compare the tests that finished")
    p.add_argument("--keep", type=Path, help="copy each mode's log and JUnit XML into this folder")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --), e.g. -k 'not lora'")
    args = p.parse_args(argv)
    modes = ["plain", *[m for m in args.modes.split(",") if m and m != "plain"]]
    if any(m not in MODES for m in modes):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    installed = _installed()
    import importlib.util

    missing = [pkg for mod, pkg in (("parameterized", "parameterized"), ("requests_mock", "requests-mock"))
               if importlib.util.find_spec(mod) is None]  # what diffusers' test modules import
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    with tempfile.TemporaryDirectory(prefix="diffusers-tests-") as tmp:
        work = Path(tmp)
        source = args.source.expanduser().resolve() if args.source else _source_from_sdist(installed, work)
        if not (source / SUITES[0]).is_dir():
            p.error(f"--source {source}: no {SUITES[0]} there")
        shutil.copytree(source / "tests", work / "run" / "tests")
        tests = work / "run" / "tests"
        suites = [s for s in SUITES if (tests.parent / s).is_dir()]
        if any(a.startswith("tests/") for a in args.pytest_args):
            suites = []  # the paths given replace the three suites
        # the modes run side by side (each pytest single-threaded): the wall time of one mode
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(modes) if args.parallel else 1) as pool:
            futures = {m: pool.submit(_run, m, tests, suites, args.offline_substitutes, args.pytest_args, args.budget,
                                      args.keep) for m in modes}
            results = {m: f.result() for m, f in futures.items()}
    base = results["plain"][0]
    if args.budget is not None:  # compare only the tests every mode got to
        common = set.intersection(*(set(r[0]) for r in results.values()))
        results = {m: ({t: v for t, v in r[0].items() if t in common}, r[1]) for m, r in results.items()}
        base = results["plain"][0]
    lines = [
        f"diffusers {installed} installed; tests from {source} (version {_source_version(source) or 'unknown'})"
        + ("; hub tiny models made in code (--offline-substitutes)" if args.offline_substitutes else ""),
        "",
        "| mode | tests | passed | failed | skipped | pass without PuLID, fail with | time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    broken: dict[str, list[str]] = {}
    for mode, (outcome, seconds) in results.items():
        counts = {k: sum(1 for v in outcome.values() if v == k) for k in ("passed", "failed", "skipped")}
        broken[mode] = sorted(t for t, v in base.items() if v == "passed" and outcome.get(t) != "passed")
        regress = "-" if mode == "plain" else str(len(broken[mode]))
        lines.append(f"| {mode} | {len(outcome)} | {counts['passed']} | {counts['failed']} | {counts['skipped']} | "
                     f"{regress} | {seconds:.0f} s |")
    for mode, tests_broken in broken.items():
        if tests_broken:
            lines += ["", f"Passing without PuLID, failing in `{mode}`:", ""] + [f"- `{t}`" for t in tests_broken]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    return 1 if any(broken.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
