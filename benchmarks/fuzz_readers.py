"""A longer fuzzing run of every reader of outside data (the properties of tests/test_fuzz_readers.py).

    python benchmarks/fuzz_readers.py 2000                 # 2000 examples per reader
    python benchmarks/fuzz_readers.py 500 --only merge,from_png --seed 7 --json fuzz.json

Each reader runs N examples drawn by hypothesis (no shrinking; ``--seed`` picks another
sequence, the default is the test suite's derandomized one). A failure (an exception other than
the project's one-line error, a broken record, a file written outside its folder) is counted and
the run goes on; the first distinct failures are printed with their example. Prints per reader:
examples run, failures, how many calls returned a record and how many were refused in one line.
Exit status 1 when any reader failed.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _load_properties() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_properties", ROOT / "tests" / "test_fuzz_readers.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def run(name: str, props: Any, examples: int, seed: int | None) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings

    strategy, check, _ = props.READERS[name]
    calls: collections.Counter = collections.Counter()
    failures: list[str] = []
    count = 0
    original = props.one_line

    def counting(call: Any, *args: Any, **kwargs: Any) -> Any:
        ok, result = original(call, *args, **kwargs)
        calls["record" if ok else "refused"] += 1
        return ok, result

    def property_(value: Any) -> None:
        nonlocal count
        count += 1
        try:
            check(value)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, the run goes on
            where = traceback.extract_tb(exc.__traceback__)[-1]
            line = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]} ({Path(where.filename).name}:{where.lineno})"
            failures.append(line + f"\n      example: {value!r}"[:600])

    props.one_line = counting
    before = dict(props.OUTCOMES)
    conf = settings(max_examples=examples, deadline=None, derandomize=seed is None, database=None,
                    phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    test = conf(given(strategy)(property_))
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    started = time.perf_counter()
    try:
        test()
    finally:
        props.one_line = original
    extra = {k: v - before.get(k, 0) for k, v in props.OUTCOMES.items() if v != before.get(k, 0)}
    return {"reader": name, "examples": count, "failures": len(failures), "seconds": round(time.perf_counter() - started, 1),
            "calls": {**dict(calls), **extra}, "first_failures": list(dict.fromkeys(failures))[:3]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", type=int, help="examples per reader")
    parser.add_argument("--only", default=None, help="comma-separated reader names (default: all)")
    parser.add_argument("--seed", type=int, default=None, help="another example sequence (default: the tests' own)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("SPATIALID_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    props = _load_properties()
    names = args.only.split(",") if args.only else list(props.READERS)
    unknown = [n for n in names if n not in props.READERS]
    if unknown:
        parser.error(f"unknown reader(s) {', '.join(unknown)}; one of: {', '.join(props.READERS)}")
    import logging

    import warnings

    logging.disable(logging.WARNING)  # merge and generate log every left-out example
    warnings.simplefilter("ignore")  # Pillow warns about each damaged EXIF block
    results = []
    print(f"{'reader':<15} {'examples':>8} {'failures':>8} {'seconds':>8}  calls")
    for name in names:
        r = run(name, props, args.examples, args.seed)
        results.append(r)
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r["calls"].items()))
        print(f"{name:<15} {r['examples']:>8} {r['failures']:>8} {r['seconds']:>8}  {calls}", flush=True)
        for failure in r["first_failures"]:
            print(f"    {failure}")
    print(f"total: {sum(r['examples'] for r in results)} examples, {sum(r['failures'] for r in results)} failures")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
