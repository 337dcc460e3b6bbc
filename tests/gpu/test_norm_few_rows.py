"""Issue #18 on a GPU: the norm kernel's block holds one thread per 16-byte access of a row (up to
1024, then a loop), the weight loaded before the reduction. Whole-row norms at T = 1 (decode), 3 and
64 against the op references, at widths that take one access per thread (2560, 5120), a partial last
warp (4100 fp32, 80), and two rounds (16384 bf16: 2048 accesses): plain, with the residual add fused,
layer norm with a bias, and Mamba-2's gated row. Group norms: tests/gpu/test_gated_norm.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen.specs import NormSpec  # noqa: E402

from tests.gpu.test_gated_norm import DT, _check, _reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DEV = "cuda"


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("kind, hidden, res, off", [
    ("rms", 2560, True, 0.0),    # Mamba-2 2.7B's residual norm
    ("rms", 4096, False, 1.0),
    ("rms", 16384, True, 0.0),   # two accesses per thread (bf16)
    ("rms", 80, False, 0.0),     # one partial warp
    ("layer", 4100, True, 0.0),  # fp32 vectors of 4, a partial last warp
])
@pytest.mark.parametrize("T", [1, 3, 64])
def test_row_norm_matches_the_op(dtype, kind, hidden, res, off, T):
    dt = DT[dtype]
    spec = NormSpec(kind, hidden, 1e-6, weight_offset=off, has_bias=kind == "layer", has_residual=res,
                    dtype=dtype, origin="test")
    x = torch.randn(T, hidden, device=DEV).to(dt)
    r = torch.randn(T, hidden, device=DEV).to(dt) if res else None
    w = (torch.rand(hidden, device=DEV) + 0.5).to(dt)
    b = torch.randn(hidden, device=DEV).to(dt) if kind == "layer" else None
    out = torch.full((T, hidden), float("nan"), dtype=dt, device=DEV)
    r_out = torch.full_like(out, float("nan")) if res else None
    K.norm(spec, x, w, out, residual=r, residual_out=r_out, bias=b)
    h = x + r if res else x
    if res:
        assert torch.equal(r_out, h)
    _check(out, _reference(kind, h, w, b, 1e-6, None, offset=off), dtype)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("T", [1, 3, 64])
def test_mamba2_gated_row_matches_the_ops(dtype, T):
    """rmsnorm(y * silu(z)) over one group of 5120, z the last columns of in_proj's fused row."""
    dt, d, n_in = DT[dtype], 5120, 10576
    spec = NormSpec("rms", d, 1e-5, has_residual=False, group=d, per_group_weight=True, gate="silu",
                    dtype=dtype, origin="test")
    y = torch.randn(T, d, device=DEV).to(dt)
    z = (torch.randn(T, n_in, device=DEV) * 2).to(dt)[:, n_in - d:]
    w = (torch.rand(1, d, device=DEV) + 0.5).to(dt)
    out = torch.full((T, d), float("nan"), dtype=dt, device=DEV)
    K.norm(spec, y, w, out, gate=z)
    _check(out, _reference("rms", y, w, None, 1e-5, d, gate=z), dtype)
