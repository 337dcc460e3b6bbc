"""Whether Mamba-2's layer stack kernel departs from the step-by-step program at random (a race), and in which
blocks (GPU; a development tool). For each of the GPU test's shapes in fp32 and bf16 (random weights, eager steps),
TRIALS times: a prompt, then one decode step both ways from the same states (the stack with KILN_SSM_STACK_DUMP=1).
Prints, per trial, the logits' relative error and, for layer 0's in_proj output (the dump's first part), the blocks
whose rows depart (a block's rows: [b * rows / SMs, (b + 1) * rows / SMs)). Modes: "plain"; "sync" (the device
synchronised before each stack launch: rules in or out a race with the kernels before it); "fence" (every writer
fences its own writes before each grid barrier: KILN_SSM_STACK_FENCE=1). A departing row that
holds the last trial's value was not written (or not visible) when block 0 read it.
Usage (device): PYTHONPATH=... python3 .ci/stack_race.py [TRIALS] [SHAPE ...]
"""

from __future__ import annotations

import os
import sys

import torch
from kiln.codegen import kernels as K
from kiln.runtime import cuda_ssm
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model
from kiln.runtime.state_cache import StateStore

from tests.gpu.test_cuda_backend import rel
from tests.gpu.test_ssm_stack import SHAPES

trials = int(sys.argv[1]) if len(sys.argv) > 1 else 6
shapes = sys.argv[2:] or list(SHAPES)
launch = K.ssm_stack
mode = {"sync": False}


def ssm_stack(*a, **kw):
    if mode["sync"]:
        torch.cuda.synchronize()
    return launch(*a, **kw)


cuda_ssm.K.ssm_stack = ssm_stack  # (cuda_ssm calls K.ssm_stack through the module)
sms = torch.cuda.get_device_properties(0).multi_processor_count


def ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out) or "none"


for shape in shapes:
    for dtype in ("fp32", "bf16"):
        m = random_model("models/mamba2.kiln", SHAPES[shape], dtype=dtype, device="cuda", backend="cuda")
        m.model.use_graphs = False
        stack = m.model._ssm_stack
        rows = stack.stack.spec.in_rows
        tol = 1e-4 if dtype == "fp32" else 3e-2
        for name in ("plain", "sync", "fence"):
            mode["sync"] = name == "sync"
            os.environ["KILN_SSM_STACK_FENCE"] = "1" if name == "fence" else "0"
            res, prev = [], None
            for t in range(trials):
                kvs = [KVStore(m.plan.sites, 4, 16, m.dtype, "cuda", state=StateStore(2)) for _ in range(2)]
                prompt = torch.randint(0, m.plan.vocab_size, (9,))
                nxt = torch.randint(0, m.plan.vocab_size, (1,))
                with torch.no_grad():
                    os.environ["KILN_SSM_STACK"] = "0"
                    for kv in kvs:
                        m.model.forward(StepBatch(prompt, [SeqSlice(0, 9, 0, (0,), state_slot=1)]), kv)
                    batch = StepBatch(nxt, [SeqSlice(0, 1, 9, (0,), state_slot=1)])
                    trace: dict = {}
                    want = m.model._run(batch.device_tokens(m.device), m.model._meta(batch), kvs[0], batch,
                                        trace).float()
                    os.environ["KILN_SSM_STACK"] = os.environ["KILN_SSM_STACK_DUMP"] = "1"
                    got = m.model.forward(batch, kvs[1]).float()
                    os.environ["KILN_SSM_STACK_DUMP"] = "0"
                torch.cuda.synchronize()
                gemm = m.model.ops[stack.stack.layers[0].in_proj].extra["gemm"]
                ref = torch.cat([trace[v.id][0] for v in gemm.outs]).float()  # (slices in order, no gaps here)
                dumped = stack.dumped[0, :rows].float()
                bad = ((dumped - ref).abs() > tol * ref.abs().clamp_min(1e-2)).nonzero().flatten().tolist() \
                    if ref.numel() == rows else []
                blocks = sorted({next(b for b in range(sms) if r < (b + 1) * rows // sms) for r in bad})
                # departing rows that hold the last trial's values: never written this launch, or not yet visible
                stale = int((dumped[bad] == prev[bad]).sum()) if prev is not None and bad else 0
                prev = dumped.clone()
                where = f" [{len(bad)} rows, {stale} stale; blocks {ranges(blocks)}]" if bad else ""
                res.append(f"{rel(got, want):.2g}{where}")
            print(f"== {shape} {dtype} {name}: " + "; ".join(res), flush=True)
        del m
        torch.cuda.empty_cache()
