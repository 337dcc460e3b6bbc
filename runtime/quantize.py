"""`kiln quantize`: a float checkpoint -> a quantized checkpoint in a standard format.

Calibration runs the float model with the reference backend over real text and records, for
every quantizable linear weight, statistics of its input (`Recorder`, a StepContext that notes
the input of each LINEAR instruction it evaluates): per-channel max |x| (SmoothQuant), mean |x|
and a sample of rows (AWQ). Statistics come from one pass of the float model (every layer sees
float inputs). GPTQ instead quantizes in the model's order in one batched pass (GptqRecorder): each
linear's Hessian X^T X is taken on the outputs of the already quantized linears before it, as the
reference implementations do, over chunks spread over the whole calibration text.

Scale migration (SmoothQuant, AWQ) divides a linear's input by a per-channel s and multiplies
its weight by s. The division is folded into the norm that produces the input (its weight, and
bias, are divided by s): standard formats have no place for a separate divisor. AWQ also folds
a down projection's s into the up projection whose output its input multiplies (act(gate) * up:
up's rows / s), as AutoAWQ does for mlp.down_proj, and then clips each group's weight range to
the one with the smallest output error on the calibration rows (AutoAWQ's clip search; the
query and key projections unclipped). Other linears whose input is not a norm output (the attention
output projection) keep s = 1 — what llm-compressor's SmoothQuant and AutoAWQ do without a
foldable predecessor as well (AutoAWQ's v_proj -> o_proj fold needs as many KV heads as heads).

Output formats (each readable by runtime/quant_formats.py, and by vLLM):
  fp8, fp8-channel   compressed-tensors float-quantized (dynamic activation scales)
  fp8-static         compressed-tensors float-quantized, per-tensor weights and static per-tensor activation
                     scales: each linear's `input_scale` is the largest |input| calibration saw / 448
                     (llm-compressor's FP8 static scheme, TensorRT-LLM's FP8 recipe)
  int8-wo            compressed-tensors int-quantized, weight-only per-channel int8
  smoothquant        compressed-tensors int-quantized W8A8 (per-channel weights, dynamic per-token
                     activations) with the smoothing folded into the norms — llm-compressor's
                     SmoothQuant + W8A8 output
  int4-wo            compressed-tensors pack-quantized, asymmetric, group --group-size (default
                     128; round-to-nearest)
  awq                AutoAWQ GEMM (quant_method awq, version gemm), group --group-size
  gptq               GPTQ v1 (quant_method gptq, checkpoint_format gptq), asymmetric, group --group-size
  fp8-kv             the weights as they are (float) plus calibrated fp8 KV cache scales: each
                     attention site's max |K| and |V| over the calibration text / 448, stored as
                     compressed-tensors' `kv_cache_scheme` (static, per tensor) with fp32 [1]
                     `k_scale` / `v_scale` under each attention module (llm-compressor's layout);
                     applied when the checkpoint runs with --kv-cache-dtype fp8; and each site's mean
                     key per channel in kiln_kv_means.json (a file other readers leave alone), which
                     --kv-cache-dtype fp8-rotated subtracts before rounding

The input is a Hugging Face safetensors folder or a GGUF file. A GGUF's float weights are its
tensors dequantized (the weights `kiln eval` runs unquantized), with llama.cpp's rotary row
permutation undone by the loader, so the tensors written are in Hugging Face order; config.json
is the one synthesised from the GGUF metadata (with the spec's architecture named), and the
tokenizer files are written from the GGUF's tokenizer, as `kiln build` does.

The result is written into a temporary folder beside --out and renamed at the end: a failure
leaves no --out behind.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from kiln.dsl import load_spec, passes
from kiln.dsl.ops import OPS, OpKind
from kiln.dsl.plan import Plan, Value, WeightArg, fetch
from kiln.dsl.quant import SCHEMES, QuantDesc, quantize_weight, unpack_int4
from kiln.dsl.sources import Tensor

from .batch import SeqSlice, StepBatch
from .checkpoint import CONFIG_NAME, Checkpoint, open_checkpoint
from .kv_store import KVStore
from .quant_formats import _AWQ_NIBBLE, KV_MEANS_NAME, linear_modules, pack_int32_nibbles
from .reference import StepContext
from .weights import load_weights

QUANTIZE_SCHEMES = ("fp8", "fp8-static", "fp8-channel", "int8-wo", "int4-wo", "smoothquant", "awq", "gptq", "fp8-kv")
LM_HEAD_SCHEMES = ("fp8", "fp8-channel", "int8-wo", "int4-wo")  # --lm-head: round to nearest, no calibration
CALIBRATED = ("smoothquant", "awq", "gptq")
FP8_MAX = 448.0  # e4m3's largest finite value
INT4_SCHEMES = ("int4-wo", "awq", "gptq")  # the ones --group-size applies to
GROUP = 128  # the default group size
AWQ_GRID = 20  # alpha = 0, 1/20, ..., 19/20 as in AutoAWQ's _search_best_scale
AWQ_ROWS = 2048  # calibration rows kept per input for the AWQ loss (a uniform sample of all the rows seen)
AWQ_CLIP_ROWS = 512  # of them, the rows the clip search scores on (AutoAWQ's n_sample_token)


class QuantizeError(Exception):
    """A bad option or input of `kiln quantize`; the message names it."""


# ---------------------------------------------------------------- calibration


@dataclass
class Stats:
    """What calibration saw at one linear's input."""

    absmax: torch.Tensor
    abssum: torch.Tensor
    hessian: torch.Tensor | None
    rows: torch.Tensor | None = None  # up to AWQ_ROWS of the rows seen, a uniform sample of them all
    keys: torch.Tensor | None = None  # the rows' random keys: the sample keeps the smallest
    n: int = 0

    def add(self, x: torch.Tensor, gen: torch.Generator) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.abssum += x.abs().sum(0)
        if self.hessian is not None:
            self.hessian += x.t() @ x
        self.n += x.shape[0]
        keys = torch.rand(x.shape[0], generator=gen)
        if self.rows is not None:
            x, keys = torch.cat([self.rows, x]), torch.cat([self.keys, keys])
        keep = keys.argsort()[:AWQ_ROWS]
        self.rows, self.keys = x[keep], keys[keep]

    def sample(self, n: int = AWQ_ROWS) -> torch.Tensor:
        return self.rows[:n]


