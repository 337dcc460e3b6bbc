"""Issue #18 on a GPU: the gated norm kernel (norm(y * act(z)), fuse.py's gated_norm) and the norm per
group of features against the op references run in sequence (dsl/ops: the activation, the mul, the
norm, each rounding to the run dtype where it does). Mamba-2 2.7B's shape (d_inner 5120, one group)
and eight groups; T = 1 (batch-1 decode), 7, 300; fp32 and bf16. z is a row-strided view, as the z slice
of in_proj's fused GEMM output is; also one whose rows are not 16-byte aligned (read elementwise).
Outputs are poisoned (NaN) first so an unwritten element fails. Whole models (mamba2's gated norm,
qwen3's and gemma3's per-head norms) against the reference backend: tests/gpu/test_ssm_kernels.py,
tests/gpu/test_cuda_backend.py, tests/test_ops_norm_variants.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen.specs import NormSpec  # noqa: E402
from kiln.dsl.ops import OPS, OpKind  # noqa: E402
from kiln.dsl.ops.elementwise import ACTIVATION_FNS  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DEV = "cuda"
DT = {"bf16": torch.bfloat16, "fp32": torch.float32}


class _Ins:
    """The attributes an op reference reads (ins.attrs)."""

    def __init__(self, kind: OpKind, **attrs):
        self.attrs = OPS[kind].make_attrs(attrs)


def _reference(kind: str, x, w, b, eps: float, group: int | None, offset: float = 0.0, gate=None, act="silu"):
    """The spec's ops in order: [g = act(z); x = x * g;] norm(x, w, b) (each op's own reference)."""
    if gate is not None:
        x = OPS[OpKind.MUL].reference(None, None, [x, ACTIVATION_FNS[act](gate)])
    op = OpKind.RMSNORM if kind == "rms" else OpKind.LAYERNORM
    args = [x, w] if kind == "rms" else [x, w, b]
    return OPS[op].reference(None, _Ins(op, eps=eps, offset=offset, group=group), args)


def _check(out, want, dtype):
    assert not torch.isnan(out).any(), "output has NaNs: an element was never written"
    if dtype == "fp32":
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    else:  # the same rounded inputs to the norm; the reduction order and rsqrtf differ: a bf16 ulp at most
        torch.testing.assert_close(out, want, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("T", [1, 7, 300])
@pytest.mark.parametrize("aligned", [True, False])
def test_gated_rmsnorm_matches_the_ops(dtype, groups, T, aligned):
    dt, hidden = DT[dtype], 5120
    g = hidden // groups
    spec = NormSpec("rms", hidden, 1e-5, has_residual=False, group=g, per_group_weight=True, gate="silu",
                    dtype=dtype, origin="test")
    y = torch.randn(T, hidden, device=DEV).to(dt)
    # z: the first columns of a wider row ([z | xBC | dt], as in_proj's fused output), or rows one
    # element off the 16-byte grid
    width = hidden + 5376 + 80 + (0 if aligned else 1)
    fused = (torch.randn(T, width, device=DEV) * 2).to(dt)
    z = fused[:, :hidden] if aligned else fused[:, 1:hidden + 1]
    w = (torch.rand(groups, g, device=DEV) + 0.5).to(dt)
    out = torch.full((T, hidden), float("nan"), dtype=dt, device=DEV)
    K.norm(spec, y, w, out, gate=z)
    _check(out, _reference("rms", y, w, None, 1e-5, g, gate=z), dtype)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_gated_norm_other_activations(dtype, act):
    dt, hidden, g, T = DT[dtype], 640, 128, 7
    spec = NormSpec("layer", hidden, 1e-5, has_bias=True, has_residual=False, group=g, per_group_weight=True,
                    gate=act, dtype=dtype, origin="test")
    y, z = (torch.randn(T, hidden, device=DEV).to(dt) for _ in range(2))
    w, b = (torch.rand(hidden // g, g, device=DEV) + 0.5).to(dt), torch.randn(hidden // g, g, device=DEV).to(dt)
    out = torch.full((T, hidden), float("nan"), dtype=dt, device=DEV)
    K.norm(spec, y, w, out, bias=b, gate=z)
    _check(out, _reference("layer", y, w, b, 1e-5, g, gate=z, act=act), dtype)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("kind, hidden, group, per_group, res, off", [
    ("rms", 4096, 128, False, False, 0.0),   # qwen3's q norm: one [head_dim] row for every head
    ("rms", 2048, 256, False, False, 1.0),   # gemma3's: offset 1
    ("layer", 1024, 64, True, False, 0.0),   # stablelm's per-head layernorm: a row (and bias) per head
    ("rms", 5120, 640, True, True, 0.0),     # with the residual add fused
    # whole rows (group 0): one 16-byte access per thread (2560: Mamba-2 2.7B's residual norm), two
    # rounds (16384 bf16: 2048 accesses), one partial warp (80), fp32 vectors of 4 with a partial warp
    ("rms", 2560, 0, False, True, 0.0),
    ("rms", 4096, 0, False, False, 1.0),
    ("rms", 16384, 0, False, True, 0.0),
    ("rms", 80, 0, False, False, 0.0),
    ("layer", 4100, 0, False, True, 0.0),
])
@pytest.mark.parametrize("T", [1, 7, 300])
def test_group_norm_matches_the_op(dtype, kind, hidden, group, per_group, res, off, T):
    dt = DT[dtype]
    spec = NormSpec(kind, hidden, 1e-6, weight_offset=off, has_bias=kind == "layer", has_residual=res, group=group,
                    per_group_weight=per_group, dtype=dtype, origin="test")
    shape = (hidden // group, group) if per_group else (group or hidden,)
    x = torch.randn(T, hidden, device=DEV).to(dt)
    r = torch.randn(T, hidden, device=DEV).to(dt) if res else None
    w = (torch.rand(shape, device=DEV) + 0.5).to(dt)
    b = torch.randn(shape, device=DEV).to(dt) if kind == "layer" else None
    out = torch.full((T, hidden), float("nan"), dtype=dt, device=DEV)
    r_out = torch.full_like(out, float("nan")) if res else None
    K.norm(spec, x, w, out, residual=r, residual_out=r_out, bias=b)
    h = x + r if res else x
    if res:
        assert torch.equal(r_out, h)
    _check(out, _reference(kind, h, w, b, 1e-6, group or None, offset=off), dtype)
