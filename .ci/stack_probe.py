"""Where a Mamba-2 decode step's time goes inside the layer stack kernel (GPU; a development tool).

Runs the Mamba-2 2.7B shape (--config; random weights, bf16, cuda backend, graphs off) for a few one-token decode steps
with KILN_SSM_STACK=1 and KILN_SSM_STACK_PROBE=1, for each ring setting given (KILN_SSM_STACK_RING values; "" for
the defaults), and prints, per setting: the eager step's wall time (median), the kernel's own time (CUDA events around
the step's launches, median), and the mean time a block spends in each phase of a layer (consumer thread 0's SM clock
at each of codegen/ssm_stack.py's PROBE_POINTS, over every block and layers 2 to L-1, converted with the SM clock
rate). Barrier phases include the waiting for the slowest block. Usage (device):
PYTHONPATH=... python3 .ci/stack_probe.py [--config C] [--steps N] [RING ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from cuda.bindings import driver
from kiln.codegen.ssm_stack import PROBE_POINTS
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model
from kiln.runtime.state_cache import StateStore

ap = argparse.ArgumentParser()
ap.add_argument("--config", default="configs/mamba2-2.7b.json")
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("rings", nargs="*", default=[""])
args = ap.parse_args()

os.environ["KILN_SSM_STACK"] = "1"
m = random_model("models/mamba2.kiln", json.load(open(args.config)), dtype="bf16", device="cuda", backend="cuda")
m.model.use_graphs = False
stack = m.model._ssm_stack
if stack.stack is None:
    raise SystemExit(f"no stack: {stack.why}")
kv = KVStore(m.plan.sites, 4, 16, m.dtype, "cuda", state=StateStore(2))
dev = driver.cuDeviceGet(torch.cuda.current_device())[1]
khz = driver.cuDeviceGetAttribute(driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CLOCK_RATE, dev)[1]
print(f"{torch.cuda.get_device_name()}: SM clock {khz / 1e3:.0f} MHz (the attribute's, the boost clock), "
      f"{stack.stack.spec.layers} layers")
tok = torch.ones(1, dtype=torch.long)


def step(i: int):
    return m.model.forward(StepBatch(tok, [SeqSlice(0, 1, 8 + i, (0,), state_slot=0)]), kv)


with torch.no_grad():
    m.model.forward(StepBatch(torch.ones(8, dtype=torch.long), [SeqSlice(0, 8, 0, (0,), state_slot=0)]), kv)
    for ring in args.rings:
        os.environ["KILN_SSM_STACK_RING"] = ring
        for probe in ("0", "1"):
            os.environ["KILN_SSM_STACK_PROBE"] = probe
            step(0)  # compiles this variant
            torch.cuda.synchronize()
            wall, kern = [], []
            for i in range(args.steps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                a.record()
                step(i)
                b.record()
                torch.cuda.synchronize()
                wall.append(time.perf_counter() - t0)
                kern.append(a.elapsed_time(b))
            if probe == "0":
                wall.sort()
                kern.sort()
                print(f"== ring {ring or 'default'}: eager step wall {1e3 * wall[len(wall) // 2]:.3f} ms, "
                      f"GPU {kern[len(kern) // 2]:.3f} ms (medians of {args.steps})")
        c = stack.clocks.double()  # [blocks, layers, points] from the last probed step
        d = (c[:, 2:-1, 1:] - c[:, 2:-1, :-1]) / (khz / 1e3)  # us, each phase of layers 2..L-2 (L-1 ends early)
        per = d.mean(dim=(0, 1))
        layer = ((c[:, 3:-1, 0] - c[:, 2:-2, 0]) / (khz / 1e3)).mean()
        print(f"   a layer {float(layer):.2f} us (probed); " + ", ".join(
            f"{name} {float(v):.2f}" for name, v in zip(PROBE_POINTS[1:], per)))
        heads = stack.stack.spec.heads
        print(f"   conv + scan, head blocks only: {float(d[:heads, :, 3].mean()):.2f} us; barrier 2 there: "
              f"{float(d[:heads, :, 4].mean()):.2f} us, elsewhere {float(d[heads:, :, 4].mean()):.2f} us")
