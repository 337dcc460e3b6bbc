"""Batch-1 decode step time at several contexts vs the roofline (GPU; issue #18's acceptance check).

A state-space model's decode step reads its weights and its fixed-size state, whatever the context,
so its time should stay flat from 1k to 64k tokens. For each context the prompt is really prefilled
(chunks of --chunk tokens: the prefill kernels and the state carried between chunks), then --steps
decode steps are timed (CUDA events, median). Roofline: (weight bytes + the state read and written)
/ the measured copy bandwidth, as `kiln bench latency`. Random weights, bf16, the cuda backend.
Usage (device): python .ci/ssm_decode_contexts.py [--config configs/mamba2-2.7b.json]
[--contexts 1024,4096,16384,65536] [--steps 64] [--chunk 8192]
"""

from __future__ import annotations

import argparse
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
ap.add_argument("--contexts", default="1024,4096,16384,65536")
ap.add_argument("--steps", type=int, default=64)
ap.add_argument("--chunk", type=int, default=8192)
args = ap.parse_args()
contexts = [int(c) for c in args.contexts.split(",")]

config = json.load(open(args.config))
bw = copy_bandwidth()
m = random_model(spec_for_config(config, args.config), config, dtype="bf16", device="cuda", backend="cuda")
m.model.reserve(1, max(contexts) + args.steps + 8)  # graphs up to the longest context
moved = weight_bytes(m) + 2 * state_bytes_per_slot(m.plan.state_sites, m.dtype)
roofline = moved / bw * 1e3
print(f"# {torch.cuda.get_device_name()}, {args.config}: copy {bw / 1e12:.2f} TB/s, {moved / 1e9:.3f} GB a step, "
      f"roofline {roofline:.3f} ms")
print("| context | decode ms | / roofline | CUDA graph |\n| --- | --- | --- | --- |")


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
with torch.no_grad():
    for ctx in contexts:
        rows[ctx] = ms = measure(ctx)
        print(f"| {ctx} | {ms:.3f} | {ms / roofline:.3f} | {bool(m.model._graphs)} |", flush=True)
        torch.cuda.empty_cache()
print(json.dumps({"roofline_ms": roofline, "decode_ms": rows,
                  "flat": max(rows.values()) / min(rows.values())}))
