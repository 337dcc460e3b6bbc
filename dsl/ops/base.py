"""What an op definition is made of: its signature, shape rule, reference semantics, and how
each backend lowers it. The definitions themselves live beside this file, one module per family
of ops; dsl/ops/__init__.py gathers them into the closed table `OPS` keyed by `OpKind`.

Shapes are tuples of ints and the symbol "T" (tokens in the step). Dtypes are "float" (the run
dtype), "int" (token ids), or a weight's storage dtype ("int8", "fp8", ...), which no op reads
as a float: a quantized weight reaches an op only through its quantization descriptor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, make_dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch

    from ..plan import Instr, Plan, Program

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
    type: str  # int float bool str list rope_scaling block (+ "?" = may be none)
    default: Any = ...  # ... = required

    @property
    def required(self) -> bool:
        return self.default is ...


# ---------------------------------------------------------------- the reference backend


class RefContext(Protocol):
    """What a reference implementation may use beyond its operands: the step being run."""

    positions: "torch.Tensor"  # [T] int64, absolute position of each token
    seq_len: "torch.Tensor"  # [T] int64, its sequence's length after this step (dynamic rope)
    batch: Any  # runtime.batch.StepBatch: the step's sequences (start, length, context, block table)
    # runtime.kv_store.KVStore: the paged K/V of every attention site, and beside it `kv.state`
    # (runtime.state_cache.StateStore): the per-sequence recurrent state of every state site
    kv: Any

    def run(self, program: "Program", inputs: dict) -> "torch.Tensor": ...


# ---------------------------------------------------------------- the cuda backend


class Kernel(enum.Enum):
    """The kernel families codegen/render.py has templates for (one `*.cu.j2` each)."""

    NORM = "norm"  # rms/layer norm, optionally with the residual add before it
    ROPE_KV = "rope_kv"  # rotary on q and k + the paged K/V write: only in front of an attention
    ATTENTION = "attention"  # paged decode and varlen prefill attention
    ACT = "act"  # an activation, optionally gated (act(g) * u)
    EMBED = "embed"  # rows of an embedding table
    MAP = "map"  # y = f(x) elementwise, f the body template an op names (map_softcap.cu.j2, ...)
    MOE = "moe"  # the experts of a moe as grouped GEMMs over token copies sorted by expert (moe_gemm.cu.j2)
    SSM = "ssm"  # a state-space op reading / writing its per-sequence state slots (ssm_conv / ssm_scan.cu.j2)


@dataclass(frozen=True)
class KernelCall:
    """Lower to a generated kernel of `kernel`'s family, specialised on `constants` (the kernel
    spec's fields; codegen adds the run dtype, page size and origin)."""

    kernel: Kernel
    constants: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Gemm:
    """Lower to a cuBLAS GEMM (x @ W^T + b); sibling GEMMs that share an input fuse."""


@dataclass(frozen=True)
class Torch:
    """Run the op's reference implementation on the GPU; `why` says why no kernel is generated."""

    why: str


CudaLowering = KernelCall | Gemm | Torch

# ---------------------------------------------------------------- the tensorrt backend


@dataclass(frozen=True)
class TrtLowering:
    """The op in TensorRT layers.

    `build(nn, *operands, **kwargs)` defines the layers on the network helper `nn`
    (codegen/trt_layers.Network: casts, elementwise, reductions, shuffles, the KV-cache plumbing);
    the generated network.py calls it as `nn.op(OpKind.X, *operands, **kwargs)`.
    `kwargs(ins, lw)` gives the keyword arguments as Python source text (`lw.table(code)` names a
    table shared by several ops). `unsupported(ins)`, if set, returns why this instance cannot be
    expressed; `kiln check --backend tensorrt` reports it at the op's spec line.
    """

    build: Callable[..., Any]
    kwargs: Callable[[Any, Any], list[tuple[str, str]]]
    unsupported: Callable[[Any], str | None] | None = None
    macro: str = "call"  # how network.py.j2 lays it out: "call", or "moe" (expert programs inline)


