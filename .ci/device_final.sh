#!/usr/bin/env bash
# On the GPU machine: every GPU test of this tree (the warp-specialised prefill kernel's apart,
# under a short timeout of its own since a barrier bug would hang rather than fail), then the
# kernel benchmark. Needs .whl carried (see device_compare.sh). Usage: bash .ci/device_final.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
rm -rf /tmp/new && mkdir -p /tmp/new/kiln
for f in api/*; do ln -s "$(readlink -f "$f")" /tmp/new/kiln/; done
for p in dsl codegen runtime; do ln -s "$(readlink -f "$p")" /tmp/new/kiln/$p; done
export PYTHONPATH=/tmp/new:/tmp/site:.
timeout ${TEST_TIMEOUT:-540} python3 -m pytest tests/gpu tests/test_op_clamp.py tests/test_ops_norm_variants.py -q \
  -p no:cacheprovider -p no:randomly --maxfail=60 --ignore=tests/gpu/test_guided_gpu.py -k "not sm90ws" \
  2>&1 | tee "$OUT/gpu-tests.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -40
ws=--no-ws
timeout ${WS_TIMEOUT:-45} python3 -m pytest tests/gpu/test_kernels.py -q -p no:cacheprovider -k "sm90ws" \
  > "$OUT/gpu-ws.log" 2>&1 && ws=
tail -4 "$OUT/gpu-ws.log"
timeout ${BENCH_TIMEOUT:-100} python3 -m kiln.codegen.bench_kernels $ws --md "$OUT/kernels.md" 2>&1 \
  | tee "$OUT/kernels.log" | tail -45
