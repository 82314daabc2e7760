#!/usr/bin/env bash
# Issues 6 and 16 GPU check: per-step cost of SpatialID vs PuLID vs plain FLUX on one CUDA GPU (bf16,
# random weights, no download), the fused mask, two identities, torch.compile and step caches.
# Run from anywhere:   bash benchmarks/gpu_check.sh
#
# Needs: torch with CUDA and diffusers (>= 0.35) importable. spatialid itself is used from src/
# through PYTHONPATH (no install). If diffusers is missing and a folder of wheels is available
# ($WHEELS, shared/wheels or wheels/), it is installed from there with pip --no-index (offline).
#
# Output: JSON + logs in "$OUT/" when $OUT is set, else ./gpu_check_out/. Total budget about
# 7.8 minutes (set GPU_CHECK_BUDGET_S to change it): the runs go most important first and an
# optional run is skipped when the remaining time is too short for it.
#   1. full (FLUX.1-dev architecture) 1024x1024, eager: plain, pulid, paper (fused mask: the CUDA
#      default), paper+eager (the eager mask), paper+2id (two identities); CUDA kernels per point
#   2. full 512x512, the same (the launch-bound case the fused mask is for)
#   3. full 1024x1024 denoising loop (12 steps) eager and torch.compile'd, without and with First
#      Block Cache: time per generation, steps skipped, drift and identity kept (cache_drift.py)
#   4. mid 512x512, eager and torch.compile (inductor) interleaved, plain/pulid/paper (if >= 150 s remain)
set -u
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

echo "== gpu_check: output in $OUT_DIR, budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi not available"

check_imports() {
  "$PY" - <<'EOF'
import importlib, sys
missing = []
for name in ("torch", "diffusers"):
    try:
        mod = importlib.import_module(name)
        print(f"  ok      {name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001 - report anything that stops the import
        missing.append(name)
        print(f"  MISSING {name}: {type(exc).__name__}: {exc}")
for name in ("psutil",):
    try:
        importlib.import_module(name)
    except Exception:
        print(f"  (optional {name} not installed: fine on CUDA)")
if missing:
    print("MISSING: " + ", ".join(missing))
    sys.exit(1)
import os, torch
print(f"  cuda available: {torch.cuda.is_available()} (torch.version.cuda={torch.version.cuda})")
if os.environ.get("GPU_CHECK_DEVICE", "cuda").startswith("cuda") and not torch.cuda.is_available():
    print("MISSING: a CUDA device visible to torch (torch.cuda.is_available() is False)")
    sys.exit(2)
EOF
}

echo "== checking imports"
check_imports; rc=$?
if [ "$rc" = 2 ]; then
  echo "ERROR: torch sees no CUDA device; this check needs the GPU machine."; exit 4
elif [ "$rc" != 0 ]; then
  installed=0
  for dir in "${WHEELS:-}" "$ROOT/shared/wheels" "$ROOT/wheels" "$ROOT/../shared/wheels"; do
    if [ -n "$dir" ] && ls "$dir"/*.whl >/dev/null 2>&1; then
      echo "== installing diffusers from local wheels in $dir (offline)"
      "$PY" -m pip install --no-index --find-links "$dir" diffusers && installed=1
      break
    fi
  done
  if [ "$installed" != 1 ] || ! check_imports; then
    echo "ERROR: cannot run: install the packages reported MISSING above (no internet here: carry"
    echo "       wheels for diffusers and its dependencies and point WHEELS=/path/to/wheels at them)."
    exit 3
  fi
fi

status=0
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
# GPU_CHECK_SMOKE=1 (with GPU_CHECK_DEVICE=cpu) tests this script's plumbing at a toy size.
SMOKE_ARGS=()
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  SMOKE_ARGS=(--size tiny --resolution 64 --repeats 2 --warmup 1 --point-repeats 2 --compile-backend eager)
fi

run_script() {  # run_script SCRIPT NAME TIMEOUT_S ARGS...
  local script="$1" name="$2" limit="$3"; shift 3
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 30 ]; then
    echo "== SKIP $name: only ${remaining}s of the budget left"; return
  fi
  [ "$limit" -gt "$remaining" ] && limit="$remaining"
  echo "== $name (timeout ${limit}s): $script $*"
  timeout --signal=INT --kill-after=10 "$limit" "$PY" "$ROOT/benchmarks/$script" "$@" \
    --device "$DEVICE" --json "$OUT_DIR/$name.json" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $name FAILED or timed out (exit $rc); see $OUT_DIR/$name.log"; status=1
  fi
}

run() {  # run NAME TIMEOUT_S ARGS...
  local name="$1" limit="$2"; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 30 ]; then
    echo "== SKIP $name: only ${remaining}s of the budget left"; return
  fi
  [ "$limit" -gt "$remaining" ] && limit="$remaining"
  echo "== $name (timeout ${limit}s): step_cost.py $*"
  timeout --signal=INT --kill-after=10 "$limit" "$PY" "$ROOT/benchmarks/step_cost.py" "$@" \
    --device "$DEVICE" "${SMOKE_ARGS[@]}" --json "$OUT_DIR/$name.json" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $name FAILED or timed out (exit $rc); see $OUT_DIR/$name.log"; status=1
  fi
}

VARIANTS=plain,pulid,paper,paper+eager,paper+2id
run full_1024_eager 140 --size full --resolution 1024 --repeats 8 --warmup 2 --point-repeats 10 \
  --variants "$VARIANTS" --count-ops --skip-idformer
run full_512_eager 80 --size full --resolution 512 --repeats 10 --warmup 2 --point-repeats 10 \
  --variants "$VARIANTS" --count-ops --skip-idformer --skip-memory
CACHE_ARGS=(--size full --resolution 1024 --steps 12 --presets pulid,paper --caches none,fbc:0.5,fbc:0.8
            --compile --compiled-caches none,fbc:0.8)
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  CACHE_ARGS=(--size tiny --resolution 64 --steps 4 --presets pulid,paper --caches none,fbc:0.5 --compiled-caches none)
fi
if [ "$(left)" -ge 120 ]; then
  run_script cache_drift.py full_1024_cache "$(( $(left) - 10 ))" "${CACHE_ARGS[@]}"
else
  echo "== SKIP full_1024_cache: $(left)s left (< 120s)"
fi
if [ "$(left)" -ge 150 ]; then
  run mid_512_compile "$(( $(left) - 10 ))" --size mid --resolution 512 --repeats 15 --warmup 2 \
    --compile --variants plain,pulid,paper --skip-idformer
else
  echo "== SKIP mid_512_compile: $(left)s left (< 150s)"
fi
if [ "${GPU_CHECK_COMPILE_FULL:-0}" = 1 ]; then
  run full_1024_compile "$(( $(left) - 10 ))" --size full --resolution 1024 --repeats 8 --warmup 1 \
    --compile-only --variants plain,pulid,paper --skip-idformer
fi

echo "== summary (markdown rows for docs/performance.md)"
"$PY" "$ROOT/benchmarks/step_cost.py" --summarize $(ls "$OUT_DIR"/*.json | grep -v _cache.json) || status=1
echo "== gpu_check done in $(( $(date +%s) - START ))s, exit $status"
exit $status
