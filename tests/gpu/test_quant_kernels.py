"""The cuda backend's quantized linears on the GPU against the reference semantics (`QWeight.linear`):
the generated weight-only kernels (GEMV for T <= 64, dequantize + cuBLAS beyond) for int4 (RTN,
symmetric, GPTQ act-order), int8 per channel and ggml q4_0 / q4_1 / q8_0, fused siblings with bias;
then whole models, cuda vs reference with the same quantization, and SmolLM2 from its own Q4_1 blocks."""

from __future__ import annotations

import random

import gguf
import numpy as np
import pytest
import torch
from kiln.codegen.specs import KernelSpecError
from kiln.dsl.quant import QuantDesc, QWeight, quantize_weight, share_scale
from kiln.runtime import cuda_quant
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import LoadedModel, load_model, make_backend, random_model

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {"bf16": 1.5e-2, "fp32": 1e-4}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def _int4(n, k, act_order=False, zeros=True, group=128):
    w = quantize_weight(torch.randn(n, k, device="cuda") * 0.05, QuantDesc("int4", "per_group", group, zero_points=True))
    desc = QuantDesc("int4", "per_group", group, zero_points=zeros, act_order=act_order)
    if act_order:
        perm = torch.randperm(k, device="cuda")
        g_idx = torch.empty(k, dtype=torch.int32, device="cuda")
        g_idx[perm] = (torch.arange(k, device="cuda") // group).int()
        return QWeight(desc, w.shape, w.q, w.scale, w.zero, g_idx)
    return QWeight(desc, w.shape, w.q, w.scale, w.zero if zeros else None)


def _gguf(n, k, kind):
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    data = gguf.quants.quantize(np.random.default_rng(n).standard_normal((n, k), dtype=np.float32) * 0.05, qtype)
    q = torch.from_numpy(np.ascontiguousarray(data)).reshape(n, -1).cuda()
    return QWeight(QuantDesc(f"gguf_{kind}", "blocks"), (n, k), q, torch.empty(0, device="cuda"))


def _k_quant(n, k, kind):  # (random K-quant blocks: gguf-py cannot quantize to them; tests/test_quant_layout.py)
    from tests.test_quant_layout import _k_blocks

    w = _k_blocks(n, k, kind)
    return QWeight(w.desc, w.shape, w.q.cuda(), torch.empty(0, device="cuda"))


def _int8(n, k):
    return quantize_weight(torch.randn(n, k, device="cuda"), QuantDesc("int8", "per_channel"))


# (make one sibling of [rows, k], k, sibling row counts): fused siblings with zero rows between
FORMATS = {
    "int4": (lambda n, k: _int4(n, k), 512, (96, 40)),
    "int4-symmetric": (lambda n, k: _int4(n, k, zeros=False), 256, (64,)),
    "int4-act-order": (lambda n, k: _int4(n, k, act_order=True), 512, (64, 32, 32)),
    "int8": (_int8, 320, (48, 24)),
    "q4_0": (lambda n, k: _gguf(n, k, "q4_0"), 288, (40, 16)),
    "q4_1": (lambda n, k: _gguf(n, k, "q4_1"), 576, (64,)),
    "q8_0": (lambda n, k: _gguf(n, k, "q8_0"), 320, (32, 32)),
    "q4_k": (lambda n, k: _k_quant(n, k, "q4_k"), 512, (40, 16)),
    "q5_k": (lambda n, k: _k_quant(n, k, "q5_k"), 256, (32,)),
    "q6_k": (lambda n, k: _k_quant(n, k, "q6_k"), 512, (48, 16)),
}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("T", [1, 3, 16, 64, 300])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantized_linear_matches_reference(fmt, T, dtype, fresh_seed):
    make, k, rows = FORMATS[fmt]
    dt = DTYPES[dtype]
    ws = [make(r, k) for r in rows]
    slices, start = [], 0
    for r in rows:
        slices.append((start, r))
        start += -(-r // 8) * 8 + 8  # a gap of zero rows between siblings, as codegen/fuse.py leaves
    gemm = cuda_quant.prepare(ws, slices, dtype=dt, origin=f"test {fmt}")
    # Act-order siblings each reorder their own input columns: they run as one GEMM each.
    parts = [p for p, _, _ in gemm.parts] if isinstance(gemm, cuda_quant.SplitGemm) else [gemm]
    assert all(p.packed is not None for p in parts), "the generated kernel covers this format"
    biases = [torch.randn(r, device="cuda").to(dt) for r in rows]
    bias = torch.zeros(gemm.out_features, device="cuda", dtype=dt)
    for (s, r), b in zip(slices, biases):
        bias[s:s + r] = b
    x = torch.randn(T, k, device="cuda").to(dt)
    y = gemm(x, bias)
    assert y.shape == (T, gemm.out_features) and y.dtype == dt
    for (s, r), w, b in zip(slices, ws, biases):
        want = w.linear(x, b)
        assert rel(y[:, s:s + r], want) <= TOL[dtype], f"sibling at {s}: {rel(y[:, s:s + r], want)}"
    covered = torch.zeros(gemm.out_features, dtype=torch.bool)
    for s, r in slices:
        covered[s:s + r] = True
    assert torch.count_nonzero(y[:, ~covered.cuda()]) == 0  # zero rows stay zero


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("T", [1, 7, 300])
@pytest.mark.parametrize("layout, act", [("per_tensor", "fp8_tensor"), ("per_channel", "fp8_token")])
def test_fp8_linear_matches_reference(layout, act, T, dtype, fresh_seed):
    """W8A8 fp8 through cuBLASLt (fused siblings, bias) against QWeight.linear on the same input:
    both multiply the same fp8 values, so they agree to the output's rounding in bf16. In fp32, to
    the fp8 tensor cores' accumulator: Hopper keeps about 14 bits of it between promotions to fp32
    (the DeepSeek-V3 report, section 3.3.2), about 1e-4 relative at K=512."""
    dt = DTYPES[dtype]
    tol = {"bf16": TOL["bf16"], "fp32": 5e-4}[dtype]
    desc = QuantDesc("fp8", layout, act=act)
    ws = [quantize_weight(torch.randn(r, 512, device="cuda"), desc) for r in (96, 32)]
    if layout == "per_tensor":  # siblings that one GEMM runs share one weight scale
        ws = share_scale(ws)
    gemm = cuda_quant.prepare(ws, [(0, 96), (96, 32)], dtype=dt, origin="test fp8")
    bias = torch.randn(128, device="cuda").to(dt)
    x = (torch.randn(T, 512, device="cuda") * torch.rand(T, 1, device="cuda") * 10).to(dt)
    y = gemm(x, bias)
    for (s, r), w in zip([(0, 96), (96, 32)], ws):
        want = w.linear(x, bias[s:s + r])
        assert rel(y[:, s:s + r], want) <= tol, f"sibling at {s}: {rel(y[:, s:s + r], want)}"


@pytest.mark.parametrize("k", [512, 4096, 14336])
@pytest.mark.parametrize("T", [16, 300])
@pytest.mark.parametrize("layout, act", [("per_tensor", "fp8_tensor"), ("per_channel", "fp8_token")])
def test_fp8_fast_accumulation_within_bf16_rounding(layout, act, T, k, monkeypatch, fresh_seed):
    """KILN_FP8_FAST_ACCUM=1 (cuBLASLt's fast accumulation: the tensor cores' accumulator, no promotion to fp32
    on the way): the bf16 outputs against QWeight.linear on the same input stay within the bf16 tolerance at
    the 8B model's K, as without it."""
    desc = QuantDesc("fp8", layout, act=act)
    ws = [quantize_weight(torch.randn(r, k, device="cuda"), desc) for r in (96, 32)]
    if layout == "per_tensor":
        ws = share_scale(ws)
    gemm = cuda_quant.prepare(ws, [(0, 96), (96, 32)], dtype=torch.bfloat16, origin="test fp8 fast accum")
    x = (torch.randn(T, k, device="cuda") * torch.rand(T, 1, device="cuda") * 10).to(torch.bfloat16)
    errs = {}
    for on in ("0", "1"):
        monkeypatch.setattr(cuda_quant, "FP8_FAST_ACCUM", on)
        y = gemm(x, None)
        errs[on] = max(rel(y[:, s:s + r], w.linear(x, None)) for (s, r), w in zip([(0, 96), (96, 32)], ws))
    assert errs["1"] <= TOL["bf16"] and errs["0"] <= TOL["bf16"], errs
    monkeypatch.setattr(cuda_quant, "FP8_FAST_ACCUM", "on")
    with pytest.raises(KernelSpecError, match="KILN_FP8_FAST_ACCUM"):
        gemm(x, None)


def test_strided_input_and_graph_capture():
    """A row-strided x (a slice of a fused output) and a CUDA graph replay with new inputs."""
    w = _int4(256, 512)
    gemm = cuda_quant.prepare([w], [(0, 256)], dtype=torch.bfloat16)
    big = torch.randn(4, 1024, device="cuda").bfloat16()
    x = big[:, 256:768]
    assert rel(gemm(x, None), w.linear(x)) <= TOL["bf16"]
    static = torch.randn(2, 512, device="cuda").bfloat16()
    gemm(static, None)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm(static, None)
    static.copy_(torch.randn(2, 512, device="cuda").bfloat16())
    graph.replay()
    assert rel(out, w.linear(static)) <= TOL["bf16"]


LLAMA = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=512, max_position_embeddings=512)


def _compare(ref, cuda, tol, seed):
    """Prefill of 4 sequences of odd lengths, then 4 decode steps (CUDA graph replays)."""
    rng = random.Random(seed)
    lens = [rng.randint(1, 70), 17, 33, 5]
    kvs = [KVStore(ref.plan.sites, 64, 16, ref.dtype, "cuda") for _ in range(2)]
    pages = rng.sample(range(64), 8 * len(lens))
    tables = [tuple(pages[8 * i: 8 * i + 8]) for i in range(len(lens))]
    seqs, start = [], 0
    for i, n in enumerate(lens):
        seqs.append(SeqSlice(start, n, 0, tables[i]))
        start += n
    tokens = torch.randint(0, ref.plan.vocab_size, (start,))
    with torch.no_grad():
        a = ref.model.forward(StepBatch(tokens, seqs), kvs[0], all_logits=True)
        b = cuda.model.forward(StepBatch(tokens, seqs), kvs[1], all_logits=True)
        assert rel(b, a) <= tol, f"prefill: {rel(b, a)}"
        ctx = list(lens)
        for step in range(4):
            nxt = torch.randint(0, ref.plan.vocab_size, (len(lens),))
            dseqs = [SeqSlice(i, 1, ctx[i], tables[i]) for i in range(len(lens))]
            a = ref.model.forward(StepBatch(nxt, dseqs), kvs[0])
            b = cuda.model.forward(StepBatch(nxt, dseqs), kvs[1])
            assert rel(b, a) <= tol, f"decode step {step}: {rel(b, a)}"
            ctx = [c + 1 for c in ctx]


def _cuda_twin(ref):
    return LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                       ref.device)


