"""Issue #18, CPU checks of the decode GEMV (codegen/gemv.py, templates/gemv.cu.j2): it renders and
NVRTC compiles for sm_80 and sm_90a without local-memory spills at Mamba-2's and Llama-3-8B's decode
shapes and odd ones, names its origin, the chooser's picks keep the grid resident at once, bad specs and
arguments are refused with the field named. The kernel's results: tests/gpu/test_gemv.py."""

from __future__ import annotations

import math
import re

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import gemv as G  # noqa: E402
from kiln.codegen import nvrtc  # noqa: E402
from kiln.codegen.kernels import KernelArgError  # noqa: E402
from kiln.codegen.render import render  # noqa: E402
from kiln.codegen.specs import KernelSpecError  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")  # compile for real: ptxas's log (tests/conftest.py)


MAMBA2 = [(10576, 2560), (2560, 5120)]
LLAMA3 = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
ODD = [(80, 2560), (100, 200), (33, 1000), (8, 64)]


@pytest.mark.parametrize("n,k", MAMBA2 + LLAMA3 + ODD)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_gemv_compiles_without_spills(n, k, dtype):
    ks = render(G.spec_for(n, k, dtype, True, "models/test.kiln:3 linear(x, w)"))
    assert "// origin: models/test.kiln:3 linear(x, w)" in ks.source
    assert ks.entries == tuple(f"{ks.name}_t{t}" for t in range(1, G.GEMV_MAX_T + 1))
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert img.log.count("0 bytes spill stores") == G.GEMV_MAX_T, img.log
    nvrtc.compile_source(ks.source, ks.name, "sm_80", ks.origin)


@pytest.mark.parametrize("rows", G.ROWS)
@pytest.mark.parametrize("ksplit", G.KSPLITS)
def test_every_rows_and_ksplit_compiles(rows, ksplit):
    """Every (rows, ksplit) builds; off the chooser's picks (here with a K tail) a few bytes may spill at
    3-4 rows of x (the 128-register cap of two blocks per SM)."""
    ks = render(G.GemvSpec(203, 2056, True, "bf16", "t", rows, ksplit))
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert all(int(b) <= 16 for b in re.findall(r"(\d+) bytes spill stores", img.log)), img.log


@pytest.mark.parametrize("n,k", MAMBA2 + LLAMA3 + ODD)
def test_choice_keeps_every_warp_resident_where_it_can(n, k):
    """One wave (every warp of the grid resident at once, 16 a SM) unless even 8 rows a warp cannot."""
    rows, ks = G.choose(n, k, "bf16", 132)
    blocks = math.ceil(n / (rows * G.WARPS // ks))
    if (rows, ks) != (8, 1):
        assert blocks * G.WARPS <= 132 * 16
    # few rows: K split over the block's warps (where K has more than one 512-byte warp step); many: none
    assert (ks > 1) == (n < 1000 and k * 2 > 512)


def test_mamba2_picks():
    assert G.choose(10576, 2560, "bf16", 132) == (8, 1)
    assert G.choose(2560, 5120, "bf16", 132) == (2, 1)


@pytest.mark.parametrize("field,kw", [("rows", dict(rows=3)), ("ksplit", dict(ksplit=16)), ("n", dict(n=0)),
                                      ("dtype", dict(dtype="int8"))])
def test_bad_specs_name_the_field(field, kw):
    args = dict(n=64, k=64, has_bias=False, dtype="bf16", origin="models/x.kiln:1", rows=2, ksplit=1) | kw
    with pytest.raises(KernelSpecError, match=rf"GemvSpec\.{field}:.*models/x.kiln:1"):
        G.GemvSpec(**args)


def test_wrapper_refuses_host_tensors_and_too_many_rows():
    spec = G.GemvSpec(64, 64)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    with pytest.raises(KernelArgError, match="x: must be on a CUDA device"):
        G.gemv(spec, x, torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(1, 64, dtype=torch.bfloat16))
    assert not G.takes(torch.zeros(5, 64, dtype=torch.bfloat16), torch.zeros(64, 64, dtype=torch.bfloat16))

