"""How far the fp32 cuda backend is from the reference with adapters, over many seeds (GPU; a development tool).

Session 18's full GPU run failed test_lora.py's fp32 case once (KILN_TEST_SEED=3212102691: step 4 at
1.04e-4 against its 1e-4 bound, both LoRA kernels). Is that a kernel bug at one seed's shapes, or the bound
at the edge of fp32's own spread? This runs the test's 7 steps (a prefill, then decode through the CUDA
graphs) for SEEDS seeds (the failing one first), once with the test's adapter mix and once with every row on
the base model (the same batches, adapters attached), and prints each seed's worst step of both. The adapters:
the test's (ADAPTER_SCALE; PROBE_SCALE=0.3 the scale session 18's failure had).
With one seed it also prints the worst step's error row by row (row i: adapter i % 9 - 1). Run under
KILN_GEMV=0, KILN_PDL=0, ... and with PROBE_EAGER=1 (no CUDA graphs) to find the part that departs;
PROBE_TRACE=STEP runs that step of the first seed eagerly with every value traced on both backends and prints
the first values whose worst row departs by more than 1e-5 (the op that starts it).
Usage (device): PYTHONPATH=... python3 .ci/lora_rel_probe.py [SEEDS]
"""

from __future__ import annotations

import os
import random
import sys

import torch
from kiln.runtime.batch import StepBatch

from tests.gpu.test_cuda_backend import LLAMA, pair, rel
from tests.gpu.test_lora import ADAPTER_SCALE, attach_adapters, mixed_steps


def run(models, seed: int, mix: bool, rows: list | None = None) -> list[float]:
    """The test's steps at `seed`: the cuda backend's rel error from the reference, step by step (`rows`:
    receives each step's per-row errors)."""
    out = []
    for step, batch, kvs in mixed_steps(models, seed, mix):
        with torch.no_grad():
            if os.environ.get("PROBE_TRACE") == str(step) and rows is not None:
                a, b = traced(models, kvs, batch)
            else:
                a, b = (m.model.forward(batch, kv) for m, kv in zip(models, kvs))
        out.append(rel(b, a))
        if rows is not None:
            rows.append([rel(b[r], a[r]) for r in range(b.shape[0])])
    return out


def traced(models, kvs, batch):
    """One step on both backends with every value kept by name; prints where they first depart."""
    from kiln.dsl.plan import Value
    from kiln.runtime.lora import adapter_rows
    from kiln.runtime.reference import StepContext

    ref, cuda = models
    b = StepBatch(batch.device_tokens("cuda"), batch.seqs)
    ctx = StepContext(b, kvs[0], ref.model.weights)
    ctx.lora = ref.model.lora.bind(adapter_rows(b))
    env = {Value("tokens"): b.tokens, Value("positions"): ctx.positions}
    a = ctx.run(ref.plan.program, env)
    env = {v.id: t for v, t in env.items()}
    trace: dict = {}
    m = cuda.model
    lora = (m._lora.rows(adapter_rows(b).numpy()), None)
    out = m._run(b.tokens, m._meta(b), kvs[1], b, trace, lora=lora)
    shown = 0
    for name, v in trace.items():
        if name not in env or v.dim() == 0 or v.shape != env[name].shape or shown >= 14:
            continue
        w = env[name]
        errs = [rel(v[r], w[r]) for r in range(v.shape[0])]
        worst = max(range(len(errs)), key=errs.__getitem__)
        if errs[worst] > 1e-5:
            print(f"  {name}: row {worst} rel {errs[worst]:.3g} (|ref| {float(w[worst].float().norm()):.3g})")
            shown += 1
    return a.float(), out.float()


def main() -> None:
    import tempfile
    from pathlib import Path

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    tmp = Path(tempfile.mkdtemp())
    models = pair("llama", LLAMA, "fp32")
    attach_adapters(models, tmp, float(os.environ.get("PROBE_SCALE", ADAPTER_SCALE)))
    if os.environ.get("PROBE_EAGER") == "1":
        models[1].model.use_graphs = False
    seeds = [3212102691] + [random.Random(i).randrange(2**32) for i in range(n - 1)]
    print("seed        adapters: worst step (rel)   base rows only: worst step (rel)")
    worst = [0.0, 0.0]
    for seed in seeds:
        torch.manual_seed(seed)
        per_row: list = []
        m = run(models, seed, True, per_row)
        b = run(models, seed, False)
        worst = [max(worst[0], max(m)), max(worst[1], max(b))]
        print(f"{seed:<11d} {m.index(max(m))} {max(m):.3g}  [{' '.join(f'{v:.2g}' for v in m)}]   "
              f"{b.index(max(b))} {max(b):.3g}")
        if n == 1:
            print("rows at the worst step:", " ".join(f"{v:.2g}" for v in per_row[m.index(max(m))]))
    print(f"worst over {len(seeds)} seeds: adapters {worst[0]:.3g}, base rows {worst[1]:.3g}")


if __name__ == "__main__":
    main()