def attr_kwargs(*names: str) -> Callable[[Any, Any], list[tuple[str, str]]]:
    """kwargs for a TrtLowering: these attributes, repr'd."""
    def kw(ins, lw) -> list[tuple[str, str]]:
        return [(n, repr(getattr(ins.attrs, n))) for n in names]
    return kw


# ---------------------------------------------------------------- the definition


@dataclass(frozen=True)
class OpDef:
    """Everything about one op, in one place.

    - `inputs`: operand names; a trailing "?" marks an optional operand. `attrs`: name -> Attr.
    - `infer(types, attrs)`: the shape and dtype rule (raise ShapeError); output types.
    - `reference(ctx, ins, args)`: the meaning, in torch ops (the oracle every backend matches).
    - `cuda(ins, plan, dtype)`: a KernelCall, Gemm or Torch(why), for the run dtype (a torch dtype).
    - `trt`: a TrtLowering, or a string saying why TensorRT cannot express the op at all.
    - `check_attrs(attrs)`: extra validation of attribute values (raise ShapeError).
    - `state(types, attrs)`: for an op that carries a per-sequence recurrent state across steps
      (dsl/ops/ssm.py), the state's shape and dtype ("float": the run dtype, or "fp32") as a TType;
      the checker gives each such instruction a state site (dsl/plan.StateSite). None: stateless.
    - `mixes_rows`: the op combines the rows (tokens) of a sequence (attention, the causal conv, the
      scan); every other op treats each row alone, so after the last op that mixes rows a backend
      computes only the rows whose logits are wanted (runtime/cuda_backend.py).
    """

    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Attr]
    infer: Callable[[list[TType | None], Any], tuple[TType, ...]]
    doc: str
    reference: Callable[[RefContext, "Instr", list], Any]
    cuda: Callable[["Instr", "Plan", "torch.dtype"], CudaLowering]
    trt: TrtLowering | str
    outputs: int | str = 1  # or the name of the attr whose length gives the count
    check_attrs: Callable[[Any], None] | None = None
    state: Callable[[list[TType | None], Any], TType] | None = None
    mixes_rows: bool = False
    attrs_type: type = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # The frozen attribute record instructions carry: `ins.attrs.eps`, hashable, comparable.
        fields = [(n, Any) for n in self.attrs]
        object.__setattr__(self, "attrs_type", make_dataclass(f"{self.name}_attrs", fields, frozen=True))

    def make_attrs(self, values: dict[str, Any]):
        rec = self.attrs_type(**{n: tuple(v) if isinstance(v, list) else v for n, v in values.items()})
        if self.check_attrs is not None:
            self.check_attrs(rec)
        return rec


def torch_only(why: str) -> Callable[[Any, Any], Torch]:
    return lambda ins, plan, dt: Torch(why)


# ---------------------------------------------------------------- shape-rule helpers


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ShapeError(msg)


def act(x: TType | None) -> TType:
    need(x is not None and x.dtype == "float" and len(x.shape) == 2 and x.shape[0] == T,
         f"expected activations float[T, n], got {x}")
    return x  # type: ignore[return-value]


def same(ins, attrs):
    return (act(ins[0]),)


def float_weight(w: TType | None, what: str) -> TType:
    need(w is not None, f"{what} is absent")
    need(w.dtype == "float", f"{what} is stored as {w.dtype}, which no op reads directly (quantized weights "
                             f"are read through a quantization scheme)")
    return w


def heads(width: int, head_dim: int, what: str) -> int:
    need(isinstance(head_dim, int) and head_dim > 0, f"head_dim must be a positive int, got {head_dim!r}")
    need(width % head_dim == 0, f"{what} has {width} features, not a multiple of head_dim {head_dim}")
    return width // head_dim
