"""Issue #13 on a GPU: the one-row FP8 W8A8 GEMV (codegen/gemv_fp8.py, templates/gemv_fp8.cu.j2) against
dsl/quant.py's reference (QWeight.linear) and against the W8A8 path it replaces (runtime/cuda_quant.py
QGemm: activation-quant kernels + cuBLASLt), then QGemm and a whole model with the switch
(cuda_quant.FP8_GEMV, KILN_FP8_GEMV) on against it off. Shapes: Llama-3-8B's decode linears and odd ones
(few rows: K split over a block's warps; K not a whole number of 512-column warp steps; rows past the
last warp's). Outputs are poisoned (NaN) first so an unwritten element fails."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import gemv_fp8 as G  # noqa: E402
from kiln.codegen.launch import _loaded  # noqa: E402
from kiln.dsl.quant import QuantDesc, QWeight, quantize_weight, share_scale  # noqa: E402
from kiln.runtime import cuda_quant  # noqa: E402
from kiln.runtime.batch import SeqSlice, StepBatch  # noqa: E402
from kiln.runtime.engine import EngineConfig  # noqa: E402
from kiln.runtime.kv_store import KVStore  # noqa: E402
from kiln.runtime.model import LoadedModel, make_backend, random_model  # noqa: E402

from tests.gpu.test_cuda_backend import greedy_through_engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LLAMA3 = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
ODD = [(80, 2560), (100, 208), (33, 1008), (8, 64), (203, 2064)]
# activation scale: measured per tensor, measured per token (one token: the same), the checkpoint's
MODES = [("per_tensor", "fp8_tensor", False), ("per_channel", "fp8_token", False), ("per_tensor", "fp8_tensor", True),
         ("per_channel", "fp8_tensor", False)]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def _weight(n, k, layout, act, static):
    w = quantize_weight(torch.randn(n, k, device="cuda") / k**0.5, QuantDesc("fp8", layout, act=act, act_static=static))
    if static:
        w.input_scale = torch.tensor(0.011, device="cuda")  # some of x saturates at +-448 * 0.011
    return w


def _x(k, dt):
    x = torch.randn(1, k, device="cuda") * torch.rand((), device="cuda") * 4
    x[0, :5] = 0
    return x.to(dt)


def _ours(w: QWeight, x, bias, decode="int"):
    n, k = w.shape
    per_channel = w.desc.scale_layout == "per_channel"
    spec = G.spec_for(n, k, {v: k_ for k_, v in DT.items()}[x.dtype], bias is not None, per_channel,
                      w.desc.act_static, "test", torch.cuda.get_device_properties(0).multi_processor_count, decode)
    out = torch.full((1, n), float("nan"), device="cuda", dtype=x.dtype)
    G.gemv_fp8(spec, x, w.q, w.scale.reshape(-1) if per_channel else w.scale.reshape(()), out, bias,
               w.input_scale.float().reshape(()) if w.desc.act_static else None)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "output has NaNs: an element was never written"
    return out


def _path(w: QWeight, x, bias, switch):
    """QGemm's result with the one-row kernel switched on ("1") or off ("0": act-quant + cuBLASLt)."""
    gemm = cuda_quant.prepare([w], [(0, w.shape[0])], dtype=x.dtype, origin="test")
    saved = cuda_quant.FP8_GEMV
    try:
        cuda_quant.FP8_GEMV = switch
        return gemm(x, bias)
    finally:
        cuda_quant.FP8_GEMV = saved


@pytest.mark.parametrize("n,k", LLAMA3 + ODD)
@pytest.mark.parametrize("layout, act, static", MODES)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_and_the_w8a8_path(n, k, layout, act, static, dtype, bias):
    """Against QWeight.linear: the same fp8 products summed in fp32 in another order (fp32: ~1e-6; bf16:
    one rounding of that). Against the cuBLASLt path: its fp8 accumulator keeps ~14 bits between
    promotions (tests/gpu/test_quant_kernels.py: ~1e-4 at K=512), hence 1e-3 in fp32."""
    dt = DT[dtype]
    w = _weight(n, k, layout, act, static)
    x = _x(k, dt)
    b = torch.randn(n, device="cuda").to(dt) if bias else None
    out = _ours(w, x, b)
    want = w.linear(x, b)
    if dtype == "fp32":
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    else:
        torch.testing.assert_close(out.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.float().abs().max()))
    # QGemm's one-row branch is this kernel, in the decode it is set to (fp32 x: "int")
    assert torch.equal(_path(w, x, b, "1"), out if dtype == "fp32" or cuda_quant.FP8_GEMV_DECODE == "int"
                       else _ours(w, x, b, cuda_quant.FP8_GEMV_DECODE))
    if n % 16 or k % 16:
        return  # the off path (cuBLASLt's fp8 GEMM) needs both dimensions multiples of 16
    off = _path(w, x, b, "0")
    assert rel(out, off) <= (1e-3 if dtype == "fp32" else 1.5e-2), rel(out, off)


