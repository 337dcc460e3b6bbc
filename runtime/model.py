"""Loading a model (spec + checkpoint -> backend) and driving one sequence through it.

`load_model` is the one entry point every command uses; `SingleSequence` is the
smallest possible driver (one sequence, its own KV store and block table) used by
`kiln verify` and `kiln generate` — the batched engine lives in runtime/engine.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kiln.dsl import Plan, load_spec, passes
from kiln.dsl.dtypes import dtype as dtype_of
from kiln.dsl.errors import SpecError
from kiln.dsl.loader import MODELS_DIR, spec_files
from kiln.dsl.quant import SCHEMES, quantize_weight, share_scale, split_name

from . import quant_formats
from .backend import Backend
from .batch import SeqSlice, StepBatch
from .checkpoint import Checkpoint, open_checkpoint
from .engine_dir import is_engine_dir, read_engine
from .kv_store import KVStore
from .reference import ReferenceModel
from .weights import load_weights


def spec_for_config(config: dict[str, Any], config_file: str = "config.json") -> Path:
    """The spec in models/ that declares one of the config's `architectures` (or its GGUF arch)."""
    wanted = list(config.get("architectures") or [])
    gguf_arch = config.get("gguf_architecture")
    for path in spec_files():
        spec = load_spec(path)
        if any(a in spec.architectures for a in wanted) or (gguf_arch and spec.gguf_arch == gguf_arch):
            return path
    what = ", ".join(wanted) or (f"GGUF architecture '{gguf_arch}'" if gguf_arch else "no architectures")
    raise SpecError(f"{config_file}: no spec in {MODELS_DIR} declares {what}", None,
                    "name the spec to use (`kiln verify SPEC`, `kiln build SPEC`, `--spec SPEC` for generate "
                    "and serve), or write one (docs/adding-an-architecture.md)")


@dataclass
class LoadedModel:
    plan: Plan
    model: Backend
    checkpoint: Checkpoint | None
    dtype: torch.dtype
    device: torch.device


def load_model(checkpoint: str | Path, spec: str | Path | None = None, dtype: str = "fp32",
               device: str = "cpu", backend: str = "reference", quantization: str = "none",
               kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1,
               expert_parallel: bool = False, pipeline_parallel_size: int = 1) -> LoadedModel:
    """`quantization`: a scheme of kiln.dsl.quant.SCHEMES applied on load ("fp8", "int8-wo", ...; with
    "+lm-head" the LM head too; "gguf" keeps a GGUF file's blocks); a pre-quantized checkpoint brings its own.
    `kv_cache_dtype`: "auto" (the run dtype), "fp8" or "fp8-rotated" (runtime/kv_store.py; the reference and
    cuda backends). `tensor_parallel_size` > 1: the model split
    over that many processes of this machine (runtime/distributed.py: the reference backend on the
    CPU over gloo, or `backend="cuda"` with `device="cuda"`: one GPU per rank, NCCL), MoE experts whole
    per rank with `expert_parallel` (reference only); `pipeline_parallel_size` > 1: its layers in that
    many stages, each on its own process(es) (reference only)."""
    if tensor_parallel_size != 1 or expert_parallel or pipeline_parallel_size != 1:
        return _load_parallel(checkpoint, spec, dtype, device, backend, quantization, kv_cache_dtype,
                              tensor_parallel_size, expert_parallel, pipeline_parallel_size)
    if is_engine_dir(checkpoint):  # an engine directory from `kiln build`
        if quantization != "none":
            raise SpecError(f"--quantization {quantization}: an engine directory is already built; "
                            f"quantize when building it (`kiln build ... --quantization {quantization}`)", None)
        return load_engine(checkpoint, device)
    ckpt = open_checkpoint(checkpoint)
    spec_path = spec if spec is not None else spec_for_config(ckpt.config, str(ckpt.path))
    plan = passes.build(load_spec(spec_path), ckpt.config, _config_name(ckpt))
    plan, fmt = quantize_plan(plan, ckpt, quantization, kv_cache_dtype)
    torch_dtype = dtype_of(dtype).torch
    weights = share_scales(plan, load_weights(plan, ckpt, torch_dtype, device, fmt))
    return LoadedModel(plan, make_backend(plan, weights, backend, device), ckpt, torch_dtype, torch.device(device))


