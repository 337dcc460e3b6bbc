"""The one-row fp8 GEMV's tensor-core variant with x read twice (its amax pass, then its quantization's: the default)
or once into registers (`x_once`), and with x's read and quantization cut from its source (the weights' part alone)
(GPU; a development tool, issue #13). At the 8B model's decode shapes and Mamba-2's: microseconds per call (share
of copy bandwidth), graphed back to back with programmatic launches, copies of W cycled as
codegen/bench_kernels.py does.
Session 17 measured here, then dropped, a ring of weights in shared memory filled by cp.async (commit 090d00b).
Usage (device): PYTHONPATH=... python3 .ci/fp8_x_probe.py
"""

from __future__ import annotations

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
    bw = _copy_bw()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cols = ["x read twice", "x read once", "no x"]
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
        for col, once, cut in (("twice", False, False), ("once", True, False), ("nox", False, True)):
            base = G.spec_for(n, k, "bf16", False, origin=f"x probe {label} {col}", num_sms=sms, decode="mma")
            spec = dataclasses.replace(base, x_once=once)
            if cut:
                no_x(spec)
            row.append(_graphed_ms([lambda w=w, o=o: G.gemv_fp8(spec, x, w, sw, o, pdl=True)
                                    for w, o in zip(ws, outs)]))
        cells = [f"{t * 1e3:.1f} ({nbytes / (t * 1e-3) / bw:.0%})" for t in row]
        print(f"| {label} | {n}x{k} | " + " | ".join(cells) + " |", flush=True)
        del ws, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
