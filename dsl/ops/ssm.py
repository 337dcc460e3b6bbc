"""State-space ops: `causal_conv1d` (a depthwise causal convolution over each sequence's tokens)
and `selective_scan` (the selective state-space recurrence of Mamba-1 and Mamba-2's SSD).

Both carry a per-sequence recurrent state from one step to the next, of a fixed size whatever
the context length: the checker gives each instance a *state site* (dsl/plan.StateSite, shaped by
the op's `state` rule), and the runtime keeps one slot per running sequence in a state cache
beside the paged KV cache (runtime/state_cache.py). A reference reads and writes its site through
`ctx.kv.state` (a StateStore) at the slot each sequence of the step names (`SeqSlice.state_slot`),
as attention reads its KV site through `ctx.kv` and the block tables. A sequence whose step
starts at context 0 starts from a zero state, so a new request, a reused slot and a request
preempted and recomputed from its prompt all begin clean; a prefill chunk or a decode step
continues from the state the sequence's previous step left.

Mamba-2's gated RMSNorm (`norm(y * silu(z))` per group of features) needs no op of its own:
`rmsnorm(y * silu(z), w, group=...)` with the weight reshaped to a row per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attr, Kernel, KernelCall, OpDef, ShapeError, T, Torch, TType, act, float_weight, need

_NO_TRT = ("a recurrent state carried per sequence across steps (conv and SSM state cache), which the "
           "TensorRT network's inputs and outputs do not carry")
_NO_KERNEL = "a conv kernel of width 1 keeps no state: the reference runs on the GPU"


def _slots(ctx) -> list[int]:
    """Each sequence's state slot (checked: in range, one sequence per slot)."""
    return ctx.kv.state.slots(ctx.batch.seqs)


# ---------------------------------------------------------------- causal_conv1d


def _conv_shape(ins, attrs):
    x, w, b = act(ins[0]), float_weight(ins[1], "conv weight"), ins[2]
    need(len(w.shape) == 2 and w.shape[0] == x.shape[1],
         f"conv weight must be [channels={x.shape[1]}, kernel], got {w}")
    need(b is None or b.shape == (x.shape[1],), f"conv bias must be [{x.shape[1]}], got {b}")
    return (x,)


def _conv_state(ins, attrs) -> TType:
    """The last kernel - 1 inputs of each channel: [channels, kernel - 1] in the run dtype."""
    return TType((ins[1].shape[0], ins[1].shape[1] - 1))


def _conv_reference(ctx, ins, a):
    x, w, b = a
    C, K = w.shape
    states = ctx.kv.state.site(ins.state, (C, K - 1), x.dtype, x.device)  # [slots, C, K - 1]
    out = torch.empty_like(x)
    for s, slot in zip(ctx.batch.seqs, _slots(ctx)):
        prev = states[slot] if s.context else x.new_zeros(C, K - 1)  # context 0: a fresh sequence
        seq = torch.cat([prev, x[s.start:s.end].T], dim=1)  # [C, K - 1 + L]: history, then new tokens
        y = F.conv1d(seq[None], w[:, None, :], b, groups=C)[0]  # [C, L]: output t sees inputs t-K+1..t
        out[s.start:s.end] = y.T.to(x.dtype)
        states[slot] = seq[:, seq.shape[1] - (K - 1):]
    return out


def _conv_cuda(ins, plan, dt):
    """The conv kernel (templates/ssm_conv.cu.j2): each sequence's slot read and written on the device."""
    channels, kernel = plan.weights[ins.inputs[1].name].shape
    if kernel < 2:
        return Torch(_NO_KERNEL)
    return KernelCall(Kernel.SSM, dict(op="conv", channels=channels, kernel=kernel, has_bias=ins.inputs[2] is not None))


CAUSAL_CONV1D = OpDef(
    "causal_conv1d", ("x", "weight", "bias?"), {}, _conv_shape,
    "depthwise causal convolution over each sequence's tokens, y[t, c] = b[c] + sum_k w[c, k] x[t - K + 1 + k, c], "
    "earlier tokens from the sequence's rolling conv state ([channels, K - 1] per sequence)",
    reference=_conv_reference,
    cuda=_conv_cuda,
    trt=_NO_TRT,
    state=_conv_state,
    mixes_rows=True,
)


# ---------------------------------------------------------------- selective_scan


def _scan_dims(ins, attrs) -> tuple[int, int, int, int]:
    """(heads H, head size P, state size N, groups G) from the operand shapes."""
    x, dt, a_log, b, c, d, dt_bias = ins
    x, dt, b, c = act(x), act(dt), act(b), act(c)
    H = dt.shape[1]
    need(x.shape[1] % H == 0, f"x has {x.shape[1]} features, not a multiple of dt's {H} heads")
    G = attrs.groups
    need(isinstance(G, int) and G > 0 and H % G == 0, f"groups must divide the {H} heads, got {G!r}")
    need(b.shape[1] % G == 0, f"B has {b.shape[1]} features, not a multiple of {G} groups")
    N = b.shape[1] // G
    need(c.shape == b.shape, f"C must be shaped as B {b}, got {c}")
    a_log = float_weight(a_log, "A_log")
    need(a_log.shape in ((H,), (H, N)), f"A_log must be [{H}] (a decay per head, Mamba-2) or [{H}, {N}] "
                                        f"(per head and state, Mamba-1), got {a_log}")
    for w, what in ((d, "D"), (dt_bias, "dt_bias")):
        need(w is None or float_weight(w, what).shape == (H,), f"{what} must be [{H}], got {w}")
    return H, x.shape[1] // H, N, G


