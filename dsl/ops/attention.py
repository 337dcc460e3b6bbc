"""`attention`: multi-, grouped- and multi-query attention over the sequence so far. It appends
the step's K and V to its site of the paged KV cache ([pages, kv_heads, page_size, head_dim])."""

from __future__ import annotations

import math

import torch

from .base import Attr, Kernel, KernelCall, OpDef, T, Torch, TrtLowering, TType, act, heads, need


def _shape(ins, attrs):
    q, k, v = (act(t) for t in ins)
    hd = attrs.head_dim
    hq, hk = heads(q.shape[1], hd, "q"), heads(k.shape[1], hd, "k")
    need(hq % hk == 0, f"{hq} query heads cannot be grouped over {hk} kv heads")
    need(v.shape[1] % hk == 0, f"v has {v.shape[1]} features, not a multiple of {hk} kv heads")
    w = attrs.window
    need(w is None or (isinstance(w, int) and w > 0), f"window must be a positive int or none, got {w!r}")
    need(not attrs.alibi or attrs.alibi_max > 0, f"alibi_max must be > 0, got {attrs.alibi_max!r}")
    return (TType((T, hq * (v.shape[1] // hk))),)


def scale_of(attrs) -> float:
    return attrs.scale if attrs.scale is not None else attrs.head_dim ** -0.5


def alibi_slopes(heads: int, alibi_max: float, alibi_scale: float = 1.0) -> torch.Tensor:
    """ALiBi's per-head slopes (float32 [heads]), times `alibi_scale`. MPT's rule (its
    `alibi_bias_max` is `alibi_max`): with P the power of 2 at or above `heads`, slope j is
    2^(-j * alibi_max / P), j = 1..P; for P != heads the even j come first, then the odd ones, the
    first `heads` kept. With alibi_max=8 these are exactly BLOOM's and Falcon's slopes
    (2^(-8/p)^i for p the power of 2 below, then odd powers of 2^(-8/2p) for the rest)."""
    p2 = 1 << max(0, math.ceil(math.log2(heads)))
    s = [2.0 ** (-(j * alibi_max / p2)) for j in range(1, p2 + 1)]
    if p2 != heads:
        s = (s[1::2] + s[0::2])[:heads]
    return torch.tensor([x * alibi_scale for x in s], dtype=torch.float64).float()


def alibi_of(attrs, heads: int) -> torch.Tensor | None:
    """The instance's slopes (float32 [heads]), or None without ALiBi."""
    return alibi_slopes(heads, attrs.alibi_max, attrs.alibi_scale) if attrs.alibi else None


def _reference(ctx, ins, a):
    """Each sequence's keys gathered from its pages, an explicit mask: obvious, not fast."""
    q, k, v = a
    at = ins.attrs
    hd = at.head_dim
    kv = ctx.kv
    kc, vc = kv.k[ins.site], kv.v[ins.site]  # [P, Hk, S, D]
    hk = kc.shape[1]
    hq = q.shape[1] // hd
    scale = scale_of(at)
    out = torch.empty(q.shape[0], hq * vc.shape[-1], dtype=q.dtype, device=q.device)
    for s in ctx.batch.seqs:
        # Written as the cache stores them (fp8 pages: scaled and rounded), read back from it.
        kv.write(ins.site, s.block_table, s.context, k[s.start:s.end].view(s.length, hk, -1),
                 v[s.start:s.end].view(s.length, hk, -1))
        keys, vals = (t.transpose(0, 1) for t in kv.read(ins.site, s.block_table, s.context + s.length))  # [Hk, N, D]
        qs = q[s.start:s.end].view(s.length, hk, hq // hk, hd).permute(1, 2, 0, 3)  # [Hk, G, L, D]
        scores = torch.einsum("hgld,hnd->hgln", qs.float(), keys.float()) * scale
        if at.softcap is not None:
            scores = torch.tanh(scores / at.softcap) * at.softcap
        qpos = torch.arange(s.context, s.context + s.length, device=q.device)[:, None]
        kpos = torch.arange(0, s.context + s.length, device=q.device)[None, :]
        if at.alibi:  # + slope_h * (key position - query position): softmax-equal to slope_h * key position
            slopes = alibi_of(at, hq).to(q.device).view(hk, hq // hk, 1, 1)
            scores = scores + slopes * (kpos - qpos).float()
        allowed = kpos <= qpos if at.causal else torch.ones_like(kpos <= qpos)
        if at.window is not None:
            allowed = allowed & (kpos > qpos - at.window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hgln,hnd->lhgd", probs, vals.float())  # [L, Hk, G, Dv]
        out[s.start:s.end] = o.reshape(s.length, -1).to(q.dtype)
    return out


def _cuda(ins, plan, dt):
    site = plan.sites[ins.site]
    at = ins.attrs
    if site.v_head_dim != at.head_dim:  # multi-head latent attention (DeepSeek-V2/V3): v heads narrower
        return Torch(f"v head size {site.v_head_dim} != q/k head size {at.head_dim}: the attention kernels "
                     f"have one head size (the reference runs on the GPU)")
    if at.head_dim % 16:
        return Torch(f"head size {at.head_dim} is not a multiple of 16, which the prefill kernels' tiles need "
                     f"(the reference runs on the GPU)")
    return KernelCall(Kernel.ATTENTION, dict(heads=site.heads, kv_heads=site.kv_heads, head_dim=at.head_dim,
                                             scale=scale_of(at), window=at.window or 0, softcap=at.softcap or 0.0,
                                             alibi_max=at.alibi_max if at.alibi else 0.0,
                                             alibi_scale=at.alibi_scale if at.alibi else 1.0, causal=at.causal))


# ---- TensorRT: write the step's rows into the cache in place, gather each sequence's keys from
# its pages, attend through IAttention with a mask (same sequence, causal, window); softcapped or
# ALiBi attention as a float32 matmul/softmax chain (IAttention has neither softcap nor a bias).

def _trt(nn, q, k, v, *, site: int, heads: int, kv_heads: int, head_dim: int, v_head_dim: int, scale: float,
         causal: bool, window: int | None, softcap: float | None, alibi: tuple[float, ...] | None = None):
    kc = nn.cache_update(nn.inputs[f"k_cache.{site}"], k, kv_heads, head_dim)
    vc = nn.cache_update(nn.inputs[f"v_cache.{site}"], v, kv_heads, v_head_dim)
    for name, t in ((f"k_cache_out.{site}", kc), (f"v_cache_out.{site}", vc)):
        t.name = name
        nn.net.mark_output(t)
    keys, vals = nn.gather_keys(kc, kv_heads, head_dim), nn.gather_keys(vc, kv_heads, v_head_dim)
    mask = nn.attention_mask(causal, window)
    qh = nn.to_heads(q, heads, head_dim)  # [1, Hq, T, D]
    # IAttention wants one head size: v heads of another size (latent attention) take the chain too
    if softcap is None and alibi is None and v_head_dim == head_dim and hasattr(nn.net, "add_attention_v2"):
        qs = nn.run_dtype(nn.ew(nn.f32(qh), nn.scalar(scale, rank=4), "PROD"))  # IAttention wants q pre-scaled
        layer = nn.net.add_attention_v2(qs, keys, vals, nn.trt.AttentionNormalizationOp.SOFTMAX,
                                        nn.trt.CausalMaskKind.NONE)
        layer.mask = mask
        layer.decomposable = True
        out = layer.get_output(0)  # [1, Hq, T, Dv]
    else:
        out = _trt_decomposed(nn, qh, keys, vals, mask, heads, kv_heads, head_dim, v_head_dim, scale, softcap,
                              alibi)
    return nn.from_heads(out, heads, v_head_dim)


def _trt_rel_pos(nn):
    """float32 [1, 1, T, N]: gathered key position minus query position (ALiBi's distance)."""
    if "alibi_rel_pos" not in nn.cache:
        qp = nn.shuffle(nn.f32(nn.inputs["positions"]), reshape=(1, 1, -1, 1))
        kp = nn.shuffle(nn.f32(nn.inputs["kv_pos"]), reshape=(1, 1, 1, -1))
        nn.cache["alibi_rel_pos"] = nn.ew(kp, qp, "SUB")
    return nn.cache["alibi_rel_pos"]


def _trt_decomposed(nn, qh, keys, vals, mask, heads, kv_heads, head_dim, v_head_dim, scale, softcap, alibi=None):
    """matmul -> scale -> softcap -> + ALiBi bias -> mask -> softmax -> matmul in float32."""
    group = heads // kv_heads
    q = nn.f32(nn.shuffle(qh, reshape=(kv_heads, group, -1, head_dim)))  # [Hk, G, T, D]
    k = nn.f32(nn.shuffle(keys, reshape=(kv_heads, 1, -1, head_dim)))  # [Hk, 1, N, D]
    v = nn.f32(nn.shuffle(vals, reshape=(kv_heads, 1, -1, v_head_dim)))
    mm = nn.trt.MatrixOperation
    s = nn.net.add_matrix_multiply(q, mm.NONE, k, mm.TRANSPOSE).get_output(0)  # [Hk, G, T, N]
    s = nn.ew(s, nn.scalar(scale, rank=4), "PROD")
    if softcap is not None:
        s = nn.ew(nn.activation(nn.ew(s, nn.scalar(1.0 / softcap, rank=4), "PROD"), "TANH"),
                  nn.scalar(softcap, rank=4), "PROD")
    if alibi is not None:  # + slope_h * (key position - query position)
        slopes = nn.const(torch.tensor(alibi, dtype=torch.float32).view(kv_heads, group, 1, 1))
        s = nn.ew(s, nn.ew(slopes, _trt_rel_pos(nn), "PROD"), "SUM")
    s = nn.net.add_select(mask, s, nn.scalar(-math.inf, rank=4)).get_output(0)
    sm = nn.net.add_softmax(s)
    sm.axes = 1 << 3
    o = nn.net.add_matrix_multiply(sm.get_output(0), mm.NONE, v, mm.NONE).get_output(0)  # [Hk, G, T, Dv]
    return nn.run_dtype(nn.shuffle(o, reshape=(1, heads, -1, v_head_dim)))


def _trt_kwargs(ins, lw):
    site = lw.plan.sites[ins.site]
    at = ins.attrs
    kw = dict(site=site.index, heads=site.heads, kv_heads=site.kv_heads, head_dim=site.head_dim,
              v_head_dim=site.v_head_dim, scale=scale_of(at), causal=at.causal, window=at.window, softcap=at.softcap)
    slopes = alibi_of(at, site.heads)
    if slopes is not None:
        kw["alibi"] = tuple(slopes.tolist())
    return [(n, repr(v)) for n, v in kw.items()]


ATTENTION = OpDef(
    "attention", ("q", "k", "v"), {
        "head_dim": Attr("int"), "scale": Attr("float?", None), "causal": Attr("bool", True),
        "window": Attr("int?", None), "softcap": Attr("float?", None),
        "alibi": Attr("bool", False), "alibi_max": Attr("float", 8.0), "alibi_scale": Attr("float", 1.0),
    }, _shape, "multi-head attention over the sequence so far (reads and appends the KV cache)",
    reference=_reference,
    cuda=_cuda,
    trt=TrtLowering(_trt, _trt_kwargs),
    mixes_rows=True,
)

DEFS = (ATTENTION,)
