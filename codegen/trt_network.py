"""Plan -> a readable Python module that builds the model as a TensorRT network.

Python decides everything here: per-op records (validated identifiers, repr()'d names and
attribute values, the spec line each op came from), the network's inputs and their
optimization-profile ranges. `templates/network.py.j2` only lays the records out. Each op's
TensorRT lowering is part of its definition (dsl/ops: `OpDef.trt`), found through the table
`OPS`; an op without one is an explicit error naming the op and its spec line.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from pathlib import Path

from kiln.dsl.dtypes import RUN_DTYPES
from kiln.dsl.ops import OPS, OpKind, trt_unsupported
from kiln.dsl.plan import Instr, Plan, Program, Value, WeightArg

from .jinja import env
from .trt_layers import TrtLoweringError


@dataclass(frozen=True)
class Limits:
    """What an engine is built for; every profile range derives from these."""

    max_batch: int  # sequences in one step
    max_tokens: int  # new tokens in one step (all sequences)
    max_seq_len: int  # positions per sequence (rotary tables, keys per sequence)
    page_size: int

    @property
    def max_pages(self) -> int:
        return self.max_batch * -(-self.max_seq_len // self.page_size)


@dataclass(frozen=True)
class IOTensor:
    name: str
    dtype: str  # "int32" or a Kiln dtype ("fp32", "bf16", ...)
    shape: tuple[int, ...]  # -1 = dynamic
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None  # min, opt, max (inputs)
    doc: str
    output: bool = False


def io_tensors(plan: Plan, dtype: str, limits: Limits) -> list[IOTensor]:
    """The network's inputs (with profile ranges) and outputs, in binding order."""
    t_max, n_max, p_max = limits.max_tokens, limits.max_batch * limits.max_seq_len, limits.max_pages

    def dyn(n_min: int, n_max: int, doc: str) -> tuple:
        return ((n_min,), (max(n_min, n_max // 2),), (n_max,)), doc

    ios = []
    per_token = [("tokens", "token ids [T]"), ("positions", "absolute position of each token [T]")]
    rows = [("logit_rows", "tokens whose logits are returned [R]")]
    meta = []
    if plan.sites:
        per_token += [("token_seq", "sequence index of each token [T]"),
                      ("write_order", "new tokens sorted by KV page, the cache-update order [T]")]
        meta = [(n, (1,), (max(1, n_max // 2),), (n_max,), d) for n, d in (
            ("kv_page", "page of each attended key [N]"), ("kv_slot", "slot in its page [N]"),
            ("kv_seq", "sequence of each attended key [N]"), ("kv_pos", "position of each attended key [N]"))]
        meta += [("page_write_start", (1,), (max(1, p_max // 2),), (p_max,),
                  "first slot written in each page this step [P]"),
                 ("page_write_cu", (2,), (max(2, p_max // 2 + 1),), (p_max + 1,),
                  "cumulative count of rows written per page [P + 1]")]
    for name, doc in per_token + rows:
        prof, doc = dyn(1, t_max, doc)
        ios.append(IOTensor(name, "int32", (-1,), prof, doc))
    for name, lo, opt, hi, doc in meta:
        ios.append(IOTensor(name, "int32", (-1,), (lo, opt, hi), doc))
    for s in plan.sites:
        for kind, d in (("k", s.head_dim), ("v", s.v_head_dim)):
            shape = (-1, s.kv_heads, limits.page_size, d)
            prof = tuple((p,) + shape[1:] for p in (1, max(1, p_max // 2), p_max))
            ios.append(IOTensor(f"{kind}_cache.{s.index}", dtype, shape, prof,
                                f"paged {kind.upper()} cache of {s.path} [pages, kv_heads, page_size, head_dim]"))
    for s in plan.sites:  # outputs in the order the network marks them
        for kind, d in (("k", s.head_dim), ("v", s.v_head_dim)):
            ios.append(IOTensor(f"{kind}_cache_out.{s.index}", dtype, (-1, s.kv_heads, limits.page_size, d), None,
                                f"{kind}_cache.{s.index} updated in place (aliases the input)", True))
    ios.append(IOTensor("logits", "fp32", (-1, plan.vocab_size), None, "logits of the logit_rows [R, vocab]", True))
    return ios


# ---------------------------------------------------------------- per-op records


class _Names:
    """Value ids ("layer.3/h__1") -> unique, valid Python identifiers ("layer3_h_1")."""

    RESERVED = frozenset({"trt", "network", "weights", "nn", "build_network"})

    def __init__(self):
        self.ids: dict[str, str] = {}
        self.used: set[str] = set(self.RESERVED)

    def __call__(self, vid: str) -> str:
        if vid not in self.ids:
            base = re.sub(r"\.(\d)", r"\1", vid)  # layer.3.expert.1/t__2 -> layer3_expert1_t_2
            base = re.sub(r"_+", "_", re.sub(r"\W", "_", base)).strip("_") or "v"
            if base[0].isdigit() or keyword.iskeyword(base):
                base = "v_" + base
            name, n = base, 1
            while name in self.used:
                n += 1
                name = f"{base}_{n}"
            if not name.isidentifier():
                raise TrtLoweringError(f"cannot name value {vid!r} in generated code")
            self.ids[vid] = name
            self.used.add(name)
        return self.ids[vid]


class _Lowerer:
    def __init__(self, plan: Plan, dtype: str):
        self.plan, self.dtype = plan, dtype
        self.torch_dtype = RUN_DTYPES[dtype].torch
        self.names = _Names()
        self.tables: dict[str, str] = {}  # table code -> the variable holding it

    def table(self, code: str) -> str:
        """The variable that holds the table `code` builds (one per distinct code)."""
        return self.tables.setdefault(code, f"rope_table_{len(self.tables)}")

    def arg(self, ref: Value | WeightArg | None) -> str:
        """Code for an operand: a local variable, or `nn.weight('name')` for a weight."""
        if ref is None:
            return "None"
        if isinstance(ref, WeightArg):
            return f"nn.weight({self.plan.alias_target(ref.name)!r})"
        return self.names(ref.id)

    def program(self, prog: Program) -> list[dict]:
        """Records grouped by the spec statement they came from (one comment per group), with a
        section header where the block copy (`layer.3`) changes."""
        groups: list[dict] = []
        for ins in prog.instrs:
            rec = self.instr(ins)
            frame = ins.out.id.rpartition("/")[0]
            if not groups or groups[-1]["comment"] != rec["comment"] or groups[-1]["frame"] != frame:
                section = frame if frame and (not groups or groups[-1]["frame"] != frame) else None
                groups.append({"comment": rec["comment"], "frame": frame, "section": section, "records": []})
            groups[-1]["records"].append(rec)
        return groups

    def instr(self, ins: Instr) -> dict:
        if ins.kind not in OPS:  # a plan a pass broke: the table is closed
            raise TrtLoweringError(f"{ins.op.pos}: op '{ins.kind}' has no TensorRT lowering "
                                   f"(in `{ins.op.text.strip()}`)")
        why = trt_unsupported(ins)
        if why:
            raise TrtLoweringError(f"{ins.op.pos}: {why} (in `{ins.op.text.strip()}`)")
        low = OPS[ins.kind].trt
        pos = ins.op.pos
        rec = {"macro": low.macro, "kind": ins.kind.name, "kwargs": low.kwargs(ins, self),
               "comment": f"{_short(pos.file)}:{pos.line}  {' '.join(ins.op.text.split())}",
               "args": [self.arg(i) for i in ins.inputs]}
        if low.macro == "moe":
            experts = []
            for e, prog in enumerate(ins.experts):
                self.names.ids[prog.inputs[0].id] = self.arg(ins.inputs[0])  # each expert reads the moe input
                experts.append({"index": e, "records": self.program(prog), "result": self.names(prog.output.id)})
            rec.update(experts=experts, gates=self.names(ins.out.id + "__gates"))
        rec["out"] = ", ".join(self.names(o.id) for o in ins.outputs)
        return rec


def _short(file: str) -> str:
    p = Path(file)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


# ---------------------------------------------------------------- rendering


def render_network(plan: Plan, dtype: str, limits: Limits) -> str:
    """The network module's source for this plan: laid out by the template alone, so it reads the
    same on every machine."""
    lw = _Lowerer(plan, dtype)
    for v in plan.program.inputs:
        lw.names.ids[v.id] = v.id  # tokens / positions keep their names
    records = lw.program(plan.program)
    ios = io_tensors(plan, dtype, limits)
    spec = plan.spec
    return env().get_template("network.py.j2").render(
        spec_name=spec.name, spec_files=[_short(f) for f in spec.files], dtype=dtype, limits=limits,
        inputs=[io for io in ios if not io.output], records=records, result=lw.names(plan.program.output.id),
        program_inputs=[v.id for v in plan.program.inputs], num_sites=len(plan.sites),
        tables=[(name, code) for code, name in lw.tables.items()],
        uses_rope_scaling=any(i.kind is OpKind.ROPE and i.attrs.scaling is not None for i in plan.program.walk()),
    )
