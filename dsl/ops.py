"""The op table: every dataflow op a spec can use, its operands, attributes and shape rule.

This is the single list every backend must spell; a backend's lowering table ends in
an explicit "unhandled op" error, so an op added here and nowhere else fails loudly.

Shapes are tuples of ints and the symbol "T" (tokens in the step). Dtypes are "float"
(the run dtype) or "int" (token ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

T = "T"


@dataclass(frozen=True)
class TType:
    shape: tuple[Any, ...]
    dtype: str = "float"

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


class ShapeError(Exception):
    """Raised by a shape rule; the checker turns it into a SpecError at the op."""


@dataclass(frozen=True)
class Attr:
    type: str  # int float bool str rope_scaling block (+ "?" = may be none)
    default: Any = ...  # ... = required

    @property
    def required(self) -> bool:
        return self.default is ...


@dataclass(frozen=True)
class OpSig:
    inputs: tuple[str, ...]  # operand names; a trailing "?" marks an optional operand
    attrs: dict[str, Attr]
    infer: Callable[[list[TType | None], dict[str, Any]], tuple[TType, ...]]
    doc: str
    outputs: int | str = 1  # or the name of the attr whose length gives the count


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ShapeError(msg)


def _act(x: TType | None) -> TType:
    _need(x is not None and x.dtype == "float" and len(x.shape) == 2 and x.shape[0] == T,
          f"expected activations float[T, n], got {x}")
    return x  # type: ignore[return-value]


def _same(ins, attrs):
    return (_act(ins[0]),)


def _binary(ins, attrs):
    a, b = _act(ins[0]), ins[1]
    _need(b is not None and b.dtype == "float", f"expected a float tensor, got {b}")
    ok = b.shape == a.shape or b.shape == (a.shape[1],)
    _need(ok, f"operands have shapes {a} and {b}; they must match (or the second be [{a.shape[1]}])")
    return (a,)


def _embedding(ins, attrs):
    ids, table = ins
    _need(ids is not None and ids.dtype == "int" and ids.shape == (T,), f"ids must be int[T], got {ids}")
    _need(table is not None and len(table.shape) == 2, f"table must be 2-D, got {table}")
    return (TType((T, table.shape[1])),)


def _linear(ins, attrs):
    x, w, b = _act(ins[0]), ins[1], ins[2]
    _need(w is not None and len(w.shape) == 2, f"weight must be 2-D [out, in], got {w}")
    _need(w.shape[1] == x.shape[1],
          f"input has {x.shape[1]} features but the weight is {w} ([out, in] expects in = {x.shape[1]})")
    if b is not None:
        _need(b.shape == (w.shape[0],), f"bias must be [{w.shape[0]}], got {b}")
    return (TType((T, w.shape[0])),)


def _norm(ins, attrs):
    x, w = _act(ins[0]), ins[1]
    group = attrs.get("group") or x.shape[1]  # rmsnorm(group=g): each run of g features on its own
    _need(group > 0 and x.shape[1] % group == 0,
          f"group must divide the {x.shape[1]} features, got {attrs.get('group')!r}")
    _need(w is not None and w.shape == (group,), f"norm weight must be [{group}], got {w}")
    if len(ins) > 2 and ins[2] is not None:
        _need(ins[2].shape == (x.shape[1],), f"norm bias must be [{x.shape[1]}], got {ins[2]}")
    return (x,)


def _heads(width: int, head_dim: int, what: str) -> int:
    _need(isinstance(head_dim, int) and head_dim > 0, f"head_dim must be a positive int, got {head_dim!r}")
    _need(width % head_dim == 0, f"{what} has {width} features, not a multiple of head_dim {head_dim}")
    return width // head_dim


def _rope(ins, attrs):
    x = _act(ins[0])
    hd = attrs["head_dim"]
    _heads(x.shape[1], hd, "input")
    rd = attrs.get("rotary_dim") or hd
    _need(isinstance(rd, int) and 0 < rd <= hd and rd % 2 == 0,
          f"rotary_dim must be an even int in (0, head_dim={hd}], got {rd!r}")
    _need(attrs["layout"] in ("half", "interleaved"), f"layout must be half or interleaved, got {attrs['layout']!r}")
    return (x,)


def _attention(ins, attrs):
    q, k, v = (_act(t) for t in ins)
    hd = attrs["head_dim"]
    hq, hk = _heads(q.shape[1], hd, "q"), _heads(k.shape[1], hd, "k")
    _need(hq % hk == 0, f"{hq} query heads cannot be grouped over {hk} kv heads")
    _need(v.shape[1] % hk == 0, f"v has {v.shape[1]} features, not a multiple of {hk} kv heads")
    w = attrs.get("window")
    _need(w is None or (isinstance(w, int) and w > 0), f"window must be a positive int or none, got {w!r}")
    return (TType((T, hq * (v.shape[1] // hk))),)


def _split(ins, attrs):
    x = _act(ins[0])
    sizes = attrs["sizes"]
    _need(isinstance(sizes, list) and all(isinstance(s, int) and s > 0 for s in sizes),
          f"sizes must be a list of positive ints, got {sizes!r}")
    _need(sum(sizes) == x.shape[1], f"sizes {sizes} add up to {sum(sizes)}, input has {x.shape[1]} features")
    return tuple(TType((T, s)) for s in sizes)


def _moe(ins, attrs):
    x, logits = _act(ins[0]), _act(ins[1])
    k = attrs["top_k"]
    _need(isinstance(k, int) and 0 < k <= logits.shape[1],
          f"top_k must be in 1..{logits.shape[1]} (the number of experts), got {k!r}")
    return (x,)


ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "sigmoid", "tanh")
# Hugging Face's activation names (hidden_act) -> Kiln's.
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu",
    "sigmoid": "sigmoid", "tanh": "tanh",
}

OPS: dict[str, OpSig] = {
    "embedding": OpSig(("ids", "table"), {}, _embedding, "rows of table [V, D] picked by ids [T]"),
    "linear": OpSig(("x", "weight", "bias?"), {}, _linear, "x @ weight^T + bias; weight is [out, in]"),
    "rmsnorm": OpSig(("x", "weight"), {"eps": Attr("float", 1e-6), "offset": Attr("float", 0.0),
                                       "group": Attr("int?", None)}, _norm,
                     "x / rms(x) * (offset + weight), computed in float32; with group=g, over each run of g "
                     "features (per head: group=head_dim, weight [g])"),
    "layernorm": OpSig(("x", "weight", "bias?"), {"eps": Attr("float", 1e-5)}, _norm,
                       "(x - mean) / std * weight + bias, computed in float32"),
    "rope": OpSig(("x",), {
        "head_dim": Attr("int"), "rotary_dim": Attr("int?", None), "theta": Attr("float", 10000.0),
        "layout": Attr("str", "half"), "scaling": Attr("rope_scaling?", None),
        "max_pos": Attr("int?", None),
    }, _rope, "rotary position embedding of every head of x at the tokens' positions"),
    "attention": OpSig(("q", "k", "v"), {
        "head_dim": Attr("int"), "scale": Attr("float?", None), "causal": Attr("bool", True),
        "window": Attr("int?", None), "softcap": Attr("float?", None),
    }, _attention, "multi-head attention over the sequence so far (reads and appends the KV cache)"),
    "act": OpSig(("x",), {"fn": Attr("str")}, _same, "an activation named by a string (HF names accepted)"),
    "softcap": OpSig(("x",), {"cap": Attr("float")}, _same, "cap * tanh(x / cap)"),
    "scale": OpSig(("x",), {"factor": Attr("float"), "round_factor": Attr("bool", False)}, _same,
                   "x * factor (written `x * c` in specs); round_factor=true first rounds factor to the "
                   "run dtype, as a framework does that multiplies by a constant tensor of that dtype"),
    "add": OpSig(("a", "b"), {}, _binary, "a + b (written `a + b`)"),
    "sub": OpSig(("a", "b"), {}, _binary, "a - b (written `a - b`)"),
    "mul": OpSig(("a", "b"), {}, _binary, "a * b (written `a * b`)"),
    "split": OpSig(("x",), {"sizes": Attr("list")}, _split, "split features into consecutive parts",
                   outputs="sizes"),
    "moe": OpSig(("x", "logits"), {
        "experts": Attr("block"), "top_k": Attr("int"), "renormalize": Attr("bool", True),
    }, _moe, "mixture of experts: softmax router, top-k experts per token, weighted sum"),
}
for _name in ACTIVATIONS:
    OPS[_name] = OpSig(("x",), {}, _same, f"{_name} activation")

INFIX = {"+": "add", "-": "sub", "*": "mul"}
