"""Where the wgmma prefill kernel's split-KV form goes wrong (session 24: the bf16 form, Llama-3-8B heads, 128
queries after 129 cached among other sequences, 3 splits, 0.46 relative error in that sequence alone; the cause
found since, the rescale factor of rows a split masks wholly: tests/test_softmax_rescale_sass.py).

Runs the failing launch REPEAT times (is it deterministic?), the failing sequence alone at two q-length bounds,
then the split kernel by itself: every (q tile, head chunk, split) block's partials (O, m, l) against float64
partials computed here, printing the blocks and rows that differ."""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen.kernels import PrefillAttnSpec  # noqa: E402
from kiln.codegen.launch import i32, i64, ptr  # noqa: E402
from test_kernels import attention_ref, gather, paged_layout, rel_err  # noqa: E402

DEV = torch.device("cuda")
H, KV, D, P = (int(x) for x in os.environ.get("SHAPE", "32,8,128,16").split(","))
CTX = [int(x) for x in os.environ.get("CTX", "0,5,300,0,64,1000,129").split(",")]
NEW = [int(x) for x in os.environ.get("NEW", "37,64,1,519,3,130,128").split(",")]
SPLITS = int(os.environ.get("SPLITS", "3"))


def setup(ctx, new, seed=0):
    torch.manual_seed(seed)
    spec = PrefillAttnSpec(H, KV, D, P, D ** -0.5, origin="probe")
    lens = [a + b for a, b in zip(ctx, new)]
    tables, pages = paged_layout(lens, P)
    kc = torch.randn(pages, KV, P, D, device=DEV).bfloat16()
    vc = torch.randn(pages, KV, P, D, device=DEV).bfloat16()
    T = sum(new)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    q = (torch.randn(T, H * D, device=DEV) * 2).bfloat16()
    return spec, lens, tables, kc, vc, cu, torch.tensor(lens, dtype=torch.int32, device=DEV), q


def errors(spec, ctx, new, tables, kc, vc, cu, lens_t, q, splits, max_q=None):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)
    K.prefill_attention(spec, q, kc, vc, tables, cu, lens_t, out, max_q_len=max_q or max(new), splits=splits)
    torch.cuda.synchronize()
    errs = []
    for s, (c, n) in enumerate(zip(ctx, new)):
        if n == 0:
            errs.append(0.0)
            continue
        rows = slice(int(cu[s]), int(cu[s + 1]))
        ref = attention_ref(q[rows].view(n, H, D), gather(kc, tables[s], c + n, P), gather(vc, tables[s], c + n, P),
                            torch.arange(c, c + n, device=DEV), spec.scale, 0, 0.0)
        errs.append(rel_err(out[rows].view(n, H, D), ref))
    return errs


