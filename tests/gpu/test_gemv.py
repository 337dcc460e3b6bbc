"""Issue #18 on a GPU: the decode GEMV (codegen/gemv.py, templates/gemv.cu.j2) against torch's linear,
and the cuda backend with it switched on (runtime/cuda_backend.GEMV, KILN_GEMV) against it off.
Shapes: Mamba-2 2.7B's in_proj / out_proj, Llama-3-8B's, and odd ones (few rows: the K split over a
block's warps; K not a whole number of 512-byte warp steps; rows past the last warp's). Outputs are
poisoned (NaN) first so an unwritten element fails."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import gemv as G  # noqa: E402
from kiln.codegen.launch import _loaded  # noqa: E402
from kiln.runtime import cuda_backend  # noqa: E402
from kiln.runtime.engine import EngineConfig  # noqa: E402

from tests.configs import FAMILY_CONFIGS as FAMILIES  # noqa: E402
from tests.gpu.test_cuda_backend import LLAMA, greedy_through_engine, pair  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = [(10576, 2560), (2560, 5120), (80, 2560), (6144, 4096), (4096, 4096), (4096, 14336), (100, 200),
          (33, 1000), (8, 64)]


def _run(n, k, T, dtype, bias, pdl=False, x=None):
    dt = DT[dtype]
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dt)
    x = torch.randn(T, k, device="cuda").to(dt) if x is None else x
    b = torch.randn(n, device="cuda").to(dt) if bias else None
    spec = G.spec_for(n, k, dtype, bias, "test")
    out = torch.full((T, n), float("nan"), device="cuda", dtype=dt)
    G.gemv(spec, x, w, out, b, pdl=pdl)
    torch.cuda.synchronize()
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    return out, want


def _close(out, want, dtype):
    assert not torch.isnan(out).any(), "output has NaNs: an element was never written"
    if dtype == "fp32":  # fp32 sums in another order: well inside 1e-4
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    else:  # one rounding of an fp32 sum to 16 bits
        tol = 1e-2 if dtype == "bf16" else 2e-3
        torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_torch(n, k, T, dtype, bias):
    out, want = _run(n, k, T, dtype, bias)
    _close(out, want, dtype)


@pytest.mark.parametrize("n,k", [(2560, 5120), (80, 2560)])
def test_gemv_fp16_and_pdl(n, k):
    out, want = _run(n, k, 3, "fp16", True, pdl=True)
    _close(out, want, "fp16")


def test_gemv_reads_a_row_strided_x():
    """x a column slice of a wider buffer (a fused GEMM's output), rows 16-byte aligned."""
    buf = torch.randn(3, 3000, device="cuda").to(torch.bfloat16)
    out, want = _run(2560, 2560, 3, "bf16", False, x=buf[:, 256:256 + 2560])
    _close(out, want, "bf16")


@pytest.mark.parametrize("rows", G.ROWS)
@pytest.mark.parametrize("ksplit", G.KSPLITS)
def test_every_rows_and_ksplit(rows, ksplit):
    """Each (rows, ksplit) the chooser may pick, not only its picks, at an odd shape."""
    n, k, T = 203, 2056, 4
    w = torch.randn(n, k, device="cuda")
    x = torch.randn(T, k, device="cuda")
    b = torch.randn(n, device="cuda")
    out = torch.full((T, n), float("nan"), device="cuda")
    G.gemv(G.GemvSpec(n, k, True, "fp32", "test", rows, ksplit), x, w, out, b)
    _close(out, torch.nn.functional.linear(x, w, b), "fp32")


def test_gemv_in_a_cuda_graph():
    n, k = 2560, 5120
    w = torch.randn(n, k, device="cuda").to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    spec = G.spec_for(n, k, "bf16", False, "test")
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    G.gemv(spec, x, w, out, pdl=True)  # compiled and loaded before the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(3):  # a chain of dependent launches inside the graph
            G.gemv(spec, x, w, out, pdl=True)
    out.fill_(float("nan"))
    x.copy_(torch.randn(1, k, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    _close(out, torch.nn.functional.linear(x.float(), w.float()), "bf16")


def _model_gemv_kernels() -> int:
    """GEMV kernels loaded for a model's linears (their origin a spec position, not this file's)."""
    return sum(isinstance(spec, G.GemvSpec) and spec.origin != "test" for spec, _ in _loaded)


@pytest.mark.parametrize("mode", ["1", "pdl"])
@pytest.mark.parametrize("name", ["llama", "mamba2"])
def test_engine_with_the_gemv_equals_without(name, mode, monkeypatch):
    """fp32 greedy decoding through the engine (decode steps of <= 4 rows in CUDA graphs): the same
    tokens with the GEMV switched on as off, and the GEMV's kernels were loaded."""
    config = LLAMA if name == "llama" else FAMILIES[name]
    rng = random.Random(0)
    vocab = 1000 if name == "llama" else 256
    reqs = [([rng.randrange(vocab) for _ in range(rng.randint(1, 40))], rng.randint(2, 12)) for _ in range(4)]

    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)  # every decode step of <= 4 sequences, not only 1

    def run(switch):
        monkeypatch.setattr(cuda_backend, "GEMV", switch)
        _, cuda = pair(name, config, "fp32")
        tokens, _ = greedy_through_engine(cuda, reqs, EngineConfig(page_size=16, num_pages=64, max_num_seqs=4,
                                                                   max_tokens_per_step=64))
        return tokens

    off = run("0")
    on = run(mode)
    assert on == off
    assert _model_gemv_kernels(), "the GEMV never ran"


def test_bf16_decode_logits_with_the_gemv_match_without(monkeypatch):
    """bf16 llama: the logits of decode steps (1-4 sequences) with the GEMV on within bf16 rounding of off."""
    from kiln.runtime.batch import SeqSlice, StepBatch
    from kiln.runtime.kv_store import KVStore

    outs = {}
    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)
    for switch in ("0", "1"):
        monkeypatch.setattr(cuda_backend, "GEMV", switch)
        _, cuda = pair("llama", LLAMA, "bf16")
        torch.manual_seed(1)
        res = []
        for B in (1, 2, 3, 4):
            kv = KVStore(cuda.plan.sites, 64, 16, cuda.dtype, "cuda")
            lens = [5 + 7 * i for i in range(B)]
            tables = [tuple(range(4 * i, 4 * i + 4)) for i in range(B)]
            tokens = torch.randint(0, 1000, (sum(lens),))
            seqs, start = [], 0
            for i, n in enumerate(lens):
                seqs.append(SeqSlice(start, n, 0, tables[i]))
                start += n
            with torch.no_grad():
                cuda.model.forward(StepBatch(tokens, seqs), kv)
                nxt = torch.randint(0, 1000, (B,))
                res.append(cuda.model.forward(StepBatch(nxt, [SeqSlice(i, 1, lens[i], tables[i]) for i in range(B)]),
                                              kv).float())
        outs[switch] = res
    for a, b in zip(outs["0"], outs["1"]):
        assert float((a - b).norm() / b.norm()) < 2e-2
