"""CPU checks of issue #12's SwiGLU and rotary + KV-write variants (ActSpec.variant, RopeCacheSpec.variant):
each renders, keeps its origin comment, and NVRTC compiles it for sm_90a (sm_80 too where it has no
Hopper bulk copies) in every run dtype without local-memory spills; a variant that cannot apply renders
the default kernel; bad variant names fail with the field named."""

import itertools

import pytest

pytest.importorskip("cuda.bindings")

from kiln.codegen import nvrtc  # noqa: E402
from kiln.codegen.render import act_variant, render, rope_variant  # noqa: E402
from kiln.codegen.specs import ACT_VARIANTS, ROPE_VARIANTS, ActSpec, KernelSpecError, RopeCacheSpec  # noqa: E402

from tests.configs import ROPE_CASES  # noqa: E402

DTYPES = ("bf16", "fp16", "fp32")
# (kind, gated, features): Llama-3-8B's SwiGLU, a plain GELU, a row of 1000 (bulk: one short tile), 11 features
# (not whole 16-byte chunks: bulk renders the flat kernel, rows_stream plain rows)
ACT_CASES = [("silu", True, 14336), ("gelu", False, 3072), ("gelu_tanh", True, 1000), ("relu", True, 11)]


pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")  # compile for real, not from ~/.cache


def _build(spec, bulk: bool):
    ks = render(spec)
    lines = ks.source.splitlines()
    at = next(i for i, line in enumerate(lines) if f" {ks.name}(" in line and "__global__" in line)
    assert lines[at - 1] == f"// origin: {spec.origin}"
    assert ("cp.async.bulk" in ks.source) == bulk
    for arch in ("sm_90a",) if bulk else ("sm_80", "sm_90a"):
        img = nvrtc.compile_source(ks.source, ks.name, arch, ks.origin, extra_options=("--ptxas-options=-v",))
        assert img.kind == "cubin" and ks.name.encode() in img.data
        assert "0 bytes spill stores" in img.log, img.log
    return ks


@pytest.mark.parametrize("variant", ACT_VARIANTS[1:])
@pytest.mark.parametrize("case, dtype", list(itertools.product(range(len(ACT_CASES)), DTYPES)))
def test_act_variant_compiles(variant, case, dtype):
    kind, gated, F = ACT_CASES[case]
    spec = ActSpec(kind, gated, F, dtype=dtype, variant=variant, origin=f"models/t.kiln:4 {kind} ({variant})")
    rendered = act_variant(spec)
    row_bytes = F * {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    assert rendered == (variant if row_bytes % 16 == 0 else {"bulk": "flat", "rows_stream": "rows"}.get(variant, variant))
    ks = _build(spec, rendered == "bulk")
    assert ks.meta["variant"] == rendered
    assert ("st.global.cs" in ks.source) == (rendered == "rows_stream")
    if rendered == "bulk":
        assert ks.meta["smem"] <= 227 * 1024 and ks.meta["chunks"] >= 1


@pytest.mark.parametrize("case, dtype", list(itertools.product(range(len(ROPE_CASES)), DTYPES)))
def test_rope_bulk_compiles(case, dtype):
    spec = RopeCacheSpec(page_size=16, dtype=dtype, variant="bulk", origin="models/t.kiln:2 rope (bulk)",
                         **ROPE_CASES[case])
    assert rope_variant(spec) == "bulk"
    ks = _build(spec, True)
    assert ks.meta["variant"] == "bulk" and ks.meta["smem"] <= 227 * 1024


def test_rope_bulk_falls_back_where_it_cannot_apply():
    fp8 = RopeCacheSpec(8, 2, 64, 32, 16, kv_fp8=True, variant="bulk", origin="t")
    odd = RopeCacheSpec(8, 2, 36, 36, 16, dtype="fp16", variant="bulk", origin="t")  # 72-byte heads
    for spec in (fp8, odd):
        assert rope_variant(spec) == "token"
        _build(spec, False)


def test_default_kernels_unchanged_by_the_variant_fields():
    """The default specs render the measured winners (SwiGLU: "rows", plain loads and stores; rotary:
    the per-token kernel), no bulk copies."""
    act = render(ActSpec("silu", True, 14336, origin="t"))
    assert act.meta["variant"] == "rows" and "cp.async.bulk" not in act.source and "st.global.cs" not in act.source
    rope = render(RopeCacheSpec(32, 8, 128, 128, 16, origin="t"))
    assert rope.meta["variant"] == "token" and "cp.async.bulk" not in rope.source


@pytest.mark.parametrize("make, field", [
    (lambda: ActSpec("silu", True, 128, variant="tma"), "ActSpec.variant"),
    (lambda: ActSpec("silu", True, 128, variant="rows", unroll=4), "ActSpec.unroll"),
    (lambda: RopeCacheSpec(8, 2, 64, 64, 16, variant="tma"), "RopeCacheSpec.variant"),
    (lambda: RopeCacheSpec(8, 2, 64, 64, 16, variant="bulk", prefetch=True), "RopeCacheSpec.prefetch"),
])
def test_bad_variant_names_the_field(make, field):
    with pytest.raises(KernelSpecError, match=field):
        make()


def test_variant_names_are_the_spec_modules():
    assert ACT_VARIANTS[0] == "flat" and ROPE_VARIANTS[0] == "token"