@pytest.mark.parametrize("n,k", [(4096, 14336), (33, 1008), (203, 2064)])
@pytest.mark.parametrize("layout, act, static", MODES)
def test_cvt_decode_equals_int_decode(n, k, layout, act, static):
    """The two weight decodes give the same floats and the same sums (same order): bit-equal outputs."""
    w = _weight(n, k, layout, act, static)
    x = _x(k, torch.float32)
    b = torch.randn(n, device="cuda")
    assert torch.equal(_ours(w, x, b, "cvt"), _ours(w, x, b, "int"))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("k", [1024, 1008, 4096])
def test_activation_quantization_is_bit_exact(k, per_channel, static):
    """An identity weight (e4m3 1.0 on the diagonal): each output is one product, no sum, so the kernel's
    x quantization and scaling are compared bit for bit with the reference's (and with QGemm's
    act-quant kernel: the same fp8 values and scale)."""
    desc = QuantDesc("fp8", "per_channel" if per_channel else "per_tensor", act="fp8_tensor", act_static=static)
    q = torch.eye(k, device="cuda").to(torch.float8_e4m3fn)
    scale = torch.rand(k, device="cuda") + 0.5 if per_channel else torch.tensor(1.0, device="cuda")
    w = QWeight(desc, (k, k), q, scale, input_scale=torch.tensor(0.013, device="cuda") if static else None)
    x = (torch.randn(1, k, device="cuda") * 3)
    x[0, :3] = torch.tensor([0.0, 1e3, -1e-30])  # a zero, a saturating value, one that rounds to 0
    for decode in ("int", "cvt"):  # fp32 x ("mma" takes 16-bit x: test_mma_quantizes_x_as_int_does)
        out = _ours(w, x, None, decode)
        assert torch.equal(out, w.linear(x)), (out - w.linear(x)).abs().max()
    gemm = cuda_quant.prepare([w], [(0, k)], dtype=torch.float32)
    xq, sx = gemm.quantize_act(x)
    sw = scale.reshape(1, -1) if per_channel else scale
    assert torch.equal(out, xq.float() * sx * sw)


@pytest.mark.parametrize("n,k", LLAMA3 + ODD + [(10576, 2560), (2560, 5120)])
@pytest.mark.parametrize("layout, act, static", MODES)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("bias", [False, True])
def test_mma_matches_reference_and_int(n, k, layout, act, static, dtype, bias):
    """The tensor-core variant (fp16 MMAs of the same exact e4m3 values, fp32 accumulators): within one
    rounding to the run dtype of QWeight.linear and of the CUDA-core ("int") variant."""
    dt = DT[dtype]
    w = _weight(n, k, layout, act, static)
    x = _x(k, dt)
    b = torch.randn(n, device="cuda").to(dt) if bias else None
    out = _ours(w, x, b, "mma")
    want = w.linear(x, b).float()
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    assert rel(out, _ours(w, x, b, "int")) <= 1e-2


@pytest.mark.parametrize("k", [1024, 1008, 4096])
@pytest.mark.parametrize("per_channel", [False, True])
def test_mma_quantizes_x_as_int_does(k, per_channel):
    """An identity weight, bf16 x: each output one product, so the tensor-core variant's x quantization
    and scaling equal the CUDA-core variant's bit for bit (and the reference's)."""
    desc = QuantDesc("fp8", "per_channel" if per_channel else "per_tensor", act="fp8_tensor")
    q = torch.eye(k, device="cuda").to(torch.float8_e4m3fn)
    scale = torch.rand(k, device="cuda") + 0.5 if per_channel else torch.tensor(1.0, device="cuda")
    w = QWeight(desc, (k, k), q, scale)
    x = (torch.randn(1, k, device="cuda") * 3).bfloat16()
    x[0, :3] = torch.tensor([0.0, 1e3, -1e-30])
    out = _ours(w, x, None, "mma")
    assert torch.equal(out, _ours(w, x, None, "int"))
    assert torch.equal(out, w.linear(x))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_quotients_are_ieee_at_any_scale(dtype):
    """x's quantization (gemv_fp8_x.cuh.j2 quant4_f16: IEEE division, clamp, satfinite conversion) against
    torch's, bit for bit through an identity weight: static scales from 1e-37 to 1e37, x over 20 decades
    with its signs, zeros, values that saturate or overflow; 64 scales x 16,384 quotients, in both decodes."""
    k = 16384
    q = torch.eye(k, device="cuda").to(torch.float8_e4m3fn)
    gen = torch.Generator(device="cuda").manual_seed(7)
    for scale in torch.logspace(-37, 37, 64).tolist():
        desc = QuantDesc("fp8", "per_tensor", act="fp8_tensor", act_static=True)
        w = QWeight(desc, (k, k), q, torch.tensor(1.0, device="cuda"), input_scale=torch.tensor(scale, device="cuda"))
        mag = torch.pow(10.0, torch.empty(k, device="cuda").uniform_(-10, 10, generator=gen))
        x = (mag * scale * torch.randn(k, device="cuda", generator=gen).sign()).reshape(1, k)
        x[0, :4] = torch.tensor([0.0, 448.5 * scale, -1e30, 3.0 * scale])
        x = x.to(DT[dtype])
        want = w.linear(x)
        for decode in ("int", "mma") if dtype != "fp32" else ("int",):
            out = _ours(w, x, None, decode)
            bad = (out != want) & ~(out.isnan() & want.isnan())
            assert not bad.any(), (scale, decode, x[bad][:4], out[bad][:4], want[bad][:4])


