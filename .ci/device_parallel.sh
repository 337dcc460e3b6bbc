#!/usr/bin/env bash
# CANNOT RUN TODAY: written for the future multi-GPU run (issue 14). It needs a machine with at
# least TP x PP GPUs of one host (the device tool's nvidia-h200-x2 / -x4 kinds); nothing in CI runs it.
#
# Tensor x pipeline parallelism on GPUs: torchrun starts TP x PP ranks, one GPU each, NCCL (NVLink
# multicast left off: NCCL_NVLS_ENABLE=0), each running its stage / shard of a random-init model of
# tests/configs.py with the reference backend (.ci/parallel_compare.py); rank 0 compares greedy
# tokens and logits with the same model in one process. Then `kiln generate --tp/--pp` is NOT run:
# the entry points spawn CPU (gloo) workers only today.
# Needs, carried (git-ignored, made here first): .whl (lark, gguf wheels for cp312; see
# .ci/device_compare.sh). A CPU smoke of the driver (gloo, runs here):
#   torchrun --standalone --nproc-per-node 4 .ci/parallel_compare.py --tp 2 --pp 2 --cpu --steps 3
# Usage: bash .ci/device_parallel.sh [tp2] [pp2] [tp2pp2]  (default: all three)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
gpus=$(nvidia-smi --list-gpus | wc -l)
rm -rf /tmp/new; mkdir -p /tmp/new/kiln   # this tree laid out as the `kiln` package (see device_compare.sh)
for f in api/*; do ln -s "$(readlink -f "$f")" /tmp/new/kiln/; done
for p in dsl codegen runtime; do ln -s "$(readlink -f "$p")" "/tmp/new/kiln/$p"; done
modes=${*:-tp2 pp2 tp2pp2}
for mode in $modes; do
  case $mode in
    tp2) tp=2; pp=1 ;;
    pp2) tp=1; pp=2 ;;
    tp2pp2) tp=2; pp=2 ;;
    *) echo "unknown mode $mode (tp2, pp2, tp2pp2)"; exit 2 ;;
  esac
  n=$((tp * pp))
  if [ "$gpus" -lt "$n" ]; then echo "== $mode: needs $n GPUs, this machine has $gpus: skipped"; continue; fi
  echo "== $mode: torchrun, $n ranks (tp $tp x pp $pp), NCCL"
  PYTHONPATH=/tmp/new:/tmp/site:. timeout ${RUN_TIMEOUT:-300} torchrun --standalone --nproc-per-node "$n" \
    .ci/parallel_compare.py --tp "$tp" --pp "$pp" ${CONFIGS:+--configs "$CONFIGS"} 2>&1 | tee "$OUT/parallel-$mode.log" | tail -20
done
