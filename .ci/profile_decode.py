"""Where a decode step's time goes, kernel by kernel (GPU; a development tool).

Runs a model (--spec, --config; default the Llama-3-8B shape; random weights, bf16, cuda backend) with graphs off under
torch.profiler for a few decode steps of --batch sequences (1) at context --ctx (2,048) and prints GPU
time per kernel name, summed over the steps and divided by their number, largest first, with each
one's share of the step. --graphs: the decode steps as CUDA-graph replays (the kernels as the engine runs
them: programmatic launches overlap, so a kernel's own duration counts the time it waited for the one before);
it then prints, per kernel name, its step on the critical path too: the time from the previous kernel's end to
its own (kernels ordered by their ends), which sums to the step's span. Usage (device):
PYTHONPATH=... python3 .ci/profile_decode.py [--spec S --config C] [--quantization SCHEME]
    [--kv-cache-dtype fp8] [--batch B] [--ctx C] [--prefill N [--prompts K]] [--graphs]
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
ap.add_argument("--spec", default="models/llama.kiln")
ap.add_argument("--config", default="configs/llama-3-8b.json")
ap.add_argument("--quantization", default="none")
ap.add_argument("--kv-cache-dtype", default="auto")
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--ctx", type=int, default=2048)
ap.add_argument("--prefill", type=int, default=0, help="a mixed step: one more sequence's N-token prompt chunk")
ap.add_argument("--prompts", type=int, default=1, help="with --prefill: that many prompt chunks of N tokens each")
ap.add_argument("--graphs", action="store_true", help="steps as CUDA-graph replays (with --prefill: a mixed graph "
                "of its bucket, captured at the first step, as a throughput run replays it)")
args = ap.parse_args()

config = json.load(open(args.config))
m = random_model(args.spec, config, dtype="bf16", device="cuda", backend="cuda",
                 quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
m.model.use_graphs = m.model.mixed_graphs = args.graphs
ctx, B = args.ctx, args.batch
per_seq = (ctx + args.steps + 8) // 16 + 1  # pages a sequence needs for the run
P, N = args.prefill, args.prompts if args.prefill else 0
m.model.reserve(B + N, max(ctx + args.steps, P) + 16)  # (graphs: up to this batch and context)
chunk_pages = P // 16 + 1
kv = KVStore(m.plan.sites, B * per_seq + N * chunk_pages, 16, m.dtype, "cuda")
tables = [tuple(range(b * per_seq, (b + 1) * per_seq)) for b in range(B)]
chunk_tables = [tuple(range(B * per_seq + j * chunk_pages, B * per_seq + (j + 1) * chunk_pages)) for j in range(N)]
tok = torch.ones(B + N * P, dtype=torch.long)


def batch(i: int) -> StepBatch:  # B one-token decode rows at context ctx + i (+ N P-token prompt chunks)
    seqs = [SeqSlice(b, 1, ctx + i, tables[b]) for b in range(B)]
    return StepBatch(tok, seqs + [SeqSlice(B + j * P, P, 0, chunk_tables[j]) for j in range(N)])


with torch.no_grad():
    for _ in range(3):
        m.model.forward(batch(0), kv)
    torch.cuda.synchronize()
    # Host time of an eager forward (its launches, with nothing queued before them) against its wall time: an
    # eager step whose host time is near its wall time is launch-bound, and overlap hides only what the step
    # before it leaves (runtime/engine.py)
    import time
    host, wall = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        m.model.forward(batch(i), kv)
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
    host.sort()
    wall.sort()
    mid = len(host) // 2
    print(f"{'forward' if args.graphs else 'eager forward'}: host (launches) {1e3 * host[mid]:.3f} ms, wall "
          f"{1e3 * wall[mid]:.3f} ms (medians; steps run: {dict(m.model.step_counts)})")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            m.model.forward(batch(i), kv)
        torch.cuda.synchronize()

per: dict[str, float] = defaultdict(float)
count: dict[str, int] = defaultdict(int)
crit: dict[str, float] = defaultdict(float)  # --graphs: each kernel's end minus the previous kernel's end
kernels = []
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        per[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        count[e.name] += 1
        kernels.append((e.time_range.end, e.name))
if args.graphs:
    kernels.sort()
    for (end0, _), (end, name) in zip(kernels, kernels[1:]):
        crit[name] += end - end0
    span = sum(crit.values()) / args.steps
    print(f"graphed: critical path per step {span / 1e3:.3f} ms (the kernels' ends, in order; includes the gaps "
          f"between steps' graphs)")
    for name, t in sorted(crit.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{t / args.steps / 1e3:8.3f} ms {100 * t / args.steps / span:5.1f}% {count[name] // args.steps:4d}x  "
              f"[critical] {name[:100]}")
total = sum(per.values()) / args.steps
chunk = f", + {N} prompt chunk(s) of {P} tokens" if P else ""
print(f"batch {B}, context {ctx}{chunk}: GPU kernel time per decode step: {total / 1e3:.3f} ms "
      f"over {sum(count.values()) // args.steps} launches")
for name, t in sorted(per.items(), key=lambda kv: -kv[1])[:25]:
    print(f"{t / args.steps / 1e3:8.3f} ms {100 * t / args.steps / total:5.1f}% {count[name] // args.steps:4d}x  "
          f"{name[:110]}")
