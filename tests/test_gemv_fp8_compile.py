"""Issue #13, CPU checks of the one-row FP8 W8A8 GEMV (codegen/gemv_fp8.py, templates/gemv_fp8.cu.j2): it
renders and NVRTC compiles for sm_90a and sm_89 (it uses the e4m3 conversions: no sm_80 build) without
local-memory spills at Llama-3-8B's decode shapes and odd ones, in every variant (weight scale per tensor
or per channel, activation scale measured or static, bias or not, both weight decodes), names its origin,
and bad specs and arguments are refused with the field named. Its results: tests/gpu/test_gemv_fp8.py."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import gemv_fp8 as G  # noqa: E402
from kiln.codegen import nvrtc  # noqa: E402
from kiln.codegen.kernels import KernelArgError  # noqa: E402
from kiln.codegen.render import render  # noqa: E402
from kiln.codegen.specs import KernelSpecError  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")  # compile for real: ptxas's log (tests/conftest.py)

LLAMA3 = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
ODD = [(80, 2560), (100, 208), (33, 1008), (8, 64), (5, 16)]


def _compile(spec, arch="sm_90a"):
    ks = render(spec)
    img = nvrtc.compile_source(ks.source, ks.name, arch, ks.origin, extra_options=("--ptxas-options=-v",))
    assert re.findall(r"(\d+) bytes spill stores", img.log) == ["0"], img.log
    return ks


@pytest.mark.parametrize("n,k", LLAMA3 + ODD)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_compiles_without_spills(n, k, dtype):
    ks = _compile(G.spec_for(n, k, dtype, True, origin="models/test.kiln:3 linear(x, w)"))
    assert "// origin: models/test.kiln:3 linear(x, w)" in ks.source
    assert len(ks.entries) == 1 and ks.meta["smem"] == -(-k // G.CHUNK) * G.CHUNK * 4


@pytest.mark.parametrize("n,k", LLAMA3 + ODD + [(10576, 2560), (2560, 5120)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mma_compiles_without_spills(n, k, dtype):
    """The tensor-core variant: x as fp16 in shared memory (2 bytes a column, whole 64-column steps)."""
    ks = _compile(G.spec_for(n, k, dtype, True, origin="models/test.kiln:3 linear(x, w)", decode="mma"))
    assert "// origin: models/test.kiln:3 linear(x, w)" in ks.source and "mma.sync.aligned.m16n8k16" in ks.source
    assert ks.meta["smem"] == -(-k // G.MMA_STEP) * G.MMA_STEP * 2 and ks.meta["rows"] % 16 == 0


@pytest.mark.parametrize("rows", G.MMA_ROWS)
@pytest.mark.parametrize("ksplit", G.KSPLITS)
def test_every_mma_rows_and_ksplit_compiles(rows, ksplit):
    _compile(G.Fp8GemvSpec(203, 2064, True, "bf16", "t", rows=rows, ksplit=ksplit, decode="mma"))


def test_mma_grid_is_one_wave_of_16_row_tiles():
    """Every pick's grid is resident at once (132 SMs x 16 warps) where any choice is; the least weight per warp."""
    for n, k in LLAMA3 + ODD:
        s = G.spec_for(n, k, "bf16", False, decode="mma")
        blocks = -(-n // (s.rows * G.WARPS // s.ksplit))
        assert blocks * G.WARPS <= 132 * 16 or (s.rows, s.ksplit) == (16, 2), (n, k, s.rows, s.ksplit)
    # the 8B model's o projection: 256 tiles, 8 K slices of 512 columns, 2,048 warps
    assert (G.spec_for(4096, 4096, "bf16", False, decode="mma").rows,
            G.spec_for(4096, 4096, "bf16", False, decode="mma").ksplit) == (16, 8)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("decode", G.DECODES)
def test_every_variant_compiles(per_channel, static, bias, decode):
    for n, k in [(4096, 14336), (33, 1008)]:
        ks = _compile(G.spec_for(n, k, "bf16", bias, per_channel, static, "t", decode=decode))
        assert ("w_scale[row]" in ks.source) == per_channel
        assert ("x_scale_of(" in ks.source) == (not static)
        assert ("bias[row]" in ks.source) == bias
    _compile(G.spec_for(4096, 4096, "bf16", bias, per_channel, static, "t", decode=decode), "sm_89")


@pytest.mark.parametrize("rows", G.ROWS)
@pytest.mark.parametrize("ksplit", G.KSPLITS)
def test_every_rows_and_ksplit_compiles(rows, ksplit):
    _compile(G.Fp8GemvSpec(203, 2064, True, "bf16", "t", rows=rows, ksplit=ksplit))


def test_grid_follows_the_bf16_chooser():
    """The same one-wave sizing as the bf16 GEMV, counted in 512-column warp steps of e4m3."""
    from kiln.codegen import gemv

    for n, k in LLAMA3 + ODD:
        s = G.spec_for(n, k, "bf16", False)
        assert (s.rows, s.ksplit) == gemv.choose_chunks(n, -(-k // 512), 132)
    assert (G.spec_for(4096, 14336, "bf16", False).rows, G.spec_for(28672, 4096, "bf16", False).rows) == (2, 8)


@pytest.mark.parametrize("field,kw", [("rows", dict(rows=3)), ("ksplit", dict(ksplit=16)), ("n", dict(n=0)),
                                      ("dtype", dict(dtype="int8")), ("k", dict(k=72)), ("k", dict(k=64 * 1024)),
                                      ("decode", dict(decode="lut")), ("decode", dict(decode="mma", dtype="fp32")),
                                      ("rows", dict(decode="mma", rows=8)), ("x_once", dict(x_once=True)),
                                      ("x_once", dict(decode="mma", x_once=1)),
                                      ("x_once", dict(decode="mma", x_once=True, k=16448))])
def test_bad_specs_name_the_field(field, kw):
    args = dict(n=64, k=64, has_bias=False, dtype="bf16", origin="models/x.kiln:1") | kw
    with pytest.raises(KernelSpecError, match=rf"Fp8GemvSpec\.{field}:.*models/x.kiln:1"):
        G.Fp8GemvSpec(**args)


def test_wrapper_refuses_bad_arguments():
    spec = G.Fp8GemvSpec(64, 64)
    w = torch.zeros(64, 64, dtype=torch.float8_e4m3fn)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    with pytest.raises(KernelArgError, match="x: must be on a CUDA device"):
        G.gemv_fp8(spec, x, w, torch.ones(()), torch.zeros(1, 64, dtype=torch.bfloat16))
    # what QGemm's one-row branch takes: one row, an e4m3 weight with 16-byte rows, K within MAX_K
    assert not G.takes(torch.zeros(2, 64, dtype=torch.bfloat16), w)
    assert not G.takes(x, w)  # on the host
    assert not G.takes(x, torch.zeros(64, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("n,k", LLAMA3 + ODD + [(10576, 2560), (2560, 5120)])
@pytest.mark.parametrize("static", [False, True])
def test_x_once_compiles_without_spills(n, k, static):
    """x read once into registers (x_once): its vectors beside the weight loads in flight, no spills."""
    ks = _compile(dataclasses.replace(G.spec_for(n, k, "bf16", True, static=static, decode="mma"), x_once=True))
    assert "x read once, into registers" in ks.source and ks.name.split("_")[4].endswith("x")


def test_x_once_follows_the_variable(monkeypatch):
    monkeypatch.setenv("KILN_FP8_GEMV_XONCE", "1")
    assert G.spec_for(4096, 4096, "bf16", False, decode="mma").x_once
    assert not G.spec_for(4096, 4096, "fp32", False).x_once  # "int": x_once is the tensor-core variant's
    assert G.spec_for(4096, 16384, "bf16", False, decode="mma").x_once  # 8 vectors a thread: the most
    assert not G.spec_for(4096, 16448, "bf16", False, decode="mma").x_once  # 9: x read twice
    monkeypatch.setenv("KILN_FP8_GEMV_XONCE", "yes")
    with pytest.raises(KernelArgError, match="KILN_FP8_GEMV_XONCE: must be 0 or 1"):
        G.spec_for(4096, 4096, "bf16", False, decode="mma")


def test_lm_head_takes_waves_of_one_tile():
    """The 8B model's LM head (128,256 rows) fits one wave only at 4 tiles a warp (whose registers spill): it takes
    waves of one tile over half of K instead (the H200: 134.6 against 222.7 us, .ci/lmhead_probe.py)."""
    s = G.spec_for(128256, 4096, "bf16", False, decode="mma")
    assert (s.rows, s.ksplit) == (16, 2)
    _compile(s)
