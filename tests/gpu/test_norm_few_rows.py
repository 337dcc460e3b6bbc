"""Issue #18 on a GPU: Mamba-2's gated row (one group of 5120, the norm kernel's block holding one
thread per 16-byte access) at T = 1 (decode), 3 and 64 against the ops. Whole-row and group norms at
those widths: tests/gpu/test_gated_norm.py."""

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