class Recorder(StepContext):
    """A reference StepContext that hands the input of each watched LINEAR instruction to `note`
    and, given `kv_note`, each ATTENTION's keys and values (what its cache stores) to it."""

    def __init__(self, batch, kv, weights, watch: set[str], note, kv_note=None):
        super().__init__(batch, kv, weights)
        self.watch, self.note, self.kv_note = watch, note, kv_note

    def run(self, prog, env):
        for ins in prog.instrs:
            args = [fetch(a, env, self.weights) for a in ins.inputs]
            if ins.kind is OpKind.LINEAR and isinstance(ins.inputs[1], WeightArg) and ins.inputs[1].name in self.watch:
                self.note(ins.inputs[1].name, args[0])
            if ins.kind is OpKind.ATTENTION and self.kv_note is not None:
                self.kv_note(ins.site, args[1], args[2])
            out = OPS[ins.kind].reference(self, ins, args)
            env.update(zip(ins.outputs, out if isinstance(out, tuple) else (out,)))
        return env[prog.output]


def calibrate(plan: Plan, weights: dict, ids: list[int], watch: set[str], samples: int, seq_len: int,
              hessian: bool, progress: bool = True) -> dict[str, Stats]:
    stats: dict[str, Stats] = {}
    gen = torch.Generator().manual_seed(0)

    def note(name: str, x: torch.Tensor) -> None:
        n_in = x.shape[-1]
        if name not in stats:
            stats[name] = Stats(torch.zeros(n_in), torch.zeros(n_in), torch.zeros(n_in, n_in) if hessian else None)
        stats[name].add(x, gen)

    _run_samples(plan, weights, ids, samples, seq_len, progress, lambda b, kv: Recorder(b, kv, weights, watch, note))
    return stats


