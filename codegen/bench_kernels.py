"""Time every generated kernel at 8B-class decoder shapes (hidden 4096, 32 query / 8 KV heads,
head dim 128, ffn 14336, bf16) against the device's copy bandwidth and an eager torch baseline,
all measured in the same run.

    python -m kiln.codegen.bench_kernels [--tokens 8192] [--batch 64] [--context 4096]
                                         [--long-context 16384] [--md FILE]

Bytes are the fewest the op must move (each input read once, each output written once); the
fraction is achieved bandwidth over a device-to-device copy's (bytes read + written).
Decode attention runs at batch `--batch` x `--context` and at batch 1 x `--long-context`, both
timed as CUDA-graph replays (as the engine runs decode steps), against torch SDPA on dense K/V
replayed the same way: the GPU's time, not the host's launch cost.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics

import torch
import torch.nn.functional as F

from . import kernels as K
from . import rope
from .specs import (
    ActSpec,
    DecodeAttnSpec,
    EmbedSpec,
    MapSpec,
    MoeGemmSpec,
    MoeRouteSpec,
    NormSpec,
    PrefillAttnSpec,
    RopeCacheSpec,
)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, PAGE = 4096, 32, 8, 128, 14336, 128256, 16
DT = torch.bfloat16


def time_ms(fn, reps=15, min_ms=2.0) -> float:
    """Median over reps of the mean time of back-to-back calls (enough to cover launch gaps)."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    inner = max(1, min(50, math.ceil(min_ms / max(s.elapsed_time(e), 1e-3))))
    times = []
    for _ in range(reps):
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / inner)
    return statistics.median(times)


GRAPH_CALLS = 10  # calls per captured graph: one replay's launch cost spread over several calls


class Graphed:
    """`calls` back-to-back calls of fn captured in one CUDA graph; calling it replays them all."""

    def __init__(self, fn, calls: int = GRAPH_CALLS):
        self.calls = calls
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up outside the capture: module loads, library handles, workspace
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(calls):
                fn()

    def __call__(self):
        self.graph.replay()


