#!/usr/bin/env bash
# The GPU check, one command for a person with one CUDA GPU (about 10 minutes on an H100):
#   scripts/gpu_check.sh [OUT]        (OUT defaults to runs/gpu_check)
# 1. the whole test suite, the CUDA tests (tests/test_cuda.py) running instead of skipping;
# 2. moe-balance bench on CUDA, transformers' MoE blocks included (grouped_mm where it runs);
# 3. a 200-step quick-preset comparison (aux loss vs Loss-Free) on CUDA;
# then OUT/summary.md: machine, each stage's status and time, the figures. Every stage runs
# even when an earlier one fails; the exit status is non-zero when any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
[ -x .venv/bin/python ] || make venv || exit 2
PY=.venv/bin/python
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch $($PY -c 'import torch; print(torch.__version__)') sees no CUDA GPU;" \
         "install a CUDA build of torch into .venv (pip install torch==2.13.0 from PyPI is one)" >&2
    exit 2
fi

stage() {  # stage NAME COMMAND...: run it, log to OUT/NAME.log, record status and seconds
    local name=$1; shift
    local t0=$SECONDS
    echo "gpu_check: $name ..." >&2
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $((SECONDS - t0))" >> "$OUT/stages.txt"
    echo "gpu_check: $name exit $rc in $((SECONDS - t0)) s" >&2
}

rm -f "$OUT/stages.txt"
stage tests $PY -m pytest -rs --junitxml "$OUT/pytest.xml"
stage bench sh -c ".venv/bin/moe-balance bench --device cuda --json > '$OUT/bench.json'"
stage compare .venv/bin/moe-balance compare --preset quick --steps 200 --methods aux_loss,loss_free \
    --seeds 0 --device cuda --out "$OUT/compare" --overwrite
$PY scripts/gpu_summary.py "$OUT"
echo "gpu_check: summary in $OUT/summary.md" >&2
awk '$2 != 0 { failed = 1 } END { exit failed }' "$OUT/stages.txt"