def main():
    spec, lens, tables, kc, vc, cu, lens_t, q = setup(CTX, NEW)
    print("sequences", list(zip(CTX, NEW)), "splits", SPLITS)
    for rep in range(max(1, int(os.environ.get("REPEAT", "4")))):
        e = errors(spec, CTX, NEW, tables, kc, vc, cu, lens_t, q, SPLITS)
        print(f"run {rep}: " + " ".join(f"{x:.4f}" for x in e))
    e1 = errors(spec, CTX, NEW, tables, kc, vc, cu, lens_t, q, 1)
    print("splits=1: " + " ".join(f"{x:.4f}" for x in e1))
    # The worst sequence alone, at its own q bound and at the batch's.
    worst = max(range(len(CTX)), key=e.__getitem__)
    c, n = CTX[worst], NEW[worst]
    for other in (0, 1):
        cs, ns = ([c], [n]) if other == 0 else ([0, c], [5, n])
        s2 = setup(cs, ns, seed=1)
        for mq in (None, max(NEW)):
            e = errors(s2[0], cs, ns, *s2[2:], SPLITS, max_q=mq)
            errs = " ".join(f"{x:.4f}" for x in e)
            print(f"alone={other == 0} {list(zip(cs, ns))} max_q_len={mq or max(ns)}: {errs}")
    # The worst sequence alone: each q tile's error by split count (which tiles go wrong).
    s3 = setup([c], [n], seed=2)
    spec3, _, tables3, kc3, vc3, cu3, lens3, q3 = s3
    bm = K._kernel(K.prefill_for_device(spec3, DEV), DEV).source.meta["bm_tok"]
    ref = attention_ref(q3.view(n, H, D), gather(kc3, tables3[0], c + n, P), gather(vc3, tables3[0], c + n, P),
                        torch.arange(c, c + n, device=DEV), spec3.scale, 0, 0.0)
    for sp in (1, 2, 3, 4, 5, 8):
        out = torch.full(q3.shape, float("nan"), dtype=q3.dtype, device=DEV)
        K.prefill_attention(spec3, q3, kc3, vc3, tables3, cu3, lens3, out, max_q_len=n, splits=sp)
        torch.cuda.synchronize()
        o = out.view(n, H, D)
        print(f"alone, splits={sp}: per {bm}-token q tile " + " ".join(
            f"{rel_err(o[t:t + bm], ref[t:t + bm]):.3f}" for t in range(0, n, bm))
            + " | per head group " + " ".join(f"{rel_err(o[:, g::H // KV], ref[:, g::H // KV]):.3f}"
                                               for g in range(H // KV)))
    # The split kernel alone: partials against float64.
    kern = K._kernel(K.prefill_for_device(spec, DEV), DEV)
    meta = kern.source.meta
    bm, bn, chunks = meta["bm_tok"], meta["bn"], meta["chunks"]
    gc = 128 // bm  # query heads a tile row block holds per token
    S = len(CTX)
    grid = (math.ceil(max(NEW) / bm), KV * chunks, S)
    rows, blocks = meta["part_rows"], grid[0] * grid[1] * grid[2] * SPLITS
    part_o = torch.full((blocks, rows, D), float("nan"), device=DEV)
    part_ml = torch.full((blocks, rows, 2), float("nan"), device=DEV)
    kern.launch(kern.source.entries[1], (grid[0] * SPLITS, grid[1], grid[2]), (meta["threads"],),
                [ptr(q), ptr(kc), ptr(vc), ptr(tables), ptr(cu), ptr(lens_t), ptr(part_o), ptr(part_ml),
                 i64(q.stride(0)), i32(tables.shape[1]), i32(SPLITS)], smem=meta["smem"])
    torch.cuda.synchronize()
    sc = spec.scale * math.log2(math.e)
    bad = 0
    for seq in [worst]:
        c, n = CTX[seq], NEW[seq]
        L = c + n
        kd = gather(kc, tables[seq], L, P).double()  # [KV, L, D]
        vd = gather(vc, tables[seq], L, P).double()
        qs = q[int(cu[seq]):int(cu[seq + 1])].view(n, H, D).double()
        for tile in range(grid[0]):
            q0 = (grid[0] - 1 - tile) * bm
            if q0 >= n:
                continue
            hi = min(L, c + q0 + bm)
            all_t = max(0, math.ceil(hi / bn))
            for y in range(grid[1]):
                kvh, h0 = y // chunks, (y // chunks) * (H // KV) + (y % chunks) * gc
                for sp in range(SPLITS):
                    tb, te = all_t * sp // SPLITS, all_t * (sp + 1) // SPLITS
                    k_lo, k_hi = tb * bn, min(te * bn, hi)
                    pb = ((seq * grid[1] + y) * grid[0] + tile) * SPLITS + sp
                    worst_r = []
                    for r in range(128):
                        tok = q0 + r // gc
                        if tok >= n:
                            continue
                        qp, h = c + tok, h0 + r % gc
                        keys = torch.arange(k_lo, max(k_lo, min(k_hi, qp + 1)), device=DEV)
                        go, gm, gl = part_o[pb, r].double(), part_ml[pb, r, 0].item(), part_ml[pb, r, 1].item()
                        if len(keys) == 0:
                            ok = gl == 0.0 and go.abs().max().item() == 0.0
                            if not ok:
                                worst_r.append((r, "empty", gl, go.abs().max().item()))
                            continue
                        s = kd[kvh, keys] @ qs[tok, h]
                        m = s.max().item()
                        w = torch.exp2((s - m) * sc)
                        lr, orf = w.sum().item(), w @ vd[kvh, keys]
                        e_o = ((go - orf).norm() / orf.norm()).item()
                        if abs(gm - m * sc) > 1e-2 * max(1, abs(m * sc)) or abs(gl - lr) > 2e-2 * lr or e_o > 2e-2:
                            worst_r.append((r, round(gm, 3), round(m * sc, 3), round(gl, 3), round(lr, 3),
                                            round(e_o, 4)))
                    if worst_r:
                        bad += 1
                        if bad <= 12:
                            print(f"tile q0={q0} y={y} split={sp} keys [{k_lo},{k_hi}) hi={hi}: {len(worst_r)} bad"
                                  f" rows, first {worst_r[:3]}")
    print(f"blocks with bad partials: {bad}")


if __name__ == "__main__":
    main()
