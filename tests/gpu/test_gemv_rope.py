"""Issue #12 item 2 on a GPU: the qkv GEMV with the rotary embedding and the paged KV write in its epilogue
(codegen/gemv.py gemv_rope) against the plain GEMV of the whole fused weight then the rotary + KV write kernel
(kernels.rope_write_kv), bit for bit: q, and every byte of both caches (run dtype and fp8), with padding rows
(slot -1) left unwritten; the fp8 "mma" GEMV's epilogue against the fp8 GEMV then that kernel, likewise; and
the cuda backend's logits (CUDA graphs for 1, 2 and 4 sequences' decode steps, and an eager prompt of 3
tokens, which the prefill attention reads back from the cache) with the link on (runtime/cuda_backend.
GEMV_ROPE, KILN_GEMV_ROPE) against it off, bit for bit, for every family whose program links a qkv GEMM to its
attention (fp32), llama in bf16 and with an fp8 KV cache, and llama with fp8 weights (cuda_quant.FP8_GEMV_ROPE
on / off). Outputs are poisoned (NaN) first so an unwritten element fails."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import fuse as F  # noqa: E402
from kiln.codegen import gemv as G  # noqa: E402
from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen.specs import KernelSpecError, RopeCacheSpec  # noqa: E402
from kiln.runtime import cuda_backend  # noqa: E402
from kiln.runtime.batch import SeqSlice, StepBatch  # noqa: E402
from kiln.runtime.kv_store import KVStore  # noqa: E402
from kiln.runtime.state_cache import StateStore  # noqa: E402

from tests.configs import FAMILY_CONFIGS as FAMILIES  # noqa: E402
from tests.gpu.test_cuda_backend import LLAMA, pair  # noqa: E402
from tests.gpu.test_gemv_prologue import _decode_logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LLAMA3 = RopeCacheSpec(32, 8, 128, 128, 16, theta=500000.0, scaling="llama3", factor=8.0, original_max_position=8192)
# (rope, k, bias, gap between q, k and v rows): Llama-3-8B's qkv; interleaved partial rotation with a bias and
# padding rows between the slices; no rotation (KV write only); YaRN's attention factor; one kv head
ROPES = [(LLAMA3, 4096, False, 0),
         (dataclasses.replace(LLAMA3, heads=4, kv_heads=2, head_dim=64, rotary_dim=32, layout="interleaved"), 256,
          True, 8),
         (dataclasses.replace(LLAMA3, heads=4, kv_heads=2, head_dim=64, rotary_dim=0), 1000, False, 0),
         (dataclasses.replace(LLAMA3, heads=8, kv_heads=2, head_dim=128, rotary_dim=64, scaling="yarn", factor=4.0,
                              original_max_position=64, attention_factor=1.25), 512, True, 0),
         (dataclasses.replace(LLAMA3, heads=6, kv_heads=1, head_dim=64, rotary_dim=64, scaling="none"), 384, False,
          0)]
PAGES = 8


def _cache(rope: RopeCacheSpec, dt: torch.dtype) -> torch.Tensor:
    shape = (PAGES, rope.kv_heads, rope.page_size, rope.head_dim)
    if rope.kv_fp8:  # arbitrary bytes: the test compares bytes, and unwritten slots must keep theirs
        return torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    return torch.randn(shape, device="cuda").to(dt)


@pytest.mark.parametrize("case", ROPES, ids=["llama3-8b", "interleaved-partial-bias", "none", "yarn", "mq"])
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype, kv_fp8", [("bf16", False), ("fp16", False), ("fp32", False), ("bf16", True)])
def test_rope_epilogue_equals_gemv_then_rope_kernel(case, T, dtype, kv_fp8):
    rope, k, has_bias, gap = case
    rope = dataclasses.replace(rope, dtype=dtype, kv_fp8=kv_fp8)
    dt, hd = DT[dtype], rope.head_dim
    qn, kn = rope.heads * hd, rope.kv_heads * hd
    starts = (0, qn + gap, qn + kn + 2 * gap)
    rows = starts[2] + kn
    w = (torch.randn(rows, k, device="cuda") / k**0.5).to(dt)
    b = torch.randn(rows, device="cuda").to(dt) if has_bias else None
    x = torch.randn(T, k, device="cuda").to(dt)
    positions = torch.tensor([7, 4095, 0, 130][:T], device="cuda", dtype=torch.int64)
    # distinct slots over several pages; the third row is padding (a CUDA graph's bucket): nothing written
    slots = torch.tensor([17, 3, -1, 126][:T], device="cuda", dtype=torch.int32)
    kc, vc = _cache(rope, dt), _cache(rope, dt)
    kc0, vc0 = kc.clone(), vc.clone()

    # the plain GEMV of the whole weight, then the rotary + KV write kernel
    y = torch.empty(T, rows, device="cuda", dtype=dt)
    G.gemv(G.spec_for(rows, k, dtype, has_bias, "test"), x, w, y, b)
    q_want, kc_want, vc_want = y[:, :qn].clone(), kc.clone(), vc.clone()
    K.rope_write_kv(rope, q_want, y[:, starts[1]:starts[1] + kn], y[:, starts[2]:starts[2] + kn], positions, slots,
                    kc_want, vc_want, k_scale=0.05, v_scale=0.02)

    spec = G.spec_for(rows, k, dtype, has_bias, "test", epilogue=rope, halves=starts)
    q = torch.full((T, qn), float("nan"), device="cuda", dtype=dt)
    G.gemv_rope(spec, x, w, q, positions, slots, kc, vc, b, k_scale=0.05, v_scale=0.02)
    torch.cuda.synchronize()
    assert not q.isnan().any()
    written = torch.zeros(PAGES * rope.page_size, dtype=torch.bool, device="cuda")
    written[[s for s in slots.tolist() if s >= 0]] = True

    def slots_of(c: torch.Tensor) -> torch.Tensor:  # [slot, kv heads x dims]: the bytes (fp8) or values
        c = c.view(torch.uint8) if kv_fp8 else c
        return c.transpose(1, 2).reshape(PAGES * rope.page_size, -1)

    for got, before in ((kc, kc0), (vc, vc0)):  # the padding row (slot -1) and every other slot: untouched
        assert torch.equal(slots_of(got)[~written], slots_of(before)[~written])
    if (spec.rows, spec.ksplit) == G.choose(rows, k, dtype):  # the same sums as the plain GEMV's, then the same math
        assert torch.equal(q, q_want)
        assert torch.equal(slots_of(kc), slots_of(kc_want)) and torch.equal(slots_of(vc), slots_of(vc_want))
    else:  # rows a warp raised to 2 for the pairs: the same math, another fp32 summation order
        tol = 1e-5 if dtype == "fp32" else 2e-2
        assert float((q.float() - q_want.float()).norm() / q_want.float().norm()) < tol
        for got, want in ((kc, kc_want), (vc, vc_want)):
            a, b = got.float().transpose(1, 2).reshape(PAGES * rope.page_size, -1)[written], \
                want.float().transpose(1, 2).reshape(PAGES * rope.page_size, -1)[written]
            assert float((a - b).norm() / b.norm()) < (0.1 if kv_fp8 else tol)


def _recording(monkeypatch, module=G, name: str = "gemv_rope") -> list:
    """module.name (a launch wrapper taking its spec first), each launch's spec noted (the backend calls it
    through the module)."""
    launched, real = [], getattr(module, name)

    def recording(spec, *args, **kw):
        launched.append(spec)
        return real(spec, *args, **kw)

    monkeypatch.setattr(module, name, recording)
    return launched


# fp8 weights ("mma" GEMV at one row): weight scale per tensor / per channel, activation scale measured or static
FP8_MODES = [("per_tensor", "fp8_tensor", False), ("per_channel", "fp8_token", False), ("per_tensor", "fp8_tensor", True)]


@pytest.mark.parametrize("case", [ROPES[0], ROPES[1]], ids=["llama3-8b", "interleaved-partial-bias"])
@pytest.mark.parametrize("layout, act, static", FP8_MODES)
@pytest.mark.parametrize("kv_fp8", [False, True])
def test_fp8_rope_epilogue_equals_fp8_gemv_then_rope_kernel(case, layout, act, static, kv_fp8):
    from kiln.codegen import gemv_fp8 as F8
    from kiln.dsl.quant import QuantDesc, quantize_weight
    rope, k, has_bias, gap = case
    rope = dataclasses.replace(rope, dtype="bf16", kv_fp8=kv_fp8)
    dt, hd = torch.bfloat16, rope.head_dim
    qn, kn = rope.heads * hd, rope.kv_heads * hd
    starts = (0, qn + gap, qn + kn + 2 * gap)
    rows = starts[2] + kn
    w = quantize_weight(torch.randn(rows, k, device="cuda") / k**0.5, QuantDesc("fp8", layout, act=act,
                                                                                act_static=static))
    ws = w.scale.reshape(-1) if layout == "per_channel" else w.scale.reshape(())
    xs = torch.tensor(0.011, device="cuda") if static else None
    b = torch.randn(rows, device="cuda").to(dt) if has_bias else None
    x = (torch.randn(1, k, device="cuda") * 2).to(dt)
    positions = torch.tensor([4095], device="cuda", dtype=torch.int64)
    slots = torch.tensor([21], device="cuda", dtype=torch.int32)
    kc, vc = _cache(rope, dt), _cache(rope, dt)
    plain = F8.spec_for(rows, k, "bf16", has_bias, layout == "per_channel", static, "test", decode="mma")
    y = torch.empty(1, rows, device="cuda", dtype=dt)
    F8.gemv_fp8(plain, x, w.q, ws, y, b, xs)
    q_want, kc_want, vc_want = y[:, :qn].clone(), kc.clone(), vc.clone()
    K.rope_write_kv(rope, q_want, y[:, starts[1]:starts[1] + kn], y[:, starts[2]:starts[2] + kn], positions, slots,
                    kc_want, vc_want, k_scale=0.05, v_scale=0.02)
    spec = F8.spec_for(rows, k, "bf16", has_bias, layout == "per_channel", static, "test", decode="mma",
                       epilogue=rope, halves=starts)
    q = torch.full((1, qn), float("nan"), device="cuda", dtype=dt)
    F8.gemv_fp8(spec, x, w.q, ws, q, b, xs, rope=(positions, slots, kc, vc, 0.05, 0.02))
    torch.cuda.synchronize()
    bits = (lambda c: c.view(torch.uint8)) if kv_fp8 else (lambda c: c)
    assert torch.equal(q, q_want)
    assert torch.equal(bits(kc), bits(kc_want)) and torch.equal(bits(vc), bits(vc_want))


def test_fp8_logits_with_the_rope_epilogue_equal_without(monkeypatch):
    """fp8 weights (per-tensor, measured activation scale): one sequence's decode step through the fp8 "mma"
    GEMV with the rotary epilogue (KILN_FP8_GEMV_ROPE=1, the default); more sequences through cuBLASLt and the
    rotary kernel either way."""
    from kiln.codegen import gemv_fp8 as F8
    from kiln.runtime import cuda_quant
    from kiln.runtime.model import LoadedModel, make_backend, random_model
    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0, quantization="fp8")
    launched, outs = _recording(monkeypatch, F8, "gemv_fp8"), {}
    for switch in ("0", "1"):
        monkeypatch.setattr(cuda_quant, "FP8_GEMV_ROPE", switch)
        cuda = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                           ref.device)
        outs[switch] = _decode_logits(cuda, "llama", "bf16")
    assert any(isinstance(s.epilogue, RopeCacheSpec) for s in launched), "the fused fp8 GEMV never ran"
    assert torch.equal(outs["1"][0], outs["0"][0])  # one sequence: the fused kernel against the two launches
    for off, on in zip(outs["0"][1:], outs["1"][1:]):  # cuBLASLt both ways (its algorithm may differ per instance)
        assert float((on - off).norm() / off.norm()) < 1e-2


def _logits(model, name: str, dtype: str) -> list[torch.Tensor]:
    """_decode_logits (1, 2, 4 sequences: a prefill, then a decode step through the CUDA graphs), and every
    row's logits of a 3-token prompt (eager: the GEMV's rows; its attention reads K/V back from the cache)."""
    out = _decode_logits(model, name, dtype)
    model.model.mixed_graphs = False  # (all_logits runs eager anyway)
    kv = KVStore(model.plan.sites, 16, 16, model.dtype, "cuda", state=StateStore(1))
    tokens = torch.tensor([3, 1, 4])
    with torch.no_grad():
        out.append(model.model.forward(StepBatch(tokens, [SeqSlice(0, 3, 0, (0, 1), state_slot=0)]), kv,
                                       all_logits=True).float().clone())
    return out


def _config(name: str) -> dict:
    """The family's small config with transformers' defaults (as test_cuda_backend's family test)."""
    import transformers
    return LLAMA if name == "llama" else transformers.AutoConfig.for_model(**FAMILIES[name]).to_dict()


def _linked(name: str) -> bool:
    from kiln.dsl import check, load_spec
    plan = check(load_spec(name.split("-")[0]), _config(name))
    return any("rope" in op.extra for op in F.fuse(plan, torch.float32, 16))


@pytest.mark.parametrize("name", [n for n in FAMILIES if n == "llama" or _linked(n)])
def test_logits_with_the_link_equal_without(name, monkeypatch):
    config = _config(name)
    monkeypatch.setattr(cuda_backend, "GEMV", "pdl")
    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)  # every step of <= 4 rows, not only 1
    launched, outs = _recording(monkeypatch), {}
    for switch in ("0", "1"):
        monkeypatch.setattr(cuda_backend, "GEMV_ROPE", switch)
        _, cuda = pair(name.split("-")[0], config, "fp32")
        outs[switch] = _logits(cuda, name, "fp32")
    refused = {G.rope_epilogue_refusal(op.extra["rope"].spec[0], "fp32") for op in cuda.model.ops if "rope" in op.extra}
    if refused != {""}:  # (longrope, dynamic NTK: their own kernel, the link unused)
        assert not launched
    else:
        assert launched, "the fused GEMV never ran"
    for off, on in zip(outs["0"], outs["1"]):
        assert torch.equal(on, off)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_bf16_logits_with_the_link_equal_without(kv_cache_dtype, monkeypatch):
    monkeypatch.setattr(cuda_backend, "GEMV", "pdl")
    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)
    launched, outs = _recording(monkeypatch), {}
    for switch in ("0", "1"):
        monkeypatch.setattr(cuda_backend, "GEMV_ROPE", switch)
        _, cuda = pair("llama", LLAMA, "bf16", kv_cache_dtype=kv_cache_dtype)
        outs[switch] = _logits(cuda, "llama", "bf16")
    assert launched and all(s.epilogue.kv_fp8 == (kv_cache_dtype == "fp8") for s in launched)
    for off, on in zip(outs["0"], outs["1"]):
        assert torch.equal(on, off)


def test_a_bad_rope_switch_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(cuda_backend, "GEMV_ROPE", "yes")
    _, cuda = pair("llama", LLAMA, "bf16")
    with pytest.raises(KernelSpecError, match="KILN_GEMV_ROPE='yes'"):
        _decode_logits(cuda, "llama", "bf16")
