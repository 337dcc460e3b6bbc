"""Every generated kernel against plain torch math (float64) on fresh random inputs: odd
lengths, lengths crossing page boundaries, mixed batches, shuffled page ids. Outputs are
poisoned (NaN) first so an unwritten element fails."""

import math

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen import rope
from kiln.codegen.specs import (  # noqa: E402
    ActSpec,
    DecodeAttnSpec,
    EmbedSpec,
    MapSpec,
    NormSpec,
    PrefillAttnSpec,
    RopeCacheSpec,
)
from kiln.dsl.ops.attention import alibi_slopes  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DEV = "cuda"
TOL = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-5}
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "output has NaNs: an element was never written"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


# ---- norms -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kind, hidden, res, off", [
    ("rms", 4096, True, 0.0), ("rms", 80, False, 1.0), ("rms", 5120, True, 1.0),
    ("layer", 768, True, 0.0), ("layer", 4100, False, 0.0),
])
@pytest.mark.parametrize("T", [1, 7, 301])
def test_norm(dtype, kind, hidden, res, off, T):
    dt = DT[dtype]
    spec = NormSpec(kind, hidden, 1e-5, weight_offset=off, has_bias=kind == "layer", has_residual=res,
                    dtype=dtype, origin="test")
    x = torch.randn(T, hidden, device=DEV).to(dt)
    r = torch.randn(T, hidden, device=DEV).to(dt) if res else None
    w = (torch.rand(hidden, device=DEV) + 0.5).to(dt)
    b = torch.randn(hidden, device=DEV).to(dt) if kind == "layer" else None
    out, r_out = nan_like((T, hidden), dt), (nan_like((T, hidden), dt) if res else None)
    K.norm(spec, x, w, out, residual=r, residual_out=r_out, bias=b)
    h = (x + r) if res else x  # an eager dtype add: what residual_out must hold, bit for bit
    if res:
        assert torch.equal(r_out, h)
    hd = h.double()
    if kind == "rms":
        y = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-5)
    else:
        y = (hd - hd.mean(-1, keepdim=True)) * torch.rsqrt(hd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    y = y * (w.double() + off) + (b.double() if b is not None else 0)
    assert rel_err(out, y) <= TOL[dtype]


def test_norm_residual_in_place():
    spec = NormSpec("rms", 4096, 1e-6, dtype="bf16", origin="test")
    x, r = torch.randn(33, 4096, device=DEV).bfloat16(), torch.randn(33, 4096, device=DEV).bfloat16()
    w, h = torch.randn(4096, device=DEV).bfloat16(), x + r
    out = nan_like((33, 4096), torch.bfloat16)
    K.norm(spec, x, w, out, residual=r, residual_out=r)
    assert torch.equal(r, h)


# ---- paged cache helpers -----------------------------------------------------------------

def paged_layout(lens, page_size, spare=5):
    """Block tables over a shuffled page pool: [S, max_pages] int32, total pages."""
    need = [math.ceil(n / page_size) for n in lens]
    total = sum(need) + spare
    perm = torch.randperm(total).tolist()
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    at = 0
    for s, n in enumerate(need):
        tables[s, :n] = torch.tensor(perm[at : at + n])
        at += n
    return tables.to(DEV), total


def gather(cache, table, n, page_size):
    """Dense [kv_heads, n, head_dim] of a sequence's first n cached tokens."""
    pages = cache[table[: math.ceil(n / page_size)].long()]  # [p, kv, P, D]
    return pages.permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])[:, :n]


# ---- rotary + cache write ----------------------------------------------------------------

