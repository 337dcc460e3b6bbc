"""Quantized checkpoints: which weights a checkpoint stores quantized, and reading them as QWeights.

A `Format` answers two questions for the loader (runtime/weights.py): `descs(plan)` — the
QuantDesc of each weight slot the checkpoint stores quantized (the `quantize` pass takes them as
its `only`) — and `load(slot)` — that slot's `QWeight` from the checkpoint's tensors. `detect`
picks the format from the checkpoint (config.json's `quantization_config`, or a GGUF file whose
blocks the user asked to keep with `--quantization gguf`); an unknown scheme is one error
naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import torch
from kiln.dsl.plan import Plan, WeightSlot
from kiln.dsl.quant import GGML_BLOCK, QuantDesc, QWeight
from kiln.dsl.sources import Tensor

from .checkpoint import Checkpoint, CheckpointError


class Format(Protocol):
    scheme: str  # the dsl/quant.py scheme this checkpoint's weights follow

    def descs(self, plan: Plan) -> dict[str, QuantDesc]: ...

    def load(self, slot: WeightSlot) -> QWeight: ...

    def tensors_of(self, name: str) -> tuple[str, ...]:
        """The checkpoint tensors that hold the quantized weight `name` (its scales, zeros, ...)."""
        ...

    def kv_scales(self, plan: Plan) -> dict[int, tuple[float, float]]:
        """Calibrated fp8 KV cache scales {attention site: (k_scale, v_scale)} (none: {})."""
        ...

    kv_tensors: tuple[str, ...]  # the checkpoint tensors kv_scales read (not weights, not unexpected)


def detect(ckpt: Checkpoint, quantization: str) -> Format | None:
    """The checkpoint's quantized format, or None for a float checkpoint."""
    if ckpt.format == "gguf":
        return GgufBlocks(ckpt) if quantization == "gguf" else None
    qc = (ckpt.config or {}).get("quantization_config")
    hf_quant = _read_hf_quant_config(ckpt)
    if qc is None and hf_quant is None:
        return None
    where = f"{ckpt.path}: config.json quantization_config"
    if qc is None:  # ModelOpt writes its own file, sometimes without a quantization_config
        return ModelOptFp8(ckpt, hf_quant.get("quantization", hf_quant), f"{ckpt.path}/hf_quant_config.json")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where} must be an object, not {type(qc).__name__}")
    method = qc.get("quant_method")
    if method not in FORMATS:
        raise CheckpointError(f"{where}.quant_method {method!r} is not supported; supported: "
                              + ", ".join(FORMATS))
    if method == "modelopt":
        return ModelOptFp8(ckpt, qc.get("quantization", qc), where)
    return FORMATS[method](ckpt, qc, where)


def _read_hf_quant_config(ckpt: Checkpoint) -> dict | None:
    from pathlib import Path

    from .checkpoint import read_json

    path = Path(ckpt.path) / "hf_quant_config.json"
    return read_json(path, "ModelOpt quantization config") if path.is_file() else None


def source_tensor(slot: WeightSlot) -> str:
    """The one checkpoint tensor a quantized slot is read from (quantized weights are taken whole:
    a slice, concatenation or transpose of packed values is not the same packing)."""
    if not isinstance(slot.source, Tensor):
        raise CheckpointError(f"weight '{slot.name}' ({slot.decl.pos}) is built from {slot.source!r}; a quantized "
                              f"weight must be one checkpoint tensor")
    return slot.source.name


