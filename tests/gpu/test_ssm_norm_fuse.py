"""KILN_SSM_NORM_FUSE on a GPU (runtime/cuda_ssm.py, codegen/ssm_kernels.py SsmConvScanSpec.norm): Mamba-2's gated
norm after the scan computed by the fused conv + scan decode kernel's last block per (sequence, group). The kernel
against the fused kernel without it, then the norm kernel (the same values; the sum of squares in another
order), at the 2.7B shape (one group of 5,120: 160 blocks count in) and at shapes with 2 and 3 groups, with a
padding row; and a whole Mamba-2's decode logits through the CUDA graphs with it on against off and, in fp32,
against the reference backend. Every counter is left at zero. CPU checks: tests/test_ssm_norm_fuse.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen.specs import NormSpec  # noqa: E402
from kiln.codegen.ssm_kernels import SsmConvScanSpec  # noqa: E402
from kiln.runtime import cuda_ssm  # noqa: E402
from kiln.runtime.batch import SeqSlice, StepBatch  # noqa: E402
from kiln.runtime.kv_store import KVStore  # noqa: E402
from kiln.runtime.model import LoadedModel, make_backend  # noqa: E402
from kiln.runtime.state_cache import StateStore  # noqa: E402

from tests.configs import FAMILY_CONFIGS  # noqa: E402
from tests.gpu.test_cuda_backend import pair, rel  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DT = {"fp32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 1e-2)}
# (heads, head_dim, d_state, groups): the 2.7B model's; two groups; three groups of odd sizes
SHAPES = {"2.7b": (80, 64, 128, 1), "g2": (8, 16, 32, 2), "g3": (6, 32, 64, 3)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", list(DT))
def test_the_fused_norm_equals_the_kernel_then_the_norm(shape, dtype):
    heads, hd, ds, groups = SHAPES[shape]
    tdt, tight = DT[dtype]
    spec = SsmConvScanSpec(heads, hd, ds, groups, 4, True, "silu", dtype=dtype)
    rows, C = heads * hd, spec.channels
    norm = NormSpec("rms", rows, 1e-5, has_residual=False, gate="silu", group=rows // groups, per_group_weight=True,
                    dtype=dtype)
    fused = dataclasses.replace(spec, norm=norm.key())
    S, slots_n = 3, 6  # two sequences and a padding row (slot -1)
    conv_w = torch.randn(C, 4, device="cuda").to(tdt) * 0.3
    conv_b = torch.randn(C, device="cuda").to(tdt) * 0.1
    a_log = torch.randn(heads, device="cuda").to(tdt) * 0.5
    d = torch.randn(heads, device="cuda").to(tdt)
    dt_bias = torch.randn(heads, device="cuda").to(tdt) * 0.1
    nw = (1 + 0.1 * torch.randn(rows, device="cuda")).to(tdt)
    conv0 = torch.randn(slots_n, C, 3, device="cuda").to(tdt)
    state0 = torch.randn(slots_n, heads, hd, ds, device="cuda") * 0.1
    slots = torch.tensor([4, 1, -1], dtype=torch.int32, device="cuda")
    cu = torch.arange(S + 1, dtype=torch.int32, device="cuda")
    kv_lens = torch.tensor([9, 3, 1], dtype=torch.int32, device="cuda")
    wide = torch.randn(S, C + heads + rows + 40, device="cuda").to(tdt)
    xbc, dt, z = wide[:, 8:8 + C], wide[:, C + 16:C + 16 + heads], wide[:, C + heads + 24:C + heads + 24 + rows]
    runs = []
    for s in (spec, fused):
        conv_state, state = conv0.clone(), state0.clone()
        counters, norm_counters = (torch.zeros(S * groups, dtype=torch.int32, device="cuda") for _ in range(2))
        out = torch.full((S, rows), float("nan"), device="cuda", dtype=tdt)
        extra = dict(gate=z, norm_weight=nw, norm_counters=norm_counters) if s.norm is not None else {}
        K.ssm_conv_scan(s, xbc, conv_w, conv_b, conv_state, dt, a_log, d, dt_bias, state, slots, cu, kv_lens, counters,
                        out, S, **extra)
        runs.append((out, conv_state, state, counters, norm_counters))
    (y, conv_a, state_a, c_a, _), (got, conv_b_, state_b, c_b, nc_b) = runs
    want = torch.empty_like(y)
    K.norm(norm, y, nw, want, gate=z)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    assert rel(got, want) <= tight, f"{rel(got, want):.3g}"
    assert torch.equal(conv_a, conv_b_) and torch.equal(state_a, state_b)  # the conv and scan: the same bits
    assert not c_a.any() and not c_b.any() and not nc_b.any()


@pytest.mark.parametrize("dtype,tight,tol", [("fp32", 1e-5, 1e-4), ("bf16", 1e-2, None)])
def test_mamba2_decode_with_the_fused_norm_equals_without(dtype, tight, tol, monkeypatch):
    """A whole Mamba-2 (groups 2): prefill eagerly (the norm's own kernel), then decode steps through the CUDA graphs
    (the fused kernel with the norm): logits equal the model's without it and, in fp32, the reference backend's."""
    name = "mamba2"
    monkeypatch.setattr(cuda_ssm, "SSM_NORM_FUSE", "0")
    ref, off = pair(FAMILY_CONFIGS[name]["model_type"], FAMILY_CONFIGS[name], dtype)
    monkeypatch.setattr(cuda_ssm, "SSM_NORM_FUSE", "1")
    on = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype, ref.device)
    assert len(on.model._ssm.norms) == FAMILY_CONFIGS[name]["num_hidden_layers"] and not off.model._ssm.norms
    models = (ref, on, off)
    kvs = [KVStore(ref.plan.sites, 32, 16, ref.dtype, "cuda", state=StateStore(4)) for _ in models]
    seqs = [SeqSlice(0, 7, 0, (0,), state_slot=2), SeqSlice(7, 70, 0, (1, 2, 3, 4, 5), state_slot=1)]
    tokens = torch.randint(0, ref.plan.vocab_size, (77,))
    with torch.no_grad():
        outs = [m.model.forward(StepBatch(tokens, seqs), kv) for m, kv in zip(models, kvs)]
        assert torch.equal(outs[1], outs[2])  # a prefill: the same kernels
        ctx = [7, 70]
        for _ in range(4):
            nxt = torch.randint(0, ref.plan.vocab_size, (2,))
            d = [SeqSlice(0, 1, ctx[0], (0,), state_slot=2), SeqSlice(1, 1, ctx[1], (1, 2, 3, 4, 5), state_slot=1)]
            a, b, c = (m.model.forward(StepBatch(nxt, d), kv) for m, kv in zip(models, kvs))
            assert rel(b, c) <= tight, f"fused norm {rel(b, c):.3g} from without"
            if tol is not None:
                assert rel(b, a) <= tol, f"fused norm {rel(b, a):.3g} from the reference"
            ctx = [x + 1 for x in ctx]
    assert on.model._graphs, "decode did not run through a CUDA graph"
    assert not on.model._ssm.counters.any() and not on.model._ssm.norm_counters.any()
