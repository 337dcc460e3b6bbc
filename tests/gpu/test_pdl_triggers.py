"""The early programmatic-launch triggers (KILN_PDL_TRIGGER, codegen/render.PDL_TRIGGER) on a GPU, in
isolation from the model: chains of norm -> decode GEMV (a programmatic dependent) -> norm -> ..., the
norms rendered with `griddepcontrol.launch_dependents` at their first line, captured in one CUDA graph and
replayed many times while another stream keeps the SMs busy, give bit for bit what the same chain gives
with the norms rendered without it and plain launches. A read before `griddepcontrol.wait`, or a write
that races the kernel before, would show here as a difference.

Why: with the triggers, tests/gpu/test_gemv_prologue.py's bf16 Mamba-2 case failed under pytest-xdist
while this chain held (benchmarks/2026-12-03-04.md, sessions 10 and 11). The cause was not the trigger / wait pairing but
ptxas moving the 3- and 4-row GEMV entries' x loads above the wait (tests/test_pdl_order.py checks the
machine code of every dependent kernel for that)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import gemv as G  # noqa: E402
from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen import render as render_mod  # noqa: E402
from kiln.codegen.specs import NormSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
LAYERS, REPLAYS = 12, 40


def _chain(kind: str, hidden: int, T: int, trigger: bool, weights, norms, norm_pdl: bool = False):
    """A graph of LAYERS x (norm -> GEMV [hidden, hidden]) and its static input / output buffers. The
    specs' origins name the variant, so each is rendered (and cached) with its own setting. norm_pdl: the
    norms launched as programmatic dependents too (KILN_PDL_CHAIN's launches)."""
    tag = f"pdl-trigger-test {kind} trigger={trigger}"
    spec = NormSpec("rms", hidden, 1e-5, has_residual=kind == "residual", gate="silu" if kind == "gated" else "",
                    group=hidden // 2 if kind == "gated" else 0, per_group_weight=False, origin=tag)
    gspec = G.spec_for(hidden, hidden, "bf16", False, tag)
    x = torch.randn(T, hidden, device="cuda").bfloat16()
    aux = torch.randn(T, hidden, device="cuda").bfloat16()  # the residual, or the gate z
    saved = render_mod.PDL_TRIGGER
    render_mod.PDL_TRIGGER = trigger  # read when the kernel is first rendered, in the warm-up below
    try:
        def run():
            h, a = x, aux
            for w, nw in zip(weights, norms):
                out = torch.empty_like(h)
                if kind == "residual":
                    r = torch.empty_like(h)
                    K.norm(spec, h, nw, out, residual=a, residual_out=r, pdl=norm_pdl)
                    a = r
                else:
                    K.norm(spec, h, nw, out, gate=a, pdl=norm_pdl)
                y = torch.empty_like(h)
                G.gemv(gspec, out, w, y, pdl=trigger)
                h = y
            return h

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # renders and loads the kernels with the setting above
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
    finally:
        render_mod.PDL_TRIGGER = saved
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, x, aux, out, K.get_kernel(spec, x.device).source.source


@pytest.mark.parametrize("kind", ["residual", "gated"])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_triggered_chain_equals_the_plain_chain_under_load(kind, T):
    hidden = 2560
    weights = [(torch.randn(hidden, hidden, device="cuda") / hidden**0.5).bfloat16() for _ in range(LAYERS)]
    norms = [(1 + 0.1 * torch.randn(hidden // 2 if kind == "gated" else hidden, device="cuda")).bfloat16()
             for _ in range(LAYERS)]
    plain = _chain(kind, hidden, T, False, weights, norms)
    fast = _chain(kind, hidden, T, True, weights, norms)
    chained = _chain(kind, hidden, T, True, weights, norms, norm_pdl=True)
    call = "pdl_launch_dependents();"
    assert call in fast[4] and call not in plain[4]  # the norms as rendered: with the trigger, and without
    load_a = torch.randn(8192, 8192, device="cuda").bfloat16()
    load_b = torch.empty_like(load_a)
    busy = torch.cuda.Stream()
    for i in range(REPLAYS):
        x = torch.randn(T, hidden, device="cuda").bfloat16()
        aux = torch.randn(T, hidden, device="cuda").bfloat16()
        for g in (plain, fast, chained):
            g[1].copy_(x)
            g[2].copy_(aux)
        plain[0].replay()
        want = plain[3].clone()
        busy.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(busy):  # another stream's GEMMs beside the replay: blocks scheduled late
            for _ in range(1 + i % 3):
                torch.matmul(load_a, load_a, out=load_b)
        fast[0].replay()
        got = fast[3].clone()
        chained[0].replay()
        got_chained = chained[3].clone()
        torch.cuda.current_stream().wait_stream(busy)
        assert torch.equal(got, want), f"replay {i}: the triggered chain differs from the plain one"
        assert torch.equal(got_chained, want), f"replay {i}: the chain of dependent norms differs from the plain one"
