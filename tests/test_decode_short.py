"""KILN_DECODE_SHORT (runtime/cuda_backend.py): which decode steps take the fp8-cache decode kernel's short-context
shape, and that shape's kernel as NVRTC builds it (CPU; tests/gpu/test_decode_short.py runs it against the default
shape). Session 30 (H100, the kernel alone): 512 sequences at context 200 in 87.9 us against 119.5."""

from __future__ import annotations

import pytest
from kiln.codegen import nvrtc
from kiln.codegen.render import render
from kiln.codegen.specs import DecodeAttnSpec, KernelSpecError
from kiln.runtime import cuda_backend as cb


def test_on_by_default_and_bounds_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("KILN_DECODE_SHORT", "0")
    assert cb.decode_short_bounds() is None and not cb.decode_is_short(4096, 1)
    monkeypatch.delenv("KILN_DECODE_SHORT", raising=False)
    assert cb.decode_short_bounds() == (256, 512)  # the default (cb.DECODE_SHORT)
    monkeypatch.setenv("KILN_DECODE_SHORT", "64:100")
    assert cb.decode_short_bounds() == (64, 100)
    monkeypatch.setenv("KILN_DECODE_SHORT", "256:512")
    # at least 256 sequences, the longest context (its new token included) at most 512
    assert cb.decode_is_short(256, 512) and cb.decode_is_short(1024, 17)
    assert not cb.decode_is_short(255, 100) and not cb.decode_is_short(512, 513)


@pytest.mark.parametrize("value", ["1", "256:", ":512", "a:b", "256:512:1", "0:512", "-1:5", "256:0"])
def test_a_malformed_value_is_one_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("KILN_DECODE_SHORT", value)
    with pytest.raises(KernelSpecError, match=f"KILN_DECODE_SHORT={value!r}: must be 0 or S:C"):
        cb.decode_short_bounds()


def test_short_shape_only_for_fp8_caches_and_compiles_without_spills(fresh_kernel_cache):
    fp8 = DecodeAttnSpec(32, 8, 128, 16, 128 ** -0.5, kv_fp8=True, origin="t")
    assert cb.short_spec(DecodeAttnSpec(32, 8, 128, 16, 128 ** -0.5, origin="t")) is None  # 16-bit: not measured
    short = cb.short_spec(fp8)
    assert (short.warps, short.stages, short.min_blocks) == (2, 4, 4) and short.key() != fp8.key()
    ks = render(short)
    # two warps of 16-token tiles a block, compiled for four blocks an SM
    assert ks.meta["threads"] == 64 and ks.meta["tile"] == 32 and ks.meta["stages"] == 4
    assert "__launch_bounds__(64, 4)" in ks.source
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert "0 bytes spill stores" in img.log and "0 bytes stack frame" in img.log, img.log
