"""Source text -> surface syntax tree (`SpecAst`), with positions on every node.

Grammar rule aliases are the methods of `ToAst`; syntax errors are classified by
lark's `match_examples` into messages a spec author can act on.
"""

from __future__ import annotations

import ast as pyast
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ir
from .errors import Pos, SpecError

_PARSER = Lark(
    (Path(__file__).parent / "grammar.lark").read_text(),
    parser="lalr",
    propagate_positions=True,
    maybe_placeholders=True,
)


@dataclass(frozen=True)
class Assign:
    targets: tuple[str, ...]
    value: ir.Expr
    pos: Pos
    text: str


@dataclass(frozen=True)
class Return:
    value: ir.Expr
    pos: Pos
    text: str


@dataclass(frozen=True)
class ForwardDecl:
    inputs: tuple[str, ...]
    stmts: tuple[Assign | Return, ...]
    pos: Pos


@dataclass(frozen=True)
class BlockDecl:
    name: str
    count: ir.Expr | None
    weights: tuple[ir.Weight, ...]
    forward: ForwardDecl | None
    pos: Pos
    drops: tuple[tuple[str, Pos], ...] = ()  # inherited weights this block removes


@dataclass
class SpecAst:
    name: str
    extends: str | None
    pos: Pos
    file: str
    architectures: tuple[str, ...] | None = None
    gguf: tuple[str, tuple[str, ...]] | None = None
    ignore: list[str] = field(default_factory=list)
    params: list[ir.Param] = field(default_factory=list)
    weights: list[ir.Weight] = field(default_factory=list)
    blocks: list[BlockDecl] = field(default_factory=list)
    forward: ForwardDecl | None = None
    drops: list[tuple[str, Pos]] = field(default_factory=list)  # inherited declarations removed
    requires: list[ir.Require] = field(default_factory=list)  # conditions a config must meet


def _pos(file: str, meta_or_tok) -> Pos:
    if isinstance(meta_or_tok, Token):
        end = meta_or_tok.end_column if meta_or_tok.end_line == meta_or_tok.line else None
        return Pos(file, meta_or_tok.line, meta_or_tok.column, end)
    m = meta_or_tok
    if getattr(m, "empty", False):
        return Pos(file, 0, 0)
    end = m.end_column if m.end_line == m.line else None
    return Pos(file, m.line, m.column, end)


