"""Issue #12 item 2 / #18 on a GPU: the decode GEMV with the step before it in its prologue
(codegen/gemv.py gemv_prologue) against that step's own kernel then the GEMV, and against torch; and the
cuda backend's decode logits (CUDA graphs, llama and mamba2, fp32 and bf16) with the fusion on
(runtime/cuda_backend.GEMV_PROLOGUE, KILN_GEMV_PROLOGUE) against it off and against the reference backend.
Outputs are poisoned (NaN) first so an unwritten element fails."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import gemv as G  # noqa: E402
from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen.launch import _loaded  # noqa: E402
from kiln.codegen.specs import ActSpec, NormSpec  # noqa: E402
from kiln.runtime import cuda_backend  # noqa: E402
from kiln.runtime.batch import SeqSlice, StepBatch  # noqa: E402
from kiln.runtime.kv_store import KVStore  # noqa: E402
from kiln.runtime.state_cache import StateStore  # noqa: E402

from tests.configs import FAMILY_CONFIGS as FAMILIES  # noqa: E402
from tests.gpu.test_cuda_backend import LLAMA, pair  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (n, k) of the GEMM after the step: Llama-3-8B qkv / gate+up / down, Mamba-2 2.7B in_proj / out_proj, odd ones
NORM_SHAPES = [(6144, 4096), (28672, 4096), (10576, 2560), (100, 200), (33, 1000), (8, 64)]
GATED_SHAPES = [(2560, 5120, 5120), (80, 256, 64), (33, 1000, 200)]  # (n, k, group)
ACT_SHAPES = [(4096, 14336), (100, 200), (8, 64)]


def _tol(dtype):
    return 1e-5 if dtype == "fp32" else 2e-2


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _strided(T, k, dt, pad=8):
    """[T, k] as a row-strided view (a slice of a wider row, as a fused GEMM's output slice is)."""
    return torch.randn(T, k + pad, device="cuda").to(dt)[:, :k]


def _check(spec, pro, w, inputs, norm_weight, bias, want_out, want_r, T, dtype):
    out = torch.full((T, spec.n), float("nan"), device="cuda", dtype=DT[dtype])
    r = torch.full((T, spec.k), float("nan"), device="cuda", dtype=DT[dtype]) if want_r is not None else None
    G.gemv_prologue(spec, w, out, *inputs, norm_weight=norm_weight, r_out=r, bias=bias)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert _rel(out, want_out) < _tol(dtype)
    if want_r is not None:
        assert torch.equal(r, want_r)  # the residual sum: one rounding, the same as the norm kernel's
    return out


@pytest.mark.parametrize("n,k", NORM_SHAPES)
@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("residual", [True, False])
def test_rmsnorm_prologue_equals_norm_kernel_then_gemv(n, k, T, dtype, residual):
    dt = DT[dtype]
    pro = NormSpec("rms", k, 1e-5, weight_offset=0.0 if residual else 1.0, has_residual=residual, dtype=dtype)
    spec = G.spec_for(n, k, dtype, n == 100, "test", prologue=pro)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dt)
    nw = (1 + 0.1 * torch.randn(k, device="cuda")).to(dt)
    bias = torch.randn(n, device="cuda").to(dt) if n == 100 else None
    a, b = torch.randn(T, k, device="cuda").to(dt), _strided(T, k, dt)
    # the two kernels it replaces
    h = torch.empty(T, k, device="cuda", dtype=dt)
    r = torch.empty(T, k, device="cuda", dtype=dt) if residual else None
    K.norm(pro, b.contiguous() if residual else a, nw, h, residual=a if residual else None, residual_out=r)
    want = torch.empty(T, n, device="cuda", dtype=dt)
    G.gemv(G.spec_for(n, k, dtype, bias is not None, "test"), h, w, want, bias)
    _check(spec, pro, w, (a, b) if residual else (a,), nw, bias, want, r, T, dtype)
    # and torch, in fp32
    x = (a.float() + b.float()).to(dt).float() if residual else a.float()
    ht = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * (nw.float() + (0.0 if residual else 1.0))
    ref = torch.nn.functional.linear(ht.to(dt).float(), w.float(), None if bias is None else bias.float())
    assert _rel(want, ref) < _tol(dtype)


