"""The online softmax's rescale factor in the Hopper prefill kernels, checked in the machine code (CPU: NVRTC
compiles sm_90a, nvdisasm reads it).

Each tile, a row's running max m (raw scores, -1e30 before any key) becomes mx and its sums are rescaled by
alpha = 2^((m - mx) * scale). Written as `exp2f(m * scale - mx * scale)`, ptxas contracted it into one fma with
the rounded product as its immediate: fma(mx, -scale, round(-1e30 * scale)). Where a row's every key so far was
masked, m = mx = -1e30 and that fma is the product's rounding error, about 2^+-72: alpha inf or 0 by the sign of
a rounding. At head dim 128 it was inf, l = 0 * inf = NaN, and the split-KV merge turned every such row of a
split into zeros of the output: 128 queries after 129 cached tokens were 0.46 off on an H100 (session 24), where
head dim 64's scale rounded the other way and passed. A row fully masked in a tile happens in the split-KV form
(a split past a row's position) and with a sliding window. The factor is now (m - mx) * scale: exactly 0 there.

Checked: no fma in any entry of these kernels takes an immediate as large as -1e30 times a score scale."""
from __future__ import annotations

import re

import pytest
from kiln.codegen.render import render
from kiln.codegen.specs import PrefillAttnSpec

from tests.test_pdl_order import NVDISASM, _entries

pytestmark = pytest.mark.skipif(NVDISASM is None, reason="nvdisasm (pip install nvidia-cuda-nvdisasm)")
IMM = re.compile(r"[-+]?\d+\.\d+e\+(\d+)")


@pytest.mark.parametrize("d, dt, window, ws", [(128, "bf16", 0, False), (64, "fp16", 0, False),
                                                (128, "bf16", 300, False), (128, "bf16", 0, True)])
def test_no_rescale_fma_on_the_masked_max(d, dt, window, ws, tmp_path):
    spec = PrefillAttnSpec(32, 8, d, 16, d ** -0.5, window=window, dtype=dt, sm=90, ws=ws, origin="t rescale")
    ks = render(spec)
    assert ks.meta["variant"] == "sm90" and ks.meta["ws"] == ws
    entries = _entries(ks.source, ks.name, ks.origin, tmp_path)
    assert set(entries) == set(ks.entries)
    for entry, instrs in entries.items():
        bad = [i for i in instrs if i.split()[0].startswith("FFMA")
               and any(int(e) >= 20 for e in IMM.findall(i))]
        assert not bad, f"{entry}: the rescale contracted into an fma with -1e30 * scale as its immediate: {bad[:2]}"


@pytest.mark.parametrize("d, dt", [(128, "bf16"), (64, "fp16")])
def test_fp8_pages_rescale_by_the_difference(d, dt):
    """On fp8 pages the score scale is log2 e * scale * k_scale, a register (k_scale is an argument), so the
    contraction above would have a product of registers as its addend, not an immediate the check could find: here
    the rendered factor itself is checked, (m - mx) * sc, in the plain and the split-KV entry alike."""
    spec = PrefillAttnSpec(32, 8, d, 16, d ** -0.5, dtype=dt, sm=90, kv_fp8=True, origin="t rescale fp8")
    ks = render(spec)
    assert ks.meta["split_kv"] and ks.entries == (ks.name, f"{ks.name}_split", f"{ks.name}_merge")
    alphas = re.findall(r"alpha\[h\] = exp2f\((.*)\);", ks.source)
    assert alphas == ["(m[h] - mx) * sc"] * 2, alphas
