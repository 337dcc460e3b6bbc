"""Surface syntax -> IR: merge `extends`, validate names, flatten forwards into SSA ops.

Nested expressions become one op each, with generated temporaries `t__N`; a reassigned
name `x` becomes `x`, `x__1`, ... so every value is defined once. Names containing
`__` are reserved for these, so they never clash with a user's.
"""

from __future__ import annotations

from dataclasses import replace

from . import ir
from .errors import SpecError
from .exprs import CONST_FUNCS
from .names import check_name, check_pattern
from .ops import BY_NAME, INFIX
from .syntax import Assign, BlockDecl, ForwardDecl, Return, SpecAst


def merge(base: SpecAst, child: SpecAst) -> SpecAst:
    """`spec child extends base`: the child's params, weights, blocks and forward
    replace the base's of the same name in place; new ones are appended; `drop`s remove
    inherited declarations (each must name one the base has)."""

    def by_name(old, new, key=lambda x: x.name):
        out = list(old)
        index = {key(x): i for i, x in enumerate(out)}
        for x in new:
            if key(x) in index:
                out[index[key(x)]] = x
            else:
                out.append(x)
        return out

    def without(items, drops, what: str):
        names = {x.name for x in items}
        for name, pos in drops:
            if name not in names:
                raise SpecError(f"'drop {name}': {what} declares no '{name}'", pos,
                                "inherited: " + (", ".join(sorted(names)) or "nothing"))
        gone = {name for name, _ in drops}
        return [x for x in items if x.name not in gone]

    top = {name for name, _ in child.drops}
    named = [r for r in child.requires if r.name is not None]
    for x in [*child.params, *child.weights, *child.blocks, *named]:
        if x.name in top:
            raise SpecError(f"'{x.name}' is both dropped and declared by spec '{child.name}'",
                            getattr(x, "name_pos", None) or x.pos,
                            "a redeclaration already replaces the inherited one: remove the drop")
    for name, pos in child.drops:
        if not any(x.name == name for x in [*base.params, *base.weights, *base.blocks, *base.requires]):
            raise SpecError(f"'drop {name}': base spec '{base.name}' declares no parameter, weight or block "
                            f"'{name}'", pos, "nor a named require (`require NAME: ...`)")
    blocks = [b for b in base.blocks if b.name not in top]
    for nb in child.blocks:
        old = next((b for b in blocks if b.name == nb.name), None)
        if old is None:
            if nb.drops:
                raise SpecError(f"'drop {nb.drops[0][0]}': block '{nb.name}' is new in spec '{child.name}', "
                                "so it inherits nothing to drop", nb.drops[0][1])
            blocks.append(nb)
            continue
        weights = without(old.weights, nb.drops, f"block '{nb.name}' of spec '{base.name}'")
        merged = BlockDecl(nb.name, nb.count if nb.count is not None else old.count,
                           tuple(by_name(weights, nb.weights)),
                           nb.forward if nb.forward is not None else old.forward, nb.pos)
        blocks[blocks.index(old)] = merged
    return SpecAst(
        name=child.name, extends=child.extends, pos=child.pos, file=child.file,
        architectures=child.architectures, gguf=child.gguf,
        ignore=base.ignore + child.ignore,
        params=by_name([p for p in base.params if p.name not in top], child.params),
        weights=by_name([w for w in base.weights if w.name not in top], child.weights),
        blocks=blocks,
        forward=child.forward if child.forward is not None else base.forward,
        requires=by_name([r for r in base.requires if r.name is None or r.name not in top], named)
        + [r for r in child.requires if r.name is None],
    )