def _load_parallel(checkpoint, spec, dtype, device, backend, quantization, kv_cache_dtype, tp: int,
                   ep: bool, pp: int = 1) -> LoadedModel:
    """The tensor / pipeline-parallel load: what the shard and stage passes and the process groups
    cannot run yet is refused here, naming the option, before any process starts. The cuda backend
    runs `--tp N` (not `--pp`, not `--ep`) with `--device cuda`: rank r on cuda:r."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise SpecError(f"--tp {tp}: the number of tensor-parallel ranks must be a positive integer", None)
    if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
        raise SpecError(f"--pp {pp}: the number of pipeline stages must be a positive integer", None)
    opt = f"--tp {tp}" if pp == 1 else f"--pp {pp}" if tp == 1 else f"--tp {tp} --pp {pp}"
    what = "tensor parallelism" if pp == 1 else "pipeline parallelism"
    flag = opt.split()[0]
    if ep and tp == 1:
        raise SpecError("--ep splits MoE experts across tensor-parallel ranks: it needs --tp N with N > 1", None)
    gpu = backend == "cuda" and pp == 1 and not ep
    if backend == "cuda" and not gpu:
        extra = "pipeline stages" if pp > 1 else "experts whole per rank (--ep)"
        raise SpecError(f"{opt}{' --ep' if ep and pp == 1 else ''}: {extra} run on the reference backend (CPU, "
                        f"gloo) only, not --backend cuda", None,
                        f"leave --backend out (or --backend reference) with {flag}"
                        + ("; the cuda backend runs --tp N alone" if pp > 1 else "; or leave --ep out"))
    if backend not in ("reference", "cuda"):
        raise SpecError(f"{opt}: {what} runs on the reference or cuda backend, not --backend {backend}", None)
    if gpu and str(device) not in ("cuda", "cuda:0"):
        raise SpecError(f"{opt} --backend cuda: rank r runs on cuda:r; give --device cuda, not --device {device}",
                        None)
    if not gpu and not str(device).startswith("cpu"):
        how = "the cuda backend (--backend cuda --tp N)" if pp == 1 and not ep else "the CPU only"
        raise SpecError(f"{opt}: {what} on --device {device} runs on {how}, not --backend {backend}", None,
                        f"use --device cpu with {flag}" + (", or --backend cuda" if pp == 1 and not ep else ""))
    from .distributed import check_gpus, join_torchrun, spawn_workers, under_torchrun

    torchrun = under_torchrun()  # torchrun started this command's ranks (on one node or several)
    if gpu and not torchrun:
        check_gpus(tp)
    if is_engine_dir(checkpoint):
        raise SpecError(f"{opt}: {checkpoint} is an engine directory; {what} loads a checkpoint "
                        f"(a Hugging Face folder or .gguf file)", None)
    if quantization != "none":
        raise SpecError(f"{opt} with --quantization {quantization}: quantized weights are not split across "
                        f"ranks yet", None, f"leave --quantization out with {flag}")
    if kv_cache_dtype != "auto":
        raise SpecError(f"{opt} with --kv-cache-dtype {kv_cache_dtype}: the split KV cache runs in the run "
                        f"dtype only", None, f"leave --kv-cache-dtype out with {flag}")
    ckpt = open_checkpoint(checkpoint)
    if quant_formats.detect(ckpt, "none") is not None:
        raise SpecError(f"{opt}: {ckpt.path} is a quantized checkpoint; quantized weights are not split "
                        f"across ranks yet", None)
    spec_path = spec if spec is not None else spec_for_config(ckpt.config, str(ckpt.path))
    torch_dtype = dtype_of(dtype).torch
    start = join_torchrun if torchrun else spawn_workers  # (ranks other than 0 end inside join_torchrun)
    model = start(ckpt.path, spec_path, torch_dtype, tp, "ep" if ep else "tp", stages=pp, backend=backend)
    return LoadedModel(model.plan, model, ckpt, torch_dtype, torch.device("cuda:0" if gpu else device))


def quantize_plan(plan: Plan, ckpt: Checkpoint | None, quantization: str, kv_cache_dtype: str = "auto"):
    """The plan with its weights' (and KV cache's) storage set, and the checkpoint's quantized
    format (or None)."""
    if quantization not in passes.QUANT_SCHEMES:
        raise SpecError(f"--quantization {quantization}: no such scheme", None,
                        "schemes: " + ", ".join(passes.QUANT_SCHEMES))
    fmt = quant_formats.detect(ckpt, quantization) if ckpt is not None else None
    # a checkpoint's calibrated KV scales (`kiln quantize --scheme fp8-kv`): read (and checked) always,
    # used by an fp8 cache; like vLLM, a run-dtype cache ignores them
    kv_scales = fmt.kv_scales(plan) if fmt is not None else {}
    kv_means = quant_formats.read_kv_means(ckpt, plan) if ckpt is not None and kv_cache_dtype == "fp8-rotated" \
        else {}
    if kv_cache_dtype != "auto":
        scales = kv_scales if kv_cache_dtype.startswith("fp8") else None
        plan = passes.run(plan, [passes.kv_cache(kv_cache_dtype, scales, kv_means)])
    if fmt is not None:
        if quantization not in ("none", fmt.scheme):
            raise SpecError(f"the checkpoint is already quantized ({fmt.scheme}); --quantization {quantization} "
                            f"cannot be applied on top", None, "leave --quantization out to run it as stored")
        return passes.run(plan, [passes.quantize(fmt.scheme, fmt.descs(plan))]), fmt
    scheme, _ = split_name(quantization)
    if not scheme.on_load:
        why = "keeps a GGUF file's blocks: load a GGUF file" if quantization == "gguf" else \
            f"needs calibration: make a checkpoint with `kiln quantize CHECKPOINT --scheme {quantization}`"
        raise SpecError(f"--quantization {quantization} {why}", None,
                        "on-load schemes: " + ", ".join(n for n, s in SCHEMES.items() if s.on_load))
    return passes.run(plan, [passes.quantize(quantization)]), None


BACKENDS = ("reference", "cuda")


def load_engine(engine_dir: str | Path, device: str = "cuda") -> LoadedModel:
    """A `LoadedModel` from an engine directory of either backend."""
    parts = read_engine(engine_dir, device)
    dtype = dtype_of(parts.manifest["dtype"]).torch
    if parts.manifest["backend"] == "tensorrt":
        from .trt_backend import TrtModel
        model = TrtModel(parts.plan, Path(engine_dir), parts.manifest, device)
    else:
        model = make_backend(parts.plan, parts.weights, "cuda" if str(device).startswith("cuda") else "reference",
                             device)
    return LoadedModel(parts.plan, model, None, dtype, torch.device(device))


def make_backend(plan: Plan, weights: dict[str, torch.Tensor], backend: str, device: str):
    runs = (lambda d: True) if backend == "reference" else cuda_runs() if backend == "cuda" else \
        (lambda d: not d.quantized)
    refused = passes.unsupported_weights(plan, backend, runs)
    if refused:
        raise SpecError(refused[0] + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""), None)
    if backend == "tensorrt" and any(s.kv_dtype == "fp8-rotated" for s in plan.sites):
        raise SpecError("--kv-cache-dtype fp8-rotated runs on the reference and cuda backends (no TensorRT layer "
                        "writes its rotated, shifted keys)", None, "use --kv-cache-dtype fp8, or --backend cuda")
    if backend == "reference":
        return ReferenceModel(plan, weights)
    if backend == "cuda":
        if not str(device).startswith("cuda") or not torch.cuda.is_available():
            raise SpecError("the cuda backend needs a CUDA GPU (--device cuda)", None,
                            "use --backend reference on a machine without a GPU")
        from .cuda_backend import CudaModel
        return CudaModel(plan, weights)
    raise SpecError(f"unknown backend '{backend}'", None, "backends: " + ", ".join(BACKENDS))


def cuda_runs():
    """The cuda backend's test of a weight format (imported when asked: it needs cuda-python)."""
    from .cuda_quant import runs

    return runs


