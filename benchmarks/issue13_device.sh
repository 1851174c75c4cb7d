#!/usr/bin/env bash
# Issue 13's whole measurement on a lent GPU, one command of at most 8.7 minutes:
#   1. benchmarks/side_by_side.py: K students side by side in one process (vmap) against K
#      sequential trials, per candidate-step (guard 200 s);
#   2. benchmarks/gpu_packing.py: evaluations per hour of a real optimize by workers per GPU and
#      CUDA graphs, 30 s windows, variants 1e,1g,4e,4g,16g (guard 320 s).
#
#   bash benchmarks/device_wheels.sh                       # here first: the wheels the device lacks
#   # device run, carry [".whl"], timeout_s 540:
#   bash benchmarks/issue13_device.sh "$OUT"
#
# Each part writes its log and JSON into the folder given ($OUT); a part that fails or runs
# past its guard does not stop the other.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?give the folder for the logs and JSON, e.g. \$OUT}"
mkdir -p "$out"

GPU_CHECK_TIMEOUT=200 bash benchmarks/gpu_check.sh --side-by-side --json "$out/side_by_side.json" \
  2>&1 | tee "$out/side_by_side.log"
echo "side_by_side: exit ${PIPESTATUS[0]}"
GPU_CHECK_TIMEOUT=320 bash benchmarks/gpu_check.sh --packing --window 30 --variants 1e,1g,4e,4g,16g \
  --json "$out/gpu_packing.json" 2>&1 | tee "$out/gpu_packing.log"
echo "gpu_packing: exit ${PIPESTATUS[0]}"
