"""The grouped expert GEMM path of `moe` on the GPU: the routing kernel's sort by expert, the grouped
GEMM (tensor cores for bf16/fp16, FMA tiles for fp32) and the weighted combine, each against a
plain torch loop over experts (float64) with uneven loads (experts with no token, one expert with
most); then whole MoE models on the cuda backend (grouped GEMMs, decode steps in CUDA graphs)
against the reference backend, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen.fuse import Exec  # noqa: E402
from kiln.codegen.specs import MoeGemmSpec, MoeRouteSpec  # noqa: E402
from kiln.dsl.ops import OpKind  # noqa: E402

from tests.configs import FAMILY_CONFIGS  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DEV = "cuda"
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {"bf16": 1e-2, "fp16": 5e-3, "fp32": 1e-5}


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "output has NaNs: an element was never written"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def skewed_choice(T: int, E: int, k: int) -> torch.Tensor:
    """[T, k] distinct experts per token: expert 1 takes most tokens, experts 0 and E - 1 none."""
    pick = torch.rand(T, E, device=DEV)
    pick[:, 1] += 0.8  # the busy one
    pick[:, 0] = pick[:, E - 1] = -1.0  # never chosen
    return pick.topk(k, dim=-1).indices.contiguous()


def route(spec: MoeRouteSpec, chosen):
    T, R = chosen.shape[0], chosen.numel()
    sorted_token = torch.full((R,), -7, dtype=torch.int32, device=DEV)
    slot_row = torch.full((T, spec.top_k), -7, dtype=torch.int32, device=DEV)
    offsets = torch.full((spec.experts + 1,), -7, dtype=torch.int32, device=DEV)
    tiles = torch.full_like(offsets, -7)
    K.moe_route(spec, chosen, sorted_token, slot_row, offsets, tiles)
    return sorted_token, slot_row, offsets, tiles


@pytest.mark.parametrize("E, k, T", [(8, 2, 1), (8, 2, 37), (8, 2, 300), (16, 4, 65), (60, 4, 9), (256, 8, 130)])
def test_route_sorts_copies_by_expert(E, k, T):
    spec = MoeRouteSpec(E, k, 64, dtype="bf16", origin="test")
    chosen = skewed_choice(T, E, k)
    sorted_token, slot_row, offsets, tiles = route(spec, chosen)
    counts = torch.zeros(E, dtype=torch.int64, device=DEV).scatter_add_(0, chosen.flatten(),
                                                                        torch.ones(T * k, dtype=torch.int64, device=DEV))
    assert counts[0] == 0 and counts[E - 1] == 0
    assert offsets.tolist() == [0] + counts.cumsum(0).tolist()
    ntiles = (counts + spec.block_m - 1) // spec.block_m
    assert tiles.tolist() == [0] + ntiles.cumsum(0).tolist()
    assert tiles[-1].item() <= K.moe_max_tiles(T * k, E, spec.block_m)
    # every copy has its own sorted row, inside its expert's range, holding its token
    rows = slot_row.flatten().long()
    assert sorted(rows.tolist()) == list(range(T * k))
    tok = torch.arange(T, device=DEV).repeat_interleave(k)
    assert torch.equal(sorted_token.long()[rows], tok)
    e = chosen.flatten()
    assert bool(((rows >= offsets.long()[e]) & (rows < offsets.long()[e + 1])).all())


def loop_gemm(a, w, b, sorted_token, offsets, gather: bool):
    """Per expert, its rows times its weight: the plain loop the grouped GEMM replaces (float64)."""
    rows = a[sorted_token.long()] if gather else a
    out = torch.empty(rows.shape[0], w.shape[1], dtype=torch.float64, device=DEV)
    for e in range(w.shape[0]):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        out[lo:hi] = rows[lo:hi].double() @ w[e].double().T + (b[e].double() if b is not None else 0)
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("E, k, T, n, kdim, gather, bias", [
    (8, 2, 1, 256, 128, True, False),  # decode: one token
    (8, 2, 37, 448, 256, True, False),  # gate|up of one GEMM, n not a multiple of the column tile
    (8, 2, 300, 256, 448, False, True),  # down projection of sorted rows, with biases
    (16, 4, 65, 100, 1407, True, True),  # DeepSeek-V2's 1407: K not whole 16-byte chunks (no cp.async)
    (60, 4, 23, 96, 64, False, False),  # many experts, most without a token
])
def test_grouped_gemm_equals_expert_loop(dtype, E, k, T, n, kdim, gather, bias):
    dt = DT[dtype]
    rspec = MoeRouteSpec(E, k, n, dtype=dtype, origin="test")
    gspec = MoeGemmSpec(E, n, kdim, gather, bias, dtype=dtype, origin="test")
    chosen = skewed_choice(T, E, k)
    sorted_token, slot_row, offsets, tiles = route(rspec, chosen)
    a = torch.randn(T if gather else T * k, kdim, device=DEV).to(dt)
    w = (torch.randn(E, n, kdim, device=DEV) * kdim ** -0.5).to(dt)
    b = torch.randn(E, n, device=DEV).to(dt) if bias else None
    out = torch.full((T * k, n), float("nan"), dtype=dt, device=DEV)
    K.moe_gemm(gspec, a, w, out, sorted_token, offsets, tiles, bias=b)
    assert rel_err(out, loop_gemm(a, w, b, sorted_token, offsets, gather)) <= TOL[dtype]


def test_grouped_gemm_reads_row_strided_views():
    """A slice of a wider tensor as the input (the gate|up GEMM's slices feed the next one)."""
    E, k, T, n, kdim = 8, 2, 50, 128, 256
    rspec = MoeRouteSpec(E, k, n, origin="test")
    gspec = MoeGemmSpec(E, n, kdim, False, origin="test")
    sorted_token, slot_row, offsets, tiles = route(rspec, skewed_choice(T, E, k))
    wide = torch.randn(T * k, 3 * kdim, device=DEV).bfloat16()
    a = wide[:, kdim:2 * kdim]
    w = (torch.randn(E, n, kdim, device=DEV) * kdim ** -0.5).bfloat16()
    out_wide = torch.full((T * k, n + 64), float("nan"), dtype=torch.bfloat16, device=DEV)
    K.moe_gemm(gspec, a, w, out_wide[:, :n], sorted_token, offsets, tiles)
    assert rel_err(out_wide[:, :n], loop_gemm(a, w, None, sorted_token, offsets, False)) <= TOL["bf16"]
    assert torch.isnan(out_wide[:, n:]).all()  # nothing written past its columns


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("E, k, T, hidden", [(8, 2, 1, 4096), (8, 2, 77, 64), (16, 4, 33, 100)])
def test_combine(dtype, E, k, T, hidden):
    dt = DT[dtype]
    spec = MoeRouteSpec(E, k, hidden, dtype=dtype, origin="test")
    chosen = skewed_choice(T, E, k)
    sorted_token, slot_row, offsets, tiles = route(spec, chosen)
    y = torch.randn(T * k, hidden, device=DEV).to(dt)
    gate = torch.rand(T, k, device=DEV)
    out = torch.full((T, hidden), float("nan"), dtype=dt, device=DEV)
    K.moe_combine(spec, y, slot_row, gate, out)
    ref = (y.double()[slot_row.long()] * gate.double()[..., None]).sum(1)
    assert rel_err(out, ref) <= TOL[dtype]


def test_whole_moe_op_captures_in_a_cuda_graph():
    """Routing, grouped GEMMs and combine of a Mixtral-shaped layer, captured once and replayed on new
    inputs: the same as running it eagerly (no host sync, no data-dependent size inside)."""
    E, k, T, H, F = 8, 2, 16, 256, 512
    rspec = MoeRouteSpec(E, k, H, origin="test")
    up = MoeGemmSpec(E, 2 * F, H, True, origin="test")
    down = MoeGemmSpec(E, H, F, False, origin="test")
    w_up = (torch.randn(E, 2 * F, H, device=DEV) * H ** -0.5).bfloat16()
    w_down = (torch.randn(E, H, F, device=DEV) * F ** -0.5).bfloat16()
    x = torch.randn(T, H, device=DEV).bfloat16()
    logits = torch.randn(T, E, device=DEV)

    def layer():
        gate, chosen = logits.softmax(-1).topk(k, dim=-1)
        st = torch.empty(T * k, dtype=torch.int32, device=DEV)
        sr = torch.empty(T, k, dtype=torch.int32, device=DEV)
        off = torch.empty(E + 1, dtype=torch.int32, device=DEV)
        til = torch.empty_like(off)
        K.moe_route(rspec, chosen.contiguous(), st, sr, off, til)
        gu = torch.empty(T * k, 2 * F, dtype=torch.bfloat16, device=DEV)
        K.moe_gemm(up, x, w_up, gu, st, off, til)
        h = (torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]).contiguous()
        y = torch.empty(T * k, H, dtype=torch.bfloat16, device=DEV)
        K.moe_gemm(down, h, w_down, y, st, off, til)
        out = torch.empty(T, H, dtype=torch.bfloat16, device=DEV)
        K.moe_combine(rspec, y, sr, gate.contiguous(), out)
        return out

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = layer()
    for _ in range(3):
        x.copy_(torch.randn(T, H, device=DEV))
        logits.copy_(torch.randn(T, E, device=DEV))  # a different routing each replay
        g.replay()
        assert torch.equal(captured, layer())