def _scan_shape(ins, attrs):
    _scan_dims(ins, attrs)
    return (TType((T, ins[0].shape[1])),)


def _scan_state(ins, attrs) -> TType:
    H, P, N, _ = _scan_dims(ins, attrs)
    return TType((H, P, N), "fp32")


def _scan_reference(ctx, ins, a):
    """Sequential over each sequence's tokens, in float32: h = exp(dt A) h + dt B x; y = C h + D x."""
    x, dt, a_log, b, c, d, dt_bias = a
    H, P, N, G = dt.shape[1], x.shape[1] // dt.shape[1], b.shape[1] // ins.attrs.groups, ins.attrs.groups
    states = ctx.kv.state.site(ins.state, (H, P, N), torch.float32, x.device)  # [slots, H, P, N]
    A = -torch.exp(a_log.float())
    A = A.view(H, 1, N) if A.dim() == 2 else A.view(H, 1, 1)
    out = torch.empty_like(x)
    for s, slot in zip(ctx.batch.seqs, _slots(ctx)):
        L = s.length
        xs = x[s.start:s.end].float().view(L, H, P)
        ts = dt[s.start:s.end].float()
        if dt_bias is not None:
            ts = ts + dt_bias.float()
        if ins.attrs.softplus:
            ts = F.softplus(ts)
        bs = b[s.start:s.end].float().view(L, G, N).repeat_interleave(H // G, dim=1)  # [L, H, N]
        cs = c[s.start:s.end].float().view(L, G, N).repeat_interleave(H // G, dim=1)
        h = states[slot] if s.context else x.new_zeros(H, P, N, dtype=torch.float32)
        ys = []
        for t in range(L):
            step = ts[t].view(H, 1, 1)
            h = torch.exp(step * A) * h + (step * bs[t].view(H, 1, N)) * xs[t].view(H, P, 1)
            ys.append(torch.matmul(h, cs[t].view(H, N, 1)).view(H, P))
        y = torch.stack(ys)  # [L, H, P]
        if d is not None:
            y = y + xs * d.float().view(H, 1)
        out[s.start:s.end] = y.reshape(L, H * P).to(x.dtype)
        states[slot] = h
    return out


def _scan_attrs(attrs) -> None:
    if not isinstance(attrs.groups, int) or isinstance(attrs.groups, bool) or attrs.groups < 1:
        raise ShapeError(f"groups must be a positive int, got {attrs.groups!r}")


def _scan_cuda(ins, plan, dt):
    """The scan kernel (templates/ssm_scan.cu.j2): sequential over each sequence's tokens, one lane group
    per (head, row of the head) holding its state row in registers; a decode step is its one-token case."""
    H, P, N, G = _scan_dims([_type(plan, a) for a in ins.inputs], ins.attrs)
    return KernelCall(Kernel.SSM, dict(
        op="scan", heads=H, head_dim=P, d_state=N, groups=G,
        a_per_state=len(plan.weights[ins.inputs[2].name].shape) == 2,
        has_d=ins.inputs[5] is not None, has_dt_bias=ins.inputs[6] is not None, softplus=bool(ins.attrs.softplus)))


def _type(plan, arg) -> TType | None:
    """An operand's type: an activation's from the plan, a weight's from its slot, None if left out."""
    if arg is None:
        return None
    return plan.types[arg] if arg in plan.types else TType(tuple(plan.weights[arg.name].shape))


SELECTIVE_SCAN = OpDef(
    "selective_scan", ("x", "dt", "a_log", "b", "c", "d?", "dt_bias?"),
    {"groups": Attr("int", 1), "softplus": Attr("bool", True)}, _scan_shape,
    "selective state-space scan per sequence: dt = softplus(dt + dt_bias) per head, A = -exp(A_log), "
    "h = exp(dt A) h + dt B x (state [heads, head_size, N] per sequence), y = C h + D x. Mamba-1: dt and x "
    "[T, d] (a head per channel), A_log [d, N]; Mamba-2 (SSD): dt [T, heads], x [T, heads * head_dim], A_log "
    "[heads]; B and C [T, groups * N], group g serving heads g*H/G .. (g+1)*H/G - 1",
    reference=_scan_reference,
    cuda=_scan_cuda,
    trt=_NO_TRT,
    check_attrs=_scan_attrs,
    state=_scan_state,
    mixes_rows=True,
)

DEFS = (CAUSAL_CONV1D, SELECTIVE_SCAN)