def test_every_mma_rows_and_ksplit():
    """Each (rows, ksplit) of the tensor-core variant, not only the chooser's picks, at an odd shape."""
    n, k = 203, 2064
    w = _weight(n, k, "per_channel", "fp8_token", False)
    x = _x(k, torch.bfloat16)
    b = torch.randn(n, device="cuda").bfloat16()
    want = w.linear(x, b).float()
    for rows in G.MMA_ROWS:
        for ks in G.KSPLITS:
            out = torch.full((1, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            spec = G.Fp8GemvSpec(n, k, True, "bf16", "test", True, False, rows, ks, decode="mma")
            G.gemv_fp8(spec, x, w.q, w.scale, out, b)
            torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_every_rows_and_ksplit():
    """Each (rows, ksplit) the chooser may pick, not only its picks, at an odd shape."""
    n, k = 203, 2064
    w = _weight(n, k, "per_channel", "fp8_token", False)
    x = _x(k, torch.float32)
    b = torch.randn(n, device="cuda")
    want = w.linear(x, b)
    for rows in G.ROWS:
        for ks in G.KSPLITS:
            out = torch.full((1, n), float("nan"), device="cuda")
            G.gemv_fp8(G.Fp8GemvSpec(n, k, True, "fp32", "test", True, False, rows, ks), x, w.q, w.scale, out, b)
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_fused_siblings_through_qgemm():
    """Fused per-tensor siblings (one shared scale) with bias, and fp16, through QGemm's one-row branch."""
    ws = share_scale([_weight(r, 1024, "per_tensor", "fp8_tensor", False) for r in (96, 32)])
    gemm = cuda_quant.prepare(ws, [(0, 96), (96, 32)], dtype=torch.float16, origin="test")
    x = _x(1024, torch.float16)
    bias = torch.randn(128, device="cuda").half()
    saved = cuda_quant.FP8_GEMV
    try:
        cuda_quant.FP8_GEMV = "pdl"
        y = gemm(x, bias)
    finally:
        cuda_quant.FP8_GEMV = saved
    for (s, r), w in zip([(0, 96), (96, 32)], ws):
        assert rel(y[:, s:s + r], w.linear(x, bias[s:s + r])) <= 2e-3


@pytest.mark.parametrize("decode", ["int", "mma"])
def test_in_a_cuda_graph(decode):
    """Captured (as the decode graphs capture it) and replayed with a new x: the amax is measured again."""
    w = _weight(4096, 4096, "per_tensor", "fp8_tensor", False)
    x = _x(4096, torch.bfloat16)
    spec = G.spec_for(4096, 4096, "bf16", False, origin="test", decode=decode)
    out = torch.empty(1, 4096, device="cuda", dtype=torch.bfloat16)
    G.gemv_fp8(spec, x, w.q, w.scale, out, pdl=True)  # compiled and loaded before the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(3):  # a chain of dependent launches inside the graph
            G.gemv_fp8(spec, x, w.q, w.scale, out, pdl=True)
    out.fill_(float("nan"))
    x.copy_(torch.randn(1, 4096, device="cuda") * 17)
    g.replay()
    torch.cuda.synchronize()
    want = w.linear(x)
    torch.testing.assert_close(out.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.float().abs().max()))


# ---- whole models: decode of one sequence (every GEMM one row) with the switch on against off

LLAMA = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=512, max_position_embeddings=512)


def _model_kernels() -> int:
    """fp8 GEMV kernels loaded for a model's linears (their origin a spec position, not this file's)."""
    return sum(isinstance(spec, G.Fp8GemvSpec) and spec.origin != "test" for spec, _ in _loaded)


