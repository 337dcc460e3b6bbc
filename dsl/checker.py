"""The checker: binds parameters, unrolls blocks, infers shapes and dtypes, and
produces the `Plan` (dsl/plan.py) every backend executes.

Unrolling makes each repeated block one copy per index, with attributes evaluated
for that index (so `window = w if layer % 2 == 0 else none` is just a value here),
weights named by their path (`layer.3.wq`) and values by frame (`layer.3/h`).
Errors found on the way (unknown names in patterns, shape mismatches, unused
weights or blocks) are SpecErrors at the op or declaration that caused them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import ir
from .bind import RopeScaling, bind_params, check_requires
from .errors import SpecError
from .exprs import evaluate
from .ops import OPS, OpKind, ShapeError, T, TType, trt_unsupported
from .plan import AttentionSite, Instr, Plan, Program, StateSite, Value, WeightArg, WeightSlot, tie_chain
from .sources import resolve

MAX_REPEAT = 4096  # copies of one block (layers, experts): beyond this a count is a mistake

INPUTS = {"tokens": TType((T,), "int"), "positions": TType((T,), "int")}


def check(spec: ir.Spec, config: Mapping[str, Any] | None = None,
          config_file: str = "config.json") -> Plan:
    try:
        params = bind_params(spec, config, config_file)
        check_requires(spec, params, config, config_file)
        return _Checker(spec, params).run()
    except SpecError as e:
        text = dict(spec.sources).get(e.pos.file) if e.pos else None
        if text is not None:
            e.with_source(text)
        raise


BACKENDS = ("reference", "cuda", "tensorrt")


def check_backend(plan: Plan, backend: str) -> None:
    """Raise a SpecError at the first op `backend` cannot run (each op's definition says why).
    `reference` and `cuda` run every op (cuda runs what it has no kernel for as torch ops)."""
    if backend not in BACKENDS:
        raise SpecError(f"unknown backend '{backend}'", None, "backends: " + ", ".join(BACKENDS))
    if backend != "tensorrt":
        return
    for ins in plan.program.walk():
        why = trt_unsupported(ins)
        if why:
            e = SpecError(f"not supported on the tensorrt backend: {why}", ins.op.pos,
                          "use the cuda or reference backend for this model")
            text = dict(plan.spec.sources).get(ins.op.pos.file)
            raise e.with_source(text) if text is not None else e


class _Checker:
    def __init__(self, spec: ir.Spec, params: dict[str, Any]):
        self.spec = spec
        self.params = params
        self.weights: dict[str, WeightSlot] = {}
        self.sites: list[AttentionSite] = []
        self.state_sites: list[StateSite] = []
        self.types: dict[Value, TType] = {}
        self.counts: Counter = Counter()
        self.used_weights: set[tuple[str, str]] = set()  # (declaring block or "", weight name)
        self.used_blocks: set[str] = set()
        self.global_names = {w.name for w in spec.weights}

    def run(self) -> Plan:
        g = self.spec.graph
        for name in g.inputs:
            if name not in INPUTS:
                raise SpecError(f"top-level forward input '{name}' is not provided", self.spec.graph.ops[0].pos
                                if g.ops else None, "the inputs are: tokens, positions")
        env = dict(self.params)
        for w in self.spec.weights:
            self._declare(w, "", "", env)
        frame = _Frame("", None, env, {})
        for name in g.inputs:
            self.types[Value(name)] = INPUTS[name]
        program = self._program(g, frame, [Value(n) for n in g.inputs])
        out = self.types[program.output]
        if out.dtype != "float" or len(out.shape) != 2:
            raise SpecError(f"the forward must return logits float[T, vocab], got {out}",
                            self._output_pos(g))
        self._unused()
        return Plan(self.spec, self.params, program, self.weights, self.sites, self.types, self.counts,
                    self.state_sites).verify()

    def _output_pos(self, g: ir.Graph):
        for op in reversed(g.ops):
            if g.output in op.outputs:
                return op.pos
        return None

    # ---- weights
    def _declare(self, w: ir.Weight, path: str, block: str, env) -> None:
        full = f"{path}.{w.name}" if path else w.name
        shape = []
        for d in w.shape:
            v = evaluate(d, env)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpecError(f"dimension of weight '{w.name}' is {v!r}, expected a positive int", d.pos)
            shape.append(v)
        names = self.global_names | {x.name for x in (self._block(block).weights if block else ())}
        source = resolve(w, env, names)
        self.weights[full] = WeightSlot(full, w, tuple(shape), source, path)

    def _block(self, name: str) -> ir.Block:
        b = self.spec.block(name)
        assert b is not None  # lowering resolved every block name
        return b

    def _weight_type(self, name: str, frame: "_Frame") -> tuple[WeightArg, TType | None]:
        if frame.block and any(w.name == name for w in self._block(frame.block).weights):
            full, owner = (f"{frame.path}.{name}" if frame.path else name), frame.block
        else:
            full, owner = name, ""
        self.used_weights.add((owner, name))
        chain = tie_chain(self.weights, self.weights[full])
        for tie, target in zip(chain, chain[1:]):
            self.used_weights.add((owner if target.scope else "", target.decl.name))
            if target.shape != tie.shape:
                raise SpecError(f"weight '{name}' {list(tie.shape)} is tied to '{target.decl.name}' "
                                f"{list(target.shape)}: shapes differ", tie.decl.pos)
        slot = chain[-1]
        if slot.source is None:
            return WeightArg(full), None
        return WeightArg(full), TType(slot.shape, slot.decl.dtype)

    # ---- graphs
    def _program(self, g: ir.Graph, frame: "_Frame", inputs: list[Value]) -> Program:
        values: dict[str, Value] = {}
        for name, vid in zip(g.inputs, inputs):
            values[name] = vid
        instrs: list[Instr] = []
        live = self._live(g, frame)
        for i, op in enumerate(g.ops):
            if i not in live:
                self._mark_dead(op, frame)
            elif op.kind == "select":  # the chosen branch's value, under the select's name
                values[op.outputs[0]] = values[op.inputs[live[i]].name]
            else:
                self._op(op, frame, values, instrs)
        return Program(tuple(inputs), tuple(instrs), values[g.output])

    # ---- tensor `a if test else b`
    def _choice(self, op: ir.Op, frame: "_Frame") -> int:
        test = op.attr("cond")
        v = evaluate(test, frame.env)
        if not isinstance(v, bool):
            raise SpecError(f"the condition of a tensor `if` must be true or false, got {v!r}", test.pos)
        return 0 if v else 1

    def _live(self, g: ir.Graph, frame: "_Frame") -> dict[int, int | None]:
        """Ops to build in this copy of the graph (index -> the operand a select takes, None for
        other ops): all of them, except those that only feed the branch a select does not take.
        (Results nobody reads are kept, as they are without selects.)"""
        if not any(op.kind == "select" for op in g.ops):
            return dict.fromkeys(range(len(g.ops)))
        read = {x.name for op in g.ops for x in op.inputs if isinstance(x, ir.Val)}
        needed = {g.output} | {o for op in g.ops for o in op.outputs if o not in read}
        live: dict[int, int | None] = {}
        for i in reversed(range(len(g.ops))):
            op = g.ops[i]
            if not needed.intersection(op.outputs):
                continue
            live[i] = self._choice(op, frame) if op.kind == "select" else None
            srcs = op.inputs if live[i] is None else (op.inputs[live[i]],)
            needed.update(x.name for x in srcs if isinstance(x, ir.Val))
        return live

    def _mark_dead(self, op: ir.Op, frame: "_Frame") -> None:
        """An op of the branch not taken still counts as a use of its weights and blocks: the
        spec uses them, this config does not (their sources can be `... if test else none`)."""
        local = {w.name for w in self._block(frame.block).weights} if frame.block else set()
        for x in op.inputs:
            if isinstance(x, ir.WeightRef):
                self.used_weights.add((frame.block if x.name in local else "", x.name))
        if (name := _called_block(op)) is not None:
            self._mark_block(name)

    def _mark_block(self, name: str) -> None:
        if name in self.used_blocks:
            return
        block = self._block(name)
        self.used_blocks.add(name)
        self.used_weights.update((name, w.name) for w in block.weights)
        for op in block.graph.ops:
            if (called := _called_block(op)) is not None:
                self._mark_block(called)

    def _op(self, op: ir.Op, frame: "_Frame", values: dict[str, Value], instrs: list[Instr]) -> None:
        ins: list[Value | WeightArg | None] = []
        types: list[TType | None] = []
        for x in op.inputs:
            if isinstance(x, ir.Val):
                ins.append(values[x.name])
                types.append(self.types[values[x.name]])
            elif isinstance(x, ir.WeightRef):
                ref, t = self._weight_type(x.name, frame)
                ins.append(ref if t is not None else None)
                types.append(t)
            else:
                ins.append(None)
                types.append(None)
        if op.kind == "call":
            self._call(op, frame, values, instrs, ins, types)
            return
        kind = OpKind(op.kind)
        sig = OPS[kind]
        for name, t, x in zip(sig.inputs, types, op.inputs):
            if t is None and not name.endswith("?"):
                raise SpecError(f"operand '{name}' of {op.kind} is absent (its weight source is none)", op.pos)
        attrs = self._attrs(op, frame)
        try:
            attrs = sig.make_attrs(attrs)
            out_types = sig.infer(types, attrs)
        except ShapeError as e:
            raise SpecError(f"{op.kind}: {e}", op.pos) from None
        if len(out_types) != len(op.outputs):
            raise SpecError(f"{op.kind} gives {len(out_types)} outputs, {len(op.outputs)} names on the left",
                            op.pos)
        outs = tuple(frame.value(o) for o in op.outputs)
        for o, vid, t in zip(op.outputs, outs, out_types):
            values[o] = vid
            self.types[vid] = t
        self.counts[op.kind] += 1
        site = None
        experts: tuple[Program, ...] = ()
        if kind is OpKind.ATTENTION:
            site = self._site(frame, types, attrs)
        elif kind is OpKind.MOE:
            experts = self._experts(op, frame, attrs, types)
        state = None
        if sig.state is not None:  # a stateful op: its own slice of the recurrent state cache
            st = sig.state(types, attrs)
            state = len(self.state_sites)
            self.state_sites.append(StateSite(state, frame.path or "forward", kind.value, tuple(st.shape), st.dtype))
        instrs.append(Instr(kind, tuple(ins), attrs, outs, op, site, experts, state))

    def _attrs(self, op: ir.Op, frame: "_Frame") -> dict[str, Any]:
        sig = OPS[OpKind(op.kind)]
        out: dict[str, Any] = {}
        given = dict(op.attrs)
        for name, a in sig.attrs.items():
            if name in given:
                v = evaluate(given[name], frame.env) if a.type != "block" else given[name].value
                pos = given[name].pos
            else:
                v, pos = a.default, op.pos
            out[name] = _typed(op.kind, name, a.type, v, pos)
        return out

    def _site(self, frame, types, attrs) -> int:
        q, k, v = types
        hd = attrs.head_dim
        kvh = k.shape[1] // hd
        site = AttentionSite(len(self.sites), frame.path or "forward", q.shape[1] // hd, kvh, hd,
                             v.shape[1] // kvh)
        self.sites.append(site)
        return site.index

    def _call(self, op, frame, values, instrs, ins, types) -> None:
        block = self._block(op.attr("block").value)
        self.used_blocks.add(block.name)
        if len(ins) != len(block.graph.inputs):
            raise SpecError(f"block '{block.name}' takes {len(block.graph.inputs)} input(s), "
                            f"got {len(ins)}", op.pos)
        if block.count is None:
            out = self._inline(block, frame.child(block.name, None), list(ins))
            instrs.extend(out.instrs)
            result = out.output
        else:
            n = evaluate(block.count, frame.env)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_REPEAT:
                raise SpecError(f"block '{block.name}' repeats {n!r} times, expected an int in 1..{MAX_REPEAT}",
                                block.count.pos)
            if len(ins) != 1:
                raise SpecError(f"repeated block '{block.name}' must take exactly one input", op.pos,
                                "its output feeds the next copy")
            carried = ins[0]
            for i in range(n):
                out = self._inline(block, frame.child(block.name, i), [carried])
                if self.types[out.output] != self.types[carried]:
                    raise SpecError(f"block '{block.name}' returns {self.types[out.output]} but takes "
                                    f"{self.types[carried]}; a repeated block must keep the shape",
                                    block.pos)
                instrs.extend(out.instrs)
                carried = out.output
            result = carried
        values[op.outputs[0]] = result

    def _inline(self, block: ir.Block, frame: "_Frame", ins: list[str]) -> Program:
        for w in block.weights:
            self._declare(w, frame.path, block.name, frame.env)
        return self._program(block.graph, frame, ins)

    def _experts(self, op, frame, attrs, types) -> tuple[Program, ...]:
        block = self._block(attrs.experts)
        self.used_blocks.add(block.name)
        if block.count is None:
            raise SpecError(f"experts block '{block.name}' needs a count: block {block.name}[n]", block.pos)
        n = evaluate(block.count, frame.env)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_REPEAT:
            raise SpecError(f"experts block '{block.name}' has {n!r} copies, expected an int in 1..{MAX_REPEAT}",
                            block.count.pos)
        if types[1].shape[1] != n:
            raise SpecError(f"router gives {types[1].shape[1]} logits per token but block "
                            f"'{block.name}' has {n} experts", op.pos)
        if len(block.graph.inputs) != 1:
            raise SpecError(f"experts block '{block.name}' must take one input", block.pos)
        progs = []
        for e in range(n):
            f = frame.child(block.name, e)
            xin = f.value("__in")
            self.types[xin] = types[0]
            prog = self._inline(block, f, [xin])
            if self.types[prog.output] != types[0]:
                raise SpecError(f"expert returns {self.types[prog.output]}, expected {types[0]}", block.pos)
            progs.append(prog)
        return tuple(progs)

    def _unused(self) -> None:
        own = self.spec.files[0] if self.spec.files else None

        def hint(w, where: str, block: str | None) -> str:
            if own is None or w.pos is None or w.pos.file == own:
                return f"use it in {where}, or remove it"
            inside = f" inside block '{block}'" if block else ""
            return (f"it is inherited from {Path(w.pos.file).name}: use it, or write `drop {w.name}`{inside} "
                    f"in {Path(own).name}")

        for b in self.spec.blocks:
            if b.name not in self.used_blocks:
                raise SpecError(f"block '{b.name}' is never called", b.pos, "call it, or remove it")
        for w in self.spec.weights:
            if ("", w.name) not in self.used_weights:
                raise SpecError(f"weight '{w.name}' is declared but never used", w.pos, hint(w, "a forward", None))
        for b in self.spec.blocks:
            for w in b.weights:
                if (b.name, w.name) not in self.used_weights:
                    raise SpecError(f"weight '{w.name}' of block '{b.name}' is declared but never used",
                                    w.pos, hint(w, "the block's forward", b.name))


def _called_block(op: ir.Op) -> str | None:
    """The block an op runs: a block call's, or the experts of a `moe`."""
    attr = op.attr("block") if op.kind == "call" else op.attr("experts") if op.kind == "moe" else None
    return attr.value if attr is not None else None


@dataclass(frozen=True)
class _Frame:
    path: str  # "layer.3", "layer.3.expert.5", "" at top level
    block: str | None
    env: dict
    _unused: dict

    def child(self, block: str, index: int | None) -> "_Frame":
        part = block if index is None else f"{block}.{index}"
        env = dict(self.env)
        if index is not None:
            env[block] = index
        return _Frame(f"{self.path}.{part}" if self.path else part, block, env, {})

    def value(self, name: str) -> Value:
        return Value(f"{self.path}/{name}" if self.path else name)


def _typed(op: str, name: str, typ: str, v: Any, pos) -> Any:
    optional = typ.endswith("?")
    base = typ.rstrip("?")
    if v is None:
        if optional:
            return None
        raise SpecError(f"{op}() attribute '{name}' cannot be none", pos)
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "list": isinstance(v, list),
        "rope_scaling": isinstance(v, RopeScaling),
        "block": isinstance(v, str),
    }[base]
    if not ok:
        raise SpecError(f"{op}() attribute '{name}' must be {base}, got {v!r}", pos)
    if base == "float":
        v = float(v)
    return v
