"""KILN_E4M3_CVT (codegen/render.py E4M3_CVT, templates/fp8.cuh.j2): the fp8 KV cache's E4M3 bytes to fp16
pairs by cvt.rn.f16x2.e4m3x2 where the GPU has it (sm_89 on), else by the integer conversion. On the CPU: which
PTX each arch gets, that every fp8-cache attention kernel still builds, and the refusal of a bad value. The GPU
side (the same bits either way): tests/gpu/test_kernels.py test_fp8_kv_decode_with_cvt_equals_integer_conversion."""

from __future__ import annotations

import pytest

pytest.importorskip("cuda.bindings")

from kiln.codegen import nvrtc  # noqa: E402
from kiln.codegen import render as render_mod  # noqa: E402
from kiln.codegen.render import render  # noqa: E402
from kiln.codegen.specs import DecodeAttnSpec, KernelSpecError, PrefillAttnSpec  # noqa: E402

CVT = "cvt.rn.f16x2.e4m3x2"


def _ptx(spec, arch: str) -> str:
    src = render.__wrapped__(spec)  # past render's cache: the switch is read at each rendering
    return nvrtc.compile_source(src.source, src.name, arch, src.origin).data.decode()


@pytest.mark.parametrize("on", ["0", "1"])
def test_the_decode_kernel_converts_by_cvt_only_where_switched_on_and_the_gpu_has_it(on, monkeypatch):
    monkeypatch.setattr(render_mod, "E4M3_CVT", on)
    spec = DecodeAttnSpec(32, 8, 128, 16, 128 ** -0.5, kv_fp8=True, origin="models/test.kiln:7 attention(q, k, v)")
    assert (CVT in _ptx(spec, "compute_90a")) == (on == "1")
    assert CVT not in _ptx(spec, "compute_80")  # before sm_89: the integer conversion either way
    assert f"render.E4M3_CVT: {'on' if on == '1' else 'off'} here" in render.__wrapped__(spec).source


@pytest.mark.parametrize("spec", [
    DecodeAttnSpec(8, 2, 64, 16, 0.125, window=37, softcap=30.0, kv_fp8=True, dtype="fp16", origin="t"),
    DecodeAttnSpec(16, 4, 96, 16, 96 ** -0.5, kv_fp8=True, origin="t"),
    DecodeAttnSpec(8, 2, 48, 7, 48 ** -0.5, kv_fp8=True, dtype="fp32", origin="t"),
    PrefillAttnSpec(32, 8, 128, 16, 128 ** -0.5, kv_fp8=True, origin="t"),
    PrefillAttnSpec(32, 8, 128, 16, 128 ** -0.5, kv_fp8=True, sm=80, origin="t"),
], ids=["decode-d64-softcap", "decode-d96", "decode-d48-fp32", "prefill-sm90", "prefill-sm80"])
def test_every_fp8_cache_attention_kernel_builds_with_it(spec, monkeypatch):
    """Each for sm_90a and sm_80, but the Hopper prefill kernel (wgmma: render.PREFILL_FP8_SM90) for sm_90a alone."""
    monkeypatch.setattr(render_mod, "E4M3_CVT", "1")
    src = render.__wrapped__(spec)
    assert "e4m3" in src.source.lower()
    for arch in ("sm_90a",) if src.meta.get("variant") == "sm90" else ("sm_90a", "sm_80"):
        nvrtc.compile_source(src.source, src.name, arch, src.origin)


def test_a_bad_value_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(render_mod, "E4M3_CVT", "yes")
    with pytest.raises(KernelSpecError, match="KILN_E4M3_CVT='yes'"):
        render.__wrapped__(DecodeAttnSpec(8, 2, 64, 16, 0.125, kv_fp8=True, origin="t"))
