"""Where the one-row fp8 GEMV's time goes (GPU; a development tool, issue #13).

Times templates/gemv_fp8.cu.j2 (decode="int", spec_for's grid, programmatic launches, copies of W cycled
in one graph as codegen/bench_kernels.py does) at the 8B model's four decode shapes with parts of the
kernel removed from its rendered source, so that each column's difference from the full kernel is what
that part costs:
  full       the kernel as shipped
  static     no amax pass (the checkpoint's scale)
  no-x       no amax, no quantization of x into shared memory (timing only: x is garbage)
  no-qmath   x stored into shared memory as it is read, not quantized (timing only)
  no-math    the weight words XORed instead of decoded and multiplied (timing only)
  stream     no-x and no-math: the weight stream alone
  bf16 k/2   the bf16 GEMV (codegen/gemv.py) over the same bytes (k/2 bf16 columns): its stream's rate
  mma        the tensor-core variant (decode="mma")
Each as microseconds and fraction of the copy bandwidth. Usage (device): PYTHONPATH=... python3 .ci/fp8_gemv_anatomy.py
"""

from __future__ import annotations

import dataclasses

import torch
from kiln.codegen.bench_kernels import DT, GEMV_SHAPES, _copies, _graphed_ms
from kiln.codegen.bench_kernels import copy_bandwidth as _copy_bw
from kiln.codegen.gemv import GemvSpec, choose, gemv
from kiln.codegen.gemv_fp8 import gemv_fp8, spec_for
from kiln.codegen.launch import LoadedKernel, _loaded
from kiln.codegen.render import render

MATH = """          a = fmaf(decode<0>(wd[j]), xf[j].x, a);
          a = fmaf(decode<1>(wd[j]), xf[j].y, a);
          a = fmaf(decode<2>(wd[j]), xf[j].z, a);
          a = fmaf(decode<3>(wd[j]), xf[j].w, a);"""
NO_MATH = "          a = __uint_as_float(__float_as_uint(a) ^ wd[j]);"
SCALE = "const float s = measure_x_scale(x, red);"
QUANT = "{  // i: 4 consecutive columns of x"
QMATH = "q = quant4(to_float(v.v[0]), to_float(v.v[1]), to_float(v.v[2]), to_float(v.v[3]), s);"


def variant(spec, cut: set[str]):
    """spec's kernel with the parts in `cut` removed from its source, loaded under spec's cache key."""
    src = render(spec)
    text = src.source
    for part, old, new in (("math", MATH, NO_MATH), ("x", SCALE, "const float s = 1.f;"),
                           ("x", QUANT, "{ break;  // (cut)"),
                           ("qmath", QMATH, "q = make_float4(to_float(v.v[0]), to_float(v.v[1]), to_float(v.v[2]), "
                                            "to_float(v.v[3]));")):
        if part in cut:
            if text.count(old) != 1:
                raise SystemExit(f"{spec.origin}: the rendered source no longer has {old!r} once")
            text = text.replace(old, new)
    name = src.name + "_" + "_".join(sorted(cut)) if cut else src.name
    text = text.replace(src.name, name)
    k = LoadedKernel(dataclasses.replace(src, name=name, source=text, entries=(name,)), torch.device("cuda", 0))
    _loaded[(spec, 0)] = k  # launch() finds it under the spec
    return k


def main() -> None:
    bw = _copy_bw()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cols = ["full", "static", "no-x", "no-qmath", "no-math", "stream", "bf16 k/2", "mma"]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s\n")
    print("| linear | n x k | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for label, n, k in GEMV_SHAPES:
        if not label.startswith("llama3"):
            continue
        nbytes = n * k
        x = torch.randn(1, k, device="cuda", dtype=DT)
        sw = torch.tensor(0.02 / 448, device="cuda")
        sx = torch.tensor(0.01, device="cuda")
        ws = _copies(lambda: (torch.randn(n, k, device="cuda") * 200).to(torch.float8_e4m3fn), nbytes)
        outs = [torch.empty(1, n, device="cuda", dtype=DT) for _ in ws]
        row = []
        for col, static, cut in (("full", False, set()), ("static", True, set()), ("no-x", False, {"x"}),
                                 ("no-qmath", False, {"qmath"}), ("no-math", False, {"math"}),
                                 ("stream", False, {"x", "math"})):
            spec = spec_for(n, k, "bf16", False, static=static, origin=f"anatomy {label} {col}", num_sms=sms)
            variant(spec, cut)
            xs = sx if static else None
            ms = _graphed_ms([lambda w=w, o=o: gemv_fp8(spec, x, w, sw, o, x_scale=xs, pdl=True)
                              for w, o in zip(ws, outs)])
            row.append(ms)
        # the same bytes through the bf16 GEMV: W viewed as bf16 [n, k/2]
        hspec = GemvSpec(n, k // 2, False, "bf16", f"anatomy {label} bf16", *choose(n, k // 2, "bf16", sms))
        xh = torch.randn(1, k // 2, device="cuda", dtype=DT)
        ms = _graphed_ms([lambda w=w, o=o: gemv(hspec, xh, w.view(torch.bfloat16), o, pdl=True)
                          for w, o in zip(ws, outs)])
        row.append(ms)
        spec = spec_for(n, k, "bf16", False, origin=f"anatomy {label} mma", num_sms=sms, decode="mma")
        row.append(_graphed_ms([lambda w=w, o=o: gemv_fp8(spec, x, w, sw, o, pdl=True) for w, o in zip(ws, outs)]))
        print(f"| {label} | {n}x{k} | " + " | ".join(f"{t * 1e3:.1f} ({nbytes / (t * 1e-3) / bw:.0%})" for t in row)
              + " |", flush=True)
        del ws, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
