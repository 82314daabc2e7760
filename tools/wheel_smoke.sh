#!/usr/bin/env bash
# The release as users get it: `python -m build` makes the sdist and the wheel, the wheel (not an
# editable install) goes into a fresh virtual environment, and `spatialid demo` runs from there,
# outside the source tree, so a module or package-data file missing from the wheel fails here.
# Dependencies (torch, diffusers, ...) are reused from the current environment
# (--system-site-packages); spatialid itself comes from the wheel only, which the script checks.
#
#   tools/wheel_smoke.sh            # build into dist/, install, run the demo (tiny and tiny-chroma)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
started=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/spatialid-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$PY" -c "import build, setuptools" 2>/dev/null || "$PY" -m pip install -q "build>=1.0" "setuptools>=77"
# --no-isolation: the build backend (setuptools, wheel) as installed, so no download is needed
"$PY" -m build --no-isolation --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/spatialid-*.whl)
sdist=$(ls "$work"/dist/spatialid-*.tar.gz)
echo "built $(basename "$wheel") and $(basename "$sdist")"
# the sdist carries what a source build needs: the package, the tests and their data, the docs
tar tzf "$sdist" >"$work/sdist.txt"
for needed in src/spatialid/py.typed tests/data/pulid_flux_checkpoint_layout.json CHANGELOG.md README.md; do
  grep -q "/$needed\$" "$work/sdist.txt" || { echo "sdist lacks $needed"; exit 1; }
done
built=$(date +%s)
"$PY" -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps "$wheel"
cd "$work"  # away from the source tree
"$work/venv/bin/python" - <<PYEOF
import pathlib, spatialid
where = pathlib.Path(spatialid.__file__).resolve()
assert str(where).startswith("$work/venv/"), f"spatialid imported from {where}, not from the wheel"
print(f"spatialid {spatialid.__version__} from {where.parent}")
PYEOF
for model in tiny tiny-chroma; do
  # small and short: the point is that every file the demo needs is in the wheel, not the pictures
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$work/venv/bin/spatialid" demo --model "$model" --out "$work/demo-$model" \
    --size 64x64 --steps 2 --quiet
  for f in demo.png demo_masks.png demo_compare.png; do
    test -s "$work/demo-$model/$f" || { echo "demo --model $model wrote no $f"; exit 1; }
  done
  "$work/venv/bin/spatialid" info "$work/demo-$model/demo.png" >/dev/null
done
echo "wheel smoke: build $((built - started)) s, install and demos $(( $(date +%s) - built )) s"
