"""Multi-LoRA: PEFT adapters on the spec's linear weights, selected per sequence.

An adapter is a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`): for each
target module `M`, `base_model.model.M.lora_A.weight` [r, in] and `...lora_B.weight` [out, r],
scaled by `lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`). Its modules are mapped
onto the spec's weight slots by the checkpoint tensor names of the slots' sources — a slot read
from `Tensor("model.layers.3.self_attn.q_proj.weight")` takes module `model.layers.3.self_attn.q_proj`
— so no family needs code here. A slot that takes output rows `[a:b]` of a fused checkpoint tensor
(a fused qkv or gate_up projection) takes rows `[a:b]` of B, which is exact; any other fused
source (a concat, reshape, input-column slice) is refused with its name.

`LoraSet` is the one place the math lives: per target slot, A stacked [N, R, in] and B (scale
folded in) [N, out, R] over the N adapter slots, R the largest rank rounded up to 16 (zeros
pad: they add nothing). A step binds it to a per-row adapter index (-1: the base model),
`LoraStep`, which the `linear` reference (dsl.quant.linear) and the cuda GEMM step apply:
y = x W^T + (x A_i^T) B_i^T for each row with adapter i.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kiln.dsl.ops import OpKind
from kiln.dsl.plan import Plan, tie_chain
from kiln.dsl.sources import SliceOf, Tensor, Transpose

RANK_ALIGN = 16  # ranks are padded to a multiple of this (the kernel's tile along r)
_UIDS = itertools.count()
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$")


class LoraError(ValueError):
    """A bad adapter (path, config, tensor names or shapes): the message names what and where."""


class UnknownLora(LoraError):
    """A request or an unload names an adapter that is not loaded."""


@dataclass(frozen=True)
class _Target:
    """How a slot reads a checkpoint tensor that an adapter module may cover."""

    slot: str
    rows: tuple[int, int] | None  # output rows [a, b) of the module's B; None: all of them


@dataclass
class Adapter:
    name: str
    path: str
    rank: int  # the largest rank of its modules
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # slot -> (A [r, in], scale * B [out, r]), fp32
    uid: int = field(default_factory=lambda: next(_UIDS))  # unique per load: a prefix-cache namespace

    @property
    def slots(self) -> list[str]:
        return sorted(self.weights)


def lora_targets(plan: Plan) -> tuple[dict[str, list[_Target]], dict[str, str]]:
    """(checkpoint module -> the slots it maps onto, module -> why it cannot take a LoRA).
    Only linears of the main program take one: an expert's linear sees a subset of the rows."""
    top = {ins.inputs[1].name for ins in plan.program.instrs if ins.kind is OpKind.LINEAR}
    experts = {ins.inputs[1].name for ins in plan.program.walk() if ins.kind is OpKind.LINEAR} - top
    targets: dict[str, list[_Target]] = {}
    refused: dict[str, str] = {}

    def module_of(src) -> str | None:
        if isinstance(src, Transpose):  # a Conv1D [in, out] tensor: PEFT's A/B are still [r, in] / [out, r]
            src = src.src
        if isinstance(src, Tensor) and src.name.endswith(".weight"):
            return src.name[: -len(".weight")]
        return None

    for name in sorted(top | experts):
        slot = tie_chain(plan.weights, plan.weights[name])[-1]
        src = slot.source
        if name in experts:
            if (m := module_of(src)) is not None:
                refused[m] = f"weight '{name}' is inside a moe's experts (LoRA on experts is not supported)"
            continue
        if len(tie_chain(plan.weights, plan.weights[name])) > 1:
            if (m := module_of(src)) is not None:
                refused.setdefault(m, f"weight '{name}' is tied to '{slot.name}'")
            continue
        if (m := module_of(src)) is not None:
            targets.setdefault(m, []).append(_Target(name, None))
        elif isinstance(src, SliceOf) and src.dim == 0 and (m := module_of(src.src)) is not None:
            targets.setdefault(m, []).append(_Target(name, (src.start or 0, src.stop)))
        else:
            for t in _tensors(src):
                refused[t[: -len(".weight")] if t.endswith(".weight") else t] = (
                    f"weight '{name}' is built from {_show(src)}, which no LoRA of '{t}' maps onto exactly")
    for m in set(targets) & set(refused):  # read both exactly and in a fused form: refuse it
        del targets[m]
    return targets, refused