def rotate_ref(x, pos, freq, rot, layout, attn_factor=1.0):
    """x [T, H, D] -> float64 rotated like HF (angles in float32, as HF's matmul)."""
    x = x.double().clone()
    if rot == 0:
        return x
    ang = (pos.float()[:, None] * freq.to(pos.device)[None, :]).double()[:, None, :]  # [T, 1, rot/2]
    c, s = ang.cos() * attn_factor, ang.sin() * attn_factor
    if layout == "half":
        x1, x2 = x[..., : rot // 2].clone(), x[..., rot // 2 : rot].clone()
        x[..., : rot // 2], x[..., rot // 2 : rot] = x1 * c - x2 * s, x2 * c + x1 * s
    else:
        x1, x2 = x[..., 0:rot:2].clone(), x[..., 1:rot:2].clone()
        x[..., 0:rot:2], x[..., 1:rot:2] = x1 * c - x2 * s, x2 * c + x1 * s
    return x


ROPE_CASES = [
    dict(heads=32, kv_heads=8, head_dim=128, rotary_dim=128, layout="half", scaling="llama3", factor=8.0,
         original_max_position=8192, theta=500000.0),
    dict(heads=32, kv_heads=32, head_dim=80, rotary_dim=32, layout="half", scaling="none"),
    dict(heads=16, kv_heads=2, head_dim=64, rotary_dim=64, layout="interleaved", scaling="linear", factor=4.0),
    dict(heads=8, kv_heads=4, head_dim=256, rotary_dim=128, layout="interleaved", scaling="dynamic", factor=2.0,
         original_max_position=512),
    dict(heads=12, kv_heads=12, head_dim=64, rotary_dim=0),
    dict(heads=4, kv_heads=2, head_dim=128, rotary_dim=96, layout="half", attention_factor=1.25),
    dict(heads=8, kv_heads=2, head_dim=128, rotary_dim=128, layout="half", scaling="yarn", factor=4.0,
         original_max_position=64, attention_factor=1.1386),
    # longrope: the step's longest sequence (741) is past original (512): the long table
    dict(heads=8, kv_heads=2, head_dim=64, rotary_dim=64, layout="half", scaling="longrope", factor=8.0,
         original_max_position=512, attention_factor=1.19, short_factor=tuple(1.0 + 0.1 * i for i in range(32)),
         long_factor=tuple(2.0 + 0.5 * i for i in range(32))),
    # and with original past every sequence: the short table
    dict(heads=8, kv_heads=2, head_dim=64, rotary_dim=64, layout="half", scaling="longrope", factor=8.0,
         original_max_position=1024, attention_factor=1.19, short_factor=tuple(1.0 + 0.1 * i for i in range(32)),
         long_factor=tuple(2.0 + 0.5 * i for i in range(32))),
]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", range(len(ROPE_CASES)))
@pytest.mark.parametrize("page_size", [16, 5])
@pytest.mark.parametrize("prefetch", [True, False])  # the loads-first variant and the default kernel
def test_rope_write_kv(dtype, case, page_size, prefetch):
    c = ROPE_CASES[case]
    dt = DT[dtype]
    spec = RopeCacheSpec(page_size=page_size, dtype=dtype, prefetch=prefetch, origin="test", **c)
    H, KV, D, rot = spec.heads, spec.kv_heads, spec.head_dim, spec.rotary_dim
    ctx, new = [0, 3, 700, 31], [17, 1, 1, 40]  # prefill chunks and decodes, crossing pages
    tables, pages = paged_layout([a + b for a, b in zip(ctx, new)], page_size)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(new)]).to(DEV)
    pos = torch.cat([torch.arange(a, a + b) for a, b in zip(ctx, new)]).to(DEV)
    T = pos.shape[0]
    slots = K.slot_mapping(tables, seq, pos, page_size)
    slots[5] = -1  # a padding token: rotated q, no cache write
    qkv = torch.randn(T, (H + 2 * KV) * D, device=DEV).to(dt)  # a fused QKV output; q, k, v are views
    q, k, v = qkv[:, : H * D], qkv[:, H * D : (H + KV) * D], qkv[:, (H + KV) * D :]
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    kc, vc = nan_like((pages, KV, page_size, D), dt), nan_like((pages, KV, page_size, D), dt)
    seq_len = torch.tensor([int(pos.max()) + 1], dtype=torch.int32, device=DEV)
    K.rope_write_kv(spec, q, k, v, pos, slots, kc, vc, seq_len=seq_len)

    freq = rope.step_inv_freq(spec, int(seq_len)) if rot else None
    q_ref = rotate_ref(q0.view(T, H, D), pos, freq, rot, spec.layout, spec.attention_factor)
    assert rel_err(q.reshape(T, H, D), q_ref) <= TOL[dtype]
    k_ref = rotate_ref(k0.view(T, KV, D), pos, freq, rot, spec.layout, spec.attention_factor)
    keep = slots >= 0
    s = slots[keep].long()
    k_got = kc[s // page_size, :, s % page_size]  # [T', KV, D]
    v_got = vc[s // page_size, :, s % page_size]
    assert rel_err(k_got, k_ref[keep]) <= TOL[dtype]
    assert torch.equal(v_got, v0.view(T, KV, D)[keep])
    written = torch.zeros(pages * page_size, dtype=torch.bool, device=DEV)
    written[s] = True
    untouched = kc.permute(0, 2, 1, 3).reshape(pages * page_size, -1)[~written]
    assert torch.isnan(untouched).all(), "a slot outside slot_mapping was written"


# ---- attention -------------------------------------------------------------------------

def attention_ref(q, k, v, positions, scale, window, softcap, causal=True, alibi_max=0.0):
    """q [n, H, D] at `positions`; k, v [KV, L, D] -> [n, H, D] float64. ALiBi: scores +=
    slope_h * (key position - query position)."""
    H, KV = q.shape[1], k.shape[0]
    k = k.double().repeat_interleave(H // KV, 0)
    v = v.double().repeat_interleave(H // KV, 0)
    s = torch.einsum("nhd,hld->hnl", q.double(), k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    j = torch.arange(k.shape[1], device=q.device)[None, :]
    p = positions[:, None]
    if alibi_max:
        slopes = alibi_slopes(H, alibi_max).double().to(q.device)
        s = s + slopes[:, None, None] * (j - p)[None].double()
    ok = (j <= p) if causal else torch.ones_like(j <= p)
    if window:
        ok &= j > p - window
    s = s.masked_fill(~ok[None], float("-inf"))
    return torch.einsum("hnl,hld->nhd", torch.softmax(s, -1), v)


ATTN_CASES = [  # heads, kv_heads, head_dim, window, softcap, alibi_max (ALiBi: the last three)
    (32, 8, 128, 0, 0.0, 0.0), (8, 8, 64, 0, 0.0, 0.0), (16, 2, 256, 37, 0.0, 0.0), (12, 4, 80, 0, 30.0, 0.0),
    (64, 4, 128, 100, 20.0, 0.0), (8, 1, 128, 0, 0.0, 0.0),
    (32, 32, 128, 0, 0.0, 8.0), (12, 4, 64, 37, 30.0, 8.0), (6, 2, 80, 0, 0.0, 4.0),
]


# decode only: head_dim 96 with a window; head_dim 72 (16-bit but not a multiple of 16: the CUDA-core
# kernel); a 32-head group (two 16-row chunks per KV head) with ALiBi
DECODE_CASES = ATTN_CASES + [(16, 4, 96, 37, 0.0, 0.0), (8, 2, 72, 0, 0.0, 0.0), (32, 1, 128, 0, 0.0, 8.0)]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("page_size", [16, 7])
def test_paged_decode_attention(dtype, case, page_size):
    H, KV, D, window, cap, ali = case
    dt = DT[dtype]
    spec = DecodeAttnSpec(H, KV, D, page_size, D ** -0.5, window=window, softcap=cap, alibi_max=ali, dtype=dtype,
                  origin="test")
    ctx = [1, 17, 100, 513, 1000, 2049, 33]
    B = len(ctx)
    tables, pages = paged_layout(ctx, page_size)
    kc = torch.randn(pages, KV, page_size, D, device=DEV).to(dt)
    vc = torch.randn(pages, KV, page_size, D, device=DEV).to(dt)
    q = torch.randn(B, H * D, device=DEV).to(dt)
    out = nan_like((B, H * D), dt)
    scratch = K.decode_scratch(spec, B, 4096, DEV)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch, max_context=max(ctx))
    for b, n in enumerate(ctx):
        ref = attention_ref(q[b].view(1, H, D), gather(kc, tables[b], n, page_size),
                            gather(vc, tables[b], n, page_size), torch.tensor([n - 1], device=DEV),
                            spec.scale, window, cap, alibi_max=ali)
        assert rel_err(out[b].view(1, H, D), ref) <= TOL[dtype], f"sequence {b} (context {n})"


# heads, kv_heads, head_dim, window, softcap, alibi_max: Llama-3-8B's shape; a 32-head group (two
# 16-row chunks per KV head); head_dim 96; everything at once
LONG_DECODE_CASES = [(32, 8, 128, 0, 0.0, 0.0), (32, 1, 128, 0, 0.0, 0.0), (16, 4, 96, 0, 0.0, 0.0),
                     (16, 4, 128, 3000, 30.0, 8.0)]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", LONG_DECODE_CASES)
@pytest.mark.parametrize("split", ["model", "granule", "one"])
def test_paged_decode_attention_long_context(dtype, case, split):
    """Batch 1-3 at up to 16k tokens of context: the modeled split count (dozens of splits at
    batch 1), the finest partition (hundreds of splits, most of the last ones empty for the short
    sequences) and a single split (the kernel normalizes in place). Called twice with fresh
    queries: the fused split merge leaves its counters ready for the next launch."""
    H, KV, D, window, cap, ali = case
    dt, P = DT[dtype], 16
    spec = DecodeAttnSpec(H, KV, D, P, D ** -0.5, window=window, softcap=cap, alibi_max=ali, dtype=dtype,
                          origin="test")
    ctx = [16384, 5000, 77]
    B, max_ctx = len(ctx), max(ctx)
    tables, pages = paged_layout(ctx, P)
    kc = torch.randn(pages, KV, P, D, device=DEV).to(dt)
    vc = torch.randn(pages, KV, P, D, device=DEV).to(dt)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    granule = K.render(spec).meta["tile"]
    partition = {"model": None, "granule": granule, "one": max_ctx + granule - max_ctx % granule}[split]
    scratch = K.decode_scratch(spec, B, max_ctx, DEV, min_partition=granule)
    for call in range(2):
        q = torch.randn(B, H * D, device=DEV).to(dt)
        out = nan_like((B, H * D), dt)
        K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch, max_context=max_ctx,
                                 partition=partition)
        assert not scratch.counters.any(), "split counters not reset after the launch"
        for b, n in enumerate(ctx):
            ref = attention_ref(q[b].view(1, H, D), gather(kc, tables[b], n, P), gather(vc, tables[b], n, P),
                                torch.tensor([n - 1], device=DEV), spec.scale, window, cap, alibi_max=ali)
            assert rel_err(out[b].view(1, H, D), ref) <= TOL[dtype], f"call {call}, sequence {b} (context {n})"


@pytest.mark.parametrize("tuned", [True, False])  # issue #12's merge + page prefetch, and the kernel before
@pytest.mark.parametrize("kv_fp8", [False, True])
@pytest.mark.parametrize("ctx", [16384, 16383, 12345, 4100, 65])
@pytest.mark.parametrize("partition", [None, 64, 320, 4096])
def test_paged_decode_attention_batch1(tuned, kv_fp8, ctx, partition):
    """Batch 1, Llama-3-8B's heads: contexts that are not a multiple of the page (16) or of the
    partition; partitions the model's, the finest (up to 256 splits: the merge's 32-split chunks),
    one that is not a power of 2, and a coarse one; bf16 and fp8 pages. Called twice: the counters
    are reset by the launch."""
    H, KV, D, P = 32, 8, 128, 16
    spec = DecodeAttnSpec(H, KV, D, P, D ** -0.5, kv_fp8=kv_fp8, tuned=tuned, origin="test")
    tables, pages = paged_layout([ctx], P)
    kc, kf, vc, vf, scales = kv_pages((pages, KV, P, D), kv_fp8, torch.bfloat16)
    lens = torch.tensor([ctx], dtype=torch.int32, device=DEV)
    scratch = K.decode_scratch(spec, 1, ctx, DEV, min_partition=64)
    for call in range(2):
        q = torch.randn(1, H * D, device=DEV).to(torch.bfloat16)
        out = nan_like((1, H * D), torch.bfloat16)
        K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch, max_context=ctx,
                                 partition=partition, **scales)
        assert not scratch.counters.any(), "split counters not reset after the launch"
        ref = attention_ref(q.view(1, H, D), gather(kf, tables[0], ctx, P), gather(vf, tables[0], ctx, P),
                            torch.tensor([ctx - 1], device=DEV), spec.scale, 0, 0.0)
        assert rel_err(out.view(1, H, D), ref) <= TOL["bf16"], f"call {call}"


@pytest.mark.parametrize("kv_fp8", [False, True])
@pytest.mark.parametrize("window", [0, 200])
@pytest.mark.parametrize("ctx", [[1], [65], [1000], [1024], [4096], [3000, 17]])
def test_paged_decode_attention_dynamic_partition(kv_fp8, window, ctx, monkeypatch):
    """KILN_DECODE_DYN_PART=1: in a grid sized for a 4,096-token capacity, each sequence's blocks derive the
    partition from its length (fewer tokens a split at batch 1 and 2): against the reference, the counters back
    at zero after each of two calls; and a partition the caller gives is taken as it is (the same bits as the
    kernel without the switch)."""
    from kiln.codegen import render as R
    H, KV, D, P, cap = 32, 8, 128, 16, 4096
    specs = {}
    for on in ("1", "0"):
        monkeypatch.setattr(R, "DECODE_DYN_PART", on)
        specs[on] = DecodeAttnSpec(H, KV, D, P, D ** -0.5, window=window, kv_fp8=kv_fp8, origin=f"test dyn part {on}")
        assert K.render(specs[on]).meta.get("dyn_part") == (on == "1")
    B = len(ctx)
    tables, pages = paged_layout(ctx, P)
    tables = torch.nn.functional.pad(tables, (0, cap // P - tables.shape[1]))
    kc, kf, vc, vf, scales = kv_pages((pages, KV, P, D), kv_fp8, torch.bfloat16)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    scratch = K.decode_scratch(specs["1"], B, cap, DEV)
    for call in range(2):
        q = torch.randn(B, H * D, device=DEV).to(torch.bfloat16)
        out = nan_like((B, H * D), torch.bfloat16)
        K.paged_decode_attention(specs["1"], q, kc, vc, tables, lens, out, scratch, max_context=cap, **scales)
        assert not scratch.counters.any(), "split counters not reset after the launch"
        for b, n in enumerate(ctx):
            ref = attention_ref(q[b].view(1, H, D), gather(kf, tables[b], n, P), gather(vf, tables[b], n, P),
                                torch.tensor([n - 1], device=DEV), specs["1"].scale, window, 0.0)
            assert rel_err(out[b].view(1, H, D), ref) <= TOL["bf16"], f"call {call}, sequence {b} (context {n})"
        given = {}
        for on, spec in specs.items():
            given[on] = nan_like((B, H * D), torch.bfloat16)
            K.paged_decode_attention(spec, q, kc, vc, tables, lens, given[on], scratch, max_context=cap, partition=128,
                                     **scales)
        assert torch.equal(given["1"], given["0"])


def live_splits(n: int, window: int, partition: int, splits: int) -> tuple[int, int]:
    """The splits [s0, s1) holding a context of n tokens, as the decode kernels derive them (at n = 0:
    split 0, which writes zeros)."""
    s0 = max(0, n - window) // partition if window else 0
    return s0, max(1, min(splits, math.ceil(n / partition)))


# heads, kv_heads, head_dim, softcap, alibi_max: Llama-3-8B's group; a 32-head group (two 16-row chunks
# on tensor cores, four of 8 on CUDA cores) with softcap and ALiBi
CAPACITY_CASES = [(32, 8, 128, 0.0, 0.0), (32, 1, 128, 30.0, 8.0)]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])  # the tensor-core and the CUDA-core kernel
@pytest.mark.parametrize("kv_fp8", [False, True])
@pytest.mark.parametrize("window", [0, 37, 200])
@pytest.mark.parametrize("case", CAPACITY_CASES)
def test_paged_decode_attention_capacity_past_context(dtype, kv_fp8, window, case):
    """A CUDA graph's capacity far past the contexts (benchmarks/2026-12-03-04.md, session 13): max_context 4,096 in
    splits of 128 tokens is a grid of 32 splits, and the contexts hold none to all of them. The blocks
    of splits without tokens (past the context, before the window) leave at once and the merge counts
    the others: against the reference, the counters back at zero after each of two calls. A context of
    0 tokens gets zeros, as before. A context whose tokens lie in one split of the 32 (all of it at
    most 128 tokens; the window's last 37 within one split) is written by that split alone: bit for
    bit what a one-split grid over the same tokens writes (partition = max_context = 4,096)."""
    H, KV, D, cap, ali = case
    dt, P, partition, max_ctx = DT[dtype], 16, 128, 4096
    spec = DecodeAttnSpec(H, KV, D, P, D ** -0.5, window=window, softcap=cap, alibi_max=ali, dtype=dtype,
                          kv_fp8=kv_fp8, origin="test")
    ctx = [0, 1, 77, 128, 129, 250, 300, 1000, 2049, 4096]
    splits = math.ceil(max_ctx / partition)
    live = [live_splits(n, window, partition, splits) for n in ctx]
    alone = [b for b, n in enumerate(ctx) if n and live[b][1] - live[b][0] == 1]
    assert any(ctx[b] > partition for b in alone) == (window == 37)  # a window's tokens in one later split
    assert len(alone) >= 3 and any(s1 - s0 > 1 for s0, s1 in live)
    B = len(ctx)
    tables, pages = paged_layout([max(n, 1) for n in ctx], P)
    tables = torch.nn.functional.pad(tables, (0, max_ctx // P - tables.shape[1]))  # the capacity's width
    kc, kf, vc, vf, scales = kv_pages((pages, KV, P, D), kv_fp8, dt)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    scratch = K.decode_scratch(spec, B, max_ctx, DEV, min_partition=partition)
    for call in range(2):
        q = torch.randn(B, H * D, device=DEV).to(dt)
        out = nan_like((B, H * D), dt)
        K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch, max_context=max_ctx,
                                 partition=partition, **scales)
        assert not scratch.counters.any(), "split counters not reset after the launch"
        assert torch.equal(out[0], torch.zeros_like(out[0])), "context 0: zeros"
        for b, n in enumerate(ctx[1:], 1):
            ref = attention_ref(q[b].view(1, H, D), gather(kf, tables[b], n, P), gather(vf, tables[b], n, P),
                                torch.tensor([n - 1], device=DEV), spec.scale, window, cap, alibi_max=ali)
            assert rel_err(out[b].view(1, H, D), ref) <= TOL[dtype], f"call {call}, sequence {b} (context {n})"
        # the lone splits against a grid of one split: same tokens, same tiles (lo = the window's first
        # token or 0), so the same arithmetic
        one = torch.tensor(alone, device=DEV)
        out1 = nan_like((len(alone), H * D), dt)
        K.paged_decode_attention(spec, q[one], kc, vc, tables[one], lens[one], out1, scratch, max_context=max_ctx,
                                 partition=max_ctx, **scales)
        assert not scratch.counters.any(), "split counters not reset after the launch"
        assert torch.equal(out1, out[one]), f"call {call}: a lone split differs from a one-split grid"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", ATTN_CASES)
@pytest.mark.parametrize("page_size", [16, 7])
def test_prefill_attention(dtype, case, page_size):
    H, KV, D, window, cap, ali = case
    dt = DT[dtype]
    spec = PrefillAttnSpec(H, KV, D, page_size, D ** -0.5, window=window, softcap=cap, alibi_max=ali, dtype=dtype,
                  origin="test")
    ctx, new = [0, 5, 100, 0, 64], [37, 64, 1, 130, 3]  # fresh prompts, chunked prefill, a decode
    kv_lens = [a + b for a, b in zip(ctx, new)]
    tables, pages = paged_layout(kv_lens, page_size)
    kc = torch.randn(pages, KV, page_size, D, device=DEV).to(dt)
    vc = torch.randn(pages, KV, page_size, D, device=DEV).to(dt)
    T = sum(new)
    q = torch.randn(T, H * D, device=DEV).to(dt)
    out = nan_like((T, H * D), dt)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    K.prefill_attention(spec, q, kc, vc, tables, cu, torch.tensor(kv_lens, dtype=torch.int32, device=DEV),
                        out, max_q_len=max(new))
    for s, (c, n) in enumerate(zip(ctx, new)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        ref = attention_ref(q[rows].view(n, H, D), gather(kc, tables[s], c + n, page_size),
                            gather(vc, tables[s], c + n, page_size), torch.arange(c, c + n, device=DEV),
                            spec.scale, window, cap, alibi_max=ali)
        assert rel_err(out[rows].view(n, H, D), ref) <= TOL[dtype], f"sequence {s}"


# heads, kv_heads, head_dim, window, causal: GQA 4 and 8 (rows packed 4 / 8 heads per token),
# MHA, group 3 (one head per row), sliding windows, and a non-causal one
HOPPER_CASES = [(32, 8, 128, 0, True), (8, 8, 64, 0, True), (8, 1, 128, 0, True), (16, 2, 128, 100, True),
                (12, 4, 64, 37, True), (24, 8, 128, 0, True), (32, 8, 128, 0, False)]


@pytest.mark.parametrize("ws", [False, True], ids=["sm90", "sm90ws"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("case", HOPPER_CASES)
@pytest.mark.parametrize("page_size", [16, 7])
def test_prefill_attention_hopper(dtype, case, page_size, ws):
    """The wgmma kernel, both forms (ws: warp-specialised): fresh prompts and chunks with context
    already in the cache, lengths that are no multiple of the 128-key tile, contexts spanning more
    tiles than its 3 stages, single-tile blocks (the ping-pong's shortest hand-over)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma prefill kernel is for Hopper GPUs")
    H, KV, D, window, causal = case
    dt = DT[dtype]
    spec = PrefillAttnSpec(H, KV, D, page_size, D ** -0.5, window=window, causal=causal, dtype=dtype, ws=ws,
                           origin="test")
    meta = K.render(K.prefill_for_device(spec, DEV)).meta
    assert meta["variant"] == "sm90" and meta["ws"] == ws
    ctx, new = [0, 5, 300, 0, 64, 1000, 129], [37, 64, 1, 519, 3, 130, 128]
    kv_lens = [a + b for a, b in zip(ctx, new)]
    tables, pages = paged_layout(kv_lens, page_size)
    kc = torch.randn(pages, KV, page_size, D, device=DEV).to(dt)
    vc = torch.randn(pages, KV, page_size, D, device=DEV).to(dt)
    T = sum(new)
    q = (torch.randn(T, H * D, device=DEV) * 2).to(dt)  # peaked softmax rows too
    out = nan_like((T, H * D), dt)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    K.prefill_attention(spec, q, kc, vc, tables, cu, torch.tensor(kv_lens, dtype=torch.int32, device=DEV),
                        out, max_q_len=max(new))
    for s, (c, n) in enumerate(zip(ctx, new)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        ref = attention_ref(q[rows].view(n, H, D), gather(kc, tables[s], c + n, page_size),
                            gather(vc, tables[s], c + n, page_size), torch.arange(c, c + n, device=DEV),
                            spec.scale, window, 0.0, causal=causal)
        assert rel_err(out[rows].view(n, H, D), ref) <= TOL[dtype], f"sequence {s} (context {c}, new {n})"


@pytest.mark.parametrize("ws", [False, True], ids=["sm90", "sm90ws"])
def test_prefill_hopper_matches_sdpa_at_bench_shape(ws):
    """8 x 1024 causal, Llama-3-8B heads: the shape codegen/bench_kernels.py times, against torch SDPA."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma prefill kernel is for Hopper GPUs")
    S, L, H, KV, D, P = 8, 1024, 32, 8, 128, 16
    spec = PrefillAttnSpec(H, KV, D, P, D ** -0.5, ws=ws, origin="test")
    kc = torch.randn(S * L // P, KV, P, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.randperm(S * L // P, device=DEV).int().view(S, L // P)
    q = torch.randn(S * L, H * D, device=DEV, dtype=torch.bfloat16)
    out = nan_like(q.shape, torch.bfloat16)
    cu = torch.arange(0, S * L + 1, L, dtype=torch.int32, device=DEV)
    K.prefill_attention(spec, q, kc, vc, tables, cu, torch.full((S,), L, dtype=torch.int32, device=DEV), out, L)
    kd = kc[tables.long()].permute(0, 2, 1, 3, 4).reshape(S, KV, L, D)  # [S, KV, L, D]
    vd = vc[tables.long()].permute(0, 2, 1, 3, 4).reshape(S, KV, L, D)
    qd = q.view(S, L, H, D).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
    assert rel_err(out.view(S, L, H, D).transpose(1, 2), ref) <= 1e-2


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("case", [(32, 8, 128, 0, True), (16, 2, 128, 100, True), (8, 8, 64, 0, True),
                                  (32, 8, 128, 0, False)])
def test_prefill_hopper_linear_grid(kv_fp8, case):
    """The linear grid (kernels.prefill_attention's `linear`, KILN_PREFILL_LINEAR) as a CUDA graph's bucket launches
    it: max_q_len the bucket's 2,048 tokens, 40 sequences (past 32: the tile search's second warp round), some
    with no queries (a bucket's padding, last, and one between), chunks after cached context. Equal to the 3-D grid
    with the real max_q_len, to the bit (the same tiles, other blocks), and to the reference."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma prefill kernel is for Hopper GPUs")
    H, KV, D, window, causal = case
    dt, page_size = torch.bfloat16, 16
    spec = PrefillAttnSpec(H, KV, D, page_size, D ** -0.5, window=window, causal=causal, kv_fp8=kv_fp8, origin="test")
    rng = torch.Generator().manual_seed(7)
    new = [int(n) for n in torch.randint(1, 160, (37,), generator=rng)]
    new[5], new[20] = 0, 700
    ctx = [int(c) for c in torch.randint(0, 300, (37,), generator=rng)]
    new, ctx = new + [0, 0, 0], ctx + [0, 0, 0]  # padding sequences: no queries, no context
    kv_lens = [a + b for a, b in zip(ctx, new)]
    tables, pages = paged_layout(kv_lens, page_size)
    kc, kf, vc, vf, scales = kv_pages((pages, KV, page_size, D), kv_fp8, dt)
    T = sum(new)
    q = (torch.randn(T, H * D, device=DEV) * 2).to(dt)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    outs = []
    for linear, bound in ((False, max(new)), (True, 2048)):
        out = nan_like((T, H * D), dt)
        K.prefill_attention(spec, q, kc, vc, tables, cu, lens, out, max_q_len=bound, splits=1, linear=linear,
                            **scales)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]), "the linear grid's output differs from the 3-D grid's"
    for s, (c, n) in enumerate(zip(ctx, new)):
        if n:
            rows = slice(int(cu[s]), int(cu[s + 1]))
            ref = attention_ref(q[rows].view(n, H, D), gather(kf, tables[s], c + n, page_size),
                                gather(vf, tables[s], c + n, page_size), torch.arange(c, c + n, device=DEV),
                                spec.scale, window, 0.0, causal=causal)
            assert rel_err(outs[1][rows].view(n, H, D), ref) <= TOL["bf16"], f"sequence {s} ({c} + {n})"


# heads, kv_heads, head_dim, window, causal: Llama-3-8B's heads, a sliding window, MHA at head_dim 64,
# a non-causal one
SPLIT_CASES = [(32, 8, 128, 0, True), (16, 2, 128, 300, True), (8, 8, 64, 0, True), (32, 8, 128, 0, False)]


def _split_prefill_check(case, page_size: int, ctx: list[int], new: list[int], splits, bound=None, calls: int = 1):
    """bf16 pages of sequences with ctx[i] cached and new[i] new tokens through the wgmma prefill kernel at
    `splits` (max_context `bound`), `calls` times with fresh queries: each sequence's rows against the reference."""
    H, KV, D, window, causal = case
    dt = torch.bfloat16
    spec = PrefillAttnSpec(H, KV, D, page_size, D ** -0.5, window=window, causal=causal, origin="test")
    kv_lens = [a + b for a, b in zip(ctx, new)]
    tables, pages = paged_layout(kv_lens, page_size)
    kc = torch.randn(pages, KV, page_size, D, device=DEV).to(dt)
    vc = torch.randn(pages, KV, page_size, D, device=DEV).to(dt)
    T = sum(new)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    for call in range(calls):
        q = (torch.randn(T, H * D, device=DEV) * 2).to(dt)
        out = nan_like((T, H * D), dt)
        K.prefill_attention(spec, q, kc, vc, tables, cu, lens, out, max_q_len=max(new), max_context=bound,
                            splits=splits)
        for s, (c, n) in enumerate(zip(ctx, new)):
            if n == 0:
                continue
            rows = slice(int(cu[s]), int(cu[s + 1]))
            ref = attention_ref(q[rows].view(n, H, D), gather(kc, tables[s], c + n, page_size),
                                gather(vc, tables[s], c + n, page_size), torch.arange(c, c + n, device=DEV),
                                spec.scale, window, 0.0, causal=causal)
            assert rel_err(out[rows].view(n, H, D), ref) <= TOL["bf16"], f"call {call}, sequence {s} ({c} + {n})"


@pytest.mark.parametrize("splits", [1, 2, 7, 16, None], ids=lambda x: f"splits{x or '_auto'}")
@pytest.mark.parametrize("case", SPLIT_CASES)
@pytest.mark.parametrize("page_size", [16, 7])
def test_prefill_hopper_split_kv(splits, case, page_size):
    """Issue #16: split-KV in the wgmma kernel. Short queries after long cached contexts (no multiple
    of the tile or page): a prompt after a 2,000-token prefix, speculative verification (5 queries),
    a single query, a chunk; padding sequences with no queries and no context; a launch bound 3x
    the longest context (the splits then outnumber a short context's tiles: empty splits are
    neutral). Splits forced to 1 (the plain kernel), 2, 7, 16, and the modeled count. Twice: the
    scratch is fresh per launch, nothing carries over."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma prefill kernel is for Hopper GPUs")
    ctx, new = [2000, 0, 777, 1234, 0, 130, 4095], [32, 0, 5, 1, 0, 61, 17]
    _split_prefill_check(case, page_size, ctx, new, splits, bound=3 * max(a + b for a, b in zip(ctx, new)), calls=2)


@pytest.mark.parametrize("splits", [1, 3], ids=lambda x: f"splits{x}")
@pytest.mark.parametrize("case", [(32, 8, 128, 0, True), (8, 2, 64, 0, True), (12, 4, 64, 37, True)])
def test_prefill_hopper_split_kv_many_q_tiles(splits, case):
    """The bf16 split-KV form on the shapes its fp8 twin failed on (session 22: causal sequences past one key tile,
    several q tiles each): a 519-token prompt, 128 after 129 cached, 130 after 1,000; beside short ones. At head dim
    128, 129 + 128 was 0.46 off (session 24: rows every key of a split masks, whose rescale factor came out inf;
    tests/test_softmax_rescale_sass.py)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma prefill kernel is for Hopper GPUs")
    _split_prefill_check(case, 16, [0, 5, 300, 0, 64, 1000, 129], [37, 64, 1, 519, 3, 130, 128], splits)


def test_prefill_hopper_split_kv_matches_plain_at_bench_shape():
    """The issue's shape (32 new tokens after 2,000 cached, Llama-3-8B heads): the modeled split
    count splits it, and matches both the plain kernel (splits=1) and torch SDPA."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma prefill kernel is for Hopper GPUs")
    H, KV, D, P, n, c = 32, 8, 128, 16, 32, 2000
    spec = PrefillAttnSpec(H, KV, D, P, D ** -0.5, origin="test")
    L = c + n
    tables, pages = paged_layout([L], P)
    kc = torch.randn(pages, KV, P, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(n, H * D, device=DEV, dtype=torch.bfloat16)
    cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    lens = torch.tensor([L], dtype=torch.int32, device=DEV)
    meta = K.render(K.prefill_for_device(spec, DEV)).meta
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    assert K.prefill_splits(meta, KV * meta["chunks"], 4096, sms) > 1  # 8 blocks alone: split
    outs = {}
    for splits in (1, None):
        outs[splits] = nan_like(q.shape, torch.bfloat16)
        K.prefill_attention(spec, q, kc, vc, tables, cu, lens, outs[splits], n, max_context=4096, splits=splits)
    kd, vd = gather(kc, tables[0], L, P)[None], gather(vc, tables[0], L, P)[None]  # [1, KV, L, D]
    qd = q.view(1, n, H, D).transpose(1, 2)
    mask = torch.arange(L, device=DEV)[None, :] <= torch.arange(c, L, device=DEV)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)
    for splits, o in outs.items():
        assert rel_err(o.view(1, n, H, D).transpose(1, 2), ref) <= 1e-2, f"splits={splits}"
    assert rel_err(outs[None], outs[1]) <= 1e-2


def test_prefill_not_causal():
    spec = PrefillAttnSpec(8, 2, 64, 16, 0.125, causal=False, dtype="fp32", origin="test")
    n = [19, 40]
    tables, pages = paged_layout(n, 16)
    kc, vc = torch.randn(pages, 2, 16, 64, device=DEV), torch.randn(pages, 2, 16, 64, device=DEV)
    q = torch.randn(sum(n), 8 * 64, device=DEV)
    out = nan_like(q.shape, torch.float32)
    cu = torch.tensor([0, 19, 59], dtype=torch.int32, device=DEV)
    K.prefill_attention(spec, q, kc, vc, tables, cu, torch.tensor(n, dtype=torch.int32, device=DEV), out, 40)
    for s in range(2):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        ref = attention_ref(q[rows].view(-1, 8, 64), gather(kc, tables[s], n[s], 16),
                            gather(vc, tables[s], n[s], 16), torch.arange(n[s], device=DEV), 0.125, 0, 0, causal=False)
        assert rel_err(out[rows].view(-1, 8, 64), ref) <= 1e-5


# ---- activations, embedding, softcap -------------------------------------------------------

ACTS = {
    "silu": torch.nn.functional.silu, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kind", list(ACTS))
@pytest.mark.parametrize("gated, F, T, two_inputs", [
    (True, 14336, 9, False), (True, 1000, 77, True), (False, 3072, 13, False), (False, 12, 5, False),
])
def test_activation(dtype, kind, gated, F, T, two_inputs):
    dt = DT[dtype]
    spec = ActSpec(kind, gated, F, dtype=dtype, origin="test")
    out = nan_like((T, F), dt)
    if gated:
        x = torch.randn(T, 2 * F, device=DEV).to(dt) * 3
        if two_inputs:
            gate, up = x[:, :F].contiguous(), x[:, F:].contiguous()
            K.activation(spec, out, gate=gate, up=up)
        else:
            K.activation(spec, out, x=x)
        ref = ACTS[kind](x[:, :F].double()) * x[:, F:].double()
    else:
        x = torch.randn(T, F, device=DEV).to(dt) * 3
        K.activation(spec, out, x=x)
        ref = ACTS[kind](x.double())
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("unroll", [4, 3, 1])  # the unrolled variants and the default loop (1)
@pytest.mark.parametrize("gated, F, T", [(True, 14336, 1), (True, 14336, 301), (True, 11, 4099),
                                         (False, 3072, 2049), (True, 1000, 8192)])
def test_activation_unrolled(unroll, gated, F, T):
    """The unrolled grid-stride loop: vector counts that are not a multiple of the grid's stride, rows
    whose vectors straddle a stride step (F = 11: 1-element vectors), a grid smaller than the work."""
    spec = ActSpec("silu", gated, F, unroll=unroll, variant="flat", origin="test")
    dt = torch.bfloat16
    out = nan_like((T, F), dt)
    x = torch.randn(T, 2 * F if gated else F, device=DEV).to(dt) * 3
    K.activation(spec, out, x=x)
    ref = ACTS["silu"](x[:, :F].double()) * (x[:, F:].double() if gated else 1.0)
    assert rel_err(out, ref) <= TOL["bf16"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_embed(dtype):
    dt = DT[dtype]
    V, Hd, T = 1031, 768, 29
    spec = EmbedSpec(V, Hd, dtype=dtype, origin="test")
    table = torch.randn(V, Hd, device=DEV).to(dt)
    tokens = torch.randint(0, V, (T,), device=DEV)
    tokens[3] = V + 5  # out of range: a zero row, never a fault
    out = nan_like((T, Hd), dt)
    K.embed(spec, tokens, table, out)
    ok = tokens < V
    ref = torch.zeros(T, Hd, dtype=torch.float64, device=DEV)
    ref[ok] = table[tokens[ok]].double()
    assert rel_err(out, ref) <= TOL[dtype]
    assert (out[3] == 0).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(4, 32000), (3, 50257), (1, 7)])
def test_map_softcap(dtype, shape):
    dt = DT[dtype]
    spec = MapSpec("map_softcap.cu.j2", (("cap", 30.0), ("inv_cap", 1 / 30.0)), dtype=dtype, origin="test")
    x = (torch.randn(*shape, device=DEV) * 40).to(dt)
    ref = 30.0 * torch.tanh(x.double() / 30.0)
    out = nan_like(shape, dt)
    K.map_elementwise(spec, x, out)
    assert rel_err(out, ref) <= TOL[dtype]
    K.map_elementwise(spec, x)  # in place
    assert rel_err(x, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_map_scale_equals_torch_scalar_multiply(dtype):
    dt = DT[dtype]
    spec = MapSpec("map_scale.cu.j2", (("factor", 0.0883883),), dtype=dtype, origin="test")
    x = (torch.randn(5, 1001, device=DEV) * 7).to(dt)
    out = nan_like((5, 1001), dt)
    K.map_elementwise(spec, x, out)
    assert torch.equal(out, x * float(torch.tensor(0.0883883, dtype=torch.float32)))  # one float32 multiply


# ---- a decode step in a CUDA graph ---------------------------------------------------------

def test_decode_step_captures_in_cuda_graph():
    H, KV, D, P, B = 32, 8, 128, 16, 4
    rope_spec = RopeCacheSpec(H, KV, D, D, P, theta=500000.0, origin="test")
    attn = DecodeAttnSpec(H, KV, D, P, D ** -0.5, origin="test")
    max_ctx = 256
    tables, pages = paged_layout([max_ctx] * B, P)
    kc = torch.randn(pages, KV, P, D, device=DEV).bfloat16()
    vc = torch.randn(pages, KV, P, D, device=DEV).bfloat16()
    # persistent inputs, refilled before each replay
    qkv = torch.empty(B, (H + 2 * KV) * D, device=DEV, dtype=torch.bfloat16)
    pos = torch.empty(B, dtype=torch.int64, device=DEV)
    lens = torch.empty(B, dtype=torch.int32, device=DEV)
    slots = torch.empty(B, dtype=torch.int32, device=DEV)
    w_out = torch.randn(H * D, 1000, device=DEV).bfloat16()
    out = torch.empty(B, H * D, device=DEV, dtype=torch.bfloat16)
    scratch = K.decode_scratch(attn, B, max_ctx, DEV)
    tok = torch.empty(B, dtype=torch.int64, device=DEV)

    def step():
        q, k, v = qkv[:, : H * D], qkv[:, H * D : (H + KV) * D], qkv[:, (H + KV) * D :]
        K.rope_write_kv(rope_spec, q, k, v, pos, slots, kc, vc)
        K.paged_decode_attention(attn, q, kc, vc, tables, lens, out, scratch, max_context=max_ctx)
        torch.argmax((out @ w_out).float(), dim=-1, out=tok)

    def refill(seed):
        g = torch.Generator(device=DEV).manual_seed(seed)
        qkv.copy_(torch.randn(qkv.shape, device=DEV, generator=g))
        pos.copy_(torch.randint(10, max_ctx - 1, (B,), device=DEV, generator=g))
        lens.copy_((pos + 1).int())
        slots.copy_(K.slot_mapping(tables, torch.arange(B, device=DEV), pos, P))

    refill(0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: load modules, cuBLAS handles
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2):
        refill(seed)
        kc0, vc0 = kc.clone(), vc.clone()
        graph.replay()
        got_out, got_tok = out.clone(), tok.clone()
        kc.copy_(kc0), vc.copy_(vc0)
        refill(seed)
        step()
        assert torch.equal(got_out, out) and torch.equal(got_tok, tok)


# ---- FP8 KV cache (E4M3 pages of K / k_scale, V / v_scale) ---------------------------------------

def fp8_pages(shape, scale):
    """Random E4M3 pages as KVStore.store writes them (values / scale, clamped, rounded), and their
    values as KVStore.load reads them back (x scale): what the reference attention sees."""
    from kiln.runtime.kv_store import KVStore
    x = torch.randn(shape, device=DEV) * 3
    q = (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, KVStore.load(q, scale)


def kv_pages(shape, kv_fp8: bool, dt):
    """(k_cache, k values, v_cache, v values, the kernel's scale arguments): random K / V pages of `shape`,
    E4M3 with k_scale 0.05 and v_scale 0.02 (fp8_pages) or of dtype dt (the values are the pages)."""
    if kv_fp8:
        kc, kf = fp8_pages(shape, 0.05)
        vc, vf = fp8_pages(shape, 0.02)
        return kc, kf, vc, vf, dict(k_scale=0.05, v_scale=0.02)
    kc = torch.randn(*shape, device=DEV).to(dt)
    vc = torch.randn(*shape, device=DEV).to(dt)
    return kc, kc, vc, vc, {}


# heads, kv_heads, head_dim, window, softcap, alibi_max: Llama-3-8B's group; head_dim 64; window +
# softcap; a 32-head group with ALiBi; head_dim 96 (tensor cores, 3-word fragments); head_dim 48 (the
# CUDA-core kernel: not a multiple of 32)
FP8_CASES = [(32, 8, 128, 0, 0.0, 0.0), (8, 2, 64, 0, 0.0, 0.0), (12, 4, 64, 37, 30.0, 0.0),
             (32, 1, 128, 0, 0.0, 8.0), (16, 4, 96, 0, 0.0, 0.0), (8, 2, 48, 0, 0.0, 0.0)]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", FP8_CASES)
@pytest.mark.parametrize("page_size", [16, 7, 32])
def test_fp8_kv_decode(dtype, case, page_size):
    H, KV, D, window, cap, ali = case
    dt = DT[dtype]
    ks, vs = 0.05, 0.02  # v_scale saturates a few values (|x| > 448 * scale): both sides clamp alike
    spec = DecodeAttnSpec(H, KV, D, page_size, D ** -0.5, window=window, softcap=cap, alibi_max=ali, dtype=dtype,
                          kv_fp8=True, origin="test")
    ctx = [1, 17, 100, 513, 2049, 33, 5000]
    B = len(ctx)
    tables, pages = paged_layout(ctx, page_size)
    kc, kf = fp8_pages((pages, KV, page_size, D), ks)
    vc, vf = fp8_pages((pages, KV, page_size, D), vs)
    scratch = K.decode_scratch(spec, B, max(ctx), DEV)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    for call in range(2):  # the fused split merge leaves its counters ready for the next launch
        q = torch.randn(B, H * D, device=DEV).to(dt)
        out = nan_like((B, H * D), dt)
        K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, scratch, max_context=max(ctx),
                                 k_scale=ks, v_scale=vs)
        for b, n in enumerate(ctx):
            ref = attention_ref(q[b].view(1, H, D), gather(kf, tables[b], n, page_size),
                                gather(vf, tables[b], n, page_size), torch.tensor([n - 1], device=DEV),
                                spec.scale, window, cap, alibi_max=ali)
            assert rel_err(out[b].view(1, H, D), ref) <= TOL[dtype], f"call {call}, sequence {b} (context {n})"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", FP8_CASES)
def test_fp8_kv_decode_with_cvt_equals_integer_conversion(dtype, case, monkeypatch):
    """KILN_E4M3_CVT=1 (fp8.cuh.j2: E4M3 to fp16 by cvt.rn.f16x2.e4m3x2, the pairs' unit moved into the scales):
    the same bits as the integer conversion, every kernel shape and dtype of test_fp8_kv_decode."""
    from kiln.codegen import render as R

    H, KV, D, window, cap, ali = case
    dt = DT[dtype]
    ks, vs = 0.05, 0.02
    ctx = [1, 17, 100, 513, 2049]
    B = len(ctx)
    tables, pages = paged_layout(ctx, 16)
    kc, _ = fp8_pages((pages, KV, 16, D), ks)
    vc, _ = fp8_pages((pages, KV, 16, D), vs)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(B, H * D, device=DEV).to(dt)
    outs = []
    for on in ("0", "1"):  # distinct origins: distinct specs, so each renders and loads its own kernel
        monkeypatch.setattr(R, "E4M3_CVT", on)
        spec = DecodeAttnSpec(H, KV, D, 16, D ** -0.5, window=window, softcap=cap, alibi_max=ali, dtype=dtype,
                              kv_fp8=True, origin=f"test e4m3 cvt {on}")
        assert ("render.E4M3_CVT: on here" in R.render(spec).source) == (on == "1")
        out = nan_like((B, H * D), dt)
        K.paged_decode_attention(spec, q, kc, vc, tables, lens, out, K.decode_scratch(spec, B, max(ctx), DEV),
                                 max_context=max(ctx), k_scale=ks, v_scale=vs)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", FP8_CASES)
@pytest.mark.parametrize("page_size", [16, 7])
def test_fp8_kv_prefill(dtype, case, page_size):
    from kiln.codegen import render as R
    H, KV, D, window, cap, ali = case
    dt = DT[dtype]
    ks, vs = 0.05, 0.02
    spec = PrefillAttnSpec(H, KV, D, page_size, D ** -0.5, window=window, softcap=cap, alibi_max=ali, dtype=dtype,
                           kv_fp8=True, origin="test")
    if dtype != "fp32":  # wgmma on fp8 pages only with KILN_PREFILL_FP8_SM90=1 (test_fp8_kv_prefill_wgmma)
        want = "sm90" if R.PREFILL_FP8_SM90 == "1" and R.prefill_variant(K.prefill_for_device(spec, DEV)) == "sm90" \
            else "mma"
        assert K.render(K.prefill_for_device(spec, DEV)).meta["variant"] == want
    ctx, new = [0, 5, 100, 0, 64], [37, 64, 1, 130, 3]
    kv_lens = [a + b for a, b in zip(ctx, new)]
    tables, pages = paged_layout(kv_lens, page_size)
    kc, kf = fp8_pages((pages, KV, page_size, D), ks)
    vc, vf = fp8_pages((pages, KV, page_size, D), vs)
    T = sum(new)
    q = torch.randn(T, H * D, device=DEV).to(dt)
    out = nan_like((T, H * D), dt)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    K.prefill_attention(spec, q, kc, vc, tables, cu, torch.tensor(kv_lens, dtype=torch.int32, device=DEV),
                        out, max_q_len=max(new), k_scale=ks, v_scale=vs)
    for s, (c, n) in enumerate(zip(ctx, new)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        ref = attention_ref(q[rows].view(n, H, D), gather(kf, tables[s], c + n, page_size),
                            gather(vf, tables[s], c + n, page_size), torch.arange(c, c + n, device=DEV),
                            spec.scale, window, cap, alibi_max=ali)
        assert rel_err(out[rows].view(n, H, D), ref) <= TOL[dtype], f"sequence {s}"


# heads, kv_heads, head_dim, window, causal (the wgmma kernel's cases: no softcap or ALiBi)
FP8_HOPPER_CASES = [(32, 8, 128, 0, True), (8, 2, 64, 0, True), (16, 2, 128, 100, True), (12, 4, 64, 37, True),
                    (32, 8, 128, 0, False)]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("case", FP8_HOPPER_CASES)
@pytest.mark.parametrize("page_size", [16, 7])
def test_fp8_kv_prefill_wgmma(dtype, case, page_size, monkeypatch):
    """KILN_PREFILL_FP8_SM90=1: the wgmma prefill kernel on fp8 pages (each tile's bytes copied, then converted
    exactly in shared memory; k_scale in the score scale, v_scale in the output) against the reference on the
    pages' values and against the mma kernel on the same pages. Fresh prompts, chunks after cached context, a
    single query, lengths that are no multiple of the tile or page, more tiles than its 2 stages; twice, so
    nothing carries over between launches. Its split-KV form too, forced to 3 splits (0.48-0.73 off on the H200
    in session 22; the masked rows' rescale factor fixed in session 24, tests/test_softmax_rescale_sass.py)."""
    from kiln.codegen import render as R
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma prefill kernel is for Hopper GPUs")
    H, KV, D, window, causal = case
    dt = DT[dtype]
    ks, vs = 0.05, 0.02
    specs = {}
    for on in ("1", "0"):  # distinct origins: distinct specs, each rendered with its own switch value
        monkeypatch.setattr(R, "PREFILL_FP8_SM90", on)
        spec = PrefillAttnSpec(H, KV, D, page_size, D ** -0.5, window=window, causal=causal, dtype=dtype,
                               kv_fp8=True, origin=f"test fp8 wgmma {on}")
        specs[on] = spec
        assert K.render(K.prefill_for_device(spec, DEV)).meta["variant"] == ("sm90" if on == "1" else "mma")
    ctx, new = [0, 5, 300, 0, 64, 1000, 129], [37, 64, 1, 519, 3, 130, 128]
    kv_lens = [a + b for a, b in zip(ctx, new)]
    tables, pages = paged_layout(kv_lens, page_size)
    kc, kf = fp8_pages((pages, KV, page_size, D), ks)
    vc, vf = fp8_pages((pages, KV, page_size, D), vs)
    T = sum(new)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    for call in range(2):
        q = (torch.randn(T, H * D, device=DEV) * 2).to(dt)
        outs = {}
        for key, on, splits in (("1", "1", None), ("0", "0", None), ("1 split", "1", 3)):
            outs[key] = nan_like((T, H * D), dt)
            # `splits` None: the launch's own choice (kernels.PREFILL_AUTO_SPLIT)
            K.prefill_attention(specs[on], q, kc, vc, tables, cu, lens, outs[key], max_q_len=max(new), k_scale=ks,
                                v_scale=vs, max_context=8192, splits=splits)
        for s, (c, n) in enumerate(zip(ctx, new)):
            rows = slice(int(cu[s]), int(cu[s + 1]))
            ref = attention_ref(q[rows].view(n, H, D), gather(kf, tables[s], c + n, page_size),
                                gather(vf, tables[s], c + n, page_size), torch.arange(c, c + n, device=DEV),
                                specs["1"].scale, window, 0.0, causal=causal)
            mma = outs["0"][rows].view(n, H, D).float()
            for key in ("1", "1 split"):
                got = outs[key][rows].view(n, H, D)
                assert rel_err(got, ref) <= TOL[dtype], f"{key}: call {call}, sequence {s} (context {c}, new {n})"
                assert rel_err(got, mma) <= TOL[dtype], f"{key}: sequence {s} against mma"


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.004, 0.003)])  # the second saturates (|x| > 448 * scale)
def test_fp8_rope_write_kv(dtype, case, scales):
    """K rotated then written as fp8, V written as fp8: V's bytes equal KVStore.store's exactly (the
    same division and round-to-nearest-even); K's values match the rotated reference to fp8 precision."""
    from kiln.runtime.kv_store import KVStore
    c = ROPE_CASES[case]
    dt, P = DT[dtype], 16
    ks, vs = scales
    spec = RopeCacheSpec(page_size=P, dtype=dtype, kv_fp8=True, origin="test", **c)
    H, KV, D, rot = spec.heads, spec.kv_heads, spec.head_dim, spec.rotary_dim
    ctx, new = [0, 3, 700, 31], [17, 1, 1, 40]
    tables, pages = paged_layout([a + b for a, b in zip(ctx, new)], P)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(new)]).to(DEV)
    pos = torch.cat([torch.arange(a, a + b) for a, b in zip(ctx, new)]).to(DEV)
    T = pos.shape[0]
    slots = K.slot_mapping(tables, seq, pos, P)
    qkv = torch.randn(T, (H + 2 * KV) * D, device=DEV).to(dt)
    q, k, v = qkv[:, : H * D], qkv[:, H * D : (H + KV) * D], qkv[:, (H + KV) * D :]
    k0, v0 = k.clone(), v.clone()
    kc = torch.zeros(pages, KV, P, D, dtype=torch.float8_e4m3fn, device=DEV)
    vc = torch.zeros_like(kc)
    seq_len = torch.tensor([int(pos.max()) + 1], dtype=torch.int32, device=DEV)
    K.rope_write_kv(spec, q, k, v, pos, slots, kc, vc, seq_len=seq_len, k_scale=ks, v_scale=vs)
    s = slots.long()
    v_want = KVStore.store(None, vc, vs, v0.view(T, KV, D))
    assert torch.equal(vc[s // P, :, s % P].view(torch.uint8), v_want.view(torch.uint8))
    freq = rope.step_inv_freq(spec, int(seq_len)) if rot else None
    k_ref = rotate_ref(k0.view(T, KV, D), pos, freq, rot, spec.layout, spec.attention_factor)
    k_ref = (k_ref / ks).clamp(-448, 448) * ks  # what saturation leaves
    assert rel_err(KVStore.load(kc[s // P, :, s % P], ks), k_ref) <= 0.05  # E4M3: 3 mantissa bits (~0.03 rms)
