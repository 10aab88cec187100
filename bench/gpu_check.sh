#!/usr/bin/env bash
# One command for a lent H100 / H200, under 8 minutes: the kernel and optimizer tests on CUDA
# (tests pick the CUDA device when there is one), the masked-AdamW state sweep and every op of
# bench/run.py at 256 M elements, and the end-to-end saliency + unlearning-step pipeline on
# 2 G model-shaped elements (ours vs the official way). Every table is appended, dated and with
# the device, to bench/RESULTS.md; the raw rows stay in $OUT as JSON / markdown.
#
#   bash bench/gpu_check.sh                 # PY=python OUT=bench/out/gpu by default
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-bench/out/gpu}
SIZE=${SIZE:-256M}   # bench/run.py elements
E2E=${E2E:-2G}       # end-to-end elements
TESTS=${TESTS:-1}    # 0: skip the tests (a CPU dry run of the script)
mkdir -p "$OUT"
rc=0
stamp=$(date -u +%Y-%m-%d)
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
vers=$($PY -c "import torch, triton, transformers as t; print(f'torch {torch.__version__}, triton {triton.__version__}, transformers {t.__version__}')")
echo "== $stamp · $gpu · $vers"

step() {  # step NAME SECONDS CMD...: run with a time limit, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout "$limit" "$@"
  local r=$?
  echo "== $name: exit $r in $(( $(date +%s) - t0 )) s"
  [ "$r" -eq 0 ] || rc=$r
}

[ "$TESTS" = 0 ] || step "kernel + optimizer tests on CUDA" 150 \
  $PY -m pytest -q -x tests/test_kernels.py tests/test_kernels_state.py tests/test_optim.py \
  tests/test_optim_state.py tests/test_kernels_plan.py
step "masked AdamW state sweep, $SIZE" 90 \
  $PY bench/run.py --adamw-sweep --sizes "$SIZE" --out "$OUT" --json "$OUT/adamw_sweep.json"
step "every op, $SIZE" 120 \
  $PY bench/run.py --sizes "$SIZE" --out "$OUT" --json "$OUT/run.json"
step "end-to-end saliency + steps, $E2E elements" 120 \
  $PY bench/e2e_saliency.py --sizes "$E2E" --dtypes bf16 --batches 5 --steps 5 --out "$OUT"

{
  echo
  echo "## GPU check, $stamp ($gpu; $vers; bench/gpu_check.sh)"
  for f in "$OUT"/*.md; do
    [ -f "$f" ] || continue
    echo
    echo "### $(basename "$f")"
    echo
    cat "$f"
  done
} >> bench/RESULTS.md
echo "== appended to bench/RESULTS.md; exit $rc"
exit "$rc"