def calibrate_kv(plan: Plan, weights: dict, ids: list[int], samples: int, seq_len: int,
                 progress: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each attention site's max |K| and max |V| per KV head (fp32 [kv_heads] each) and mean K per channel (fp32
    [kv_heads, head_dim]) over the calibration samples: of the values its cache stores (keys after rotary
    embedding)."""
    amax: dict[int, list[torch.Tensor]] = {}
    sums: dict[int, tuple[torch.Tensor, int]] = {}

    def kv_note(site: int, k: torch.Tensor, v: torch.Tensor) -> None:
        hk = plan.sites[site].kv_heads
        now = [t.detach().float().reshape(t.shape[0], hk, -1).abs().amax(dim=(0, 2)) for t in (k, v)]
        amax[site] = now if site not in amax else [torch.maximum(a, b) for a, b in zip(amax[site], now)]
        total, n = sums.get(site, (0.0, 0))
        sums[site] = (total + k.detach().float().reshape(k.shape[0], hk, -1).sum(0), n + k.shape[0])

    _run_samples(plan, weights, ids, samples, seq_len, progress,
                 lambda b, kv: Recorder(b, kv, weights, set(), None, kv_note))
    return {s: (k, v, sums[s][0] / sums[s][1]) for s, (k, v) in amax.items()}


def calibration_chunks(ids: list[int], samples: int, seq_len: int, spread: bool = True) -> list[list[int]]:
    """Up to `samples` chunks of `seq_len` tokens of `ids`, spread evenly over the whole text (GPTQ:
    the first `samples` chunks alone would see only its first document (the Debian license texts: 8
    samples of 512 tokens are all Apache-2.0), a narrow calibration set that GPTQ overfits); with
    spread=False the first ones (SmoothQuant, AWQ and the KV scales: their README rows were measured
    so; spreading them is not measured yet)."""
    n = (len(ids) - seq_len) // seq_len + 1 if len(ids) >= seq_len else 0
    if n <= 0:
        raise QuantizeError(f"--calibration: the text has {len(ids)} tokens, fewer than one sample of "
                            f"--seq-len {seq_len}")
    k = min(samples, n)
    if not spread:
        return [ids[i * seq_len:(i + 1) * seq_len] for i in range(k)]
    starts = [(i * (n - 1) // max(k - 1, 1)) * seq_len for i in range(k)]  # the first chunk to the last
    return [ids[i:i + seq_len] for i in starts]


def _run_samples(plan: Plan, weights: dict, ids: list[int], samples: int, seq_len: int, progress: bool,
                 make_ctx) -> None:
    """The float model run over up to `samples` chunks of `seq_len` tokens of `ids`, each in a
    fresh KV store, with the StepContext `make_ctx(batch, kv)` (a Recorder) evaluating it."""
    from tqdm import tqdm

    chunks = calibration_chunks(ids, samples, seq_len, spread=False)
    page = 16
    with torch.no_grad():
        for chunk in tqdm(chunks, desc="calibrating", unit="sample", file=sys.stderr, disable=not progress):
            pages = -(-len(chunk) // page)
            kv = KVStore(plan.sites, pages, page, torch.float32, "cpu")
            batch = StepBatch(torch.tensor(chunk, dtype=torch.long), [SeqSlice(0, len(chunk), 0, tuple(range(pages)))])
            ctx = make_ctx(batch, kv)
            ctx.run(plan.program, {Value("tokens"): batch.tokens, Value("positions"): ctx.positions})


# ---------------------------------------------------------------- scale migration


def input_groups(plan: Plan, slots: set[str]) -> list[tuple[list[str], str | None]]:
    """The watched linear weights grouped by their input value, each with the weight slot of the
    norm producing that input when the smoothing can be folded into it (else None)."""
    producer, consumers = _dataflow(plan)
    uses = _weight_uses(plan)
    groups: dict[Value, list[str]] = {}
    for ins in plan.program.instrs:
        if ins.kind is OpKind.LINEAR and isinstance(ins.inputs[1], WeightArg) and ins.inputs[1].name in slots:
            groups.setdefault(ins.inputs[0], []).append(ins.inputs[1].name)
    out = []
    for value, names in groups.items():
        norm = producer.get(value)
        fold = None
        if norm is not None and norm.kind in (OpKind.RMSNORM, OpKind.LAYERNORM) and not norm.attrs.group \
                and len(norm.outputs) == 1 and isinstance(norm.inputs[1], WeightArg):
            w = norm.inputs[1].name
            if uses.get(w) == 1 and isinstance(plan.weights[w].source, Tensor) and \
                    all(c.kind is OpKind.LINEAR and c.inputs[1].name in slots for c in consumers[value]):
                fold = norm
        out.append((names, fold))
    return out


def _dataflow(plan: Plan) -> tuple[dict[Value, object], dict[Value, list]]:
    """Each value's producing instruction and its consumers, experts' programs included (their values are
    named apart)."""
    producer, consumers = {}, {}
    for ins in plan.program.walk():
        producer.update((o, ins) for o in ins.outputs)
        for a in ins.inputs:
            if isinstance(a, Value):
                consumers.setdefault(a, []).append(ins)
    return producer, consumers


def _weight_uses(plan: Plan) -> dict[str, int]:
    uses: dict[str, int] = {}
    for ins in plan.program.walk():
        for a in ins.inputs:
            if isinstance(a, WeightArg):
                uses[a.name] = uses.get(a.name, 0) + 1
    return uses


def product_folds(plan: Plan, slots: set[str]) -> list[tuple[str, str, str | None]]:
    """(down, up, up's bias or None) for each watched linear whose input is a product act(gate) * up
    where `up` is a watched linear read nowhere else: the down projection's smoothing s can be
    folded into up's output rows (up / s, its bias / s), as AutoAWQ folds mlp.down_proj's into
    mlp.up_proj. Weights read by more than one instruction (tied) are left alone."""
    producer, consumers = _dataflow(plan)
    uses = _weight_uses(plan)

    def foldable(ins) -> bool:
        ws = [a.name for a in ins.inputs[1:] if isinstance(a, WeightArg)]
        return ins.kind is OpKind.LINEAR and ins.inputs[1].name in slots and \
            all(uses.get(w) == 1 and isinstance(plan.weights[w].source, Tensor) for w in ws) and \
            len(consumers.get(ins.outputs[0], [])) == 1

    out = []
    for ins in plan.program.walk():
        if ins.kind is not OpKind.LINEAR or not isinstance(ins.inputs[1], WeightArg) or ins.inputs[1].name not in slots:
            continue
        mul = producer.get(ins.inputs[0])
        if mul is None or mul.kind is not OpKind.MUL or consumers[ins.inputs[0]] != [ins]:
            continue
        for a in mul.inputs:
            up = producer.get(a) if isinstance(a, Value) else None
            if up is not None and foldable(up):
                bias = up.inputs[2].name if len(up.inputs) > 2 and isinstance(up.inputs[2], WeightArg) else None
                out.append((ins.inputs[1].name, up.inputs[1].name, bias))
                break
    return out


def query_key_slots(plan: Plan) -> set[str]:
    """The linear weights whose outputs become attention's queries or keys (through rotary or not):
    AutoAWQ leaves their weights unclipped, their errors multiply in q.k."""
    producer, _ = _dataflow(plan)
    out = set()
    for ins in plan.program.walk():
        if ins.kind is OpKind.ATTENTION:
            for a in ins.inputs[:2]:
                src = producer.get(a)
                while src is not None and src.kind is not OpKind.LINEAR and src.inputs \
                        and isinstance(src.inputs[0], Value):
                    src = producer.get(src.inputs[0])
                if src is not None and src.kind is OpKind.LINEAR and isinstance(src.inputs[1], WeightArg):
                    out.add(src.inputs[1].name)
    return out


def fold_into_norm(norm, s: torch.Tensor, plan: Plan, floats: dict[str, torch.Tensor]) -> None:
    """Divide the norm's output by s: (offset + w) / s - offset, and its bias / s."""
    off = norm.attrs.offset or 0.0
    w = norm.inputs[1].name
    floats[w] = (floats[w].float() + off) / s - off
    if len(norm.inputs) > 2 and isinstance(norm.inputs[2], WeightArg):
        floats[norm.inputs[2].name] = floats[norm.inputs[2].name].float() / s


def int4_desc(group: int = GROUP) -> QuantDesc:
    """The int4 schemes' weight desc (asymmetric, per group) with `group` columns per group."""
    return replace(SCHEMES["int4-wo"].weight, group_size=group)


def rtn_int4(w: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """w round-to-nearest to asymmetric int4 with groups of `group`, dequantized."""
    return quantize_weight(w, int4_desc(group)).dequantize()


def awq_scales(ws: list[torch.Tensor], st: Stats, group: int = GROUP) -> torch.Tensor:
    """AutoAWQ's _search_best_scale: over a grid of alpha, s = mean|x|^alpha (the AWQ paper's form)
    and s = mean|x|^alpha / mean|w|^(1 - alpha) (AutoAWQ's default `duo_scaling`, mean|w| of each
    input channel with every group divided by its max |w|), the s whose quantized (w * s) / s gives
    the smallest output error on the calibration rows. Both forms are searched: the loss picks."""
    x = st.sample()
    mean = (st.abssum / max(st.n, 1)).clamp(min=1e-4)
    w = torch.cat(ws)
    wg = w.abs().reshape(-1, group)
    w_mean = (wg / (wg.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
    ref = x @ w.t()
    best, best_s = math.inf, torch.ones_like(mean)
    for k in range(AWQ_GRID):
        a = k / AWQ_GRID
        for s in (mean.pow(a), (mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)):
            s = s / (s.max() * s.min()).sqrt()
            err = (x @ (rtn_int4(w * s, group) / s).t() - ref).pow(2).mean().item()
            if err < best:
                best, best_s = err, s
    return best_s


def awq_clip(w: torch.Tensor, x: torch.Tensor, group: int = GROUP, sides: bool = True) -> torch.Tensor:
    """AutoAWQ's _search_best_clip: each group's weights clamped to +-(1 - i/20) of its max |w|
    (i < 10), the i whose round-to-nearest int4 gives the group's smallest error in its share of the
    output on the calibration rows x (the migrated input). With `sides`, then each side of the
    asymmetric range alone the same way (the top, then the bottom: the grid's scale and zero point
    move apart). Returns w clamped."""
    out, n = w.shape
    xg = x.reshape(x.shape[0], n // group, group)  # [rows, groups, group]
    wg = w.reshape(out, n // group, group)
    ref = torch.einsum("tgk,cgk->ctg", xg, wg)

    def error(lo, hi):
        q = rtn_int4(torch.maximum(torch.minimum(wg, hi), lo).reshape(out, n), group).reshape(wg.shape)
        return (torch.einsum("tgk,cgk->ctg", xg, q) - ref).pow(2).mean(1).unsqueeze(-1)

    amax = wg.abs().amax(-1, keepdim=True)  # [out, groups, 1]
    lo, hi = -amax, amax.clone()
    best = error(lo, hi)
    searches = [[(-amax * (1 - i / AWQ_GRID), amax * (1 - i / AWQ_GRID)) for i in range(1, AWQ_GRID // 2)]]
    if sides:
        top, bottom = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
        searches += [[(None, top * (1 - i / AWQ_GRID)) for i in range(1, AWQ_GRID // 2)],
                     [(bottom * (1 - i / AWQ_GRID), None) for i in range(1, AWQ_GRID // 2)]]
    for search in searches:
        for c_lo, c_hi in search:
            c_lo, c_hi = lo if c_lo is None else c_lo, hi if c_hi is None else c_hi
            err = error(c_lo, c_hi)
            better = err < best
            best, lo, hi = torch.where(better, err, best), torch.where(better, c_lo, lo), torch.where(better, c_hi, hi)
    return torch.maximum(torch.minimum(wg, hi), lo).reshape(out, n)


def smooth_scales(ws: list[torch.Tensor], st: Stats, alpha: float) -> torch.Tensor:
    """SmoothQuant: s = max|X|^alpha / max|W|^(1 - alpha) per input channel."""
    wmax = torch.cat(ws).abs().amax(0).clamp(min=1e-5)
    return (st.absmax.clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)


# ---------------------------------------------------------------- GPTQ


def gptq(w: torch.Tensor, h: torch.Tensor, act_order: bool, group: int = GROUP, damp: float = 0.01):
    """GPTQ (Frantar et al., AutoGPTQ's fasterquant): columns quantized one by one, the error of
    each spread over the columns not yet quantized through the inverse Hessian's Cholesky factor.
    Asymmetric int4 per group of `group` columns (in quantization order), zero points kept >= 1
    (GPTQ v1 stores zero - 1). Returns (q [out, in] 0..15, scale [out, groups], zero [out, groups],
    g_idx [in] or None)."""
    w = w.float().clone()
    out, n = w.shape
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(n)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(out, n)
    scale = torch.zeros(out, n // group)
    zero = torch.zeros(out, n // group)
    for i1 in range(0, n, group):
        i2 = i1 + group
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out, group), hinv[i1:i2, i1:i2]
        lo, hi = w1.amin(1).clamp(max=0), w1.amax(1).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-8)
        z = (-lo / s).round().clamp(1, 15)
        scale[:, i1 // group], zero[:, i1 // group] = s, z
        for i in range(group):
            col = w1[:, i]
            qi = (col / s + z).round().clamp(0, 15)
            q[:, i1 + i] = qi
            e = (col - (qi - z) * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    q = q[:, inv]
    g_idx = (torch.arange(n) // group)[inv].to(torch.int32) if act_order else None
    return q, scale, zero, g_idx


def gptq_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor | None,
                    group: int = GROUP) -> torch.Tensor:
    """gptq()'s result as the float weight the checkpoint holds (w = (q - zero) * scale of the
    column's group), scales rounded to fp16 as the GPTQ format stores them."""
    cols = g_idx.long() if g_idx is not None else torch.arange(q.shape[1]) // group
    return (q - zero[:, cols]) * scale.half().float()[:, cols]


class GptqRecorder(StepContext):
    """A reference StepContext over all the calibration samples at once (one step, one sequence
    each) that quantizes each watched linear weight with GPTQ when the forward first reaches it —
    from the Hessian of its input there — and goes on with the quantized weight. So every linear's
    Hessian is taken on the outputs of the already quantized linears before it, as the reference
    implementations' layer-by-layer loop does (IST-DASLab/gptq's sequential loop, AutoGPTQ,
    GPTQModel: each layer's inputs are its quantized predecessors' outputs)."""

    def __init__(self, batch, kv, weights, watch: set[str], quant):
        super().__init__(batch, kv, dict(weights))  # a copy: the quantized weights replace float ones here only
        self.watch, self.quant, self.done = watch, quant, set()

    def run(self, prog, env):
        # All the samples run as one batch (32 x 512 tokens: each [T, 1536] value 100 MB), so a value this
        # program computed is dropped after its last use: keeping every one OOM-killed --samples 32 at 24 GiB.
        last = {a: i for i, ins in enumerate(prog.instrs) for a in ins.inputs if isinstance(a, Value)}
        for i, ins in enumerate(prog.instrs):
            w = ins.inputs[1] if ins.kind is OpKind.LINEAR else None
            if isinstance(w, WeightArg) and w.name in self.watch and w.name not in self.done:
                self.weights[w.name] = self.quant(w.name, fetch(ins.inputs[0], env, self.weights))
                self.done.add(w.name)
            out = OPS[ins.kind].reference(self, ins, [fetch(a, env, self.weights) for a in ins.inputs])
            env.update(zip(ins.outputs, out if isinstance(out, tuple) else (out,)))
            for a in ins.inputs:
                if isinstance(a, Value) and last[a] == i and a != prog.output and a not in prog.inputs:
                    del env[a]
        return env[prog.output]


def gptq_sequential(plan: Plan, weights: dict, ids: list[int], watch: set[str], samples: int, seq_len: int,
                    act_order: bool, group: int = GROUP, progress: bool = True) -> dict[str, tuple]:
    """Every watched weight GPTQ-quantized (gptq()'s result by slot), in the model's order, each from
    its input's Hessian over the calibration samples with all earlier linears already quantized
    (GptqRecorder): one forward of the samples as one batch."""
    from tqdm import tqdm

    chunks = calibration_chunks(ids, samples, seq_len)
    page = 16
    tables, start, seqs = [], 0, []
    for c in chunks:
        pages = -(-len(c) // page)
        seqs.append(SeqSlice(start, len(c), 0, tuple(range(len(tables), len(tables) + pages))))
        tables.extend(range(pages))
        start += len(c)
    result: dict[str, tuple] = {}
    bar = tqdm(total=len(watch), desc="gptq", unit="weight", file=sys.stderr, disable=not progress)

    def quant(name: str, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1]).float()
        q, scale, zero, g_idx = result[name] = gptq(weights[name], x.t() @ x, act_order, group)
        bar.update(1)
        return gptq_dequantize(q, scale, zero, g_idx, group).to(weights[name].dtype)

    with torch.no_grad():
        kv = KVStore(plan.sites, len(tables), page, torch.float32, "cpu")
        batch = StepBatch(torch.tensor([t for c in chunks for t in c], dtype=torch.long), seqs)
        ctx = GptqRecorder(batch, kv, weights, watch, quant)
        ctx.run(plan.program, {Value("tokens"): batch.tokens, Value("positions"): ctx.positions})
    bar.close()
    return result


# ---------------------------------------------------------------- writers


def _ct_config(scheme: str, group: int = GROUP, lm_head: bool = False) -> dict:
    """compressed-tensors' quantization_config for a scheme (its documented field names)."""
    def args(bits, kind, strategy, group=None, symmetric=True, dynamic=False):
        return dict(num_bits=bits, type=kind, strategy=strategy, group_size=group, symmetric=symmetric,
                    dynamic=dynamic, actorder=None, block_structure=None, observer=None)
    w, a, fmt = {
        "fp8": (args(8, "float", "tensor"), args(8, "float", "tensor", dynamic=True), "float-quantized"),
        "fp8-static": (args(8, "float", "tensor"), dict(args(8, "float", "tensor"), observer="minmax"),
                       "float-quantized"),
        "fp8-channel": (args(8, "float", "channel"), args(8, "float", "token", dynamic=True), "float-quantized"),
        "int8-wo": (args(8, "int", "channel"), None, "int-quantized"),
        "smoothquant": (args(8, "int", "channel"), args(8, "int", "token", dynamic=True), "int-quantized"),
        "int4-wo": (args(4, "int", "group", group, symmetric=False), None, "pack-quantized"),
    }[scheme]
    return dict(quant_method="compressed-tensors", format=fmt, quantization_status="compressed",
                config_groups={"group_0": dict(targets=["Linear"], weights=w, input_activations=a,
                                               output_activations=None, format=fmt)},
                ignore=[] if lm_head else ["lm_head"], kv_cache_scheme=None, sparsity_config={}, transform_config={})


def _ct_kv_config() -> dict:
    """compressed-tensors' config of a checkpoint whose weights stay float and whose KV cache is
    fp8 with static per-tensor scales (llm-compressor's `kv_cache_scheme`; vLLM applies the
    scales with --kv-cache-dtype fp8)."""
    kv = dict(num_bits=8, type="float", strategy="tensor", group_size=None, symmetric=True, dynamic=False,
              actorder=None, block_structure=None, observer="minmax")
    return dict(quant_method="compressed-tensors", format="dense", quantization_status="compressed",
                config_groups={}, ignore=["lm_head"], kv_cache_scheme=kv, sparsity_config={}, transform_config={})


def act_scale(absmax: torch.Tensor) -> float:
    """A static fp8 activation scale: the largest |input| calibration saw over e4m3's largest (amax / 448, as
    llm-compressor's minmax observer gives it; 1.0 for an input that was all zeros)."""
    return kv_scale(absmax)


def kv_scale(amax: torch.Tensor) -> float:
    """The fp8 cache scale that maps the largest |value| calibration saw to e4m3's largest
    (amax / 448; 1.0 for a site whose values were all zero)."""
    m = float(amax.max())
    return m / FP8_MAX if m > 0 and math.isfinite(m) else 1.0


def kv_means_json(plan: Plan, means: dict[int, torch.Tensor]) -> str:
    """kiln_kv_means.json: each attention module's mean key per channel ([kv_heads][head_dim] floats), which
    --kv-cache-dtype fp8-rotated subtracts before rounding (quant_formats.read_kv_means reads it)."""
    from .quant_formats import attention_modules

    modules = {}
    for site, module in attention_modules(plan).items():
        if site not in means:
            raise QuantizeError(f"calibration never reached attention site {site} ({plan.sites[site].path})")
        modules[module] = [[round(float(x), 7) for x in row] for row in means[site]]
    lines = ",\n".join(f"  {json.dumps(m)}: {json.dumps(rows)}" for m, rows in modules.items())  # a module a line
    return ('{"format": "fp8-rotated KV cache key means (Kiln): the mean key per channel, after rotary embedding",\n'
            f' "modules": {{\n{lines}\n }}}}\n')


def _kv_scale_tensors(plan: Plan, amax: dict[int, tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Each attention module's `k_scale` / `v_scale` (fp32 [1]), where llm-compressor puts them."""
    from .quant_formats import attention_modules

    out = {}
    for site, module in attention_modules(plan).items():
        if site not in amax:
            raise QuantizeError(f"calibration never reached attention site {site} ({plan.sites[site].path})")
        k, v = amax[site][:2]
        out[f"{module}.k_scale"] = torch.tensor([kv_scale(k)], dtype=torch.float32)
        out[f"{module}.v_scale"] = torch.tensor([kv_scale(v)], dtype=torch.float32)
    return out


def _ct_tensors(m: str, qw, scheme: str) -> dict[str, torch.Tensor]:
    out, n_in = qw.shape
    if qw.desc.dtype in ("fp8", "int8"):
        s = qw.scale.float().reshape(1) if qw.scale.dim() == 0 else qw.scale.float().reshape(out, 1)
        return {f"{m}.weight": qw.q, f"{m}.weight_scale": s}
    q = unpack_int4(qw.q)  # 0..15 = compressed-tensors' signed value + 8, the same bits it packs
    return {f"{m}.weight_packed": pack_int32_nibbles(q, 1), f"{m}.weight_scale": qw.scale.float(),
            f"{m}.weight_zero_point": pack_int32_nibbles(qw.zero.round().to(torch.uint8), 0),
            f"{m}.weight_shape": torch.tensor([out, n_in])}


def _awq_tensors(m: str, q, scale, zero) -> dict[str, torch.Tensor]:
    # output column j of each run of 8 goes to nibble _AWQ_NIBBLE[j] (AutoAWQ's order_map, inverted)
    return {f"{m}.qweight": pack_int32_nibbles(q.t(), 1, _AWQ_NIBBLE),
            f"{m}.qzeros": pack_int32_nibbles(zero.t(), 1, _AWQ_NIBBLE),
            f"{m}.scales": scale.t().contiguous().half()}


def _gptq_tensors(m: str, q, scale, zero, g_idx, group: int = GROUP) -> dict[str, torch.Tensor]:
    n_in = q.shape[1]
    if g_idx is None:
        g_idx = (torch.arange(n_in) // group).to(torch.int32)
    return {f"{m}.qweight": pack_int32_nibbles(q.t(), 0), f"{m}.qzeros": pack_int32_nibbles(zero.t() - 1, 1),
            f"{m}.scales": scale.t().contiguous().half(), f"{m}.g_idx": g_idx}


# ---------------------------------------------------------------- the command


def quantize_checkpoint(checkpoint: str | Path, scheme: str, out: str | Path, calibration: str | None = None,
                        alpha: float = 0.5, samples: int = 32, seq_len: int = 512, act_order: bool = False,
                        force: bool = False, spec: str | Path | None = None, progress: bool = True,
                        migrate: bool = True, group_size: int | None = None, lm_head: bool = False) -> Path:
    """Quantize a float checkpoint (a safetensors folder or a GGUF file) with `scheme` and write the
    result to `out` (module doc). `migrate=False` skips SmoothQuant's / AWQ's scale migration (the
    round-to-nearest baseline). `group_size`: the int4 schemes' group (default 128). `lm_head`: the
    round-to-nearest schemes (LM_HEAD_SCHEMES) quantize the LM head too (not listed in `ignore`)."""
    from .generate import resolve_source
    from .model import spec_for_config

    if scheme not in QUANTIZE_SCHEMES:
        raise QuantizeError(f"--scheme {scheme}: not a scheme kiln quantize writes; schemes: "
                            + ", ".join(QUANTIZE_SCHEMES))
    if act_order and scheme != "gptq":
        raise QuantizeError("--act-order applies to --scheme gptq only")
    if group_size is not None and scheme not in INT4_SCHEMES:
        raise QuantizeError(f"--group-size applies to the int4 schemes ({', '.join(INT4_SCHEMES)}), "
                            f"not --scheme {scheme}")
    if lm_head and scheme not in LM_HEAD_SCHEMES:
        raise QuantizeError(f"--lm-head applies to the round-to-nearest schemes ({', '.join(LM_HEAD_SCHEMES)}), "
                            f"not --scheme {scheme}")
    if group_size is not None and group_size < 1:
        raise QuantizeError(f"--group-size {group_size}: must be a positive integer")
    group = group_size or GROUP
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise QuantizeError(f"--out {out} exists and is not empty; pass --force to replace it")
    ckpt = open_checkpoint(resolve_source(checkpoint))  # 'default': the embedded model's GGUF
    if ckpt.format not in ("safetensors", "gguf"):
        raise QuantizeError(f"CHECKPOINT {checkpoint}: kiln quantize reads a Hugging Face safetensors folder "
                            f"or a GGUF file (got {ckpt.format})")
    if (ckpt.config or {}).get("quantization_config") is not None:
        raise QuantizeError(f"CHECKPOINT {checkpoint} is already quantized (config.json quantization_config)")
    spec_path = spec or spec_for_config(ckpt.config, str(ckpt.path))
    plan = passes.build(load_spec(spec_path), ckpt.config)
    modules = linear_modules(plan, lm_head) if scheme != "fp8-kv" else {}  # slot -> module (fp8-kv: float)
    if not modules and scheme != "fp8-kv":
        raise QuantizeError(f"CHECKPOINT {checkpoint}: no linear weight can be quantized")
    heads = sorted(set(modules.values()) - set(linear_modules(plan).values())) if lm_head else []
    if lm_head and not heads:
        raise QuantizeError(f"--lm-head: the LM head of CHECKPOINT {checkpoint} is tied to its embedding table (one "
                            f"tensor) or read by more than its linear, so it cannot be quantized")
    if heads and heads != ["lm_head"]:  # the config's `ignore` names modules: ours lists 'lm_head' or nothing
        raise QuantizeError(f"--lm-head: the LM head's module is {', '.join(map(repr, heads))}, not 'lm_head'")
    if scheme in INT4_SCHEMES:
        for slot in modules:
            n_in = plan.weights[slot].shape[1]
            if n_in % group:
                raise QuantizeError(f"--group-size {group}{' (the default)' if group_size is None else ''}: weight "
                                    f"'{slot}' ({modules[slot]}) has {n_in} input "
                                    f"features, not whole groups of {group} (--scheme {scheme}); give a "
                                    f"--group-size that divides {n_in}")
    # GGUF: dequantized, rotary rows back in Hugging Face order (load_weights undoes the permutation)
    weights = load_weights(plan, ckpt, torch.float32, "cpu")
    # float tensors to write back (norms may change), by slot
    floats = {n: w for n, w in weights.items() if isinstance(plan.weights[n].source, Tensor)}
    stats = {}
    if scheme in ("smoothquant", "awq", "fp8-static"):
        stats = calibrate(plan, weights, _calibration_ids(ckpt, calibration), set(modules), samples, seq_len,
                          False, progress)
    gptq_out = gptq_sequential(plan, weights, _calibration_ids(ckpt, calibration), set(modules), samples, seq_len,
                               act_order, group, progress) if scheme == "gptq" else {}
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, str] = {}  # other files of the checkpoint: name -> text
    if scheme == "fp8-kv":
        if not plan.sites:
            raise QuantizeError(f"CHECKPOINT {checkpoint}: the model has no attention KV cache to calibrate")
        amax = calibrate_kv(plan, weights, _calibration_ids(ckpt, calibration), samples, seq_len, progress)
        tensors.update(_kv_scale_tensors(plan, amax))
        extra[KV_MEANS_NAME] = kv_means_json(plan, {site: m for site, (_, _, m) in amax.items()})
    ws = {n: weights[n].float() for n in modules}
    moved = {}  # slot -> the s its input was divided by
    if scheme in ("smoothquant", "awq") and migrate:
        for names, norm in input_groups(plan, set(modules)):
            if norm is None or any(n not in stats for n in names):
                continue
            st = stats[names[0]]
            s = smooth_scales([ws[n] for n in names], st, alpha) if scheme == "smoothquant" else \
                awq_scales([ws[n] for n in names], st, group)
            fold_into_norm(norm, s, plan, floats)
            for n in names:
                ws[n], moved[n] = ws[n] * s, s
    if scheme == "awq" and migrate:
        for down, up, bias in product_folds(plan, set(modules)):  # AutoAWQ's up_proj -> down_proj
            if down not in stats:
                continue
            s = awq_scales([ws[down]], stats[down], group)
            ws[down], moved[down] = ws[down] * s, s
            ws[up] = ws[up] / s[:, None]
            if bias is not None:
                floats[bias] = floats[bias].float() / s
        qk = query_key_slots(plan)
        for n in modules:
            if n in stats and n not in qk:
                ws[n] = awq_clip(ws[n], stats[n].sample(AWQ_CLIP_ROWS) / moved.get(n, 1.0), group)
    for n, m in modules.items():
        if scheme == "gptq":
            if n not in gptq_out:
                raise QuantizeError(f"calibration never reached weight '{n}'; give a longer --calibration text")
            q, scale, zero, g_idx = gptq_out[n]
            tensors.update(_gptq_tensors(m, q.to(torch.uint8), scale, zero.to(torch.uint8), g_idx, group))
        elif scheme == "awq":
            qw = quantize_weight(ws[n], int4_desc(group), n)
            tensors.update(_awq_tensors(m, unpack_int4(qw.q), qw.scale, qw.zero.round().to(torch.uint8)))
        elif scheme == "fp8-static":
            if n not in stats:
                raise QuantizeError(f"calibration never reached weight '{n}'; give a longer --calibration text")
            tensors.update(_ct_tensors(m, quantize_weight(ws[n], SCHEMES["fp8"].weight, n), scheme))
            tensors[f"{m}.input_scale"] = torch.tensor([act_scale(stats[n].absmax)], dtype=torch.float32)
        else:
            desc: QuantDesc = int4_desc(group) if scheme == "int4-wo" else SCHEMES[scheme].weight
            tensors.update(_ct_tensors(m, quantize_weight(ws[n], desc, n), scheme))
    quantized_tensors = {f"{m}.weight" for m in modules.values()}
    for n, t in floats.items():
        name = plan.weights[n].source.name
        if name not in quantized_tensors:
            tensors[name] = t.to(_stored_dtype(ckpt, name))
    used = set(tensors) | quantized_tensors
    leftover = ckpt.unexpected(used) if ckpt.format == "gguf" else [n for n in ckpt.names() if n not in used]
    for name in leftover:  # tensors the spec does not map (ignored ones) travel as they are
        tensors[name] = ckpt.get(name)
    config = dict(ckpt.config)
    if ckpt.format == "gguf":
        config = _hf_config(config, load_spec(spec_path))
    if scheme == "awq":
        config["quantization_config"] = dict(quant_method="awq", bits=4, group_size=group, zero_point=True,
                                             version="gemm", modules_to_not_convert=None)
    elif scheme == "gptq":
        config["quantization_config"] = dict(quant_method="gptq", bits=4, group_size=group, desc_act=act_order,
                                             sym=False, checkpoint_format="gptq", static_groups=False,
                                             true_sequential=False, damp_percent=0.01)
    elif scheme == "fp8-kv":
        config["quantization_config"] = _ct_kv_config()
    else:
        config["quantization_config"] = _ct_config(scheme, group, lm_head)
    tokenizer = _gguf_tokenizer(ckpt) if ckpt.format == "gguf" else None
    return _write(ckpt, out, config, tensors, force, tokenizer, extra)


def _hf_config(config: dict, spec) -> dict:
    """A GGUF's synthesised config as a Hugging Face config.json: the spec's architecture named
    (what `spec_for_config` and other readers look for), no GGUF-only key."""
    config = {k: v for k, v in config.items() if k != "gguf_architecture"}
    config["architectures"] = list(spec.architectures[:1])
    if spec.gguf_arch:
        config.setdefault("model_type", spec.gguf_arch)
    config["torch_dtype"] = "float32"
    return config


def _gguf_tokenizer(ckpt: Checkpoint):
    from .tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(ckpt)


def _stored_dtype(ckpt: Checkpoint, name: str) -> torch.dtype:
    if ckpt.format == "gguf":  # dequantized block values are exact in fp32 only; F16/BF16 stay as stored
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(ckpt.info(name).dtype, torch.float32)
    return getattr(torch, ckpt.info(name).dtype)


def _calibration_ids(ckpt: Checkpoint, calibration: str | None) -> list[int]:
    from .eval import calibration_text, read_text
    from .tokenizer import Tokenizer

    text = read_text(calibration, "--calibration") if calibration else calibration_text()
    return Tokenizer.from_checkpoint(ckpt).encode(text, add_special_tokens=False)


def _write(ckpt: Checkpoint, out: Path, config: dict, tensors: dict[str, torch.Tensor], force: bool,
           tokenizer=None, extra: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:  # a GGUF's tokenizer lives in its metadata
            tokenizer.save(tmp)
        for f in Path(ckpt.path).iterdir() if Path(ckpt.path).is_dir() else ():  # tokenizer, chat template ...
            if f.is_file() and f.name != CONFIG_NAME and not f.name.endswith((".safetensors", ".index.json", ".bin")):
                shutil.copy2(f, tmp / f.name)
        for name, text in (extra or {}).items():  # (after the copies: a source's own is replaced)
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