MOE_FAMILIES = [n for n in FAMILY_CONFIGS if n.split("-")[0] in
                ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "phimoe")]


def _model(name, dtype):
    import transformers
    from kiln.runtime.model import random_model

    config = transformers.AutoConfig.for_model(**FAMILY_CONFIGS[name]).to_dict()  # with transformers' defaults
    return random_model(name.split("-")[0], config, dtype=dtype, device=DEV, seed=0), config


@pytest.mark.parametrize("name", MOE_FAMILIES)
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-4), ("bf16", 2e-2)])
@pytest.mark.parametrize("T", [1, 5, 150])
def test_moe_op_equals_reference(name, dtype, tol, T):
    """Each family's moe op (its own router, expert program and weights) through the grouped GEMMs,
    against the op's reference (experts one by one) on the same inputs, so both route alike."""
    import math

    from kiln.codegen.fuse import fuse
    from kiln.dsl.ops import OPS
    from kiln.dsl.plan import fetch
    from kiln.runtime.batch import SeqSlice, StepBatch
    from kiln.runtime.cuda_moe import MoeStep
    from kiln.runtime.kv_store import KVStore
    from kiln.runtime.reference import StepContext

    ref, _ = _model(name, dtype)
    plan, weights = ref.plan, ref.model.weights
    ops = [op for op in fuse(plan, ref.dtype, 16) if op.instrs[0].experts]
    assert ops and all(op.kind is Exec.MOE for op in ops), [op.extra.get("why") for op in ops]
    op = ops[0]
    ins = op.instrs[0]
    x = torch.randn(T, plan.types[ins.inputs[0]].shape[1], device=DEV).to(ref.dtype)
    logits = (2 * torch.randn(T, len(ins.experts), device=DEV)).to(ref.dtype)
    env = {ins.inputs[0]: x, ins.inputs[1]: logits}
    MoeStep(op, weights)(env, None, weights)
    pages = math.ceil(T / 16)
    ctx = StepContext(StepBatch(torch.zeros(T, dtype=torch.long, device=DEV), [SeqSlice(0, T, 0, tuple(range(pages)))]),
                      KVStore(plan.sites, pages, 16, ref.dtype, DEV), weights)
    want = OPS[ins.kind].reference(ctx, ins, [fetch(a, {ins.inputs[0]: x, ins.inputs[1]: logits}, weights)
                                              for a in ins.inputs])
    assert rel_err(env[ins.out], want) <= tol


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_moe_model_decodes_through_cuda_graphs(name, fresh_seed):
    """A MoE model on the cuda backend captures CUDA graphs for decode (its experts no longer run on
    the host's choice of tokens), and its logits match the reference backend's (fp32)."""
    from tests.gpu.test_cuda_backend import check_against_reference, pair

    _, config = _model(name, "fp32")
    _, cuda = pair(name.split("-")[0], config, "fp32")
    assert any(op.kind is Exec.MOE for op in cuda.model.ops)
    # Graphs unless another op still runs its host-reading reference (DeepSeek's latent attention).
    host = any(op.kind is Exec.TORCH and op.instrs[0].kind in (OpKind.ATTENTION, OpKind.ROPE, OpKind.MOE)
               for op in cuda.model.ops)
    assert cuda.model.use_graphs != host and (name != "mixtral" or cuda.model.use_graphs)
    check_against_reference(name.split("-")[0], config, "fp32", 1e-4, fresh_seed)
