"""`kiln build`: spec + checkpoint -> an engine directory (layout: runtime/engine_dir.py), and
`kiln run`, which generates from one.

The layout, for reference:

    manifest.json        spec name and sha256, Kiln / TensorRT versions, target archs, dtype,
                         limits, I/O tensors with their profile ranges
    config.json          the checkpoint's config (binds the spec's parameters again at load)
    spec/*.kiln          the spec and the specs it extends
    weights.safetensors  converted weights under Kiln's names, in the run dtype
    tokenizer files      when the checkpoint folder has them
    kernels/*.cu         generated CUDA sources (cuda backend)
    network.py           generated TensorRT network module (tensorrt backend)
    model.engine         serialized TensorRT engine (tensorrt backend)

The build writes into a temporary sibling directory and renames it at the end, so a
failure leaves nothing at ENGINE_DIR.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from kiln.codegen.trt_api import BF16_MIN_SM, DTYPES, RTX_ARCHS, TensorRTMissing, arch_number, load_tensorrt
from kiln.codegen.trt_layers import TrtLoweringError
from kiln.codegen.trt_network import Limits, io_tensors, render_network
from kiln.dsl import Plan, load_spec, passes
from kiln.dsl.dtypes import RUN_DTYPES

from .checkpoint import open_checkpoint
from .engine_dir import FORMAT, TOKENIZER_FILES, BuildError, _sha256, read_manifest, save_weights  # noqa: F401
from .model import cuda_runs, quantize_plan, spec_for_config
from .weights import load_weights

BACKENDS = ("cuda", "tensorrt")
DEFAULT_RTX_ARCHS = ("sm80", "sm86", "sm89", "sm120")


def build(spec: str | Path | None, checkpoint: str | Path, out: str | Path, backend: str = "tensorrt",
          dtype: str = "fp16", max_batch: int = 8, max_tokens: int = 2048, max_seq_len: int = 4096,
          page_size: int = 16, archs: tuple[str, ...] | None = None, progress: bool = True,
          quantization: str = "none") -> Path:
    out = Path(out)
    if backend not in BACKENDS:
        raise BuildError(f"unknown backend '{backend}' (backends: {', '.join(BACKENDS)})")
    if dtype not in DTYPES:
        raise BuildError(f"dtype '{dtype}' is not supported by the {backend} backend (supported: "
                         f"{', '.join(DTYPES)})")
    for name, v in (("max_batch", max_batch), ("max_tokens", max_tokens), ("max_seq_len", max_seq_len),
                    ("page_size", page_size)):
        if not isinstance(v, int) or v < 1:
            raise BuildError(f"{name} must be a positive integer, got {v!r}")
    if out.exists():
        raise BuildError(f"{out} already exists; remove it or choose another --out")
    if not out.parent.is_dir():
        raise BuildError(f"parent folder of {out} does not exist")
    limits = Limits(max_batch, max_tokens, max_seq_len, page_size)
    trt = _tensorrt(dtype, archs) if backend == "tensorrt" else None
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    steps = ["check spec", "convert weights", "write sources"] + (["build TensorRT engine"] if trt else [])
    bar = _progress(steps, progress)
    try:
        tmp.mkdir()
        ckpt = open_checkpoint(checkpoint)
        if spec is None:
            spec = spec_for_config(ckpt.config, str(ckpt.path))
        ir_spec = load_spec(spec)
        plan = passes.build(ir_spec, ckpt.config, str(ckpt.path) if ckpt.format == "gguf"
                            else str(Path(ckpt.path) / "config.json"))
        plan, fmt = quantize_plan(plan, ckpt, quantization)
        refused = passes.unsupported_weights(plan, backend, cuda_runs() if backend == "cuda" else
                                             lambda d: not d.quantized)
        if refused:
            raise BuildError(refused[0] + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""))
        # An op TensorRT cannot express stops the build here, before any weight is read.
        network = render_network(plan, dtype, limits) if backend == "tensorrt" else None
        bar.advance()
        weights = load_weights(plan, ckpt, RUN_DTYPES[dtype].torch, fmt=fmt)
        save_weights(plan, weights, tmp / "weights.safetensors")
        bar.advance()
        files = _copy_sources(plan, ckpt, tmp)
        manifest = _manifest(plan, backend, dtype, limits, files)
        if backend == "cuda":
            manifest["kernels"] = _write_kernels(plan, dtype, page_size, tmp / "kernels")
        else:
            (tmp / "network.py").write_text(network)
        bar.advance()
        if trt is not None:
            refit = torch.cuda.is_available()
            engine = build_engine(trt, tmp / "network.py", weights, archs or DEFAULT_RTX_ARCHS if trt.rtx else None,
                                  refit)
            manifest["refittable"] = refit
            (tmp / "model.engine").write_bytes(engine)
            manifest["tensorrt"] = {"module": trt.name, "flavor": trt.flavor, "version": trt.version}
            manifest["target_archs"] = list(archs or DEFAULT_RTX_ARCHS) if trt.rtx else [_current_arch()]
            manifest["files"] += ["network.py", "model.engine"]
            bar.advance()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.rename(out)
    except TrtLoweringError as e:
        raise BuildError(f"cannot build a TensorRT engine for {plan.spec.file}: {e}") from None
    finally:
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tensorrt(dtype: str, archs: tuple[str, ...] | None):
    try:
        trt = load_tensorrt()
    except TensorRTMissing as e:
        raise BuildError(str(e)) from None
    if not hasattr(trt.module, DTYPES[dtype]):
        raise BuildError(f"dtype '{dtype}' is not supported by {trt.flavor} {trt.version}")
    if trt.rtx:
        for a in archs or DEFAULT_RTX_ARCHS:
            if a not in RTX_ARCHS:
                raise BuildError(f"{trt.flavor} cannot target '{a}' (targets: {', '.join(RTX_ARCHS)})")
            if dtype == "bf16" and arch_number(a) < BF16_MIN_SM:
                raise BuildError(f"dtype 'bf16' is not supported on target {a} (needs sm{BF16_MIN_SM} or newer); "
                                 f"use --dtype fp16 or drop {a} from --arch")
    elif archs:
        raise BuildError(f"{trt.flavor} builds for the GPU it runs on; --arch is for TensorRT-RTX only")
    missing = [f for f in ("add_kv_cache_update", "add_rotary_embedding", "KVCacheMode") if not trt.has(f)]
    if missing:
        raise BuildError(f"{trt.flavor} {trt.version} lacks {', '.join(missing)} (the paged KV cache and rotary "
                         f"layers Kiln's networks use); install a newer TensorRT or TensorRT-RTX")
    return trt


def build_engine(trt, network_py: Path, weights: dict[str, torch.Tensor], archs, refit: bool = False) -> bytes:
    """Import the generated module, define the network, build and serialize the engine.

    `refit` needs a GPU at build time: TensorRT-RTX 1.7's ahead-of-time builder fails inside
    its graph compiler (a CUDA call) when weights are refittable and no GPU is present."""
    mod = import_network(network_py)
    t = trt.module
    log = _Logger(t)
    builder = t.Builder(log)
    net = builder.create_network(1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    owner = mod.build_network(t, net, weights)  # owns the constants' host memory until the build ends
    config = builder.create_builder_config()
    if refit:  # named weights can then be replaced from weights.safetensors
        config.set_flag(t.BuilderFlag.REFIT)
    if archs:
        config.num_compute_capabilities = len(archs)
        for i, a in enumerate(archs):
            config.set_compute_capability(getattr(t.ComputeCapability, RTX_ARCHS[a]), i)
    profile = builder.create_optimization_profile()
    for name, (_, _, (lo, opt, hi)) in mod.INPUTS.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(net, config)
    del owner
    if serialized is None:
        raise BuildError("TensorRT could not build the engine: " + ("; ".join(log.errors) or "no message"))
    return bytes(serialized)


def import_network(path: Path):
    spec = importlib.util.spec_from_file_location(f"kiln_network_{abs(hash(str(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _Logger(t):
    class Logger(t.ILogger):
        def __init__(self):
            t.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (t.ILogger.Severity.ERROR, t.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
    return Logger()


def _copy_sources(plan: Plan, ckpt, tmp: Path) -> list[str]:
    files = ["weights.safetensors", "config.json"]
    (tmp / "config.json").write_text(json.dumps(ckpt.config, indent=2, sort_keys=True, default=str) + "\n")
    (tmp / "spec").mkdir()
    for f in plan.spec.files:
        dest = tmp / "spec" / Path(f).name
        if dest.exists():
            raise BuildError(f"spec files {f} and {dest.name} of the extends chain share a file name")
        shutil.copyfile(f, dest)
        files.append(f"spec/{dest.name}")
    folder = Path(ckpt.path)
    if ckpt.format == "gguf":  # the tokenizer lives in the file's metadata: write it out as a folder's
        from .tokenizer import Tokenizer, TokenizerError

        try:
            files += Tokenizer.from_checkpoint(ckpt).save(tmp)
        except TokenizerError:
            pass  # a GGUF without a tokenizer: `kiln run --tokens` still works
        return files
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
            files.append(name)
    return files


def _write_kernels(plan: Plan, dtype: str, page_size: int, folder: Path) -> list[str]:
    from kiln.codegen.render import render
    from kiln.codegen.show import kernel_specs
    from kiln.codegen.specs import KernelSpecError

    folder.mkdir()
    names = []
    try:
        for ks in kernel_specs(plan, dtype, page_size):
            src = render(ks)
            if src.name not in names:
                (folder / f"{src.name}.cu").write_text(src.source)
                names.append(src.name)
    except KernelSpecError as e:
        raise BuildError(f"cannot generate CUDA kernels for {plan.spec.file}: {e}") from None
    return [f"kernels/{n}.cu" for n in names]


def _manifest(plan: Plan, backend: str, dtype: str, limits: Limits, files: list[str]) -> dict:
    from importlib.metadata import PackageNotFoundError, version
    try:
        kiln_version = version("kiln")
    except PackageNotFoundError:
        kiln_version = "unknown"
    spec_files = [{"path": f"spec/{Path(f).name}", "sha256": _sha256(Path(f))} for f in plan.spec.files]
    return {
        "format": FORMAT, "backend": backend, "kiln_version": kiln_version,
        "spec": {"name": plan.spec.name, "main": spec_files[0]["path"], "files": spec_files,
                 "sha256": hashlib.sha256("".join(s["sha256"] for s in spec_files).encode()).hexdigest()},
        "dtype": dtype, **asdict(limits), "max_pages": limits.max_pages,
        "vocab_size": plan.vocab_size, "attention_sites": len(plan.sites), "parameters": plan.num_parameters(),
        "io": [{"name": io.name, "mode": "output" if io.output else "input", "dtype": io.dtype,
                "shape": list(io.shape),
                "profile": None if io.profile is None else dict(zip(("min", "opt", "max"), map(list, io.profile)))}
               for io in io_tensors(plan, dtype, limits)] if backend == "tensorrt" else [],
        "files": files,
        "quantization": {n: asdict(w.quant) for n, w in plan.weights.items() if w.quant.quantized},
    }




def _current_arch() -> str:
    if not torch.cuda.is_available():
        raise BuildError("full TensorRT builds for the present GPU, and there is none")
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


class _Bar:
    def __init__(self, steps: list[str], enabled: bool):
        self.steps, self.i = steps, 0
        self.tq = None
        try:
            from tqdm import tqdm
        except ImportError:  # the bar is a nicety; building works without it
            enabled = False
        if enabled:
            self.tq = tqdm(total=len(steps), desc=steps[0], unit="step", leave=False)

    def advance(self):
        self.i += 1
        if self.tq is not None:
            self.tq.update(1)
            if self.i < len(self.steps):
                self.tq.set_description(self.steps[self.i])

    def close(self):
        if self.tq is not None:
            self.tq.close()


def _progress(steps: list[str], enabled: bool) -> _Bar:
    return _Bar(steps, enabled)


# ---------------------------------------------------------------- command line (declared in kiln.cli)


def cmd_build(args) -> int:
    from .generate import resolve_source

    out = build(args.spec, resolve_source(args.checkpoint), args.out, args.backend, args.dtype, args.max_batch,
                args.max_tokens, args.max_seq_len, args.page_size, args.arch,
                quantization=getattr(args, "quantization", None) or "none")
    m = json.loads((out / "manifest.json").read_text())
    where = f", {m['tensorrt']['flavor']} {m['tensorrt']['version']} for {', '.join(m['target_archs'])}" \
        if "tensorrt" in m else ""
    print(f"built {out}: {m['spec']['name']}, {m['backend']} backend, {m['dtype']}{where}")
    return 0


def cmd_run(args) -> int:
    from .generate import generate_cli

    if not Path(args.engine).is_dir() or not (Path(args.engine) / "manifest.json").is_file():
        raise BuildError(f"{args.engine} is not an engine directory (no manifest.json); `kiln build` makes one, "
                         f"`kiln generate` runs a checkpoint")
    args.checkpoint = args.engine
    return generate_cli(args)
