"""A `moe` on the cuda backend: the router, then every expert at once as grouped GEMMs.

The router is the op's own routing code (dsl.ops.moe.route: torch on the GPU, fixed shapes, no
host sync). The T x top_k token copies are sorted by expert on the device (codegen.kernels.moe_route:
row offsets by a device-side prefix sum), each linear of the expert program is one grouped GEMM over
all experts (sibling linears of one input as one GEMM over their concatenated weights), the expert
program's row ops (the gated activation, ...) run once over all sorted rows through their op
references, and the weighted combine sums each token's copies back. Every size follows from T, so
the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
from kiln.codegen import kernels as K
from kiln.codegen.fuse import KOp
from kiln.dsl.ops import OPS
from kiln.dsl.ops.moe import route
from kiln.dsl.plan import Value


class MoeStep:
    """One moe op of the kernel program (Exec.MOE), with its experts' weights stacked once at load."""

    def __init__(self, op: KOp, weights: dict):
        self.ins = op.instrs[0]
        self.route_spec, self.gemm_specs = op.spec[0], op.spec[1:]
        self.prog = self.ins.experts[0]  # every expert's program has its shape (dsl.ops.moe.expert_stages)
        self.stages = op.extra["stages"]
        self.slices = op.extra["slices"]
        self.used: set[str] = set()  # the expert weights now held stacked
        self.stacked: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for kind, pos in self.stages:
            if kind == "gemm":
                self.stacked.append(self._stack(pos, weights, len(self.stacked)))

    def _stack(self, pos, weights, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[E, n, k] weights (and [E, n] biases): each expert's sibling rows at their slices' starts."""
        spec, slices = self.gemm_specs[g], self.slices[g]
        first = weights[self.prog.instrs[pos[0]].inputs[1].name]
        w = first.new_zeros(spec.experts, spec.n, spec.k)
        b = first.new_zeros(spec.experts, spec.n) if spec.has_bias else None
        for e, prog in enumerate(self.ins.experts):
            for (start, width), i in zip(slices, pos):
                lin = prog.instrs[i]
                w[e, start:start + width] = weights[lin.inputs[1].name]
                self.used.add(lin.inputs[1].name)
                if b is not None:
                    b[e, start:start + width] = weights[lin.inputs[2].name]
                    self.used.add(lin.inputs[2].name)
        return w, b

    def __call__(self, env: dict, ctx, weights: dict) -> None:
        ins, rs = self.ins, self.route_spec
        x, logits = env[ins.inputs[0]], env[ins.inputs[1]]
        bias = weights[ins.inputs[2].name] if len(ins.inputs) > 2 and ins.inputs[2] is not None else None
        gate, chosen = route(logits, bias, ins.attrs)
        T, dev = x.shape[0], x.device
        R = T * rs.top_k
        sorted_token = torch.empty(R, dtype=torch.int32, device=dev)
        slot_row = torch.empty(T, rs.top_k, dtype=torch.int32, device=dev)
        offsets = torch.empty(rs.experts + 1, dtype=torch.int32, device=dev)
        tile_offsets = torch.empty_like(offsets)
        K.moe_route(rs, chosen.contiguous(), sorted_token, slot_row, offsets, tile_offsets)

        inp = self.prog.inputs[0]
        local: dict[Value, torch.Tensor] = {}  # the expert program's values, over the R sorted rows

        def rows(v: Value) -> torch.Tensor:
            if v not in local and v == inp:  # a row op reads the expert input: gather it once
                local[v] = x.index_select(0, sorted_token)
            return local[v]

        g = 0
        for kind, pos in self.stages:
            if kind == "gemm":
                spec, (w, b) = self.gemm_specs[g], self.stacked[g]
                lins = [self.prog.instrs[i] for i in pos]
                a = x if spec.gather else _aligned(rows(lins[0].inputs[0]))
                y = torch.empty(R, spec.n, dtype=x.dtype, device=dev)
                K.moe_gemm(spec, _aligned(a), w, y, sorted_token, offsets, tile_offsets, bias=b)
                for lin, (start, width) in zip(lins, self.slices[g]):
                    local[lin.out] = y[:, start:start + width]
                g += 1
            else:
                i = self.prog.instrs[pos]
                out = OPS[i.kind].reference(ctx, i, [rows(a) for a in i.inputs])
                local.update(zip(i.outputs, out if isinstance(out, tuple) else (out,)))
        out = torch.empty(T, rs.hidden, dtype=x.dtype, device=dev)
        K.moe_combine(rs, _aligned(rows(self.prog.output)), slot_row, gate.float().contiguous(), out)
        env[ins.out] = out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself if its rows can be read with 16-byte vectors, else a contiguous copy."""
    ok = t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
    return t if ok else t.contiguous()