def lower(spec: SpecAst, files: tuple[str, ...], sources: tuple[tuple[str, str], ...] = ()) -> ir.Spec:
    check_name(spec.name, spec.pos, "spec")
    seen: dict[str, str] = {}

    def declare(name: str, pos, what: str) -> None:
        check_name(name, pos, what)
        if name in seen:
            raise SpecError(f"'{name}' is already declared as a {seen[name]}", pos,
                            "parameters, weights and blocks share one namespace")
        seen[name] = what

    for p in spec.params:
        declare(p.name, p.pos, "parameter")
    for w in spec.weights:
        declare(w.name, w.pos, "weight")
        _check_weight(w)
    for b in spec.blocks:
        declare(b.name, b.pos, "block")
        if b.name in BY_NAME:
            raise SpecError(f"block name '{b.name}' is the name of an op", b.pos)
    params = {p.name: p for p in spec.params}
    for r in spec.requires:
        if r.name is not None:
            declare(r.name, r.name_pos or r.pos, "require")
        _check_require(r, params)
    for pattern in spec.ignore:
        check_pattern(pattern, spec.pos, glob=True)
    global_weights = {w.name for w in spec.weights}
    block_names = {b.name for b in spec.blocks}

    blocks = []
    for b in spec.blocks:
        local = {w.name for w in b.weights}
        for w in b.weights:
            check_name(w.name, w.pos, "weight")
            if w.name in seen and seen[w.name] != "weight":
                raise SpecError(f"weight '{w.name}' shadows a {seen[w.name]}", w.pos)
            if w.name in global_weights:
                raise SpecError(f"block weight '{w.name}' shadows the global weight of that name", w.pos)
            _check_weight(w)
        if b.forward is None:
            raise SpecError(f"block '{b.name}' has no forward", b.pos, "add forward(x) { ... return ... }")
        graph = _Lowerer(local | global_weights, block_names).graph(b.forward)
        blocks.append(ir.Block(b.name, b.count, b.weights, graph, b.pos))
    if spec.forward is None:
        raise SpecError(f"spec '{spec.name}' has no top-level forward", spec.pos,
                        "add forward(tokens) { ... return logits }")
    graph = _Lowerer(global_weights, block_names).graph(spec.forward)
    gguf_arch, gguf_flags = spec.gguf if spec.gguf else (None, ())
    return ir.Spec(
        name=spec.name, file=spec.file, architectures=spec.architectures or (),
        gguf_arch=gguf_arch, gguf_flags=gguf_flags, ignore=tuple(spec.ignore),
        params=tuple(spec.params), weights=tuple(spec.weights), blocks=tuple(blocks),
        graph=graph, files=files, sources=sources, requires=tuple(spec.requires),
    )


def _check_require(r: ir.Require, params: dict[str, ir.Param]) -> None:
    """A require's condition is a constant expression over parameters that gives true or false."""

    def walk(e) -> str | None:  # the kind of value e gives where it is known: bool, number, str, list
        if isinstance(e, ir.Name):
            p = params.get(e.id)
            if p is None:
                raise SpecError(f"undefined name '{e.id}' in a require", e.pos,
                                "a require's condition uses parameters (declare one with `param NAME: TYPE = "
                                "DEFAULT <- config_key?`)")
            if p.optional:
                return None
            return {"bool": "bool", "int": "number", "float": "number", "str": "str", "list": "list"}.get(p.type)
        if isinstance(e, ir.Const):
            v = e.value
            return (None if v is None else "bool" if isinstance(v, bool) else "str" if isinstance(v, str)
                    else "number")
        if isinstance(e, ir.ListExpr):
            for x in e.items:
                walk(x)
            return "list"
        if isinstance(e, ir.UnOp):
            walk(e.operand)
            return "bool" if e.op == "not" else "number"
        if isinstance(e, ir.BinOp):
            a, b = walk(e.left), walk(e.right)
            if e.op in ("==", "!=", "<", "<=", ">", ">=", "in", "not in", "and"):
                return "bool"
            if e.op == "or":
                return "bool" if a == b == "bool" else None
            return "number" if e.op != "+" or "number" in (a, b) else None
        if isinstance(e, ir.Cond):
            walk(e.test)
            a, b = walk(e.then), walk(e.other)
            return a if a == b else None
        if isinstance(e, ir.Call):
            if e.fn not in CONST_FUNCS:
                raise SpecError(f"unknown function '{e.fn}' in a require", e.pos,
                                "constant functions: " + ", ".join(sorted(CONST_FUNCS)))
            for a in e.args:
                walk(a)
            for _, a, _ in e.kwargs:
                walk(a)
            return "number"
        if isinstance(e, ir.Index):
            walk(e.base)
            for x in e.subs:
                if isinstance(x, ir.Slice):
                    raise SpecError("a require cannot slice", x.pos, "index a list with one integer")
                walk(x)
            return None
        if isinstance(e, ir.Attr):
            walk(e.base)
            return None
        raise SpecError("this expression is not a constant", getattr(e, "pos", r.pos))

    kind = walk(r.test)
    if kind is not None and kind != "bool":
        raise SpecError(f"the condition of a require must be true or false, not a {kind}", r.pos,
                        "compare or negate it, e.g. `not flag`, `x == 0`, `x != none`")


def _check_weight(w: ir.Weight) -> None:
    if w.prefix:
        check_pattern(w.prefix, w.pos)

    def walk(e):
        if isinstance(e, ir.Const) and isinstance(e.value, str):
            check_pattern(e.value, e.pos)
        for child in getattr(e, "__dict__", {}).values():
            if isinstance(child, tuple):
                for c in child:
                    if hasattr(c, "pos"):
                        walk(c)
            elif hasattr(child, "pos") and child is not e.pos:
                walk(child)

    walk(w.source)


