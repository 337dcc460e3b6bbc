"""Can cuBLASLt run the decode step's fp8 GEMMs faster than the one algorithm torch._scaled_mm's heuristic picks?
(GPU; a development tool.) For Llama-3-8B's four linear shapes at M rows: bf16 F.linear, fp8 per-tensor
torch._scaled_mm (the cuda backend's QGemm path), and every algorithm cuBLASLt's heuristic offers for the same fp8
GEMM (nvmath-python's Matmul.plan, up to --limit of them), all fp8 with fast accumulation (the engine's default),
each timed as a CUDA graph of --calls launches (the GPU's time alone: session 28's gemm_probe timed single
launches, host latency included), the best algorithm's result checked against _scaled_mm's. Session 28 (H200): at
256 rows the fp8 qkv GEMM ran at 22% of the fp8 peak, the four GEMMs of a layer ~2.5x their compute floor.
TensorRT-LLM profiles cuBLASLt's algorithms for each shape.
Usage (device, nvmath-python and cuda-core on the path): python3 .ci/lt_probe.py [--rows 64,128,256,512]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from gemm_shapes import SHAPES, fp8_mm, operands, peak_operands  # (.ci/, the script's own folder)

ap = argparse.ArgumentParser()
ap.add_argument("--rows", default="64,128,256,512,1024")
ap.add_argument("--calls", type=int, default=20)
ap.add_argument("--limit", type=int, default=32)
args = ap.parse_args()
stream = torch.cuda.Stream()


def graph_us(fn) -> float:
    """Microseconds per call of fn: a CUDA graph of --calls calls, the median of 5 replays."""
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        for _ in range(args.calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / args.calls)
    return statistics.median(times)


try:
    import nvmath
    from nvmath.linalg.advanced import Matmul
except Exception as e:  # (the probe still prints torch's figures)
    print(f"nvmath-python: {type(e).__name__}: {e}")
    Matmul = None

big, one = peak_operands()
peak = 2 * 8192**3 / graph_us(lambda: fp8_mm(big, big, one)) / 1e6
print(f"{torch.cuda.get_device_name()}: fp8 8192^3 {peak:.0f} TFLOP/s (the peak below); times in us, graph-timed")
print("| rows | linear | bf16 | fp8 _scaled_mm | fp8 best of cuBLASLt's (algos) | best / _scaled_mm "
      "| floor (peak, bytes) |")
print("|---:|---|---:|---:|---:|---:|---:|")
for m in (int(r) for r in args.rows.split(",")):
    for name, (n, k) in SHAPES.items():
        x, w, xq, wq = operands(m, n, k)
        bf = graph_us(lambda: torch.nn.functional.linear(x, w))
        f8 = graph_us(lambda: fp8_mm(xq, wq, one))
        floor = max(2 * m * n * k / peak / 1e6, (n * k + m * k + 2 * m * n) / 4.24e6)
        best, count = "", 0
        if Matmul is not None:
            try:
                mm = Matmul(xq, wq.t(), quantization_scales={"a": one, "b": one},
                            options={"result_type": nvmath.CudaDataType.CUDA_R_16BF, "fast_accumulation": True},
                            stream=stream)
                algos = mm.plan(preferences={"limit": args.limit}, stream=stream)
                count = len(algos)
                want = fp8_mm(xq, wq, one)
                times = []
                for alg in algos:
                    try:
                        t = graph_us(lambda alg=alg: mm.execute(algorithm=alg, stream=stream))
                        got = mm.execute(algorithm=alg, stream=stream)
                        torch.cuda.synchronize()
                        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                        times.append((t, err))
                    except Exception as e:  # (an algorithm that will not run or capture: skipped)
                        times.append((float("inf"), repr(e)[:60]))
                if m == 64 and name == "qkv":
                    print(f"(nvmath's result: strides {mm.execute(algorithm=algos[0], stream=stream).stride()})")
                t, err = min(times, key=lambda te: te[0])
                best = f"{t:.1f} (rel err {err:.1e})" if isinstance(err, float) else f"none ran: {err}"
                ratio = f"{t / f8:.2f}" if t != float("inf") else ""
            except Exception as e:
                best, ratio = f"{type(e).__name__}: {str(e)[:80]}", ""
        else:
            ratio = ""
        print(f"| {m} | {name} {n}x{k} | {bf:.1f} | {f8:.1f} | {best} ({count}) | {ratio} | {floor:.1f} |", flush=True)
