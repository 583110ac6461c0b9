#!/usr/bin/env bash
# The GPU check of issue #21 item 2 in one command (see bench/gpu_check.py for what it measures and its budget):
#   OUT=/folder bash bench/gpu_check.sh [--dry-run] [options of bench/gpu_check.py]
# Runs from the source tree (no install); writes $OUT/gpu_check.json, $OUT/gpu_check.log and $OUT/pytest_gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/dgiqa-gpu-check}"
mkdir -p "$OUT"
export OUT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi
"$py" -u bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
