"""Batch-1 decode step time at several contexts vs the roofline (GPU; issue #18's acceptance check).

A state-space model's decode step reads its weights and its fixed-size state, whatever the context,
so its time should stay flat from 1k to 64k tokens. For each context the prompt is really prefilled
(chunks of --chunk tokens: the prefill kernels and the state carried between chunks), then --steps
decode steps are timed (CUDA events, median). Roofline: (weight bytes + the state read and written)
/ the measured copy bandwidth, as `kiln bench latency`. Random weights, bf16, the cuda backend.
`--attention CONFIG` measures a same-size attention model the same way beside it (its step reads
its KV cache too, so its time grows with the context; roofline there: weights + KV at that context).
Usage (device): python .ci/ssm_decode_contexts.py [--config configs/mamba2-2.7b.json]
[--attention configs/llama-2.7b.json] [--contexts 1024,4096,16384,65536] [--steps 64] [--chunk 8192]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics

import torch
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.bench import _events_ms, copy_bandwidth, weight_bytes
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model, spec_for_config
from kiln.runtime.state_cache import state_bytes_per_slot

ap = argparse.ArgumentParser()
ap.add_argument("--config", default="configs/mamba2-2.7b.json")
ap.add_argument("--attention", default=None, help="a same-size attention model's config, measured beside")
ap.add_argument("--contexts", default="1024,4096,16384,65536")
ap.add_argument("--steps", type=int, default=64)
ap.add_argument("--chunk", type=int, default=8192)
args = ap.parse_args()
contexts = [int(c) for c in args.contexts.split(",")]
bw = copy_bandwidth()


def kv_bytes(m, ctx: int) -> int:
    """The KV cache a decode step at context `ctx` reads (0 for a pure state-space model)."""
    per_token = sum(s.kv_heads * (s.head_dim + s.v_head_dim) for s in m.plan.sites)
    return per_token * ctx * m.dtype.itemsize


def run(path: str) -> dict:
    config = json.load(open(path))
    m = random_model(spec_for_config(config, path), config, dtype="bf16", device="cuda", backend="cuda")
    m.model.reserve(1, max(contexts) + args.steps + 8)  # graphs up to the longest context
    moved = weight_bytes(m) + 2 * state_bytes_per_slot(m.plan.state_sites, m.dtype)
    print(f"# {torch.cuda.get_device_name()}, {path}: copy {bw / 1e12:.2f} TB/s, {moved / 1e9:.3f} GB of "
          f"weights and state a step (+ its KV cache)")
    print("| context | decode ms | roofline ms | / roofline | CUDA graph |\n| --- | --- | --- | --- | --- |")

    def measure(ctx: int) -> float:
        """Prefill `ctx` tokens, then the median decode step (ms)."""
        pages = -(-(ctx + args.steps + 8) // 16)  # what the decode graphs' tables hold (reserve above)
        kv = KVStore(m.plan.sites, pages, 16, m.dtype, "cuda")
        table = tuple(range(pages))
        for start in range(0, ctx, args.chunk):
            n = min(args.chunk, ctx - start)
            m.model.forward(StepBatch(torch.randint(0, m.plan.vocab_size, (n,)), [SeqSlice(0, n, start, table)]), kv)
        pos = [ctx]
        tok = torch.tensor([1])

        def decode():
            m.model.forward(StepBatch(tok, [SeqSlice(0, 1, pos[0], table)]), kv)
            pos[0] += 1

        for _ in range(3):
            decode()
        return statistics.median(_events_ms(decode, args.steps))

    rows = {}
    for ctx in contexts:
        rows[ctx] = ms = measure(ctx)
        roof = (moved + kv_bytes(m, ctx)) / bw * 1e3
        print(f"| {ctx} | {ms:.3f} | {roof:.3f} | {ms / roof:.3f} | {bool(m.model._graphs)} |", flush=True)
        torch.cuda.empty_cache()
    return {"model": path, "roofline_ms": moved / bw * 1e3, "decode_ms": rows,
            "flat": max(rows.values()) / min(rows.values())}


with torch.no_grad():
    results = [run(args.config)]
    gc.collect()  # the first model's weights and graphs go before the second loads
    torch.cuda.empty_cache()
    if args.attention:
        results.append(run(args.attention))
for r in results:
    print(json.dumps(r))