@pytest.mark.parametrize("dtype, tol", [("bf16", 3e-2), ("fp32", 2e-3)])
@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel", "int8-wo", "int4-wo", "fp8+lm-head", "int8-wo+lm-head",
                                    "int4-wo+lm-head"])
def test_quantized_model_cuda_matches_reference(scheme, dtype, tol, fresh_seed):
    """Each on-load scheme (+lm-head: the LM head quantized too, a GEMV / GEMM of the vocabulary's width)."""
    if scheme.startswith("fp8"):
        # W8A8: every linear rounds its input to fp8 (steps of up to 1/8 of a value), so an fp32
        # rounding difference upstream can move a value across a step; test_fp8_linear_matches_reference
        # checks the GEMMs on equal inputs, exactly. (Fused per-tensor siblings also share one scale.)
        tol = max(tol, 5e-2)
        if scheme.endswith("+lm-head"):
            # the logits are themselves an fp8 GEMM's: a rounding difference upstream that moves one of the head's
            # inputs across an fp8 step moves every logit, with no later layer to average it out (H200: bf16 0.053
            # in session 18, fp32 0.055 in session 19)
            tol = 8e-2
    ref = random_model("llama", LLAMA, dtype=dtype, device="cuda", seed=0, quantization=scheme)
    _compare(ref, _cuda_twin(ref), tol, fresh_seed)


