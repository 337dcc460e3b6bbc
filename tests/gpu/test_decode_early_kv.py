"""render.EARLY_KV (KILN_DECODE_EARLY_KV=1) on a GPU: the tensor-core decode attention kernel, launched as a
programmatic dependent of the qkv GEMV that rotates and writes the new token's K/V (codegen/gemv.py gemv_rope),
copies the cached tokens before its griddepcontrol.wait and reads the new token's row again after it
(templates/decode_attn_mma.cu.j2). Here each replay of a CUDA graph first poisons the new tokens' cache rows
(NaN, or E4M3's NaN byte), then runs the GEMV (its early trigger lets the attention start while it runs) and the
attention; another stream's GEMMs shift the timing from replay to replay. The early kernel's output must equal,
bit for bit, the same graph's with the wait at the kernel's entry (the same arithmetic in the same order), and
that one the float64 reference. A row copied before the GEMV wrote it and not read again would show as NaN.
tests/test_pdl_order.py checks the machine code: before the wait only the cache copies and the page table."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import gemv as G  # noqa: E402
from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen import render as render_mod  # noqa: E402
from kiln.codegen.bench_kernels import Graphed  # noqa: E402
from kiln.codegen.specs import DecodeAttnSpec, RopeCacheSpec  # noqa: E402

from tests.gpu.test_kernels import TOL, attention_ref, gather, paged_layout, rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
H, KV, D, P = 32, 8, 128, 16
REPLAYS = 24
K_SCALE, V_SCALE = 0.05, 0.04


def _graph(early: str, dtype: str, kv_fp8: bool, ctx: list[int], tables, x, w, cache0):
    """A graph of poison -> qkv GEMV with the rotary + KV write -> decode attention (programmatic dependents),
    with render.EARLY_KV = early: (the graph, called to replay it; out, q, k cache, v cache, the other tensors
    it reads)."""
    tag = f"early-kv-test {early} {dtype} fp8={kv_fp8}"  # distinct origins: each setting renders its own kernels
    rope = RopeCacheSpec(H, KV, D, D, P, theta=500000.0, dtype=dtype, kv_fp8=kv_fp8)
    gspec = G.spec_for(w.shape[0], w.shape[1], dtype, False, tag, epilogue=rope, halves=(0, H * D, (H + KV) * D))
    dspec = DecodeAttnSpec(H, KV, D, P, D ** -0.5, dtype=dtype, kv_fp8=kv_fp8, origin=tag)
    saved = render_mod.EARLY_KV
    render_mod.EARLY_KV = early  # read when the kernel is first rendered (decode_scratch renders it for its sizes)
    try:
        B = len(ctx)
        kc, vc = (c.clone() for c in cache0)
        pos = torch.tensor([n - 1 for n in ctx], dtype=torch.int64, device="cuda")
        page = tables[torch.arange(B, device="cuda"), pos // P].long()
        slots = (page * P + pos % P).int()
        off = (pos % P).long()
        lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
        q = torch.empty(B, H * D, device="cuda", dtype=DT[dtype])
        out = torch.empty_like(q)
        scratch = K.decode_scratch(dspec, B, max(ctx), "cuda")
        # garbage for the new tokens' rows until the GEMV writes them: E4M3's NaN byte, or NaN (device scalars:
        # a graph cannot capture a copy from the host)
        poison = torch.full((), 0x7F if kv_fp8 else float("nan"), device="cuda",
                            dtype=torch.uint8 if kv_fp8 else DT[dtype])

        def run():
            for c in (kc, vc):  # every kv head's row of each new token
                (c.view(torch.uint8) if kv_fp8 else c)[page, :, off] = poison
            G.gemv_rope(gspec, x, w, q, pos, slots, kc, vc, k_scale=K_SCALE, v_scale=V_SCALE, pdl=True)
            K.paged_decode_attention(dspec, q, kc, vc, tables, lens, out, scratch, max(ctx), k_scale=K_SCALE,
                                     v_scale=V_SCALE, pdl=True)

        graph = Graphed(run, calls=1)  # its warm-up renders and loads the kernels with the setting above
        src = K.render(dspec).source
    finally:
        render_mod.EARLY_KV = saved
    assert ("int fresh_j" in src) == (early == "1")  # the kernel as rendered: early copies or not
    # the graph holds raw pointers: every tensor it reads that was made outside the capture stays referenced
    keep = (pos, page, slots, off, lens, scratch, poison)
    return graph, out, q, kc, vc, keep


@pytest.mark.parametrize("ctx", [[1024], [1, 17, 100, 1000], [16, 33, 4096]], ids=["b1", "b4", "b3-long"])
@pytest.mark.parametrize("dtype,kv_fp8", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_early_kv_copies_equal_the_wait_at_entry_under_load(dtype, kv_fp8, ctx):
    dt = DT[dtype]
    tables, pages = paged_layout(ctx, P)
    x = torch.randn(len(ctx), 4096, device="cuda").to(dt)
    w = (torch.randn((H + 2 * KV) * D, 4096, device="cuda") / 64).to(dt)
    if kv_fp8:
        cache0 = [(torch.randn(pages, KV, P, D, device="cuda") * 2).to(torch.float8_e4m3fn) for _ in range(2)]
    else:
        cache0 = [torch.randn(pages, KV, P, D, device="cuda").to(dt) for _ in range(2)]
    plain = _graph("0", dtype, kv_fp8, ctx, tables, x, w, cache0)
    early = _graph("1", dtype, kv_fp8, ctx, tables, x, w, cache0)
    load_a = torch.randn(8192, 8192, device="cuda").bfloat16()
    load_b = torch.empty_like(load_a)
    busy = torch.cuda.Stream()
    for i in range(REPLAYS):
        plain[0]()
        want = plain[1].clone()
        busy.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(busy):  # another stream's GEMMs beside the replay: blocks scheduled late
            for _ in range(i % 3):
                torch.matmul(load_a, load_a, out=load_b)
        early[0]()
        got = early[1].clone()
        torch.cuda.current_stream().wait_stream(busy)
        assert not want.isnan().any(), f"replay {i}: the plain kernel read a poisoned row"
        assert torch.equal(got, want), f"replay {i}: the early copies differ from the wait at entry"
    # and the plain graph is right: its caches as the GEMV left them, against float64
    _, out, q, kc, vc, _ = plain
    scale_k, scale_v = (K_SCALE, V_SCALE) if kv_fp8 else (1.0, 1.0)
    for b, n in enumerate(ctx):
        k = gather(kc, tables[b], n, P).float() * scale_k
        v = gather(vc, tables[b], n, P).float() * scale_v
        ref = attention_ref(q[b].float().view(1, H, D), k, v, torch.tensor([n - 1], device="cuda"), D ** -0.5, 0,
                            0.0)
        assert rel_err(out[b].view(1, H, D), ref) <= TOL[dtype], f"sequence {b} (context {n})"
