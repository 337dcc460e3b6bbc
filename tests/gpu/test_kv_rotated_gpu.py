"""--kv-cache-dtype fp8-rotated on the cuda backend (templates/rope_cache_rotated.cu.j2): the rotary + KV write kernel
against the reference store (runtime/kv_store.py KVStore.write) in one launch mixing new sequences, continued ones
and decode rows, after a launch that wrote the continued ones' first tokens; models against the reference backend
(tests/gpu/test_cuda_backend.py's check); the engine with prefix caching, eviction and preemption."""

from __future__ import annotations

import pytest
import torch
from kiln.codegen import kernels as K
from kiln.codegen.specs import RopeCacheSpec
from kiln.dsl.plan import AttentionSite
from kiln.runtime.kv_store import KVStore, hadamard

from tests.gpu.test_cuda_backend import GPT2, LLAMA, check_against_reference, pair
from tests.gpu.test_prefix_cache_gpu import run
from tests.test_kv_scales import err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PAGE, HEADS, KV_HEADS = 16, 8, 2
# rotary cases: Llama-3's (head_dim 64: two dims a lane, pairs a chunk apart) and interleaved pairs at head_dim 32 (a dim
# a lane: pairs by shuffles)
ROPES = [dict(head_dim=64, rotary_dim=64, scaling="llama3", factor=8.0, original_max_position=64, theta=500000.0),
         dict(head_dim=32, rotary_dim=32, layout="interleaved")]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _launch(spec, plain, kv, ref, seqs, dt, gen):
    """One launch of `seqs` [(block_table, context, new tokens)] through the rotated kernel into `kv`, and the same
    tokens through the reference store `ref` (their rotary from the plain kernel, into a run-dtype scratch cache).
    Returns (q the kernel turned, q rotated by the plain kernel)."""
    T, D = sum(n for _, _, n in seqs), spec.head_dim
    q = torch.randn(T, HEADS * D, generator=gen, device="cuda").to(dt)
    k = (torch.randn(T, KV_HEADS * D, generator=gen, device="cuda") * 3 + 1).to(dt)
    v = torch.randn(T, KV_HEADS * D, generator=gen, device="cuda").to(dt)
    pos = torch.cat([torch.arange(c, c + n) for _, c, n in seqs]).cuda()
    slots = torch.cat([torch.tensor([t[p // PAGE] * PAGE + p % PAGE for p in range(c, c + n)]) for t, c, n in seqs])
    slots = slots.int().cuda()
    width = max(len(t) for t, _, _ in seqs)
    tables = torch.tensor([list(t) + [0] * (width - len(t)) for t, _, _ in seqs], dtype=torch.int32, device="cuda")
    cu = torch.tensor([0] + [n for _, _, n in seqs], device="cuda").cumsum(0).int()
    # the plain kernel's rotary: q in place, k into a run-dtype scratch cache read back at the slots
    q_plain, scratch_k, scratch_v = q.clone(), torch.zeros_like(kv.k[0], dtype=dt), torch.zeros_like(kv.v[0], dtype=dt)
    K.rope_write_kv(plain, q_plain, k, v, pos, slots, scratch_k, scratch_v)
    k_roped = scratch_k[slots.long() // PAGE, :, slots.long() % PAGE]  # [T, kv_heads, D]
    q_rot = q.clone()
    K.rope_write_kv(spec, q_rot, k, v, pos, slots, kv.k[0], kv.v[0], k_scale=kv.k_scale[0], v_scale=kv.v_scale[0],
                    rotated=(kv.shift[0], kv.k_mean[0], cu, tables))
    start = 0
    for t, c, n in seqs:
        ref.write(0, t, c, k_roped[start:start + n], v[start:start + n].view(n, KV_HEADS, D))
        start += n
    return q_rot, q_plain


@pytest.mark.parametrize("case", range(len(ROPES)))
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.25, 2.0)])
def test_kernel_writes_what_the_reference_store_writes(case, dtype, scales):
    dt, gen = DTYPES[dtype], torch.Generator("cuda").manual_seed(5)
    D = ROPES[case]["head_dim"]
    mean = tuple((torch.randn(KV_HEADS * D, generator=gen, device="cuda") * 2).tolist())
    site = AttentionSite(0, "layer.0", HEADS, KV_HEADS, D, D, kv_dtype="fp8-rotated", k_mean=mean)
    kv, ref = (KVStore([site], 32, PAGE, dt, "cuda") for _ in range(2))
    for store in (kv, ref):
        store.k_scale, store.v_scale = [scales[0]], [scales[1]]
    rope = dict(heads=HEADS, kv_heads=KV_HEADS, page_size=PAGE, dtype=dtype, origin="test", **ROPES[case])
    spec = RopeCacheSpec(kv_fp8=True, kv_rotated=True, **rope)
    plain = RopeCacheSpec(**rope)
    a, b, c, d = (3, 9, 4), (12, 5), (20, 21, 22), (30,)  # page tables: a new prompt, two continued, a 1-token prompt
    _launch(spec, plain, kv, ref, [(b, 0, 10), (c, 0, 33)], dt, gen)
    q_rot, q_plain = _launch(spec, plain, kv, ref, [(a, 0, 40), (b, 10, 7), (c, 33, 1), (d, 0, 1)], dt, gen)
    # q turned by H; the turn back gives the plain kernel's q
    H = hadamard(D, "cuda")
    want = (q_plain.float().view(-1, HEADS, D) @ H).flatten(1)
    tol = 1e-2 if dtype == "bf16" else 1e-5
    assert err(q_rot.float(), want) < tol
    K.unrotate_heads(spec, q_rot)
    assert err(q_rot.float(), q_plain.float()) < tol
    # each sequence's shift, at its first page, as the reference rounds it (run dtype), and every key and value
    for table in (a, b, c, d):
        torch.testing.assert_close(kv.shift[0][table[0]].float(), ref.shift[0][table[0]].float(),
                                   rtol=2 ** -7 if dtype == "bf16" else 1e-5, atol=1e-5)
    for table, n in ((a, 40), (b, 17), (c, 34), (d, 1)):
        (k_got, v_got), (k_ref, v_ref) = kv.read(0, table, n), ref.read(0, table, n)
        torch.testing.assert_close(k_got[0], k_ref[0], rtol=1e-2, atol=1e-3)  # the first key: exact on both
        for got, want_ in ((k_got, k_ref), (v_got, v_ref)):
            assert err(got, want_) < 5e-3, (table, err(got, want_))  # values on a rounding boundary only
    # the bytes themselves: all but a few on a rounding boundary (the kernel's transform sums in its own order)
    same = (kv.k[0].view(torch.uint8) == ref.k[0].view(torch.uint8)).float().mean()
    assert same > 0.99, same


@pytest.mark.parametrize("spec,config", [("llama", LLAMA), ("gpt2", GPT2)])  # gpt2: no rotary embedding
@pytest.mark.parametrize("dtype,tol", [("bf16", 2e-2), ("fp32", 1e-2)])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0)])
def test_models_match_reference(spec, config, dtype, tol, scales, fresh_seed):
    check_against_reference(spec, config, dtype, tol, fresh_seed, kv_cache_dtype="fp8-rotated", scales=scales)


def test_engine_with_prefix_caching_and_preemption():
    """Greedy outputs with prefix caching, eviction and preemption equal those without (fp32, the cuda backend): a
    sequence whose first page is a cached one reads the shift the sequence that filled it wrote."""
    _, cuda = pair("llama", LLAMA, "fp32", kv_cache_dtype="fp8-rotated")
    want, _ = run(cuda, False, 256)
    got, engine = run(cuda, True, 12)
    assert engine.scheduler.prefix_hit_tokens > 0 and engine.scheduler.num_preemptions > 0
    assert got == want
