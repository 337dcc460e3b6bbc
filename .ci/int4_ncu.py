"""Hardware counters of the INT4 W4A16 GEMV variants at one row (issue #13: >= 80% of copy bandwidth).

Run under ncu (device_check.sh int4ncu: every launch profiled, NCU_COUNT of them): each variant of
templates/gemv_wq.cu.j2 (argv[1], comma-separated) at Llama-3-8B's shapes (argv[2]: gateup, down, qkv, o;
default gateup,down), launched three times each."""
import sys

import torch
from kiln.codegen.quant_kernels import Packed, pack
from kiln.dsl.quant import QuantDesc, quantize_weight

SHAPES = {"gateup": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096)}
variants = sys.argv[1].split(",") if len(sys.argv) > 1 else ["loop", "stream", "warp"]
shapes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["gateup", "down"]
desc = QuantDesc("int4", "per_group", 128, zero_points=True)
for name in shapes:
    n, k = SHAPES[name]
    base = pack(quantize_weight(torch.randn(n, k, device="cuda") * 0.02, desc), origin=f"ncu {name}")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for v in variants:
        p = Packed(base.fmt, base.mode, n, k, base.group, base.wq, base.rec32, None, base.origin, v)
        torch.cuda.nvtx.range_push(f"{name}-{v}")
        for _ in range(3):
            p.linear(x, None)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(name, v, "ok", flush=True)