@v_args(meta=True)
class ToAst(Transformer):
    def __init__(self, file: str, text: str):
        super().__init__()
        self.file = file
        self.text = text

    def p(self, x) -> Pos:
        return _pos(self.file, x)

    # ---- expressions
    def name(self, meta, c):
        return ir.Name(str(c[0]), self.p(c[0]))

    def number(self, meta, c):
        s = str(c[0])
        value = int(s) if s.isdigit() else float(s)
        return ir.Const(value, self.p(c[0]))

    def string(self, meta, c):
        return ir.Const(pyast.literal_eval(str(c[0])), self.p(c[0]))

    def true(self, meta, c):
        return ir.Const(True, self.p(meta))

    def false(self, meta, c):
        return ir.Const(False, self.p(meta))

    def none(self, meta, c):
        return ir.Const(None, self.p(meta))

    def list(self, meta, c):
        return ir.ListExpr(tuple(x for x in c if x is not None), self.p(meta))

    def cond(self, meta, c):
        then, test, other = c
        return ir.Cond(test, then, other, self.p(meta))

    def or_(self, meta, c):
        return ir.BinOp("or", c[0], c[1], self.p(meta))

    def and_(self, meta, c):
        return ir.BinOp("and", c[0], c[1], self.p(meta))

    def not_(self, meta, c):
        return ir.UnOp("not", c[0], self.p(meta))

    def neg(self, meta, c):
        return ir.UnOp("-", c[0], self.p(meta))

    def compare(self, meta, c):
        return ir.BinOp(str(c[1]), c[0], c[2], self.p(c[1]))

    def contains(self, meta, c):
        return ir.BinOp("in", c[0], c[1], self.p(meta))

    def not_contains(self, meta, c):
        return ir.BinOp("not in", c[0], c[1], self.p(meta))

    def binop(self, meta, c):
        return ir.BinOp(str(c[1]), c[0], c[2], self.p(c[1]))

    def pow(self, meta, c):
        return ir.BinOp("**", c[0], c[2], self.p(c[1]))

    def call(self, meta, c):
        fn, rest = c[0], [x for x in c[1:] if x is not None]
        args = tuple(a for a in rest if not isinstance(a, tuple))
        kwargs = tuple(a for a in rest if isinstance(a, tuple))
        seen = set()
        for k, _, kpos in kwargs:
            if k in seen:
                raise SpecError(f"keyword argument '{k}' given twice", kpos)
            seen.add(k)
        if any(isinstance(a, tuple) for a in rest[: len(args)]):
            pass
        first_kw = next((i for i, a in enumerate(rest) if isinstance(a, tuple)), len(rest))
        if any(not isinstance(a, tuple) for a in rest[first_kw:]):
            bad = next(a for a in rest[first_kw:] if not isinstance(a, tuple))
            raise SpecError("positional argument after a keyword argument", bad.pos,
                            "put tensor operands first, then attributes as name=value")
        return ir.Call(str(fn), args, kwargs, self.p(fn))

    def kwarg(self, meta, c):
        return (str(c[0]), c[1], self.p(c[0]))

    def index(self, meta, c):
        return ir.Index(c[0], tuple(c[1:]), self.p(meta))

    def slice(self, meta, c):
        return ir.Slice(c[0], c[1], self.p(meta))

    def attr(self, meta, c):
        return ir.Attr(c[0], str(c[1]), self.p(c[1]))

    # ---- statements
    def _text(self, meta) -> str:
        return " ".join(self.text[meta.start_pos:meta.end_pos].split())

    def assign(self, meta, c):
        return Assign(tuple(str(t) for t in c[:-1]), c[-1], self.p(meta), self._text(meta))

    def ret(self, meta, c):
        return Return(c[0], self.p(meta), self._text(meta))

    def forward(self, meta, c):
        names = tuple(str(t) for t in c if isinstance(t, Token))
        stmts = tuple(s for s in c if isinstance(s, (Assign, Return)))
        return ForwardDecl(names, stmts, self.p(meta))

    # ---- declarations
    def header(self, meta, c):
        return ("header", str(c[0]), str(c[1]) if c[1] is not None else None, self.p(c[0]))

    def architectures(self, meta, c):
        return ("architectures", tuple(pyast.literal_eval(str(t)) for t in c), self.p(meta))

    def gguf(self, meta, c):
        return ("gguf", pyast.literal_eval(str(c[0])), tuple(str(t) for t in c[1:]), self.p(meta))

    def ignore(self, meta, c):
        return ("ignore", tuple(pyast.literal_eval(str(t)) for t in c), self.p(meta))

    def type(self, meta, c):
        return (str(c[0]), c[1] is not None, self.p(c[0]))

    def keypath(self, meta, c):
        return ".".join(str(t) for t in c)

    def binding(self, meta, c):
        *keys, optional, null = c[1:]
        return tuple(keys), optional is not None, null

    def param(self, meta, c):
        name, (tname, optional, tpos), default, binding = c
        keys, key_optional, null = binding if binding else ((), True, None)
        if tname not in ir.PARAM_TYPES:
            raise SpecError(f"unknown parameter type '{tname}'", tpos,
                            "types are " + ", ".join(ir.PARAM_TYPES) + " (append ? to allow none)")
        if null is not None and not optional:
            raise SpecError(f"'null=none' binds none, but parameter '{name}' has type {tname}", self.p(null),
                            f"declare it as {tname}? to allow none")
        return ir.Param(str(name), tname, optional, default, keys, key_optional, self.p(name), null is not None)

    def shape(self, meta, c):
        return tuple(x for x in c if x is not None)

    def weight(self, meta, c):
        name, shape, dtype, _, source = c
        dt = str(dtype) if dtype is not None else "float"
        if dt not in ir.WEIGHT_DTYPES:
            raise SpecError(f"unknown weight dtype '{dt}'", self.p(dtype),
                            "dtypes are " + ", ".join(ir.WEIGHT_DTYPES))
        return ir.Weight(str(name), shape, dt, source, "", self.p(name))

    def weights(self, meta, c):
        prefix = pyast.literal_eval(str(c[0])) if c[0] is not None else ""
        return ("weights", prefix, [
            ir.Weight(w.name, w.shape, w.dtype, w.source, prefix, w.pos) for w in c[1:]
        ], self.p(meta))

    def require(self, meta, c):
        name, test, message = c
        if not (isinstance(message, ir.Const) and isinstance(message.value, str)):
            raise SpecError("the message of a require must be a string", message.pos,
                            'require CONDITION, "what the spec does not implement"')
        if not message.value.strip():
            raise SpecError("the message of a require is empty", message.pos,
                            "say what the config asks for that the spec does not implement")
        # The condition's source span: after `require [NAME:]`, up to the last top-level comma.
        start = (name.end_pos if name is not None else meta.start_pos + len("require"))
        start = self.text.index(":", start) + 1 if name is not None else start
        end, depth, quoted, comment = start, 0, False, False
        for i in range(start, meta.end_pos):
            ch = self.text[i]
            if comment:
                comment = ch != "\n"
            elif quoted:
                quoted = ch != '"'
            elif ch == '"':
                quoted = True
            elif ch == "#":
                comment = True
            elif ch in "([":
                depth += 1
            elif ch in ")]":
                depth -= 1
            elif ch == "," and depth == 0:
                end = i
        src = self.text[start:end]
        text = " ".join(_strip_comments(src).split())
        lead = len(src) - len(src.lstrip())
        first = start + lead
        last = start + len(src.rstrip())
        line = self.text.count("\n", 0, first) + 1
        col = first - (self.text.rfind("\n", 0, first) + 1) + 1
        same_line = "\n" not in self.text[first:last]
        pos = Pos(self.file, line, col, col + (last - first) if same_line else None)
        return ir.Require(str(name) if name is not None else None, test, message.value, text, pos,
                          self.p(name) if name is not None else None)

    def drop(self, meta, c):
        return ("drop", tuple((str(t), self.p(t)) for t in c), self.p(meta))

    def block(self, meta, c):
        name, count, *body = c
        weights = [w for sec in body if isinstance(sec, tuple) and sec[0] == "weights" for w in sec[2]]
        drops = [d for sec in body if isinstance(sec, tuple) and sec[0] == "drop" for d in sec[1]]
        forwards = [f for f in body if isinstance(f, ForwardDecl)]
        if len(forwards) > 1:
            raise SpecError(f"block '{name}' has two forward sections", forwards[1].pos)
        return BlockDecl(str(name), count, tuple(weights), forwards[0] if forwards else None,
                         self.p(name), tuple(drops))

    def start(self, meta, c):
        _, name, extends, pos = c[0]
        spec = SpecAst(name, extends, pos, self.file)
        for item in c[1:]:
            if isinstance(item, ir.Param):
                spec.params.append(item)
            elif isinstance(item, ir.Require):
                spec.requires.append(item)
            elif isinstance(item, BlockDecl):
                spec.blocks.append(item)
            elif isinstance(item, ForwardDecl):
                if spec.forward is not None:
                    raise SpecError("a spec has one top-level forward", item.pos,
                                    "repeated computation belongs in a block")
                spec.forward = item
            elif item[0] == "architectures":
                spec.architectures = item[1]
            elif item[0] == "gguf":
                spec.gguf = (item[1], item[2])
            elif item[0] == "ignore":
                spec.ignore.extend(item[1])
            elif item[0] == "weights":
                spec.weights.extend(item[2])
            elif item[0] == "drop":
                spec.drops.extend(item[1])
        if extends is None:
            dropped = spec.drops + [d for b in spec.blocks for d in b.drops]
            if dropped:
                raise SpecError(f"'drop {dropped[0][0]}': drop removes what a base spec declares, and "
                                f"spec '{name}' extends none", dropped[0][1],
                                "write `spec NAME extends BASE`, or delete the declaration instead")
        return spec

    def __default__(self, data, children, meta):  # pragma: no cover - grammar and ToAst agree
        raise SpecError(f"internal: unhandled grammar rule '{data}'", self.p(meta))


