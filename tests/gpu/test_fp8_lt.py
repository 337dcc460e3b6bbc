"""Per-tensor fp8 GEMMs through cuBLASLt's fastest measured algorithm inside CUDA graphs (runtime/cuda_lt.py,
KILN_FP8_LT): a plan made in a capture's warm-up computes what `torch._scaled_mm` computes, reads the activation
scale when the graph runs (dynamic scales stay dynamic), and a whole fp8 model's decode graphs give the logits of
its eager steps."""

from __future__ import annotations

import pytest
import torch
from kiln.codegen.specs import KernelSpecError
from kiln.runtime import cuda_lt, cuda_quant
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model

from tests.gpu.test_cuda_backend import LLAMA, rel

pytest.importorskip("nvmath")
E4M3 = torch.float8_e4m3fn


@pytest.mark.parametrize("m, n, k", [(16, 6144, 4096), (256, 4096, 14336), (96, 112, 512)])
def test_plan_in_a_graph_is_scaled_mm(m, n, k):
    plans = cuda_lt.LtPlans(512)
    x = (torch.randn(m, k, device="cuda") * 3).to(E4M3)
    w = (torch.randn(n, k, device="cuda") / k**0.5 * 200).to(E4M3)
    sx, sw = torch.tensor(0.02, device="cuda"), torch.tensor(0.003, device="cuda")

    def want():
        return torch._scaled_mm(x, w.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
    assert plans.mm(x, w, sx, sw, torch.bfloat16, False) is None  # not tuning, not capturing: no plan made
    plans.tuning = True
    assert plans.mm(x, w, sx, sw, torch.bfloat16, False) is None  # made and tuned; eager calls keep _scaled_mm
    plans.tuning = False
    assert len(plans.plans) == 1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = plans.mm(x, w, sx, sw, torch.bfloat16, False)
    assert y is not None and y.shape == (m, n) and y.dtype == torch.bfloat16 and y.is_contiguous()
    graph.replay()
    torch.cuda.synchronize()
    assert rel(y, want()) <= 1e-2
    # new activations and a new activation scale, written into the captured buffers: the replay reads both
    x.copy_((torch.randn(m, k, device="cuda") * 5).to(E4M3))
    sx.fill_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert rel(y, want()) <= 1e-2


def test_rows_out_of_range_and_other_dtypes_take_scaled_mm():
    plans = cuda_lt.LtPlans(64)
    plans.tuning = True
    w = torch.randn(128, 256, device="cuda").to(E4M3)
    one = torch.ones((), device="cuda")
    for m, dt in [(8, torch.bfloat16), (80, torch.bfloat16), (32, torch.float32)]:
        assert plans.mm(torch.randn(m, 256, device="cuda").to(E4M3), w, one, one, dt, False) is None
    assert not plans.plans


def test_setting_checked(monkeypatch):
    monkeypatch.setenv("KILN_FP8_LT", "many")
    with pytest.raises(KernelSpecError, match="KILN_FP8_LT"):
        random_model("models/llama.kiln", dict(LLAMA), dtype="bf16", device="cuda", backend="cuda",
                     quantization="fp8")


@pytest.mark.parametrize("rows", [20, 40])
def test_fp8_model_decode_graphs_equal_eager(monkeypatch, rows):
    # Every per-tensor fp8 GEMM of the graphs at 32 and 48 rows (the buckets of 20 and 40 sequences) through a
    # tuned plan; the logits as the eager steps' (_scaled_mm) within the bf16 tolerance.
    monkeypatch.setenv("KILN_FP8_LT", "512")
    m = random_model("models/llama.kiln", dict(LLAMA), dtype="bf16", device="cuda", backend="cuda", seed=0,
                     quantization="fp8")
    assert m.model._lt is not None
    kv = KVStore(m.plan.sites, 64, 16, m.dtype, "cuda")
    m.model.reserve(64, 256)
    batch = StepBatch(torch.randint(0, LLAMA["vocab_size"], (rows,)),
                      [SeqSlice(i, 1, 7, (i,)) for i in range(rows)])
    with torch.no_grad():
        got = m.model.forward(batch, kv).clone()
        assert m.model.step_counts["decode_graph"] == 1
        assert {k[0] for k in m.model._lt.plans} == {32 if rows == 20 else 48}
        gemms = [w for w, _ in m.model._gemm.values() if isinstance(w, cuda_quant.QGemm)]
        assert gemms and all(g.lt is m.model._lt for g in gemms)
        m.model.use_graphs = m.model.mixed_graphs = False
        want = m.model.forward(batch, kv)
    assert rel(got, want) <= 2e-2
