"""Time every generated kernel at 8B-class decoder shapes (hidden 4096, 32 query / 8 KV heads,
head dim 128, ffn 14336, bf16) against the device's copy bandwidth and an eager torch baseline,
all measured in the same run.

    python -m kiln.codegen.bench_kernels [--tokens 8192] [--batch 64] [--context 4096] [--md FILE]

Bytes are the fewest the op must move (each input read once, each output written once); the
fraction is achieved bandwidth over a device-to-device copy's (bytes read + written).
"""

from __future__ import annotations

import argparse
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


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read + write."""
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / (ms * 1e-3)


def _norm(T):
    spec = NormSpec("rms", HIDDEN, 1e-5, origin="bench")
    x, r = torch.randn(T, HIDDEN, device="cuda", dtype=DT), torch.randn(T, HIDDEN, device="cuda", dtype=DT)
    w = torch.randn(HIDDEN, device="cuda", dtype=DT)
    out, r_out = torch.empty_like(x), torch.empty_like(x)

    def torch_ref():
        h = x + r
        hf = h.float()
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(DT) * w, h

    ours = lambda: K.norm(spec, x, w, out, residual=r, residual_out=r_out)  # noqa: E731
    return "rmsnorm + residual", f"T={T}", ours, torch_ref, 4 * T * HIDDEN * 2 + HIDDEN * 2


def _rope(T):
    spec = RopeCacheSpec(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, PAGE, theta=500000.0, scaling="llama3",
                         factor=8.0, original_max_position=8192, origin="bench")
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
    return "rotary + paged KV write", f"T={T}", ours, torch_ref, nbytes


def _act(T):
    spec = ActSpec("silu", True, FFN, origin="bench")
    x = torch.randn(T, 2 * FFN, device="cuda", dtype=DT)
    out = torch.empty(T, FFN, device="cuda", dtype=DT)
    ours = lambda: K.activation(spec, out, x=x)  # noqa: E731
    torch_ref = lambda: F.silu(x[:, :FFN]) * x[:, FFN:]  # noqa: E731
    return "SwiGLU", f"T={T}", ours, torch_ref, 3 * T * FFN * 2


def _decode(B, ctx):
    spec = DecodeAttnSpec(HEADS, KV_HEADS, HEAD_DIM, PAGE, HEAD_DIM ** -0.5, origin="bench")
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
    ours = lambda: K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch, ctx)  # noqa: E731
    torch_ref = lambda: F.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True)  # noqa: E731
    nbytes = 2 * B * ctx * KV_HEADS * D * 2 + 2 * B * HEADS * D * 2
    return "paged decode attention", f"B={B} ctx={ctx}", ours, torch_ref, nbytes


def decode_partition_sweep(B, ctx) -> str:
    """Decode attention time per tokens-per-split choice: checks the partition model."""
    spec = DecodeAttnSpec(HEADS, KV_HEADS, HEAD_DIM, PAGE, HEAD_DIM ** -0.5, origin="bench")
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
    parts = sorted({chosen, 256, 512, 832, 1024, 1376, 2048, 4096} & set(range(meta["tile"], ctx + 1, meta["tile"])))
    res = []
    for p in parts:
        t = time_ms(lambda: K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch, ctx, partition=p))
        res.append(f"{p}{'*' if p == chosen else ''}: {t * 1e3:.0f}us")
    return f"decode B={B} ctx={ctx}, {per_sm} blocks/SM; tokens per split (* = model's pick): " + ", ".join(res)


def _prefill(T, seqs):
    spec = PrefillAttnSpec(HEADS, KV_HEADS, HEAD_DIM, PAGE, HEAD_DIM ** -0.5, origin="bench")
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
    return "prefill attention (causal)", f"{seqs}x{L} tok", ours, torch_ref, nbytes, flops


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


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--md", help="also write the table as markdown to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    cases = [_norm(args.tokens), _rope(args.tokens), _act(args.tokens), _decode(args.batch, args.context),
             _prefill(args.tokens, 8), _embed(args.tokens), _softcap(args.batch)]
    targets = {"rmsnorm + residual": 0.80, "rotary + paged KV write": 0.80, "SwiGLU": 0.80,
               "paged decode attention": 0.75}
    rows = []
    for case in cases:
        name, shape, ours, ref, nbytes = case[:5]
        flops = case[5] if len(case) > 5 else 0
        t = time_ms(ours)
        t_ref = time_ms(ref)
        bw = nbytes / (t * 1e-3)
        rows.append(dict(kernel=name, shape=shape, us=t * 1e3, mb=nbytes / 1e6, gbs=bw / 1e9,
                         frac=bw / copy_bw, torch_us=t_ref * 1e3, tflops=flops / (t * 1e-3) / 1e12 if flops else 0,
                         target=targets.get(name)))
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
    print(table)
    for b, c in ((args.batch, args.context), (8, args.context), (1, 4 * args.context)):
        print(decode_partition_sweep(b, c))
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
