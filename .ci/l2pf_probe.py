"""Does a decode GEMV's L2 prefetch before its wait (KILN_L2_PREFETCH, templates/l2_prefetch.cuh.j2) use the time
the kernel before it leaves DRAM idle? (GPU; a development tool, session 22.)

Each pair is a latency-bound stand-in kernel (one block that triggers its programmatic dependents at once,
then spins for SPIN µs, as decode attention or a norm leaves DRAM idle at batch 1) followed by a decode GEMV
launched as its programmatic dependent, over copies of the weight cycled so that L2 holds none of it when its
pair starts; the pairs captured in one graph and replayed. Per GEMV (the 8B model's o, qkv and gate+up in
bf16, fp8 "mma" and int4 warp form) and spin, µs per pair without and with the prefetch (the whole weight's
budget), and the spin alone: (pair - spin) is what the GEMV adds to the chain, and the prefetch's saving
should grow with the spin up to the weight's DRAM time.
Usage (device): PYTHONPATH=... python3 .ci/l2pf_probe.py [SPIN_US, comma-separated; default 0,2,4,8]
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from cuda.bindings import driver
from kiln.codegen import gemv as G
from kiln.codegen import gemv_fp8 as F8
from kiln.codegen.bench_kernels import _copies, time_ms
from kiln.codegen.launch import LoadedKernel, check, i64
from kiln.codegen.quant_kernels import pack, qgemv
from kiln.codegen.render import KernelSource
from kiln.dsl.quant import QuantDesc, quantize_weight

SPINS = [float(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,2,4,8").split(",")]
SHAPES = (("o", 4096, 4096), ("qkv", 6144, 4096), ("gate+up", 28672, 4096))
BUDGET = 64 << 20  # more than any of these weights: each prefetches all of itself
SPIN_SRC = r"""
extern "C" __global__ void probe_spin(long long cycles) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}
"""
dev = torch.device("cuda", torch.cuda.current_device())
spin_kernel = LoadedKernel(KernelSource("probe_spin", SPIN_SRC, "l2pf_probe", ("probe_spin",), {}), dev)
clock_hz = 1e3 * check(driver.cuDeviceGetAttribute(driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CLOCK_RATE,
                                                     dev.index), "cuDeviceGetAttribute(clock rate)")


def spin(us: float) -> None:
    spin_kernel.launch("probe_spin", (1,), (32,), [i64(int(us * 1e-6 * clock_hz))])


def graphed_us(calls) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return 1e3 * time_ms(g.replay) / len(calls)


def gemvs(name: str, n: int, k: int):
    """(label, weight bytes, make(budget) -> [one call per weight copy]) for the three families."""
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ws = _copies(lambda: (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16), n * k * 2)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)

    def bf16(budget):
        spec = G.spec_for(n, k, "bf16", False, name, l2_prefetch=budget)
        return [lambda w=w: G.gemv(spec, x, w, out, pdl=True) for w in ws]
    yield f"bf16 {name}", n * k * 2, bf16
    q8 = _copies(lambda: quantize_weight(torch.randn(n, k, device="cuda") / k**0.5,
                                         QuantDesc("fp8", "per_tensor", act="fp8_tensor")), n * k)

    def fp8(budget):
        spec = F8.spec_for(n, k, "bf16", False, decode="mma", l2_prefetch=budget)
        return [lambda w=w: F8.gemv_fp8(spec, x, w.q, w.scale.reshape(()), out, pdl=True) for w in q8]
    yield f"fp8 {name}", n * k, fp8
    p = pack(quantize_weight(torch.randn(n, k, device="cuda") * 0.05,
                             QuantDesc("int4", "per_group", 128, zero_points=True)))
    packs = _copies(lambda: dataclasses.replace(p, wq=p.wq.clone(), _rec={}), n * k // 2)

    def int4(budget):
        calls = []
        for q in packs:
            spec = dataclasses.replace(q, l2_prefetch=budget).spec(torch.bfloat16, 8, False)
            rec = q.records(torch.bfloat16)
            calls.append(lambda q=q, spec=spec, rec=rec: qgemv(spec, x, q.wq, rec, out))
        return calls
    yield f"int4 {name}", n * k // 2, int4


print(f"{'GEMV':14s} {'MB':>6s} " + " ".join(f"{'spin ' + str(s):>24s}" for s in SPINS))
print(f"{'':14s} {'':6s} " + " ".join(f"{'alone / off / on (µs)':>24s}" for _ in SPINS))
for name, n, k in SHAPES:
    for label, nbytes, make in gemvs(name, n, k):
        cells = []
        for s in SPINS:
            alone = graphed_us([lambda s=s: spin(s)] * 16)
            off = graphed_us([lambda c=c, s=s: (spin(s), c()) for c in make(0)])
            on = graphed_us([lambda c=c, s=s: (spin(s), c()) for c in make(BUDGET)])
            cells.append(f"{alone:6.1f} / {off:6.1f} / {on:6.1f}")
        print(f"{label:14s} {nbytes / 1e6:6.1f} " + " ".join(f"{c:>24s}" for c in cells), flush=True)
