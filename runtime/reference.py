"""The reference backend: runs a checked Plan with plain torch ops, CPU or GPU, fp32 or bf16.

It is the oracle every other backend is compared with, so it favours the obvious over
the fast: attention gathers each sequence's keys from its pages and applies an explicit
mask; the mixture of experts loops over experts.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from kiln.dsl.checker import Instr, Plan, Program

from .batch import StepBatch
from .kv_store import KVStore
from .rope import apply_rope, inv_freq

_ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
}


class ReferenceModel:
    backend = "reference"

    def __init__(self, plan: Plan, weights: dict[str, torch.Tensor]):
        self.plan = plan
        self.weights = weights  # full weight name -> tensor in the run dtype, on the run device

    def forward(self, batch: StepBatch, kv: KVStore, all_logits: bool = False) -> torch.Tensor:
        """Logits [rows, vocab] of the sampled tokens (all tokens with all_logits)."""
        device = kv.k[0].device if kv.k else batch.tokens.device
        if batch.tokens.device != device:
            batch = StepBatch(batch.tokens.to(device), batch.seqs)
        ctx = _Step(batch, kv)
        env: dict[str, torch.Tensor] = {"tokens": batch.tokens, "positions": ctx.positions}
        out = self._run(self.plan.program, env, ctx)
        if not all_logits:
            out = out[batch.sample_rows()]
        return out.float()

    def _run(self, prog: Program, env: dict[str, torch.Tensor], ctx: "_Step") -> torch.Tensor:
        for ins in prog.instrs:
            args = [None if i is None else (self.weights[i[2:]] if i.startswith("w:") else env[i])
                    for i in ins.inputs]
            out = self._op(ins, args, ctx)
            for name, value in zip(ins.outputs, out if isinstance(out, tuple) else (out,)):
                env[name] = value
        return env[prog.output]

    def _op(self, ins: Instr, a: list[Any], ctx: "_Step"):
        k, at = ins.kind, ins.attrs
        if k == "embedding":
            return F.embedding(a[0], a[1])
        if k == "linear":
            return F.linear(a[0], a[1], a[2])
        if k == "rmsnorm":
            g = at.get("group") or a[0].shape[-1]
            x = a[0].float().reshape(a[0].shape[0], -1, g)  # [T, features / g, g]
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + at["eps"])
            return (x * (at["offset"] + a[1].float())).reshape(a[0].shape).to(a[0].dtype)
        if k == "layernorm":
            b = a[2].float() if a[2] is not None else None
            return F.layer_norm(a[0].float(), a[0].shape[-1:], a[1].float(), b, at["eps"]).to(a[0].dtype)
        if k == "rope":
            return ctx.rope(a[0], at)
        if k == "attention":
            return ctx.attention(ins.site, a[0], a[1], a[2], at)
        if k in _ACT:
            return _ACT[k](a[0])
        if k == "act":
            from kiln.dsl.ops import HF_ACTIVATIONS
            return _ACT[HF_ACTIVATIONS[at["fn"]]](a[0])
        if k == "softcap":
            return torch.tanh(a[0] / at["cap"]) * at["cap"]
        if k == "scale":
            if at["round_factor"]:
                return a[0] * torch.tensor(at["factor"], dtype=a[0].dtype, device=a[0].device)
            return a[0] * at["factor"]
        if k == "add":
            return a[0] + a[1]
        if k == "sub":
            return a[0] - a[1]
        if k == "mul":
            return a[0] * a[1]
        if k == "split":
            return tuple(a[0].split(at["sizes"], dim=-1))
        if k == "moe":
            return self._moe(ins, a[0], a[1], ctx)
        raise NotImplementedError(f"reference backend: unhandled op '{k}' ({ins.op.pos})")

    def _moe(self, ins: Instr, x: torch.Tensor, logits: torch.Tensor, ctx: "_Step") -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        weights, chosen = torch.topk(probs, ins.attrs["top_k"], dim=-1)  # [T, k]
        if ins.attrs["renormalize"]:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, prog in enumerate(ins.experts):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            y = self._run(prog, {prog.inputs[0]: x[rows]}, ctx)
            out.index_add_(0, rows, (y.float() * weights[rows, slot, None]).to(x.dtype))
        return out


class _Step:
    """Per-step state shared by the ops of one forward: positions and the KV cache."""

    def __init__(self, batch: StepBatch, kv: KVStore):
        batch.validate(kv.page_size)
        self.batch = batch
        self.kv = kv
        self.positions = batch.positions()
        # Sequence length seen by each token's sequence after this step (dynamic rope).
        self.seq_len = torch.cat([torch.full((s.length,), s.context + s.length) for s in batch.seqs]) \
            if batch.seqs else torch.zeros(0, dtype=torch.long)

    def rope(self, x: torch.Tensor, at: dict) -> torch.Tensor:
        hd = at["head_dim"]
        rd = at["rotary_dim"] or hd
        scaling = at["scaling"]
        if scaling is not None and scaling.kind == "dynamic":
            freqs = torch.stack([inv_freq(rd, at["theta"], scaling, int(n), at["max_pos"])
                                 for n in self.seq_len.tolist()]) if x.shape[0] else torch.zeros(0, rd // 2)
        else:
            freqs = inv_freq(rd, at["theta"], scaling, None, at["max_pos"])
        return apply_rope(x, self.positions, freqs.to(x.device), hd, rd, at["layout"])

    def attention(self, site: int, q, k, v, at: dict) -> torch.Tensor:
        hd = at["head_dim"]
        kc, vc = self.kv.k[site], self.kv.v[site]  # [P, Hk, S, D]
        hk = kc.shape[1]
        hq = q.shape[1] // hd
        scale = at["scale"] if at["scale"] is not None else hd ** -0.5
        out = torch.empty(q.shape[0], hq * vc.shape[-1], dtype=q.dtype, device=q.device)
        for s in self.batch.seqs:
            pages, offs = self.kv.slots(s.block_table, s.context, s.context + s.length)
            kc[pages, :, offs] = k[s.start:s.end].view(s.length, hk, -1)
            vc[pages, :, offs] = v[s.start:s.end].view(s.length, hk, -1)
            pages, offs = self.kv.slots(s.block_table, 0, s.context + s.length)
            keys = kc[pages, :, offs].transpose(0, 1)  # [Hk, N, D]
            vals = vc[pages, :, offs].transpose(0, 1)  # [Hk, N, Dv]
            qs = q[s.start:s.end].view(s.length, hk, hq // hk, hd).permute(1, 2, 0, 3)  # [Hk, G, L, D]
            scores = torch.einsum("hgld,hnd->hgln", qs.float(), keys.float()) * scale
            if at["softcap"] is not None:
                scores = torch.tanh(scores / at["softcap"]) * at["softcap"]
            qpos = torch.arange(s.context, s.context + s.length, device=q.device)[:, None]
            kpos = torch.arange(0, s.context + s.length, device=q.device)[None, :]
            allowed = kpos <= qpos if at["causal"] else torch.ones_like(kpos <= qpos)
            if at["window"] is not None:
                allowed = allowed & (kpos > qpos - at["window"])
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            o = torch.einsum("hgln,hnd->lhgd", probs, vals.float())  # [L, Hk, G, Dv]
            out[s.start:s.end] = o.reshape(s.length, -1).to(q.dtype)
        return out