def _tensors(src) -> list[str]:
    if isinstance(src, Tensor):
        return [src.name]
    out = []
    for f in ("src", "srcs"):
        v = getattr(src, f, None)
        for s in (v if isinstance(v, tuple) else (v,) if v is not None else ()):
            out += _tensors(s)
    return out


def _show(src) -> str:
    r = repr(src)
    return r if len(r) < 160 else r[:157] + "..."


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_dir():
        raise LoraError(f"LoRA adapter {str(path)!r}: no such directory")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise LoraError(f"LoRA adapter {str(path)!r}: no adapter_config.json (a PEFT adapter folder has "
                        "adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise LoraError(f"{cfg_file}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{cfg_file}: expected a JSON object")
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(st))
        except Exception as e:  # noqa: BLE001 - whatever safetensors raises is about the file
            raise LoraError(f"{st}: cannot read: {e}") from None
    elif (path / "adapter_model.bin").is_file():
        try:
            tensors = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - whatever torch.load raises is about the file
            raise LoraError(f"{path / 'adapter_model.bin'}: cannot read: {e}") from None
    else:
        raise LoraError(f"LoRA adapter {str(path)!r}: no adapter_model.safetensors")
    return config, tensors


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_adapter(plan: Plan, name: str, path: str | Path) -> Adapter:
    """Read a PEFT adapter and map it onto `plan`'s weights; LoraError naming what does not fit."""
    path = Path(path)
    config, tensors = _read(path)
    cfg = path / "adapter_config.json"
    ptype = config.get("peft_type", "LORA")
    if ptype != "LORA":
        raise LoraError(f"{cfg}: peft_type {ptype!r} is not supported (only LORA)")
    for key, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save")):
        if config.get(key):
            raise LoraError(f"{cfg}: {key} ({what}) is not supported")
    if config.get("bias", "none") != "none":
        raise LoraError(f"{cfg}: bias {config['bias']!r} is not supported (only 'none')")
    alpha = config.get("lora_alpha", config.get("r"))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LoraError(f"{cfg}: lora_alpha must be a number, got {alpha!r}")
    rslora = bool(config.get("use_rslora", False))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise LoraError(f"{path}: tensor {key!r} is not a LoRA A/B weight (embedding LoRA, DoRA magnitudes "
                            "and saved modules are not supported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise LoraError(f"{path}: the adapter has no lora_A/lora_B tensors")
    targets, refused = lora_targets(plan)
    spec = plan.spec.file
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise LoraError(f"{path}: module {module!r} has no {missing} tensor")
        if module in refused:
            raise LoraError(f"{path}: target module {module!r} cannot take a LoRA: {refused[module]} ({spec})")
        if module not in targets:
            raise LoraError(f"{path}: target module {module!r} is not a linear weight of this model (no weight "
                            f"of {spec} reads '{module}.weight'); target_modules {config.get('target_modules')!r}")
        A, B = ab["lora_A"].float(), ab["lora_B"].float()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise LoraError(f"{path}: module {module!r}: lora_A {list(A.shape)} and lora_B {list(B.shape)} are not "
                            "[r, in] and [out, r]")
        r = A.shape[0]
        a = _pattern_value(config.get("alpha_pattern"), module, alpha)
        scale = a / math.sqrt(r) if rslora else a / r
        rank = max(rank, r)
        for t in targets[module]:
            out, n_in = plan.weights[t.slot].shape
            lo, hi = t.rows if t.rows is not None else (0, B.shape[0])
            hi = B.shape[0] if hi is None else hi
            if A.shape[1] != n_in or hi > B.shape[0] or hi - lo != out:
                raise LoraError(f"{path}: module {module!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not "
                                f"fit weight '{t.slot}' [{out}, {n_in}]"
                                f"{f' (rows {lo}:{hi} of {module}.weight)' if t.rows else ''}")
            weights[t.slot] = (A.contiguous(), (B[lo:hi] * scale).contiguous())
    return Adapter(name, str(path), rank, weights)


@dataclass(frozen=True)
class _State:
    """One immutable snapshot of the loaded adapters: a step reads one and only one."""

    names: tuple[str | None, ...]  # adapter name of each slot (None: a free slot)
    rank: int  # padded rank R
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]]  # slot -> (A [N, R, in], B [N, out, R])
    version: int


