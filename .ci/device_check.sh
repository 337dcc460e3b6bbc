#!/usr/bin/env bash
# On the GPU machine (the device tool), one or more modes per call (each call under its 10-minute limit):
#   bash .ci/device_check.sh tests     every GPU test (WORKERS processes, 8; TEST_TIMEOUT 420 s: 300 stopped session 16's run
#                                       in its last 1%), the slowest 12 named; the warp-specialised prefill
#                                       kernel's apart, under a short timeout (a barrier bug would hang)
#   bash .ci/device_check.sh kernels   the kernel benchmark (python -m kiln.codegen.bench_kernels)
#   bash .ci/device_check.sh variants  session 8's kernel variants (GEMV prologues, SwiGLU / rotary variants, Mamba-2 conv+scan)
#   bash .ci/device_check.sh switches  session 8's switches off / on, end to end (KILN_GEMV_PROLOGUE, KILN_SSM_FUSE, KILN_OVERLAP)
#   bash .ci/device_check.sh thru      throughput at TensorRT-LLM's shapes: THRU="Q:ISL:OSL:N[:MAXB[:BUDGET[:ENV=V]]] ..."
#                                         (Q: bf16, fp8 = fp8 weights + fp8 KV cache, fp8r: + fp8-rotated; MAXB default $MAXB or 256, BUDGET
#                                         --max-tokens-per-step, default 2048; ENV=V set for that run); each run's key figures
#   bash .ci/device_check.sh chunkab   session 21 (unrun): fp8 2048/128 (300 requests) and 1000/1000 with KILN_OVERLAP_CHUNKS=0 / 1 (steps after a prompt
#                                         chunk launched ahead), then max batch 512 at a 2,048 and an 8,192-token budget
#                                         (CHUNK_MORE: those runs; empty: none; ~100 s a run, so two calls)
#   bash .ci/device_check.sh s23       session 23 (~7 min): GPU tests of the amax outputs (KILN_FP8_AMAX_FUSE), of the fp8
#                                         wgmma prefill without its split form and of the large mixed graphs
#                                         (KILN_MIXED_GRAPHS_LARGE), the fp8 model tests with the first two on, the fp8
#                                         prefill kernel table, then an fp8 mixed step's profile: defaults, each switch
#   bash .ci/device_check.sh s23all    session 23 in one call: the tests, then fp8 2048/128 with the defaults, with the
#                                         three switches on, with fast accumulation too, and on with a budget of 8,192
#   bash .ci/device_check.sh s25       next session: GPU tests of session 25's work: the split-KV prefill (bf16 and fp8 forms,
#                                         the rescale fix), the mixed graphs' memory check, an RMSNorm before a GEMV with an
#                                         epilogue or post-scaled, KILN_SSM_PDL, KILN_DECODE_DYN_PART=1; the split probe if
#                                         the first fail
#   bash .ci/device_check.sh s34       session 34: the Mamba-2 stack kernel's GPU tests, batch 1 KILN_SSM_STACK 0 / 1
#   bash .ci/device_check.sh s34b      once s35 passes: the stack's ring variants (KILN_SSM_STACK_RING), batch 1
#   bash .ci/device_check.sh s35       next session: the stack kernel's GPU tests, .ci/stack_race.py, batch-1 latency
#   bash .ci/device_check.sh s34diag   if s34's tests fail: where the stack kernel first departs, layer by layer
#   bash .ci/device_check.sh s32       session 32: fp8-rotated's GPU tests (and fp8 KV's, rotary GEMV's), batch-1 fp8 / fp8-rotated
#   bash .ci/device_check.sh s32b      session 32: fp8-rotated's batch-1 cost taken apart (latency A/B/C, profiles)
#   bash .ci/device_check.sh s32d      session 32's last call: tests, latency pairs, the rotated kernels at 512 (+ thru)
#   bash .ci/device_check.sh s32e      session 32: Mamba-2 batch 1, KILN_PDL_CHAIN attention / norm / 1
#   bash .ci/device_check.sh s32f      session 32: KILN_PDL_CHAIN=gated: chain tests, Mamba-2 batch 1 A/B/C
#   bash .ci/device_check.sh s32g      session 32: KILN_PDL_CHAIN=auto's tests, Mamba-2 and 8B batch 1
#   bash .ci/device_check.sh s29       next session: session 28's GPU tests, cuBLASLt's algorithms for the decode GEMMs
#   bash .ci/device_check.sh ltab      fp8 128/128 and 128/2048 with KILN_FP8_LT 0 / 512 (tuned cuBLASLt plans in graphs)
#   bash .ci/device_check.sh decode512 an fp8 decode step of 512 x 1,100 as its graph, KILN_FP8_LT 0 / 512: GEMMs vs attention
#   bash .ci/device_check.sh s28       next session: session 27's memory / capture / linear-grid tests, a mixed step's profile
#   bash .ci/device_check.sh s28b      next session: fp8 short shapes at max batch 512 (KILN_PREFILL_LINEAR 0 / 1)
#   bash .ci/device_check.sh mixedgraph  a 128/128 mixed step's kernels, eager and as its graph (the prefill grid's empty blocks)
#   bash .ci/device_check.sh static    fp8 static activation scales + KILN_FP8_OUT_FUSE: tests, 2048/128 and 128/128 A/B
#   bash .ci/device_check.sh gemms     the 8B's GEMMs at 64-2,048 rows: bf16, fp8, fp8 operands swapped, share of fp8 peak
#   bash .ci/device_check.sh s28h200   on an H200: fp8 at the four shapes, bf16 at three (issues 12, 13 targets)
#   bash .ci/device_check.sh s28h200b  on an H200: fp8 at the four shapes, max batch 512, 4,096 tokens a step
#   bash .ci/device_check.sh s27       session 27: session 26's graph tests, then s25thru (fp8 at the four shapes; SWEEP_Q=bf16
#                                         for #12's)
#   bash .ci/device_check.sh s27b      session 27: fp8 128/128 and 128/2048 at max batch 512 and 1,024 (ran out of memory)
#   bash .ci/device_check.sh s26       session 26: the fixed KILN_SSM_PDL test, "lone" prologues, the split prefill on;
#                                         batch-1 A/Bs: Mamba-2 KILN_SSM_PDL=1 + KILN_GEMV_PROLOGUE=lone, 8B bf16 lone
#   bash .ci/device_check.sh s25ab     next session: batch-1 A/Bs of KILN_GEMV_PROLOGUE 0 / norm / post (8B bf16, Mamba-2),
#                                         KILN_SSM_PDL 0 / 1 (Mamba-2) and KILN_DECODE_DYN_PART 0 / 1
#   bash .ci/device_check.sh s25thru   next session: bench throughput --sweep (one process, one model): fp8 at 128/128,
#                                         128/2048, 1000/1000, 2048/128 (SWEEP_Q=bf16, SWEEP_SHAPES, SWEEP_N, MAXB)
#   bash .ci/device_check.sh s24       session 24: the split-KV prefill probe, the fp8 / graph tests with session 23's switches and
#                                         fast accumulation on, then fp8 1000/1000 with the defaults and with them on
#   bash .ci/device_check.sh s24b      session 24: the split-KV probe on four head shapes, the mixed-graph memory check's tests,
#                                         fp8 2048/128 with the new defaults at budgets of 2,048 and 8,192
#   bash .ci/device_check.sh s23b      session 23: the fp8-cache decode kernel by page size, then fp8 1000/1000 with
#                                         S23_ON at 16- and 32-token pages and with KILN_FP8_FAST_ACCUM=1
#   bash .ci/device_check.sh s23thru   session 23: fp8 2048/128 (300 requests): defaults, KILN_PREFILL_FP8_SM90=1,
#                                         KILN_FP8_AMAX_FUSE=1, KILN_MIXED_GRAPHS_LARGE=1, a budget of 8,192 tokens (S23_THRU: the runs)
#   bash .ci/device_check.sh fp8prefill  session 21 (unrun): KILN_PREFILL_FP8_SM90=1 (the wgmma prefill kernel on an fp8
#                                         cache): its GPU tests and the fp8-cache model / mixed-step tests with it on, the
#                                         kernel table (bench_kernels --only fp8prefill), an fp8 mixed step's profile 0 / 1,
#                                         then fp8 2048/128 throughput (PF8_N requests, 300) 0 / 1
#   bash .ci/device_check.sh fastaccum  session 21 (unrun): KILN_FP8_FAST_ACCUM=1 (cuBLASLt fp8 GEMMs with fast
#                                         accumulation): its GPU test and the fp8 GEMM / model tests with it on, the GEMM table
#                                         (bench_kernels --only fp8gemm), then fp8 1000/1000 throughput 0 / 1
#   bash .ci/device_check.sh s21       session 21's unrun work in one call (~6 min): the GPU tests of the fp8 wgmma prefill,
#                                         fast accumulation, chunk-continuing overlap and the graphs captured ahead (bench
#                                         throughput's warm-up), the fp8prefill and fp8gemm kernel
#                                         tables, then an fp8 mixed step's profile (host vs wall too) with the defaults and with
#                                         KILN_PREFILL_FP8_SM90=1 KILN_FP8_FAST_ACCUM=1; the throughput A/Bs are chunkab,
#                                         fastaccum's and fp8prefill's thru_runs lines
#   bash .ci/device_check.sh dynpart   session 21 (unrun): KILN_DECODE_DYN_PART=1 (the decode partition from the step's
#                                         context): its GPU tests and the decode / race / model tests with it on, then
#                                         batch-1 steps 0 / 1 (ab_runs: int4-wo+lm-head and bf16)
#   bash .ci/device_check.sh fresh     KILN_FRESH_SDPA off / on: its GPU test, then TTFT of a 2,048-token prompt
#   bash .ci/device_check.sh fp8prof   where an fp8 (weights + KV) decode step of 256 sequences at context 1,500 goes
#   bash .ci/device_check.sh mixedprof where an fp8 mixed step of a 1000/1000 run goes (256 decode rows + a 1,792-token chunk),
#                                         kernel by kernel, then bf16's
#   bash .ci/device_check.sh triggers  KILN_PDL_TRIGGER off / on: the GEMV tests and the trigger chains under load
#                                         (tests/gpu/test_pdl_triggers.py) under xdist (the bf16 Mamba-2 prologue case failed
#                                         with them on until session 11), then batch-1 decode of the 8B and Mamba-2 shapes
#   bash .ci/device_check.sh depload   KILN_DEP_LOAD ca / cg / weak (how dependent kernels load the kernel before's
#                                         output): the GEMV tests, then batch-1 decode of the 8B and Mamba-2 shapes
#   bash .ci/device_check.sh fp8mma    the one-row fp8 GEMV's tensor-core variant: its GPU tests, the kernel table with
#                                         its grid sweep, then fp8 batch-1 decode with KILN_FP8_GEMV_DECODE=int / mma and bf16
#   bash .ci/device_check.sh fp8race   the fp8 GEMV tests six times, early triggers on / off alternately
#   bash .ci/device_check.sh deploadbench   depload's decode figures alone
#   bash .ci/device_check.sh actquant  the fp8 activation quantization's grid variants: their GPU test, the kernel
#                                         table, then an fp8 mixed step's profile at the defaults and at 8 blocks/SM x 4
#   bash .ci/device_check.sh b1prof    where a batch-1 decode step of the 8B shape goes, bf16 then fp8 (kernel by kernel)
#   bash .ci/device_check.sh anatomy   the one-row fp8 GEMV with parts cut from its source (.ci/fp8_gemv_anatomy.py)
#   bash .ci/device_check.sh fp8ab     session 13: the GPU tests named fp8 or quant, the fp8 GEMV's anatomy (.ci/fp8_gemv_anatomy.py), then fp8 batch-1
#                                         decode with KILN_FP8_GEMV_DECODE=int / mma alternately, and bf16
#   bash .ci/device_check.sh chain     KILN_PDL_CHAIN (norm, activation, rotary + KV write, decode attention as programmatic
#                                         dependents): its GPU tests and the trigger chains under load, then batch-1 decode of the
#                                         8B shape (bf16, fp8) and Mamba-2 with it off / on, twice
#   bash .ci/device_check.sh unrun13   what session 13 wrote without device time: the fp8 padding-rows fix's tests
#                                         (test_fp8_graph_padding.py, test_quant_kernels.py -k valid), then the fp8 engine test
#                                         that failed once in session 13, five times in fresh processes
#   bash .ci/device_check.sh epi       the gate+up GEMV with the SwiGLU in its epilogue: its GPU tests (and session 13's
#                                         padding / chain tests), then bf16 and fp8 batch-1 decode with KILN_GEMV_EPILOGUE=0 / 1,
#                                         twice
#   bash .ci/device_check.sh normpro   KILN_GEMV_PROLOGUE=norm: the prologue / epilogue GPU tests, bf16 batch-1 TPOT with
#                                         it 0 / norm, fp8 batch-1 decode with KILN_FP8_GEMV_EPILOGUE=0 / 1, each twice
#   bash .ci/device_check.sh rope      the qkv GEMV with the rotary + KV write in its epilogue: its GPU tests (and the rotary,
#                                         epilogue and kernel tests), then bf16 batch-1 TPOT and model step, KILN_GEMV_ROPE=0 / 1, twice
#   bash .ci/device_check.sh fp8rope   the fp8 qkv GEMV with the rotary + KV write in its epilogue: the rotary GPU tests, then fp8
#                                         batch-1 decode with KILN_FP8_GEMV_ROPE=0 / 1, twice
#   bash .ci/device_check.sh tpot      bf16 batch-1 engine TPOT with the defaults, TPOT_RUNS (3) times, and the call's roofline
#   bash .ci/device_check.sh partition batch-1 paged decode attention per KV partition (.ci/decode_partition.py)
#   bash .ci/device_check.sh fp8kv     the fp8-cache decode kernel per shape and page size, and random-chunk gathers
#   bash .ci/device_check.sh ssmprof   where a Mamba-2 2.7B batch-1 decode step goes (kernel times, then the graphed step)
#   bash .ci/device_check.sh int4ncu   session 16: hardware counters (ncu) of the INT4 GEMV variants at one row
#   bash .ci/device_check.sh int4anat  session 16: the one-row INT4 GEMV variants with parts cut from their source
#   bash .ci/device_check.sh int4warp  session 16: the INT4 warp GEMV's GPU tests, then its anatomy
#   bash .ci/device_check.sh int4ab    session 16: the INT4 warp GEMV's GPU tests and anatomy, then int4 batch-1 decode loop / warp
#   bash .ci/device_check.sh int4prof  session 16: where an int4 weight-only batch-1 decode step goes (kernel by kernel)
#   bash .ci/device_check.sh quantdefaults  session 16: the quantized paths' GPU tests under the new defaults, then
#                                         bf16 / fp8 / int4-wo batch-1 decode
#   bash .ci/device_check.sh int4epi   session 16: the int4 gate+up GEMV with the SwiGLU in its epilogue: GPU tests, decode 0 / 1
#   bash .ci/device_check.sh overlap   session 17: a decode step of 256 sequences as one batch, as two halves in turn, and as two
#                                         halves on two streams at once (.ci/overlap_probe.py), bf16 then fp8 (weights + KV)
#   bash .ci/device_check.sh fp8x      session 17: the one-row fp8 GEMV with x read once (KILN_FP8_GEMV_XONCE): its GPU tests,
#                                         the kernel table (.ci/fp8_x_probe.py), then fp8 batch-1 decode with it 0 / 1, X_RUNS (2) times
#   bash .ci/device_check.sh lmhead    session 17 (written without device time): the quantized LM head (--quantization
#                                         SCHEME+lm-head): the GPU scheme tests, then batch-1 decode of the 8B shape in bf16, fp8,
#                                         fp8+lm-head, int4-wo and int4-wo+lm-head, twice
#   bash .ci/device_check.sh fusions   session 18: switches off / on on the GPU's step time (decode_back_to_back_ms): by
#                                         default the fp8 / int4 GEMV epilogues and the fused Mamba-2 conv + scan; AB=...
#   bash .ci/device_check.sh int4rope  session 18 (written without device time): the int4 qkv GEMV's rotary epilogue
#                                         (KILN_INT4_GEMV_ROPE=1): its GPU tests, then int4-wo+lm-head decode off / on
#   bash .ci/device_check.sh lorarel   session 19: the fp32 cuda backend with adapters against the reference over LORA_SEEDS
#                                         seeds (.ci/lora_rel_probe.py): each seed's worst step, adapters mixed and base rows only
#   bash .ci/device_check.sh lorabisect  session 19: that probe at the failing seed under each of LORA_ENVS (KILN_GEMV=0, ...)
#   bash .ci/device_check.sh int4q     session 19: the INT4 warp GEMV at the 8B shapes (chooser's grid) and the int4-wo+lm-head
#                                         step: run in two trees in turn to A/B a kernel change
#   bash .ci/device_check.sh e4m3cvt   session 19: KILN_E4M3_CVT=1's GPU tests, then the fp8-cache decode kernel 0 / 1 (on since)
#   bash .ci/device_check.sh earlykv   session 20: KILN_DECODE_EARLY_KV=1's GPU tests, then batch-1 steps 0 / 1 (on since)
#   bash .ci/device_check.sh grid      session 20: KILN_DECODE_GRID=splits-last's GPU tests, batch-1 steps in each order (on since)
#   bash .ci/device_check.sh steps     session 19: 8B batch-1 decode_back_to_back_ms by precision (STEP_QUANTS), STEP_RUNS rounds
#   bash .ci/device_check.sh retest    the GPU tests changed after a `tests` run (ssm engine, kv scales, quant)
#   bash .ci/device_check.sh optin     session 7's opt-in kernels (both default since): the one-row FP8 GEMV
#                                         (KILN_FP8_GEMV) and the INT4 warp GEMV (KILN_QGEMV=warp, against the loop):
#                                         their GPU tests, kernel tables, and batch-1 decode off / on
#   bash .ci/device_check.sh benches   the figures the open issues ask for: cached-prefix TTFT, LoRA (LORA=1) and
#                                         guided decode overhead, fp8 / int4 batch-1 decode, Mamba-2 decode
# Needs .whl carried (see device_compare.sh; pytest-xdist + execnet, llguidance + jsonschema and deps;
# for KILN_FP8_LT, s29's lt_probe and ltab also nvmath-python 1.0.1 and cuda-core 1.2.2, cp312: `python3 -m pip
# download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
# -d .whl nvmath-python==1.0.1 cuda-core==1.2.2`) and, for the guided benchmark, .tok (a tokenizer.json folder:
# SmolLM2's, exported from the GGUF).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
rm -rf /tmp/new && mkdir -p /tmp/new/kiln
for f in api/*; do ln -s "$(readlink -f "$f")" /tmp/new/kiln/; done
for p in dsl codegen runtime; do ln -s "$(readlink -f "$p")" /tmp/new/kiln/$p; done
export PYTHONPATH=/tmp/new:/tmp/site:.
KILN="python3 -m kiln.cli"  # a command, not a shell function: `timeout` runs it
L=configs/llama-3-8b.json
# Switches A/B'd on the GPU's step time (bench latency's decode_back_to_back_ms, steady within 0.2% where decode_ms
# spreads by 8% or more), alternately, AB_RUNS pairs (2). $1: ';'-separated items "QUANTIZATION VARIABLE OFF ON
# CONFIG" (none: bf16).
ab_runs() {
  IFS=';' read -ra items <<< "$1"
  for i in $(seq ${AB_RUNS:-2}); do for item in "${items[@]}"; do
    read -r q var off on cfg <<< "$item"; opt=(--quantization $q); [ $q = none ] && opt=()
    for v in $off $on; do echo "batch-1 decode, $cfg $q $var=$v $(env $var=$v timeout 60 $KILN bench latency --config $cfg \
      "${opt[@]}" --prompt 1024 --steps 64 2>&1 | grep -a -E "^\| (decode_back_to_back_ms|roofline_ms) |Error" \
      | tr '\n' ' ')"; done; done; done
}
thru_runs() {  # $1: the THRU items (see the thru mode)
  for item in $1; do
    IFS=: read -r q isl osl n mb budget envset page <<< "$item"
    mb=${mb:-${MAXB:-256}}; budget=${budget:-2048}; envset=${envset:-KILN_NOTHING=0}; page=${page:-16}
    qa=""; [ "$q" = fp8 ] && qa="--quantization fp8 --kv-cache-dtype fp8"
    [ "$q" = fp8r ] && qa="--quantization fp8 --kv-cache-dtype fp8-rotated"
    echo "== throughput $q $isl/$osl, $n requests, max batch $mb, $budget tokens a step, $envset, $page-token pages"
    env "$envset" timeout ${THRU_TIMEOUT:-300} $KILN bench throughput --config $L $qa --requests $n --input-len $isl \
      --output-len $osl --max-batch $mb --max-tokens-per-step $budget --page-size $page 2>&1 | tee -a "$OUT/thru.log" | grep -a -E "^\| (output_tok_s|seconds|kv|preemptions|decode_steps|decode_steps_s|decode_step_ms_p50|mixed_steps|mixed_steps_s|mixed_step_ms_p50|ttft_p50_ms) |Error"
  done
}
rotated_tests() {  # $1: the log's name, $2...: more GPU test files: fp8-rotated's GPU tests and the fp8 KV / rotary ones
  local log=$1; shift
  timeout 300 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_kv_rotated_gpu.py \
    tests/gpu/test_cuda_backend.py tests/gpu/test_gemv_rope.py tests/gpu/test_pdl_chain.py \
    tests/gpu/test_prefix_cache_gpu.py tests/gpu/test_decode_short.py "$@" 2>&1 | tee "$OUT/$log" \
    | grep -a -E "^(FAILED|ERROR)|passed|failed|skipped" | tail -20
}
mamba_latency() {  # $1: a variable, $2...: its values, in order, twice over: Mamba-2 2.7B's batch-1 latency under each
  local var=$1; shift
  for i in 1 2; do for c in "$@"; do echo "== mamba2 batch 1, $var=$c"; env $var=$c \
    timeout 60 $KILN bench latency --config configs/mamba2-2.7b.json --prompt 1024 --steps 64 2>&1 \
    | grep -a -E "^\| (decode_ms|decode_back_to_back_ms|roofline_ms|ssm_stack_ran) |Error"; done; done
}
kv_latency() {  # $@: --kv-cache-dtype values, in order: the 8B's batch-1 latency with fp8 weights and each cache
  for kvd in "$@"; do echo "== latency fp8 weights, --kv-cache-dtype $kvd"
    timeout 60 $KILN bench latency --config $L --quantization fp8 --kv-cache-dtype $kvd --prompt 1024 --steps 64 \
      2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done
}
for mode in "$@"; do
  case $mode in
    tests)
      timeout ${TEST_TIMEOUT:-420} python3 -m pytest tests/gpu tests/test_op_clamp.py tests/test_ops_norm_variants.py \
        -q -p no:cacheprovider -n ${WORKERS:-8} --maxfail=80 --ignore=tests/gpu/test_guided_gpu.py -k "not sm90ws" \
        --durations=12 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "^(FAILED|ERROR)|passed|failed|^[0-9.]+s call" | tail -50
      timeout ${WS_TIMEOUT:-45} python3 -m pytest tests/gpu/test_kernels.py -q -p no:cacheprovider -k "sm90ws" \
        > "$OUT/gpu-ws.log" 2>&1; tail -1 "$OUT/gpu-ws.log" ;;
    kernels)
      timeout ${BENCH_TIMEOUT:-200} python3 -m kiln.codegen.bench_kernels --no-ws --md "$OUT/kernels.md" \
        > "$OUT/kernels.log" 2>&1; tail -5 "$OUT/kernels.log" ;;
    benches)
      timeout 60 $KILN bench prefix --config $L 2>&1 | tail -1 | tee -a "$OUT/benches.log"
      [ -n "${LORA:-}" ] && timeout 90 $KILN bench throughput --config $L --requests 64 --input-len 128 --output-len 64 --lora-adapters 8 \
        --lora-rank 16 2>&1 | grep -a -E '^\| (lora_decode_ratio|decode_step_ms_p50|base_decode_step_ms_p50) |Error' | tee -a "$OUT/benches.log"
      timeout 80 $KILN bench throughput --config $L --requests 64 --input-len 128 --output-len 64 --guided json \
        --tokenizer .tok 2>&1 | grep -a -E '^\| (guided_step_overhead|decode_step_ms_p50) |Error' | tee -a "$OUT/benches.log"
      for q in fp8 int4-wo; do timeout 40 $KILN bench latency --config $L --quantization $q --steps 64 2>&1 \
        | grep -a -E "^\| (decode_ms|roofline_ms) |decode / roofline|Error" | tee -a "$OUT/benches.log"; done
      timeout 40 $KILN bench latency --config configs/mamba2-2.7b.json --prompt 1024 --steps 64 2>&1 \
        | grep -a -E "^\| (decode_ms|roofline_ms|state_rw_MB) |decode / roofline|Error" | tee -a "$OUT/benches.log"
      timeout 150 python3 .ci/ssm_decode_contexts.py --config configs/mamba2-2.7b.json --contexts 1024,16384,65536 \
        --attention configs/llama-2.7b.json --steps 32 2>&1 | tail -14 | tee -a "$OUT/benches.log" ;;
    optin)  # session 7's opt-in kernels: correct? faster? (then flip their defaults)
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-6} tests/gpu/test_gemv_fp8.py \
        tests/gpu/test_quant_kernels.py 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tee "$OUT/optin-tests.log"
      timeout 240 python3 -m kiln.codegen.bench_kernels --only fp8gemv,int4 > "$OUT/optin-kernels.md" 2>&1
      tail -40 "$OUT/optin-kernels.md"
      for v in 0 pdl; do echo "fp8, KILN_FP8_GEMV=$v"; KILN_FP8_GEMV=$v timeout 40 $KILN bench latency --config $L \
        --quantization fp8 --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done
      for v in loop warp; do echo "int4-wo, KILN_QGEMV=$v"; KILN_QGEMV=$v timeout 40 $KILN bench latency --config $L \
        --quantization int4-wo --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done ;;
    variants)  # session 8's kernel variants beside the kernels they would replace
      timeout ${BENCH_TIMEOUT:-200} python3 -m kiln.codegen.bench_kernels --only gemvpro,act,rope,ssm \
        > "$OUT/variants.md" 2>&1; grep -a -E "^\||us per call|Error|error" "$OUT/variants.md" | tail -60 ;;
    switches)  # session 8's switches, off / on, end to end: GEMV prologues, Mamba-2 conv+scan, overlapped steps
      for v in 0 1; do echo "KILN_GEMV_PROLOGUE=$v"; KILN_GEMV_PROLOGUE=$v timeout 60 $KILN bench latency --config $L \
        --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done
      for v in 0 1; do for f in 0 1; do echo "mamba2 KILN_SSM_FUSE=$v KILN_GEMV_PROLOGUE=$f"; KILN_SSM_FUSE=$v \
        KILN_GEMV_PROLOGUE=$f timeout 60 $KILN bench latency --config configs/mamba2-2.7b.json --prompt 1024 --steps 64 \
        2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done; done
      for v in 0 1; do echo "KILN_OVERLAP=$v"; KILN_OVERLAP=$v timeout 90 $KILN bench throughput --config $L --requests 1 \
        --max-batch 1 --input-len 128 --output-len 256 2>&1 | grep -a -E "^\| (tpot_p50_ms|decode_step_ms_p50) |Error"; done ;;
    thru) thru_runs "${THRU:-bf16:1000:1000:1000}" ;;
    s23)  # session 23: the fp8 wgmma prefill without its split form, and the norm / activation amax outputs
      timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_amax_fuse.py \
        tests/gpu/test_kernels.py tests/gpu/test_mixed_split.py tests/gpu/test_cuda_backend.py \
        -k "amax or fp8_kv_prefill or large or greedy_equals or set_page_size or many_q_tiles" 2>&1 | tee "$OUT/s23-kernels.log" \
        | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      KILN_PREFILL_FP8_SM90=1 KILN_FP8_AMAX_FUSE=1 timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider \
        -n ${WORKERS:-8} tests/gpu/test_mixed_split.py tests/gpu/test_cuda_backend.py tests/gpu/test_quant_kernels.py \
        tests/gpu/test_fp8_graph_padding.py -k "fp8" 2>&1 | tee "$OUT/s23-on.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      timeout 150 python3 -m kiln.codegen.bench_kernels --only fp8prefill 2>&1 | grep -a -E "^\||rror|prefill"
      for v in "KILN_NOTHING=0" "KILN_PREFILL_FP8_SM90=1" "KILN_FP8_AMAX_FUSE=1"; do echo "== fp8 mixed step, $v"; env $v \
        timeout 150 python3 .ci/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 --batch 256 --ctx 1500 \
        --prefill 1792 --steps 3 2>&1 | grep -v Warn | head -${TOP:-16}; done ;;
    s23all)  # session 23 in one call (~8 min): its GPU tests, the fp8 prefill table, fp8 2048/128 defaults / all three on / + 8,192
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_amax_fuse.py \
        tests/gpu/test_kernels.py tests/gpu/test_mixed_split.py tests/gpu/test_cuda_backend.py \
        -k "amax or fp8_kv_prefill or large or greedy_equals or set_page_size or many_q_tiles" 2>&1 | tee "$OUT/s23-tests.log" \
        | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -14
      ON="KILN_PREFILL_FP8_SM90=1 KILN_FP8_AMAX_FUSE=1 KILN_MIXED_GRAPHS_LARGE=1"
      thru_runs "fp8:2048:128:300:256:2048"
      for v in "2048 KILN_NOTHING=0" "2048 KILN_FP8_FAST_ACCUM=1" "8192 KILN_NOTHING=0"; do set -- $v
        echo "== all three on, budget $1, $2"; env $ON $2 timeout 200 $KILN bench throughput --config $L \
        --quantization fp8 --kv-cache-dtype fp8 --requests 300 --input-len 2048 --output-len 128 --max-batch 256 \
        --max-tokens-per-step $1 2>&1 | tee -a "$OUT/thru.log" | grep -a -E "^\| (output_tok_s|seconds|graphs_captured|warmup_s|mixed_steps|mixed_steps_s|mixed_step_ms_p50|decode_step_ms_p50) |Error"; done ;;
    s25)  # next session (~8 min): the GPU tests of what session 25 wrote: the split-KV prefill with session 24's rescale
          # fix, bf16 and (new) fp8 forms (prefill, prefix, the mixed graphs' memory check); an RMSNorm fused before a GEMV
          # with an epilogue and post-scaled (KILN_GEMV_PROLOGUE=norm / post); Mamba-2's conv + scan as a programmatic
          # dependent (KILN_SSM_PDL); KILN_DECODE_DYN_PART=1's decode tests; on a failure of the first, the split probe
          # (S25_PROBE=1: always)
      timeout 240 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_mixed_split.py \
        tests/gpu/test_kernels.py tests/gpu/test_prefix_cache_gpu.py -k "memory or large or split or prefill or prefix" 2>&1 \
        | tee "$OUT/s25-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -10
      timeout 120 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_gemv_prologue.py \
        tests/gpu/test_gemv_rope.py tests/gpu/test_gemv_epilogue.py tests/gpu/test_ssm_kernels.py 2>&1 | tee "$OUT/s25-prologue.log" \
        | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -10
      KILN_DECODE_DYN_PART=1 timeout 120 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_kernels.py \
        tests/gpu/test_decode_early_kv.py tests/gpu/test_cuda_backend.py -k "decode or early or dynamic" 2>&1 \
        | tee "$OUT/s25-dynpart.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      if [ -n "${S25_PROBE:-}" ] || grep -q -E "^FAILED.*(split|prefill)" "$OUT/s25-tests.log"; then
        SHAPE=32,8,128,16 REPEAT=1 CTX=129,0 NEW=128,5 timeout 60 python3 .ci/split_probe.py 2>&1 | grep -v Warn | tail -12; fi ;;
    s31)  # next session (~7 min): session 30's KILN_DECODE_SHORT (the fp8-cache decode kernel's two-warp shape for
          # steps of >= S sequences within C tokens, eager and as second graphs): its GPU tests, then fp8 128/128 and
          # 128/2048 at max batch 512 with it off / 256:512 (session 30: the kernel alone 27% faster at 512 x 200)
      timeout 150 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_decode_short.py \
        tests/gpu/test_graph_memory.py 2>&1 | tee "$OUT/s31-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -6
      for v in 0 256:512; do echo "== KILN_DECODE_SHORT=$v"; KILN_DECODE_SHORT=$v MAXB=512 BUDGET=4096 \
        SWEEP_SHAPES=128/128,128/2048 THRU_TIMEOUT=200 bash "$0" s25thru; done ;;
    s30)  # session 30 (~6 min): the mended mixed-graph buffer test; where the step goes, as graphs: fp8 decode at 512
          # sequences (context 200: a 128/128 run's; 1,100: 128/2048's), fp8+lm-head and Mamba-2 at batch 1
      timeout 120 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_graph_memory.py 2>&1 \
        | tee "$OUT/s30-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -4
      for c in ${CTXS:-200 1100}; do echo "== fp8 decode step, 512 x $c"; timeout 150 python3 .ci/profile_decode.py \
        --quantization fp8 --kv-cache-dtype fp8 --batch 512 --ctx $c --steps 4 --graphs 2>&1 | grep -v Warn \
        | head -${TOP:-22}; done
      echo "== fp8+lm-head, batch 1, context 1,024"; timeout 120 python3 .ci/profile_decode.py --quantization \
        fp8+lm-head --ctx 1024 --steps 8 --graphs 2>&1 | grep -v Warn | head -${TOP:-22}
      echo "== Mamba-2 2.7B, batch 1"; timeout 120 python3 .ci/profile_decode.py --spec models/mamba2.kiln \
        --config configs/mamba2-2.7b.json --ctx 1024 --steps 8 --graphs 2>&1 | grep -v Warn | head -${TOP:-22} ;;
    kvshapes16)  # (~2 min) the same shapes on a bf16 cache (session 31, H100: the default within 2% of the best
                 # shape at 256 x 200 (89% of copy bandwidth), 95-101% at longer contexts: no short shape for bf16)
      timeout 300 python3 -c "
import kiln.codegen.bench_kernels as b
b.FP8KV_VARIANTS = ((0, 0, 0), (4, 3, 3), (2, 4, 4), (2, 3, 4), (2, 6, 4), (4, 4, 4))
print(b.fp8_kv_variants_table(b.copy_bandwidth(), shapes=((256, 200), (256, 1100), (256, 2000), (64, 4096)), bf16=True))
" 2>&1 | grep -v Warn | tail -10 ;;
    kvshapes)  # (~2 min) the fp8-cache decode kernel's shapes (warps, stages, min blocks an SM) at a 128/128 run's
               # 512 x 200 and a 128/2048 run's 512 x 1,100 (session 30, H100: 60% of copy bandwidth at 512 x 200 by
               # default, 83% with w2s4b4), beside 256 x 1,500 and 64 x 4,096 (min blocks: at most 4)
      timeout 300 python3 -c "
import kiln.codegen.bench_kernels as b
b.FP8KV_VARIANTS = ((0, 0, 0), (4, 3, 3), (4, 2, 4), (2, 4, 4), (2, 3, 4), (2, 6, 4), (8, 3, 2))
print(b.fp8_kv_variants_table(b.copy_bandwidth(), shapes=((512, 200), (512, 1100), (256, 1500), (64, 4096))))
" 2>&1 | grep -v Warn | tail -12 ;;
    s32)  # session 32 (~5 min): --kv-cache-dtype fp8-rotated on the cuda backend: its GPU tests, the fp8 KV tests and
          # rotary GEMV tests beside them; batch-1 latency with fp8 weights, an fp8 and an fp8-rotated cache
      rotated_tests s32-tests.log
      kv_latency fp8 fp8-rotated ;;
    s32b)  # session 32 (~4 min): where fp8-rotated's batch-1 time goes: latency with fp8, fp8 without the qkv GEMV's
           # rotary epilogue (KILN_GEMV_ROPE=0), fp8-rotated; the last's step profiled as graphs at batch 1 and 512 x 200
      for run in "fp8 KILN_GEMV_ROPE=1" "fp8 KILN_GEMV_ROPE=0" "fp8-rotated KILN_GEMV_ROPE=1"; do set -- $run
        echo "== latency fp8 weights, --kv-cache-dtype $1, $2"; env $2 timeout 60 $KILN bench latency --config $L \
          --quantization fp8 --kv-cache-dtype $1 --prompt 1024 --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"
      done
      for b in "1 1024" "512 200"; do set -- $b; echo "== profile fp8-rotated, batch $1, context $2"
        timeout 120 python3 .ci/profile_decode.py --quantization fp8 --kv-cache-dtype fp8-rotated --batch $1 --ctx $2 \
          --graphs 2>&1 | tail -24; done ;;
    s32d)  # session 32's last call (~7 min): s32's tests; latency fp8 / fp8-rotated twice; the rotated kernels at 512 x 200;
           # then run it with the thru mode: MAXB=512 THRU="fp8:128:128:3000 fp8r:128:128:3000"
      rotated_tests s32d-tests.log tests/gpu/test_mixed_split.py
      kv_latency fp8 fp8-rotated fp8 fp8-rotated
      timeout 120 python3 .ci/profile_decode.py --quantization fp8 --kv-cache-dtype fp8-rotated --batch 512 --ctx 200 \
        --graphs 2>&1 | grep -a -E "rope|unrotate|GPU kernel time" ;;
    s34)  # next session (~6 min): Mamba-2's layer stack as one persistent kernel (KILN_SSM_STACK, rewritten in session 34
          # after session 33's branch was lost): its GPU tests (a hang would be a grid barrier's: the timeout ends it),
          # then Mamba-2 2.7B batch 1 with it off / on, alternating, twice
      timeout 300 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_ssm_stack.py \
        tests/gpu/test_ssm_kernels.py 2>&1 | tee "$OUT/s34-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      mamba_latency KILN_SSM_STACK 0 1 ;;
    s35)  # next session (~5 min): session 35 found the stack kernel right at every shape in fp32 but wrong at random in
          # bf16 (reads after grid barrier 1 find in_proj rows not yet written): the GPU tests, then .ci/stack_race.py
          # (8 trials a shape: plain, the device synchronised before each launch, every writer fenced before each
          # barrier), then batch 1 off / on
      timeout 100 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_ssm_stack.py 2>&1 \
        | tee "$OUT/s35-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      timeout 200 python3 .ci/stack_race.py 8 16x32 2.7b-widths family 2>&1 | grep -a -v Warning | tail -20
      mamba_latency KILN_SSM_STACK 0 1 ;;
    s34diag)  # if s34's tests fail (~3 min): where the stack kernel first departs from the step-by-step program, layer
              # by layer and value by value, at the GPU test's shapes, with the default ring and with no bound on
              # copies in flight (.ci/stack_diag.py)
      timeout 400 python3 .ci/stack_diag.py "" 20:0 2>&1 | tee "$OUT/s34diag.log" | grep -a -v Warning | tail -120 ;;
    s34b)  # next session (~7 min), once s34's tests pass: where the stack's time goes (.ci/stack_probe.py: each phase of
           # a layer) with the ring's 20 KB stages and 1 (the default), 2 and 4 copies in flight (the H200's bandwidth
           # may need more than session 33's H100 did), and L2 prefetches while the ring is full, 8 chunks ahead at about
           # an SM's share of bandwidth (20 KB in ~1,400 cycles on an H100) and at twice it; then batch 1 (graphs) for 3
      timeout 200 python3 .ci/stack_probe.py "" 20:2 20:4 20:1:8:1400 20:1:8:700 2>&1 | tee "$OUT/s34b-probe.log" \
        | grep -a -v Warning
      KILN_SSM_STACK=1 mamba_latency KILN_SSM_STACK_RING 20:1 20:2 20:1:8:1400 ;;
    s32e)  # session 32 (~4 min): Mamba-2 2.7B batch 1 with its norms as programmatic dependents too (KILN_PDL_CHAIN norm,
           # 1) against the default (attention), alternating, twice
      mamba_latency KILN_PDL_CHAIN attention norm 1 ;;
    s32f)  # session 32 (~4 min): KILN_PDL_CHAIN=gated (decode attention and the gated norms): the chain tests, then
           # Mamba-2 batch 1 attention / gated / norm alternating, twice
      timeout 200 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_pdl_chain.py \
        tests/gpu/test_pdl_triggers.py 2>&1 | tee "$OUT/s32f-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      mamba_latency KILN_PDL_CHAIN attention gated norm ;;
    s32g)  # session 32 (~3 min): KILN_PDL_CHAIN=auto (the default: a state-space model's norms chained too): the chain,
           # trigger and state-space GPU tests; Mamba-2 batch 1 auto / attention, twice; the 8B bf16 batch 1 (unchanged)
      timeout 240 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_pdl_chain.py \
        tests/gpu/test_pdl_triggers.py tests/gpu/test_ssm_kernels.py 2>&1 | tee "$OUT/s32g-tests.log" \
        | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      mamba_latency KILN_PDL_CHAIN auto attention
      for c in auto attention; do echo "== 8B bf16 batch 1, KILN_PDL_CHAIN=$c"; KILN_PDL_CHAIN=$c timeout 60 $KILN bench \
        latency --config $L --prompt 1024 --steps 64 2>&1 | grep -a -E "^\| (decode_back_to_back_ms|roofline_ms) |Error"; done ;;
    s29)  # next session (~6 min): session 28's GPU tests (one warm-up stream for the captures, the mixed graphs'
          # buffer test mended, the defaults it flipped: KILN_PREFILL_LINEAR, KILN_FP8_OUT_FUSE; KILN_FP8_LT's plans;
          # the GGUF K-quants' kernels; state-space prefix reuse through kept states),
          # cuBLASLt's algorithms for the decode GEMMs (.ci/lt_probe.py; nvmath-python + cuda-core wheels in .whl),
          # then `ltab` if its best algorithms beat _scaled_mm
      timeout 180 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_graph_memory.py \
        tests/gpu/test_fp8_lt.py tests/gpu/test_fp8_out.py tests/gpu/test_ssm_kernels.py 2>&1 \
        | tee "$OUT/s29-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed|skipped" | tail -8
      timeout 120 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_quant_kernels.py \
        -k "q4_k or q5_k or q6_k" 2>&1 | tee "$OUT/s29-kquant.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -6
      timeout 200 python3 .ci/lt_probe.py 2>&1 | grep -v Warn | tail -26 ;;
    decode512)  # (~2 min) an fp8 decode step of 512 sequences at context 1,100 (a 128/2048 run's mean at max batch
                # 512: 20.4 ms a step in session 28) as its graph, KILN_FP8_LT 0 / 512: the GEMMs' share against
                # attention's (floors: the four GEMMs at the fp8 peak ~5.2 ms, the KV read ~8.7 ms)
      for v in 0 512; do echo "== decode step, 512 x 1,100, KILN_FP8_LT=$v"; KILN_FP8_LT=$v timeout 150 python3 \
        .ci/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 --batch 512 --ctx 1100 --steps 4 --graphs 2>&1 \
        | grep -v Warn | head -${TOP:-14}; done ;;
    ltab)  # (~5 min) fp8 128/128 and 128/2048 at max batch 256 and 512 with KILN_FP8_LT 0 / 512 (its tuned cuBLASLt
           # plans in the decode graphs)
      for v in 0 512; do echo "== KILN_FP8_LT=$v"; KILN_FP8_LT=$v SWEEP_SHAPES=128/128 THRU_TIMEOUT=100 bash "$0" s25thru
        KILN_FP8_LT=$v MAXB=512 BUDGET=4096 SWEEP_SHAPES=128/128,128/2048 THRU_TIMEOUT=200 bash "$0" s25thru; done ;;
    s28)  # next session (~6 min): session 27's GPU tests (step memory, the shared pool, the captures ahead, the linear
          # prefill grid, and the engine's tests with it on), then the mixed step's profile (mixedgraph)
      timeout 150 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_graph_memory.py \
        tests/gpu/test_mixed_split.py tests/gpu/test_cuda_backend.py tests/gpu/test_kernels.py \
        -k "memory or pool or graph or mixed or large or linear" 2>&1 \
        | tee "$OUT/s28-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      KILN_PREFILL_LINEAR=1 timeout 150 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} \
        tests/gpu/test_mixed_split.py tests/gpu/test_prefix_cache_gpu.py tests/gpu/test_cuda_backend.py 2>&1 \
        | tee "$OUT/s28-linear.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      bash "$0" mixedgraph ;;
    s28b)  # next session (~8 min): fp8 128/128 at max batch 512 / 4,096 tokens with KILN_PREFILL_LINEAR 0 and 1, then
           # 128/2048 there and 128/128 at 256 / 2,048 (session 27: 6 and 12 mixed captures in the timed region at 512;
           # large_warm_keys now covers them, tests/test_graph_buckets.py)
      for v in 0 1; do echo "== KILN_PREFILL_LINEAR=$v"; KILN_PREFILL_LINEAR=$v MAXB=512 BUDGET=4096 SWEEP_SHAPES=128/128 \
        THRU_TIMEOUT=100 bash "$0" s25thru; done
      MAXB=512 BUDGET=4096 SWEEP_SHAPES=128/2048 THRU_TIMEOUT=200 bash "$0" s25thru
      SWEEP_SHAPES=128/128 THRU_TIMEOUT=100 bash "$0" s25thru ;;
    mixedgraph)  # (~2 min) a 128/128 run's mixed step (256 decode rows at context 200 beside 14 prompts of 128: bucket
                 # (32, 2048, 288, 256)), fp8, eager then replayed as its graph. The graph's prefill attention grid
                 # covers the token bucket for each of the bucket's 32 sequences (64 x 8 x 32 blocks of one block an SM
                 # each, 448 of them with queries): does the empty blocks' time show?
      # (then with KILN_PREFILL_LINEAR=1: the kernel on a grid of the tiles with queries)
      for g in "0 " "0 --graphs" "1 --graphs"; do set -- $g ""; echo "== mixed step KILN_PREFILL_LINEAR=$1 $2"
        KILN_PREFILL_LINEAR=$1 timeout 150 python3 .ci/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 \
          --batch 256 --ctx 200 --prefill 128 --prompts 14 --steps 4 $2 2>&1 | grep -v Warn | head -${TOP:-16}; done ;;
    static)  # (~6 min) fp8 with static activation scales (--fp8-act-scale: TensorRT-LLM's FP8 recipe) and the norm /
             # SwiGLU kernels writing the GEMMs' fp8 inputs (KILN_FP8_OUT_FUSE): its GPU tests, then fp8 2048/128 and
             # 128/128 (weights + KV) dynamic, static, static + fused
      timeout 150 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_fp8_out.py 2>&1 \
        | tee "$OUT/static-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -6
      for shape in 2048/128 128/128; do for v in "dyn 0" "0.05 0" "0.05 1"; do set -- $v
        sa=""; [ "$1" != dyn ] && sa="--fp8-act-scale $1"
        echo "== $shape act scale $1, KILN_FP8_OUT_FUSE=$2 $(KILN_FP8_OUT_FUSE=$2 timeout 150 $KILN bench throughput \
          --config $L --quantization fp8 --kv-cache-dtype fp8 $sa --requests ${STATIC_N:-500} --sweep $shape 2>&1 \
          | grep -a -E "output tok/s|Error" | head -2)"; done; done ;;
    gemms)  # (~1 min) the step's GEMMs by row count: bf16, fp8 per-tensor, fp8 with the operands swapped (.ci/gemm_probe.py)
      timeout 120 python3 .ci/gemm_probe.py 2>&1 | grep -v Warn | tail -30 ;;
    s28h200)  # on an H200 (~9 min): fp8 at the four shapes (TensorRT-LLM's H200 fp8: 128/128 27,911, 128/2048 26,221,
              # 1000/1000 17,744, 2048/128 3,538), then bf16 at three (issue 12: 1000/1000 >= 12,000, 128/128 >=
              # 18,000, 2048/128 >= 2,300)
      THRU_TIMEOUT=300 bash "$0" s25thru
      SWEEP_Q=bf16 SWEEP_SHAPES=128/128,1000/1000,2048/128 THRU_TIMEOUT=240 bash "$0" s25thru ;;
    s28h200b)  # on an H200 (~8 min): fp8 at the four shapes at max batch 512, 4,096 tokens a step (the H200's cache
               # holds 512 sequences of 2,176 tokens twice over since session 27's fp8 sizing fix)
      MAXB=512 BUDGET=4096 THRU_TIMEOUT=500 bash "$0" s25thru ;;
    s27)  # next session (~7 min): the GPU tests of session 26's step counts and prompt-bucket captures ahead, then fp8 at
          # TensorRT-LLM's four shapes (s25thru; its lines now give the mixed steps' p90 / max, prompt tokens a step and
          # how the steps ran: session 26's 128/128 spent half its mixed time past the median, captures in the timed
          # region the likely cause)
      timeout 120 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_mixed_split.py \
        tests/gpu/test_cuda_backend.py -k "graph or mixed" 2>&1 | tee "$OUT/s27-tests.log" \
        | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      bash "$0" s25thru ;;
    s27b)  # next session (~6 min): the short-context shapes at wider batches, where session 26's decode GEMMs of 256 rows
           # ran at about half the fp8 peak: 128/128 and 128/2048 at max batch 512 and 1,024 (4,096 tokens a step)
      for mb in 512 1024; do MAXB=$mb BUDGET=4096 SWEEP_SHAPES=128/128,128/2048 THRU_TIMEOUT=280 bash "$0" s25thru; done ;;
    s26)  # session 26 (~4 min): the fixed KILN_SSM_PDL test, the prologue logits test with "lone", the prefill / prefix /
          # mixed tests with the automatic split on; then batch-1 A/Bs (two pairs): Mamba-2 2.7B with neither and with
          # KILN_SSM_PDL=1 KILN_GEMV_PROLOGUE=lone, 8B bf16 KILN_GEMV_PROLOGUE 0 / lone
      timeout 150 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_ssm_kernels.py \
        tests/gpu/test_gemv_prologue.py tests/gpu/test_mixed_split.py tests/gpu/test_prefix_cache_gpu.py 2>&1 \
        | tee "$OUT/s26-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -10
      for i in 1 2; do for v in "0 0" "1 lone"; do set -- $v
        echo "batch-1 decode, mamba2-2.7b KILN_SSM_PDL=$1 KILN_GEMV_PROLOGUE=$2 $(KILN_SSM_PDL=$1 KILN_GEMV_PROLOGUE=$2 \
          timeout 60 $KILN bench latency --config configs/mamba2-2.7b.json --prompt 1024 --steps 64 2>&1 \
          | grep -a -E "^\| (decode_back_to_back_ms|roofline_ms) |Error" | tr '\n' ' ')"; done; done
      AB_RUNS=2 ab_runs "none KILN_GEMV_PROLOGUE 0 lone $L" ;;
    s25ab)  # next session (~8 min): batch-1 A/Bs (decode_back_to_back_ms): KILN_GEMV_PROLOGUE 0 / norm / post (the 8B shape
            # bf16, twice; Mamba-2 2.7B 0 / post), then once each KILN_SSM_PDL 0 / 1 (Mamba-2) and KILN_DECODE_DYN_PART
            # 0 / 1 (int4-wo+lm-head, bf16)
      AB_RUNS=${AB_RUNS:-2} ab_runs "none KILN_GEMV_PROLOGUE 0 norm $L;none KILN_GEMV_PROLOGUE 0 post $L;none KILN_GEMV_PROLOGUE 0 post configs/mamba2-2.7b.json"
      AB_RUNS=1 ab_runs "none KILN_SSM_PDL 0 1 configs/mamba2-2.7b.json;int4-wo+lm-head KILN_DECODE_DYN_PART 0 1 $L;none KILN_DECODE_DYN_PART 0 1 $L" ;;
    s25thru)  # next session (~6-8 min): TensorRT-LLM's shapes in one process (bench throughput --sweep: one model, an
              # engine per shape), SWEEP_Q (fp8: weights + KV cache; bf16), SWEEP_N requests a shape (1000),
              # SWEEP_SHAPES (fp8: 128/128, 128/2048, 1000/1000, 2048/128), max batch MAXB (256), BUDGET tokens a
              # step (2048)
      q=${SWEEP_Q:-fp8}; qa=""; [ "$q" = fp8 ] && qa="--quantization fp8 --kv-cache-dtype fp8"
      timeout ${THRU_TIMEOUT:-560} $KILN bench throughput --config $L $qa --requests ${SWEEP_N:-1000} \
        --max-batch ${MAXB:-256} --max-tokens-per-step ${BUDGET:-2048} \
        --sweep ${SWEEP_SHAPES:-128/128,128/2048,1000/1000,2048/128} 2>&1 \
        | tee -a "$OUT/sweep.log" | grep -a -E "output tok/s|^\||Error" ;;
    s24)  # session 24: where the split-KV prefill goes wrong (.ci/split_probe.py); the fp8 / graph tests with session 23's
          # three switches and fast accumulation on; fp8 1000/1000 (S24_N requests) with the defaults and with them on
      timeout 150 python3 .ci/split_probe.py 2>&1 | grep -v Warn | tail -30
      ON="KILN_PREFILL_FP8_SM90=1 KILN_FP8_AMAX_FUSE=1 KILN_MIXED_GRAPHS_LARGE=1 KILN_FP8_FAST_ACCUM=1"
      env $ON timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-12} tests/gpu/test_quant_kernels.py \
        tests/gpu/test_cuda_backend.py tests/gpu/test_mixed_split.py tests/gpu/test_fp8_graph_padding.py tests/gpu/test_kv_scales_gpu.py \
        tests/gpu/test_amax_fuse.py tests/gpu/test_overlap_gpu.py -k "fp8 or quant or mixed or graph or large or amax or accum" 2>&1 \
        | tee "$OUT/s24-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -14
      for e in KILN_NOTHING=0 "$ON"; do echo "== fp8 1000/1000, ${S24_N:-500} requests, $e"; env $e timeout 200 $KILN bench \
        throughput --config $L --quantization fp8 --kv-cache-dtype fp8 --requests ${S24_N:-500} --input-len 1000 --output-len 1000 \
        --max-batch 256 2>&1 | tee -a "$OUT/thru.log" | grep -a -E "^\| (output_tok_s|seconds|mixed_steps_s|mixed_step_ms_p50|decode_step_ms_p50) |Error"; done ;;
    s24b)  # session 24: the split-KV probe on four head shapes; the mixed-graph memory check's tests; fp8 2048/128 with
           # the new defaults at budgets of 2,048 and 8,192 tokens (the second ran out of memory on an H100 before)
      for sh in ${PROBE_SHAPES:-32,8,128,16 8,2,128,16 32,8,64,16 8,1,128,16}; do echo "=== SHAPE $sh"
        SHAPE=$sh REPEAT=1 CTX=129,0 NEW=128,5 timeout 100 python3 .ci/split_probe.py 2>&1 | grep -v Warn | tail -24; done
      timeout 200 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_mixed_split.py \
        -k "large or memory" 2>&1 | tee "$OUT/s24b-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      thru_runs "fp8:2048:128:300:256:2048 fp8:2048:128:300:256:8192" ;;
    s23b)  # session 23: the fp8-cache decode kernel by page size, then fp8 1000/1000 with S23_ON (the switches that won)
           # at 16- and 32-token pages, and with fast accumulation
      timeout 100 python3 -m kiln.codegen.bench_kernels --only fp8kv 2>&1 | grep -a -E "^\||Random|rror" | tail -8
      for v in "16 KILN_NOTHING=0" "32 KILN_NOTHING=0" "16 KILN_FP8_FAST_ACCUM=1"; do set -- $v
        echo "== fp8 1000/1000, $1-token pages, $2, ${S23_ON:-}"; env ${S23_ON:-KILN_NOTHING=0} $2 timeout 200 $KILN bench \
          throughput --config $L --quantization fp8 --kv-cache-dtype fp8 --requests 1000 --input-len 1000 --output-len 1000 \
          --max-batch 256 --page-size $1 2>&1 | tee -a "$OUT/thru.log" | grep -a -E "^\| (output_tok_s|seconds|mixed_steps_s|mixed_step_ms_p50|decode_step_ms_p50) |Error"; done ;;
    s23thru)  # session 23: the fp8-cache decode kernel by page size; fp8 2048/128 with the defaults, each switch, a budget of 8,192
      timeout 120 python3 -m kiln.codegen.bench_kernels --only fp8kv 2>&1 | grep -a -E "^\||Random|rror" | tail -8
      thru_runs "${S23_THRU-fp8:2048:128:300:256:2048 fp8:2048:128:300:256:2048:KILN_PREFILL_FP8_SM90=1 fp8:2048:128:300:256:2048:KILN_FP8_AMAX_FUSE=1 fp8:2048:128:300:256:2048:KILN_MIXED_GRAPHS_LARGE=1 fp8:2048:128:300:256:8192}" ;;
    fp8prefill)  # session 21 (unrun): the wgmma prefill kernel on fp8 pages
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_kernels.py \
        -k "fp8_kv_prefill" 2>&1 | tee "$OUT/fp8prefill-kernels.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      KILN_PREFILL_FP8_SM90=1 timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} \
        tests/gpu/test_kernels.py tests/gpu/test_mixed_split.py tests/gpu/test_cuda_backend.py -k "fp8" 2>&1 \
        | tee "$OUT/fp8prefill-on.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      timeout 200 python3 -m kiln.codegen.bench_kernels --only fp8prefill 2>&1 | grep -a -E "^\||rror|prefill"
      for v in 0 1; do echo "== fp8 mixed step, KILN_PREFILL_FP8_SM90=$v"; KILN_PREFILL_FP8_SM90=$v timeout 150 python3 \
        .ci/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 --batch 256 --ctx 1500 --prefill 1792 --steps 3 2>&1 \
        | grep -v Warn | head -${TOP:-14}; done
      thru_runs "fp8:2048:128:${PF8_N:-300}:256:2048:KILN_PREFILL_FP8_SM90=0 fp8:2048:128:${PF8_N:-300}:256:2048:KILN_PREFILL_FP8_SM90=1" ;;
    s21)  # session 21's unrun work: tests, kernel tables, the mixed step's profile
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_kernels.py \
        tests/gpu/test_quant_kernels.py tests/gpu/test_overlap_gpu.py tests/gpu/test_cuda_backend.py \
        -k "fp8_kv_prefill or fast_accum or overlap or chunks or captured_ahead" \
        2>&1 | tee "$OUT/s21-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      KILN_PREFILL_FP8_SM90=1 KILN_FP8_FAST_ACCUM=1 timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider \
        -n ${WORKERS:-8} tests/gpu/test_mixed_split.py tests/gpu/test_cuda_backend.py tests/gpu/test_quant_kernels.py -k "fp8" \
        2>&1 | tee "$OUT/s21-on.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      timeout 240 python3 -m kiln.codegen.bench_kernels --only fp8prefill,fp8gemm 2>&1 | grep -a -E "^\||rror|µs"
      for v in "KILN_NOTHING=0" "KILN_PREFILL_FP8_SM90=1 KILN_FP8_FAST_ACCUM=1"; do echo "== fp8 mixed step, $v"
        env $v timeout 150 python3 .ci/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 --batch 256 --ctx 1500 \
          --prefill 1792 --steps 3 2>&1 | grep -v Warn | head -${TOP:-16}; done ;;
    fastaccum)  # session 21 (unrun): cuBLASLt's fp8 GEMMs with fast accumulation
      KILN_FP8_FAST_ACCUM=1 timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} \
        tests/gpu/test_quant_kernels.py tests/gpu/test_fp8_graph_padding.py -k "fp8 or quantized_model" 2>&1 \
        | tee "$OUT/fastaccum-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      timeout 200 python3 -m kiln.codegen.bench_kernels --only fp8gemm 2>&1 | grep -a -E "^\||rror"
      thru_runs "fp8:1000:1000:1000:256:2048:KILN_FP8_FAST_ACCUM=0 fp8:1000:1000:1000:256:2048:KILN_FP8_FAST_ACCUM=1" ;;
    chunkab)  # session 21 (unrun): the chunk-continuing overlap against its baseline, then two batch / budget pairs
      thru_runs "fp8:2048:128:300:256:2048:KILN_OVERLAP_CHUNKS=0 fp8:2048:128:300:256:2048:KILN_OVERLAP_CHUNKS=1"
      thru_runs "fp8:1000:1000:1000:256:2048:KILN_OVERLAP_CHUNKS=0 fp8:1000:1000:1000:256:2048:KILN_OVERLAP_CHUNKS=1"
      thru_runs "${CHUNK_MORE-fp8:1000:1000:1000:512:2048 fp8:1000:1000:1000:512:8192}" ;;  # CHUNK_MORE= : skipped
    fresh)
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_mixed_split.py -k sdpa 2>&1 | tail -1
      for v in 0 1; do echo "KILN_FRESH_SDPA=$v"; KILN_FRESH_SDPA=$v timeout 60 $KILN bench latency --config $L \
        --steps 16 2>&1 | grep -a -E "^\| (ttft_ms|ttft_floor_ms) |TTFT / floor|Error"; done ;;
    fp8prof)
      timeout 120 python3 .ci/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 --batch 256 --ctx 1500 \
        --steps 3 2>&1 | grep -v Warn | head -24 ;;
    mixedprof)  # session 20 (unrun): where an fp8 (weights + KV) mixed step of a 1000/1000 run goes: MIX_BATCH (256) decode
                # rows at context MIX_CTX (1,500) beside a MIX_PREFILL-token prompt chunk (1,792: the rest of the step's
                # 2,048-token budget), kernel by kernel, then bf16's
      for q in fp8 none; do kv=auto; [ $q = fp8 ] && kv=fp8; echo "== mixed step, --quantization $q --kv-cache-dtype $kv"
        timeout 150 python3 .ci/profile_decode.py --quantization $q --kv-cache-dtype $kv --batch ${MIX_BATCH:-256} \
          --ctx ${MIX_CTX:-1500} --prefill ${MIX_PREFILL:-1792} --steps 3 2>&1 | grep -v Warn | head -${TOP:-28}; done ;;
    triggers)
      for v in 0 1; do echo "KILN_PDL_TRIGGER=$v"; KILN_PDL_TRIGGER=$v timeout 120 python3 -m pytest -q -p no:cacheprovider -n 8 \
        tests/gpu/test_gemv_prologue.py tests/gpu/test_gemv.py tests/gpu/test_pdl_triggers.py > "$OUT/triggers-$v.log" 2>&1
        grep -a -E "^(FAILED|ERROR)|passed|failed|^E  .*(rel|assert)" "$OUT/triggers-$v.log" | tail -8
        for c in llama-3-8b mamba2-2.7b; do KILN_PDL_TRIGGER=$v timeout 60 $KILN bench latency --config configs/$c.json \
          --prompt 1024 --steps 48 2>&1 | grep -a -E "^\| decode_ms |Error"; done; done ;;
    depload)
      for v in ca cg weak; do echo "KILN_DEP_LOAD=$v"; KILN_DEP_LOAD=$v timeout 120 python3 -m pytest -q -p no:cacheprovider \
        -n 8 tests/gpu/test_gemv_prologue.py tests/gpu/test_pdl_triggers.py 2>&1 | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -3
        for c in llama-3-8b mamba2-2.7b; do KILN_DEP_LOAD=$v timeout 60 $KILN bench latency --config configs/$c.json \
          --prompt 1024 --steps 48 2>&1 | grep -a -E "^\| decode_ms |Error"; done; done ;;
    fp8mma)  # session 12: the one-row fp8 GEMV on the tensor cores (KILN_FP8_GEMV_DECODE=mma)
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_gemv_fp8.py \
        2>&1 | tee "$OUT/fp8mma-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      timeout ${BENCH_TIMEOUT:-200} python3 -m kiln.codegen.bench_kernels --only fp8gemv > "$OUT/fp8mma-kernels.md" 2>&1
      grep -a -E "^\||rror" "$OUT/fp8mma-kernels.md"
      for v in int mma; do echo "fp8 batch-1, KILN_FP8_GEMV_DECODE=$v"; KILN_FP8_GEMV_DECODE=$v timeout 60 $KILN bench \
        latency --config $L --quantization fp8 --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done
      echo "bf16 batch-1"; timeout 60 $KILN bench latency --config $L --steps 64 2>&1 \
        | grep -a -E "^\| (decode_ms|roofline_ms) |Error" ;;
    fp8race)  # session 12: the fp8 GEMV tests six times, triggers on / off (the engine-token test's flips: BENCHMARKS)
      for v in 1 0 1 0 1 0; do echo "KILN_PDL_TRIGGER=$v"; KILN_PDL_TRIGGER=$v timeout 100 python3 -m pytest -q -p no:cacheprovider \
        -n 8 tests/gpu/test_gemv_fp8.py 2>&1 | tee -a "$OUT/fp8race-$v.log" | grep -a -E "^FAILED|passed|failed" | tail -3; done ;;
    deploadbench)  # depload's decode figures alone (no tests)
      for v in ca cg weak; do for c in llama-3-8b mamba2-2.7b; do echo "KILN_DEP_LOAD=$v $c"; KILN_DEP_LOAD=$v timeout 60 \
        $KILN bench latency --config configs/$c.json --prompt 1024 --steps 48 2>&1 | grep -a -E "^\| decode_ms |Error"
      done; done ;;
    actquant)
      timeout 120 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-6} tests/gpu/test_quant_kernels.py -k "act_quant" \
        2>&1 | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -4
      timeout 120 python3 -m kiln.codegen.bench_kernels --only actquant 2>&1 | grep -a -E "^\||rror"
      for v in 2:1 8:4; do IFS=: read -r b u <<< "$v"; echo "KILN_ACT_QUANT_BLOCKS=$b KILN_ACT_QUANT_UNROLL=$u"
        KILN_ACT_QUANT_BLOCKS=$b KILN_ACT_QUANT_UNROLL=$u timeout 120 python3 .ci/profile_decode.py --quantization fp8 \
          --kv-cache-dtype fp8 --batch 256 --ctx 1500 --prefill 1792 --steps 3 2>&1 | grep -a -E "GPU kernel time|quant_act"; done ;;
    b1prof)
      for q in none fp8; do echo "== batch 1, --quantization $q"; timeout 120 python3 .ci/profile_decode.py --quantization $q \
        --batch 1 --ctx 1024 --steps 8 2>&1 | grep -v Warn | head -${TOP:-24}; done ;;
    anatomy)
      timeout 200 python3 .ci/fp8_gemv_anatomy.py 2>&1 | grep -a -E "^\||copy|rror|Trace|line" ;;
    fp8ab)  # session 13: the fp8 GEMV tests, its anatomy, then fp8 batch-1 decode "int" / "mma" alternately, and bf16
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu -k "fp8 or quant" \
        2>&1 | tee "$OUT/fp8ab-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      timeout 200 python3 .ci/fp8_gemv_anatomy.py 2>&1 | grep -a -E "^\||copy|rror|Trace|line"
      for d in int mma int mma; do echo "fp8 batch-1, KILN_FP8_GEMV_DECODE=$d"; KILN_FP8_GEMV_DECODE=$d timeout 60 \
        $KILN bench latency --config $L --quantization fp8 --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"
      done
      echo "bf16 batch-1"; timeout 60 $KILN bench latency --config $L --steps 64 2>&1 \
        | grep -a -E "^\| (decode_ms|roofline_ms) |Error" ;;
    chain)  # session 13 (written without device time): KILN_PDL_CHAIN off / on
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_pdl_chain.py \
        tests/gpu/test_pdl_triggers.py 2>&1 | tee "$OUT/chain-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      for v in 0 1 0 1; do for c in "llama-3-8b.json" "llama-3-8b.json --quantization fp8" "mamba2-2.7b.json"; do
        echo "KILN_PDL_CHAIN=$v $c"; KILN_PDL_CHAIN=$v timeout 60 $KILN bench latency --config configs/$c --prompt 1024 \
          --steps 48 2>&1 | grep -a -E "^\| decode_ms |Error"; done; done ;;
    unrun13)
      timeout 150 python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_fp8_graph_padding.py \
        tests/gpu/test_quant_kernels.py -k "valid or act_quant or padding" 2>&1 | tee "$OUT/unrun13.log" \
        | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      for i in 1 2 3 4 5; do timeout 90 python3 -m pytest -q -p no:cacheprovider \
        "tests/gpu/test_gemv_fp8.py::test_engine_with_programmatic_launches_equals_plain" 2>&1 | tail -1; done ;;
    epi)  # session 14: the gate+up GEMV with the SwiGLU in its epilogue (KILN_GEMV_EPILOGUE): its GPU tests and the
          # padding / chain tests session 13 wrote, then bf16 and fp8 batch-1 decode of the 8B shape off / on, twice
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_gemv_epilogue.py \
        tests/gpu/test_gemv_prologue.py tests/gpu/test_fp8_graph_padding.py tests/gpu/test_pdl_chain.py \
        tests/gpu/test_pdl_triggers.py 2>&1 | tee "$OUT/epi-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      for v in 0 1 0 1; do for q in none fp8; do echo "KILN_GEMV_EPILOGUE=$v (and KILN_FP8_GEMV_EPILOGUE) --quantization $q"
        KILN_GEMV_EPILOGUE=$v KILN_FP8_GEMV_EPILOGUE=$v timeout 60 $KILN bench latency --config $L --quantization $q \
          --prompt 1024 --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done; done ;;
    normpro)  # session 14: KILN_GEMV_PROLOGUE=norm (the ungated RMSNorms' prologues only): the prologue / epilogue GPU
              # tests, then bf16 batch-1 TPOT end to end 0 / norm twice, and fp8 batch-1 decode KILN_FP8_GEMV_EPILOGUE=0 / 1
              # twice (session 14 ran it with KILN_GEMV_EPILOGUE switching both)
      timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_gemv_prologue.py \
        tests/gpu/test_gemv_epilogue.py 2>&1 | tee "$OUT/normpro-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      for v in 0 norm 0 norm; do echo "TPOT KILN_GEMV_PROLOGUE=$v"; KILN_GEMV_PROLOGUE=$v timeout 60 $KILN bench throughput \
        --config $L --requests 1 --max-batch 1 --input-len 128 --output-len 256 2>&1 | grep -a -E "^\| tpot_p50_ms |Error"
      done
      for v in 0 1 0 1; do echo "fp8 KILN_FP8_GEMV_EPILOGUE=$v"; KILN_FP8_GEMV_EPILOGUE=$v timeout 60 $KILN bench latency --config $L \
        --quantization fp8 --prompt 1024 --steps 64 2>&1 | grep -a -E "^\| decode_ms |Error"; done ;;
    rope)  # session 15: the qkv GEMV with the rotary + KV write in its epilogue (KILN_GEMV_ROPE) and decode attention's
           # dead splits (ROPE_TESTS: more GPU test files): the GPU tests, then bf16 batch-1 TPOT end to end and the
           # model step with it 0 / 1, twice
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_gemv_rope.py \
        tests/gpu/test_act_rope_variants.py tests/gpu/test_gemv_epilogue.py tests/gpu/test_kernels.py -k "not sm90ws" \
        ${ROPE_TESTS:-} 2>&1 | tee "$OUT/rope-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -16
      for v in 0 1 0 1; do echo "TPOT KILN_GEMV_ROPE=$v"; KILN_GEMV_ROPE=$v timeout 60 $KILN bench throughput \
        --config $L --requests 1 --max-batch 1 --input-len 128 --output-len 256 2>&1 | grep -a -E "^\| tpot_p50_ms |Error"
      done
      for v in 0 1 0 1; do echo "step KILN_GEMV_ROPE=$v"; KILN_GEMV_ROPE=$v timeout 60 $KILN bench latency --config $L \
        --prompt 1024 --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done ;;
    fp8rope)  # session 15 (written after its device time): the fp8 qkv GEMV with the rotary + KV write in its epilogue
              # (KILN_FP8_GEMV_ROPE): the rotary GPU tests, then fp8 batch-1 decode with it 0 / 1, twice
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_gemv_rope.py \
        tests/gpu/test_gemv_epilogue.py 2>&1 | tee "$OUT/fp8rope-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      for v in 0 1 0 1; do echo "fp8 KILN_FP8_GEMV_ROPE=$v"; KILN_FP8_GEMV_ROPE=$v timeout 60 $KILN bench latency --config $L \
        --quantization fp8 --prompt 1024 --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done ;;
    tpot)  # bf16 8B batch-1 engine TPOT with the defaults, TPOT_RUNS times (3), then the roofline of the call's copy bandwidth
      for i in $(seq ${TPOT_RUNS:-3}); do timeout 60 $KILN bench throughput --config $L --requests 1 --max-batch 1 \
        --input-len 128 --output-len 256 2>&1 | grep -a -E "^\| tpot_p50_ms |Error"; done
      timeout 60 $KILN bench latency --config $L --prompt 128 --steps 16 2>&1 | grep -a -E "^\| roofline_ms |Error" ;;
    partition)
      timeout 120 python3 .ci/decode_partition.py 2>&1 | grep -a -E "^\||copy|rror|Trace|line" ;;
    fp8kv)
      timeout 200 python3 -m kiln.codegen.bench_kernels --only fp8kv 2>&1 | grep -a -E "^\||Random|rror" ;;
    ssmprof)
      timeout 120 python3 .ci/profile_decode.py --spec models/mamba2.kiln --config configs/mamba2-2.7b.json --batch 1 \
        --ctx 1024 --steps 8 2>&1 | grep -v Warn | head -24
      timeout 60 $KILN bench latency --config configs/mamba2-2.7b.json --prompt 1024 --steps 64 2>&1 \
        | grep -a -E "^\| (decode_ms|roofline_ms|gemms_only_ms) |decode / roofline|Error" ;;
    int4ncu)  # session 16: hardware counters of the INT4 GEMV variants at one row (gate+up, down): where the time goes
      timeout 240 ncu --clock-control none -k regex:gemv_int4 --launch-count ${NCU_COUNT:-18} --print-details all \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis python3 .ci/int4_ncu.py ${INT4_VARIANTS:-loop,stream,warp} \
        > "$OUT/int4ncu.log" 2>&1; grep -a -E "gemv_int4|Throughput|Duration|Achieved Occupancy|Registers|Stall|Issued Warp|No Eligible|Eligible Warps|Warp Cycles|ok$|rror" "$OUT/int4ncu.log" | head -${NCU_LINES:-150} ;;
    int4prof)  # session 16: where an int4 weight-only batch-1 decode step of the 8B shape goes (kernel by kernel)
      timeout 120 python3 .ci/profile_decode.py --quantization int4-wo --batch 1 --ctx 1024 --steps 8 2>&1 | grep -v Warn \
        | head -${TOP:-24} ;;
    int4anat)  # session 16: the one-row INT4 GEMV variants with parts cut from their source (.ci/int4_gemv_anatomy.py)
      timeout 240 python3 .ci/int4_gemv_anatomy.py ${INT4_VARIANTS:-loop,warp,stream} 2>&1 | grep -a -E "^\||copy|rror|line|^[a-z+]+: |grids" ;;
    int4warp)  # session 16: the INT4 warp GEMV's GPU tests, then its anatomy (INT4_VARIANTS, default warp)
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_quant_kernels.py \
        -k warp 2>&1 | tee "$OUT/int4warp-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      timeout 240 python3 .ci/int4_gemv_anatomy.py ${INT4_VARIANTS:-warp} 2>&1 | grep -a -E "^\||copy|rror|line|^[a-z+]+: |grids" ;;
    int4ab)  # session 16: the INT4 warp GEMV's GPU tests, its anatomy, then int4 batch-1 decode KILN_QGEMV=loop / warp, twice
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_quant_kernels.py \
        -k warp 2>&1 | tee "$OUT/int4ab-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      timeout 240 python3 .ci/int4_gemv_anatomy.py warp 2>&1 | grep -a -E "^\||copy|rror|line|^[a-z+]+: |grids"
      for v in loop warp loop warp; do echo "int4-wo KILN_QGEMV=$v"; KILN_QGEMV=$v timeout 60 $KILN bench latency \
        --config $L --quantization int4-wo --prompt 1024 --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done ;;
    quantdefaults)  # session 16: the GPU tests of the quantized paths under the new defaults (int4 warp GEMV, fp8 rotary
                    # epilogue), then batch-1 decode of the 8B shape in bf16, fp8 and int4-wo
      timeout ${TEST_TIMEOUT:-280} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu -k "fp8 or int4 or quant or gemv or rope" \
        --ignore=tests/gpu/test_guided_gpu.py 2>&1 | tee "$OUT/quant-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -16
      for q in bf16 fp8 int4-wo; do echo "batch-1 decode, $q"; opt=(--quantization $q); [ $q = bf16 ] && opt=()
        timeout 60 $KILN bench latency --config $L "${opt[@]}" --prompt 1024 --steps 64 2>&1 \
          | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done ;;
    int4epi)  # session 16 (written after its device time ran low): the int4 gate+up GEMV with the SwiGLU in its epilogue
              # (KILN_INT4_GEMV_EPILOGUE): its GPU tests, then int4 batch-1 decode with it 0 / 1 (EPI_RUNS pairs, 1)
      timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_quant_kernels.py \
        -k "gated" 2>&1 | tee "$OUT/int4epi-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      for i in $(seq ${EPI_RUNS:-1}); do for v in 0 1; do echo "int4-wo KILN_INT4_GEMV_EPILOGUE=$v"
        KILN_INT4_GEMV_EPILOGUE=$v timeout 60 $KILN bench latency --config $L --quantization int4-wo --prompt 1024 \
          --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done; done ;;
    overlap)  # session 17: do two half-batches on two streams overlap attention with GEMMs (NanoFlow)?
      timeout 200 python3 .ci/overlap_probe.py 2>&1 | grep -a -v Warning | tail -8
      timeout 200 python3 .ci/overlap_probe.py --quantization fp8 --kv-cache-dtype fp8 2>&1 | grep -a -v Warning | tail -8 ;;
    fp8x)  # session 17: the fp8 GEMV with x read once into registers
      timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_gemv_fp8_xonce.py \
        2>&1 | tee "$OUT/fp8x-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      timeout 150 python3 .ci/fp8_x_probe.py 2>&1 | grep -a -v Warning | tail -9
      for i in $(seq ${X_RUNS:-2}); do for v in 0 1; do echo "fp8 KILN_FP8_GEMV_XONCE=$v"
        KILN_FP8_GEMV_XONCE=$v timeout 60 $KILN bench latency --config $L --quantization fp8 --prompt 1024 \
          --steps 64 2>&1 | grep -a -E "^\| (decode_ms|roofline_ms) |Error"; done; done ;;
    lmhead)  # session 17: the LM head quantized too (SCHEME+lm-head)
      timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_quant_kernels.py \
        -k "quantized_model_cuda_matches_reference" 2>&1 | tee "$OUT/lmhead-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      for i in 1 2; do for q in bf16 fp8 fp8+lm-head int4-wo int4-wo+lm-head; do opt=(--quantization $q); [ $q = bf16 ] && opt=()
        echo "batch-1 decode, $q $(timeout 60 $KILN bench latency --config $L "${opt[@]}" --prompt 1024 --steps 64 2>&1 \
          | grep -a -E "^\| (decode_ms|decode_back_to_back_ms|roofline_ms) |Error" | tr '\n' ' ')"; done; done ;;
    fusions)  # session 18: switches A/B'd on the GPU's step time (ab_runs above); AB: its items, by default session
              # 18's three fusions, then on: fp8 KILN_FP8_GEMV_EPILOGUE, int4-wo KILN_INT4_GEMV_EPILOGUE (8B shape),
              # KILN_SSM_FUSE (Mamba-2 2.7B)
      ab_runs "${AB:-fp8 KILN_FP8_GEMV_EPILOGUE 0 1 $L;int4-wo KILN_INT4_GEMV_EPILOGUE 0 1 $L;none KILN_SSM_FUSE 0 1 configs/mamba2-2.7b.json}" ;;
    int4rope)  # session 18 (written without device time): the int4 qkv GEMV with the rotary + KV write epilogue
               # (KILN_INT4_GEMV_ROPE): its GPU tests, then int4-wo (+lm-head) batch-1 decode off / on (ab_runs)
      timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_quant_kernels.py \
        -k "int4_rope" 2>&1 | tee "$OUT/int4rope-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      ab_runs "int4-wo+lm-head KILN_INT4_GEMV_ROPE 0 1 $L" ;;
    refix)  # session 18, after call 5: the fp8 GEMM tests (rows padded to 16 at load) and call 5's LoRA failure's seed
      timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_gemv_fp8.py \
        tests/gpu/test_quant_kernels.py tests/gpu/test_gemv_fp8_xonce.py tests/gpu/test_fp8_graph_padding.py 2>&1 \
        | tee "$OUT/refix-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      KILN_TEST_SEED=3212102691 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_lora.py \
        -k "test_cuda_backend_with_adapters_matches_reference and fp32" 2>&1 | grep -a -E "^E  .*step|passed|failed" | tail -6 ;;
    lorarel)  # session 19: the fp32 cuda backend's distance from the reference with adapters, over LORA_SEEDS seeds
              # (session 18's test_lora.py failure at KILN_TEST_SEED=3212102691 first): a bug, or fp32's own spread?
      timeout 240 python3 .ci/lora_rel_probe.py ${LORA_SEEDS:-12} 2>&1 | grep -a -v Warning | tail -16 ;;
    lorabisect)  # session 19: the lorarel probe at the failing seed alone, under each switch that could be the part
                 # that departs (LORA_ENVS), with each row's error at the worst step
      for e in ${LORA_ENVS:-none KILN_LORA_KERNEL=split PROBE_EAGER=1 KILN_GEMV=0 KILN_PDL=0 KILN_PDL_TRIGGER=0}; do
        echo "== $e"; env $([ $e = none ] || echo $e) timeout 120 python3 .ci/lora_rel_probe.py 1 2>&1 | grep -a -v Warning | tail -3
      done ;;
    int4q)  # session 19: this tree's INT4 warp GEMV at the 8B shapes (ANAT_QUICK: the chooser's grid, µs and share of copy
            # bandwidth) and the int4-wo+lm-head batch-1 step (decode_back_to_back_ms): run in two trees in turn to A/B them
      ANAT_QUICK=1 timeout 120 python3 .ci/int4_gemv_anatomy.py warp 2>&1 | grep -a -E "^\| [a-z]|copy|rror"
      echo "batch-1 decode, int4-wo+lm-head $(timeout 60 $KILN bench latency --config $L --quantization int4-wo+lm-head \
        --prompt 1024 --steps 64 2>&1 | grep -a -E "^\| (decode_back_to_back_ms|roofline_ms) |Error" | tr '\n' ' ')" ;;
    e4m3cvt)  # session 19 (written after its device time): E4M3 to fp16 by cvt (KILN_E4M3_CVT=1): its GPU tests (the same
              # bits as the integer conversion), then the fp8-cache decode kernel against the bf16 cache's, 0 / 1 alternately
      timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} tests/gpu/test_kernels.py \
        tests/gpu/test_cuda_backend.py -k "fp8" 2>&1 | tee "$OUT/e4m3cvt-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -8
      for i in 1 2; do for v in 0 1; do echo "KILN_E4M3_CVT=$v"; KILN_E4M3_CVT=$v timeout 90 python3 -c "
from kiln.codegen.bench_kernels import fp8_kv_decode_line, copy_bandwidth
bw = copy_bandwidth()
for B, c in ((256, 1500), (64, 4096), (1, 16384)): print(fp8_kv_decode_line(B, c, bw), flush=True)" 2>&1 | grep -a "decode att"
      done; done ;;
    earlykv)  # session 20 (written without device time): decode attention's first K/V copies before its wait
              # (KILN_DECODE_EARLY_KV=1): the race test (tests/gpu/test_decode_early_kv.py), then the decode attention,
              # PDL-chain, qkv-rotary and model GPU tests with it on, whether the race test can fail (.ci/early_kv_probe.py),
              # then batch-1 steps off / on (ab_runs)
      KILN_DECODE_EARLY_KV=1 timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} \
        tests/gpu/test_decode_early_kv.py tests/gpu/test_pdl_chain.py tests/gpu/test_gemv_rope.py \
        "tests/gpu/test_kernels.py" -k "early or chain or rope or decode or fp8_kv" 2>&1 | tee "$OUT/earlykv-tests.log" \
        | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      timeout 120 python3 .ci/early_kv_probe.py 2>&1 | grep -a -E "replays|rror"
      ab_runs "${AB:-none KILN_DECODE_EARLY_KV 0 1 $L;fp8+lm-head KILN_DECODE_EARLY_KV 0 1 $L;int4-wo+lm-head KILN_DECODE_EARLY_KV 0 1 $L}" ;;
    dynpart)  # session 21 (unrun): the decode partition from the step's context
      KILN_DECODE_DYN_PART=1 timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} \
        tests/gpu/test_kernels.py tests/gpu/test_decode_early_kv.py tests/gpu/test_cuda_backend.py \
        -k "decode or early or dynamic or fp8_kv" 2>&1 | tee "$OUT/dynpart-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      ab_runs "${AB:-int4-wo+lm-head KILN_DECODE_DYN_PART 0 1 $L;none KILN_DECODE_DYN_PART 0 1 $L}" ;;
    grid)  # session 20 (written without device time): the decode attention grid split-last (KILN_DECODE_GRID): the decode
           # GPU tests with it, then batch-1 steps splits-first / splits-last (ab_runs), then KILN_PDL_CHAIN attention / 1
           # for int4-wo+lm-head (one round)
      KILN_DECODE_GRID=splits-last timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} \
        tests/gpu/test_kernels.py tests/gpu/test_decode_early_kv.py tests/gpu/test_pdl_chain.py \
        -k "decode or early or chain or fp8_kv" 2>&1 | tee "$OUT/grid-tests.log" | grep -a -E "^(FAILED|ERROR)|passed|failed" | tail -12
      ab_runs "${AB:-int4-wo+lm-head KILN_DECODE_GRID splits-first splits-last $L;none KILN_DECODE_GRID splits-first splits-last $L}"
      AB_RUNS=1 ab_runs "int4-wo+lm-head KILN_PDL_CHAIN attention 1 $L" ;;
    steps)  # session 19: batch-1 decode of the 8B shape by precision on the GPU's step time (decode_back_to_back_ms),
            # this tree's defaults, STEP_RUNS (2) rounds: bf16, fp8, fp8+lm-head, int4-wo, int4-wo+lm-head
      for i in $(seq ${STEP_RUNS:-2}); do for q in ${STEP_QUANTS:-bf16 fp8 fp8+lm-head int4-wo int4-wo+lm-head}; do
        opt=(--quantization $q); [ $q = bf16 ] && opt=()
        echo "batch-1 decode, $q $(timeout 60 $KILN bench latency --config $L "${opt[@]}" --prompt 1024 --steps 64 2>&1 \
          | grep -a -E "^\| (decode_back_to_back_ms|roofline_ms) |Error" | tr '\n' ' ')"; done; done ;;
    retest)  # tests changed after the `tests` call
      timeout ${TEST_TIMEOUT:-60} python3 -m pytest -q -p no:cacheprovider -n ${WORKERS:-6} tests/gpu/test_kv_scales_gpu.py \
        "tests/gpu/test_cuda_backend.py::test_state_space_engine_equals_reference_fp32" \
        tests/gpu/test_quant_kernels.py -k "not persist" 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tee "$OUT/retest.log" ;;
  esac
done
