"""Where a batch-1 decode step's time goes, kernel by kernel (GPU; a development tool).

Runs the Llama-3-8B-shaped model (random weights, bf16, cuda backend) with graphs off under
torch.profiler for a few decode steps at context 2,048 and prints GPU time per kernel name,
summed over the steps and divided by their number, largest first, with each one's share of the
step. Usage (device): PYTHONPATH=... python3 .ci/profile_decode.py [--quantization SCHEME]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model

ap = argparse.ArgumentParser()
ap.add_argument("--config", default="configs/llama-3-8b.json")
ap.add_argument("--quantization", default="none")
ap.add_argument("--steps", type=int, default=8)
args = ap.parse_args()

config = json.load(open(args.config))
m = random_model("models/llama.kiln", config, dtype="bf16", device="cuda", backend="cuda",
                 quantization=args.quantization)
m.model.use_graphs = False
ctx = 2048
kv = KVStore(m.plan.sites, ctx // 16 + 8, 16, m.dtype, "cuda")
table = tuple(range(kv.num_pages))
tok = torch.tensor([1])
with torch.no_grad():
    for _ in range(3):
        m.model.forward(StepBatch(tok, [SeqSlice(0, 1, ctx, table)]), kv)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            m.model.forward(StepBatch(tok, [SeqSlice(0, 1, ctx + i, table)]), kv)
        torch.cuda.synchronize()

per: dict[str, float] = defaultdict(float)
count: dict[str, int] = defaultdict(int)
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        per[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        count[e.name] += 1
total = sum(per.values()) / args.steps
print(f"GPU kernel time per decode step: {total / 1e3:.3f} ms over {sum(count.values()) // args.steps} launches")
for name, t in sorted(per.items(), key=lambda kv: -kv[1])[:25]:
    print(f"{t / args.steps / 1e3:8.3f} ms {100 * t / args.steps / total:5.1f}% {count[name] // args.steps:4d}x  "
          f"{name[:110]}")