class _Lowerer:
    """Flattens one forward body into a Graph of SSA ops."""

    def __init__(self, weights: set[str], blocks: set[str]):
        self.weights = weights
        self.blocks = blocks
        self.env: dict[str, str] = {}  # source name -> current SSA name
        self.defined: dict[str, int] = {}
        self.ops: list[ir.Op] = []
        self.temps = 0
        self.stmt = None

    def graph(self, fwd: ForwardDecl) -> ir.Graph:
        for name in fwd.inputs:
            check_name(name, fwd.pos, "input")
            self._define(name, fwd.pos)
        output = None
        for st in fwd.stmts:
            if output is not None:
                raise SpecError("statement after return", st.pos, "return ends a forward")
            self.stmt = st
            if isinstance(st, Return):
                output = self._tensor(st.value, "return value")
            else:
                self._assign(st)
        if output is None:
            raise SpecError("forward has no return", fwd.pos, "end it with `return <value>`")
        return ir.Graph(fwd.inputs, tuple(self.ops), output.name)

    # ---- statements
    def _assign(self, st: Assign) -> None:
        for t in st.targets:
            check_name(t, st.pos, "value")
            if t in self.weights or t in self.blocks:
                raise SpecError(f"cannot assign to '{t}': it names a weight or block", st.pos)
        if len(st.targets) == 1:
            v = self._tensor(st.value, f"value of '{st.targets[0]}'")
            last = self.ops[-1] if self.ops else None
            if last is not None and v.name.startswith("t__") and v.name in last.outputs:
                ssa = self._define(st.targets[0], st.pos)  # name the op's result after its target
                self.ops[-1] = replace(last, outputs=tuple(ssa if o == v.name else o for o in last.outputs))
            else:
                self.env[st.targets[0]] = v.name  # `y = x` only aliases
            return
        if not isinstance(st.value, ir.Call) or st.value.fn not in BY_NAME:
            raise SpecError(f"{len(st.targets)} names on the left need an op with as many outputs",
                            st.pos, "e.g. q, k, v = split(qkv, sizes=[a, b, c])")
        outs = [self._define(t, st.pos) for t in st.targets]
        self._op_call(st.value, outs)

    def _define(self, name: str, pos) -> str:
        n = self.defined.get(name, -1) + 1
        self.defined[name] = n
        ssa = name if n == 0 else f"{name}__{n}"
        self.env[name] = ssa
        return ssa

    def _temp(self) -> str:
        self.temps += 1
        return f"t__{self.temps}"

    # ---- expressions
    def _is_tensor(self, e: ir.Expr) -> bool:
        if isinstance(e, ir.Name):
            return e.id in self.env or e.id in self.weights
        if isinstance(e, ir.Call):
            return e.fn in BY_NAME or e.fn in self.blocks
        if isinstance(e, ir.BinOp) and e.op in ("+", "-", "*", "/"):
            return self._is_tensor(e.left) or self._is_tensor(e.right)
        if isinstance(e, ir.UnOp) and e.op == "-":
            return self._is_tensor(e.operand)
        if isinstance(e, ir.Cond):
            return self._is_tensor(e.then) or self._is_tensor(e.other)
        return False

    def _operand(self, e: ir.Expr, what: str):
        """A tensor operand: a value, a weight, or none (absent optional operand)."""
        if isinstance(e, ir.Const) and e.value is None:
            return None
        if isinstance(e, ir.Name) and e.id in self.weights and e.id not in self.env:
            return ir.WeightRef(e.id)
        return self._tensor(e, what)

    def _tensor(self, e: ir.Expr, what: str) -> ir.Val:
        if isinstance(e, ir.Name):
            if e.id in self.env:
                return ir.Val(self.env[e.id])
            if e.id in self.weights:
                raise SpecError(f"weight '{e.id}' used directly as the {what}", e.pos,
                                "weights are operands of ops, e.g. linear(x, w)")
            if e.id in self.blocks:
                raise SpecError(f"block '{e.id}' used as a value", e.pos, f"call it: {e.id}(x)")
            raise SpecError(f"undefined name '{e.id}'", e.pos,
                            "not a value computed above, a weight, or a block")
        if isinstance(e, ir.Call):
            out = self._temp()
            self._op_call(e, [out])
            return ir.Val(out)
        if isinstance(e, ir.BinOp) and e.op in ("+", "-", "*", "/"):
            return self._binop(e, what)
        if isinstance(e, ir.UnOp) and e.op == "-" and self._is_tensor(e.operand):
            x = self._tensor(e.operand, what)
            return self._emit("scale", (x,), (("factor", ir.Const(-1.0, e.pos)),), e)
        if isinstance(e, ir.Cond) and self._is_tensor(e):
            # `a if test else b` between tensors: the test is a constant (parameters, the block
            # index), so the checker keeps one branch per block copy and drops the other's ops.
            self._const(e.test, "the condition of a tensor `if`")
            a = self._tensor(e.then, what)
            b = self._tensor(e.other, what)
            return self._emit("select", (a, b), (("cond", e.test),), e)
        raise SpecError(f"the {what} must be a tensor expression", e.pos,
                        "constants can only scale a tensor (x * c) or be attributes (name=value)")

    def _binop(self, e: ir.BinOp, what: str) -> ir.Val:
        lt, rt = self._is_tensor(e.left), self._is_tensor(e.right)
        if lt and rt:
            if e.op == "/":
                raise SpecError("tensor / tensor is not supported", e.pos)
            a = self._operand(e.left, what)
            b = self._operand(e.right, what)
            return self._emit(INFIX[e.op], (a, b), (), e)
        if not (lt or rt):
            raise SpecError(f"the {what} must be a tensor expression", e.pos)
        if e.op in ("+", "-"):
            raise SpecError(f"cannot {'add' if e.op == '+' else 'subtract'} a constant to a tensor",
                            e.pos, "only `tensor * constant` and `tensor / constant` are ops")
        if e.op == "/" and rt:
            raise SpecError("constant / tensor is not supported", e.pos)
        tensor, const = (e.left, e.right) if lt else (e.right, e.left)
        self._const(const, "scale factor")
        factor = const if e.op == "*" else ir.BinOp("/", ir.Const(1.0, e.pos), const, e.pos)
        x = self._tensor(tensor, what)
        return self._emit("scale", (x,), (("factor", factor),), e)

    def _const(self, e: ir.Expr, what: str) -> ir.Expr:
        if self._is_tensor(e):
            raise SpecError(f"{what} must be a constant, not a tensor", e.pos)
        if isinstance(e, ir.Call) and e.fn not in CONST_FUNCS:
            raise SpecError(f"unknown function '{e.fn}'", e.pos)
        return e

    def _emit(self, kind, inputs, attrs, e, outputs=None) -> ir.Val:
        outs = outputs or [self._temp()]
        self.ops.append(ir.Op(kind, tuple(inputs), tuple(attrs), tuple(outs), e.pos, self.stmt.text))
        return ir.Val(outs[0])

    def _op_call(self, call: ir.Call, outputs: list[str]) -> None:
        if call.fn in self.blocks:
            args = tuple(self._tensor(a, f"argument of {call.fn}") for a in call.args)
            if call.kwargs:
                raise SpecError(f"block '{call.fn}' takes no attributes", call.kwargs[0][2])
            self._emit("call", args, (("block", ir.Const(call.fn, call.pos)),), call, outputs)
            return
        sig = BY_NAME.get(call.fn)
        if sig is None:
            hint = "ops: " + ", ".join(sorted(BY_NAME))
            if call.fn in CONST_FUNCS:
                hint = f"{call.fn}() works on constants only"
            raise SpecError(f"unknown op '{call.fn}'", call.pos, hint)
        required = [i for i in sig.inputs if not i.endswith("?")]
        if not len(required) <= len(call.args) <= len(sig.inputs):
            shape = ", ".join(sig.inputs)
            raise SpecError(f"{call.fn}() takes {len(required)}"
                            + (f" to {len(sig.inputs)}" if len(sig.inputs) > len(required) else "")
                            + f" tensor operand(s), got {len(call.args)}", call.pos,
                            f"{call.fn}({shape}, attr=value, ...)")
        inputs = [self._operand(a, f"operand '{n.rstrip('?')}' of {call.fn}")
                  for a, n in zip(call.args, sig.inputs)]
        for a, n in zip(call.args, sig.inputs):
            if not n.endswith("?") and isinstance(a, ir.Const) and a.value is None:
                raise SpecError(f"operand '{n}' of {call.fn} cannot be none", a.pos)
        inputs += [None] * (len(sig.inputs) - len(inputs))
        attrs = []
        for k, v, kpos in call.kwargs:
            if k not in sig.attrs:
                known = ", ".join(sig.attrs) or "none"
                raise SpecError(f"{call.fn}() has no attribute '{k}'", kpos, f"its attributes: {known}")
            if sig.attrs[k].type == "block":
                if not (isinstance(v, ir.Name) and v.id in self.blocks):
                    raise SpecError(f"attribute '{k}' must name a block", v.pos)
                attrs.append((k, ir.Const(v.id, v.pos)))
                continue
            attrs.append((k, self._const(v, f"attribute '{k}'")))
        given = {k for k, _ in attrs}
        for k, a in sig.attrs.items():
            if a.required and k not in given:
                raise SpecError(f"{call.fn}() needs the attribute '{k}'", call.pos,
                                f"add {k}=... ({a.type})")
        self._emit(call.fn, inputs, attrs, call, outputs)

