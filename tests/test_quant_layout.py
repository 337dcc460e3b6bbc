"""CPU checks of the weight-only kernels' packed layout (codegen/quant_kernels.repack): a torch
emulation of what templates/gemv_wq.cu.j2 reads — lane by lane, the mma.sync fragments its bit
tricks build, and the dequantize entry's per-lane values — must give QWeight's own values
(`dequantize`) and products (`linear`). Layout bugs show here, before a GPU run."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from kiln.codegen.quant_kernels import FORMATS, QGemvSpec
from kiln.codegen.render import render
from kiln.dsl.quant import QuantDesc, QWeight, quantize_weight
from kiln.runtime.cuda_quant import pack


def _lanes(p):
    """Per (tile, chunk, lane): the 4 little-endian words of the lane's 16 bytes."""
    ck = FORMATS[p.fmt][0]
    tiles, nch = -(-p.n // 16), -(-p.k // ck)
    words = p.wq.view(torch.int32).reshape(tiles, nch, 32, 4).long() & 0xFFFFFFFF
    return words, tiles, nch, ck


def _elements(p, word):
    """(q, row select, column in the lane's slice) for every element of one lane: the kernel's
    dequant_lane indexing."""
    out = []
    if p.fmt == "int4":
        for j in range(4):
            for b in range(8):
                out.append(((word[j] >> (4 * b)) & 15, b & 1, 4 * j + 2 * ((b >> 1) & 1) + (b >> 2)))
    else:
        for b in range(16):
            q = (word[b >> 2] >> (8 * (b & 3))) & 255
            out.append((q - 256 if q > 127 else q, (b & 3) >> 1, 4 * (b >> 3) + 2 * ((b >> 2) & 1) + (b & 1)))
    return out


def emulate_dequant(p) -> torch.Tensor:
    """The dequantize entry: each lane's values written at (row, column), in the original column order."""
    words, tiles, nch, ck = _lanes(p)
    kpl = FORMATS[p.fmt][1]
    rec = p.records(torch.float32)
    dense = torch.zeros(tiles * 16, nch * ck)
    for t in range(tiles):
        for ch in range(nch):
            for lane in range(32):
                g, c = lane >> 2, lane & 3
                kx = ch * ck + c * kpl
                if kx >= p.k:
                    continue
                grp = kx // p.group
                for q, rs, kk in _elements(p, words[t, ch, lane].tolist()):
                    a, b = rec[t, grp, g + 8 * rs].tolist()
                    dense[t * 16 + g + 8 * rs, kx + kk] = (q - a) * b if p.mode == "post" else q * a + b
    dense = dense[: p.n, : p.k]
    if p.perm is not None:
        out = torch.empty_like(dense)
        out[:, p.perm] = dense
        dense = out
    return dense


def emulate_gemv(p, x: torch.Tensor) -> torch.Tensor:
    """The tensor-core path: A fragments from the bit tricks, B from 16-byte x loads, mma.sync's
    m16n8k16 semantics, per-chunk scaling (post) and the C-fragment -> output mapping."""
    words, tiles, nch, ck = _lanes(p)
    kpl = FORMATS[p.fmt][1]
    steps = FORMATS[p.fmt][2]
    rec = p.records(torch.float32)
    if p.perm is not None:
        x = x[:, p.perm]
    T = x.shape[0]
    xp = torch.zeros(T, nch * ck, dtype=torch.float64)
    xp[:, : p.k] = x.double()
    out = torch.zeros(T, tiles * 16, dtype=torch.float64)
    for t in range(tiles):
        for tok0 in range(0, T, 8):
            for ch in range(nch):
                part = torch.zeros(16, 8, dtype=torch.float64)  # C: rows x tokens
                for j in range(steps):
                    A = torch.zeros(16, 16, dtype=torch.float64)
                    B = torch.zeros(16, 8, dtype=torch.float64)
                    for lane in range(32):
                        g, c = lane >> 2, lane & 3
                        kx = ch * ck + c * kpl
                        w = words[t, ch, lane].tolist()
                        if p.fmt == "int4":
                            wj = w[j]
                            regs = [[(wj >> (4 * i)) & 15, (wj >> (16 + 4 * i)) & 15] for i in range(4)]
                        else:
                            def sb(v):
                                return v - 256 if v > 127 else v
                            w0, w1 = w[2 * j], w[2 * j + 1]
                            regs = [[sb((ww >> (16 * h)) & 255), sb((ww >> (16 * h + 8)) & 255)]
                                    for ww in (w0, w1) for h in (0, 1)]
                        grp = min(kx, p.k - 1) // p.group if p.mode == "pre" else ch * ck // p.group
                        for i, (lo, hi) in enumerate(regs):
                            rs, col = i & 1, 2 * c + 8 * (i >> 1)  # a0: g, 2c; a1: g+8; a2: g, 2c+8; a3
                            a, b = rec[t, grp, g + 8 * rs].tolist()
                            for e, q in enumerate((lo, hi)):
                                A[g + 8 * rs, col + e] = (q - a) if p.mode == "post" else q * a + b
                        row = tok0 + g
                        if row < T:
                            for e in range(2):  # b0: x[kx + 4j + e] at slot 2c + e; b1: kx + 4j + 2 + e
                                B[2 * c + e, g] = xp[row, kx + 4 * j + e]
                                B[2 * c + 8 + e, g] = xp[row, kx + 4 * j + 2 + e]
                    part += A @ B
                if p.mode == "post":
                    s = rec[t, ch * ck // p.group, :, 1].double()
                    part = part * s[:, None]
                n = min(8, T - tok0)
                out[tok0:tok0 + n, t * 16:(t + 1) * 16] += part[:, :n].t()
    return out[:, : p.n].float()


def _int4(n, k, group=128, act_order=False, zeros=True):
    desc = QuantDesc("int4", "per_group", group, zero_points=zeros, act_order=act_order)
    w = quantize_weight(torch.randn(n, k) * 0.05, QuantDesc("int4", "per_group", group, zero_points=True))
    if not zeros:
        w = QWeight(desc, w.shape, w.q, w.scale)
    if act_order:
        perm = torch.randperm(k)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group).int()  # each group's columns scattered over the row
        w = QWeight(desc, w.shape, w.q, w.scale, w.zero, g_idx)
    return w


def _gguf(n, k, kind):
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    data = gguf.quants.quantize(np.random.default_rng(0).standard_normal((n, k), dtype=np.float32), qtype)
    q = torch.from_numpy(np.ascontiguousarray(data)).reshape(n, -1)
    return QWeight(QuantDesc(f"gguf_{kind}", "blocks"), (n, k), q, torch.empty(0))


def _k_blocks(n, k, kind):
    """Random ggml K-quant rows (gguf-py dequantizes them but cannot quantize to them): random bytes with the
    fp16 scale fields set to small normal values, as a quantizer would leave them."""
    rng = np.random.default_rng(k + n)
    size = {"q4_k": 144, "q5_k": 176, "q6_k": 210}[kind]
    b = rng.integers(0, 256, (n * k // 256, size), dtype=np.uint8)
    fields = (208,) if kind == "q6_k" else (0, 2)  # q6_k: d last; q4_k / q5_k: d, dmin first
    for at in fields:
        b[:, at:at + 2] = (rng.uniform(1e-3, 2e-2, (b.shape[0], 1)).astype(np.float16)).view(np.uint8)
    q = torch.from_numpy(b.reshape(n, -1).copy())
    return QWeight(QuantDesc(f"gguf_{kind}", "blocks"), (n, k), q, torch.empty(0))


CASES = {
    "int4": lambda: _int4(40, 256),
    "int4-symmetric": lambda: _int4(16, 128, zeros=False),
    "int4-act-order": lambda: _int4(24, 256, act_order=True),
    "int4-group64": lambda: _int4(20, 192, group=64),
    "int8": lambda: quantize_weight(torch.randn(33, 96), QuantDesc("int8", "per_channel")),
    "int8-k-tail": lambda: quantize_weight(torch.randn(16, 40), QuantDesc("int8", "per_channel")),  # 40 % 32
    "q4_0": lambda: _gguf(18, 96, "q4_0"),  # 96 % 64: a chunk half past k
    "q4_1": lambda: _gguf(16, 64, "q4_1"),
    "q8_0": lambda: _gguf(20, 96, "q8_0"),
    "q4_k": lambda: _k_blocks(20, 512, "q4_k"),
    "q5_k": lambda: _k_blocks(18, 256, "q5_k"),
    "q6_k": lambda: _k_blocks(17, 512, "q6_k"),  # groups of 16: two a 32-column chunk
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_layout_round_trips(case):
    torch.manual_seed(0)
    w = CASES[case]()
    p = pack(w)
    assert p is not None
    for dt in (torch.bfloat16, torch.float16, torch.float32):  # a spec the kernels accept, records for it
        assert render(p.spec(dt, 8, True)).entries and p.records(dt).shape == (-(-p.n // 16), p.k // p.group, 16, 2)
    torch.testing.assert_close(emulate_dequant(p), w.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["int4", "int4-act-order", "int8-k-tail", "q4_0", "q4_1", "q8_0", "q4_k", "q5_k",
                                  "q6_k"])
@pytest.mark.parametrize("T", [1, 11])
def test_fragments_compute_the_linear(case, T):
    torch.manual_seed(1)
    w = CASES[case]()
    p = pack(w)
    x = torch.randn(T, w.shape[1])
    torch.testing.assert_close(emulate_gemv(p, x), w.linear(x), rtol=1e-4, atol=1e-4)


def test_unsupported_layouts_fall_back():
    w = _int4(16, 64, group=32)  # groups narrower than a 64-column chunk
    assert pack(w) is None
    odd = quantize_weight(torch.randn(16, 128), QuantDesc("int4", "per_group", 128, zero_points=True))
    odd.zero = odd.zero + 0.5  # zero points the kernel cannot subtract exactly
    assert pack(odd) is None


@pytest.mark.parametrize("fmt, n, k, group", [("int4", 6144, 4096, 128), ("int4", 4096, 14336, 128),
                                              ("int4", 1536, 576, 32), ("int8", 4096, 4096, 4096),
                                              ("int8", 100, 40, 40), ("int8", 576, 1536, 32)])
@pytest.mark.parametrize("tokens", [8, 16])
def test_stream_split_covers_every_chunk_once(fmt, n, k, group, tokens):
    """The stream variant's index arithmetic (templates/gemv_wq.cu.j2), mirrored: for every split
    count it accepts, each chunk is read by exactly one (split, warp, step), its records lie in the
    groups the block stages, and x's staged columns hold every column the lanes read."""
    from kiln.codegen.quant_kernels import SMEM_MAX, WARPS, XS_MAX, XS_PAD, _cps, choose_splits, stream_smem

    ck, kpl, _ = FORMATS[fmt]
    nch, groups = -(-k // ck), k // group
    counts = sorted({-(-nch // _cps(fmt, k, s)) for s in range(1, 17)})
    # counts whose x slice exceeds a block's shared memory are refused by the spec (they cannot launch)
    counts = [s for s in counts if stream_smem(fmt, k, tokens, s, group) <= SMEM_MAX]
    for splits in counts:
        ks = render(QGemvSpec(fmt, "post" if group % ck == 0 or group == k else "pre", n, k, group, tokens,
                              splits=splits))
        cps = ks.meta["cps"]
        gr = min(groups, -(-cps * ck // group) + 1)
        seen = []
        for split in range(splits):
            c0 = split * cps
            g0 = c0 * ck // group
            g1 = min(groups, (min(k, (c0 + cps) * ck) + group - 1) // group)
            assert 0 < g1 - g0 <= gr
            for warp in range(WARPS):
                for i in range(cps // WARPS):
                    ch = c0 + warp + i * WARPS
                    if ch >= nch:
                        continue
                    seen.append(ch)
                    for c in range(4):
                        grp = min(ch * ck + c * kpl, k - 1) // group
                        assert g0 <= grp < g1  # a staged record
                        assert (ch - c0) * ck + c * kpl + kpl <= cps * ck  # inside the staged x row
        assert sorted(seen) == list(range(nch))
    chosen = choose_splits(fmt, n, k, tokens, 132)
    assert chosen in counts
    cps = _cps(fmt, k, chosen)
    assert tokens * (cps * ck + XS_PAD[fmt]) * 2 <= XS_MAX or cps == WARPS


def _persist_walk(per_warp: int, depth: int, ring: str, length: int):
    """The persist kernel's ring (templates/gemv_wq.cu.j2), mirrored for one warp: the (item, q, ti) each
    slot is fetched with, checked where it is consumed; returns the consumed items and the tiles reduced."""
    slots = [None] * depth
    for j in range(depth):  # the first fetches
        if j < length:
            slots[j] = (j, j % per_warp, j // per_warp)
    consumed, flushed = [], []
    for base in range(0, length, depth):
        tb, qb = base // per_warp, base % per_warp
        for j in range(depth):
            i = base + j
            if i >= length:
                break
            if ring == "a":
                q, ti = j % per_warp, tb + j // per_warp
            elif ring == "b":
                q, ti = qb + j, tb
            else:
                q, ti = i % per_warp, i // per_warp
            assert slots[j] == (i, q, ti), (per_warp, depth, ring, i, slots[j], q, ti)
            assert (q, ti) == (i % per_warp, i // per_warp)
            consumed.append(i)
            if ring == "a":
                nxt = (i + depth, q, ti + depth // per_warp)
            else:
                q2 = q + (depth % per_warp if ring == "c" else depth)
                wrap = q2 >= per_warp
                nxt = (i + depth, q2 - per_warp if wrap else q2, ti + depth // per_warp + wrap)
            slots[j] = nxt if i + depth < length else None
            if (ring != "b" or j == depth - 1) and q == per_warp - 1:
                flushed.append(ti)
    return consumed, flushed


@pytest.mark.parametrize("fmt, n, k, group", [("int4", 6144, 4096, 128), ("int4", 4096, 4096, 128),
                                              ("int4", 28672, 4096, 128), ("int4", 4096, 14336, 128),
                                              ("int4", 1536, 576, 32), ("int8", 4096, 4096, 4096),
                                              ("int8", 100, 40, 40), ("int8", 576, 1536, 32)])
@pytest.mark.parametrize("tokens", [8, 16])
def test_persist_ring_covers_every_item_once(fmt, n, k, group, tokens):
    """The persist variant's schedule, mirrored: for the pick (choose_persist) and every split count
    that fits, the blocks' (tile, chunk) items cover the weight exactly once, each ring slot is
    consumed as the item it was fetched for (every ring kind), and every tile is reduced once, after
    its last item; shared memory stays within SMEM_MAX / blocks per SM for the pick."""
    from kiln.codegen.quant_kernels import (
        PERSIST_BPS,
        SMEM_MAX,
        WARPS,
        _split_counts,
        choose_persist,
        persist_smem,
        persist_tpb,
        ring_shape,
    )

    ck = FORMATS[fmt][0]
    nch, tiles = -(-k // ck), -(-n // 16)
    pick = choose_persist(fmt, n, k, tokens, 132)
    assert persist_smem(fmt, k, tokens, pick[0]) <= SMEM_MAX // PERSIST_BPS[tokens]
    cases = {pick} | {(s, persist_tpb(fmt, n, k, tokens, 132, s)) for s in _split_counts(fmt, k)
                      if persist_smem(fmt, k, tokens, s) <= SMEM_MAX}
    for splits, tpb in sorted(cases):
        mode = "post" if group % ck == 0 or group == k else "pre"
        ks = render(QGemvSpec(fmt, mode, n, k, group, tokens, variant="persist", splits=splits, tpb=tpb))
        cps, per_warp = ks.meta["cps"], ks.meta["cps"] // WARPS
        depth, ring = ring_shape(per_warp, tokens)
        assert f'ring "{ring}"' in ks.source and ks.meta["blocks_x"] == -(-tiles // tpb)
        seen = []
        for bx in range(ks.meta["blocks_x"]):
            t0 = bx * tpb
            length = min(tpb, tiles - t0) * per_warp
            for split in range(splits):
                c0 = split * cps
                for warp in range(WARPS):
                    consumed, flushed = _persist_walk(per_warp, depth, ring, length)
                    assert consumed == list(range(length))
                    assert flushed == list(range(length // per_warp))
                    for i in consumed:
                        ch = c0 + warp + (i % per_warp) * WARPS
                        if ch < nch:
                            seen.append((t0 + i // per_warp, ch))
                            assert (ch - c0) * ck + ck <= cps * ck  # inside the staged x slice
        assert sorted(seen) == [(t, c) for t in range(tiles) for c in range(nch)]
    for pw in range(1, 40):  # every ring kind against the general walk
        for tokens_ in (8, 16):
            depth, ring = ring_shape(pw, tokens_)
            for length in (pw, 3 * pw, 7 * pw):
                consumed, flushed = _persist_walk(pw, depth, ring, length)
                assert consumed == list(range(length)) and flushed == list(range(length // pw))


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_k_quant_fields_are_gguf_values(kind):
    # ggml_blocks' integers and records, q * s + m, against gguf-py's own dequantization, bit for bit; the integers
    # in the range the kernel's format holds
    from kiln.codegen.quant_kernels import ggml_blocks

    w = _k_blocks(6, 768, kind)
    q, sc, m, group = ggml_blocks(w.q, kind, 6, 768)
    want = gguf.quants.dequantize(w.q.numpy().reshape(-1), gguf.GGMLQuantizationType[kind.upper()]).reshape(6, 768)
    got = q.float() * sc.repeat_interleave(group, 1) + m.repeat_interleave(group, 1)
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32)))
    lo, hi = {"q4_k": (0, 15), "q5_k": (0, 31), "q6_k": (-32, 31)}[kind]
    assert int(q.min()) >= lo and int(q.max()) <= hi and int(q.max()) - int(q.min()) == hi - lo

