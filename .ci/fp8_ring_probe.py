"""The one-row fp8 GEMV's tensor-core variant with its weights in a register ring (stages 0, the default) or in
a ring of `stages` steps per warp in shared memory filled by cp.async, `pre` of them before griddepcontrol.wait
and the rest after x's loads (GPU; a development tool, issue #13).

At the 8B model's decode shapes and Mamba-2's: microseconds per call (share of copy bandwidth), graphed back
to back with programmatic launches, copies of W cycled as codegen/bench_kernels.py does; last, the register
ring's kernel with x's read and quantization cut from its source (the weights' part alone).
Usage (device): PYTHONPATH=... python3 .ci/fp8_ring_probe.py [--rings 0:0,8:2,12:4]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from kiln.codegen import gemv_fp8 as G
from kiln.codegen.bench_kernels import DT, GEMV_SHAPES, _copies, _graphed_ms
from kiln.codegen.bench_kernels import copy_bandwidth as _copy_bw
from kiln.codegen.launch import LoadedKernel, _loaded
from kiln.codegen.render import render

# x's amax and quantization into shared memory, cut (timing only: x is garbage)
SCALE = "const float s = measure_x_scale(x, red);"
QUANT = "{  // i: 8 consecutive columns of x"


def no_x(spec):
    src = render(spec)
    text = src.source
    for old, new in ((SCALE, "const float s = 1.f;"), (QUANT, "{ break;  // (cut)")):
        if text.count(old) != 1:
            raise SystemExit(f"the rendered source no longer has {old!r} once")
        text = text.replace(old, new)
    name = src.name + "_nox"
    text = text.replace(src.name, name)
    _loaded[(spec, 0)] = LoadedKernel(dataclasses.replace(src, name=name, source=text, entries=(name,)),
                                      torch.device("cuda", 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rings", default="0:0,8:0,8:1,8:2,8:4,12:2,12:4,6:2",
                    help="stages:pre[:1] (pre 0: all before the wait; :1 x read once into registers)")
    rings = [tuple(int(v) for v in (r + ":0").split(":")[:3]) for r in ap.parse_args().rings.split(",")]
    bw = _copy_bw()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cols = [("regs" if s == 0 else f"ring {s}, {p or s - 1} before") + (", x once" if o else "")
            for s, p, o in rings] + ["regs, no x"]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s\n")
    print("| linear | n x k | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for label, n, k in GEMV_SHAPES:
        nbytes = n * k
        x = torch.randn(1, k, device="cuda", dtype=DT)
        sw = torch.tensor(0.02 / 448, device="cuda")
        ws = _copies(lambda: (torch.randn(n, k, device="cuda") * 200).to(torch.float8_e4m3fn), nbytes)
        outs = [torch.empty(1, n, device="cuda", dtype=DT) for _ in ws]
        row = []
        for cut, (s, p, o) in [(False, r) for r in rings] + [(True, (0, 0, 0))]:
            base = G.spec_for(n, k, "bf16", False, origin=f"ring {label} {s} {p} {o} {cut}", num_sms=sms, decode="mma")
            spec = dataclasses.replace(base, stages=s, pre=p, x_once=bool(o))
            if spec.smem > G.SMEM_MAX:
                row.append(None)
                continue
            if cut:
                no_x(spec)
            row.append(_graphed_ms([lambda w=w, o=o: G.gemv_fp8(spec, x, w, sw, o, pdl=True)
                                    for w, o in zip(ws, outs)]))
        cells = ["-" if t is None else f"{t * 1e3:.1f} ({nbytes / (t * 1e-3) / bw:.0%})" for t in row]
        print(f"| {label} | {n}x{k} | " + " | ".join(cells) + " |", flush=True)
        del ws, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
