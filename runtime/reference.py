"""The reference backend: runs a checked Plan with plain torch ops, CPU or GPU, fp32 or bf16.

It is the oracle every other backend is compared with. It has no op code of its own: each
instruction runs its op definition's `reference` (dsl/ops), through the table `OPS`.
"""

from __future__ import annotations

import torch
from kiln.dsl.ops import OPS
from kiln.dsl.plan import Plan, Program, Value, fetch

from .batch import StepBatch
from .kv_store import KVStore
from .lora import adapter_rows


class ReferenceModel:
    backend = "reference"
    takes_pending = True  # forward fills StepBatch.pending's tokens in on the device (engine overlap)

    def __init__(self, plan: Plan, weights: dict[str, torch.Tensor]):
        self.plan = plan
        self.weights = weights  # full weight name -> tensor in the run dtype, on the run device
        self.comm = None  # runtime/distributed.py Comm: this rank's process group, for plan.collectives
        self.remote: frozenset[int] = frozenset()  # ids of expert programs another rank holds (EP)

    def reserve(self, max_seqs: int, max_context: int) -> None:
        """Nothing to size: every step allocates what it needs."""

    def forward(self, batch: StepBatch, kv: KVStore, all_logits: bool = False) -> torch.Tensor:
        """Logits [rows, vocab] of the sampled tokens (all tokens with all_logits)."""
        # (A model without attention sites, a state-space model: the weights' device.)
        device = kv.k[0].device if kv.k else next(
            (w.device for w in self.weights.values() if isinstance(w, torch.Tensor)), batch.tokens.device)
        if batch.tokens.device != device or batch.pending is not None:
            batch = StepBatch(batch.device_tokens(device), batch.seqs)
        ctx = StepContext(batch, kv, self.weights)
        if self.comm is not None:  # tensor parallel: the collectives the shard pass placed, by value
            ctx.collectives = {c.value: c.kind for c in self.plan.collectives}
            ctx.comm, ctx.remote, ctx.types = self.comm, self.remote, self.plan.types
        lora = getattr(self, "lora", None)  # runtime/lora.py LoraSet, set by the engine
        ctx.lora = lora.bind(adapter_rows(batch)) if lora else None
        out = ctx.run(self.plan.program, {Value("tokens"): batch.tokens, Value("positions"): ctx.positions})
        if not all_logits:
            out = out[batch.sample_rows()]
        return out.float()


class StepContext:
    """One forward's state for op references (dsl.ops.RefContext): positions, sequence lengths,
    the batch and the KV cache; `run` executes a program (a moe runs its experts' with it)."""

    collectives: dict = {}  # Value -> "all_reduce" | "all_gather" (plan.collectives; none on one rank)
    remote: frozenset = frozenset()

    def __init__(self, batch: StepBatch, kv: KVStore, weights: dict[str, torch.Tensor]):
        batch.validate(kv.page_size)
        self.batch = batch
        self.kv = kv
        self.weights = weights
        self.positions = batch.positions()
        # Sequence length seen by each token's sequence after this step (dynamic rope).
        self.seq_len = torch.cat([torch.full((s.length,), s.context + s.length) for s in batch.seqs]) \
            if batch.seqs else torch.zeros(0, dtype=torch.long)

    def run(self, prog: Program, env: dict) -> torch.Tensor:
        """The program's output; `env` (its inputs, by Value) receives every value it computes."""
        if id(prog) in self.remote:  # an expert another rank holds: it adds nothing here (the moe's
            x = env[prog.inputs[0]]   # all-reduce sums the holder's share in)
            return x.new_zeros(x.shape[0], self.types[prog.output].shape[1])
        for ins in prog.instrs:
            out = OPS[ins.kind].reference(self, ins, [fetch(a, env, self.weights) for a in ins.inputs])
            env.update(zip(ins.outputs, out if isinstance(out, tuple) else (out,)))
            if self.collectives:
                for o in ins.outputs:
                    if o in self.collectives:
                        env[o] = self.comm.collective(self.collectives[o], env[o])
        return env[prog.output]