# Examples of broken specs, each classified into one message (lark's match_examples).
_SYNTAX_EXAMPLES = {
    "a spec starts with `spec NAME`": ["param x: int = 1", "weights {}"],
    "parameter needs a type: `param NAME: TYPE = DEFAULT`": [
        "spec a param x = 1", "spec a param x int = 1",
    ],
    "parameter needs a default value: `param NAME: TYPE = DEFAULT <- config_key`": [
        "spec a param x: int <- key", "spec a param x: int", "spec a param x: int param",
        "spec a param x: int = ",
    ],
    "a weight is `name: [dims] <- source`": [
        "spec a weights { w <- \"x\" }", "spec a weights { w: [1] \"x\" }",
        "spec a weights { w: 1 <- \"x\" }", "spec a weights { w: [1] }",
        "spec a weights { w: [1] float }",
    ],
    "unbalanced brackets or parentheses": [
        "spec a forward(x) { y = f(x }", "spec a forward(x) { y = f(x)) }",
        "spec a forward(x) { return f(g(x, y) }", "spec a forward(x) { return f(g(x), y }",
        "spec a forward(x) { y = f(x, a=1 }", "spec a forward(x) { y = (x }",
        "spec a param x: int = (1", "spec a weights { w: [1, 2 <- \"x\" }",
    ],
    "missing closing brace `}`": [
        "spec a forward(x) { return x", "spec a weights { w: [1] <- \"x\"",
        "spec a block b { forward(x) { return x }",
    ],
    "a statement is `name = expression` or `return expression`": [
        "spec a forward(x) { f(x) }", "spec a forward(x) { y == x }",
        "spec a forward(x) { 1 = x }", "spec a forward(x) { y = }",
    ],
    'a require is `require CONDITION, "message"` (a top-level declaration)': [
        "spec a require x", "spec a require x: y", "spec a require", "spec a require, \"m\"",
        "spec a block b { require x, \"m\" }", "spec a forward(x) { require x, \"m\" }",
    ],
    "a reserved word cannot be used as a name": [
        "spec a param if: int = 1", "spec a forward(x) { return = x }",
        "spec a param none: int = 1", "spec a weights { block: [1] <- \"x\" }",
    ],
}