def _cuda_twin(ref):
    return LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                       ref.device)


def _decode(ref) -> list[list[torch.Tensor]]:
    """A prefill of 23 tokens, then 6 one-row decode steps (CUDA graph replays) through the reference and
    a cuda twin: per step, [reference logits, cuda logits] (fp32 copies)."""
    models = [ref, _cuda_twin(ref)]
    kvs = [KVStore(ref.plan.sites, 64, 16, ref.dtype, "cuda") for _ in models]
    torch.manual_seed(1)
    tokens = torch.randint(0, 1000, (23,))
    table = tuple(range(8))
    res = []
    with torch.no_grad():
        for m, kv in zip(models, kvs):
            m.model.forward(StepBatch(tokens, [SeqSlice(0, 23, 0, table)]), kv)
        for step in range(6):
            nxt = torch.randint(0, 1000, (1,))
            # clone: an fp32 graph replay returns a view of the graph's output buffer (`.float()` is then
            # no copy), which the next replay overwrites
            res.append([m.model.forward(StepBatch(nxt, [SeqSlice(0, 1, 23 + step, table)]), kv).float().clone()
                        for m, kv in zip(models, kvs)])
    return res


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_sequence_decode_logits_with_the_switch_match_without(scheme, dtype, monkeypatch):
    """A prefill, then 6 one-row decode steps (CUDA graph replays): the logits with the switch on within
    the W8A8 tolerance of test_quant_kernels.py's whole-model test (5e-2: an fp32 rounding difference
    can move an activation across an fp8 step) of the switch off and of the reference."""
    ref = random_model("llama", LLAMA, dtype=dtype, device="cuda", seed=0, quantization=scheme)
    outs = {}
    for switch in ("0", "1"):
        monkeypatch.setattr(cuda_quant, "FP8_GEMV", switch)
        outs[switch] = _decode(ref)
    for (ref_off, off), (ref_on, on) in zip(outs["0"], outs["1"]):
        assert rel(on, off) <= 5e-2 and rel(on, ref_on) <= 5e-2, (rel(on, off), rel(on, ref_on), rel(off, ref_off),
                                                                  rel(ref_on, ref_off))
    assert _model_kernels(), "the fp8 GEMV never ran"


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
def test_one_sequence_bf16_decode_with_mma_matches_int(scheme, monkeypatch):
    """bf16 decode of one sequence (CUDA graph replays) with the tensor-core variant against the CUDA-core
    one and the reference, at the whole-model W8A8 tolerance above."""
    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0, quantization=scheme)
    monkeypatch.setattr(cuda_quant, "FP8_GEMV", "pdl")
    outs = {}
    for decode in ("int", "mma"):
        monkeypatch.setattr(cuda_quant, "FP8_GEMV_DECODE", decode)
        outs[decode] = _decode(ref)
    for (_, a), (ref_on, b) in zip(outs["int"], outs["mma"]):
        assert rel(b, a) <= 5e-2 and rel(b, ref_on) <= 5e-2, (rel(b, a), rel(b, ref_on))
    assert any(isinstance(spec, G.Fp8GemvSpec) and spec.decode == "mma" and spec.origin != "test"
               for spec, _ in _loaded), "the tensor-core variant never ran"


def test_engine_with_programmatic_launches_equals_plain(monkeypatch):
    """fp32 greedy decoding through the engine, one sequence at a time (every decode GEMM one row, in
    CUDA graphs): the same tokens with the fp8 GEMV launched as programmatic dependents as with plain
    launches (the same arithmetic, so any difference is an ordering bug). Against the switch off (act-quant
    + cuBLASLt) only logits are compared (test_one_sequence_decode_logits_with_the_switch_match_without):
    cuBLASLt's fp8 accumulator keeps ~14 bits and its algorithm follows its workspace's state, so greedy
    tokens of this random model flipped at a near-tie between engines of one process (H200, session 12)."""
    ref = random_model("llama", LLAMA, dtype="fp32", device="cuda", seed=0, quantization="fp8")
    rng = random.Random(0)
    reqs = [([rng.randrange(1000) for _ in range(rng.randint(1, 40))], rng.randint(2, 12)) for _ in range(3)]

    def run(switch):
        monkeypatch.setattr(cuda_quant, "FP8_GEMV", switch)
        tokens, _ = greedy_through_engine(_cuda_twin(ref), reqs, EngineConfig(page_size=16, num_pages=64,
                                                                              max_num_seqs=1, max_tokens_per_step=64))
        return tokens

    plain = run("1")
    on = run("pdl")
    assert on == plain
    assert _model_kernels(), "the fp8 GEMV never ran"
