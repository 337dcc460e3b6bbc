"""The LM head at one row, by precision and grid (GPU; a development tool, issues #12 and #13).

Session 17's quantized LM head (`--quantization SCHEME+lm-head`) did not speed the 8B batch-1 step up
(session 18, call 1): at 128,256 rows the GEMV choosers' one-wave grids leave a warp 64 rows (the fp8 GEMV's
then spill). This times, at the 8B model's LM head (128,256 x 4,096) and SmolLM2's (49,152 x 576), each
as microseconds per call and share of copy bandwidth, graphed back to back with programmatic launches, copies
of W cycled as codegen/bench_kernels.py does:
  bf16     the bf16 GEMV at its chooser's grid, and torch's matmul (cuBLAS)
  fp8      the one-row fp8 GEMV ("mma") at 16, 32 and 64 rows a warp, 1 and 2 K slices (* = spec_for's pick)
  int4     the warp W4A16 GEMV (group 128, zero points) at (tiles a warp, K slices, blocks per SM) grids
Usage (device): PYTHONPATH=... python3 .ci/lmhead_probe.py
"""

from __future__ import annotations

import dataclasses

import torch
from kiln.codegen import gemv_fp8 as G
from kiln.codegen.bench_kernels import DT, _copies, _graphed_ms
from kiln.codegen.bench_kernels import copy_bandwidth as _copy_bw
from kiln.codegen.gemv import GemvSpec, choose, gemv
from kiln.codegen.quant_kernels import Packed, choose_warp, pack
from kiln.dsl.quant import QuantDesc, quantize_weight

SHAPES = (("llama3 lm_head", 128256, 4096), ("smollm2 lm_head", 49152, 576))
FP8_GRIDS = ((16, 1), (32, 1), (64, 1), (16, 2), (32, 2))
INT4_GRIDS = ((1, 1, 2), (2, 1, 2), (4, 1, 2), (1, 2, 2), (2, 2, 2), (1, 1, 3))


def cell(t_ms: float, nbytes: int, bw: float) -> str:
    return f"{t_ms * 1e3:.1f} ({nbytes / (t_ms * 1e-3) / bw:.0%})"


def main() -> None:
    bw = _copy_bw()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s\n")
    for label, n, k in SHAPES:
        print(f"### {label} {n}x{k}")
        x = torch.randn(1, k, device="cuda", dtype=DT)
        # bf16
        nb = n * k * 2
        ws = _copies(lambda: torch.randn(n, k, device="cuda", dtype=DT) * 0.02, nb)
        outs = [torch.empty(1, n, device="cuda", dtype=DT) for _ in ws]
        spec = GemvSpec(n, k, False, "bf16", f"lmhead probe {label}", *choose(n, k, "bf16", sms))
        t = _graphed_ms([lambda w=w, o=o: gemv(spec, x, w, o, pdl=True) for w, o in zip(ws, outs)])
        print(f"bf16 GEMV {spec.rows}x{spec.ksplit}: {cell(t, nb, bw)}")
        t = _graphed_ms([lambda w=w, o=o: torch.matmul(x, w.t(), out=o) for w, o in zip(ws, outs)])
        print(f"bf16 cuBLAS: {cell(t, nb, bw)}", flush=True)
        del ws, outs
        torch.cuda.empty_cache()
        # fp8
        nb = n * k
        sw = torch.tensor(0.02 / 448, device="cuda")
        ws = _copies(lambda: (torch.randn(n, k, device="cuda") * 200).to(torch.float8_e4m3fn), nb)
        outs = [torch.empty(1, n, device="cuda", dtype=DT) for _ in ws]
        pick = G.spec_for(n, k, "bf16", False, origin=f"lmhead probe {label}", num_sms=sms, decode="mma")
        cells = []
        for rows, ks in FP8_GRIDS:
            spec = dataclasses.replace(pick, rows=rows, ksplit=ks)
            t = _graphed_ms([lambda w=w, o=o: G.gemv_fp8(spec, x, w, sw, o, pdl=True) for w, o in zip(ws, outs)])
            star = "*" if (rows, ks) == (pick.rows, pick.ksplit) else ""
            cells.append(f"{rows}x{ks}{star}: {cell(t, nb, bw)}")
        print("fp8 GEMV rows x K slices: " + ", ".join(cells), flush=True)
        del ws, outs
        torch.cuda.empty_cache()
        # int4
        desc = QuantDesc("int4", "per_group", 128 if k % 128 == 0 else 64, zero_points=True)
        base = pack(quantize_weight(torch.randn(n, k, device="cuda") * 0.02, desc), origin=f"lmhead probe {label}")
        nb = base.wq.numel() + base.records(DT).numel() * 2 + (k + n) * 2
        cells = []
        chosen = (*choose_warp(n, k, desc.group_size, sms), 2)
        for grid in INT4_GRIDS:
            packs = _copies(lambda b=base, g=grid: Packed(b.fmt, b.mode, n, k, b.group, b.wq.clone(), b.rec32, None,
                                                          b.origin, "warp", warp_pick=g), nb)
            t = _graphed_ms([lambda p=p: p.linear(x, None) for p in packs])
            star = "*" if grid == chosen else ""
            cells.append(f"{grid[0]}x{grid[1]}b{grid[2]}{star}: {cell(t, nb, bw)}")
            del packs
        print("int4 warp GEMV tiles x K slices b blocks/SM: " + ", ".join(cells) + "\n", flush=True)
        del base
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