@pytest.mark.parametrize("dtype, tol", [("bf16", 3e-2), ("fp32", 1e-3)])
def test_smollm2_runs_from_its_own_q4_1_blocks(dtype, tol, fresh_seed):
    from kiln.runtime.checkpoint import CheckpointError
    from kiln.runtime.gguf_file import default_model_path

    try:
        path = default_model_path()
    except CheckpointError as e:  # the GPU machine may lack the package (98 MB): the CPU test covers it
        pytest.skip(str(e))
    ref = load_model(path, dtype=dtype, device="cuda", quantization="gguf")
    cuda = _cuda_twin(ref)
    packed = [g for g, _ in cuda.model._gemm.values() if isinstance(g, cuda_quant.QGemm)]
    assert packed and all(g.packed is not None for g in packed)  # no linear runs dequantized
    _compare(ref, cuda, tol, fresh_seed)


# ---- the GEMV variants (stream: split K, shared-memory staging, dependent launch; loop: the first design)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 8, 9, 16, 40])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_gemv_variants_and_splits_match_reference(fmt, T, dtype, fresh_seed):
    """Every K split count the stream kernel accepts, and the loop fallback, against QWeight.linear."""
    from kiln.codegen.quant_kernels import _cps, choose_splits

    make, k, rows = FORMATS[fmt]
    w = make(rows[0], k)
    p = cuda_quant.pack(w)
    x = torch.randn(T, k, device="cuda").to(dtype)
    b = torch.randn(rows[0], device="cuda").to(dtype)
    want = w.linear(x, b)
    nch = -(-k // (64 if p.fmt == "int4" else 32))
    counts = sorted({-(-nch // _cps(p.fmt, k, s)) for s in range(1, 9)})
    assert choose_splits(p.fmt, p.n, k, 8 if T <= 8 else 16, 132) in counts or counts == [1]
    for variant, splits in [("loop", None)] + [("stream", s) for s in counts]:
        p.variant, p.splits = variant, splits
        for _ in range(2):  # twice: the split counters are reset by the last block
            y = p.linear(x, b)
            assert rel(y, want) <= TOL["bf16"], f"{variant} splits={splits}: {rel(y, want)}"


@pytest.mark.parametrize("variant", ["default", "stream", "persist", "warp"])
def test_dependent_launches_chain_in_a_graph(variant, monkeypatch):
    """GEMV -> GEMV -> GEMV, each reading the one before's output, captured and replayed: the
    programmatic dependent launch lets each start early, griddepcontrol.wait keeps the order
    (every variant as the runtime selects it: KILN_QGEMV)."""
    if variant != "default":
        monkeypatch.setenv("KILN_QGEMV", variant)
    dims = [512, 1024, 512, 768]
    ws = [_int4(dims[i + 1], dims[i]) for i in range(3)]
    gemms = [cuda_quant.prepare([w], [(0, w.shape[0])], dtype=torch.bfloat16) for w in ws]
    x = torch.randn(3, dims[0], device="cuda").bfloat16()

    def chain():
        h = x
        for g in gemms:
            h = g(h, None)
        return h

    def ref():
        h = x
        for w in ws:
            h = w.linear(h)
        return h

    if variant != "default":
        assert gemms[0].packed.spec(torch.bfloat16, 8, False).variant == variant
    assert rel(chain(), ref()) <= 3e-2
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        x.copy_(torch.randn(3, dims[0], device="cuda").bfloat16())
        graph.replay()
        assert rel(out, ref()) <= 3e-2


# ---- fp8 activation quantization: the generated kernel against the torch ops, bit for bit


def _fp8_gemm(act, static, k, rows=64):
    desc = QuantDesc("fp8", "per_tensor" if act == "fp8_tensor" else "per_channel", act=act, act_static=static)
    w = quantize_weight(torch.randn(rows, k, device="cuda"), desc)
    if static:
        w.input_scale = torch.tensor(0.037, device="cuda")
    return cuda_quant.prepare([w], [(0, rows)], dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 7, 300])
@pytest.mark.parametrize("act, static", [("fp8_tensor", False), ("fp8_tensor", True), ("fp8_token", False)])
def test_fp8_act_quant_kernel_is_bit_equal_to_torch(act, static, T, dtype, fresh_seed):
    gemm = _fp8_gemm(act, static, 4096)
    x = (torch.randn(T, 4096, device="cuda") * torch.rand(T, 1, device="cuda") * 30).to(dtype)
    x[0, :7] = 0  # zeros and a value past the static scale's range (saturates)
    x[-1, 3] = 1e3
    q, s = gemm.quantize_act(x)
    q_ref, s_ref = gemm.quantize_act_torch(x)
    assert s.shape == s_ref.shape and torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # the GEMM through it equals the GEMM through the torch ops
    saved = cuda_quant.ACT_KERNEL
    try:
        cuda_quant.ACT_KERNEL = True
        y = gemm(x, None)
        cuda_quant.ACT_KERNEL = False
        want = gemm(x, None)
    finally:
        cuda_quant.ACT_KERNEL = saved
    assert torch.equal(y, want)


@pytest.mark.parametrize("unroll", [1, 4, 8])
@pytest.mark.parametrize("per_sm", [2, 8])
@pytest.mark.parametrize("T, k", [(1, 4096), (300, 4096), (2048, 14336), (77, 1000)])
def test_fp8_act_quant_grids_are_bit_equal(unroll, per_sm, T, k, fresh_seed):
    """The per-tensor kernels' grid variants (blocks per SM, loads in flight; bench_kernels --only actquant)
    give the torch ops' bits, static and dynamic, at every size (tails of the unrolled steps included)."""
    from kiln.codegen.quant_kernels import ActQuantSpec, act_partials, act_quant_fp8
    from kiln.dsl.quant import FP8_MAX, scale_of

    x = (torch.randn(T, k, device="cuda") * 7).bfloat16()
    x[-1, -1] = 900.0
    for static in (False, True):
        spec = ActQuantSpec("tensor", k, static, unroll=unroll, origin="test")
        sx = torch.full((), 0.5, device="cuda") if static else torch.empty((), device="cuda")
        want_s = sx.clone() if static else scale_of(x.float().abs().amax(), FP8_MAX)
        q = torch.empty(T, k, device="cuda", dtype=torch.float8_e4m3fn)
        act_quant_fp8(spec, x, q, sx, act_partials(x.device), per_sm=per_sm)
        want = (x.float() / want_s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        assert torch.equal(sx, want_s)
        assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


def test_fp8_act_quant_in_a_graph():
    gemm = _fp8_gemm("fp8_tensor", False, 1024)
    x = torch.randn(4, 1024, device="cuda").bfloat16()
    gemm(x, None)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = gemm.quantize_act(x)
    x.copy_(torch.randn(4, 1024, device="cuda").bfloat16() * 5)
    graph.replay()
    q_ref, s_ref = gemm.quantize_act_torch(x)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("valid", [0, 1, 5, 8])
def test_fp8_act_quant_scale_takes_only_the_valid_rows(valid, fresh_seed):
    """A padded graph step's rows past `valid_rows` (never written, or another sequence's values: here 1e30)
    have no say in the measured per-tensor scale, in the kernel and in the torch ops alike; the real rows'
    bytes are then what the unpadded rows alone give."""
    gemm = _fp8_gemm("fp8_tensor", False, 1024)
    x = (torch.randn(8, 1024, device="cuda") * 3).bfloat16()
    x[valid:] = 1e30
    n = torch.tensor([valid], dtype=torch.int32, device="cuda")
    q, s = gemm.quantize_act(x, n)
    q_t, s_t = gemm.quantize_act_torch(x, n)
    assert torch.equal(s, s_t)
    if valid:
        q_ref, s_ref = gemm.quantize_act_torch(x[:valid])
        assert torch.equal(s, s_ref)
        assert torch.equal(q[:valid].view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.equal(q_t[:valid].view(torch.uint8), q_ref.view(torch.uint8))
    else:  # no real row: the floor of the scale (amax 0)
        assert float(s) == pytest.approx(1e-12 / 448)


# ---- the persist variant (a device-sized grid; each block stages x once for its tiles, one ring per warp
# across tiles) and the shared-memory check that replaced stream's CudaDriverError


def _persist_cases(p, tokens):
    """(splits, tiles per block): the pick, every split count whose x slice fits, and 1 and 3 tiles per
    block for the pick (ring wrap-around across tiles, ragged last block)."""
    from kiln.codegen.quant_kernels import SMEM_MAX, _split_counts, choose_persist, persist_smem, persist_tpb

    pick = choose_persist(p.fmt, p.n, p.k, tokens, 132)
    out = {pick, (pick[0], 1), (pick[0], 3)}
    for s in _split_counts(p.fmt, p.k):
        if persist_smem(p.fmt, p.k, tokens, s) <= SMEM_MAX:
            out.add((s, persist_tpb(p.fmt, p.n, p.k, tokens, 132, s)))
    return sorted(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 8, 9, 16, 40])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_gemv_persist_matches_reference(fmt, T, dtype, fresh_seed):
    """Every format the template serves (int4 with / without zeros, act-order, int8, q4_0 / q4_1 /
    q8_0), fused siblings' row counts, bias, K splits and tiles per block, against QWeight.linear."""
    make, k, rows = FORMATS[fmt]
    n = sum(rows) + 40  # a ragged last tile and several tiles per block
    w = make(n, k)
    p = cuda_quant.pack(w)
    x = torch.randn(T, k, device="cuda").to(dtype)
    b = torch.randn(n, device="cuda").to(dtype)
    want = w.linear(x, b)
    for splits, tpb in _persist_cases(p, 8 if T <= 8 else 16):
        p.variant, p.splits, p.tpb = "persist", splits, tpb
        for _ in range(2):  # twice: the split counters are reset by the last block
            y = p.linear(x, b)
            assert rel(y, want) <= TOL["bf16"], f"persist splits={splits} tpb={tpb}: {rel(y, want)}"
        assert rel(p.linear(x, None), w.linear(x)) <= TOL["bf16"]


@pytest.mark.parametrize("T", [1, 16, 64])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_gemv_persist_llama3_shapes(n, k, T, fresh_seed):
    """Llama-3-8B's linears (int4 group 128, zero points): the persist pick and every K split that
    fits, the stream pick, and the loop, all against the reference (and, exactly, each other's
    inputs: the same packed weight)."""
    from kiln.codegen.quant_kernels import choose_persist, choose_splits

    w = _int4(n, k)
    p = cuda_quant.pack(w)
    x = torch.randn(T, k, device="cuda").bfloat16()
    want = w.linear(x)
    tokens = 8 if T <= 8 else 16
    cases = [("persist", s, t) for s, t in _persist_cases(p, tokens)]
    cases += [("stream", choose_splits("int4", n, k, tokens, 132), None), ("loop", None, None)]
    assert choose_persist("int4", n, k, tokens, 132) in [(s, t) for _, s, t in cases]
    for variant, splits, tpb in cases:
        p.variant, p.splits, p.tpb = variant, splits, tpb
        y = p.linear(x, None)
        assert rel(y, want) <= TOL["bf16"], f"{variant} splits={splits} tpb={tpb}: {rel(y, want)}"


def test_stream_split_past_shared_memory_is_refused():
    """The down projection (14336 columns) at 16 tokens with 1 or 2 K splits needed 459 / 241 KB of
    shared memory: cuFuncSetAttribute failed (CudaDriverError). The spec now refuses it, naming the
    field, and the default pick fits and runs."""
    from kiln.codegen.quant_kernels import choose_splits
    from kiln.codegen.specs import KernelSpecError

    w = _int4(4096, 14336)
    p = cuda_quant.pack(w)
    x = torch.randn(16, 14336, device="cuda").bfloat16()
    for s in (1, 2):
        p.variant, p.splits = "stream", s
        with pytest.raises(KernelSpecError, match=r"\.splits:.*shared memory"):
            p.linear(x, None)
    p.splits = choose_splits("int4", 4096, 14336, 16, 132)
    assert rel(p.linear(x, None), w.linear(x)) <= TOL["bf16"]


# ---- the warp variant (issue #13: codegen/gemv.py's design on the int4 tile layout, T <= WARP_MAX_T)

WARP_SHAPES = [(6144, 4096, 128), (4096, 4096, 128), (28672, 4096, 128), (4096, 14336, 128),
               (80, 2560, 128), (100, 2560, 64), (4096, 4096, 64), (33, 2560, 2560), (256, 8192, 1024)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["zeros", "symmetric", "act-order"])
@pytest.mark.parametrize("n, k, group", WARP_SHAPES)
def test_gemv_warp_matches_reference(n, k, group, kind, dtype, fresh_seed):
    """Llama-3-8B's linears and odd shapes (ragged tiles, group 64, one group per row, a group spanning
    a batch of loads), AWQ / RTN zero points, symmetric, GPTQ act-order (x's columns permuted before the
    kernel), T = 1..4 and 8, with and without bias, against QWeight.linear; 9 rows take the loop."""
    from kiln.codegen.quant_kernels import WARP_MAX_T

    w = _int4(n, k, act_order=kind == "act-order", zeros=kind != "symmetric", group=group)
    p = cuda_quant.pack(w)
    assert p is not None and (p.perm is not None) == (kind == "act-order")
    p.variant = "warp"
    assert p.spec(dtype, 8, True).variant == "warp"
    b = torch.randn(n, device="cuda").to(dtype)
    for T in (1, 2, 3, 4, WARP_MAX_T, WARP_MAX_T + 1):
        x = torch.randn(T, k, device="cuda").to(dtype)
        for _ in range(2):  # no state between calls
            y = p.linear(x, b)
            assert rel(y, w.linear(x, b)) <= TOL["bf16"], f"T={T}: {rel(y, w.linear(x, b))}"
        assert rel(p.linear(x, None), w.linear(x)) <= TOL["bf16"], f"T={T} without bias"


@pytest.mark.parametrize("bps", [2, 3])
@pytest.mark.parametrize("tpw", [1, 2, 4])
@pytest.mark.parametrize("ksplit", [1, 2, 4, 8])
def test_gemv_warp_every_tpw_and_ksplit(tpw, ksplit, bps, fresh_seed):
    """Off the chooser's picks (and 3 blocks per SM): ragged tiles (a grid's last warps past the weight), K slices of unequal
    chunk counts, a strided x, against the reference."""
    from kiln.codegen.quant_kernels import QGemvSpec, qgemv

    n, k = 203, 2560
    w = _int4(n, k)
    p = cuda_quant.pack(w)
    spec = QGemvSpec("int4", "post", n, k, 128, 8, False, "bf16", "t", "warp", tpw=tpw, ksplit=ksplit, bps=bps)
    xs = torch.randn(3, k + 64, device="cuda").bfloat16()
    x = xs[:, :k]  # rows 16-byte aligned, not contiguous
    out = torch.empty(3, n, device="cuda", dtype=torch.bfloat16)
    qgemv(spec, x, p.wq, p.records(torch.bfloat16), out)
    assert rel(out, w.linear(x)) <= TOL["bf16"]


def test_gemv_warp_refuses_more_rows():
    from kiln.codegen.kernels import KernelArgError
    from kiln.codegen.quant_kernels import WARP_MAX_T, QGemvSpec, qgemv

    w = _int4(64, 512)
    p = cuda_quant.pack(w)
    x = torch.randn(WARP_MAX_T + 1, 512, device="cuda").bfloat16()
    out = torch.empty(WARP_MAX_T + 1, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(KernelArgError, match="warp variant takes 1 to"):
        qgemv(QGemvSpec("int4", "post", 64, 512, 128, variant="warp"), x, p.wq, p.records(torch.bfloat16), out)


def _packs(model):
    out = []
    for g, _ in model.model._gemm.values():
        for part in ([q for q, _, _ in g.parts] if isinstance(g, cuda_quant.SplitGemm) else [g]):
            if isinstance(part, cuda_quant.QGemm) and part.packed is not None:
                out.append(part.packed)
    return out


@pytest.mark.parametrize("dtype, tol", [("bf16", 3e-2)])
def test_engine_with_the_warp_gemv_equals_the_loop(dtype, tol, monkeypatch, fresh_seed):
    """A random INT4 (RTN, group 128) Llama on the cuda backend: prefill (the loop: more rows) and four
    decode steps of 4 sequences (the warp kernel, CUDA-graph replays) with KILN_QGEMV=warp (the default),
    against the same model on the loop variant (pinned) and against the reference."""
    from kiln.codegen.quant_kernels import default_variant

    monkeypatch.delenv("KILN_QGEMV", raising=False)
    assert default_variant() == "warp"
    ref = random_model("llama", LLAMA, dtype=dtype, device="cuda", seed=0, quantization="int4-wo")
    base = _cuda_twin(ref)
    for p in _packs(base):
        p.variant = "loop"
    warp = _cuda_twin(ref)
    packs = _packs(warp)
    assert packs and all(p.spec(DTYPES[dtype], 8, False).variant == "warp" for p in packs)
    assert all(p.spec(DTYPES[dtype], 8, False).variant == "loop" for p in _packs(base))
    _compare(base, warp, tol, fresh_seed)
    _compare(ref, warp, tol, fresh_seed)


# ---- the int4 gate+up GEMV with the gated activation in its epilogue (session 16, KILN_INT4_GEMV_EPILOGUE=1):
# the weight's halves packed in (gate, up) pairs (Packed.paired); CPU checks: tests/test_qgemv_gated.py

GATED_SHAPES = [(28672, 4096, False), (96, 512, True), (8192, 2560, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k, bias", GATED_SHAPES)
@pytest.mark.parametrize("halves", ["gate-first", "up-first"])
def test_gemv_gated_equals_the_gemv_then_the_activation(n, k, bias, halves, dtype, fresh_seed):
    """The paired weight through every path (the warp GEMV at up to 8 rows, the loop at 20, dequantize + cuBLAS
    at 80) gives the unpaired weight's bits in W's order; the epilogue gives the activation kernel's bits on
    them (g and u rounded as stored, then act(g) * u rounded as act.cu.j2 rounds it)."""
    from kiln.codegen import kernels as K
    from kiln.codegen.quant_kernels import pack
    from kiln.codegen.specs import ActSpec, dtype_name

    h = n // 2
    g, u = (0, h) if halves == "gate-first" else (h, 0)
    p = pack(_int4(n, k))
    pp = p.paired(g, u)
    b = torch.randn(n, device="cuda", dtype=dtype) * 0.1 if bias else None
    act = ActSpec("silu", True, h, dtype_name(dtype))
    for T, x, y in _same_rows_in_w_order(p, pp, k, dtype, b):
        ref = torch.empty(T, h, device="cuda", dtype=dtype)
        K.activation(act, ref, gate=y[:, g:g + h], up=y[:, u:u + h])
        assert torch.equal(pp.gated(x, b, act), ref), T


def _same_rows_in_w_order(p, pp, k: int, dtype: torch.dtype, b):
    """A repacked weight pp through every path (the warp GEMV at up to 8 rows, the loop at 20, dequantize + cuBLAS at
    80) gives p's bits in W's order; yields (T, x, p's output) at the rows a fused epilogue takes (up to 8)."""
    for T in (1, 3, 8, 20, 80):
        x = torch.randn(T, k, device="cuda", dtype=dtype)
        y = p.linear(x, b)
        assert torch.equal(pp.linear(x, b), y), T
        if T <= 8:
            yield T, x, y


def test_engine_with_the_int4_gated_epilogue_equals_without(monkeypatch, fresh_seed):
    """A random INT4 Llama on the cuda backend, KILN_INT4_GEMV_EPILOGUE 0 / 1: prefill and four decode steps
    of 4 sequences (CUDA-graph replays: the fused launch, its rows up to KILN_GEMV_ROWS, here 4) give the same
    logits, bit for bit."""
    _int4_switch_keeps_the_logits(monkeypatch, fresh_seed, "INT4_GEMV_EPILOGUE", "gated", lambda p: p.pairs)


def _int4_switch_keeps_the_logits(monkeypatch, seed, switch_name: str, method: str, layout) -> None:
    """A random INT4 Llama's logits (_decode_logits) with cuda_quant.<switch_name> "0" and "1" are equal bit for bit;
    with "1" every layer's weight has the fused kernel's layout (`layout(packed)` set) and Packed.<method> runs."""
    from kiln.runtime import cuda_backend

    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)
    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0, quantization="int4-wo")
    outs = {}
    for switch in ("0", "1"):
        monkeypatch.setattr(cuda_quant, switch_name, switch)
        cuda = _cuda_twin(ref)
        laid = [p for p in _packs(cuda) if layout(p) is not None]
        assert len(laid) == (LLAMA["num_hidden_layers"] if switch == "1" else 0)
        launched = []
        real = getattr(cuda_quant.Packed, method)
        monkeypatch.setattr(cuda_quant.Packed, method, lambda self, *a, **kw: launched.append(1) or real(self, *a, **kw))
        outs[switch] = _decode_logits(cuda, seed)
        monkeypatch.setattr(cuda_quant.Packed, method, real)
        assert bool(launched) == (switch == "1")
    for a, b in zip(outs["0"], outs["1"]):
        assert torch.equal(a, b)


def _decode_logits(model, seed, seqs: int = 4, steps: int = 4):
    """Prefill of `seqs` (up to 4) sequences (every row's logits), then `steps` decode steps (CUDA graphs; 3
    sequences: a padding row in the bucket of 4): every step's logits."""
    rng = random.Random(seed)
    lens = [rng.randint(1, 70), 17, 33, 5][:seqs]
    kv = KVStore(model.plan.sites, 64, 16, model.dtype, "cuda")
    tables = [tuple(range(8 * i, 8 * i + 8)) for i in range(len(lens))]
    seqs, start = [], 0
    for i, n in enumerate(lens):
        seqs.append(SeqSlice(start, n, 0, tables[i]))
        start += n
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        out.append(model.model.forward(StepBatch(torch.randint(0, model.plan.vocab_size, (start,), generator=gen), seqs),
                                       kv, all_logits=True).clone())
        ctx = list(lens)
        for _ in range(steps):
            nxt = torch.randint(0, model.plan.vocab_size, (len(lens),), generator=gen)
            out.append(model.model.forward(StepBatch(nxt, [SeqSlice(i, 1, ctx[i], tables[i])
                                                           for i in range(len(lens))]), kv).clone())
            ctx = [c + 1 for c in ctx]
    return out


# ---- the int4 qkv GEMV with the rotary + paged KV write in its epilogue (session 18, KILN_INT4_GEMV_ROPE=1): the
# weight's rows packed in the rotary pairs (Packed.rope_paired); CPU checks: tests/test_qgemv_rope.py

def _rope_case(name: str, dtype: torch.dtype, kv_fp8: bool):
    """(rope spec, k, bias) of Llama-3-8B's qkv, and of a small interleaved partial rotation with a bias."""
    import dataclasses

    from kiln.codegen.specs import RopeCacheSpec, dtype_name
    llama3 = RopeCacheSpec(32, 8, 128, 128, 16, theta=500000.0, scaling="llama3", factor=8.0,
                           original_max_position=8192)
    rope, k, bias = {"llama3-8b": (llama3, 4096, False),
                     "interleaved-partial-bias": (dataclasses.replace(llama3, heads=4, kv_heads=2, head_dim=64,
                                                                      rotary_dim=32, layout="interleaved"), 256, True)}[name]
    return dataclasses.replace(rope, dtype=dtype_name(dtype), kv_fp8=kv_fp8), k, bias


@pytest.mark.parametrize("name", ["llama3-8b", "interleaved-partial-bias"])
@pytest.mark.parametrize("dtype, kv_fp8", [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)])
def test_int4_rope_epilogue_equals_the_gemv_then_the_rope_kernel(name, dtype, kv_fp8, fresh_seed):
    """The weight packed in rotary pairs through every path (the warp GEMV at up to 8 rows, the loop at 20,
    dequantize + cuBLAS at 80) gives the unpacked weight's bits in W's order; the epilogue gives q and every cache
    byte of that GEMV then the rotary + KV write kernel (kernels.rope_write_kv), with the padding row (slot -1)
    and every other slot left as they were."""
    from kiln.codegen import kernels as K
    from kiln.codegen.gemv import rope_epilogue_spec
    from kiln.codegen.quant_kernels import pack

    rope, k, bias = _rope_case(name, dtype, kv_fp8)
    hd = rope.head_dim
    qn, kn = rope.heads * hd, rope.kv_heads * hd
    n, qkv = qn + 2 * kn, (0, qn, qn + kn)
    p = pack(_int4(n, k))
    pp = p.rope_paired(rope_epilogue_spec(rope), qkv)
    b = torch.randn(n, device="cuda", dtype=dtype) * 0.1 if bias else None
    pages = 8
    for T, x, y in _same_rows_in_w_order(p, pp, k, dtype, b):
        positions = torch.tensor([7, 4095, 0, 130, 5, 64, 300, 1][:T], device="cuda", dtype=torch.int64)
        slots = torch.tensor([17, 3, -1, 126, 40, 41, 90, 0][:T], device="cuda", dtype=torch.int32)
        shape = (pages, rope.kv_heads, rope.page_size, hd)
        if kv_fp8:  # arbitrary bytes: compared as bytes; unwritten slots keep theirs
            kc = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
            vc = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
        else:
            kc, vc = torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype)
        q_want, kc_want, vc_want = y[:, :qn].clone(), kc.clone(), vc.clone()
        K.rope_write_kv(rope, q_want, y[:, qn:qn + kn], y[:, qn + kn:], positions, slots, kc_want, vc_want,
                        k_scale=0.05, v_scale=0.02)
        q = pp.rope_gemv(x, b, (positions, slots, kc, vc, 0.05, 0.02))
        assert torch.equal(q, q_want), T
        as_bytes = (lambda c: c.view(torch.uint8)) if kv_fp8 else (lambda c: c)
        assert torch.equal(as_bytes(kc), as_bytes(kc_want)) and torch.equal(as_bytes(vc), as_bytes(vc_want)), T


def test_engine_with_the_int4_rope_epilogue_equals_without(monkeypatch, fresh_seed):
    """A random INT4 Llama on the cuda backend, KILN_INT4_GEMV_ROPE 0 / 1: prefill and four decode steps of 4
    sequences (CUDA-graph replays: the fused launch, its rows up to KILN_GEMV_ROWS, here 4) give the same logits,
    bit for bit."""
    _int4_switch_keeps_the_logits(monkeypatch, fresh_seed, "INT4_GEMV_ROPE", "rope_gemv", lambda p: p.rope)