@pytest.mark.parametrize("n,k,group", GATED_SHAPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gated_norm_prologue_equals_norm_kernel_then_gemv(n, k, group, T, dtype):
    dt = DT[dtype]
    per_group = group != k and k % 256 == 0
    pro = NormSpec("rms", k, 1e-5, has_residual=False, gate="silu", group=group, per_group_weight=per_group,
                   dtype=dtype)
    spec = G.spec_for(n, k, dtype, False, "test", prologue=pro)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dt)
    nw = (1 + 0.1 * torch.randn((k // group, group) if per_group else (group,), device="cuda")).to(dt)
    y, z = torch.randn(T, k, device="cuda").to(dt), _strided(T, k, dt)
    h = torch.empty(T, k, device="cuda", dtype=dt)
    K.norm(pro, y, nw, h, gate=z)
    want = torch.empty(T, n, device="cuda", dtype=dt)
    G.gemv(G.spec_for(n, k, dtype, False, "test"), h, w, want)
    _check(spec, pro, w, (y, z), nw, None, want, None, T, dtype)
    g = (y.float() * torch.nn.functional.silu(z.float()).to(dt).float()).to(dt).float().unflatten(1, (-1, group))
    ht = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.float()).flatten(1)
    assert _rel(want, torch.nn.functional.linear(ht.to(dt).float(), w.float())) < _tol(dtype)


@pytest.mark.parametrize("n,k", ACT_SHAPES)
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gated_act_prologue_equals_act_kernel_then_gemv(n, k, T, dtype):
    """g and u: the two halves of one fused gate+up row, as the down projection reads them."""
    dt = DT[dtype]
    pro = ActSpec("silu", True, k, dtype=dtype)
    spec = G.spec_for(n, k, dtype, False, "test", prologue=pro)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dt)
    gu = torch.randn(T, 2 * k, device="cuda").to(dt)
    g, u = gu[:, :k], gu[:, k:]
    x = torch.empty(T, k, device="cuda", dtype=dt)
    K.activation(pro, x, gate=g, up=u)
    want = torch.empty(T, n, device="cuda", dtype=dt)
    G.gemv(G.spec_for(n, k, dtype, False, "test"), x, w, want)
    out = _check(spec, pro, w, (g, u), None, None, want, None, T, dtype)
    if dtype == "fp32":  # no reduction before it: the same sums in the same order
        assert torch.equal(out, want)
    ref = torch.nn.functional.linear((torch.nn.functional.silu(g.float()) * u.float()).to(dt).float(), w.float())
    assert _rel(want, ref) < _tol(dtype)


@pytest.mark.parametrize("epilogue", ["swiglu", "rope", None])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("post", [False, True])
def test_norm_prologue_with_an_epilogue_equals_norm_kernel_then_that_gemv(epilogue, T, dtype, residual, post):
    """An RMSNorm (plain or residual), the GEMV and its epilogue (the gated activation; the rotary + KV write) in
    one launch, against the norm's kernel then the GEMV with that epilogue: the same outputs up to the 1 / rms's
    fp32 summation order (the cache rows too), the residual sum bit for bit, unwritten cache slots untouched.
    post: the 1 / rms on the sums (GemvSpec.post_norm; x not rounded between the norm and the linear), with and
    without an epilogue (then at a few rows of W: K split over the block's warps, the sum(h^2) summed over them)."""
    from kiln.codegen.specs import RopeCacheSpec
    dt, k = DT[dtype], 512
    pro = NormSpec("rms", k, 1e-5, weight_offset=0.0 if residual else 1.0, has_residual=residual, dtype=dtype)
    w_rows = 2 * 384 if epilogue == "swiglu" else 8 * 64 + 2 * 2 * 64
    w = (torch.randn(w_rows, k, device="cuda") / k**0.5).to(dt)
    nw = (1 + 0.1 * torch.randn(k, device="cuda")).to(dt)
    a, b = torch.randn(T, k, device="cuda").to(dt), _strided(T, k, dt)
    h = torch.empty(T, k, device="cuda", dtype=dt)
    r_want = torch.empty(T, k, device="cuda", dtype=dt) if residual else None
    K.norm(pro, b.contiguous() if residual else a, nw, h, residual=a if residual else None, residual_out=r_want)
    r = torch.full((T, k), float("nan"), device="cuda", dtype=dt) if residual else None
    inputs = (a, b) if residual else (a,)
    if epilogue is None:  # a few rows of W: a K split over the block's warps
        spec = G.spec_for(40, k, dtype, True, "test", prologue=pro, post_norm=post)
        assert spec.ksplit > 1
        wn, bias = w[:40].contiguous(), torch.randn(40, device="cuda").to(dt)
        want = torch.empty(T, 40, device="cuda", dtype=dt)
        G.gemv(G.spec_for(40, k, dtype, True, "test"), h, wn, want, bias)
        out = torch.full((T, 40), float("nan"), device="cuda", dtype=dt)
        G.gemv_prologue(spec, wn, out, *inputs, norm_weight=nw, r_out=r, bias=bias)
        torch.cuda.synchronize()
        assert not out.isnan().any() and _rel(out, want) < _tol(dtype)
    elif epilogue == "swiglu":
        act = ActSpec("silu", True, 384, dtype=dtype)
        plain = G.spec_for(w_rows, k, dtype, False, "test", epilogue=act, halves=(0, 384))
        want = torch.empty(T, 384, device="cuda", dtype=dt)
        G.gemv(plain, h, w, want)
        spec = G.spec_for(w_rows, k, dtype, False, "test", prologue=pro, epilogue=act, halves=(0, 384),
                          post_norm=post)
        out = torch.full((T, 384), float("nan"), device="cuda", dtype=dt)
        G.gemv_prologue(spec, w, out, *inputs, norm_weight=nw, r_out=r)
        torch.cuda.synchronize()
        assert not out.isnan().any() and _rel(out, want) < _tol(dtype)
    else:
        rope = RopeCacheSpec(8, 2, 64, 64, 16, theta=5e5, dtype=dtype)
        starts = (0, 512, 640)
        positions = torch.tensor([7, 4095, 130][:T], device="cuda", dtype=torch.int64)
        slots = torch.tensor([17, -1, 126][:T], device="cuda", dtype=torch.int32)  # -1: a padding row
        caches = [torch.randn(8, 2, 16, 64, device="cuda").to(dt) for _ in range(4)]  # k, v want; k, v got
        caches[2].copy_(caches[0])
        caches[3].copy_(caches[1])
        before = caches[0].clone()
        q_want = torch.empty(T, 512, device="cuda", dtype=dt)
        G.gemv_rope(G.spec_for(w_rows, k, dtype, False, "test", epilogue=rope, halves=starts), h, w, q_want,
                    positions, slots, caches[0], caches[1])
        spec = G.spec_for(w_rows, k, dtype, False, "test", prologue=pro, epilogue=rope, halves=starts,
                          post_norm=post)
        q = torch.full((T, 512), float("nan"), device="cuda", dtype=dt)
        G.gemv_prologue(spec, w, q, *inputs, norm_weight=nw, r_out=r,
                        rope_args=(positions, slots, caches[2], caches[3], 1.0, 1.0))
        torch.cuda.synchronize()
        assert not q.isnan().any() and _rel(q, q_want) < _tol(dtype)
        for got, want in ((caches[2], caches[0]), (caches[3], caches[1])):
            assert _rel(got, want) < _tol(dtype)
        flat = caches[2].transpose(1, 2).reshape(8 * 16, -1)  # [slot, kv heads x dims]
        untouched = [s for s in range(8 * 16) if s not in slots.tolist()]
        assert torch.equal(flat[untouched], before.transpose(1, 2).reshape(8 * 16, -1)[untouched])
    if residual:
        assert torch.equal(r, r_want)  # the residual sum: one rounding, the same as the norm kernel's


def _decode_logits(model, name, dtype):
    """Prefill 1-4 sequences, then one decode step of them (CUDA graphs on the cuda backend): the decode
    logits per batch size."""
    torch.manual_seed(1)
    vocab = 1000 if name == "llama" else 256
    res = []
    for B in (1, 2, 4):
        kv = KVStore(model.plan.sites, 64, 16, DT[dtype], "cuda", state=StateStore(B))
        lens = [5 + 7 * i for i in range(B)]
        tables = [tuple(range(4 * i, 4 * i + 4)) for i in range(B)]
        tokens = torch.randint(0, vocab, (sum(lens),))
        seqs, start = [], 0
        for i, n in enumerate(lens):
            seqs.append(SeqSlice(start, n, 0, tables[i], state_slot=i))
            start += n
        nxt = torch.randint(0, vocab, (B,))
        with torch.no_grad():
            model.model.forward(StepBatch(tokens, seqs), kv)
            res.append(model.model.forward(StepBatch(nxt, [SeqSlice(i, 1, lens[i], tables[i], state_slot=i)
                                                           for i in range(B)]), kv).float())
    return res


def _prologue_kernels():
    return [k for (spec, _), k in list(_loaded.items())
            if isinstance(spec, G.GemvSpec) and spec.prologue is not None and " -> " in spec.origin]


@pytest.mark.parametrize("name", ["llama", "mamba2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decode_logits_with_prologues_equal_without_and_the_reference(name, dtype, monkeypatch):
    config = LLAMA if name == "llama" else FAMILIES[name]
    monkeypatch.setattr(cuda_backend, "GEMV", "pdl")
    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)  # every decode step of <= 4 sequences, not only 1
    outs = {}
    for switch in ("0", "1", "norm", "post", "lone"):  # norm: the ungated RMSNorms' prologues only; post: post-scaled;
        # lone: post, only into a GEMV without an epilogue
        monkeypatch.setattr(cuda_backend, "GEMV_PROLOGUE", switch)
        ref, cuda = pair(name, config, dtype)
        outs[switch] = _decode_logits(cuda, name, dtype)
    assert _prologue_kernels(), "the fused GEMV never ran"
    want = _decode_logits(ref, name, dtype)
    tol = 1e-4 if dtype == "fp32" else 3e-2
    for on in ("1", "norm", "post", "lone"):
        for off, got, r in zip(outs["0"], outs[on], want):
            assert _rel(got, off) < tol
            assert _rel(got, r) < max(tol, 2 * _rel(off, r))  # no further from the reference than without


def test_norm_prologues_only_take_no_gated_step(monkeypatch):
    """KILN_GEMV_PROLOGUE=norm on mamba2 (a residual norm before in_proj, a gated norm before out_proj): only
    ungated norm prologues are compiled; a bad value is refused by name."""
    monkeypatch.setattr(cuda_backend, "GEMV", "pdl")
    monkeypatch.setattr(cuda_backend, "GEMV_PROLOGUE", "norm")
    launched = []
    real = G.gemv_prologue

    def recording(spec, *args, **kw):  # the real launch, its spec noted
        launched.append(spec.prologue)
        return real(spec, *args, **kw)

    monkeypatch.setattr(G, "gemv_prologue", recording)
    _, cuda = pair("mamba2", FAMILIES["mamba2"], "bf16")
    _decode_logits(cuda, "mamba2", "bf16")
    assert launched and all(isinstance(p, NormSpec) and not p.gate for p in launched)
    assert any(p.has_residual for p in launched)
    monkeypatch.setattr(cuda_backend, "GEMV_PROLOGUE", "yes")
    from kiln.codegen.specs import KernelSpecError
    with pytest.raises(KernelSpecError, match="KILN_GEMV_PROLOGUE='yes'"):
        _decode_logits(pair("mamba2", FAMILIES["mamba2"], "bf16")[1], "mamba2", "bf16")
