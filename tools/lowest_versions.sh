#!/usr/bin/env bash
# The lowest diffusers and transformers that pyproject.toml declares, tested: a second virtual
# environment with exactly those two releases (and what they need, e.g. older tokenizers and
# huggingface_hub, installed into it by pip), torch and everything else reused from the current
# interpreter's environment, then the core tests (models, masks, injection, the pipelines on the tiny
# models, the loader on every FLUX.1 pipeline, Chroma) run from this working tree.
#
#   tools/lowest_versions.sh            # build (or reuse) the environment and run the core tests
#   tools/lowest_versions.sh -k chroma  # extra arguments go to pytest
#
# SPATIALID_LOWEST_VENV sets where the environment lives (default ~/.cache/spatialid/venv-lowest-...,
# outside the clone so a second run reuses it). A failure here means a lower bound in pyproject.toml
# is wrong: raise it to the first release that passes and say so in CHANGELOG.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
started=$(date +%s)
# "diffusers>=0.35,<1" -> 0.35 ; "transformers>=4.46,<6" -> 4.46 (the lower bounds, from one place)
lowest() { sed -n "s/^ *\"$1>=\([0-9.]*\).*/\1/p" pyproject.toml | head -n 1; }
DIFFUSERS=$(lowest diffusers)
TRANSFORMERS=$(lowest transformers)
# a bound like 0.35 means its first release, 0.35.0
full() { case "$1" in *.*.*) echo "$1" ;; *) echo "$1.0" ;; esac; }
DIFFUSERS=$(full "$DIFFUSERS")
TRANSFORMERS=$(full "$TRANSFORMERS")
VENV=${SPATIALID_LOWEST_VENV:-$HOME/.cache/spatialid/venv-lowest-diffusers$DIFFUSERS-transformers$TRANSFORMERS}
echo "lowest versions: diffusers==$DIFFUSERS transformers==$TRANSFORMERS (venv $VENV)"
if ! "$VENV/bin/python" -c "import diffusers, transformers, sys; sys.exit(not (diffusers.__version__ == '$DIFFUSERS' and transformers.__version__ == '$TRANSFORMERS'))" 2>/dev/null; then
  rm -rf "$VENV"
  # --system-site-packages: torch, numpy, timm, ... come from the current environment; the two pinned
  # packages (and whatever older helpers they require) are installed into the venv, shadowing those.
  "$PY" -m venv --system-site-packages "$VENV"
  # transformers imports the optional `kernels` package when it is installed: the base environment's
  # newer one breaks an older transformers at import, so the venv gets the range that release asks for.
  extra=""
  "$PY" -c "import kernels" 2>/dev/null && extra="[hub-kernels]"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q "diffusers==$DIFFUSERS" "transformers$extra==$TRANSFORMERS"
fi
"$VENV/bin/python" - <<PYEOF
import diffusers, transformers, torch, huggingface_hub, tokenizers
assert diffusers.__version__ == "$DIFFUSERS" and transformers.__version__ == "$TRANSFORMERS"
print(f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
      f"huggingface_hub {huggingface_hub.__version__}, tokenizers {tokenizers.__version__}")
PYEOF
prepared=$(date +%s)
# The core tests; pytest's pythonpath (pyproject) puts this tree's src/ first.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_models.py tests/test_pulid_flux_model.py tests/test_checkpoint.py tests/test_masks.py tests/test_schedule.py \
  tests/test_injector.py tests/test_one_path.py tests/test_pipeline.py tests/test_pipelines_any.py tests/test_chroma.py "$@"
echo "lowest versions: environment $((prepared - started)) s, tests $(( $(date +%s) - prepared )) s"
