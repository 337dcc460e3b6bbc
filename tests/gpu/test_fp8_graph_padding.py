"""fp8 W8A8 with a measured per-tensor activation scale in CUDA graphs captured for a bucket of rows
(runtime/cuda_backend.py _Graph, _MixedGraph): the padding rows (token 0, no K/V written, attention output
never written) must not set the scale the step's real rows are quantized with (_Meta.valid, QGemm). Token
0's embedding is made 1e4 times larger here, so padding rows that counted would quantize every real row's
activations to a handful of values: the graphed steps' logits must match eager steps of the same batches
(graphs off), where no padding exists."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.runtime.batch import SeqSlice, StepBatch  # noqa: E402
from kiln.runtime.kv_store import KVStore  # noqa: E402
from kiln.runtime.model import LoadedModel, make_backend, random_model  # noqa: E402

from tests.gpu.test_cuda_backend import LLAMA  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def _run(ref, graphs: bool) -> list[torch.Tensor]:
    """A prompt step of 26 + 13 tokens (the mixed graph of 64 pads 25 rows), then 5 decode steps of the
    two sequences and a third, new one-token sequence (the decode graph of 4 pads one row)."""
    model = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                        ref.device)
    model.model.use_graphs = graphs
    model.model.mixed_graphs = graphs
    kv = KVStore(ref.plan.sites, 64, 16, ref.dtype, "cuda")
    gen = torch.Generator().manual_seed(3)
    tables = (tuple(range(8)), tuple(range(8, 16)), tuple(range(16, 24)))
    out = []
    with torch.no_grad():
        first = StepBatch(torch.randint(1, 1000, (39,), generator=gen),
                          [SeqSlice(0, 26, 0, tables[0]), SeqSlice(26, 13, 0, tables[1])])
        out.append(model.model.forward(first, kv).float().clone())
        third = StepBatch(torch.randint(1, 1000, (1,), generator=gen), [SeqSlice(0, 1, 0, tables[2])])
        out.append(model.model.forward(third, kv).float().clone())
        for step in range(5):
            nxt = torch.randint(1, 1000, (3,), generator=gen)
            batch = StepBatch(nxt, [SeqSlice(0, 1, 26 + step, tables[0]), SeqSlice(1, 1, 13 + step, tables[1]),
                                    SeqSlice(2, 1, 1 + step, tables[2])])  # SeqSlice(start = flat offset, length, context, pages)
            out.append(model.model.forward(batch, kv).float().clone())
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_padding_rows_do_not_set_the_activation_scale(dtype):
    ref = random_model("llama", LLAMA, dtype=dtype, device="cuda", seed=0, quantization="fp8")
    emb = next(w for name, w in ref.model.weights.items() if isinstance(w, torch.Tensor) and w.dim() == 2
               and w.shape[0] == LLAMA["vocab_size"] and "emb" in name)
    emb[0] *= 1e4  # the padding token's row: huge activations in every padded row
    eager = _run(ref, graphs=False)
    graphed = _run(ref, graphs=True)
    for step, (a, b) in enumerate(zip(eager, graphed)):
        # the same per-tensor scales; only cuBLASLt's fp8 accumulation may differ between row counts
        assert rel(b, a) <= 2e-2, (step, rel(b, a))
