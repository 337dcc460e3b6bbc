"""Batch-1 paged decode attention against its KV partition (GPU; a development tool, issue #12).

The graphed decode step sizes the split-K grid for the model's max_context (runtime/cuda_backend.py), so at
batch 1 and a short context only a few splits hold tokens: the 8B shape at context 1,024 under a 4,096
capacity runs 8 kv heads x 8 splits of 128 tokens, 64 blocks on 132 SMs. This times the kernel per
partition (tokens per split, whole 64-token tiles) at contexts 1k / 4k / 16k, microseconds per call
(graphed) and the share of the copy bandwidth its K/V bytes are; "model" is kernels.decode_partition's pick.
Usage (device): PYTHONPATH=... python3 .ci/decode_partition.py
"""

from __future__ import annotations

import torch
from kiln.codegen import kernels as K
from kiln.codegen.bench_kernels import DT, HEAD_DIM, HEADS, KV_HEADS, PAGE, Graphed, copy_bandwidth, per_call_ms
from kiln.codegen.specs import DecodeAttnSpec

PARTITIONS = (64, 128, 256, 512)


def main() -> None:
    bw = copy_bandwidth()
    spec = DecodeAttnSpec(HEADS, KV_HEADS, HEAD_DIM, PAGE, HEAD_DIM ** -0.5, origin="partition")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s\n")
    print("| ctx | capacity | " + " | ".join(f"part {p}" for p in PARTITIONS) + " | model |")
    print("|---:|---:|" + "---:|" * (len(PARTITIONS) + 1))
    for ctx, cap in ((1024, 4096), (1024, 1024), (4096, 4096), (16384, 16384)):
        per_seq = cap // PAGE
        kc = torch.randn(per_seq, KV_HEADS, PAGE, HEAD_DIM, device="cuda", dtype=DT)
        vc = torch.randn_like(kc)
        tables = torch.randperm(per_seq, device="cuda").int().view(1, per_seq)
        lens = torch.full((1,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(1, HEADS * HEAD_DIM, device="cuda", dtype=DT)
        out = torch.empty_like(q)
        scratch = K.decode_scratch(spec, 1, cap, "cuda", min_partition=64)
        nbytes = 2 * ctx * KV_HEADS * HEAD_DIM * 2
        kern = K._kernel(spec, q.device)
        meta = kern.source.meta
        resident = kern.num_sms * kern.blocks_per_sm(kern.source.entries[0], meta["threads"], meta["smem"])
        model = K.decode_partition(spec, 1, cap, resident, max(1, -(-cap // 128)))
        cells = []
        for p in PARTITIONS + (model,):
            ms = per_call_ms(Graphed(lambda p=p: K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch,
                                                                          cap, partition=p)))
            cells.append(f"{ms * 1e3:.1f} ({nbytes / (ms * 1e-3) / bw:.0%})" + (f" [{p}]" if p == model and
                                                                              len(cells) == len(PARTITIONS) else ""))
        print(f"| {ctx} | {cap} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
