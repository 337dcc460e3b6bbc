"""Mamba-2's layer stack as one persistent kernel (codegen/ssm_stack.py, templates/ssm_stack.cu.j2, run by
runtime/cuda_ssm.py SsmStack under KILN_SSM_STACK=1) on a GPU: a whole model decoding one sequence, eagerly and
through the CUDA graphs, gives the logits and leaves the conv and scan states of the step-by-step program
(KILN_SSM_STACK=0), and in fp32 the reference backend's. Shapes: the test family's (groups 2, d_state 8: lanes < 32),
the small shape that broke session 33's first version (4 heads of 64 over 2 layers: 128 blocks idle in the scan
phase), 16 heads, and the 2.7B widths at 3 layers."""

from __future__ import annotations

import pytest
import torch
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import LoadedModel, make_backend
from kiln.runtime.state_cache import StateStore

from tests.configs import FAMILY_CONFIGS
from tests.gpu.test_cuda_backend import pair, rel

BASE = FAMILY_CONFIGS["mamba2"]
SHAPES = {
    "family": BASE,
    "4x64": dict(BASE, hidden_size=128, num_heads=4, head_dim=64, state_size=64, n_groups=1),
    "16x32": dict(BASE, hidden_size=256, num_heads=16, head_dim=32, state_size=128, n_groups=2),
    "2.7b-widths": dict(BASE, hidden_size=2560, num_heads=80, head_dim=64, state_size=128, n_groups=1,
                        num_hidden_layers=3),
}
TOL = {"fp32": (1e-4, 1e-4), "bf16": (3e-2, None)}  # (against the step-by-step program, against the reference)
SLOT = 2


@pytest.fixture(autouse=True)
def _hopper():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the stack kernel uses Hopper's bulk copies")


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_stack_decodes_as_the_steps_do(shape, dtype, graphs, monkeypatch, fresh_seed):
    cfg = SHAPES[shape]
    ref, on = pair("mamba2", cfg, dtype)
    off = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype, ref.device)
    stack = on.model._ssm_stack
    assert stack.stack is not None, stack.why
    assert stack.stack.spec.layers == cfg["num_hidden_layers"]
    for m in (on, off):
        m.model.use_graphs = graphs
    models = {"ref": (ref, "0"), "on": (on, "1"), "off": (off, "0")}
    kvs = {k: KVStore(ref.plan.sites, 32, 16, ref.dtype, "cuda", state=StateStore(4)) for k in models}
    tight, tol = TOL[dtype]

    def run(batch):  # each model under its own switch (its graphs are captured with it)
        outs = {}
        for k, (m, switch) in models.items():
            monkeypatch.setenv("KILN_SSM_STACK", switch)
            outs[k] = m.model.forward(batch, kvs[k])
        return outs

    with torch.no_grad():
        prompt = torch.randint(0, ref.plan.vocab_size, (9,))
        run(StepBatch(prompt, [SeqSlice(0, 9, 0, (0,), state_slot=SLOT)]))  # eager: the stack takes no prompt
        assert not stack.ran
        for step in range(6):
            nxt = torch.randint(0, ref.plan.vocab_size, (1,))
            outs = run(StepBatch(nxt, [SeqSlice(0, 1, 9 + step, (0,), state_slot=SLOT)]))
            assert torch.isfinite(outs["on"]).all(), f"decode step {step}: not finite"
            assert rel(outs["on"], outs["off"]) <= tight, \
                f"decode step {step}: {rel(outs['on'], outs['off']):.3g} from the steps'"
            if tol is not None:
                assert rel(outs["on"], outs["ref"]) <= tol, \
                    f"decode step {step}: {rel(outs['on'], outs['ref']):.3g} from the reference"
    assert stack.ran, "the stack kernel never ran"
    assert bool(on.model._graphs) == graphs and bool(off.model._graphs) == graphs
    for site in ref.plan.state_sites:
        a, b = (kvs[k].state.tensors[site.index][SLOT] for k in ("on", "off"))
        assert rel(a, b) <= tight, f"{site.kind} state of {site.path}: {rel(a, b):.3g} from the steps'"
        others = [s for s in range(4) if s != SLOT]  # no other slot written
        assert not kvs["on"].state.tensors[site.index][others].any()


def test_stack_starts_a_sequence_from_zero_states(monkeypatch):
    """A slot that held another sequence: a first decode token at context 0 (kv_lens 1) reads zero states, as the steps
    do, whatever the slot held."""
    ref, on = pair("mamba2", SHAPES["4x64"], "fp32")
    off = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype, ref.device)
    outs = {}
    tok = torch.randint(0, ref.plan.vocab_size, (1,))  # (one token for both)
    with torch.no_grad():
        for k, m, switch in (("on", on, "1"), ("off", off, "0")):
            monkeypatch.setenv("KILN_SSM_STACK", switch)
            kv = KVStore(ref.plan.sites, 32, 16, ref.dtype, "cuda", state=StateStore(4))
            for site in ref.plan.state_sites:  # garbage in every slot
                t = kv.state.site(site.index, site.shape, torch.float32 if site.kind == "selective_scan" else ref.dtype,
                                  "cuda")
                t.normal_()
            outs[k] = m.model.forward(StepBatch(tok, [SeqSlice(0, 1, 0, (0,), state_slot=1)]), kv)
    assert on.model._ssm_stack.ran, "the stack kernel never ran"
    assert rel(outs["on"], outs["off"]) <= 1e-4

