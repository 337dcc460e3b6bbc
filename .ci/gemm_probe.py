"""How fast the GEMMs of a throughput step run at each row count (GPU; a development tool): Llama-3-8B's four
linear shapes at M rows, bf16 (F.linear) against fp8 per-tensor (`torch._scaled_mm`, the cuda backend's QGemm path)
and fp8 with the operands swapped (y^T = W x^T: cuBLASLt then tiles the row count as its N, which may suit few
rows), each the median of --reps timed launches (CUDA events), in TFLOP/s and as a share of the fp8 peak measured
in the same run (an 8192^3 GEMM). Session 26: the decode GEMMs at 256 rows ran at about half the fp8 peak; with
M/128 x N/256 tiles, o_proj and down_proj (N 4,096) fill 32 of the H100's 132 SMs. Session 28 (H200): the swapped
form took 1.18-1.97x the plain one's time at every row count (the KILN_FP8_SWAP_ROWS switch was removed); these
single-launch times include host latency, which .ci/lt_probe.py's graph-timed ones do not. Usage (device):
python3 .ci/gemm_probe.py [--rows 64,128,256,512,1024,2048] [--reps 50]
"""

from __future__ import annotations

import argparse

import torch
from gemm_shapes import SHAPES, fp8_mm, operands, peak_operands  # (.ci/, the script's own folder)
from kiln.runtime.bench import _events_ms

ap = argparse.ArgumentParser()
ap.add_argument("--rows", default="64,128,256,512,1024,2048")
ap.add_argument("--reps", type=int, default=50)
args = ap.parse_args()


def timed(fn) -> float:
    """Median milliseconds of fn over --reps launches (after three untimed)."""
    for _ in range(3):
        fn()
    times = _events_ms(fn, args.reps)
    return sorted(times)[len(times) // 2]


big, one = peak_operands()
peak = 2 * 8192**3 / timed(lambda: fp8_mm(big, big, one)) / 1e9
print(f"{torch.cuda.get_device_name()}: fp8 8192^3 {peak:.0f} TFLOP/s (the peak below)")
print("| rows | linear | bf16 TFLOP/s | fp8 | fp8 swapped | fp8 share of peak | swapped / fp8 time |")
print("|---:|---|---:|---:|---:|---:|---:|")
for m in (int(r) for r in args.rows.split(",")):
    for name, (n, k) in SHAPES.items():
        x, w, xq, wq = operands(m, n, k)
        flop = 2 * m * n * k / 1e9
        bf = timed(lambda: torch.nn.functional.linear(x, w))
        f8 = timed(lambda: fp8_mm(xq, wq, one))
        sw = timed(lambda: fp8_mm(wq, xq, one).t().contiguous())
        print(f"| {m} | {name} {n}x{k} | {flop / bf:.0f} | {flop / f8:.0f} | {flop / sw:.0f} | {flop / f8 / peak:.0%} "
              f"| {sw / f8:.2f} |", flush=True)