class LoraSet:
    """The adapters loaded for one model, stacked per target weight. Loading and unloading build a
    new snapshot and swap it in at once, so a step running in another thread sees the old or the
    new one, never a mix."""

    def __init__(self, plan: Plan, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_rank: int | None = None):
        self.plan, self.device, self.dtype = plan, torch.device(device), dtype
        self.max_rank = max_rank
        self.adapters: dict[str, Adapter] = {}
        self._lock = threading.Lock()
        self.state = _State((), 0, {}, 0)

    def __bool__(self) -> bool:
        return bool(self.adapters)

    @property
    def names(self) -> list[str]:
        return [n for n in self.state.names if n is not None]

    def slot(self, name: str) -> int:
        """The slot index of a loaded adapter; KeyError naming it and the loaded ones."""
        try:
            return self.state.names.index(name)
        except ValueError:
            raise UnknownLora(f"unknown LoRA adapter {name!r}; loaded: {sorted(self.names)}") from None

    def load(self, name: str, path: str | Path) -> Adapter:
        if not isinstance(name, str) or not name:
            raise LoraError("a LoRA adapter needs a non-empty name")
        with self._lock:
            if name in self.adapters:
                raise LoraError(f"LoRA adapter {name!r} is already loaded (from {self.adapters[name].path})")
            ad = load_adapter(self.plan, name, path)
            if self.max_rank is not None and ad.rank > self.max_rank:
                raise LoraError(f"{path}: rank {ad.rank} exceeds the limit of {self.max_rank}")
            names = list(self.state.names)
            free = names.index(None) if None in names else len(names)
            names[free:free + 1] = [name]
            self.adapters[name] = ad
            self._rebuild(names)
            return ad

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self.adapters:
                raise UnknownLora(f"unknown LoRA adapter {name!r}; loaded: {sorted(self.names)}")
            del self.adapters[name]
            names = [None if n == name else n for n in self.state.names]
            while names and names[-1] is None:
                names.pop()
            self._rebuild(names)

    def _rebuild(self, names: list[str | None]) -> None:
        ads = [self.adapters[n] if n is not None else None for n in names]
        rank = max((a.rank for a in ads if a is not None), default=0)
        R = -(-rank // RANK_ALIGN) * RANK_ALIGN
        stacks = {}
        for slot in sorted({s for a in ads if a is not None for s in a.weights}):
            out, n_in = self.plan.weights[slot].shape
            A = torch.zeros(len(ads), R, n_in)
            B = torch.zeros(len(ads), out, R)
            for i, a in enumerate(ads):
                if a is not None and slot in a.weights:
                    ai, bi = a.weights[slot]
                    A[i, : ai.shape[0]] = ai
                    B[i, :, : bi.shape[1]] = bi
            stacks[slot] = (A.to(self.device, self.dtype), B.to(self.device, self.dtype))
        self.state = _State(tuple(names), R, stacks, self.state.version + 1)

    def bind(self, rows: torch.Tensor) -> LoraStep | None:
        """A step's view: `rows` [T] int, each token's adapter slot (-1: none). None when no row
        has an adapter (the step runs the base model)."""
        state = self.state
        if not state.stacks or not bool((rows >= 0).any()):
            return None
        return LoraStep(state, rows.to(self.device))


class LoraStep:
    """The adapters of one step: the reference semantics of every backend's LoRA."""

    def __init__(self, state: _State, rows: torch.Tensor):
        self.state, self.rows = state, rows
        self.groups = [(int(i), (rows == i).nonzero().flatten()) for i in rows.unique().tolist() if i >= 0]

    def apply(self, slot: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (x @ W^T of `slot`, rows as the step's) plus each row's adapter delta."""
        ab = self.state.stacks.get(slot)
        if ab is None or x.shape[0] != self.rows.shape[0]:
            return y
        A, B = ab
        y = y.clone()
        for i, idx in self.groups:
            xi = x.index_select(0, idx)
            y.index_add_(0, idx, ((xi @ A[i].to(x.dtype).t()) @ B[i].to(x.dtype).t()).to(y.dtype))
        return y


def adapter_rows(batch) -> torch.Tensor:
    """[T] int32: the adapter slot of every new token of a StepBatch (-1: the base model)."""
    parts = [torch.full((s.length,), getattr(s, "adapter", -1), dtype=torch.int32) for s in batch.seqs]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def parse_lora_option(text: str) -> tuple[str, str]:
    """`NAME=PATH` of `--lora`: (name, path); ValueError naming the option."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora {text!r}: expected NAME=PATH (a PEFT adapter folder)")
    return name, path


# ---------------------------------------------------------------- the cuda backend's side


@dataclass
class LoraRows:
    """A step's rows grouped by adapter, on the device: perm (row indices, each adapter's together)
    and seg [N + 1] (adapter a's rows are perm[seg[a]:seg[a + 1]]). A captured graph's (static_rows)
    are views of one device buffer refreshed from `host`, a pinned copy: one asynchronous copy a step."""

    perm: torch.Tensor
    seg: torch.Tensor
    buf: torch.Tensor | None = None  # [size + N + 1] int32 on the device: perm, then seg
    host: torch.Tensor | None = None  # its pinned host twin


LORA_KERNELS = ("tiled", "split")


def lora_kernel_choice() -> str:
    """The GEMMs' LoRA kernel variant (codegen/lora_kernels.py LoraSpec.kernel): KILN_LORA_KERNEL,
    "tiled" unless set; "split" runs the first version for A/B runs."""
    import os

    kind = os.environ.get("KILN_LORA_KERNEL", "tiled")
    if kind not in LORA_KERNELS:
        raise ValueError(f"KILN_LORA_KERNEL={kind!r}: expected one of {list(LORA_KERNELS)}")
    return kind


def group_rows(adapters, n: int):
    """(perm, seg) int32 numpy arrays of a [T] array of adapter slots (-1: none)."""
    import numpy as np

    adapters = np.asarray(adapters, dtype=np.int64)
    order = np.argsort(adapters, kind="stable")
    order = order[adapters[order] >= 0]
    counts = np.bincount(adapters[adapters >= 0], minlength=n)[:n]
    seg = np.zeros(n + 1, np.int32)
    seg[1:] = np.cumsum(counts)
    return order.astype(np.int32), seg


class CudaLora:
    """Per GEMM step of a CudaModel (codegen/fuse.py), its siblings' LoRA laid out for one launch
    pair (codegen/lora_kernels.py): A [N, siblings x R, in] stacked, B [N, out, R] at the siblings'
    slices, sib [out] the sibling of each output column (ascending). Rebuilt when the LoraSet changes."""

    def __init__(self, model, kernel: str | None = None):
        self.model = model
        self.kernel = kernel  # LoraSpec.kernel; None: lora_kernel_choice() at each rebuild
        self.version: int | None = None
        self.n = 0
        self.ops: dict[int, tuple] = {}

    def sync(self, lora: LoraSet | None) -> bool:
        """Follow `lora`'s current snapshot; True when it changed (captured graphs are stale)."""
        from kiln.codegen.fuse import Exec
        from kiln.codegen.fuse import origin as fuse_origin
        from kiln.codegen.lora_kernels import MAX_SR, LoraSpec
        from kiln.codegen.specs import dtype_name

        state = lora.state if lora is not None else None
        version = state.version if state is not None and state.stacks else None
        if version == self.version:
            return False
        self.version, self.ops, self.n = version, {}, 0
        if version is None:
            return True
        m, R = self.model, state.rank
        self.n = N = len(state.names)
        kernel = self.kernel or lora_kernel_choice()
        for i, op in enumerate(m.ops):
            if op.kind is not Exec.GEMM:
                continue
            slots = [w.name for w in op.extra["weights"]]
            if not any(s in state.stacks for s in slots):
                continue
            slices = op.extra["slices"]
            out = slices[-1][0] + slices[-1][1]
            k = m.plan.weights[slots[0]].shape[1]
            A = torch.zeros(N, len(slots) * R, k, dtype=m.dtype, device=m.device)
            B = torch.zeros(N, out, R, dtype=m.dtype, device=m.device)
            # sib ascending: a pad column between siblings (fuse.py aligns each start) counts as the
            # sibling before it (its B row is zero); the tiled expand reads only its columns' siblings.
            sib = torch.zeros(out, dtype=torch.int32)
            for s, (slot, (start, width)) in enumerate(zip(slots, slices)):
                sib[start:] = s
                if slot in state.stacks:
                    a, b = state.stacks[slot]
                    A[:, s * R:(s + 1) * R] = a.to(m.device, m.dtype)
                    B[:, start:start + width] = b.to(m.device, m.dtype)
            sr = len(slots) * R
            spec = LoraSpec(k, out, sr, R, dtype_name(m.dtype), origin=fuse_origin(op.instrs[0]),
                            kernel="split" if sr > MAX_SR else kernel)
            self.ops[i] = (spec, A, B, sib.to(m.device))
        return True

    def rows(self, adapters) -> LoraRows | None:
        """The device grouping of a step's per-row adapter slots; None without any adapter row."""
        if not self.ops:
            return None
        import numpy as np

        perm, seg = group_rows(adapters, self.n)
        if seg[-1] == 0:
            return None
        buf = torch.from_numpy(np.concatenate([perm, seg])).to(self.model.device)  # one copy
        return LoraRows(buf[: len(perm)], buf[len(perm):])

    def static_rows(self, size: int) -> LoraRows | None:
        """Buffers a captured decode graph reads (`fill` writes them before each replay)."""
        if not self.ops:
            return None
        buf = torch.zeros(size + self.n + 1, dtype=torch.int32, device=self.model.device)
        host = torch.zeros(size + self.n + 1, dtype=torch.int32).pin_memory()
        return LoraRows(buf[:size], buf[size:], buf, host)

    def fill(self, rows: LoraRows, adapters) -> None:
        """Write a step's grouping into a graph's static rows: into the pinned twin on the host, then
        one asynchronous copy in stream order before the replay (the step before has been read back
        by then, as for the graph's other pinned inputs, so the twin is free to overwrite)."""
        perm, seg = group_rows(adapters, self.n)
        size = rows.perm.shape[0]
        h = rows.host.numpy()
        h[: len(perm)] = perm
        h[size:] = seg
        rows.buf.copy_(rows.host, non_blocking=True)

    def apply(self, n: int, x: torch.Tensor, y: torch.Tensor, rows: LoraRows | None) -> None:
        """y += each grouped row's adapter delta of GEMM step n, in place."""
        entry = self.ops.get(n)
        if entry is None or rows is None:
            return
        from kiln.codegen.lora_kernels import lora_sgmv

        spec, A, B, sib = entry
        lora_sgmv(spec, x.contiguous(), A, B, sib, y, None, rows.perm, rows.seg)  # v: scratch, sized there


def random_adapters(plan: Plan, count: int, rank: int, folder: str | Path, seed: int = 0,
                    modules: tuple[str, ...] | None = None) -> dict[str, Path]:
    """`count` PEFT adapter folders of `rank` with random A/B on every linear of `plan` that can take
    one (or the modules ending in `modules`), named lora0, lora1, ...: for benchmarks."""
    from safetensors.torch import save_file

    targets, _ = lora_targets(plan)
    chosen = sorted(m for m in targets if modules is None or m.rsplit(".", 1)[-1] in modules)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        path = Path(folder) / f"lora{i}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for m in chosen:
            t = targets[m][0]  # B covers the whole checkpoint tensor: every slot's rows [a, a + out)
            rows = max(plan.weights[u.slot].shape[0] + (u.rows[0] if u.rows else 0) for u in targets[m])
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, plan.weights[t.slot].shape[1],
                                                                           generator=gen) * 0.01
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.01
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted({
                m.rsplit(".", 1)[-1] for m in chosen})}))
        out[f"lora{i}"] = path
    return out