class GgufBlocks:
    """A GGUF file's quantized tensors kept as their ggml blocks."""

    scheme = "gguf"
    kv_tensors: tuple[str, ...] = ()

    def kv_scales(self, plan: Plan) -> dict[int, tuple[float, float]]:
        return {}

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def descs(self, plan: Plan) -> dict[str, QuantDesc]:
        from kiln.dsl.passes import quantizable

        out = {}
        for name in sorted(quantizable(plan)):
            slot = plan.weights[name]
            if slot.source is None or not isinstance(slot.source, Tensor):
                continue
            kind = self.ckpt.info(slot.source.name).dtype.lower()
            if kind in GGML_BLOCK:
                out[name] = QuantDesc(f"gguf_{kind}", "blocks", GGML_BLOCK[kind][0])
        return out

    def tensors_of(self, name: str) -> tuple[str, ...]:
        return (name,)

    def load(self, slot: WeightSlot) -> QWeight:
        data, kind = self.ckpt.blocks(source_tensor(slot))
        values, size = GGML_BLOCK[kind]
        out, n_in = slot.shape
        if data.shape != (out, n_in // values * size):
            raise CheckpointError(f"tensor '{slot.source.name}' in {self.ckpt.path}: {kind} blocks of shape "
                                  f"{list(data.shape)} do not hold weight '{slot.name}' {list(slot.shape)}")
        return QWeight(slot.quant, slot.shape, data.clone(), torch.empty(0))  # clone: data is the file's map


# ---------------------------------------------------------------- shared by the formats below

_INT4_SHIFTS = tuple(range(0, 32, 4))
# AutoAWQ packs output columns 8c + [0, 2, 4, 6, 1, 3, 5, 7] into nibbles 0..7 of word c (so that
# its GEMM kernel's dequantization unpacks pairs with one shift); column j sits in nibble
# _AWQ_NIBBLE[j] (vLLM's AWQ_REVERSE_ORDER).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_NIBBLE = tuple(AWQ_ORDER.index(j) for j in range(8))


def unpack_int32_nibbles(p: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 words -> their eight 4-bit values (0..15) as uint8, 8 values per word along `dim`:
    value j of each word is its nibble order[j] (bits 4 * order[j] .. 4 * order[j] + 3)."""
    w = p.to(torch.int32).movedim(dim, -1)
    vals = torch.stack([(w >> (4 * order[j])) & 0xF for j in range(8)], dim=-1)
    return vals.reshape(*w.shape[:-1], w.shape[-1] * 8).movedim(-1, dim).to(torch.uint8).contiguous()


def pack_int32_nibbles(v: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """The inverse of unpack_int32_nibbles: values 0..15 along `dim` -> int32 words."""
    x = v.to(torch.int64).movedim(dim, -1)
    x = x.reshape(*x.shape[:-1], x.shape[-1] // 8, 8)
    word = sum(x[..., j] << (4 * order[j]) for j in range(8))
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)  # the same 32 bits, as a signed int32
    return word.to(torch.int32).movedim(-1, dim).contiguous()


KV_MEANS_NAME = "kiln_kv_means.json"  # `kiln quantize --scheme fp8-kv`'s mean keys (quantize.kv_means_json)


def read_kv_means(ckpt: Checkpoint, plan: Plan) -> dict[int, tuple[float, ...]]:
    """A checkpoint folder's kiln_kv_means.json as {attention site: its mean key per channel, kv_heads x head_dim
    floats}, for --kv-cache-dtype fp8-rotated; {} without the file (the keys then lose nothing: zero means)."""
    path = Path(ckpt.path) / KV_MEANS_NAME
    if not Path(ckpt.path).is_dir() or not path.is_file():
        return {}
    try:
        modules = json.loads(path.read_text())["modules"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a KV means file ({e})") from None
    if not isinstance(modules, dict):
        raise CheckpointError(f"{path}: 'modules' must map attention modules to their mean keys")
    out = {}
    for site, module in attention_modules(plan).items():
        s = plan.sites[site]
        rows = modules.get(module)
        if rows is None:
            raise CheckpointError(f"{path}: no mean key for attention module '{module}' (site {site})")
        flat = [x for row in rows for x in row] if isinstance(rows, list) and all(isinstance(r, list) for r in rows) \
            else None
        if flat is None or len(rows) != s.kv_heads or len(flat) != s.kv_heads * s.head_dim \
                or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in flat):
            raise CheckpointError(f"{path}: the mean key of '{module}' must be {s.kv_heads} rows of {s.head_dim} "
                                  f"finite numbers (kv_heads x head_dim)")
        out[site] = tuple(float(x) for x in flat)
    return out


def attention_modules(plan: Plan) -> dict[int, str]:
    """Attention site -> the checkpoint module it belongs to: the parent of the linear its keys
    come from ('model.layers.0.self_attn' for keys made by '...self_attn.k_proj.weight', fused
    QKV projections alike), found by walking the dataflow back from the attention's key input.
    Calibrated KV cache scales are stored under that module ('...self_attn.k_scale')."""
    from kiln.dsl.ops import OpKind
    from kiln.dsl.plan import Value, WeightArg

    producer = {o: ins for ins in plan.program.walk() for o in ins.outputs}
    out = {}
    for ins in plan.program.walk():
        if ins.kind is not OpKind.ATTENTION:
            continue
        todo, seen, found = [ins.inputs[1]], set(), None
        while todo and found is None:  # breadth first: the nearest linear
            v = todo.pop(0)
            p = producer.get(v)
            if p is None or v in seen:
                continue
            seen.add(v)
            if p.kind is OpKind.LINEAR and isinstance(p.inputs[1], WeightArg):
                found = _first_tensor(plan.weights[plan.alias_target(p.inputs[1].name)].source)
                continue
            todo += [a for a in p.inputs if isinstance(a, Value)]
        if found is None or "." not in found.removesuffix(".weight"):
            raise CheckpointError(f"attention site {ins.site} ({plan.sites[ins.site].path}): its keys come from no "
                                  f"checkpoint linear, so its KV cache scales have no module to be stored under")
        out[ins.site] = found.removesuffix(".weight").rsplit(".", 1)[0]
    return out


def _first_tensor(src) -> str | None:
    """The checkpoint tensor a weight source is built from (its first, for a concatenation)."""
    while src is not None and not isinstance(src, Tensor):
        src = getattr(src, "src", None) or (getattr(src, "srcs", None) or (None,))[0]
    return src.name if src is not None else None


def linear_modules(plan: Plan, lm_head: bool = False) -> dict[str, str]:
    """Quantizable weight slot -> the checkpoint module it comes from ('...q_proj' for the
    tensor '...q_proj.weight'): quantized checkpoints name a linear's tensors after its module.
    lm_head: the (untied) LM head's too (dsl.passes.quantizable)."""
    from kiln.dsl.passes import quantizable

    out = {}
    for name in sorted(quantizable(plan, lm_head)):
        src = plan.weights[name].source
        if isinstance(src, Tensor) and src.name.endswith(".weight"):
            out[name] = src.name[: -len(".weight")]
    return out


class _Quantized:
    """A checkpoint whose config says which linear modules are quantized and how (`desc_of`)."""

    scheme = "none"
    suffixes: tuple[str, ...] = ()
    kv_tensors: tuple[str, ...] = ()
    # whether desc_of is asked about the LM head too: formats whose config says so per module (compressed-tensors'
    # `ignore`, ModelOpt's `exclude_modules`) or for the head itself (GPTQModel's `lm_head`); AutoAWQ never quantizes it
    lm_head_by_config = False

    def kv_scales(self, plan: Plan) -> dict[int, tuple[float, float]]:
        return {}

    def __init__(self, ckpt: Checkpoint, qc: dict, where: str):
        self.ckpt, self.qc, self.where = ckpt, qc, where
        self._descs: dict[str, QuantDesc] = {}  # module -> desc, filled by descs()

    def desc_of(self, module: str, shape: tuple[int, int]) -> QuantDesc | None:
        raise NotImplementedError

    def descs(self, plan: Plan) -> dict[str, QuantDesc]:
        out = {}
        for slot, module in linear_modules(plan, self.lm_head_by_config).items():
            d = self.desc_of(module, plan.weights[slot].shape)
            if d is not None:
                out[slot] = self._descs[module] = d
        return out

    def tensors_of(self, name: str) -> tuple[str, ...]:
        module = name.removesuffix(".weight")
        return (name,) + tuple(f"{module}.{s}" for s in self.suffixes)

    def key(self, key: str, default=None, kinds: tuple[type, ...] = (), required: bool = False):
        """A config value, type-checked; errors name the key."""
        if key not in self.qc:
            if required:
                raise CheckpointError(f"{self.where}.{key} is missing")
            return default
        v = self.qc[key]
        if kinds and (not isinstance(v, kinds) or isinstance(v, bool) and bool not in kinds):
            raise CheckpointError(f"{self.where}.{key} is {v!r}; expected "
                                  + " or ".join(k.__name__ for k in kinds))
        return v

    def scaled_weight(self, slot: WeightSlot, m: str, desc: QuantDesc) -> QWeight:
        """An fp8 or int8 weight stored as `m.weight` with `m.weight_scale` (per tensor or per output
        channel) and, for static activations, `m.input_scale` (compressed-tensors and ModelOpt agree)."""
        out, n_in = slot.shape
        q = self.tensor(slot, f"{m}.weight", ("float8_e4m3fn",) if desc.dtype == "fp8" else ("int8",), (out, n_in))
        per_tensor = desc.scale_layout == "per_tensor"
        scale = self.tensor(slot, f"{m}.weight_scale", ("float",), () if per_tensor else (out,),
                            f" (a {'per-tensor' if per_tensor else 'per-channel'} scale)").float()
        inp = self.tensor(slot, f"{m}.input_scale", ("float",), (), " (a static activation scale)").float() \
            if desc.act_static else None
        return QWeight(desc, slot.shape, q, scale, input_scale=inp)

    def tensor(self, slot: WeightSlot, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None,
               why: str = ""):
        """The checkpoint tensor `name`, its dtype among `dtypes` ('float': any floating type) and,
        given `shape`, of that many elements laid out as `shape` (a per-tensor scale may be
        [] or [1]; a per-channel one [out] or [out, 1])."""
        if name not in self.ckpt:
            raise CheckpointError(f"missing tensor '{name}' in checkpoint {self.ckpt.path} (quantized weight "
                                  f"'{slot.name}'{why})")
        info = self.ckpt.info(name)
        ok = info.dtype in dtypes or ("float" in dtypes and info.dtype in ("float32", "float16", "bfloat16"))
        if not ok:
            raise CheckpointError(f"tensor '{name}' in {info.file} has dtype {info.dtype}; quantized weight "
                                  f"'{slot.name}' needs {' or '.join(dtypes)}")
        t = self.ckpt.get(name)
        if shape is not None:
            squeezed = [d for d in t.shape if d != 1]
            if list(t.shape) != list(shape) and squeezed != [d for d in shape if d != 1]:
                raise CheckpointError(f"tensor '{name}' in {info.file} has shape {list(t.shape)}; quantized "
                                      f"weight '{slot.name}' {list(slot.shape)} needs {list(shape)}{why}")
            t = t.reshape(shape)
        return t if t.dtype not in (torch.float16, torch.bfloat16, torch.float64) else t.float()

    def load(self, slot: WeightSlot) -> QWeight:
        module = source_tensor(slot).removesuffix(".weight")
        return self.read(slot, module, self._descs.get(module, slot.quant))

    def read(self, slot: WeightSlot, module: str, desc: QuantDesc) -> QWeight:
        raise NotImplementedError


def _int4_weight(desc: QuantDesc, slot: WeightSlot, q, scale, zero, g_idx=None) -> QWeight:
    """A QWeight from unpacked [out, in] values 0..15 and [out, groups] scales and zeros."""
    from kiln.dsl.quant import pack_int4

    return QWeight(desc, slot.shape, pack_int4(q.contiguous()), scale.float().contiguous(),
                   zero.float().contiguous(), None if g_idx is None else g_idx.to(torch.int32))


# ---------------------------------------------------------------- compressed-tensors (llm-compressor)


class CompressedTensors(_Quantized):
    """What llm-compressor writes (the `compressed-tensors` library's layout):

    float-quantized  `weight` float8_e4m3fn [out, in], `weight_scale` [1] (tensor) or [out, 1]
                     (channel); `input_scale` [1] when activations are static, none when dynamic
    int-quantized    `weight` int8 [out, in], `weight_scale` [out, 1] (channel); activations int8
                     per token (dynamic; SmoothQuant's smoothing is already in the weights)
    pack-quantized   `weight_packed` int32 [out, in / 8] (value k in bits 4k.., stored as q + 8
                     for the signed q in -8..7), `weight_shape` [2], `weight_scale` [out, in / g],
                     asymmetric: `weight_zero_point` int32 [out / 8, in / g] packed the same way along
                     out; w = (q - zero) * scale; act-order `group`: `weight_g_idx` [in]

    Each config group's `targets` ('Linear', module names, 're:' regexes) pick its modules; the
    `ignore` list (same syntax) keeps modules unquantized: the LM head is quantized where it is not
    listed (llm-compressor's recipes list it; `kiln quantize --lm-head` does not)."""

    lm_head_by_config = True
    suffixes = ("weight_scale", "input_scale", "weight_packed", "weight_shape", "weight_zero_point",
                "weight_g_idx")

    def __init__(self, ckpt: Checkpoint, qc: dict, where: str):
        super().__init__(ckpt, qc, where)
        groups = self.key("config_groups", kinds=(dict,), required=True)
        self.groups = []
        for gname, g in groups.items():
            gw = f"{where}.config_groups.{gname}"
            if not isinstance(g, dict):
                raise CheckpointError(f"{gw} must be an object")
            targets = g.get("targets")
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise CheckpointError(f"{gw}.targets must be a list of module names or classes, got {targets!r}")
            fmt = g.get("format") or qc.get("format")
            self.groups.append((targets, self._group_desc(g, fmt, gw)))
        self.ignore = self.key("ignore", [], (list,)) or []
        first = self.groups[0][1] if self.groups else None
        self.scheme = _scheme_of(first)
        self.kv_scheme = self.key("kv_cache_scheme", None, (dict, type(None)))
        if self.kv_scheme is not None:
            ks = self.kv_scheme
            if ks.get("type") != "float" or ks.get("num_bits") != 8 or ks.get("dynamic") not in (False, None):
                raise CheckpointError(f"{where}.kv_cache_scheme {ks!r}: only static fp8 (type float, num_bits 8, "
                                      f"dynamic false) KV cache scales are supported")
            if ks.get("strategy", "tensor") not in ("tensor", "attn_head"):
                raise CheckpointError(f"{where}.kv_cache_scheme.strategy {ks.get('strategy')!r} is not supported "
                                      f"(supported: tensor, attn_head)")

    def kv_scales(self, plan: Plan) -> dict[int, tuple[float, float]]:
        """llm-compressor's calibrated KV cache scales: `kv_cache_scheme` in the config and, per
        attention module (the parent of its k projection, e.g. 'model.layers.0.self_attn'), fp32
        `k_scale` / `v_scale` of shape [] or [1] (strategy tensor) or [kv_heads] (attn_head). The
        cache keeps one scale per site: per-head scales are read as their largest (the per-tensor
        scale the same calibration gives)."""
        if self.kv_scheme is None:
            return {}
        out, names = {}, []
        for site, module in attention_modules(plan).items():
            heads = plan.sites[site].kv_heads
            pair = []
            for which in ("k_scale", "v_scale"):
                name = f"{module}.{which}"
                if name not in self.ckpt:
                    raise CheckpointError(f"missing tensor '{name}' in checkpoint {self.ckpt.path} (the KV cache "
                                          f"scale of attention site {site}; {self.where}.kv_cache_scheme is set)")
                info = self.ckpt.info(name)
                if info.dtype not in ("float32", "float16", "bfloat16"):
                    raise CheckpointError(f"tensor '{name}' in {info.file} has dtype {info.dtype}; a KV cache scale "
                                          f"is a float")
                t = self.ckpt.get(name).float()
                if t.numel() not in (1, heads) or t.dim() > 1 and [d for d in t.shape if d != 1] != [t.numel()]:
                    raise CheckpointError(f"tensor '{name}' in {info.file} has shape {list(t.shape)}; a KV cache "
                                          f"scale is [] or [1] (per tensor) or [{heads}] (per KV head)")
                if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
                    raise CheckpointError(f"tensor '{name}' in {info.file}: KV cache scales must be finite and > 0, "
                                          f"got {t.flatten().tolist()[:4]}")
                pair.append(t.max().item())
                names.append(name)
            out[site] = (pair[0], pair[1])
        self.kv_tensors = tuple(names)
        return out

    def _group_desc(self, g: dict, fmt, gw: str) -> QuantDesc:
        w, a = g.get("weights"), g.get("input_activations")
        if not isinstance(w, dict):
            raise CheckpointError(f"{gw}.weights must be an object (weight-less groups are not supported)")
        bits, kind, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
        if kind == "float" and bits == 8:
            if fmt not in ("float-quantized", "naive-quantized", None):
                raise CheckpointError(f"{gw}: format {fmt!r} for fp8 weights is not supported (float-quantized)")
            if strategy not in ("tensor", "channel"):
                raise CheckpointError(f"{gw}.weights.strategy {strategy!r} is not supported for fp8 "
                                      f"(supported: tensor, channel)")
            layout = "per_tensor" if strategy == "tensor" else "per_channel"
            if a is None:
                return QuantDesc("fp8", layout)
            if not (isinstance(a, dict) and a.get("type") == "float" and a.get("num_bits") == 8):
                raise CheckpointError(f"{gw}.input_activations {a!r}: only fp8 activations go with fp8 weights")
            if a.get("dynamic") is False:
                if a.get("strategy") != "tensor":
                    raise CheckpointError(f"{gw}.input_activations.strategy {a.get('strategy')!r}: static fp8 "
                                          f"activations must be per tensor")
                return QuantDesc("fp8", layout, act="fp8_tensor", act_static=True)
            act = {"token": "fp8_token", "tensor": "fp8_tensor"}.get(a.get("strategy"))
            if act is None:
                raise CheckpointError(f"{gw}.input_activations.strategy {a.get('strategy')!r} is not supported "
                                      f"(supported: token, tensor)")
            return QuantDesc("fp8", layout, act=act)
        if kind == "int" and bits == 8:
            if fmt not in ("int-quantized", "naive-quantized", None):
                raise CheckpointError(f"{gw}: format {fmt!r} for int8 weights is not supported (int-quantized)")
            if strategy != "channel" or w.get("symmetric") is False:
                raise CheckpointError(f"{gw}.weights: int8 weights must be symmetric per channel, got "
                                      f"strategy {strategy!r}")
            if a is None:
                return QuantDesc("int8", "per_channel")
            if not (isinstance(a, dict) and a.get("type") == "int" and a.get("num_bits") == 8
                    and a.get("dynamic") is True and a.get("strategy") == "token"):
                raise CheckpointError(f"{gw}.input_activations {a!r}: int8 weights run with dynamic per-token "
                                      f"int8 activations or none")
            return QuantDesc("int8", "per_channel", act="int8_token")
        if kind == "int" and bits == 4:
            if fmt != "pack-quantized":
                raise CheckpointError(f"{gw}: format {fmt!r} for int4 weights is not supported (pack-quantized)")
            if strategy != "group" or not isinstance(w.get("group_size"), int) or w["group_size"] <= 0:
                raise CheckpointError(f"{gw}.weights: int4 weights must be quantized per group with a "
                                      f"group_size, got strategy {strategy!r}, group_size {w.get('group_size')!r}")
            if a is not None:
                raise CheckpointError(f"{gw}.input_activations: int4 weights with quantized activations "
                                      f"are not supported")
            return QuantDesc("int4", "per_group", w["group_size"], zero_points=True,
                             act_order=w.get("actorder") == "group")
        raise CheckpointError(f"{gw}.weights: {kind} {bits}-bit weights are not supported (supported: float 8, "
                              f"int 8, int 4)")

    def desc_of(self, module: str, shape: tuple[int, int]) -> QuantDesc | None:
        if any(_ct_match(t, module) for t in self.ignore):
            return None
        for targets, desc in self.groups:
            if any(_ct_match(t, module) for t in targets):
                return desc
        return None

    def read(self, slot: WeightSlot, m: str, desc: QuantDesc) -> QWeight:
        out, n_in = slot.shape
        if desc.dtype in ("fp8", "int8"):
            return self.scaled_weight(slot, m, desc)
        g = desc.group_size
        if n_in % g or n_in % 8 or out % 8:
            raise CheckpointError(f"quantized weight '{slot.name}' {list(slot.shape)}: its input features are not "
                                  f"whole groups of {g} (config_groups group_size)")
        shape = self.tensor(slot, f"{m}.weight_shape", ("int64", "int32"), (2,))
        if shape.tolist() != [out, n_in]:
            raise CheckpointError(f"tensor '{m}.weight_shape' in {self.ckpt.file_of(m + '.weight_shape')} says "
                                  f"{shape.tolist()}; weight '{slot.name}' is {[out, n_in]}")
        q = unpack_int32_nibbles(self.tensor(slot, f"{m}.weight_packed", ("int32",), (out, n_in // 8)), 1)
        scale = self.tensor(slot, f"{m}.weight_scale", ("float",), (out, n_in // g), " (one scale per group)")
        zname = f"{m}.weight_zero_point"
        if zname in self.ckpt:
            if self.ckpt.info(zname).dtype == "int32":
                zero = unpack_int32_nibbles(self.tensor(slot, zname, ("int32",), (out // 8, n_in // g)), 0).float()
            else:  # older releases kept the signed zero points unpacked
                zero = self.tensor(slot, zname, ("int8",), (out, n_in // g)).float() + 8
        else:  # symmetric: zero point 0, i.e. 8 in the unsigned values
            zero = torch.full((out, n_in // g), 8.0)
        g_idx = self.tensor(slot, f"{m}.weight_g_idx", ("int32", "int64"), (n_in,), " (actorder group)") \
            if desc.act_order else None
        return _int4_weight(desc, slot, q, scale, zero, g_idx)


def _ct_match(target: str, module: str) -> bool:
    """compressed-tensors' target matching for a linear module: 'Linear', 're:REGEX' or a name."""
    import re

    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == "Linear" or target == module


def _scheme_of(desc: QuantDesc | None) -> str:
    """The SCHEMES name closest to a descriptor (for messages and `--quantization` checks)."""
    if desc is None:
        return "none"
    if desc.dtype == "fp8":
        return "fp8" if desc.scale_layout == "per_tensor" else "fp8-channel"
    if desc.dtype == "int8":
        return "smoothquant" if desc.act == "int8_token" else "int8-wo"
    return "int4-wo"


# ---------------------------------------------------------------- AutoAWQ (GEMM)


class AutoAwq(_Quantized):
    """AutoAWQ's GEMM layout (`quant_method: awq`, `version: gemm`), for each linear module:
    `qweight` int32 [in, out / 8] (output columns 8c + AWQ_ORDER[k] in nibble k of word c),
    `qzeros` int32 [in / g, out / 8] packed the same way, `scales` fp16 [in / g, out];
    w[o, i] = (q - zero) * scale of group i // g. `modules_to_not_convert` stay float."""

    scheme = "awq"
    suffixes = ("qweight", "qzeros", "scales")

    def __init__(self, ckpt: Checkpoint, qc: dict, where: str):
        super().__init__(ckpt, qc, where)
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise CheckpointError(f"{where}.bits is {bits!r}; AWQ checkpoints are read with 4 bits only")
        self.group = qc.get("group_size", qc.get("q_group_size"))
        if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group <= 0:
            raise CheckpointError(f"{where}.group_size is {self.group!r}; expected a positive integer")
        version = str(self.key("version", "gemm", (str,))).lower()
        if version != "gemm":
            raise CheckpointError(f"{where}.version {version!r} is not supported (supported: gemm)")
        if self.key("zero_point", True, (bool,)) is not True:
            raise CheckpointError(f"{where}.zero_point false is not supported (AWQ GEMM keeps zero points)")
        self.skip = self.key("modules_to_not_convert", None, (list, type(None))) or []

    def desc_of(self, module: str, shape: tuple[int, int]) -> QuantDesc | None:
        if any(s in module for s in self.skip):  # AutoAWQ skips a module whose name contains an entry
            return None
        return QuantDesc("int4", "per_group", self.group, zero_points=True)

    def read(self, slot: WeightSlot, m: str, desc: QuantDesc) -> QWeight:
        out, n_in = slot.shape
        g = desc.group_size
        if n_in % g or out % 8:
            raise CheckpointError(f"quantized weight '{slot.name}' {list(slot.shape)}: its input features are not "
                                  f"whole groups of {g} ({self.where}.group_size)")
        q = unpack_int32_nibbles(self.tensor(slot, f"{m}.qweight", ("int32",), (n_in, out // 8)), 1, _AWQ_NIBBLE)
        zero = unpack_int32_nibbles(self.tensor(slot, f"{m}.qzeros", ("int32",), (n_in // g, out // 8)), 1,
                                    _AWQ_NIBBLE)
        scale = self.tensor(slot, f"{m}.scales", ("float",), (n_in // g, out), " (one scale per group)")
        return _int4_weight(desc, slot, q.t(), scale.t(), zero.t())


# ---------------------------------------------------------------- GPTQ (AutoGPTQ, GPTQModel)


class Gptq(_Quantized):
    """GPTQ (`quant_method: gptq`), for each linear module: `qweight` int32 [in / 8, out] (input
    8r + k in nibble k of word r), `qzeros` int32 [in / g, out / 8] (output 8c + k in nibble k),
    `scales` [in / g, out], `g_idx` int32 [in] (each input column's group; with `desc_act` the
    columns were quantized in activation order and the groups interleave).
    `checkpoint_format` gptq (v1, the default) stores each zero point minus one — the kernels add
    the one back — gptq_v2 stores it as is; w = (q - zero) * scale of group g_idx[i]. `lm_head: true`
    (GPTQModel's, which vLLM reads as lm_head_quantized): the LM head is stored so too."""

    scheme = "gptq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, ckpt: Checkpoint, qc: dict, where: str):
        super().__init__(ckpt, qc, where)
        bits = self.key("bits", None, (int,), required=True)
        if bits != 4:
            raise CheckpointError(f"{where}.bits is {bits!r}; GPTQ checkpoints are read with 4 bits only")
        self.group = self.key("group_size", 128, (int,))
        if self.group == 0 or self.group < -1:
            raise CheckpointError(f"{where}.group_size is {self.group!r}; expected a positive integer or -1")
        self.desc_act = self.key("desc_act", False, (bool,))
        fmt = self.key("checkpoint_format", qc.get("format", "gptq"), (str,))
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{where}.checkpoint_format {fmt!r} is not supported (supported: gptq, gptq_v2)")
        self.zero_offset = 1 if fmt == "gptq" else 0
        self.skip = self.key("modules_to_not_convert", None, (list, type(None))) or []
        self.lm_head_by_config = self.key("lm_head", False, (bool,))

    def desc_of(self, module: str, shape: tuple[int, int]) -> QuantDesc | None:
        if any(s in module for s in self.skip):
            return None
        return QuantDesc("int4", "per_group", shape[1] if self.group == -1 else self.group, zero_points=True,
                         act_order=self.desc_act)

    def read(self, slot: WeightSlot, m: str, desc: QuantDesc) -> QWeight:
        out, n_in = slot.shape
        g = desc.group_size
        if n_in % g or n_in % 8 or out % 8:
            raise CheckpointError(f"quantized weight '{slot.name}' {list(slot.shape)}: its input features are not "
                                  f"whole groups of {g} ({self.where}.group_size)")
        q = unpack_int32_nibbles(self.tensor(slot, f"{m}.qweight", ("int32",), (n_in // 8, out)), 0)
        zero = unpack_int32_nibbles(self.tensor(slot, f"{m}.qzeros", ("int32",), (n_in // g, out // 8)), 1)
        scale = self.tensor(slot, f"{m}.scales", ("float",), (n_in // g, out), " (one scale per group)")
        zero = zero.float() + self.zero_offset
        name = f"{m}.g_idx"
        g_idx = None
        if desc.act_order:
            g_idx = self.tensor(slot, name, ("int32", "int64"), (n_in,), f" ({self.where}.desc_act is true)")
            if g_idx.min() < 0 or g_idx.max() >= n_in // g:
                raise CheckpointError(f"tensor '{name}' in {self.ckpt.file_of(name)} names groups outside "
                                      f"0..{n_in // g - 1}")
        elif name in self.ckpt:
            seq = torch.arange(n_in) // g
            if not torch.equal(self.tensor(slot, name, ("int32", "int64"), (n_in,)).long(), seq):
                raise CheckpointError(f"tensor '{name}' in {self.ckpt.file_of(name)} reorders the groups, but "
                                      f"{self.where}.desc_act is false")
        return _int4_weight(desc, slot, q.t(), scale.t(), zero.t(), g_idx)


# ---------------------------------------------------------------- NVIDIA ModelOpt FP8


class ModelOptFp8(_Quantized):
    """What NVIDIA ModelOpt (TensorRT-LLM's quantize script, `export_hf_checkpoint`) writes:
    `hf_quant_config.json` {"quantization": {"quant_algo": "FP8", "exclude_modules": [...]}} and/or
    config.json's quantization_config {"quant_method": "modelopt", "quant_algo": "FP8", ...}; each
    linear module: `weight` float8_e4m3fn [out, in], `weight_scale` [] and a static per-tensor
    `input_scale` []. FP8_PER_CHANNEL_PER_TOKEN: `weight_scale` [out], activations per token.
    A KV-cache algorithm's `k_scale` / `v_scale` are accepted and not used: the KV cache stays in
    the run dtype."""

    suffixes = ("weight_scale", "input_scale", "k_scale", "v_scale")
    ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN")
    lm_head_by_config = True  # quantized unless exclude_modules lists it (TensorRT-LLM's --quantize_lm_head)

    def __init__(self, ckpt: Checkpoint, qc: dict, where: str):
        super().__init__(ckpt, qc, where)
        algo = self.key("quant_algo", None, (str,), required=True)
        if algo not in self.ALGOS:
            raise CheckpointError(f"{where}.quant_algo {algo!r} is not supported (supported: "
                                  + ", ".join(self.ALGOS) + ")")
        self.desc = QuantDesc("fp8", "per_tensor", act="fp8_tensor", act_static=True) if algo == "FP8" else \
            QuantDesc("fp8", "per_channel", act="fp8_token")
        self.scheme = _scheme_of(self.desc)
        self.exclude = self.key("exclude_modules", None, (list, type(None))) or \
            self.key("ignore", None, (list, type(None))) or []

    def desc_of(self, module: str, shape: tuple[int, int]) -> QuantDesc | None:
        import fnmatch

        if any(fnmatch.fnmatchcase(module, p) or module.endswith("." + p) for p in self.exclude):
            return None
        return self.desc

    def read(self, slot: WeightSlot, m: str, desc: QuantDesc) -> QWeight:
        return self.scaled_weight(slot, m, desc)


FORMATS = {"compressed-tensors": CompressedTensors, "awq": AutoAwq, "gptq": Gptq, "modelopt": ModelOptFp8}
