"""CPU checks of the kernel library: every kernel renders and NVRTC compiles it to a cubin for
sm_80 and sm_90a (no GPU needed); compile errors point at the generated source; rotary
frequencies match HF transformers; specs reject bad values with the field named."""

import dataclasses
import itertools
import math
import re

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import nvrtc, rope  # noqa: E402
from kiln.codegen import render as render_mod
from kiln.codegen.quant_kernels import QGemvSpec, choose_splits  # noqa: E402
from kiln.codegen.render import prefill_variant, render  # noqa: E402
from kiln.codegen.specs import (  # noqa: E402
    ActSpec,
    DecodeAttnSpec,
    EmbedSpec,
    KernelSpecError,
    MapSpec,
    MoeGemmSpec,
    MoeRouteSpec,
    NormSpec,
    PrefillAttnSpec,
    RopeCacheSpec,
)

DTYPES = ("bf16", "fp16", "fp32")
ARCHS = ("sm_80", "sm_90a")


def _origin(i, what):
    return f"models/test.kiln:{i} {what}"


def _specs(full: bool):
    """A representative grid; `full` adds every combination the core grid samples from."""
    out = []
    dt = itertools.cycle(DTYPES)
    for kind, hidden, res, off in [("rms", 4096, True, 0.0), ("rms", 80, False, 1.0), ("rms", 5120, True, 0.0),
                                   ("layer", 768, True, 0.0), ("layer", 4100, False, 0.0)]:
        for d in DTYPES if full else (next(dt),):
            out.append(NormSpec(kind, hidden, 1e-5, weight_offset=off, has_bias=kind == "layer",
                                has_residual=res, dtype=d, origin=_origin(1, f"{kind}norm(x, w)")))
    rope_cases = [
        dict(heads=32, kv_heads=8, head_dim=128, rotary_dim=128, layout="half", scaling="llama3", factor=8.0,
             original_max_position=8192, theta=500000.0),
        dict(heads=32, kv_heads=32, head_dim=80, rotary_dim=32, layout="half", scaling="none"),
        dict(heads=16, kv_heads=2, head_dim=64, rotary_dim=64, layout="interleaved", scaling="linear", factor=4.0),
        dict(heads=8, kv_heads=4, head_dim=256, rotary_dim=128, layout="interleaved", scaling="dynamic",
             factor=2.0, original_max_position=4096),
        dict(heads=12, kv_heads=12, head_dim=64, rotary_dim=0),  # a plain K/V cache write
        dict(heads=28, kv_heads=4, head_dim=128, rotary_dim=128, layout="half", scaling="yarn", factor=4.0,
             original_max_position=32768, theta=1000000.0, attention_factor=1.1386294361119891),
        # Phi-3-mini-128k's shape: two baked tables, picked by the step's seq_len
        dict(heads=32, kv_heads=32, head_dim=96, rotary_dim=96, layout="half", scaling="longrope", factor=32.0,
             original_max_position=4096, attention_factor=1.1902380714238083,
             short_factor=tuple(1.0 + 0.01 * i for i in range(48)),
             long_factor=tuple(1.0 + 0.5 * i for i in range(48))),
        dict(heads=8, kv_heads=2, head_dim=64, rotary_dim=32, layout="interleaved", scaling="longrope", factor=8.0,
             original_max_position=16, short_factor=(1.0,) * 16, long_factor=tuple(range(1, 17))),
    ]
    for i, c in enumerate(rope_cases):
        for d in DTYPES if full else (next(dt),):
            out.append(RopeCacheSpec(page_size=16, dtype=d, origin=_origin(2, f"rope#{i}"), **c))
    # (heads, kv_heads, head_dim, window, softcap, alibi_max): the last three with ALiBi (BLOOM/MPT's
    # 32 heads; 12 heads: not a power of 2, GQA, softcap and window too; GQA with head_dim 64)
    attn_cases = [(32, 8, 128, 0, 0.0, 0.0), (32, 32, 64, 0, 0.0, 0.0), (16, 8, 256, 4096, 50.0, 0.0),
                  (12, 4, 80, 0, 30.0, 0.0), (64, 4, 128, 128, 0.0, 0.0), (8, 1, 128, 0, 0.0, 0.0),
                  (32, 32, 128, 0, 0.0, 8.0), (12, 4, 80, 64, 30.0, 8.0), (16, 2, 64, 0, 0.0, 4.0)]
    for (h, kv, hd, win, cap, ali), cls in itertools.product(attn_cases, (DecodeAttnSpec, PrefillAttnSpec)):
        for d in DTYPES if full else (next(dt),):
            out.append(cls(h, kv, hd, 16, hd ** -0.5, window=win, softcap=cap, alibi_max=ali, dtype=d,
                           origin=_origin(3, "attention(q, k, v)")))
    # decode only: head_dim 96 and 256 on tensor cores, a 32-head group (two 16-row chunks), an
    # odd page size, head_dim 72 (not a multiple of 16: the CUDA-core variant in 16 bits)
    for h, kv, hd, win, cap, ali, ps, d in [(32, 8, 96, 0, 0.0, 0.0, 16, "bf16"), (16, 2, 256, 0, 30.0, 0.0, 16, "fp16"),
                                            (32, 1, 128, 64, 0.0, 8.0, 7, "bf16"), (8, 2, 72, 0, 0.0, 0.0, 16, "bf16"),
                                            (24, 8, 80, 0, 0.0, 0.0, 32, "fp16")]:
        out.append(DecodeAttnSpec(h, kv, hd, ps, hd ** -0.5, window=win, softcap=cap, alibi_max=ali, dtype=d,
                                  origin=_origin(3, "attention(q, k, v)")))
    # FP8 KV cache (E4M3 pages): rope/KV write, decode on tensor cores (head_dim % 32 == 0) and on CUDA
    # cores (head_dim 48, fp32), prefill (mma and simt)
    for h, kv, hd, win, cap, ali, ps, d in [(32, 8, 128, 0, 0.0, 0.0, 16, "bf16"), (12, 4, 64, 37, 30.0, 0.0, 7, "fp16"),
                                            (32, 1, 96, 0, 0.0, 8.0, 32, "bf16"), (8, 2, 48, 0, 0.0, 0.0, 16, "bf16"),
                                            (8, 2, 128, 0, 0.0, 0.0, 16, "fp32")]:
        for cls in (DecodeAttnSpec, PrefillAttnSpec):
            out.append(cls(h, kv, hd, ps, hd ** -0.5, window=win, softcap=cap, alibi_max=ali, dtype=d, kv_fp8=True,
                           origin=_origin(3, "attention(q, k, v)")))
        out.append(RopeCacheSpec(h, kv, hd, hd // 2, ps, dtype=d, kv_fp8=True, origin=_origin(2, "rope")))
    for kind, gated in itertools.product(("silu", "gelu", "gelu_tanh", "relu"), (True, False)):
        for d in DTYPES if full else (next(dt),):
            out.append(ActSpec(kind, gated, 14336 if gated else 3072, dtype=d, origin=_origin(4, kind)))
    # A/B variants kept for the benchmark (measured slower than the defaults on the H200)
    out.append(RopeCacheSpec(page_size=16, prefetch=True, origin=_origin(2, "rope (prefetch)"), **rope_cases[0]))
    out.append(RopeCacheSpec(8, 2, 64, 32, 16, layout="interleaved", kv_fp8=True, prefetch=True,
                             origin=_origin(2, "rope (prefetch)")))
    out.append(ActSpec("silu", True, 14336, unroll=4, variant="flat", origin=_origin(4, "silu (unroll 4)")))
    for fp8, d in [(False, "bf16"), (True, "bf16"), (False, "fp32")]:
        out.append(DecodeAttnSpec(32, 8, 128, 16, 128 ** -0.5, kv_fp8=fp8, tuned=False, dtype=d,
                                  origin=_origin(3, "attention (before #12)")))
    for d in DTYPES:
        out.append(EmbedSpec(32000, 4096, dtype=d, origin=_origin(5, "embed(tokens)")))
        out.append(MapSpec("map_softcap.cu.j2", (("cap", 30.0), ("inv_cap", 1 / 30.0)), dtype=d,
                           origin=_origin(6, "softcap(logits)")))
        out.append(MapSpec("map_scale.cu.j2", (("factor", 64.0),), dtype=d, origin=_origin(7, "x * 64")))
    # (experts, top_k, n, k, gather, bias): Mixtral's gate|up and down, DeepSeek-V2's odd 1407 (no
    # 16-byte chunks: synchronous tile loads), 256 experts with biases
    for e, k, n, kd, gather, bias in [(8, 2, 28672, 4096, True, False), (8, 2, 4096, 14336, False, False),
                                      (64, 6, 2815, 4096, True, False), (64, 6, 4096, 1407, False, False),
                                      (256, 8, 100, 64, True, True)]:
        for d in DTYPES if full else (next(dt),):
            out.append(MoeGemmSpec(e, n, kd, gather, bias, dtype=d, origin=_origin(8, "linear(x, w1)")))
            out.append(MoeRouteSpec(e, k, 4096 if n > 4096 else n, dtype=d, origin=_origin(9, "moe(h, logits)")))
    # weight-only quantized linears: Llama-3-8B's shapes (int4 group 128, fused qkv / gate+up), int8 per
    # channel, ggml q4 (groups of 32, a chunk past k) and q8_0, q5_k / q6_k (int8 "pre", groups of 32 / 16); both
    # token buckets, with and without bias
    qgemv = [("int4", "post", 6144, 4096, 128), ("int4", "post", 28672, 4096, 128), ("int4", "post", 4096, 14336, 128),
             ("int8", "post", 4096, 4096, 4096), ("int8", "post", 100, 40, 40), ("int4", "pre", 1536, 576, 32),
             ("int8", "post", 576, 1536, 32), ("int8", "pre", 576, 1536, 16), ("int8", "pre", 1536, 512, 32)]
    for i, (fmt, mode, n, kd, g) in enumerate(qgemv):
        for j, d in enumerate(DTYPES if full else (next(dt),)):
            tokens = (8, 16)[(i + j) % 2]
            splits = choose_splits(fmt, n, kd, tokens, 132) if d != "fp32" else 1  # x's slice fits shared memory
            out.append(QGemvSpec(fmt, mode, n, kd, g, tokens=tokens, has_bias=bool(i % 2), dtype=d,
                                 origin=_origin(10, "linear(x, w)"), splits=splits))
    return out


@pytest.fixture(scope="module", autouse=True)
def fresh_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_CACHE", str(tmp_path_factory.mktemp("kernels")))  # compile for real, not from ~/.cache
    yield
    mp.undo()


def _compile_all(spec):
    ks = render(spec)
    lines = ks.source.splitlines()
    assert lines[0] == f"// ==== {ks.name}"
    assert f"// origin: {spec.origin}" in lines[1]
    # the origin comment sits right above every entry point too
    for entry in ks.entries:
        at = next(i for i, line in enumerate(lines) if f" {entry}(" in line and "__global__" in line)
        assert lines[at - 1] == f"// origin: {spec.origin}"
    for arch in ARCHS:
        ka = ks
        if isinstance(spec, PrefillAttnSpec) and arch == "sm_80":  # what the launch wrapper renders there
            ka = render(dataclasses.replace(spec, sm=80))
        img = nvrtc.compile_source(ka.source, ka.name, arch, ka.origin)
        assert img.kind == "cubin" and img.data[:4] == b"\x7fELF" and len(img.data) > 1000
        for entry in ka.entries:
            assert entry.encode() in img.data


@pytest.mark.parametrize("spec", _specs(full=False), ids=lambda s: render(s).name)
def test_every_kernel_compiles(spec):
    _compile_all(spec)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [s for s in _specs(full=True) if s not in _specs(full=False)],
                         ids=lambda s: render(s).name)
def test_every_kernel_compiles_full_grid(spec):
    _compile_all(spec)


def test_rendered_source_is_specialized_and_readable():
    spec = DecodeAttnSpec(32, 8, 128, 16, 128 ** -0.5, window=4096, softcap=50.0, origin=_origin(9, "attn"))
    src = render(spec).source
    assert "heads=32 kv_heads=8 head_dim=128 page_size=16" in src  # the constants it was specialized on
    assert "ctx - 4096" in src and "tanhf" in src
    assert not re.search(r"\{\{|\{%[\s-]", src)  # no Jinja left over (PTX operands read "{%0, ...}")
    assert "\n\n\n" not in src
    plain = render(DecodeAttnSpec(32, 8, 128, 16, 128 ** -0.5, origin=_origin(9, "attn"))).source
    assert "tanhf" not in plain and "4096" not in plain


@pytest.mark.parametrize("hd", [64, 80, 96, 128, 256])
def test_decode_picks_tensor_cores_without_spills(hd):
    """16-bit caches with head_dim % 16 == 0 take the tensor-core decode kernel (one entry: the split
    merge is fused); ptxas reports no local-memory spills, the registers hold O and the scores."""
    mk = lambda d, dt, **kw: render(DecodeAttnSpec(32, 8, d, 16, 0.1, dtype=dt, origin="t", **kw))  # noqa: E731
    for dt in ("bf16", "fp16"):
        ks = mk(hd, dt, softcap=30.0, alibi_max=8.0, window=100)
        assert ks.meta["mma"] and ks.entries == (ks.name,)
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{dt.replace('fp', 'f')}" in ks.source
        img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
        assert "0 bytes spill stores" in img.log and "0 bytes stack frame" in img.log, img.log
    assert not mk(hd, "fp32").meta["mma"] and "mma.sync" not in mk(hd, "fp32").source
    assert not mk(72, "bf16").meta["mma"]


@pytest.mark.parametrize("spec", [
    ActSpec("silu", True, 14336, unroll=4, variant="flat", origin="t"),
    ActSpec("gelu_tanh", True, 11, dtype="fp16", unroll=4, variant="flat", origin="t"),
    ActSpec("gelu", False, 3072, dtype="fp32", unroll=4, variant="flat", origin="t"),
    RopeCacheSpec(32, 8, 128, 128, 16, theta=500000.0, scaling="llama3", factor=8.0, original_max_position=8192,
                  prefetch=True, origin="t"),
    RopeCacheSpec(8, 4, 256, 128, 16, layout="interleaved", scaling="dynamic", factor=2.0,
                  original_max_position=4096, prefetch=True, origin="t"),
    RopeCacheSpec(64, 8, 128, 128, 7, kv_fp8=True, layout="interleaved", prefetch=True, origin="t"),
], ids=lambda s: render(s).name)
def test_issue12_kernels_without_spills(spec):
    """The unrolled activation and the loads-first rotary kernel keep their loads in registers:
    ptxas reports no local-memory spills on sm_90a (the activation's launch bounds cap registers)."""
    ks = render(spec)
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert "0 bytes spill stores" in img.log and "0 bytes stack frame" in img.log, img.log


def test_decode_tuned_switch_renders_both_kernels():
    """DecodeAttnSpec.tuned picks the parallel split merge and the page-index prefetch; False keeps
    the kernel as it was (its shared-memory weight table, page lookups in the copy)."""
    new = render(DecodeAttnSpec(32, 8, 128, 16, 0.1, origin="t")).source
    old = render(DecodeAttnSpec(32, 8, 128, 16, 0.1, tuned=False, origin="t")).source
    assert "page_next" in new and "wts[" not in new
    assert "page_next" not in old and "wts[" in old


# Decode variants the grids above leave out where the live-split range [s0, s1) differs: a window
# with the kernel before #12 (its shared-memory merge, page lookups in the copy), fp8 pages with a window
# on both kernels, and fp32 (CUDA cores) with a window and the old merge.
LIVE_SPLIT_SPECS = [
    DecodeAttnSpec(32, 8, 128, 16, 0.1, window=100, tuned=False, origin="t"),
    DecodeAttnSpec(32, 8, 128, 16, 0.1, window=100, tuned=False, kv_fp8=True, origin="t"),
    DecodeAttnSpec(32, 8, 128, 16, 0.1, window=100, kv_fp8=True, softcap=30.0, origin="t"),
    DecodeAttnSpec(32, 1, 128, 16, 0.1, window=100, alibi_max=8.0, origin="t"),
    DecodeAttnSpec(32, 8, 128, 16, 0.1, window=100, tuned=False, dtype="fp32", origin="t"),
    DecodeAttnSpec(8, 2, 128, 7, 0.1, window=37, kv_fp8=True, dtype="fp32", origin="t"),
    DecodeAttnSpec(8, 2, 72, 16, 0.1, window=37, alibi_max=4.0, origin="t"),
]


@pytest.mark.parametrize("spec", LIVE_SPLIT_SPECS + [
    DecodeAttnSpec(32, 8, 128, 16, 0.1, origin="t"), DecodeAttnSpec(32, 8, 128, 16, 0.1, dtype="fp32", origin="t")],
    ids=lambda s: render(s).name)
def test_decode_blocks_without_tokens_leave_at_once(spec):
    """The split grid is sized from a capacity (a CUDA graph's max_context) the context may be far below
    (benchmarks/2026-12-03-04.md, session 13): a block of a split without tokens returns right after reading the
    context length (no partials, fence or counter increment), the fused merge counts the splits with
    tokens [s0, s1) instead of gridDim.x, and the only such split normalizes and writes out itself.
    Both kernels (tensor cores, CUDA cores), both merges, windows and fp8 pages compile."""
    src = render(spec).source
    assert "if (split < s0 || split >= s1) return;" in src
    assert "const bool alone = s1 - s0 == 1;" in src and "if (alone)" in src
    assert "atomicAdd(counter, 1u) == (unsigned)(s1 - s0 - 1)" in src
    assert "gridDim.x - 1" not in src and "gridDim.x == 1" not in src and "gridDim.x > 1" not in src
    assert "(long long)tid * max_splits" not in src  # no neutral (-inf, 0) partials of empty splits any more
    assert ("const int s0 = first / partition;" in src) == bool(spec.window)
    body = src[src.index(f" {render(spec).name}("):]
    if "int fresh_j" in src:  # render.EARLY_KV (tensor cores): the wait after the first cache copies, before q
        assert body.index("context_lens[seq]") < body.index("return;  // block-uniform") < body.index(
            "load_tile(0") < body.index("pdl_wait();") < body.index("const scalar_t* qh = q")
    else:  # the PDL wait comes first, before the context length is read
        assert body.index("pdl_wait();") < body.index("context_lens[seq]") < body.index("return;  // block-uniform")
    _compile_all(spec)


@pytest.mark.parametrize("hd", [64, 96, 128, 256])
def test_fp8_kv_decode_on_tensor_cores_without_spills(hd):
    """An fp8 KV cache keeps the tensor-core decode (fp16 MMAs on the exactly converted bytes, no
    ldmatrix) with more stages in flight than the 16-bit cache, and no spills."""
    for dt in ("bf16", "fp16"):
        ks = render(DecodeAttnSpec(32, 8, hd, 16, 0.1, dtype=dt, kv_fp8=True, softcap=30.0, alibi_max=8.0,
                                   window=100, origin="t"))
        plain = render(DecodeAttnSpec(32, 8, hd, 16, 0.1, dtype=dt, origin="t"))
        assert ks.meta["mma"] and "m16n8k16.row.col.f32.f16.f16.f32" in ks.source and "ldmatrix_x4(b," not in ks.source
        assert ks.meta["stages"] >= plain.meta["stages"]
        img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
        assert "0 bytes spill stores" in img.log and "0 bytes stack frame" in img.log, img.log
    with pytest.raises(KernelSpecError, match="kv_fp8|head_dim"):
        DecodeAttnSpec(8, 2, 72, 16, 0.1, kv_fp8=True, origin="t")


@pytest.mark.parametrize("d, dt, causal, window", [(128, "bf16", True, 0), (64, "fp16", False, 100),
                                                  (128, "fp16", True, 37)])
def test_fp8_kv_prefill_on_wgmma_builds(d, dt, causal, window, monkeypatch):
    """KILN_PREFILL_FP8_SM90=1 (the default; "0": the mma kernel): the wgmma prefill kernel takes fp8 pages (the
    scales as arguments), 2 converted stages and 2 byte slots in the 3 stages' shared memory, and builds for sm_90a
    without spills, its split-KV form and merge too (the k_scale in the split's score scale, v_scale in its
    partials); the warp-specialised form keeps the mma kernel; a bad switch value is refused."""
    from kiln.codegen import render as R
    monkeypatch.setattr(R, "PREFILL_FP8_SM90", "1")
    spec = PrefillAttnSpec(32, 8, d, 16, 0.1, causal=causal, window=window, dtype=dt, kv_fp8=True, origin="t fp8 sm90")
    ks = render(spec)
    plain = render(PrefillAttnSpec(32, 8, d, 16, 0.1, causal=causal, window=window, dtype=dt, origin="t"))
    assert ks.meta["variant"] == "sm90" and not ks.meta["ws"] and "fp8kv" in ks.name
    assert ks.meta["smem"] == plain.meta["smem"] <= 227 * 1024
    src = ks.source
    assert "convert_tile(it);" in src and "unsigned char* raw_s" in src and "(it % 2)" in src
    assert src.count("float k_scale, float v_scale)") == 2  # the kernel and its split form; the merge takes none
    assert src.count("o[n][2 * h] * v_scale") == 1  # the split's partials carry v_scale, as the plain form's 1 / sum
    for r in (ks, plain):
        assert r.meta["split_kv"] and r.entries == (r.name, r.name + "_split", r.name + "_merge")
    mt = "bf16" if dt == "bf16" else "f16"
    assert f"wgmma.mma_async.sync.aligned.m64n{d}k16.f32.{mt}.{mt}" in src
    img = nvrtc.compile_source(src, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert img.kind == "cubin" and ks.name.encode() in img.data
    frames = re.findall(r"\d+ bytes stack frame, \d+ bytes spill stores, \d+ bytes spill loads", img.log)
    assert frames == ["0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"] * 3, img.log
    assert render(dataclasses.replace(spec, ws=True, origin="t fp8 ws")).meta["variant"] == "mma"
    assert prefill_variant(dataclasses.replace(spec, sm=90)) == "sm90"
    monkeypatch.setattr(R, "PREFILL_FP8_SM90", "0")
    assert prefill_variant(dataclasses.replace(spec, sm=90)) == "mma"
    monkeypatch.setattr(R, "PREFILL_FP8_SM90", "yes")
    with pytest.raises(KernelSpecError, match="KILN_PREFILL_FP8_SM90"):
        render(dataclasses.replace(spec, origin="t fp8 bad"))


@pytest.mark.parametrize("kv_fp8, window", [(False, 0), (True, 0), (False, 100)])
def test_decode_dynamic_partition_builds(kv_fp8, window, monkeypatch):
    """KILN_DECODE_DYN_PART=1: the tensor-core decode kernel takes the splits to fill (dyn_splits) after its
    other arguments and derives its partition from the sequence's length, capped by the host's, in whole tiles;
    without a window the first page's load then follows the length's; it builds without spills. The launch
    passes SMs / (sequences x head chunks) where it picks the partition, else 0."""
    from kiln.codegen import render as R
    monkeypatch.setattr(R, "DECODE_DYN_PART", "1")
    spec = DecodeAttnSpec(32, 8, 128, 16, 0.1, kv_fp8=kv_fp8, window=window, origin="t dyn part")
    ks = render(spec)
    src = ks.source
    assert ks.meta["dyn_part"] and "int partition_cap, int max_splits" in src and "int dyn_splits)" in src
    body = src[src.index(f" {ks.name}("):]
    assert body.index("const int ctx = context_lens[seq];") < body.index("int partition = partition_cap;")
    if not window:
        assert body.index("int partition = partition_cap;") < body.index("int page0;")
    assert f"/ {ks.meta['tile']}) * {ks.meta['tile']})" in src
    img = nvrtc.compile_source(src, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert "0 bytes spill stores" in img.log and "0 bytes stack frame" in img.log, img.log
    monkeypatch.setattr(R, "DECODE_DYN_PART", "2")
    with pytest.raises(KernelSpecError, match="KILN_DECODE_DYN_PART"):
        render(dataclasses.replace(spec, origin="t dyn bad"))


def test_prefill_picks_tensor_cores_for_16_bit():
    mk = lambda d, dt: render(PrefillAttnSpec(32, 8, d, 16, 0.1, dtype=dt, sm=80, origin="t"))  # noqa: E731
    assert mk(128, "bf16").meta["mma"] and mk(80, "fp16").meta["mma"]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in mk(128, "bf16").source
    assert not mk(128, "fp32").meta["mma"] and not mk(256, "bf16").meta["mma"]
    assert "mma.sync" not in mk(128, "fp32").source


def test_prefill_picks_wgmma_on_hopper():
    """sm 9x, 16-bit, head_dim 64/128 (causal or not, sliding window): the wgmma kernel; softcap,
    ALiBi, fp32, other head dims and other GPUs keep the older kernels."""
    def variant(**kw):
        args = dict(heads=32, kv_heads=8, head_dim=128, page_size=16, scale=0.1, origin="t") | kw
        return render(PrefillAttnSpec(**args)).meta["variant"]
    assert variant() == "sm90" and variant(dtype="fp16", head_dim=64, causal=False, window=100) == "sm90"
    assert variant(sm=80) == "mma" and variant(sm=100) == "mma" and variant(softcap=30.0) == "mma"
    assert variant(alibi_max=8.0) == "mma" and variant(head_dim=80) == "mma"
    assert variant(dtype="fp32") == "simt" and variant(head_dim=256) == "simt"
    for d, dt in ((128, "bf16"), (64, "fp16")):
        ks = render(PrefillAttnSpec(32, 8, d, 16, 0.1, window=64, dtype=dt, origin="t"))
        assert "sm=90" in ks.source.splitlines()[2]  # the choice is a constant of the spec, shown in the header
        mt = "bf16" if dt == "bf16" else "f16"
        assert f"wgmma.mma_async.sync.aligned.m64n128k16.f32.{mt}.{mt}" in ks.source  # S = Q K^T
        assert f"wgmma.mma_async.sync.aligned.m64n{d}k16.f32.{mt}.{mt}" in ks.source  # O += P V
        assert "mma.sync.aligned" not in ks.source and "key > qp - 64" in ks.source
        img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
        assert img.kind == "cubin" and ks.name.encode() in img.data
        # registers only: no spills to local memory (a run-time-indexed fragment would land there)
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in img.log, img.log
    assert ks.meta["smem"] <= 227 * 1024 and ks.meta["threads"] == 256


@pytest.mark.parametrize("d, dt, causal, window, page", [(128, "bf16", True, 0, 16), (64, "fp16", False, 100, 7),
                                                         (128, "fp16", True, 37, 7)])
def test_prefill_warp_specialised_builds(d, dt, causal, window, page):
    """ws=True on Hopper: the warp-specialised wgmma kernel (3 warpgroups, producer / consumers as
    the two branches of one if, so setmaxnreg takes effect) builds for sm_90a without spills, its
    K/V ring as deep as shared memory allows; ws is ignored where the wgmma kernel does not apply."""
    spec = PrefillAttnSpec(32, 8, d, page, 0.1, causal=causal, window=window, dtype=dt, ws=True, origin="t")
    ks = render(spec)
    assert ks.meta["variant"] == "sm90" and ks.meta["ws"] and ks.meta["threads"] == 384
    assert ks.meta["smem"] <= 227 * 1024 and ks.meta["stages"] == (3 if d == 128 else 4)
    src = ks.source
    assert "__launch_bounds__(384, 1)" in src and "sm90ws" in ks.name and "ws=True" in src.splitlines()[2]
    assert "setmaxnreg.dec.sync.aligned.u32 40" in src and "setmaxnreg.inc.sync.aligned.u32 232" in src
    assert "cp.async.mbarrier.arrive.noinc" in src and f"m64n{d}k16" in src
    img = nvrtc.compile_source(src, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert img.kind == "cubin" and ks.name.encode() in img.data
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in img.log, img.log
    assert "C7508" not in img.log and "setmaxnreg" not in img.log.lower(), img.log  # ignored setmaxnreg warns
    # the same spec on an older GPU, or with softcap, keeps the other kernels (ws changes nothing there)
    assert render(dataclasses.replace(spec, sm=80)).meta["variant"] == "mma"
    assert not render(dataclasses.replace(spec, ws=False)).meta["ws"]
    with pytest.raises(KernelSpecError, match="PrefillAttnSpec.ws"):
        PrefillAttnSpec(32, 8, d, page, 0.1, ws=1, origin="t")


@pytest.mark.parametrize("d, dt, causal, window, page", [(128, "bf16", True, 0, 16), (64, "fp16", False, 100, 7),
                                                         (128, "fp16", True, 37, 7)])
def test_prefill_split_kv_builds(d, dt, causal, window, page):
    """Issue #16: the sm90 prefill source carries the plain kernel, its split-KV form and the merge;
    all three build for sm_90a without spills. The launch splits only small grids (a short query
    after a long context), at most one split per KV tile of the bound and about one block per SM."""
    from kiln.codegen.kernels import PREFILL_MAX_SPLITS, prefill_splits
    ks = render(PrefillAttnSpec(32, 8, d, page, 0.1, causal=causal, window=window, dtype=dt, origin="t"))
    assert ks.meta["split_kv"] and ks.entries == (ks.name, f"{ks.name}_split", f"{ks.name}_merge")
    assert "part_o" in ks.source and "exp2f(ml.x - mx)" in ks.source
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert img.kind == "cubin" and all(e.encode() in img.data for e in ks.entries)
    assert img.log.count("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") == 3, img.log
    meta = ks.meta
    # 32 new tokens after 2,000 cached: 8 blocks; 16 KV tiles and 132 // 8 SMs a block, under the cap
    assert prefill_splits(meta, 8, 2032, 132) == min(16, PREFILL_MAX_SPLITS)
    assert prefill_splits(meta, 8, 300, 132) == 3  # no more splits than the bound's 128-key tiles
    assert prefill_splits(meta, 2048, 1024, 132) == 1  # 8 x 1024 prefill fills the GPU: the plain kernel
    assert prefill_splits(meta, 40, 8192, 132) == 3
    ws = render(PrefillAttnSpec(32, 8, d, page, 0.1, dtype=dt, ws=True, origin="t")).meta
    mma = render(PrefillAttnSpec(32, 8, d, page, 0.1, dtype=dt, sm=80, origin="t")).meta
    assert prefill_splits(ws, 8, 2032, 132) == 1 and prefill_splits(mma, 8, 2032, 132) == 1


def test_compile_error_shows_generated_source(monkeypatch):
    monkeypatch.setattr(render_mod, "f32", lambda x: "1.0.0f")  # every float constant is now malformed
    spec = NormSpec("rms", 4096, 1e-6, origin="models/broken.kiln:7 rmsnorm(x, w)")
    ks = render_mod._norm(spec)
    with pytest.raises(nvrtc.KernelCompileError) as err:
        nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin)
    msg = str(err.value)
    assert "models/broken.kiln:7 rmsnorm(x, w)" in msg
    marked = [line for line in msg.splitlines() if line.startswith(">")]
    assert marked and "1.0.0f" in marked[0]
    n = int(marked[0][1:].split("|")[0])
    assert ks.source.splitlines()[n - 1] in marked[0]


def test_ptx_fallback_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    assert nvrtc.arch_for_capability(9, 0) == ("sm_90a", "cubin")
    assert nvrtc.arch_for_capability(8, 0) == ("sm_80", "cubin")
    arch, kind = nvrtc.arch_for_capability(99, 9)  # a future GPU: PTX the driver can JIT
    assert kind == "ptx" and arch == f"compute_{max(nvrtc.supported_archs())}"
    ks = render(MapSpec("map_softcap.cu.j2", (("cap", 30.0), ("inv_cap", 1 / 30.0)), origin=_origin(1, "softcap")))
    img = nvrtc.compile_source(ks.source, ks.name, arch, ks.origin)
    assert img.kind == "ptx" and b".entry " + ks.entries[0].encode() in img.data
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    again = nvrtc.compile_source(ks.source, ks.name, arch, ks.origin)
    assert again.data == img.data and list(tmp_path.iterdir()) == files


def test_strict_templates():
    from kiln.codegen.jinja import env as jinja_env

    env = jinja_env()
    with pytest.raises(Exception, match="undefined"):
        env.get_template("norm.cu.j2").render(name="x")


def _hf_config(rope_parameters, head_dim=128, max_pos=4096):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=head_dim,
                                    max_position_embeddings=max_pos, rope_parameters=rope_parameters)


@pytest.mark.parametrize("case", [
    (dict(scaling="none"), {"rope_type": "default"}, 128, 128),
    (dict(scaling="linear", factor=4.0), {"rope_type": "linear", "factor": 4.0, "partial_rotary_factor": 0.5}, 128, 64),
    (dict(scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192),
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, 128, 128),
])
def test_inv_freq_matches_hf(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours, theirs, hd, rot = case
    theta = 500000.0
    spec = RopeCacheSpec(32, 8, hd, rot, 16, theta=theta, **ours)
    cfg = _hf_config({"rope_theta": theta, **theirs}, head_dim=hd)
    rope_type = theirs["rope_type"]
    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    expected = fn(cfg, "cpu")[0] if fn else 1.0 / (theta ** (torch.arange(0, rot, 2).float() / rot))
    assert torch.equal(rope.inv_freq(spec), expected)  # the same float32 values, bit for bit


@pytest.mark.parametrize("seq_len", [100, 4096, 10000, 33333])
def test_dynamic_ntk_matches_hf(seq_len):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    spec = RopeCacheSpec(32, 8, 128, 128, 16, scaling="dynamic", factor=2.0, original_max_position=4096)
    cfg = _hf_config({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    expected = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=seq_len)[0]
    torch.testing.assert_close(rope.dynamic_inv_freq(spec, seq_len), expected, rtol=1e-6, atol=0)
    # the kernel's formula constants: base and exponent, evaluated in double on the device
    base = 10000.0 * (2.0 * max(seq_len, 4096) / 4096 - 1.0) ** (128 / 126)
    assert math.isclose(rope.dynamic_base(spec, seq_len), base, rel_tol=1e-12)


@pytest.mark.parametrize("theirs", [
    {"factor": 4.0, "original_max_position_embeddings": 32768},
    {"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0, "beta_slow": 2.0},
    {"factor": 4.0, "original_max_position_embeddings": 8192, "truncate": False, "partial_rotary_factor": 0.5},
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.707},
    {"factor": 2.0, "original_max_position_embeddings": 2048, "attention_factor": 0.9},
])
def test_yarn_matches_hf(theirs):
    """YaRN's static table and attention factor, through the spec's kernel constants, bit for bit."""
    from kiln.dsl import rope as dsl_rope
    from kiln.dsl.bind import RopeScaling
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, rot = 1000000.0, int(128 * theirs.get("partial_rotary_factor", 1.0))
    cfg = _hf_config({"rope_type": "yarn", "rope_theta": theta, **theirs})
    expected, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    fields = {k: v for k, v in theirs.items() if k != "partial_rotary_factor"}
    sc = dsl_rope.resolve(RopeScaling("yarn", **{"factor": None, **fields}), 4096)
    assert sc.attention_factor == hf_factor
    spec = RopeCacheSpec(32, 8, 128, rot, 16, theta=theta, scaling="yarn", factor=sc.factor,
                         original_max_position=sc.original_max_position_embeddings, beta_fast=sc.beta_fast,
                         beta_slow=sc.beta_slow, truncate=sc.truncate, attention_factor=sc.attention_factor)
    assert torch.equal(rope.inv_freq(spec), expected)


@pytest.mark.parametrize("seq_len", [None, 100, 4096, 4097, 131072])
def test_longrope_matches_hf(seq_len):
    """Phi-3 128k style: the short table up to the original length, the long one past it; the
    attention factor from max_position_embeddings / original_max_position_embeddings."""
    from kiln.dsl import rope as dsl_rope
    from kiln.dsl.bind import RopeScaling
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    short = [1.0 + 0.013 * i for i in range(48)]
    long = [1.0 + 0.71 * i for i in range(48)]
    cfg = _hf_config({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
                      "original_max_position_embeddings": 4096}, head_dim=96, max_pos=131072)
    expected, hf_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=seq_len)
    sc = dsl_rope.resolve(RopeScaling("longrope", None, original_max_position_embeddings=4096,
                                      short_factor=tuple(short), long_factor=tuple(long)), 131072)
    assert sc.factor == 32.0 and sc.attention_factor == hf_factor
    spec = RopeCacheSpec(32, 32, 96, 96, 16, scaling="longrope", factor=sc.factor, original_max_position=4096,
                         attention_factor=sc.attention_factor, short_factor=short, long_factor=long)
    assert torch.equal(rope.step_inv_freq(spec, seq_len or 1), expected)
    assert torch.equal(rope.inv_freq(spec), ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu")[0])  # HF's init: short
    text = render(spec).source
    assert "kInvFreqLong" in text and "seq_len[0] > 4096" in text


@pytest.mark.parametrize("make, field", [
    (lambda: NormSpec("rms", 4096, 0.0), "eps"),
    (lambda: NormSpec("batch", 4096, 1e-5), "kind"),
    (lambda: NormSpec("rms", 4096, 1e-5, has_bias=True), "has_bias"),
    (lambda: RopeCacheSpec(32, 6, 128, 128, 16), "kv_heads"),
    (lambda: RopeCacheSpec(32, 8, 128, 129, 16), "rotary_dim"),
    (lambda: RopeCacheSpec(32, 8, 128, 128, 16, scaling="ntk"), "scaling"),
    (lambda: RopeCacheSpec(32, 8, 128, 128, 16, scaling="yarn", factor=4.0), "original_max_position"),
    (lambda: RopeCacheSpec(32, 8, 128, 128, 16, scaling="longrope", factor=4.0, original_max_position=4096,
                           short_factor=(1.0,) * 64, long_factor=(2.0,) * 63), "long_factor"),
    (lambda: RopeCacheSpec(32, 8, 128, 128, 16, scaling="yarn", factor=4.0, original_max_position=4096,
                           attention_factor=0.0), "attention_factor"),
    (lambda: RopeCacheSpec(32, 8, 128, 128, 16, scaling="llama3", factor=8.0), "original_max_position"),
    (lambda: DecodeAttnSpec(32, 8, 100, 16, 0.1), "head_dim"),
    (lambda: PrefillAttnSpec(32, 8, 128, 0, 0.1), "page_size"),
    (lambda: ActSpec("swish", True, 128), "kind"),
    (lambda: EmbedSpec(128256, 64, dtype="int8"), "dtype"),
    (lambda: MapSpec("../x.cu.j2"), "body"),
    (lambda: QGemvSpec("int3", "post", 64, 128, 128), "fmt"),
    (lambda: QGemvSpec("int4", "post", 64, 128, 32), "group"),
    (lambda: QGemvSpec("int4", "post", 64, 128, 128, tokens=4), "tokens"),
    (lambda: QGemvSpec("int4", "post", 64, 4096, 128, splits=5), "splits"),  # 64 chunks in 16s: 4 splits, not 5
    (lambda: QGemvSpec("int4", "post", 64, 4096, 128, variant="loop", splits=2), "splits"),
    (lambda: QGemvSpec("int4", "post", 64, 4096, 128, variant="tiled"), "variant"),
    (lambda: MoeRouteSpec(8, 9, 4096), "top_k"),
    (lambda: MoeGemmSpec(8, 0, 4096, True), "n"),
    (lambda: MoeGemmSpec(8, 128, 4096, True, block_m=48), "block_m"),
])
def test_spec_errors_name_the_field(make, field):
    with pytest.raises(KernelSpecError, match=rf"\.{field}:"):
        make()


def test_moe_gemm_picks_tensor_cores_for_16_bit():
    mk = lambda dt, k=4096: render(MoeGemmSpec(8, 28672, k, True, dtype=dt, origin="t"))  # noqa: E731
    src = mk("bf16").source
    assert mk("bf16").meta["mma"] and mk("bf16").meta["async_copy"] and mk("fp16").meta["mma"]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in src and "cp.async" in src
    assert "sorted_token[row]" in src  # the expert input's rows gathered in the tile load
    assert not mk("bf16", 1407).meta["async_copy"] and "cp.async" not in mk("bf16", 1407).source
    assert not mk("fp32").meta["mma"] and "mma.sync" not in mk("fp32").source and "fmaf" in mk("fp32").source


MOE_SPECS = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "phimoe")


@pytest.mark.parametrize("name", MOE_SPECS)
def test_moe_lowers_to_grouped_gemms(name):
    """Every shipped MoE spec's experts become grouped GEMMs on the cuda backend (gate and up as one,
    gathering the tokens; down over the sorted rows), not the per-expert reference."""
    from kiln.codegen.fuse import Exec, fuse
    from kiln.dsl import check, load_spec
    from kiln.dsl.loader import find_spec

    if find_spec(name) is None:
        pytest.skip(f"no models/{name}.kiln")
    plan = check(load_spec(name))
    moe_ops = [op for op in fuse(plan, torch.bfloat16, 16) if op.instrs[0].experts]
    assert moe_ops and all(op.kind is Exec.MOE for op in moe_ops)
    route, up, down = moe_ops[0].spec
    experts = moe_ops[0].instrs[0].experts
    ffn = plan.types[experts[0].instrs[0].out].shape[1]
    assert isinstance(route, MoeRouteSpec) and route.experts == len(experts)
    assert up.gather and not down.gather and up.k == down.n == route.hidden
    assert up.n >= 2 * ffn and down.k == ffn
    assert [len(s) for s in moe_ops[0].extra["slices"]] == [2, 1]
    assert ".kiln:" in up.origin and "linear(" in up.origin  # named after the expert's spec line


def test_moe_expert_program_without_grouped_lowering_falls_back():
    """An expert with an op the grouped path does not cover (a norm with a weight per expert) runs
    its reference, saying why, at the op's file:line."""
    from kiln.codegen.fuse import Exec, fuse
    from kiln.dsl import check
    from kiln.dsl.loader import parse_spec

    text = """spec moe_normed extends mixtral

block expert[experts] {
  weights "model.layers.{layer}.block_sparse_moe.experts.{expert}." {
    w1: [ffn, hidden] <- "w1.weight"
    w3: [ffn, hidden] <- "w3.weight"
    w2: [hidden, ffn] <- "w2.weight"
    e_norm: [hidden] <- "norm.weight"
  }
  forward(x) {
    return linear(act(linear(rmsnorm(x, e_norm, eps=eps), w1), fn=act) * linear(x, w3), w2)
  }
}
"""
    plan = check(parse_spec(text, "moe_normed.kiln"))
    moe_ops = [op for op in fuse(plan, torch.bfloat16, 16) if op.instrs[0].experts]
    assert moe_ops and all(op.kind is Exec.TORCH for op in moe_ops)
    assert "rmsnorm at moe_normed.kiln:11 inside an expert has no grouped lowering" in moe_ops[0].extra["why"]


@pytest.mark.parametrize("n, k, tokens", [(6144, 4096, 8), (4096, 4096, 8), (28672, 4096, 16), (4096, 14336, 8),
                                          (4096, 14336, 16)])
def test_quant_gemv_stream_variant_fits_registers(n, k, tokens):
    """The streaming W4A16 GEMV at Llama-3-8B's shapes, with the K splits the device picks (132 SMs): no
    local-memory spills with its ring of weight loads, <= 80 registers (3 blocks of 256 threads per SM);
    every launch asks the dependent-launch controls and stages through cp.async."""
    from kiln.codegen.quant_kernels import choose_splits

    for variant in ("stream", "loop"):
        splits = choose_splits("int4", n, k, tokens, 132) if variant == "stream" else 1
        spec = QGemvSpec("int4", "post", n, k, 128, tokens=tokens, variant=variant, splits=splits, origin="t")
        ks = render(spec)
        assert ks.meta["variant"] == variant and ks.meta["splits"] == splits
        assert ("griddepcontrol.wait" in ks.source) == (variant == "stream")
        img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in img.log, img.log
        regs = [int(m) for m in re.findall(r"Used (\d+) registers", img.log)]
        assert variant == "loop" or max(regs) <= 80, img.log


@pytest.mark.parametrize("mode, static", [("tensor", False), ("tensor", True), ("token", False)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_fp8_act_quant_compiles(mode, static, dtype):
    from kiln.codegen.quant_kernels import ActQuantSpec

    ks = render(ActQuantSpec(mode, 4096, static, dtype, origin=_origin(11, "linear(x, w) fp8")))
    assert len(ks.entries) == (2 if mode == "tensor" and not static else 1)
    assert "cvt.rn.satfinite.e4m3x2.f32" in ks.source
    for entry in ks.entries:  # the origin comment right above each entry point
        lines = ks.source.splitlines()
        at = next(i for i, line in enumerate(lines) if f" {entry}(" in line and "__global__" in line)
        assert lines[at - 1] == f"// origin: {ks.origin}"
    # fp8 conversions exist from sm_89 on (as does cuBLASLt's fp8 GEMM): Hopper only here
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert "0 bytes spill stores" in img.log and all(e.encode() in img.data for e in ks.entries)


@pytest.mark.parametrize("fmt, mode, n, k, g", [("int4", "post", 6144, 4096, 128), ("int4", "post", 4096, 4096, 128),
                                                ("int4", "post", 28672, 4096, 128), ("int4", "post", 4096, 14336, 128),
                                                ("int4", "pre", 1536, 576, 32), ("int8", "post", 4096, 4096, 4096),
                                                ("int8", "post", 576, 1536, 32), ("int8", "post", 100, 40, 40)])
@pytest.mark.parametrize("tokens", [8, 16])
def test_quant_gemv_persist_variant_compiles(fmt, mode, n, k, g, tokens):
    """The persistent W4A16 / W8A16 GEMV (every format the template serves: int4 post / pre, int8) at
    Llama-3-8B's shapes and odd ones, with the split and tiles per block the device picks (132 SMs):
    it builds for sm_90a within its launch bounds (<= 128 registers, 2 blocks of 256 threads per SM)
    with at most a few spilled bytes, asks the dependent-launch controls, and its shared memory fits."""
    from kiln.codegen.quant_kernels import PERSIST_BPS, SMEM_MAX, choose_persist, persist_smem

    splits, tpb = choose_persist(fmt, n, k, tokens, 132)
    assert persist_smem(fmt, k, tokens, splits) <= SMEM_MAX // PERSIST_BPS[tokens]
    dt = ("bf16", "fp16")[tokens == 16]
    spec = QGemvSpec(fmt, mode, n, k, g, tokens=tokens, has_bias=True, dtype=dt, variant="persist", splits=splits,
                     tpb=tpb, origin=_origin(10, "linear(x, w)"))
    ks = render(spec)
    assert ks.meta["variant"] == "persist" and ks.meta["splits"] == splits and ks.meta["tpb"] == tpb
    assert "griddepcontrol.wait" in ks.source and "ld.global.nc.L1::no_allocate.v4.u32" in ks.source
    assert f"// origin: {spec.origin}" in ks.source
    if tokens == 8:  # Ampere builds it too (no dependent launch there: griddepcontrol is guarded)
        assert nvrtc.compile_source(ks.source, ks.name, "sm_80", ks.origin).kind == "cubin"
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert all(e.encode() in img.data for e in ks.entries)
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", img.log)]
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", img.log)]
    assert max(regs) <= 65536 // (256 * PERSIST_BPS[tokens]) and max(spills) <= 32, img.log
    # fp32 runs keep the CUDA-core loop whatever the variant asks
    assert render(dataclasses.replace(spec, dtype="fp32", splits=1, tpb=1)).meta["variant"] == "loop"


@pytest.mark.parametrize("make", [
    lambda: QGemvSpec("int4", "post", 4096, 14336, 128, tokens=16, splits=1),  # x slice 459 KB
    lambda: QGemvSpec("int4", "post", 4096, 14336, 128, tokens=16, splits=2),  # 241 KB: the bench's CudaDriverError
    lambda: QGemvSpec("int4", "post", 4096, 14336, 128, tokens=16, variant="persist", splits=2),
    lambda: QGemvSpec("int4", "post", 4096, 4096, 128, variant="stream", tpb=2),
    lambda: QGemvSpec("int4", "post", 4096, 4096, 128, variant="persist", tpb=0),
])
def test_quant_gemv_specs_past_shared_memory_are_refused(make):
    with pytest.raises(KernelSpecError, match=r"\.(splits|tpb):"):
        make()


def test_early_pdl_triggers_only_with_the_switch(monkeypatch):
    """KILN_PDL_TRIGGER (render.PDL_TRIGGER, on by default): the kernels a decode GEMV follows (norms, gated
    activations, decode attention) and the fp8 amax launch start with griddepcontrol.launch_dependents,
    before any load, and still build; without it their source has no such call."""
    from kiln.codegen.quant_kernels import ActQuantSpec

    specs = [NormSpec("rms", 4096, 1e-5, has_residual=True, origin=_origin(1, "rmsnorm(x, w)")),
             NormSpec("rms", 5120, 1e-5, has_residual=False, gate="silu", group=5120,
                      origin=_origin(2, "rmsnorm(y * silu(z))")),
             ActSpec("silu", True, 14336, origin=_origin(3, "silu(g) * u")),
             DecodeAttnSpec(32, 8, 128, 16, 128 ** -0.5, origin=_origin(4, "attention")),
             DecodeAttnSpec(32, 8, 128, 16, 128 ** -0.5, kv_fp8=True, origin=_origin(4, "attention fp8 kv")),
             DecodeAttnSpec(32, 8, 48, 16, 48 ** -0.5, dtype="fp32", origin=_origin(4, "attention simt")),
             ActQuantSpec("tensor", 4096, origin=_origin(5, "linear(x, w) fp8"))]
    call = "pdl_launch_dependents();"
    for on in (False, True):
        monkeypatch.setattr(render_mod, "PDL_TRIGGER", on)
        for spec in specs:
            ks = render.__wrapped__(spec)  # past render's cache: the switch is read at each rendering
            assert (call in ks.source) == on, spec
            if on:
                entry = ks.entries[0]
                body = ks.source.split(f" {entry}(", 1)[1].split(") {", 1)[1]
                first = next(line.strip() for line in body.splitlines() if line.strip() and "{%" not in line)
                assert first.startswith(call), (spec, first)
                nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin)


def test_decode_kernel_shape_fields_for_ab_runs():
    """DecodeAttnSpec warps / stages / min_blocks (bench_kernels --only fp8kv): 0 keeps the renderer's
    choice; others render that shape and build; bad values name the field."""
    base = dict(heads=32, kv_heads=8, head_dim=128, page_size=16, scale=128 ** -0.5, kv_fp8=True, origin="t")
    default = render(DecodeAttnSpec(**base))
    shaped = render(DecodeAttnSpec(**base, warps=8, stages=3, min_blocks=2))
    assert shaped.meta["threads"] == 256 and shaped.meta["stages"] == 3 and shaped.meta["tile"] == 128
    assert "__launch_bounds__(256, 2)" in shaped.source and default.meta["threads"] == 128
    nvrtc.compile_source(shaped.source, shaped.name, "sm_90a", shaped.origin)
    for field, bad in (("warps", 3), ("stages", 9), ("min_blocks", True)):
        with pytest.raises(KernelSpecError, match=field):
            DecodeAttnSpec(**base, **{field: bad})


@pytest.mark.parametrize("unroll", [2, 4, 8])
def test_fp8_act_quant_unrolled_grid_compiles(unroll, monkeypatch):
    """ActQuantSpec.unroll (bench_kernels --only actquant): the per-tensor launches load `unroll` vectors
    a thread before using them, and build without spills; KILN_ACT_QUANT_* values outside their choices
    are refused by name."""
    from kiln.codegen import quant_kernels as QK

    ks = render(QK.ActQuantSpec("tensor", 14336, unroll=unroll, origin=_origin(11, "linear(x, w) fp8")))
    assert f"Vec<8> v[{unroll}];" in ks.source
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert img.log.count("0 bytes spill stores") == 2, img.log
    monkeypatch.setattr(render_mod, "_PDL_TRIGGER_ENV", "yes")
    with pytest.raises(KernelSpecError, match="KILN_PDL_TRIGGER='yes'"):
        render.__wrapped__(QK.ActQuantSpec("tensor", 4096, origin=_origin(11, "linear(x, w) fp8")))
    monkeypatch.undo()
    monkeypatch.setenv("KILN_ACT_QUANT_BLOCKS", "3")
    with pytest.raises(ValueError, match="KILN_ACT_QUANT_BLOCKS='3'"):
        QK._env_choice("KILN_ACT_QUANT_BLOCKS", 2, (1, 2, 4, 8))


@pytest.mark.parametrize("spec", [DecodeAttnSpec(32, 8, 128, 16, 0.1, origin="grid"),
                                  DecodeAttnSpec(32, 8, 128, 16, 0.1, kv_fp8=True, window=100, origin="grid"),
                                  DecodeAttnSpec(32, 8, 128, 16, 0.1, dtype="fp32", origin="grid")],
                         ids=["mma", "mma-fp8-window", "cuda-cores"])
@pytest.mark.parametrize("grid", render_mod.DECODE_GRIDS)
def test_decode_grid_orders_name_the_split_and_head_chunk_once(spec, grid, monkeypatch):
    """render.DECODE_GRID (KILN_DECODE_GRID): both decode kernels read their split, head chunk and sequence from
    the grid dimensions the launcher (kernels.paged_decode_attention, meta["splits_last"]) gives them, and only
    there; each order compiles."""
    monkeypatch.setattr(render_mod, "DECODE_GRID", grid)
    ks = render.__wrapped__(spec)  # past render's cache: the switch is read at each rendering
    last = grid == "splits-last"
    assert ks.meta["splits_last"] == last
    assert ("split = blockIdx.z" in ks.source) == last and ("split = blockIdx.x" in ks.source) != last
    body = ks.source[ks.source.index("__global__"):]
    assert len(re.findall(r"blockIdx\.|gridDim\.", body)) == 5  # the one line naming them
    for arch in ARCHS:
        nvrtc.compile_source(ks.source, ks.name, arch, ks.origin)


def test_a_bad_decode_grid_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(render_mod, "DECODE_GRID", "heads")
    with pytest.raises(KernelSpecError, match="KILN_DECODE_GRID='heads'"):
        render.__wrapped__(DecodeAttnSpec(32, 8, 128, 16, 0.1, origin="grid"))


@pytest.mark.parametrize("spec", [
    NormSpec("rms", 4096, 1e-5, origin="t amax", amax=True),
    NormSpec("layer", 2048, 1e-5, has_bias=True, has_residual=False, dtype="fp16", origin="t amax", amax=True),
    ActSpec("silu", True, 14336, origin="t amax", amax=True),
    ActSpec("gelu_tanh", False, 3072, variant="rows_stream", origin="t amax", amax=True)], ids=str)
def test_amax_producers_build(spec):
    """KILN_FP8_AMAX_FUSE: a norm / activation that also writes its output's partial maxima (one a row / a block,
    zero past valid_rows) builds for sm_90a without spills, under its own name; the same spec without it has
    neither the argument nor the reduction; amax is refused where a block does not hold whole rows / segments."""
    ks = render(spec)
    plain = render(dataclasses.replace(spec, amax=False))
    assert "_amax_" in ks.name and "_amax_" not in plain.name
    assert "float* __restrict__ amax" in ks.source and "valid_rows" in ks.source
    assert "float* __restrict__ amax" not in plain.source and "block_amax<" not in plain.source
    assert "block_amax<" in ks.source
    assert ("amax[row] =" if isinstance(spec, NormSpec) else "amax[blockIdx.x] =") in ks.source
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in img.log, img.log
    with pytest.raises(KernelSpecError, match="amax"):
        dataclasses.replace(spec, group=128) if isinstance(spec, NormSpec) else dataclasses.replace(spec, variant="flat")


@pytest.mark.parametrize("spec", [
    NormSpec("rms", 4096, 1e-5, origin="t fp8 out", fp8_out=True),
    NormSpec("rms", 2560, 1e-5, has_residual=False, origin="t fp8 out", fp8_out=True),
    NormSpec("layer", 2048, 1e-5, has_bias=True, dtype="fp16", origin="t fp8 out", fp8_out=True),
    NormSpec("rms", 1024, 1e-5, dtype="fp32", origin="t fp8 out", fp8_out=True),
    ActSpec("silu", True, 14336, origin="t fp8 out", fp8_out=True),
    ActSpec("gelu_tanh", False, 3072, variant="rows_stream", origin="t fp8 out", fp8_out=True)], ids=str)
def test_fp8_out_producers_build(spec):
    """KILN_FP8_OUT_FUSE: a norm / activation that writes its output as the next fp8 GEMM's input (e4m3 bytes of
    out / a static scale) builds for sm_90a without spills, under its own name, converting with the quantization
    kernel's instruction; the same spec without it stores the run dtype; refused with a group, a variant that is
    not a "rows" one, or amax beside it."""
    ks = render(spec)
    plain = render(dataclasses.replace(spec, fp8_out=False))
    assert "_fp8_" in ks.name and "_fp8_" not in plain.name
    assert "unsigned char* __restrict__ out" in ks.source and "out_scale" in ks.source
    assert "cvt.rn.satfinite.e4m3x2.f32" in ks.source and "out_scale" not in plain.source
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in img.log, img.log
    with pytest.raises(KernelSpecError, match="fp8_out"):
        dataclasses.replace(spec, amax=True)
    with pytest.raises(KernelSpecError, match="fp8_out"):
        dataclasses.replace(spec, group=128) if isinstance(spec, NormSpec) else dataclasses.replace(spec, variant="flat")
