"""Where a throughput engine's GPU memory goes (GPU; a development tool): the model, the KV cache, then each CUDA
graph capture_decode_graphs makes (decode buckets one at a time, then the large mixed graphs), with the device's
free memory and torch's reserved memory after each. Session 27: max batch 512 ran out of memory with 18 GiB in
graph pools. Usage (device): PYTHONPATH=... python3 .ci/graph_mem.py [--quantization fp8 --kv-cache-dtype fp8]
    [--max-batch 512] [--budget 4096] [--input-len 128] [--output-len 128]
"""

from __future__ import annotations

import argparse
import json

import torch
from kiln.runtime import cuda_backend as cb
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model import random_model

ap = argparse.ArgumentParser()
ap.add_argument("--spec", default="models/llama.kiln")
ap.add_argument("--config", default="configs/llama-3-8b.json")
ap.add_argument("--quantization", default="fp8")
ap.add_argument("--kv-cache-dtype", default="fp8")
ap.add_argument("--max-batch", type=int, default=512)
ap.add_argument("--budget", type=int, default=4096)
ap.add_argument("--input-len", type=int, default=128)
ap.add_argument("--output-len", type=int, default=128)
ap.add_argument("--kv-fraction", type=float, default=0.9)
args = ap.parse_args()
GiB = 2**30


def line(what: str) -> None:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    print(f"{what:<44} free {free / GiB:6.2f}  allocated {torch.cuda.memory_allocated() / GiB:6.2f}  "
          f"reserved {torch.cuda.memory_reserved() / GiB:6.2f} GiB", flush=True)


line("start")
m = random_model(args.spec, json.load(open(args.config)), dtype="bf16", device="cuda", backend="cuda",
                 quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
line("model")
torch.cuda.empty_cache()
line("model, cache emptied")
engine = LLMEngine(m, None, EngineConfig(max_num_seqs=args.max_batch, max_tokens_per_step=args.budget,
                                         max_model_len=args.input_len + args.output_len,
                                         kv_memory_fraction=args.kv_fraction))
line("engine (" + engine.capacity + ")")
model = engine.model
for b in cb.GRAPH_BUCKETS:
    if b > args.max_batch:
        break
    model.capture_decode_graphs(engine.kv, b)  # (the buckets below it are captured already: this one alone)
    line(f"decode graph {b}")
made = model.capture_decode_graphs(engine.kv, args.max_batch, args.budget, args.input_len)
line(f"+ {made} mixed graphs {sorted(model._mixed)} (short: {sorted(model._eager_mixed)})")
stats = torch.cuda.memory_stats()
print({k: round(v / GiB, 2) for k, v in stats.items() if k.endswith("bytes.all.peak") or k.endswith("bytes.all.current")
       if "reserved" in k or "allocated" in k})

# Then one eager step of the budget's tokens in --input-len prompts beside as many decode rows as fit (a full
# step of the workload) under torch's memory history: its largest allocations, each with the kiln frame that made it.
from kiln.runtime.batch import SeqSlice, StepBatch  # noqa: E402

model.drop_graphs()
torch.cuda.empty_cache()
n_prompts = max(1, args.budget // args.input_len)
decode_rows = min(args.max_batch - n_prompts, 256)
pages = -(-(args.input_len + args.output_len) // 16)
def table(i):
    return tuple(range(i * pages, (i + 1) * pages))


seqs = [SeqSlice(i, 1, args.input_len, table(i)) for i in range(decode_rows)]  # (start, length, context, pages)
seqs += [SeqSlice(decode_rows + j * args.input_len, args.input_len, 0, table(decode_rows + j))
         for j in range(n_prompts)]
batch = StepBatch(torch.ones(decode_rows + n_prompts * args.input_len, dtype=torch.long), seqs)
model.use_graphs = model.mixed_graphs = False
with torch.no_grad():
    model.forward(batch, engine.kv)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    model.forward(batch, engine.kv)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
print(f"eager step: {decode_rows} decode rows + {n_prompts} prompts of {args.input_len}: peak "
      f"{(torch.cuda.max_memory_allocated() - base) / GiB:.2f} GiB above {base / GiB:.2f}")
allocs = []
for trace in snap["device_traces"]:
    for e in trace:
        if e["action"] == "alloc":
            frames = [f for f in e.get("frames", []) if "kiln" in f["filename"]]
            f = frames[0] if frames else {"filename": "?", "line": 0, "name": ""}
            where = f"{f['filename'].split('kiln/')[-1]}:{f['line']} {f['name']}"
            allocs.append((e["size"], where))
allocs.sort(reverse=True)
for size, where in allocs[:14]:
    print(f"  {size / 2**20:9.1f} MiB  {where}")