def random_model(spec: str | Path, config: dict[str, Any] | None = None, dtype: str = "fp32",
                 device: str = "cpu", seed: int = 0, backend: str = "reference",
                 quantization: str = "none", kv_cache_dtype: str = "auto",
                 act_scale: float | None = None) -> LoadedModel:
    """A model with random weights made directly on the device (no checkpoint, no download):
    for benchmarks and runtime tests. Norm weights are near 1, others N(0, 0.02); an on-load
    `quantization` scheme quantizes them as a checkpoint's would be. `act_scale`: with a scheme of fp8 weights
    and per-tensor activations, those are quantized with this static scale, as with a checkpoint's calibrated
    input_scale (ModelOpt FP8, TensorRT-LLM's recipe; `bench throughput --fp8-act-scale`): random weights have
    nothing to calibrate on, so one scale stands in for them in a measurement of the static path's speed."""
    plan, _ = quantize_plan(passes.build(load_spec(spec), config), None, quantization, kv_cache_dtype)
    if act_scale is not None:
        plan = static_act_scales(plan, quantization, act_scale)
    torch_dtype = dtype_of(dtype).torch
    gen = torch.Generator(device=device).manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for slot in plan.weights.values():
        if slot.source is None or slot.name in weights:
            continue
        t = torch.randn(slot.shape, generator=gen, device=device, dtype=torch.float32) * 0.02
        if len(slot.shape) == 1:
            t += 1.0
        weights[slot.name] = quantize_weight(t, slot.quant, slot.name) if slot.quant.quantized else t.to(torch_dtype)
        if slot.quant.act_static:
            weights[slot.name].input_scale = torch.tensor(float(act_scale), device=device)
    for slot in plan.weights.values():
        if slot.source is not None and slot.name not in weights:  # a tie: the tensor it names
            weights[slot.name] = weights[plan.alias_target(slot.name)]
    weights = share_scales(plan, weights)
    return LoadedModel(plan, make_backend(plan, weights, backend, device), None, torch_dtype, torch.device(device))


