#!/usr/bin/env bash
# On the GPU machine (the device tool): install Kiln without touching the preinstalled torch /
# cuda-bindings, run the GPU tests, then the benchmarks. Logs go to $OUT (or ./out).
# Usage: bash .ci/device.sh [tests] [latency] [throughput] [kernels]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for what in "$@"; do
  case $what in
    tests) timeout 300 python3 -m pytest tests/gpu -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -15 ;;
    latency) timeout 300 kiln bench latency --config configs/llama-3-8b.json --hf --steps 64 2>&1 | tee "$OUT/latency.log" | tail -16 ;;
    throughput) timeout 480 kiln bench throughput --config configs/llama-3-8b.json ${TP_ARGS:-} 2>&1 | tee "$OUT/throughput.log" | tail -18 ;;
    kernels) timeout 200 kiln bench kernels 2>&1 | tee "$OUT/kernels.log" | tail -14 ;;
  esac
done
