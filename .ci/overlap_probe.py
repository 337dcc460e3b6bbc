"""Does a decode step gain from two half-batches run at the same time on two streams (NanoFlow's idea:
one half's bandwidth-bound attention beside the other half's compute-bound GEMMs)? A development probe
for issue #12's throughput (GPU).

Two models of the same shape (random weights, bf16, cuda backend, graphs on) share one KV store; each
decodes its own half of --batch sequences at context --ctx. Timed, ms per step of the whole batch:
  whole   one model, the whole batch, one graph
  serial  the two halves one after the other on one stream
  two     the halves on two streams at once, the second started --delays microseconds later (a sleep
          kernel), so that their attention and GEMM phases need not coincide
Usage (device): PYTHONPATH=... python3 .ci/overlap_probe.py [--batch 256] [--ctx 1500] [--delays 0,150,300]
"""

from __future__ import annotations

import argparse
import json

import torch
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model

ap = argparse.ArgumentParser()
ap.add_argument("--spec", default="models/llama.kiln")
ap.add_argument("--config", default="configs/llama-3-8b.json")
ap.add_argument("--quantization", default="none")
ap.add_argument("--kv-cache-dtype", default="auto")
ap.add_argument("--batch", type=int, default=256)
ap.add_argument("--ctx", type=int, default=1500)
ap.add_argument("--iters", type=int, default=20)
ap.add_argument("--delays", default="0,150,300,600")
args = ap.parse_args()

config = json.load(open(args.config))
models = [random_model(args.spec, config, dtype="bf16", device="cuda", backend="cuda",
                       quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype) for _ in range(2)]
B, ctx, H = args.batch, args.ctx, args.batch // 2
per_seq = (ctx + 64) // 16 + 1
kv = KVStore(models[0].plan.sites, B * per_seq, 16, models[0].dtype, "cuda")
tables = [tuple(range(b * per_seq, (b + 1) * per_seq)) for b in range(B)]


def batch(rows: range) -> StepBatch:
    seqs = [SeqSlice(i, 1, ctx, tables[b]) for i, b in enumerate(rows)]
    return StepBatch(torch.ones(len(seqs), dtype=torch.long), seqs)


whole, half = batch(range(B)), [batch(range(H)), batch(range(H, B))]
streams = [torch.cuda.Stream(), torch.cuda.Stream()]
cycles_per_us = torch.cuda.get_device_properties(0).clock_rate / 1e3 if hasattr(
    torch.cuda.get_device_properties(0), "clock_rate") else 1980.0


def timed(fn) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(args.iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / args.iters


def run_whole():
    models[0].model.forward(whole, kv)


def run_serial():
    models[0].model.forward(half[0], kv)
    models[1].model.forward(half[1], kv)


def run_two(delay_us: float):
    def go():
        main = torch.cuda.current_stream()
        for i, s in enumerate(streams):
            s.wait_stream(main)
            with torch.cuda.stream(s):
                if i == 1 and delay_us > 0:
                    torch.cuda._sleep(int(delay_us * cycles_per_us))
                models[i].model.forward(half[i], kv)
        for s in streams:
            main.wait_stream(s)
    return go


with torch.no_grad():
    res = [("whole", timed(run_whole)), ("serial", timed(run_serial))]
    for d in [float(x) for x in args.delays.split(",")]:
        res.append((f"two streams, +{d:.0f} us", timed(run_two(d))))
print(f"decode step, batch {B} (halves of {H}), context {ctx}, {args.quantization}, kv {args.kv_cache_dtype}:")
base = res[0][1]
for name, ms in res:
    print(f"| {name} | {ms:.3f} ms | {base / ms:.3f}x whole |")