def _strip_comments(src: str) -> str:
    """Source text without its `#` comments (strings have no escapes and no newlines)."""
    out, quoted = [], False
    for line in src.split("\n"):
        keep = []
        for ch in line:
            if ch == '"':
                quoted = not quoted
            elif ch == "#" and not quoted:
                break
            keep.append(ch)
        out.append("".join(keep))
        quoted = False
    return "\n".join(out)


def parse_text(text: str, file: str = "<string>") -> SpecAst:
    try:
        tree = _PARSER.parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    try:
        return ToAst(file, text).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc.with_source(text) from None
        raise


def _state_key(e: UnexpectedInput) -> tuple | None:
    state = getattr(e, "state", None)
    position = getattr(state, "position", None)
    if position is None:
        return None
    token = getattr(e, "token", None)
    return position, getattr(token, "type", None)


def _example_table() -> dict:
    """Like lark's match_examples, keyed on the LALR state at the error (the top of the
    stack, not the whole stack), so an example matches wherever in a spec it occurs."""
    exact: dict = {}
    by_state: dict = {}
    for label, examples in _SYNTAX_EXAMPLES.items():
        for text in examples:
            try:
                _PARSER.parse(text)
            except UnexpectedInput as e:
                key = _state_key(e)
                if key is not None:
                    exact.setdefault(key, label)
                    by_state.setdefault(key[0], label)
    return {"exact": exact, "state": by_state}


_TABLE: dict | None = None


def _classify(e: UnexpectedInput) -> str | None:
    global _TABLE
    if _TABLE is None:
        _TABLE = _example_table()
    key = _state_key(e)
    if key is None:
        return None
    return _TABLE["exact"].get(key) or _TABLE["state"].get(key[0])


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> SpecError:
    label = _classify(e)
    line, col = getattr(e, "line", 0) or 0, getattr(e, "column", 0) or 0
    if isinstance(e, UnexpectedEOF) or line <= 0:
        lines = text.rstrip().splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
    if isinstance(e, UnexpectedCharacters):
        found = f"unexpected character {text[e.pos_in_stream]!r}"
    elif isinstance(e, UnexpectedToken):
        tok = e.token
        found = "unexpected end of file" if tok.type == "$END" else f"unexpected {str(tok)!r}"
    else:
        found = "unexpected end of file"
    expected = sorted(getattr(e, "expected", None) or getattr(e, "allowed", None) or [])
    hint = None
    if expected:
        shown = [_TOKEN_NAMES.get(t, t.lower()) for t in expected][:8]
        hint = "expected " + ", ".join(shown)
    message = f"syntax error: {found}" + (f" ({label})" if label else "")
    return SpecError(message, Pos(file, line, col), hint, source=text)


_TOKEN_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "LBRACE": "'{'",
    "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "COLON": "':'", "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/', '//' or '%'",
    "CMP_OP": "a comparison", "DOT": "'.'", "IF": "if", "AND": "and", "OR": "or", "EQUAL": "'='", "COMMA": "','",
    "ARROW": "'<-'", "$END": "end of file",
}