def per_call_ms(fn) -> float:
    return time_ms(fn) / getattr(fn, "calls", 1)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read + write."""
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / (ms * 1e-3)


def _norm(T, hidden=HIDDEN):
    spec = NormSpec("rms", hidden, 1e-5, origin="bench")
    x, r = torch.randn(T, hidden, device="cuda", dtype=DT), torch.randn(T, hidden, device="cuda", dtype=DT)
    w = torch.randn(hidden, device="cuda", dtype=DT)
    out, r_out = torch.empty_like(x), torch.empty_like(x)

    def torch_ref():
        h = x + r
        hf = h.float()
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(DT) * w, h

    ours = lambda: K.norm(spec, x, w, out, residual=r, residual_out=r_out)  # noqa: E731
    return "rmsnorm + residual", f"T={T}", ours, torch_ref, 4 * T * hidden * 2 + hidden * 2


def _rope(T, prefetch=False, variant="token"):
    """prefetch=True: the variant that issues every load first (RopeCacheSpec.prefetch), for A/B;
    variant: RopeCacheSpec.variant (issue #12, rope_variants_table)."""
    spec = RopeCacheSpec(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, PAGE, theta=500000.0, scaling="llama3",
                         factor=8.0, original_max_position=8192, prefetch=prefetch, variant=variant, origin="bench")
    D, H, KV = HEAD_DIM, HEADS, KV_HEADS
    qkv = torch.randn(T, (H + 2 * KV) * D, device="cuda", dtype=DT)
    q, k, v = qkv[:, : H * D], qkv[:, H * D : (H + KV) * D], qkv[:, (H + KV) * D :]
    pos = torch.arange(T, device="cuda") % 4096
    pages = math.ceil(T / PAGE) + 8
    kc = torch.empty(pages, KV, PAGE, D, device="cuda", dtype=DT)
    vc = torch.empty_like(kc)
    slots = torch.randperm(pages * PAGE, device="cuda")[:T].int()
    inv_freq = rope.inv_freq(spec).cuda()

    def torch_ref():
        ang = pos.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((ang, ang), -1)
        cos, sin = emb.cos().to(DT)[:, None], emb.sin().to(DT)[:, None]

        def rot(x):
            x1, x2 = x[..., : D // 2], x[..., D // 2 :]
            return x * cos + torch.cat((-x2, x1), -1) * sin

        qr = rot(q.view(T, H, D))
        kr = rot(k.view(T, KV, D))
        s = slots.long()
        kc[s // PAGE, :, s % PAGE] = kr
        vc[s // PAGE, :, s % PAGE] = v.view(T, KV, D)
        return qr

    ours = lambda: K.rope_write_kv(spec, q, k, v, pos, slots, kc, vc)  # noqa: E731
    nbytes = T * (2 * H * D + KV * D * 4) * 2 + T * 12
    return "rotary + paged KV write", f"T={T}{', prefetch variant' if prefetch else ''}", ours, torch_ref, nbytes


def _act(T, unroll=1, variant=None):
    """unroll > 1: the variant with several loads in flight per thread (ActSpec.unroll), for A/B;
    variant: ActSpec.variant (issue #12, act_variants_table)."""
    variant = variant or ("flat" if unroll > 1 else ActSpec.variant)  # unroll: the flat loop's option
    spec = ActSpec("silu", True, FFN, unroll=unroll, variant=variant, origin="bench")
    x = torch.randn(T, 2 * FFN, device="cuda", dtype=DT)
    out = torch.empty(T, FFN, device="cuda", dtype=DT)
    ours = lambda: K.activation(spec, out, x=x)  # noqa: E731
    torch_ref = lambda: F.silu(x[:, :FFN]) * x[:, FFN:]  # noqa: E731
    return "SwiGLU", f"T={T}{f', unroll {unroll} variant' if unroll > 1 else ''}", ours, torch_ref, 3 * T * FFN * 2


def _decode(B, ctx, tuned=True):
    """tuned=False: the kernel before issue #12's batch-1 change (DecodeAttnSpec.tuned), for A/B."""
    spec = DecodeAttnSpec(HEADS, KV_HEADS, HEAD_DIM, PAGE, HEAD_DIM ** -0.5, tuned=tuned, origin="bench")
    D = HEAD_DIM
    per_seq = ctx // PAGE
    pages = B * per_seq
    kc = torch.randn(pages, KV_HEADS, PAGE, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    tables = torch.randperm(pages, device="cuda").int().view(B, per_seq)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B, HEADS * D, device="cuda", dtype=DT)
    out = torch.empty_like(q)
    scratch = K.decode_scratch(spec, B, ctx, "cuda")
    kd = torch.randn(B, KV_HEADS, ctx, D, device="cuda", dtype=DT)  # dense K/V for the baseline
    vd = torch.randn_like(kd)
    q4 = q.view(B, HEADS, 1, D)
    ours = Graphed(lambda: K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch, ctx))
    torch_ref = Graphed(lambda: F.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True))
    nbytes = 2 * B * ctx * KV_HEADS * D * 2 + 2 * B * HEADS * D * 2
    return "paged decode attention", f"B={B} ctx={ctx}{'' if tuned else ', old kernel'}", ours, torch_ref, nbytes


def fp8_kv_decode_line(B, ctx, copy_bw: float) -> str:
    """Paged decode attention on an FP8 (E4M3) KV cache against the same kernel on the bf16 cache:
    half the bytes, so the target is >= 1.8x the bf16 kernel's speed."""
    times, moved = {}, {}
    for fp8 in (False, True):
        spec = DecodeAttnSpec(HEADS, KV_HEADS, HEAD_DIM, PAGE, HEAD_DIM ** -0.5, kv_fp8=fp8, origin="bench")
        per_seq = -(-ctx // PAGE)  # a context that is not whole pages ends in a partly filled one
        pages = B * per_seq
        kc = torch.randn(pages, KV_HEADS, PAGE, HEAD_DIM, device="cuda", dtype=DT)
        vc = torch.randn_like(kc)
        if fp8:
            kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
        tables = torch.randperm(pages, device="cuda").int().view(B, per_seq)
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(B, HEADS * HEAD_DIM, device="cuda", dtype=DT)
        out = torch.empty_like(q)
        scratch = K.decode_scratch(spec, B, ctx, "cuda")
        times[fp8] = per_call_ms(Graphed(lambda spec=spec, kc=kc, vc=vc, tables=tables, lens=lens, q=q, out=out,
                                         scratch=scratch: K.paged_decode_attention(
                                             spec, q, kc, vc, tables, lens, out, scratch, ctx, k_scale=1.0,
                                             v_scale=1.0)))
        moved[fp8] = 2 * B * ctx * KV_HEADS * HEAD_DIM * kc.element_size() + 2 * B * HEADS * HEAD_DIM * 2
        del kc, vc
    speed = times[False] / times[True]
    return (f"decode attention, FP8 KV cache, B={B} ctx={ctx}: {times[True] * 1e3:.1f} us "
            f"({moved[True] / (times[True] * 1e-3) / copy_bw:.0%} of copy bw) vs bf16 cache "
            f"{times[False] * 1e3:.1f} us: {speed:.2f}x (target >= 1.8x: {'met' if speed >= 1.8 else 'NOT met'})")


# (warps, stages, min_blocks) of the tensor-core decode kernel tried on the fp8 cache; (0, 0, 0) = the default
# Session 30 (H100): (2, 4, 4) takes 27% less time than the default at 512 sequences of context 200 and 5-28% more
# with fewer sequences or longer contexts (BENCHMARKS.md)
FP8KV_VARIANTS = ((0, 0, 0), (4, 3, 3), (4, 4, 3), (4, 3, 4), (2, 4, 4), (2, 3, 4), (8, 3, 2), (4, 6, 2))


def fp8_kv_variants_table(copy_bw: float, shapes=((512, 200), (256, 1500), (64, 4096), (1, 16384)),
                          bf16: bool = False) -> str:
    """Paged decode attention on an FP8 cache per kernel shape (DecodeAttnSpec warps / stages /
    min_blocks) beside the bf16 cache's default kernel, µs a call and share of copy bandwidth (K/V
    bytes + q / out). Issue #13: an fp8 decode step at batch 256 spent 8.45 of 13.44 ms here, 72% of
    copy bandwidth, where the bf16 kernel reaches 97%. bf16: the same shapes on the bf16 cache instead (no page
    sizes)."""
    if bf16:
        runs = [(False, 16, v) for v in FP8KV_VARIANTS]
    else:
        runs = [(False, 16, (0, 0, 0))] + [(True, 16, v) for v in FP8KV_VARIANTS] + [(True, 32, (0, 0, 0)),
                                                                                    (True, 64, (0, 0, 0))]
    head = [("bf16" if not fp8 else "fp8") + (" default" if v == (0, 0, 0) else " w{}s{}b{}".format(*v))
            + ("" if page == PAGE else f", {page}-token pages") for fp8, page, v in runs]
    lines = ["| B | ctx | " + " | ".join(head) + " |", "|---:|---:|" + "---:|" * len(head)]
    for B, ctx in shapes:
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(B, HEADS * HEAD_DIM, device="cuda", dtype=DT)
        out = torch.empty_like(q)
        cells = []
        for fp8, page, (w, st, mb) in runs:
            per_seq = -(-ctx // page)
            pages = B * per_seq
            tables = torch.randperm(pages, device="cuda").int().view(B, per_seq)
            spec = DecodeAttnSpec(HEADS, KV_HEADS, HEAD_DIM, page, HEAD_DIM ** -0.5, kv_fp8=fp8, warps=w, stages=st,
                                  min_blocks=mb, origin="bench")
            kc = torch.randn(pages, KV_HEADS, page, HEAD_DIM, device="cuda", dtype=DT)
            vc = torch.randn_like(kc)
            if fp8:
                kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
            try:
                scratch = K.decode_scratch(spec, B, ctx, "cuda")
                t = per_call_ms(Graphed(lambda spec=spec, kc=kc, vc=vc, scratch=scratch, tables=tables:
                                        K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch, ctx,
                                                                 k_scale=1.0, v_scale=1.0)))
                moved = 2 * B * ctx * KV_HEADS * HEAD_DIM * kc.element_size() + 2 * B * HEADS * HEAD_DIM * 2
                cells.append(f"{t * 1e3:.1f} ({moved / (t * 1e-3) / copy_bw:.0%})")
            except Exception as e:  # a shape the kernel refuses: named in the cell, the rest still runs
                cells.append(f"error: {str(e)[:40]}")
            del kc, vc
        lines.append(f"| {B} | {ctx} | " + " | ".join(cells) + " |")
    # Reads of random contiguous chunks (a gather of 1 GiB in chunks of each size): what a page of one KV
    # head gives a kernel to stream, 2 KB (fp8, 16 tokens) against 4 KB (bf16)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    chunks = []
    for size in (1024, 2048, 4096, 8192):
        rows = src.view(torch.complex128).view(-1, size // 16)  # 16-byte elements: 16-byte loads
        idx = torch.randperm(rows.shape[0], device="cuda")
        dst = torch.empty_like(rows)
        t = per_call_ms(Graphed(lambda rows=rows, idx=idx, dst=dst: torch.index_select(rows, 0, idx, out=dst), calls=2))
        chunks.append(f"{size // 1024} KB: {2 * src.numel() / (t * 1e-3) / copy_bw:.0%}")
    del src
    return (f"Paged decode attention, {'bf16' if bf16 else 'FP8'} KV cache, per kernel shape (w warps, s stages, b min "
            "blocks/SM) and page size; us per call (of copy bw)\n\n" + "\n".join(lines)
            + "\n\nRandom-chunk gather, share of copy bandwidth: " + ", ".join(chunks))


def decode_partition_sweep(B, ctx, tuned=True) -> str:
    """Decode attention time per tokens-per-split choice: checks the partition model (tuned: see _decode)."""
    spec = DecodeAttnSpec(HEADS, KV_HEADS, HEAD_DIM, PAGE, HEAD_DIM ** -0.5, tuned=tuned, origin="bench")
    pages = B * (ctx // PAGE)
    kc = torch.randn(pages, KV_HEADS, PAGE, HEAD_DIM, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    tables = torch.randperm(pages, device="cuda").int().view(B, ctx // PAGE)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B, HEADS * HEAD_DIM, device="cuda", dtype=DT)
    out = torch.empty_like(q)
    scratch = K.decode_scratch(spec, B, ctx, "cuda")
    kern = K.get_kernel(spec, q.device)
    meta = kern.source.meta
    per_sm = kern.blocks_per_sm(kern.source.entries[0], meta["threads"], meta["smem"])
    chosen = K.decode_partition(spec, B, ctx, kern.num_sms * per_sm, scratch.max_splits)
    parts = sorted({chosen, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096}
                   & set(range(meta["tile"], ctx + 1, meta["tile"])))
    parts = [p for p in parts if math.ceil(ctx / p) <= scratch.max_splits]
    res = []
    for p in parts:
        t = per_call_ms(Graphed(
            lambda: K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch, ctx, partition=p)))
        res.append(f"{p}{'*' if p == chosen else ''}: {t * 1e3:.1f}us")
    return (f"decode B={B} ctx={ctx}{'' if tuned else ' (old kernel)'}, {per_sm} blocks/SM; tokens per split "
            "(* = model's pick): " + ", ".join(res))


def _prefill(T, seqs, ws=False):
    """ws: the warp-specialised form of the Hopper kernel (PrefillAttnSpec.ws); both are timed."""
    spec = PrefillAttnSpec(HEADS, KV_HEADS, HEAD_DIM, PAGE, HEAD_DIM ** -0.5, ws=ws, origin="bench")
    D, L = HEAD_DIM, T // seqs
    per_seq = math.ceil(L / PAGE)
    kc = torch.randn(seqs * per_seq, KV_HEADS, PAGE, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    tables = torch.randperm(seqs * per_seq, device="cuda").int().view(seqs, per_seq)
    q = torch.randn(T, HEADS * D, device="cuda", dtype=DT)
    out = torch.empty_like(q)
    cu = torch.arange(0, T + 1, L, dtype=torch.int32, device="cuda")
    lens = torch.full((seqs,), L, dtype=torch.int32, device="cuda")
    qd = q.view(seqs, L, HEADS, D).transpose(1, 2)
    kd = torch.randn(seqs, KV_HEADS, L, D, device="cuda", dtype=DT)
    vd = torch.randn_like(kd)
    ours = lambda: K.prefill_attention(spec, q, kc, vc, tables, cu, lens, out, L)  # noqa: E731
    torch_ref = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)  # noqa: E731
    nbytes = 2 * T * HEADS * D * 2 + 2 * T * KV_HEADS * D * 2
    flops = 4 * seqs * (L * (L + 1) // 2) * D * HEADS
    meta = K.render(K.prefill_for_device(spec, q.device)).meta
    variant = meta["variant"] + ("-ws" if meta.get("ws") else "")  # sm90: the wgmma kernel, -ws: warp-specialised
    return "prefill attention (causal)", f"{seqs}x{L} tok, {variant} kernel", ours, torch_ref, nbytes, flops


def fp8_prefill_table(shapes=(((1024,) * 8, (0,) * 8), ((1000, 792), (0, 0)), ((792,), (208,)))) -> str:
    """Prefill attention on an fp8 KV cache (issue #13): the mma kernel (the default), the wgmma kernel on the
    same pages (render.PREFILL_FP8_SM90, opt-in), the bf16 cache's wgmma kernel and torch SDPA (flash, dense bf16
    K/V) on the same queries, µs a call and TFLOP/s. Shapes: (new tokens, cached context) per sequence: 8 x 1,024
    fresh; an fp8 mixed step's prompt chunk (a 1,000-token prompt and a 792-token first chunk); a 792-token
    chunk after 208 cached. In session 10's fp8 mixed step the mma kernel ran at about 62 TFLOP/s."""
    from . import render as R
    lines = ["| sequences (new + cached) | fp8 cache, mma | fp8 cache, wgmma | bf16 cache, wgmma | torch SDPA |",
             "|---|---:|---:|---:|---:|"]
    D, ks, vs = HEAD_DIM, 0.05, 0.02
    for new, ctx in shapes:
        lens = [a + b for a, b in zip(new, ctx)]
        per = [math.ceil(n / PAGE) for n in lens]
        pages = sum(per)
        perm = torch.randperm(pages, device="cuda").int()
        tables = torch.zeros(len(new), max(per), dtype=torch.int32, device="cuda")
        at = 0
        for i, n in enumerate(per):
            tables[i, :n] = perm[at:at + n]
            at += n
        T = sum(new)
        q = torch.randn(T, HEADS * D, device="cuda", dtype=DT)
        out = torch.empty_like(q)
        cu = torch.tensor([0] + list(itertools.accumulate(new)), dtype=torch.int32, device="cuda")
        kv_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        kb = torch.randn(pages, KV_HEADS, PAGE, D, device="cuda", dtype=DT)
        vb = torch.randn_like(kb)
        k8, v8 = (kb / ks).to(torch.float8_e4m3fn), (vb / vs).to(torch.float8_e4m3fn)
        flops = sum(4 * HEADS * D * (n * c + n * (n + 1) // 2) for n, c in zip(new, ctx))
        cells = []
        for fp8, on in ((True, "0"), (True, "1"), (False, "0")):
            saved = R.PREFILL_FP8_SM90
            R.PREFILL_FP8_SM90 = on  # read where the spec renders: a distinct origin renders anew
            try:
                spec = PrefillAttnSpec(HEADS, KV_HEADS, D, PAGE, D ** -0.5, kv_fp8=fp8,
                                       origin=f"bench fp8 prefill {on}")
                K.render(K.prefill_for_device(spec, q.device))
            finally:
                R.PREFILL_FP8_SM90 = saved
            kc, vc = (k8, v8) if fp8 else (kb, vb)
            t = per_call_ms(Graphed(lambda: K.prefill_attention(spec, q, kc, vc, tables, cu, kv_lens, out, max(new),
                                                                k_scale=ks, v_scale=vs)))
            cells.append(f"{t * 1e3:.1f} ({flops / (t * 1e-3) / 1e12:.0f})")
        sdpa = []
        for n, c in zip(new, ctx):
            qd = torch.randn(1, HEADS, n, D, device="cuda", dtype=DT)
            kd = torch.randn(1, KV_HEADS, n + c, D, device="cuda", dtype=DT)
            vd = torch.randn_like(kd)
            mask = None if not c else torch.ones(n, n + c, dtype=torch.bool, device="cuda").tril(c)
            sdpa.append((qd, kd, vd, mask))

        def run_sdpa():
            for qd, kd, vd, mask in sdpa:
                F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        t = per_call_ms(run_sdpa)
        cells.append(f"{t * 1e3:.1f} ({flops / (t * 1e-3) / 1e12:.0f})")
        name = " + ".join(f"{n}{f' after {c}' if c else ''}" for n, c in zip(new, ctx)) if len(new) < 8 \
            else f"{len(new)} x {new[0]}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(["prefill attention on an fp8 KV cache, µs (TFLOP/s), the 8B model's heads:"] + lines)


def _embed(T):
    spec = EmbedSpec(VOCAB, HIDDEN, origin="bench")
    table = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=DT)
    tok = torch.randint(0, VOCAB, (T,), device="cuda")
    out = torch.empty(T, HIDDEN, device="cuda", dtype=DT)
    ours = lambda: K.embed(spec, tok, table, out)  # noqa: E731
    return "embedding gather", f"T={T}", ours, lambda: F.embedding(tok, table), 2 * T * HIDDEN * 2 + 8 * T


def _softcap(B):
    spec = MapSpec("map_softcap.cu.j2", (("cap", 30.0), ("inv_cap", 1 / 30.0)), dtype="fp32", origin="bench")
    x = torch.randn(B, VOCAB, device="cuda") * 40
    out = torch.empty_like(x)
    ours = lambda: K.map_elementwise(spec, x, out)  # noqa: E731
    return "logit softcap (fp32)", f"B={B}", ours, lambda: torch.tanh(x / 30.0) * 30.0, 2 * x.numel() * 4


def _moe(T, experts=8, top_k=2):
    """An 8x7B-class expert layer (hidden 4096, ffn 14336, 8 experts, top-2): routing, the grouped
    gate|up GEMM, SwiGLU, the grouped down GEMM and the combine, against the per-expert torch loop
    the reference runs (one F.linear per expert and projection, over its tokens)."""
    E, k, H, Fd = experts, top_k, HIDDEN, FFN
    route = MoeRouteSpec(E, k, H, origin="bench")
    up, down = MoeGemmSpec(E, 2 * Fd, H, True, origin="bench"), MoeGemmSpec(E, H, Fd, False, origin="bench")
    act = ActSpec("silu", True, Fd, origin="bench")
    x = torch.randn(T, H, device="cuda", dtype=DT)
    logits = torch.randn(T, E, device="cuda")
    w_up = (torch.randn(E, 2 * Fd, H, device="cuda") * H ** -0.5).to(DT)
    w_down = (torch.randn(E, H, Fd, device="cuda") * Fd ** -0.5).to(DT)
    R = T * k
    st = torch.empty(R, dtype=torch.int32, device="cuda")
    sr = torch.empty(T, k, dtype=torch.int32, device="cuda")
    off = torch.empty(E + 1, dtype=torch.int32, device="cuda")
    til = torch.empty_like(off)
    gu = torch.empty(R, 2 * Fd, device="cuda", dtype=DT)
    h = torch.empty(R, Fd, device="cuda", dtype=DT)
    y = torch.empty(R, H, device="cuda", dtype=DT)
    out = torch.empty(T, H, device="cuda", dtype=DT)

    def ours():
        gate, chosen = logits.softmax(-1).topk(k, dim=-1)
        K.moe_route(route, chosen, st, sr, off, til)
        K.moe_gemm(up, x, w_up, gu, st, off, til)
        K.activation(act, h, x=gu)
        K.moe_gemm(down, h, w_down, y, st, off, til)
        K.moe_combine(route, y, sr, gate, out)

    def torch_loop():  # the reference's loop: token picks on the host, one F.linear per expert
        gate, chosen = logits.softmax(-1).topk(k, dim=-1)
        res = torch.zeros_like(x)
        for e in range(E):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            g = F.linear(x[rows], w_up[e])
            o = F.linear(F.silu(g[:, :Fd]) * g[:, Fd:], w_down[e])
            res.index_add_(0, rows, (o.float() * gate[rows, slot, None]).to(DT))
        return res

    nbytes = E * 3 * H * Fd * 2 + 2 * T * H * 2  # every expert's weights once (all are picked at T=256)
    return f"MoE {E} experts top-{k}, grouped GEMMs", f"T={T}", ours, torch_loop, nbytes, 2 * R * 3 * H * Fd


# An 8B decoder's linears (out, in): fused qkv, o_proj, fused gate + up, down_proj
QUANT_SHAPES = (("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate+up", 28672, 4096), ("down", 4096, 14336))
L2_FLUSH = 512 * 2**20  # copies of each operand totalling this: no call finds its weights in L2


def _copies(make, nbytes: int) -> list:
    return [make() for _ in range(max(1, min(64, math.ceil(L2_FLUSH / nbytes))))]


def _graphed_ms(calls) -> float:
    """Per call, with the calls (one per operand copy) captured in one CUDA graph: the kernels'
    time back to back, without Python's launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:  # warm-up: compiles, builds records, sizes cuBLAS workspaces
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return time_ms(graph.replay) / len(calls)


def _timed_variant(base, n, k, nbytes, x, variant, splits=None, pdl=True, tpb=None, warp=None) -> float:
    """Per-call ms of the GEMV over L2-flushing copies of the packed weight, as one graph."""
    import os

    from .quant_kernels import Packed

    packs = _copies(lambda: Packed(base.fmt, base.mode, n, k, base.group, base.wq.clone(), base.rec32, None,
                                   base.origin, variant, splits, tpb, warp), nbytes)
    old = os.environ.get("KILN_PDL")
    os.environ["KILN_PDL"] = "1" if pdl else "0"  # read at each launch: captured into the graph as launched
    try:
        return _graphed_ms([lambda p=p: p.linear(x, None) for p in packs])
    finally:
        if old is None:
            del os.environ["KILN_PDL"]
        else:
            os.environ["KILN_PDL"] = old
        del packs


def quant_gemv_table(copy_bw: float, T: int = 1) -> str:
    """INT4 (group 128, zero points) GEMV at an 8B decoder's shapes: the generated kernel's bytes moved
    (packed weights + records + x + out) per second against the copy bandwidth, and its time against
    cuBLAS's bf16 GEMV of the same shape, all streaming weights that are not in L2. Variants: persist
    (the device-sized grid, choose_persist's split and tiles per block; with and without programmatic
    dependent launch), stream (choose_splits) and the loop fallback; then sweeps of the persist and
    stream split counts (* = the pick; counts whose x slice exceeds shared memory are left out). The warp
    variant (issue #13, choose_warp's tiles per warp x K slices) at T <= WARP_MAX_T."""
    from kiln.dsl.quant import QuantDesc, quantize_weight

    from .quant_kernels import (
        SMEM_MAX,
        WARP_MAX_T,
        _cps,
        _split_counts,
        choose_persist,
        choose_splits,
        choose_warp,
        pack,
        persist_smem,
        persist_tpb,
        stream_smem,
    )

    desc = QuantDesc("int4", "per_group", 128, zero_points=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [f"INT4 W4A16 GEMV, T={T}, bf16 activations (target: ≥80% of copy bandwidth)\n",
             "| linear | out x in | persist splits x tiles | persist (us) | MB moved | GB/s | of copy bw | "
             "persist, no PDL (us) | stream (us) | stream of copy bw | loop (us) | loop of copy bw | "
             "bf16 cuBLAS (us) | speedup | target | warp tiles x slices | warp (us) | warp of copy bw |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    sweeps, psweeps, wsweeps = [], [], []
    for label, n, k in QUANT_SHAPES:
        base = pack(quantize_weight(torch.randn(n, k, device="cuda") * 0.02, desc), origin=f"bench {label}")
        nbytes = base.wq.numel() + base.records(DT).numel() * 2 + T * (k + n) * 2
        x = torch.randn(T, k, device="cuda", dtype=DT)
        tokens = 8 if T <= 8 else 16
        pick = choose_splits("int4", n, k, tokens, sms)
        p_splits, p_tpb = choose_persist("int4", n, k, tokens, sms)
        t = _timed_variant(base, n, k, nbytes, x, "persist")
        t_nopdl = _timed_variant(base, n, k, nbytes, x, "persist", pdl=False)
        t_stream = _timed_variant(base, n, k, nbytes, x, "stream")
        t_loop = _timed_variant(base, n, k, nbytes, x, "loop")
        warp = "| – | – | – |"
        if T <= WARP_MAX_T:
            t_warp, w_pick = _timed_variant(base, n, k, nbytes, x, "warp"), choose_warp(n, k, 128, sms)
            warp = f"| {w_pick[0]}x{w_pick[1]} | {t_warp * 1e3:.1f} | {nbytes / (t_warp * 1e-3) / copy_bw:.0%} |"
            wsweep = [f"{w_pick[0]}x{w_pick[1]}*: {t_warp * 1e3:.1f}us"]
            # (tiles per warp, K slices, blocks per SM): around the pick, and the pick for 3 blocks per SM
            for ws in [(1, 1, 2), (1, 2, 2), (1, 4, 2), (1, 8, 2), (2, 1, 2), (2, 4, 2), (4, 1, 2),
                       (*choose_warp(n, k, 128, sms, 3), 3)]:
                if ws != (*w_pick, 2):
                    tw = _timed_variant(base, n, k, nbytes, x, "warp", warp=ws)
                    wsweep.append(f"{ws[0]}x{ws[1]}{' 3/SM' if ws[2] == 3 else ''}: {tw * 1e3:.1f}us")
            wsweeps.append(f"{label}: " + ", ".join(wsweep))
        nch = math.ceil(k / 64)
        # stream: counts whose x slice (the bucket's rows) fits a block's shared memory (the spec refuses others)
        counts = sorted({math.ceil(nch / _cps("int4", k, s)) for s in (1, 2, 3, 4, 6, 8)} - {pick})
        counts = [s for s in counts if stream_smem("int4", k, tokens, s, 128) <= SMEM_MAX]
        sweep = [f"{pick}*: {t_stream * 1e3:.1f}us"]
        for s in counts[:4]:
            sweep.append(f"{s}: {_timed_variant(base, n, k, nbytes, x, 'stream', s) * 1e3:.1f}us")
        sweeps.append(f"{label}: " + ", ".join(sweep))
        psweep = [f"{p_splits}x{p_tpb}*: {t * 1e3:.1f}us"]
        for s in [c for c in _split_counts("int4", k) if c != p_splits and c <= 8
                  and persist_smem("int4", k, tokens, c) <= SMEM_MAX // 2][:4]:
            tp = persist_tpb("int4", n, k, tokens, sms, s)
            psweep.append(f"{s}x{tp}: {_timed_variant(base, n, k, nbytes, x, 'persist', s, tpb=tp) * 1e3:.1f}us")
        for tp in sorted({max(1, p_tpb // 2), p_tpb * 2} - {p_tpb}):  # tiles per block around the pick
            psweep.append(f"{p_splits}x{tp}: "
                          f"{_timed_variant(base, n, k, nbytes, x, 'persist', p_splits, tpb=tp) * 1e3:.1f}us")
        psweeps.append(f"{label}: " + ", ".join(psweep))
        dense = _copies(lambda: torch.randn(n, k, device="cuda", dtype=DT), n * k * 2)
        t_ref = _graphed_ms([lambda d=d: F.linear(x, d) for d in dense])
        del dense
        bw = nbytes / (t * 1e-3)
        frac = bw / copy_bw
        lines.append(f"| {label} | {n}x{k} | {p_splits}x{p_tpb} | {t * 1e3:.1f} | {nbytes / 1e6:.1f} | "
                     f"{bw / 1e9:.0f} | {frac:.0%} | {t_nopdl * 1e3:.1f} | "
                     f"{t_stream * 1e3:.1f} | {nbytes / (t_stream * 1e-3) / copy_bw:.0%} | "
                     f"{t_loop * 1e3:.1f} | {nbytes / (t_loop * 1e-3) / copy_bw:.0%} | "
                     f"{t_ref * 1e3:.1f} | {t_ref / t:.2f}x | ≥80%: {'met' if frac >= 0.8 else 'NOT met'} {warp}")
        torch.cuda.empty_cache()
    lines.append("\npersist variant, K splits x tiles per block (us per call): " + "; ".join(psweeps))
    lines.append("stream variant, K splits (us per call): " + "; ".join(sweeps))
    if wsweeps:
        lines.append("warp variant, tiles per warp x K slices (us per call): " + "; ".join(wsweeps))
    return "\n".join(lines)


def fp8_act_quant_table(copy_bw: float) -> str:
    """fp8 activation quantization before a W8A8 GEMM (x [T, 4096] bf16): the generated kernel
    (templates/quant_act.cu.j2; per tensor: 2 launches, per token: 1) against the torch ops it
    replaced (abs, amax, clamp, div, clamp, cast), both as CUDA-graph replays."""
    from kiln.dsl.quant import FP8_MAX, quantize_rows, scale_of

    from .quant_kernels import ActQuantSpec, act_partials, act_quant_fp8

    lines = ["fp8 activation quantization (x bf16 -> e4m3 + scale)\n",
             "| kernel | shape | ours (us) | MB moved | GB/s | of copy bw | torch (us) | speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    partial = act_partials("cuda")
    for mode in ("tensor", "token"):
        spec = ActQuantSpec(mode, HIDDEN, origin="bench")
        for T in (1, 16, 8192):
            x = torch.randn(T, HIDDEN, device="cuda", dtype=DT)
            q = torch.empty(T, HIDDEN, device="cuda", dtype=torch.float8_e4m3fn)
            sc = torch.empty((T, 1) if mode == "token" else (), device="cuda")

            def torch_ops():  # what runtime/cuda_quant.py ran before (QGemm.quantize_act_torch)
                xf = x.float()
                if mode == "token":
                    return quantize_rows(xf, "fp8")[0].to(torch.float8_e4m3fn)
                s = scale_of(xf.abs().amax(), FP8_MAX)
                return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

            t = per_call_ms(Graphed(lambda: act_quant_fp8(spec, x, q, sc, partial)))
            t_ref = per_call_ms(Graphed(torch_ops))
            nbytes = T * HIDDEN * 3 + 4 * T
            lines.append(f"| fp8 act quant, {mode} scale | T={T} | {t * 1e3:.1f} | "
                         f"{nbytes / 1e6:.2f} | {nbytes / (t * 1e-3) / 1e9:.0f} | "
                         f"{nbytes / (t * 1e-3) / copy_bw:.0%} | "
                         f"{t_ref * 1e3:.1f} | {t_ref / t:.2f}x |")
    return "\n".join(lines)


def act_quant_grid_table(copy_bw: float, shapes=((256, 4096), (2048, 4096), (2048, 14336), (8192, 4096))) -> str:
    """Per-tensor dynamic fp8 activation quantization (amax launch + quantize launch) per grid: blocks
    per SM (quant_kernels.ACT_BLOCKS_PER_SM) x loads a thread has in flight (ActQuantSpec.unroll); µs a
    call and share of copy bandwidth (x read twice, the fp8 bytes written). Session 10: at 2 blocks per
    SM, unroll 1 (the defaults), 2,048 x 14,336 ran at 28% (an fp8 mixed step spent 5.7 of 43 ms here)."""
    from .quant_kernels import ActQuantSpec, act_partials, act_quant_fp8

    variants = [(b, u) for b in (2, 4, 8) for u in (1, 4)]
    lines = ["fp8 activation quantization per tensor, per grid (blocks/SM x unroll): us (of copy bw)\n",
             "| T x K | " + " | ".join(f"{b}/SM x{u}" for b, u in variants) + " |", "|---|" + "---:|" * len(variants)]
    partial = act_partials("cuda")
    for T, k in shapes:
        x = torch.randn(T, k, device="cuda", dtype=DT)
        q = torch.empty(T, k, device="cuda", dtype=torch.float8_e4m3fn)
        sc = torch.empty((), device="cuda")
        nbytes = T * k * (2 * 2 + 1)
        cells = []
        for b, u in variants:
            spec = ActQuantSpec("tensor", k, unroll=u, origin="bench")
            t = per_call_ms(Graphed(lambda spec=spec, b=b: act_quant_fp8(spec, x, q, sc, partial, per_sm=b)))
            cells.append(f"{t * 1e3:.1f} ({nbytes / (t * 1e-3) / copy_bw:.0%})")
        lines.append(f"| {T} x {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- issue #17: multi-LoRA, one decode step's adapter work, the "split" kernels against "tiled"
LORA_GEMMS = (("qkv", HIDDEN, (HIDDEN, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)), ("o_proj", HIDDEN, (HIDDEN,)),
              ("gate+up", HIDDEN, (FFN, FFN)), ("down", FFN, (HIDDEN,)))


def lora_decode_table(copy_bw: float, T: int = 64, n: int = 8, rank: int = 16, layers: int = 32) -> str:
    """The LoRA kernels of one decode step (codegen/lora_kernels.py): T rows round-robin over n
    adapters of `rank` on the 8B's four GEMMs, each layer its own adapter weights (as in the
    engine: nothing stays in L2 from layer to layer). Per GEMM: the per-layer time of `layers`
    calls captured in one graph; the step: all layers x GEMMs in one graph, in layer order. The
    floor: the adapters' A and B read once at copy bandwidth. "tiled, no PDL": KILN_PDL=0."""
    import os

    from .lora_kernels import LoraSpec, lora_scratch, lora_sgmv

    adapters = torch.arange(T) % n  # grouped by adapter as runtime/lora.py group_rows does
    perm = torch.sort(adapters, stable=True).indices.to(torch.int32).cuda()
    seg = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(adapters, minlength=n).cumsum(0)])
    seg = seg.to(torch.int32).cuda()
    variants = (("split", "1"), ("tiled", "0"), ("tiled", "1"))
    gemms, per_gemm, total_bytes = [], [], 0
    for name, k, widths in LORA_GEMMS:
        out, sr = sum(widths), len(widths) * rank
        sib = torch.cat([torch.full((w,), i, dtype=torch.int32) for i, w in enumerate(widths)]).cuda()
        stacks = [((torch.randn(n, sr, k, device="cuda") * 0.01).to(DT),
                   (torch.randn(n, out, rank, device="cuda") * 0.01).to(DT)) for _ in range(layers)]
        x = torch.randn(T, k, device="cuda", dtype=DT)
        y = torch.randn(T, out, device="cuda", dtype=DT)
        nbytes = (stacks[0][0].numel() + stacks[0][1].numel()) * 2
        total_bytes += nbytes * layers
        gemms.append((name, k, out, sr, sib, stacks, x, y))
        per_gemm.append([name, nbytes])
    old = os.environ.get("KILN_PDL")
    step_us = []
    try:
        for kernel, pdl in variants:
            os.environ["KILN_PDL"] = pdl  # read at each launch: captured into the graph as launched
            step_calls = [[] for _ in range(layers)]
            for (name, k, out, sr, sib, stacks, x, y), row in zip(gemms, per_gemm):
                spec = LoraSpec(k, out, sr, rank, "bf16", origin=f"bench_kernels lora {name}", kernel=kernel)
                v = lora_scratch(spec, T, n, x.device)
                calls = [lambda A=A, B=B, spec=spec, x=x, y=y, sib=sib, v=v:
                         lora_sgmv(spec, x, A, B, sib, y, v, perm, seg) for A, B in stacks]
                row.append(_graphed_ms(calls) * 1e3)
                for layer, c in enumerate(calls):
                    step_calls[layer].append(c)
            flat = [c for layer in step_calls for c in layer]
            step_us.append(_graphed_ms(flat) * len(flat) * 1e3)
    finally:
        if old is None:
            os.environ.pop("KILN_PDL", None)
        else:
            os.environ["KILN_PDL"] = old
    lines = [f"LoRA decode step: {T} rows round-robin over {n} adapters of rank {rank}, bf16, {layers} layers "
             "(per GEMM: us per layer; step: every layer's 4 GEMMs in one graph)\n",
             "| GEMM | adapter MB / layer | split (us) | tiled, no PDL (us) | tiled (us) | speedup | floor (us) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, nbytes, t_split, t_nopdl, t_tiled in per_gemm:
        lines.append(f"| {name} | {nbytes / 1e6:.1f} | {t_split:.1f} | {t_nopdl:.1f} | {t_tiled:.1f} | "
                     f"{t_split / t_tiled:.2f}x | {nbytes / copy_bw * 1e6:.1f} |")
    lines.append(f"| step ({layers} x 4 GEMMs) | {total_bytes / 1e6:.0f} | {step_us[0]:.0f} | {step_us[1]:.0f} | "
                 f"{step_us[2]:.0f} | {step_us[0] / step_us[2]:.2f}x | {total_bytes / copy_bw * 1e6:.0f} |")
    del gemms
    torch.cuda.empty_cache()
    return "\n".join(lines)


def prefill_cached_prefix_table(copy_bw: float, new: int = 32, cached: int = 2000, bound: int = 4096) -> str:
    """Issue #16: a prompt after a cached prefix prefills `new` tokens over new + cached of context
    (an 8B model's 32 q / 8 kv heads, one sequence). The sm90 kernel unsplit (8 blocks: one per KV
    head, each streaming the whole context) vs split-KV at several split counts (prefill_splits'
    pick from a host bound on the context, as the engine's graphs pass it, among them), beside
    torch SDPA on dense K/V of the same shape; CUDA-graph replays."""
    spec = PrefillAttnSpec(HEADS, KV_HEADS, HEAD_DIM, PAGE, HEAD_DIM ** -0.5, origin="bench")
    D, L = HEAD_DIM, new + cached
    pages = math.ceil(bound / PAGE)
    kc = torch.randn(pages, KV_HEADS, PAGE, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    tables = torch.randperm(pages, device="cuda").int().view(1, pages)
    q = torch.randn(new, HEADS * D, device="cuda", dtype=DT)
    out = torch.empty_like(q)
    cu = torch.tensor([0, new], dtype=torch.int32, device="cuda")
    lens = torch.tensor([L], dtype=torch.int32, device="cuda")
    qd = q.view(1, new, HEADS, D).transpose(1, 2)
    kd = torch.randn(1, KV_HEADS, L, D, device="cuda", dtype=DT)
    vd = torch.randn_like(kd)
    mask = torch.arange(L, device="cuda")[None, :] <= torch.arange(cached, L, device="cuda")[:, None]
    meta = K.render(K.prefill_for_device(spec, q.device)).meta
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    blocks = math.ceil(new / meta["bm_tok"]) * KV_HEADS * meta["chunks"]
    auto = K.prefill_splits(meta, blocks, bound, sms)
    nbytes = 2 * L * KV_HEADS * D * 2 + 2 * new * HEADS * D * 2  # K/V once, q and out
    rows = []
    sweep = sorted({2, 4, 8, auto} - {1})
    for label, splits in [("splits 1 (plain kernel)", 1)] + [
            (f"splits {n}{' (prefill_splits)' if n == auto else ''}", n) for n in sweep]:
        fn = Graphed(lambda s=splits: K.prefill_attention(spec, q, kc, vc, tables, cu, lens, out, new,
                                                          max_context=bound, splits=s))
        rows.append((label, per_call_ms(fn)))
    sdpa = Graphed(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True))
    rows.append(("torch SDPA (dense K/V, mask)", per_call_ms(sdpa)))
    lines = [f"prefill attention, {new} new tokens after {cached:,} cached ({HEADS}x{KV_HEADS} heads, d {D}, "
             f"page {PAGE}, bound {bound}; {blocks} blocks unsplit on {sms} SMs), per call in graph replays:",
             "| kernel | us | GB/s (K/V + q + out) | of copy bw | vs splits 1 |", "|---|---:|---:|---:|---:|"]
    base = rows[0][1]
    for label, ms in rows:
        bw = nbytes / (ms * 1e-3)
        lines.append(f"| {label} | {ms * 1e3:.1f} | {bw / 1e9:.0f} | {bw / copy_bw:.0%} | {base / ms:.2f}x |")
    return "\n".join(lines)


GEMV_SHAPES = [  # (label, n, k): Mamba-2 2.7B's decode GEMMs, then the 8B model's
    ("mamba2 in_proj (xbc+dt+z)", 10576, 2560), ("mamba2 out_proj", 2560, 5120),
    ("llama3 qkv", 6144, 4096), ("llama3 o", 4096, 4096), ("llama3 gate+up", 28672, 4096),
    ("llama3 down", 4096, 14336),
]


def gemv_grid_table(copy_bw: float, shapes=tuple(g[0] for g in GEMV_SHAPES), waves: int = 3) -> str:
    """The bf16 GEMV at one row (with PDL) for every (rows, ksplit) whose grid fits `waves` waves of
    resident warps, beside `choose`'s pick (*). Session 10 (H200): alone, 4 rows x half of K beat the
    pick at several shapes (qkv 95% of copy bw against 80%), but in whole decode steps those picks were
    slower (Mamba-2 2.7B 2.908 against 2.726 ms, the 8B shape 4.40 against 4.38): after the kernel
    before, a one-wave grid has all its first weight loads in flight before griddepcontrol.wait, a
    larger one only its first wave's. So `choose` stays; this table is for the next such question."""
    from .gemv import KSPLITS, MIN_BLOCKS, ROWS, WARPS, GemvSpec, choose, gemv

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = ["bf16 GEMV, T=1, + PDL, per rows x ksplit: us (of copy bw); * = choose's pick", ""]
    for label, n, k in (g for g in GEMV_SHAPES if g[0] in shapes):
        nbytes = n * k * 2 + (k + n) * 2
        x = torch.randn(1, k, device="cuda", dtype=DT)
        ws = _copies(lambda: torch.randn(n, k, device="cuda", dtype=DT) * 0.02, n * k * 2)
        outs = [torch.empty(1, n, device="cuda", dtype=DT) for _ in ws]
        pick = choose(n, k, "bf16", sms)
        cells = []
        for r in ROWS:
            for ks in KSPLITS:
                warps = math.ceil(n / (r * WARPS // ks)) * WARPS
                if warps > waves * sms * WARPS * MIN_BLOCKS or ks * 32 * 8 > k:
                    continue
                spec = GemvSpec(n, k, False, "bf16", f"bench {label}", r, ks)
                t = _graphed_ms([lambda w=w, o=o: gemv(spec, x, w, o, pdl=True) for w, o in zip(ws, outs)])
                star = "*" if (r, ks) == pick else ""
                cells.append(f"{r}x{ks}{star} {t * 1e3:.1f} ({nbytes / (t * 1e-3) / copy_bw:.0%})")
        lines.append(f"- {label} {n}x{k}: " + ", ".join(cells))
        del ws, outs
    return "\n".join(lines)


def gemv_table(copy_bw: float, T: int = 1) -> str:
    """The generated bf16 GEMV (codegen/gemv.py) against cuBLAS (F.linear) at decode shapes: bytes
    moved (weight + x + out) per second against the copy bandwidth, weights not in L2 (copies cycled in
    one graph), with and without programmatic dependent launch (issue #18; target: >= 85%)."""
    from .gemv import gemv, spec_for

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [f"bf16 GEMV, T={T} (codegen/gemv.py; target: ≥85% of copy bandwidth, no slower than cuBLAS)\n",
             "| linear | out x in | rows x ksplit | ours (us) | of copy bw | ours + PDL (us) | of copy bw | "
             "cuBLAS (us) | of copy bw | speedup | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, n, k in GEMV_SHAPES:
        nbytes = n * k * 2 + T * (k + n) * 2
        x = torch.randn(T, k, device="cuda", dtype=DT)
        spec = spec_for(n, k, "bf16", False, f"bench {label}", sms)
        ws = _copies(lambda: torch.randn(n, k, device="cuda", dtype=DT) * 0.02, n * k * 2)
        outs = [torch.empty(T, n, device="cuda", dtype=DT) for _ in ws]
        t = _graphed_ms([lambda w=w, o=o: gemv(spec, x, w, o) for w, o in zip(ws, outs)])
        t_pdl = _graphed_ms([lambda w=w, o=o: gemv(spec, x, w, o, pdl=True) for w, o in zip(ws, outs)])
        t_ref = _graphed_ms([lambda w=w: F.linear(x, w) for w in ws])
        best = min(t, t_pdl)
        frac = nbytes / (best * 1e-3) / copy_bw
        pct = lambda ms: f"{nbytes / (ms * 1e-3) / copy_bw:.0%}"  # noqa: E731
        ok = frac >= 0.85 and best <= t_ref
        lines.append(f"| {label} | {n}x{k} | {spec.rows}x{spec.ksplit} | {t * 1e3:.1f} | {pct(t)} | "
                     f"{t_pdl * 1e3:.1f} | {pct(t_pdl)} | {t_ref * 1e3:.1f} | {pct(t_ref)} | {t_ref / best:.2f}x | "
                     f"{'met' if ok else 'NOT met'} |")
        del ws, outs
        torch.cuda.empty_cache()
    return "\n".join(lines)


def gemv_prologue_table() -> str:
    """The decode GEMV with the step before it in its prologue (codegen/gemv.py gemv_prologue; issue #12
    item 2) against that step's own kernel then the GEMV (as programmatic dependent, as the cuda backend
    runs both), bf16, T=1, weights not in L2 (copies cycled in one graph)."""
    from .gemv import gemv, gemv_prologue, spec_for
    from .kernels import activation, norm
    from .specs import ActSpec, NormSpec

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [  # (label, n, k, the step before)
        ("llama3 qkv <- rmsnorm+residual", 6144, 4096, NormSpec("rms", 4096, 1e-5, has_residual=True)),
        ("llama3 gate+up <- rmsnorm+residual", 28672, 4096, NormSpec("rms", 4096, 1e-5, has_residual=True)),
        ("llama3 down <- SwiGLU", 4096, 14336, ActSpec("silu", True, 14336)),
        ("mamba2 in_proj <- rmsnorm+residual", 10576, 2560, NormSpec("rms", 2560, 1e-5, has_residual=True)),
        ("mamba2 out_proj <- gated norm", 2560, 5120,
         NormSpec("rms", 5120, 1e-5, has_residual=False, gate="silu", group=5120)),
    ]
    lines = ["bf16 GEMV with its prologue fused, T=1 (codegen/gemv.py gemv_prologue; issue #12 item 2)\n",
             "| GEMM <- step before | out x in | step + GEMV, PDL (us) | fused, PDL (us) | saved (us) |",
             "|---|---|---:|---:|---:|"]
    for label, n, k, pro in cases:
        norm_step = isinstance(pro, NormSpec)
        plain, fused = spec_for(n, k, "bf16", False, "bench", sms), spec_for(n, k, "bf16", False, "bench", sms, pro)
        a = torch.randn(1, k, device="cuda", dtype=DT)
        gu = torch.randn(1, 2 * k, device="cuda", dtype=DT)  # z or [g | u]: a slice of a wider fused output
        b = gu[:, :k] if not norm_step or pro.gate else torch.randn(1, k, device="cuda", dtype=DT)
        a_in = gu[:, k:] if not norm_step else a
        nw = torch.ones(k, device="cuda", dtype=DT) if norm_step else None
        h, r = torch.empty(1, k, device="cuda", dtype=DT), torch.empty(1, k, device="cuda", dtype=DT)
        res = norm_step and pro.has_residual
        ws = _copies(lambda: torch.randn(n, k, device="cuda", dtype=DT) * 0.02, n * k * 2)
        outs = [torch.empty(1, n, device="cuda", dtype=DT) for _ in ws]

        def step():
            if not norm_step:
                activation(pro, h, gate=b, up=a_in)
            elif pro.gate:
                norm(pro, a, nw, h, gate=b)
            else:
                norm(pro, b, nw, h, residual=a, residual_out=r)

        def two(w, o):
            step()
            gemv(plain, h, w, o, pdl=True)

        def one(w, o):
            if norm_step:
                gemv_prologue(fused, w, o, a, b if res or pro.gate else None, nw, r if res else None, pdl=True)
            else:
                gemv_prologue(fused, w, o, b, a_in, pdl=True)

        t2 = _graphed_ms([lambda w=w, o=o: two(w, o) for w, o in zip(ws, outs)])
        t1 = _graphed_ms([lambda w=w, o=o: one(w, o) for w, o in zip(ws, outs)])
        lines.append(f"| {label} | {n}x{k} | {t2 * 1e3:.1f} | {t1 * 1e3:.1f} | {(t2 - t1) * 1e3:.1f} |")
        del ws, outs
        torch.cuda.empty_cache()
    return "\n".join(lines)


def fp8_gemv_table(copy_bw: float) -> str:
    """The one-row FP8 W8A8 GEMV (codegen/gemv_fp8.py; issue #13) at the 8B model's decode shapes against the
    path it replaces, the activation-quant kernels (templates/quant_act.cu.j2: amax, then scale + fp8) and
    cuBLASLt's fp8 GEMM (torch._scaled_mm), timed together, and against bf16 cuBLAS (F.linear) of the same
    shape; bytes moved (fp8 weight + x + out) per second against the copy bandwidth, weights not in L2
    (copies cycled in one graph). Ours: the three decodes (int: integer ops; cvt: conversions; mma: the
    tensor cores), "int" and "mma" also as programmatic dependent launches."""
    from .gemv import KSPLITS
    from .gemv_fp8 import MMA_ROWS, Fp8GemvSpec, gemv_fp8, spec_for
    from .quant_kernels import ActQuantSpec, act_partials, act_quant_fp8

    MMA_FORMS = [(True, 8), (False, 8), (False, 16)]  # (ring, loads in flight per lane)
    sweep = ["\nThe tensor-core variant's grids (rows x ksplit; * = spec_for's pick) and load forms, one wave or less, "
             "with PDL: us (of copy bw)\n",
             "| linear | rows x ksplit | " + " | ".join(f"{'ring' if r else 'block'} of {m}" for r, m in MMA_FORMS)
             + " |",
             "|---|---|" + "---:|" * len(MMA_FORMS)]

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = ["FP8 W8A8 GEMV, T=1, bf16 activations (codegen/gemv_fp8.py; issue #13)\n",
             "| linear | out x in | rows x ksplit | int (us) | of copy bw | int + PDL (us) | cvt (us) | "
             "mma rows x ksplit | mma (us) | of copy bw | mma + PDL (us) | act-quant + _scaled_mm (us) | of copy bw | "
             "speedup | bf16 cuBLAS (us) | fp8 speedup over bf16 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, n, k in GEMV_SHAPES:
        if not label.startswith("llama3"):
            continue
        nbytes = n * k + (k + n) * 2
        pct = lambda ms: f"{nbytes / (ms * 1e-3) / copy_bw:.0%}"  # noqa: E731
        x = torch.randn(1, k, device="cuda", dtype=DT)
        sw = torch.tensor(0.02 / 448, device="cuda")
        ws = _copies(lambda: (torch.randn(n, k, device="cuda") * 200).to(torch.float8_e4m3fn), n * k)
        outs = [torch.empty(1, n, device="cuda", dtype=DT) for _ in ws]
        times, specs = {}, {}
        for decode in ("int", "cvt", "mma"):
            spec = specs[decode] = spec_for(n, k, "bf16", False, origin=f"bench {label}", num_sms=sms, decode=decode)
            times[decode] = _graphed_ms([lambda w=w, o=o: gemv_fp8(spec, x, w, sw, o) for w, o in zip(ws, outs)])
            if decode != "cvt":
                times[decode + "+pdl"] = _graphed_ms([lambda w=w, o=o: gemv_fp8(spec, x, w, sw, o, pdl=True)
                                                      for w, o in zip(ws, outs)])
        for rows in MMA_ROWS[:2]:  # the tensor-core variant's grids within one wave (64 rows: slower everywhere)
            for ks in KSPLITS:
                blocks = -(-n // (rows * 8 // ks))
                if blocks * 8 > sms * 16 and (rows, ks) != (specs["mma"].rows, specs["mma"].ksplit):
                    continue
                pick = "*" if (rows, ks) == (specs["mma"].rows, specs["mma"].ksplit) else ""
                row = f"| {label} | {rows}x{ks}{pick} |"
                for ring, loads in MMA_FORMS:
                    sp = Fp8GemvSpec(n, k, False, "bf16", f"bench {label}", rows=rows, ksplit=ks, decode="mma",
                                     loads=loads, ring=ring)
                    ms = _graphed_ms([lambda w=w, o=o: gemv_fp8(sp, x, w, sw, o, pdl=True) for w, o in zip(ws, outs)])
                    row += f" {ms * 1e3:.1f} ({pct(ms)}) |"
                sweep.append(row)
        # what runtime/cuda_quant.py QGemm runs today at one row (ACT_KERNEL, dynamic per-tensor scale)
        aspec = ActQuantSpec("tensor", k, False, "bf16", f"bench {label}")
        xq = torch.empty(1, k, device="cuda", dtype=torch.float8_e4m3fn)
        sx = torch.empty((), device="cuda")
        partial = act_partials("cuda")

        def current(w):
            act_quant_fp8(aspec, x, xq, sx, partial)
            return torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=sw, out_dtype=DT)

        t_cur = _graphed_ms([lambda w=w: current(w) for w in ws])
        del ws, outs
        wb = _copies(lambda: torch.randn(n, k, device="cuda", dtype=DT) * 0.02, n * k * 2)
        t_bf16 = _graphed_ms([lambda w=w: F.linear(x, w) for w in wb])
        del wb
        best = min(times.values())
        si, sm = specs["int"], specs["mma"]
        lines.append(f"| {label} | {n}x{k} | {si.rows}x{si.ksplit} | {times['int'] * 1e3:.1f} | "
                     f"{pct(times['int'])} | {times['int+pdl'] * 1e3:.1f} | {times['cvt'] * 1e3:.1f} | "
                     f"{sm.rows}x{sm.ksplit} | {times['mma'] * 1e3:.1f} | {pct(times['mma'])} | "
                     f"{times['mma+pdl'] * 1e3:.1f} | {t_cur * 1e3:.1f} | {pct(t_cur)} | {t_cur / best:.2f}x | "
                     f"{t_bf16 * 1e3:.1f} | {t_bf16 / best:.2f}x |")
        torch.cuda.empty_cache()
    return "\n".join(lines + sweep)


def fp8_gemm_table(rows=(256, 512, 2048)) -> str:
    """cuBLASLt's fp8 GEMM (torch._scaled_mm, per-tensor scales) at the 8B model's linears and the row counts of
    a decode step (256, 512) and a mixed step (2,048), with and without fast accumulation
    (runtime/cuda_quant.py FP8_FAST_ACCUM), beside bf16 cuBLAS: µs a call (TFLOP/s), weights cycled out of L2.
    Issue #13: at 1000/1000 the fp8 GEMMs took 3.47 of a 13.44 ms decode step and 18.7 of a 43 ms mixed step."""
    shapes = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate+up", 28672, 4096), ("down", 4096, 14336))
    lines = ["| linear | rows | fp8 | fp8, fast accumulation | bf16 | fast / plain |", "|---|---:|---:|---:|---:|---:|"]
    for label, n, k in shapes:
        ws = _copies(lambda: (torch.randn(n, k, device="cuda") * 0.02).to(torch.float8_e4m3fn), n * k)
        wb = _copies(lambda: torch.randn(n, k, device="cuda", dtype=DT) * 0.02, n * k * 2)
        one = torch.ones((), device="cuda")
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=DT)
            xq = x.to(torch.float8_e4m3fn)
            flops = 2 * m * n * k
            t = {fast: _graphed_ms([lambda w=w: torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one, out_dtype=DT,
                                                                 use_fast_accum=fast) for w in ws])
                 for fast in (False, True)}
            tb = _graphed_ms([lambda w=w: F.linear(x, w) for w in wb])
            cell = [f"{v * 1e3:.1f} ({flops / (v * 1e-3) / 1e12:.0f})" for v in (t[False], t[True], tb)]
            lines.append(f"| {label} {n}x{k} | {m} | " + " | ".join(cell) + f" | {t[False] / t[True]:.2f}x |")
        del ws, wb
        torch.cuda.empty_cache()
    return "\n".join(["fp8 GEMMs (cuBLASLt, per-tensor scales), µs (TFLOP/s):"] + lines)


def _variants_table(title: str, make, variants, copy_bw: float, tokens=(8192, 2048)) -> str:
    """Every variant of one kernel side by side (us per call, back-to-back launches, and the bytes it
    must move over the copy bandwidth), against the default (the first) and eager torch."""
    lines = [f"{title} (issue #12; target: ≥85% of copy bandwidth)\n",
             "| variant | T | us | of copy bw | vs default | torch (us) | target |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for T in tokens:
        base = None
        for v in variants:
            _, _, ours, ref, nbytes = make(T, v)
            t = per_call_ms(ours)
            base = base or t
            t_ref = per_call_ms(ref) if v == variants[0] else None
            frac = nbytes / (t * 1e-3) / copy_bw
            lines.append(f"| {v} | {T} | {t * 1e3:.1f} | {frac:.0%} | {base / t:.2f}x | "
                         f"{'' if t_ref is None else f'{t_ref * 1e3:.1f}'} | {'met' if frac >= 0.85 else 'NOT met'} |")
            del ours, ref
            torch.cuda.empty_cache()
    return "\n".join(lines)


def act_variants_table(copy_bw: float) -> str:
    """SwiGLU (x = [T, 2 x 14336] gate|up, bf16) in every ActSpec.variant, and the flat loop unrolled by 4."""
    from .specs import ACT_VARIANTS

    def make(T, v):
        return _act(T, unroll=4) if v == "flat, unroll 4" else _act(T, variant=v)

    return _variants_table("SwiGLU, 8B-model shape (F=14336, bf16), per ActSpec.variant", make,
                           list(ACT_VARIANTS) + ["flat, unroll 4"], copy_bw)


def rope_variants_table(copy_bw: float) -> str:
    """Rotary + paged KV write (32 q / 8 kv heads, d 128, page 16, bf16) in every RopeCacheSpec.variant,
    and the block-per-token kernel with its loads first (prefetch)."""
    from .specs import ROPE_VARIANTS

    def make(T, v):
        return _rope(T, prefetch=True) if v == "token, prefetch" else _rope(T, variant=v)

    return _variants_table("rotary + paged KV write, 8B-model shape (bf16), per RopeCacheSpec.variant", make,
                           list(ROPE_VARIANTS) + ["token, prefetch"], copy_bw)


def gated_norm_table(copy_bw: float) -> str:
    """Norm kernels at few rows (issue #18): Mamba-2 2.7B's gated RMSNorm, rmsnorm(y * silu(z)) over one
    group of 5120 with z a slice of in_proj's fused output, and the residual RMSNorm at hidden 2560;
    ours against the torch ops, as graphs of back-to-back calls (us per call)."""
    d, n_in = 5120, 10576
    lines = ["norms at few rows (us per call, graphed)\n", "| kernel | T | ours (us) | torch ops (us) | speedup |",
             "|---|---:|---:|---:|---:|"]
    for T in (1, 4, 64):
        spec = NormSpec("rms", d, 1e-5, has_residual=False, group=d, per_group_weight=True, gate="silu",
                        origin="bench gated")
        y = torch.randn(T, d, device="cuda", dtype=DT)
        zxbc = torch.randn(T, n_in, device="cuda", dtype=DT)
        z = zxbc[:, n_in - d:]
        w = torch.randn(1, d, device="cuda", dtype=DT)
        out = torch.empty(T, d, device="cuda", dtype=DT)

        def torch_gated():
            h = (y * F.silu(z)).float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(DT) * w[0]

        t = _graphed_ms([lambda: K.norm(spec, y, w, out, gate=z)] * GRAPH_CALLS)
        t_ref = _graphed_ms([torch_gated] * GRAPH_CALLS)
        lines.append(f"| gated rmsnorm h{d} g{d} | {T} | {t * 1e3:.2f} | {t_ref * 1e3:.2f} | {t_ref / t:.2f}x |")
        h = 2560
        _, _, ours_res, torch_res, _ = _norm(T, h)
        t = _graphed_ms([ours_res] * GRAPH_CALLS)
        t_ref = _graphed_ms([torch_res] * GRAPH_CALLS)
        lines.append(f"| rmsnorm + residual h{h} | {T} | {t * 1e3:.2f} | {t_ref * 1e3:.2f} | {t_ref / t:.2f}x |")
    return "\n".join(lines)


def ssm_table(copy_bw: float) -> str:
    """Mamba-2 2.7B's conv + scan at decode (issue #18): the fused kernel (codegen/ssm_kernels.py
    SsmConvScanSpec, at three block sizes) against ssm_conv then ssm_scan on views of its output, bf16,
    B sequences of one token each. The conv and SSM states cycle through copies that exceed L2 (as 64
    layers' states do); x B C and dt are slices of in_proj's fused row, as in the model. Bytes: each state
    read and written once, the inputs, weights and output once; fraction of the copy bandwidth."""
    import dataclasses

    from .ssm_kernels import SsmConvScanSpec, SsmConvSpec, SsmScanSpec

    H, P, N, G, KC = 80, 64, 128, 1, 4
    HP, C = H * P, H * P + 2 * G * N
    conv = SsmConvSpec(C, KC, True, "silu", dtype="bf16", origin="bench conv")
    scan = SsmScanSpec(H, P, N, G, dtype="bf16", origin="bench scan")
    fused = SsmConvScanSpec.of(conv, scan, "bench conv -> scan")
    sizes = (16, 32, 64)
    lines = ["Mamba-2 2.7B conv + scan at decode, bf16 (us per call, graphed; issue #18)\n",
             "| B | conv + scan (us) | " + " | ".join(f"fused, {r} rows/block (us)" for r in sizes)
             + " | speedup | fused, of copy bw |", "|---:|---:|" + "---:|" * len(sizes) + "---:|---:|"]
    for B in (1, 64):
        dev = dict(device="cuda")
        slots = torch.arange(B, dtype=torch.int32, **dev)
        cu = torch.arange(B + 1, dtype=torch.int32, **dev)
        kv_lens = torch.full((B,), 10, dtype=torch.int32, **dev)  # context: the states are read
        row = torch.randn(B, 2 * HP + 2 * G * N + H, dtype=DT, **dev) * 0.5  # in_proj's [z; x B C; dt]
        xbc, dt = row[:, HP:HP + C], row[:, HP + C:]
        conv_w, conv_b = (torch.randn(C, KC, dtype=DT, **dev) * 0.5, torch.randn(C, dtype=DT, **dev) * 0.1)
        a_log = (torch.rand(H, **dev) * 2 - 1).to(DT)
        d, dt_bias = torch.randn(H, dtype=DT, **dev), torch.randn(H, dtype=DT, **dev) * 0.1
        per_copy = B * (C * (KC - 1) * 2 + HP * N * 4)
        states = _copies(lambda: (torch.randn(B, C, KC - 1, dtype=DT, **dev) * 0.5,
                                  torch.randn(B, H, P, N, **dev) * 0.1), per_copy)
        mid = torch.empty(B, C, dtype=DT, **dev)
        out = torch.empty(B, HP, dtype=DT, **dev)
        counters = torch.zeros(B * G, dtype=torch.int32, **dev)

        def two(cs, st):
            K.ssm_conv(conv, xbc, conv_w, conv_b, cs, slots, cu, kv_lens, mid, B, 1)
            xs, b, c = mid.split([HP, G * N, G * N], dim=1)
            K.ssm_scan(scan, xs, dt, a_log, b, c, d, dt_bias, st, slots, cu, kv_lens, out, B)

        def one(spec, cs, st):
            K.ssm_conv_scan(spec, xbc, conv_w, conv_b, cs, dt, a_log, d, dt_bias, st, slots, cu, kv_lens, counters,
                            out, B)

        t2 = _graphed_ms([lambda cs=cs, st=st: two(cs, st) for cs, st in states])
        t1 = [_graphed_ms([lambda cs=cs, st=st, sp=dataclasses.replace(fused, block_rows=r): one(sp, cs, st)
                           for cs, st in states]) for r in sizes]
        nbytes = B * (C * 2 + H * 2 + 2 * per_copy // B + HP * 2) + C * (KC + 1) * 2 + 3 * H * 2
        best = min(t1)
        lines.append(f"| {B} | {t2 * 1e3:.2f} | " + " | ".join(f"{t * 1e3:.2f}" for t in t1)
                     + f" | {t2 / best:.2f}x | {nbytes / (best * 1e-3) / copy_bw:.0%} |")
        del states
        torch.cuda.empty_cache()
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--long-context", type=int, default=16384, help="decode attention at batch 1 also runs here")
    ap.add_argument("--moe-tokens", type=int, default=256, help="tokens of the MoE case (8 experts, top-2)")
    ap.add_argument("--md", help="also write the table as markdown to this file")
    ap.add_argument("--no-quant", action="store_true", help="leave out the INT4 GEMV table")
    ap.add_argument("--quant-only", action="store_true", help="only the INT4 GEMV table")
    ap.add_argument("--no-ws", action="store_true", help="leave out the warp-specialised Hopper prefill kernel")
    ap.add_argument("--lora-only", action="store_true", help="only the multi-LoRA decode-step table (issue #17)")
    ap.add_argument("--prefix-only", action="store_true",
                    help="only the cached-prefix prefill attention table (issue #16: split-KV)")
    ap.add_argument("--only", help="comma-separated sections to run alone: gemv (bf16 decode GEMV against "
                    "cuBLAS at T=1 and 4), norm (norms at few rows); issue #18; int4 (the INT4 GEMV table at "
                    "T=1, 4 and 16, issue #13); fp8gemv (the one-row FP8 W8A8 GEMV against act-quant + "
                    "cuBLASLt and bf16 cuBLAS, issue #13); gemvpro (the GEMV with the norm / gated activation "
                    "before it fused into its prologue against that step's kernel + the GEMV, issue #12); "
                    "ssm (Mamba-2's fused conv + scan decode kernel against the two kernels at batch 1 and 64, "
                    "issue #18); act, rope (every SwiGLU / rotary + KV-write variant side by side at "
                    "T=8192 and 2048, issue #12); fp8kv (the fp8-cache decode attention kernel's shapes, "
                    "issue #13); gemvgrid (the bf16 GEMV's every rows x ksplit at one row, issue #18); actquant (the "
                    "fp8 activation quantization's grids, issue #13)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    only = {w.strip() for w in args.only.split(",")} if args.only else set()
    sections = {"gemv", "norm", "int4", "fp8gemv", "gemvpro", "ssm", "act", "rope", "fp8kv", "gemvgrid", "actquant",
                "fp8prefill", "fp8gemm"}
    if only - sections:
        raise SystemExit(f"--only: unknown section(s) {', '.join(sorted(only - sections))}; "
                         f"choose from {', '.join(sorted(sections))}")
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    if only:
        print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {copy_bw / 1e9:.0f} GB/s\n")
        if "norm" in only:
            print(gated_norm_table(copy_bw) + "\n")
        if "ssm" in only:
            print(ssm_table(copy_bw) + "\n")
        if "gemv" in only:
            for T in (1, 4):
                print(gemv_table(copy_bw, T) + "\n")
        if "fp8gemv" in only:
            print(fp8_gemv_table(copy_bw) + "\n")
        if "gemvpro" in only:
            print(gemv_prologue_table() + "\n")
        if "int4" in only:
            for T in (1, 4, 16):
                print(quant_gemv_table(copy_bw, T) + "\n")
        if "act" in only:
            print(act_variants_table(copy_bw) + "\n")
        if "rope" in only:
            print(rope_variants_table(copy_bw) + "\n")
        if "fp8kv" in only:
            print(fp8_kv_variants_table(copy_bw) + "\n")
        if "gemvgrid" in only:
            print(gemv_grid_table(copy_bw) + "\n")
        if "actquant" in only:
            print(act_quant_grid_table(copy_bw) + "\n")
        if "fp8prefill" in only:
            print(fp8_prefill_table() + "\n")
        if "fp8gemm" in only:
            print(fp8_gemm_table() + "\n")
        return []
    if args.lora_only:
        print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {copy_bw / 1e9:.0f} GB/s\n")
        print(lora_decode_table(copy_bw, T=args.batch))
        return []
    if args.prefix_only:
        print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {copy_bw / 1e9:.0f} GB/s\n")
        print(prefill_cached_prefix_table(copy_bw))
        return []
    if args.quant_only:
        print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {copy_bw / 1e9:.0f} GB/s\n")
        for T in (1, 4, 16):
            print(quant_gemv_table(copy_bw, T) + "\n")
        print(fp8_act_quant_table(copy_bw) + "\n")
        return []
    cases = [lambda: _norm(args.tokens), lambda: _rope(args.tokens), lambda: _act(args.tokens),
             lambda: _decode(args.batch, args.context), lambda: _decode(1, args.long_context),
             lambda: _prefill(args.tokens, 8), lambda: _embed(args.tokens), lambda: _softcap(args.batch),
             lambda: _moe(args.moe_tokens)]
    if torch.cuda.get_device_capability()[0] == 9 and not args.no_ws:  # Hopper: the warp-specialised prefill too
        cases.insert(6, lambda: _prefill(args.tokens, 8, ws=True))
    # issue #12 A/B: the kernels as they were before its changes, beside the new ones above
    cases[3:3] = [lambda: _rope(args.tokens, prefetch=True), lambda: _act(args.tokens, unroll=4)]
    cases.insert(7, lambda: _decode(1, args.long_context, tuned=False))
    targets = {"rmsnorm + residual": 0.80, "rotary + paged KV write": 0.80, "SwiGLU": 0.80,
               "paged decode attention": 0.85}
    rows = []
    for make in cases:  # one case's tensors at a time
        case = make()
        name, shape, ours, ref, nbytes = case[:5]
        flops = case[5] if len(case) > 5 else 0
        t = per_call_ms(ours)
        t_ref = per_call_ms(ref)
        bw = nbytes / (t * 1e-3)
        rows.append(dict(kernel=name, shape=shape, us=t * 1e3, mb=nbytes / 1e6, gbs=bw / 1e9,
                         frac=bw / copy_bw, torch_us=t_ref * 1e3, tflops=flops / (t * 1e-3) / 1e12 if flops else 0,
                         target=targets.get(name)))
        del case, ours, ref
        torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name()
    head = (f"device: {dev}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (1 GiB device-to-device, read + write)\n\n"
            "| kernel | shape | ours (us) | MB moved | GB/s | of copy bw | torch (us) | speedup | target |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        tgt = "" if r["target"] is None else f"≥{r['target']:.0%}: {'met' if r['frac'] >= r['target'] else 'NOT met'}"
        extra = f" ({r['tflops']:.0f} TFLOP/s)" if r["tflops"] else ""
        lines.append(f"| {r['kernel']}{extra} | {r['shape']} | {r['us']:.1f} | {r['mb']:.1f} | {r['gbs']:.0f} | "
                     f"{r['frac']:.0%} | {r['torch_us']:.1f} | {r['torch_us'] / r['us']:.2f}x | {tgt} |")
    table = "\n".join(lines)
    if not args.no_quant:
        table += "\n\n" + "\n\n".join(quant_gemv_table(copy_bw, T) for T in (1, 16))
        table += "\n\n" + fp8_act_quant_table(copy_bw)
    print(table)
    for b, c in ((args.batch, args.context), (8, args.context), (1, args.long_context)):
        print(decode_partition_sweep(b, c))
    print(decode_partition_sweep(1, args.long_context, tuned=False))
    print(fp8_kv_decode_line(args.batch, args.context, copy_bw))
    print(lora_decode_table(copy_bw, T=args.batch))
    if torch.cuda.get_device_capability()[0] == 9:  # issue #16: split-KV of the Hopper prefill kernel
        print(prefill_cached_prefix_table(copy_bw))
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
