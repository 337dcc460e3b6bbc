"""Where the one-row INT4 W4A16 GEMV's time goes (GPU; a development tool, issue #13: >= 80% of copy bw).

Times templates/gemv_wq.cu.j2 (int4, group 128 with zero points, bf16, one row, programmatic launches,
copies of the packed weight cycled in one graph as codegen/bench_kernels.py does) at the 8B model's four
decode shapes, per variant (loop, warp, stream), with parts removed from its rendered source so that
each column's difference from the full kernel is what that part costs:
  full     the kernel as shipped
  no-zsub  no zero-point subtraction on the fragments (the warp variant: no sums of x for its fold; timing only)
  no-math  the weight words XORed into the accumulator instead of decoded and multiplied (timing only)
and the bf16 GEMV (codegen/gemv.py) over the same bytes (W viewed as bf16 [n, k/4]): its stream's rate.
Each as microseconds and fraction of the copy bandwidth.
ANAT_QUICK=1: the full kernel at the chooser's grid only (and the bf16 GEMV), to compare two trees in one call.
Usage (device): PYTHONPATH=... python3 .ci/int4_gemv_anatomy.py [variants, comma-separated]
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

import torch
from kiln.codegen import quant_kernels as qk
from kiln.codegen.bench_kernels import DT, _copies, _graphed_ms
from kiln.codegen.bench_kernels import copy_bandwidth as _copy_bw
from kiln.codegen.gemv import GemvSpec, choose, gemv
from kiln.codegen.launch import LoadedKernel, _loaded
from kiln.codegen.quant_kernels import Packed, pack
from kiln.codegen.render import render
from kiln.dsl.quant import QuantDesc, quantize_weight

PICKS = ((1, 1, 2), (1, 2, 2), (1, 4, 2), (1, 8, 2), (2, 1, 2), (1, 2, 3))
SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate+up", 28672, 4096), ("down", 4096, 14336))
ZSUB = re.compile(r"^ *a\[\d\] = as_u32\(__hsub2\(as_pair\(a\[\d\]\), as_pair\(z[g8]\)\)\);.*\n", re.M)
MMA_HEAD = re.compile(r"(__device__ __forceinline__ void chunk_mma\([^{]*\{\n)")
Q_HEAD = re.compile(r"(__device__ __forceinline__ void chunk_q\([^{]*\{\n)")
ZSUM_HEAD = re.compile(r"(__device__ __forceinline__ void zsum\([^{]*\{\n)")
NO_MATH_Q = "  p[0] += __uint_as_float((wv.x ^ wv.y ^ wv.z ^ wv.w ^ xw[0] ^ xw[7] ^ mask) & 0x3f800000u);\n  return;\n"
NO_MATH = ("  acc[0][0] += __uint_as_float((wv.x ^ wv.y ^ wv.z ^ wv.w ^ xw[0][0] ^ xw[0][7] ^ as_u32(rg) ^ as_u32(r8))"
           " & 0x3f800000u);\n  return;\n")


def variant(spec, cut: set[str]):
    """spec's kernel with the parts in `cut` removed from its source, loaded under spec's cache key."""
    src = render(spec)
    text = src.source
    if "zsub" in cut and "zsum(" in text:  # the warp variant: no sums of x (the zero point's fold)
        text, n = ZSUM_HEAD.subn(lambda m: m.group(1) + "  return;\n", text)
        if n != 1:
            raise SystemExit(f"{spec.origin}: zsum not found once")
    elif "zsub" in cut:
        text, n = ZSUB.subn("", text)
        if n != 4:
            raise SystemExit(f"{spec.origin}: {n} zero subtractions found, expected 4")
    if "math" in cut and "chunk_q(" in text:  # the warp variant: its folded chunk and the sums of x
        text, n = Q_HEAD.subn(lambda m: m.group(1) + NO_MATH_Q, text)
        text, n2 = ZSUM_HEAD.subn(lambda m: m.group(1) + "  return;\n", text)
        if (n, n2) != (1, 1):
            raise SystemExit(f"{spec.origin}: chunk_q / zsum not found once")
    elif "math" in cut:
        text, n = MMA_HEAD.subn(lambda m: m.group(1) + NO_MATH, text)
        if n != 1:
            raise SystemExit(f"{spec.origin}: chunk_mma not found once")
    name = src.name + "_" + "_".join(sorted(cut)) if cut else src.name
    text = text.replace(src.name, name)
    entries = tuple(e.replace(src.name, name) for e in src.entries)
    k = LoadedKernel(dataclasses.replace(src, name=name, source=text, entries=entries), torch.device("cuda", 0))
    _loaded[(spec, 0)] = k
    return k


def main() -> None:
    variants = sys.argv[1].split(",") if len(sys.argv) > 1 else ["loop", "warp", "stream"]
    bw = _copy_bw()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    desc = QuantDesc("int4", "per_group", 128, zero_points=True)
    quick = os.environ.get("ANAT_QUICK") == "1"  # the shipped kernel at its chooser's grid only (tree-to-tree A/B)
    cuts = (("full", set()),) if quick else (("full", set()), ("no-zsub", {"zsub"}), ("no-math", {"math"}))
    cols = [f"{v} {c}" for v in variants for c, _ in cuts] + ["bf16 k/4"]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s\n")
    print("| linear | n x k | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    notes = []
    for label, n, k in SHAPES:
        base = pack(quantize_weight(torch.randn(n, k, device="cuda") * 0.02, desc), origin=f"anatomy {label}")
        nbytes = base.wq.numel() + base.records(DT).numel() * 2 + (k + n) * 2
        x = torch.randn(1, k, device="cuda", dtype=DT)
        row, extra = [], []
        for v in variants:
            packs = _copies(lambda: Packed(base.fmt, base.mode, n, k, base.group, base.wq.clone(), base.rec32, None,
                                           base.origin, v), nbytes)
            spec = packs[0].spec(DT, 8, False, sms)
            for col, cut in cuts:
                variant(spec, cut)
                row.append(_graphed_ms([lambda p=p: p.linear(x, None) for p in packs]))
            _loaded.pop((spec, 0), None)
            del packs
        if "warp" in variants and not quick:  # the warp kernel at other grids: (tiles per warp, K slices, blocks/SM)
            for pick in PICKS:
                packs = _copies(lambda: Packed(base.fmt, base.mode, n, k, base.group, base.wq.clone(), base.rec32,
                                               None, base.origin, "warp", warp_pick=pick), nbytes)
                t = _graphed_ms([lambda p=p: p.linear(x, None) for p in packs])
                extra.append(f"{pick[0]}x{pick[1]}b{pick[2]}: {t * 1e3:.1f} ({nbytes / (t * 1e-3) / bw:.0%})")
                del packs
        if "warp" in variants and not quick:  # the chooser's grid with fewer weight loads in flight (fewer registers)
            for loads in (4, 6):
                qk.WARP_LOADS, keep = loads, qk.WARP_LOADS
                _loaded.clear()
                render.cache_clear()  # the spec does not name WARP_LOADS
                packs = _copies(lambda: Packed(base.fmt, base.mode, n, k, base.group, base.wq.clone(), base.rec32,
                                               None, base.origin, "warp"), nbytes)
                t = _graphed_ms([lambda p=p: p.linear(x, None) for p in packs])
                extra.append(f"{loads} loads: {t * 1e3:.1f} ({nbytes / (t * 1e-3) / bw:.0%})")
                qk.WARP_LOADS = keep
                _loaded.clear()
                render.cache_clear()
                del packs
        ws = _copies(lambda: torch.randint(0, 255, (n * k // 2,), device="cuda", dtype=torch.uint8), nbytes)
        outs = [torch.empty(1, n, device="cuda", dtype=DT) for _ in ws]
        hspec = GemvSpec(n, k // 4, False, "bf16", f"anatomy {label} bf16", *choose(n, k // 4, "bf16", sms))
        xh = torch.randn(1, k // 4, device="cuda", dtype=DT)
        row.append(_graphed_ms([lambda w=w, o=o: gemv(hspec, xh, w.view(torch.bfloat16).view(n, k // 4), o, pdl=True)
                                for w, o in zip(ws, outs)]))
        print(f"| {label} | {n}x{k} | " + " | ".join(f"{t * 1e3:.1f} ({nbytes / (t * 1e-3) / bw:.0%})" for t in row)
              + " |", flush=True)
        notes.append(f"{label}: " + ", ".join(extra))
        del ws, outs
        torch.cuda.empty_cache()
    if notes:
        print("\nwarp variant at other grids (tiles per warp x K slices, blocks per SM), us:\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
