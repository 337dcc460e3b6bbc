"""KILN_L2_PREFETCH (runtime/cuda_backend.L2_PREFETCH): in decode steps, the norm kernels and Mamba-2's fused conv +
scan prefetch the next GEMM's weight into L2 (templates/l2_prefetch.cuh.j2). A hint only: decode logits through the
CUDA graphs bit-equal with it off, the hints given to the kernels that take them, a bad value refused by name."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen.specs import KernelSpecError  # noqa: E402
from kiln.runtime import cuda_backend  # noqa: E402
from kiln.runtime.batch import SeqSlice, StepBatch  # noqa: E402
from kiln.runtime.kv_store import KVStore  # noqa: E402
from kiln.runtime.model import LoadedModel, make_backend  # noqa: E402
from kiln.runtime.state_cache import StateStore  # noqa: E402

from tests.configs import FAMILY_CONFIGS  # noqa: E402
from tests.gpu.test_cuda_backend import LLAMA, pair  # noqa: E402


@pytest.mark.parametrize("name", ["llama", "mamba2"])
def test_decode_with_l2_prefetch_hints_is_bit_equal(name, monkeypatch):
    monkeypatch.setattr(cuda_backend, "GEMV", "pdl")
    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)
    config = LLAMA if name == "llama" else FAMILY_CONFIGS[name]
    ref, off = pair(name, config, "bf16")
    on = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype, ref.device)
    hints = []
    for fn in ("norm", "ssm_conv_scan"):
        real = getattr(K, fn)

        def recording(*args, _real=real, **kw):  # the real launch, its hint noted
            hints.append(kw.get("prefetch"))
            return _real(*args, **kw)

        monkeypatch.setattr(K, fn, recording)
    models = {"0": off, "8": on}
    kvs = {k: KVStore(ref.plan.sites, 32, 16, ref.dtype, "cuda", state=StateStore(4)) for k in models}
    tables = ((0, 6), (1, 2, 3, 4, 5, 7))
    vocab = ref.plan.vocab_size
    torch.manual_seed(0)

    def run(batch):  # each model under its own setting (its graphs are captured with it)
        outs = {}
        for k, m in models.items():
            monkeypatch.setattr(cuda_backend, "L2_PREFETCH", k)
            hints.clear()
            outs[k] = m.model.forward(batch, kvs[k])
            if k == "0" or batch.num_tokens > 4:  # off, or a prefill: no hint
                assert all(h is None for h in hints)
        return outs

    with torch.no_grad():
        run(StepBatch(torch.randint(0, vocab, (77,)), [SeqSlice(0, 7, 0, tables[0], state_slot=2),
                                                      SeqSlice(7, 70, 0, tables[1], state_slot=1)]))
        ctx = [7, 70]
        for step in range(6):
            batch = StepBatch(torch.randint(0, vocab, (2,)), [SeqSlice(i, 1, ctx[i], tables[i], state_slot=2 - i)
                                                              for i in (0, 1)])
            outs = run(batch)
            assert torch.isfinite(outs["8"]).all() and torch.equal(outs["8"], outs["0"]), f"decode step {step}"
            ctx = [x + 1 for x in ctx]
    assert on.model._graphs and off.model._graphs, "decode did not run through a CUDA graph"
    # every norm and fused scan step of a decode step names the next GEMM's weight, at most 8 MB of it
    monkeypatch.setattr(cuda_backend, "L2_PREFETCH", "8")
    eager = make_backend(ref.plan, ref.model.weights, "cuda", "cuda")
    eager.use_graphs = eager.mixed_graphs = False
    hints.clear()
    with torch.no_grad():
        eager.forward(StepBatch(torch.randint(0, vocab, (1,)), [SeqSlice(0, 1, 0, (0,), state_slot=0)]),
                      KVStore(ref.plan.sites, 4, 16, ref.dtype, "cuda", state=StateStore(1)))
    streamed = [cuda_backend._streamed(w) for w, _ in eager._gemm.values()]
    weights = {t.data_ptr() for t in streamed if t is not None}
    assert hints and all(h is not None and h[0].data_ptr() in weights and h[1] == 8 << 20 for h in hints)
    monkeypatch.setattr(cuda_backend, "L2_PREFETCH", "yes")
    with pytest.raises(KernelSpecError, match="KILN_L2_PREFETCH='yes'"), torch.no_grad():
        eager.forward(StepBatch(torch.randint(0, vocab, (1,)), [SeqSlice(0, 1, 0, (0,), state_slot=0)]),
                      KVStore(ref.plan.sites, 4, 16, ref.dtype, "cuda", state=StateStore(1)))
