"""Issue #12's SwiGLU and rotary + paged-KV-write variants (ActSpec.variant, RopeCacheSpec.variant) on the
GPU: each equal bit for bit to the default kernel (the same arithmetic per element) and to float64 torch
math within the dtype's tolerance; enough tokens that every persistent block wraps its stage ring."""

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen import rope  # noqa: E402
from kiln.codegen.specs import ACT_VARIANTS, ActSpec, RopeCacheSpec  # noqa: E402

from .test_kernels import ACTS, DEV, DT, ROPE_CASES, TOL, nan_like, paged_layout, rel_err, rotate_ref  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("variant", ACT_VARIANTS[1:])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kind, gated, F, T, two_inputs", [
    ("silu", True, 14336, 9, False), ("silu", True, 14336, 1031, False), ("gelu_tanh", True, 1000, 8192, True),
    ("gelu", False, 3072, 301, False), ("relu", True, 11, 77, False), ("silu", True, 4104, 1, True),
])
def test_activation_variant(variant, dtype, kind, gated, F, T, two_inputs):
    dt = DT[dtype]
    spec = ActSpec(kind, gated, F, dtype=dtype, variant=variant, origin="test")
    default = ActSpec(kind, gated, F, dtype=dtype, origin="test")
    x = torch.randn(T, 2 * F if gated else F, device=DEV).to(dt) * 3
    outs = []
    for s in (spec, default):
        out = nan_like((T, F), dt)
        if two_inputs:  # separate gate and up tensors, up's rows strided wider than F
            gate = x[:, :F].contiguous()
            up = torch.cat([x[:, F:], x[:, :8]], 1)[:, :F]
            K.activation(s, out, gate=gate, up=up)
        else:
            K.activation(s, out, x=x)
        outs.append(out)
    same(outs[0], outs[1])
    ref = ACTS[kind](x[:, :F].double()) * (x[:, F:].double() if gated else 1.0)
    assert rel_err(outs[0], ref) <= TOL[dtype]


def _rope_run(spec, qkv, pos, slots, pages, seq_len):
    H, KV, D, P = spec.heads, spec.kv_heads, spec.head_dim, spec.page_size
    qkv = qkv.clone()
    q, k, v = qkv[:, : H * D], qkv[:, H * D : (H + KV) * D], qkv[:, (H + KV) * D :]
    dt = qkv.dtype
    kc, vc = nan_like((pages, KV, P, D), dt), nan_like((pages, KV, P, D), dt)
    K.rope_write_kv(spec, q, k, v, pos, slots, kc, vc, seq_len=seq_len)
    return qkv, kc, vc


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", range(len(ROPE_CASES)))
@pytest.mark.parametrize("page_size, long", [(16, False), (5, False), (16, True)])
def test_rope_write_kv_bulk(dtype, case, page_size, long):
    """The bulk variant against the block-per-token kernel (bit for bit: q, both caches, untouched slots
    still NaN) and against float64 math; `long`: 5000 tokens, many per persistent block."""
    c = ROPE_CASES[case]
    dt = DT[dtype]
    spec = RopeCacheSpec(page_size=page_size, dtype=dtype, variant="bulk", origin="test", **c)
    default = RopeCacheSpec(page_size=page_size, dtype=dtype, origin="test", **c)
    H, KV, D, rot = spec.heads, spec.kv_heads, spec.head_dim, spec.rotary_dim
    ctx, new = ([0, 3, 700, 31], [17, 1, 1, 40]) if not long else ([0, 100], [4000, 1000])
    tables, pages = paged_layout([a + b for a, b in zip(ctx, new)], page_size)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(new)]).to(DEV)
    pos = torch.cat([torch.arange(a, a + b) for a, b in zip(ctx, new)]).to(DEV)
    T = pos.shape[0]
    slots = K.slot_mapping(tables, seq, pos, page_size)
    slots[5] = -1  # a padding token: rotated q, no cache write
    qkv = torch.randn(T, (H + 2 * KV) * D, device=DEV).to(dt)
    seq_len = torch.tensor([int(pos.max()) + 1], dtype=torch.int32, device=DEV)
    got = _rope_run(spec, qkv, pos, slots, pages, seq_len)
    want = _rope_run(default, qkv, pos, slots, pages, seq_len)
    for a, b in zip(got, want):
        same(a, b)
    qkv_out, kc, _ = got
    freq = rope.step_inv_freq(spec, int(seq_len)) if rot else None
    q_ref = rotate_ref(qkv[:, : H * D].view(T, H, D), pos, freq, rot, spec.layout, spec.attention_factor)
    assert rel_err(qkv_out[:, : H * D].reshape(T, H, D), q_ref) <= TOL[dtype]
    same(qkv_out[:, H * D :], qkv[:, H * D :])  # k and v are inputs only
    k_ref = rotate_ref(qkv[:, H * D : (H + KV) * D].view(T, KV, D), pos, freq, rot, spec.layout,
                       spec.attention_factor)
    keep = slots >= 0
    s = slots[keep].long()
    assert rel_err(kc[s // page_size, :, s % page_size], k_ref[keep]) <= TOL[dtype]
