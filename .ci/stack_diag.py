"""Where Mamba-2's layer stack kernel first departs from the step-by-step program (GPU; a development tool).

For each of the GPU test's shapes (tests/gpu/test_ssm_stack.py; random weights, eager steps) in fp32 and bf16: a
prompt, then one decode step run twice from the same states: step by step with a trace of every value, and as the
stack kernel with KILN_SSM_STACK_DUMP=1 (each layer's in_proj output, y and out_proj output, copied by block 0 once
complete). Prints, per layer, the relative error and the NaN count of xbc, dt, z, y and o, the logits' and states'
errors, and the first value that departs. Then the same from a slot that holds garbage at context 0 (the states
read as zeros: the steps' logits beside those from zeroed states too). Arguments: KILN_SSM_STACK_RING values to
try ("" for the defaults).
Usage (device): PYTHONPATH=... python3 .ci/stack_diag.py [RING ...]
"""

from __future__ import annotations

import os
import sys

import torch
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import LoadedModel, make_backend, random_model
from kiln.runtime.state_cache import StateStore

from tests.gpu.test_ssm_stack import SHAPES

TOL = {"fp32": 1e-4, "bf16": 3e-2}
rings = sys.argv[1:] or [""]
CASES = ("context 9", "fresh")


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def report(m, trace: dict, dumped: torch.Tensor, tol: float) -> str:
    """Per layer: each dumped value against the trace's; returns the first departure ('' if none)."""
    st = m.model._ssm_stack.stack
    ops, sp = m.model.ops, st.spec
    first = ""
    for i, layer in enumerate(st.layers):
        gemm = ops[layer.in_proj].extra["gemm"]
        ssm = ops[layer.ssm]
        role = {ssm.ins[0]: "xbc", ssm.ins[3]: "dt"}
        parts = [(role.get(v, "z"), start, width, v) for v, (start, width) in zip(gemm.outs, gemm.extra["slices"])]
        parts += [("y", sp.in_rows, sp.d_inner, ssm.outs[0]),
                  ("o", sp.in_rows + sp.d_inner, sp.hidden, ops[layer.out_proj].extra["gemm"].outs[0])]
        cells = []
        for name, start, width, v in sorted(parts, key=lambda p: p[1]):
            got, want = dumped[i, start:start + width], trace[v.id][0]
            e, nans = rel(got, want), int(torch.isnan(got).sum())
            cells.append(f"{name} {e:.2e}" + (f" ({nans} NaN)" if nans else ""))
            if not first and (nans or e > tol):
                first = f"layer {i} {name}: rel {e:.3g}, {nans} NaN of {width}"
        print(f"    layer {i}: " + ", ".join(cells))
    return first


for shape, cfg in SHAPES.items():
    for dtype in TOL:
        ref = random_model("models/mamba2.kiln", cfg, dtype=dtype, device="cuda", seed=0)  # the reference backend
        m = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                        ref.device)
        m.model.use_graphs = False
        stack = m.model._ssm_stack
        if stack.stack is None:
            print(f"== {shape} {dtype}: no stack: {stack.why}")
            continue
        for ring, case in [(r, c) for r in rings for c in CASES]:
            os.environ["KILN_SSM_STACK_RING"] = ring
            kvs = [KVStore(m.plan.sites, 4, 16, m.dtype, "cuda", state=StateStore(2)) for _ in range(4)]
            prompt = torch.randint(0, m.plan.vocab_size, (9,))
            nxt = torch.randint(0, m.plan.vocab_size, (1,))
            with torch.no_grad():
                os.environ["KILN_SSM_STACK"] = "0"
                if case == "fresh":  # a first token on a slot that holds garbage (kvs[2]: zeros): zero states read
                    for site in m.plan.state_sites:
                        dt = torch.float32 if site.kind == "selective_scan" else m.dtype
                        g = torch.randn(site.shape, generator=torch.Generator().manual_seed(site.index)).to(dt)
                        for j, kv in enumerate(kvs):
                            kv.state.site(site.index, site.shape, dt, "cuda")[1] = 0 if j == 2 else g.cuda()
                    ctx = 0
                else:
                    for kv in kvs[:3]:
                        m.model.forward(StepBatch(prompt, [SeqSlice(0, 9, 0, (0,), state_slot=1)]), kv)
                    ref.model.forward(StepBatch(prompt, [SeqSlice(0, 9, 0, (0,), state_slot=1)]), kvs[3])
                    ctx = 9
                batch = StepBatch(nxt, [SeqSlice(0, 1, ctx, (0,), state_slot=1)])
                trace: dict = {}
                want = m.model._run(batch.device_tokens(m.device), m.model._meta(batch), kvs[0], batch, trace).float()
                zero = m.model.forward(batch, kvs[2]).float()
                oracle = ref.model.forward(batch, kvs[3]).float() if case != "fresh" else None
                os.environ["KILN_SSM_STACK"] = os.environ["KILN_SSM_STACK_DUMP"] = "1"
                got = m.model.forward(batch, kvs[1])
                os.environ["KILN_SSM_STACK_DUMP"] = "0"
            torch.cuda.synchronize()
            print(f"== {shape} {dtype} ring {ring or 'default'} {case}: logits rel {rel(got, want):.3g}, "
                  f"{int(torch.isnan(got).sum())} NaN; steps vs steps from zero states {rel(zero, want):.3g}"
                  + (f"; vs the reference backend: steps {rel(want, oracle):.3g}, stack {rel(got, oracle):.3g}"
                     if oracle is not None else ""))
            first = report(m, trace, stack.dumped, TOL[dtype])
            states = []
            for site in m.plan.state_sites:
                a, b = (kv.state.tensors[site.index][1] for kv in (kvs[1], kvs[0]))
                states.append(f"{site.kind} {site.path} {rel(a, b):.2e}")
            print("    states: " + ", ".join(states))
            print(f"    first departure: {first or 'none'}")
        del m, ref
        torch.cuda.empty_cache()
