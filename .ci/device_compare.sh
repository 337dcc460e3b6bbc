#!/usr/bin/env bash
# On the GPU machine (the device tool): the GPU tests against this checkout, then `kiln bench
# latency` of this checkout and of an earlier commit in the same call (A/B/A/B), to show a change
# costs no speed. Needs, carried (both git-ignored, made here first):
#   .whl   lark, gguf, cuda-python / cuda-bindings / cuda-pathfinder wheels for cp312 (the device
#          tool's README says how: pip download --python-version 3.12 ...)
#   .old   the earlier commit's tree: git archive COMMIT | tar -x -C .old
# Each tree runs from a folder of symbolic links that lays it out as the `kiln` package
# (api/ as kiln, dsl/ codegen/ runtime/ inside), so neither is installed and both can run.
# Usage: bash .ci/device_compare.sh [tests] [kernels] [latency] [quant] [profile] [throughput]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader

layout() {  # layout TREE DEST: DEST/kiln is TREE laid out as the package
  rm -rf "$2"; mkdir -p "$2/kiln"
  for f in "$1"/api/*; do ln -s "$(readlink -f "$f")" "$2/kiln/"; done
  for p in dsl codegen runtime; do ln -s "$(readlink -f "$1/$p")" "$2/kiln/$p"; done
}
layout . /tmp/new
layout .old /tmp/old
kiln_new() { PYTHONPATH=/tmp/new:/tmp/site:. python3 -m kiln.cli "$@"; }
kiln_old() { (cd .old && PYTHONPATH=/tmp/old:/tmp/site python3 -m kiln.cli "$@"); }

for what in "$@"; do
  case $what in
    tests)
      PYTHONPATH=/tmp/new:/tmp/site:. timeout ${TEST_TIMEOUT:-420} python3 -m pytest ${TESTS:-tests/gpu tests/test_op_clamp.py tests/test_ops_norm_variants.py} -q -p no:cacheprovider -p no:randomly --maxfail=25 ${PYTEST_EXTRA:-} \
        2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
    latency)
      for run in new old new old new old; do
        echo "== latency: $run"
        "kiln_$run" bench latency --config configs/llama-3-8b.json --steps 64 2>&1 | tee -a "$OUT/latency-$run.log" | tail -12
      done ;;
    kernels)
      PYTHONPATH=/tmp/new:/tmp/site:. python3 -m kiln.codegen.bench_kernels --md "$OUT/kernels.md" 2>&1 \
        | tee "$OUT/kernels.log" | tail -60 ;;
    quant)  # batch-1 decode with weights quantized on load, beside bf16 (the latency runs above)
      for q in fp8 int8-wo int4-wo; do
        echo "== latency: new --quantization $q"
        kiln_new bench latency --config configs/llama-3-8b.json --steps 64 --quantization $q 2>&1 \
          | tee -a "$OUT/latency-$q.log" | tail -12
      done ;;
    profile)  # batch-1 decode, kernel by kernel (graphs off), bf16 and int4
      for q in none int4-wo; do
        PYTHONPATH=/tmp/new:/tmp/site:. python3 .ci/profile_decode.py --quantization $q 2>&1 | tee "$OUT/profile-$q.log" | tail -28
      done ;;
    throughput)
      kiln_new bench throughput --config configs/llama-3-8b.json --requests 1000 --input-len 128 --output-len 128 \
        2>&1 | tee "$OUT/throughput.log" | tail -20 ;;
  esac
done