def static_act_scales(plan: Plan, quantization: str, act_scale: float) -> Plan:
    """The plan with every quantized weight's activations quantized with a static per-tensor scale (random_model's
    act_scale): only a scheme of fp8 weights with per-tensor activations has one."""
    if not (isinstance(act_scale, (int, float)) and math.isfinite(act_scale) and act_scale > 0):
        raise ValueError(f"act_scale must be a positive finite number, got {act_scale!r}")
    quantized = [s for s in plan.weights.values() if s.quant.quantized]
    if not quantized or any(s.quant.dtype != "fp8" or s.quant.act != "fp8_tensor" for s in quantized):
        raise ValueError(f"a static activation scale needs fp8 weights with per-tensor activations "
                         f"(--quantization fp8), not {quantization!r}")
    return dataclasses.replace(plan, weights={
        name: dataclasses.replace(s, quant=dataclasses.replace(s.quant, act_static=True)) if s.quant.quantized else s
        for name, s in plan.weights.items()})


def share_scales(plan: Plan, weights: dict) -> dict:
    """Sibling weights that one GEMM may run requantized to one scale (dsl.quant.share_scale)."""
    for group in passes.sibling_groups(plan):
        weights.update(zip(group, share_scale([weights[n] for n in group])))
    return weights


def _config_name(ckpt: Checkpoint) -> str:
    return str(ckpt.path) if ckpt.format == "gguf" else str(Path(ckpt.path) / "config.json")


class SingleSequence:
    """One sequence with a private KV store: prefill, then one token at a time."""

    def __init__(self, loaded: LoadedModel, max_tokens: int, page_size: int = 16):
        pages = -(-max_tokens // page_size)
        self.model = loaded.model
        self.kv = KVStore(loaded.plan.sites, pages, page_size, loaded.dtype, loaded.device)
        # Deliberately non-contiguous pages: the reference must follow the block table.
        self.block_table = tuple(reversed(range(pages)))
        self.length = 0
        self.device = loaded.device

    def step(self, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        batch = StepBatch(torch.tensor(tokens, dtype=torch.long, device=self.device),
                          [SeqSlice(0, len(tokens), self.length, self.block_table)])
        logits = self.model.forward(batch, self.kv, all_logits=all_logits)
        self.length += len(tokens)
        return logits
