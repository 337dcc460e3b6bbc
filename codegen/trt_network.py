"""Plan -> a readable Python module that builds the model as a TensorRT network.

Python decides everything here: per-op records (validated identifiers, repr()'d names and
attribute values, the spec line each op came from), the network's inputs and their
optimization-profile ranges. `templates/network.py.j2` only lays the records out, in the
vocabulary of `codegen/trt_layers.py`. The lowering table `LOWER` maps each op kind to
its record builder and ends in an explicit "unhandled op" error naming the op and line.
"""

from __future__ import annotations

import keyword
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from kiln.dsl.checker import Instr, Plan, Program
from kiln.dsl.ops import ACTIVATIONS, HF_ACTIVATIONS

from .trt_layers import TrtLoweringError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


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
        self.names = _Names()
        self.tables: dict[str, str] = {}  # rope table code -> the variable holding it

    def arg(self, ref: str | None) -> str:
        """Code for an operand: a local variable, or `nn.weight('name')` for a weight."""
        if ref is None:
            return "None"
        if ref.startswith("w:"):
            slot = self.plan.weights[ref[2:]]
            return f"nn.weight({self.plan.alias_target(slot.name)!r})"
        return self.names(ref)

    def program(self, prog: Program) -> list[dict]:
        """Records grouped by the spec statement they came from (one comment per group), with a
        section header where the block copy (`layer.3`) changes."""
        groups: list[dict] = []
        for ins in prog.instrs:
            rec = self.instr(ins)
            frame = ins.outputs[0].rpartition("/")[0]
            if not groups or groups[-1]["comment"] != rec["comment"] or groups[-1]["frame"] != frame:
                section = frame if frame and (not groups or groups[-1]["frame"] != frame) else None
                groups.append({"comment": rec["comment"], "frame": frame, "section": section, "records": []})
            groups[-1]["records"].append(rec)
        return groups

    def instr(self, ins: Instr) -> dict:
        fn = LOWER.get(ins.kind)
        if fn is None:
            raise TrtLoweringError(f"{ins.op.pos}: op '{ins.kind}' has no TensorRT lowering "
                                   f"(in `{ins.op.text.strip()}`); known: {', '.join(sorted(LOWER))}")
        rec = fn(self, ins)
        pos = ins.op.pos
        rec.update(comment=f"{_short(pos.file)}:{pos.line}  {' '.join(ins.op.text.split())}",
                   out=", ".join(self.names(o) for o in ins.outputs),
                   args=[self.arg(i) for i in ins.inputs])
        return rec


def _short(file: str) -> str:
    p = Path(file)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _call(method: str, **kw) -> Callable[[_Lowerer, Instr], dict]:
    """A record for `out = nn.<method>(*operands, **attrs)`; kw maps keyword -> attr name."""
    def build(lw: _Lowerer, ins: Instr) -> dict:
        return {"macro": "call", "method": method,
                "kwargs": [(k, repr(ins.attrs[a])) for k, a in kw.items()]}
    return build


def _rmsnorm(lw: _Lowerer, ins: Instr) -> dict:
    record = _call("rmsnorm", eps="eps", offset="offset")(lw, ins)
    if ins.attrs.get("group"):  # a norm per run of `group` features (per head)
        record["kwargs"].append(("group", repr(ins.attrs["group"])))
    return record


def _act(lw: _Lowerer, ins: Instr) -> dict:
    fn = ins.kind if ins.kind in ACTIVATIONS else HF_ACTIVATIONS[ins.attrs["fn"]]
    return {"macro": "call", "method": "act", "kwargs": [("fn", repr(fn))]}


def _scale(lw: _Lowerer, ins: Instr) -> dict:
    factor = ins.attrs["factor"]
    if ins.attrs["round_factor"]:  # the factor as a run-dtype constant would hold it
        import torch

        from .trt_layers import TORCH_DTYPES
        factor = float(torch.tensor(factor, dtype=TORCH_DTYPES[lw.dtype]).float())
    return {"macro": "call", "method": "scale", "kwargs": [("factor", repr(factor))]}


def _rope(lw: _Lowerer, ins: Instr) -> dict:
    at = ins.attrs
    scaling = at["scaling"]
    if scaling is not None and scaling.kind == "dynamic":
        raise TrtLoweringError(f"{ins.op.pos}: rope with dynamic NTK scaling has per-sequence frequencies, "
                               f"which the TensorRT backend cannot tabulate (in `{ins.op.text.strip()}`)")
    rd = at["rotary_dim"] or at["head_dim"]
    code = f"nn.rope_table({rd!r}, {at['theta']!r}, {_scaling_code(scaling)}, {at['max_pos']!r})"
    table = lw.tables.setdefault(code, f"rope_table_{len(lw.tables)}")
    return {"macro": "call", "method": "rope",
            "kwargs": [("head_dim", repr(at["head_dim"])), ("rotary_dim", repr(rd)), ("layout", repr(at["layout"])),
                       ("table", table)]}


def _scaling_code(scaling) -> str:
    if scaling is None:
        return "None"
    fields = ", ".join(f"{k}={v!r}" for k, v in vars(scaling).items())
    return f"RopeScaling({fields})"


def _attention(lw: _Lowerer, ins: Instr) -> dict:
    site = lw.plan.sites[ins.site]
    at = ins.attrs
    scale = at["scale"] if at["scale"] is not None else at["head_dim"] ** -0.5
    kwargs = [("heads", site.heads), ("kv_heads", site.kv_heads), ("head_dim", site.head_dim),
              ("v_head_dim", site.v_head_dim), ("scale", scale), ("causal", at["causal"]),
              ("window", at["window"]), ("softcap", at["softcap"])]
    return {"macro": "attention", "site": site.index, "path": site.path,
            "kwargs": [(k, repr(v)) for k, v in kwargs]}


def _moe(lw: _Lowerer, ins: Instr) -> dict:
    experts = []
    for e, prog in enumerate(ins.experts):
        lw.names.ids[prog.inputs[0]] = lw.arg(ins.inputs[0])  # each expert reads the moe input
        experts.append({"index": e, "records": lw.program(prog), "result": lw.names(prog.output)})
    gates = lw.names(ins.outputs[0] + "__gates")
    return {"macro": "moe", "experts": experts, "gates": gates,
            "kwargs": [("top_k", repr(ins.attrs["top_k"])), ("renormalize", repr(ins.attrs["renormalize"])),
                       ("experts", repr(len(ins.experts)))]}


LOWER: dict[str, Callable[[_Lowerer, Instr], dict]] = {
    "embedding": _call("embedding"),
    "linear": _call("linear"),
    "rmsnorm": _rmsnorm,
    "layernorm": _call("layernorm", eps="eps"),
    "rope": _rope,
    "attention": _attention,
    "act": _act,
    **{name: _act for name in ACTIVATIONS},
    "softcap": _call("softcap", cap="cap"),
    "scale": _scale,
    "add": _call("add"),
    "sub": _call("sub"),
    "mul": _call("mul"),
    "split": _call("split", sizes="sizes"),
    "moe": _moe,
}


# ---------------------------------------------------------------- rendering


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render_network(plan: Plan, dtype: str, limits: Limits) -> str:
    """The network module's source for this plan (formatted when ruff or black is installed)."""
    lw = _Lowerer(plan, dtype)
    for name in plan.program.inputs:
        lw.names.ids[name] = name  # tokens / positions keep their names
    records = lw.program(plan.program)
    ios = io_tensors(plan, dtype, limits)
    spec = plan.spec
    text = _env().get_template("network.py.j2").render(
        spec_name=spec.name, spec_files=[_short(f) for f in spec.files], dtype=dtype, limits=limits,
        inputs=[io for io in ios if not io.output], records=records, result=lw.names(plan.program.output),
        program_inputs=list(plan.program.inputs), num_sites=len(plan.sites),
        tables=[(name, code) for code, name in lw.tables.items()],
        uses_rope_scaling=any(i.kind == "rope" and i.attrs["scaling"] is not None for i in _all(plan.program)),
    )
    return format_source(text)


def _all(prog: Program):
    for ins in prog.instrs:
        yield ins
        for p in ins.experts:
            yield from _all(p)


def format_source(text: str) -> str:
    """Run the text through ruff (or black) when one is installed; else keep the template's layout."""
    for cmd in (["ruff", "format", "--line-length", "110", "-"], ["black", "-q", "-l", "110", "-"]):
        exe = shutil.which(cmd[0])
        if exe is None:
            continue
        done = subprocess.run([exe, *cmd[1:]], input=text, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return done.stdout
    return text
