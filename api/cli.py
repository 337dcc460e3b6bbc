"""The `kiln` command line.

Every user error (a bad spec, config, checkpoint or argument) ends in one message and exit
status 2 — never a traceback. Argument values are checked while the arguments are parsed
(each option's type states its range; the sampling options use SamplingParams' own rules),
and whatever depends on the model (prompt length, token ids, device) before its weights load.
Parsing imports nothing heavy: each command imports what it runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """A bad command-line argument or file, reported without a traceback."""


# --- argument types ------------------------------------------------------------------------
# Each raises argparse.ArgumentTypeError; argparse prefixes "argument --name: ".


def int_arg(lo: int, hi: int | None = None):
    """An integer in [lo, hi]."""
    rule = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    parse.__name__ = "int"
    parse.bounds = (lo, hi, False)  # for the tests, which try each side of each bound
    return parse


def float_arg(lo: float, hi: float | None = None, lo_open: bool = False):
    """A finite number >= lo (> lo when lo_open), <= hi."""
    rule = (f"a number {'>' if lo_open else '>='} {lo:g}" if hi is None
            else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = "float"
    parse.bounds = (lo, hi, lo_open)
    return parse


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def device_arg(text: str) -> str:
    """cpu, cuda or cuda:N (whether this machine has it is checked before loading)."""
    kind, _, index = text.partition(":")
    if text == "cpu" or (kind == "cuda" and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def add_sampling_arguments(p, max_tokens: int) -> None:
    """--max-tokens, --temperature, --top-p, --top-k, --seed: SamplingParams' rules."""
    from kiln.runtime.sampling_params import arg_type

    p.add_argument("--max-tokens", type=arg_type("max_tokens"), default=max_tokens, metavar="N",
                   help=f"tokens to generate (default: {max_tokens})")
    p.add_argument("--temperature", type=arg_type("temperature"), default=0.0, metavar="T",
                   help="0 = greedy (the default)")
    p.add_argument("--top-p", type=arg_type("top_p"), default=1.0, metavar="P", help="nucleus sampling, in (0, 1]")
    p.add_argument("--top-k", type=arg_type("top_k"), default=0, metavar="K", help="0 or -1: off (the default)")
    p.add_argument("--seed", type=arg_type("seed"), default=None, metavar="S", help="a 64-bit signed integer")


def add_speculative_arguments(p) -> None:
    p.add_argument("--speculative", default=None, choices=["ngram", "draft"],
                   help="speculative decoding, same tokens (greedy) / same distribution (sampled): ngram "
                        "(prompt lookup) or draft (a draft model: --draft)")
    p.add_argument("--draft", metavar="CHECKPOINT", default=None,
                   help="the draft model of --speculative draft (same tokenizer as the target)")
    p.add_argument("--num-speculative-tokens", type=int_arg(1, 64), default=4, metavar="K",
                   help="draft tokens verified per step (default: 4)")


def add_model_arguments(p, quantization: bool = True) -> None:
    """--spec, --dtype, --device, --backend (and --quantization) of the commands that load a checkpoint."""
    p.add_argument("--spec", help="spec (default: chosen by the checkpoint's architecture)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="run dtype (default: fp32; an engine directory's own)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--backend", default=None, choices=["reference", "cuda"],
                   help="reference (torch, any device; the default) or cuda (generated kernels, --device cuda)")
    if quantization:
        add_quantization_argument(p)


QUANT_HELP = ("quantize on load: fp8, fp8-channel, int8-wo, int4-wo, each with +lm-head to quantize the LM head too "
              "(e.g. fp8+lm-head); gguf keeps a GGUF file's blocks (a quantized checkpoint needs none: its own scheme "
              "is used; `kiln quantize` makes one)")


def add_quantization_argument(p, kv_cache: bool = True) -> None:
    """--quantization, and --kv-cache-dtype where the command runs a model (kv_cache; `kiln build`'s engine
    directories keep a run-dtype cache)."""
    p.add_argument("--quantization", default=None, metavar="SCHEME", help=QUANT_HELP)
    if kv_cache:
        add_kv_cache_argument(p)


def add_kv_cache_argument(p) -> None:
    p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "fp8", "fp8-rotated"],
                   help="KV cache storage: auto (the run dtype; the default), fp8 (E4M3, scaled per site) or "
                        "fp8-rotated (E4M3 in a Hadamard-rotated basis of each head, keys less a calibrated mean and "
                        "shifted so that each sequence's first is exact; the reference backend only so far)")


class KilnParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports leftovers from the top-level parser ("kiln: error: ..."); name the
        # subcommand they were given to instead.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            prog = " ".join([self.prog, *(getattr(parsed, k) for k in ("command", "mode") if getattr(parsed, k, None))])
            self.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extras)} (see '{prog} --help')\n")
        return parsed


# --- commands ------------------------------------------------------------------------------


def _read_config(path: str | None) -> dict | None:
    if path is None:
        return None
    from kiln.runtime.checkpoint import read_json

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    return read_json(p, "config file")


def cmd_check(args) -> int:
    from kiln.dsl import check, load_spec
    from kiln.dsl.loader import MODELS_DIR, spec_files

    if args.spec is None:
        print(f"Specs in {MODELS_DIR}:")
        for path in spec_files():
            spec = load_spec(path)
            lines = len(path.read_text().splitlines())
            archs = ", ".join(spec.architectures) or "-"
            print(f"  {spec.name:<10} {lines:>4} lines  {archs}")
        return 0
    from kiln.dsl.checker import check_backend

    spec = load_spec(args.spec)
    plan = check(spec, _read_config(args.config), args.config or "config.json")
    if args.backend:
        check_backend(plan, args.backend)
    print(f"spec {spec.name} ({' <- '.join(spec.files)})")
    print(f"  architectures: {', '.join(spec.architectures) or '-'}")
    shown = {p.name: plan.params[p.name] for p in spec.params}
    print("  parameters: " + ", ".join(f"{k}={v!r}" for k, v in shown.items()))
    print(f"  ops ({sum(plan.op_counts.values())} after unrolling): "
          + ", ".join(f"{k} x{n}" for k, n in sorted(plan.op_counts.items())))
    present = [w for w in plan.weights.values() if w.source is not None]
    print(f"  weights: {len(present)} tensors, {plan.num_parameters():,} parameters")
    if args.verbose:
        for w in present:
            print(f"    {w.name:<28} {list(w.shape)}  <- {w.source}")
    sites = plan.sites
    if sites:
        s = sites[0]
        print(f"  attention: {len(sites)} KV sites, {s.heads} heads / {s.kv_heads} kv heads x {s.head_dim}")
    print(f"  logits: [T, {plan.vocab_size}]")
    return 0


def cmd_show(args) -> int:
    from kiln.codegen.show import show_ir, show_kernels, show_shards
    from kiln.dsl import check, load_spec, passes

    if not (args.kernels or args.ir or args.tp or args.pp):
        raise UsageError("one of --kernels, --ir, --tp N, --pp M is required")
    if args.pp and (args.kernels or args.ir):
        raise UsageError("--pp shows the pipeline stages; it does not combine with --kernels / --ir")
    plan = check(load_spec(args.spec), _read_config(args.config), args.config or "config.json")
    if args.tp or args.pp:
        from kiln.codegen.show import show_stages

        plan = passes.run(plan, [passes.shard(args.tp or 1, "ep" if args.ep else "tp"), passes.stage(args.pp or 1)])
        if args.tp:
            sys.stdout.write(show_shards(plan))
        if args.pp:
            sys.stdout.write(show_stages(plan))
        return 0
    sys.stdout.write(show_kernels(plan, args.dtype, args.page_size) if args.kernels else show_ir(plan))
    return 0


def cmd_verify(args) -> int:
    _need("transformers", "kiln verify", "dev")
    config = _read_config(args.config)
    from kiln.runtime.model import spec_for_config
    from kiln.runtime.verify import verify

    spec = args.spec or spec_for_config(config, args.config)
    t0 = time.time()
    report = verify(config, spec, steps=args.steps, config_file=args.config)
    print(f"verify {report.architecture} with {spec}: prefill + {args.steps} decode steps, fp32, CPU")
    print(f"  {'step':>5} {'max abs':>12} {'max rel':>12}  token")
    for s in report.steps:
        if args.verbose or s.step in (0, 1, len(report.steps) - 1) or not s.same_token or s.max_rel > args.tol:
            print(f"  {s.step:>5} {s.max_abs:>12.3e} {s.max_rel:>12.3e}  {'same' if s.same_token else 'DIFFERENT'}")
    ok = report.ok(args.tol)
    print(f"  max abs {report.max_abs:.3e}, max rel {report.max_rel:.3e} (tolerance {args.tol:g}), "
          f"greedy tokens agree {report.tokens_agree}/{len(report.steps)}, {time.time() - t0:.1f} s")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def cmd_generate(args) -> int:
    from kiln.runtime.generate import generate_cli

    return generate_cli(args)


def cmd_build(args) -> int:
    from kiln.runtime.build import cmd_build

    return cmd_build(args)


def cmd_run(args) -> int:
    from kiln.runtime.build import cmd_run

    return cmd_run(args)


def cmd_serve(args) -> int:
    _need("fastapi", "kiln serve", "serve")
    _need("uvicorn", "kiln serve", "serve")
    from kiln.runtime.server_cli import cmd_serve

    return cmd_serve(args)


def cmd_bench(args) -> int:
    if args.mode == "serve":
        _need("httpx", "kiln bench serve", "dev")
        from kiln.runtime.bench_serve import cmd_bench_serve
        return cmd_bench_serve(args)
    if args.mode == "kernels":
        from kiln.codegen.bench_kernels import main as bench_kernels
        return bench_kernels([]) or 0
    from kiln.runtime.bench import check_args
    from kiln.runtime.bench import main as bench_main

    if args.mode == "startup":
        return bench_main(args)
    check_args(args)  # option combinations first, then files
    if args.mode == "latency" and args.hf or args.mode == "throughput" and args.hf_batch:
        _need("transformers", f"kiln bench {args.mode} with an HF baseline", "dev")
    from kiln.runtime.model import spec_for_config

    if args.spec is None:
        args.spec = spec_for_config(_read_config(args.config), args.config)
    return bench_main(args)


def cmd_eval(args) -> int:
    from kiln.runtime.eval import perplexity_cli

    return perplexity_cli(args)


def cmd_quantize(args) -> int:
    from kiln.runtime.quantize import quantize_checkpoint

    out = quantize_checkpoint(args.checkpoint, args.scheme, args.out, args.calibration, args.alpha, args.samples,
                              args.seq_len, args.act_order, args.force, args.spec, group_size=args.group_size,
                              lm_head=args.lm_head)
    print(f"wrote {out} ({args.scheme})")
    return 0


def quant_scheme(text: str) -> str:
    """A --quantization scheme: one of kiln.dsl.passes.QUANT_SCHEMES, read when the option is given."""
    from kiln.runtime.eval import quantization_schemes

    schemes = quantization_schemes()
    if text not in schemes:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(schemes)}, got {text!r}")
    return text


def _need(module: str, what: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs the Python package '{module}', which is not installed: "
                         f"pip install -e '.[{extra}]' (or `make setup`)")


# --- the parser ----------------------------------------------------------------------------

def model_pair(text: str) -> str:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expects NAME=PATH, got {text!r}")
    return text


def add_serve_arguments(p) -> None:
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="HF folder, .gguf file or engine directory, served under its file or folder name; "
                        "'default' (or none, when no --model either): the embedded SmolLM2-135M-Instruct, "
                        "served as 'SmolLM2-135M-Instruct'")
    p.add_argument("--model", action="append", default=[], type=model_pair, metavar="NAME=PATH",
                   help="serve the checkpoint at PATH under NAME (repeatable: several models at once)")
    p.add_argument("--lora", action="append", default=[], type=model_pair, metavar="NAME=PATH",
                   help="serve the PEFT LoRA adapter folder PATH on the (one) served model as model NAME "
                        "(repeatable; more at run time: POST /v1/load_lora_adapter)")
    p.add_argument("--random-weights", metavar="CONFIG",
                   help="also serve a model of this config.json's shape with random weights, named after the "
                        "file (for benchmarks); its tokenizer: --tokenizer")
    p.add_argument("--tokenizer", metavar="CHECKPOINT",
                   help="a .gguf file or a folder with tokenizer.json: the tokenizer of --random-weights "
                        "(default: the embedded SmolLM2's)")
    p.add_argument("--spec", help="spec (default: chosen by each checkpoint's architecture)")
    p.add_argument("--host", default="127.0.0.1", type=nonempty, help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int_arg(1, 65535), default=8000)
    p.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $KILN_API_KEY, or none)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="run dtype (default: fp32; an engine directory's own)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--backend", default=None, choices=["reference", "cuda"], help="default: reference")
    add_quantization_argument(p)
    p.add_argument("--max-num-seqs", type=int_arg(1), default=None,
                   help="sequences per batch (default: 64 on CUDA, 8 on CPU)")
    p.add_argument("--max-waiting", type=int_arg(0), default=256,
                   help="sequences that may wait for a seat; beyond that requests get 429")
    p.add_argument("--max-model-len", type=int_arg(1), default=None,
                   help="prompt + output tokens per request (default: the model's, at most 4096 on CUDA, "
                        "2048 on CPU)")
    p.add_argument("--page-size", type=int_arg(1, 1024), default=16, help="tokens per KV cache page")
    p.add_argument("--num-pages", type=int_arg(1), default=None,
                   help="KV cache pages (default: CUDA: from free memory; CPU: max-num-seqs x max-model-len)")
    p.add_argument("--kv-memory-fraction", type=float_arg(0, 1, lo_open=True), default=0.8,
                   help="CUDA: share of the free GPU memory (after weights) for the KV cache")
    p.add_argument("--max-tokens-per-step", type=int_arg(1), default=2048)
    p.add_argument("--enforce-eager", action="store_true",
                   help="cuda backend: run every step eagerly, without CUDA graphs (less memory, slower steps; "
                        "default: the graphs are captured at start-up)")
    p.add_argument("--tp", type=int_arg(1, 1024), default=1, metavar="N",
                   help="split the model over N processes of this machine (tensor parallelism; CPU, reference "
                        "backend; one model)")
    p.add_argument("--pp", type=int_arg(1, 1024), default=1, metavar="M",
                   help="split the model's layers into M pipeline stages (with --tp N: M x N processes)")
    add_speculative_arguments(p)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="recompute every prompt (default: reuse the KV cache pages of prompt prefixes seen before)")
    p.add_argument("--state-snapshots", type=int_arg(0), default=None, metavar="N",
                   help="models with recurrent state (Mamba, hybrids): states kept at prompt page boundaries for "
                        "prefix reuse, each a sequence's state in size (default: --max-num-seqs, fewer where live "
                        "and kept states would take over half the free GPU memory; 0: no reuse)")
    p.add_argument("--max-body-bytes", type=int_arg(1), default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float_arg(0, lo_open=True), default=600.0,
                   help="seconds; then 504 (or an error event)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def parse_rates(text: str) -> list[float]:
    """`--rates 1,4,16,inf`: positive request rates."""
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers or 'inf', got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):  # `not r > 0` also refuses nan
        raise argparse.ArgumentTypeError(f"must be positive request rates (or 'inf'), got {text!r}")
    return rates


def add_bench_serve_arguments(p) -> None:
    """`kiln bench serve`'s options, with this benchmark's own defaults (short requests: a run at
    the defaults finishes in minutes even on a CPU server)."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--model", help="model name (default: the first in /v1/models)")
    p.add_argument("--rates", type=parse_rates, default=[1.0, 4.0, 16.0],
                   help="requests per second, comma-separated ('inf': all at once; default: 1,4,16)")
    p.add_argument("--num-requests", type=int_arg(1), default=100, help="requests per rate")
    p.add_argument("--input-len", type=int_arg(1), default=64, help="prompt length in words")
    p.add_argument("--output-len", type=int_arg(1), default=32, help="tokens generated per request")
    p.add_argument("--seed", type=int, default=0, help="prompts and arrival times")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--timeout", type=float_arg(0, lo_open=True), default=600.0, help="seconds per request")
    p.add_argument("--json", help="also write the reports to this JSON file")



CHECKPOINT_HELP = ("Hugging Face folder, .gguf file or engine directory (from `kiln build`); "
                   "'default' or none: the embedded SmolLM2-135M-Instruct")


def build_parser() -> argparse.ArgumentParser:
    ap = KilnParser(prog="kiln", description="Kiln: LLM inference where a model architecture is a spec file. "
                    "Every command runs on the CPU unless given --device cuda.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="parse and check a spec, print its IR summary (no SPEC: list specs)")
    p.add_argument("spec", nargs="?", help="a .kiln file or the name of a spec in models/")
    p.add_argument("--config", help="a Hugging Face config.json (or its folder) to bind parameters")
    p.add_argument("-v", "--verbose", action="store_true", help="list every weight")
    p.add_argument("--backend", choices=["reference", "cuda", "tensorrt"],
                   help="also check that this backend can run every op (each op's definition says why not)")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("show", help="print generated artefacts: the unrolled IR, or the CUDA kernels")
    p.add_argument("spec")
    p.add_argument("--config", help="a Hugging Face config.json (default: the spec's defaults)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--kernels", action="store_true", help="the rendered CUDA kernels")
    g.add_argument("--ir", action="store_true", help="the unrolled, typed op program")
    g.add_argument("--tp", type=int_arg(1, 1024), help="each weight's shard and each collective over N "
                   "tensor-parallel ranks")
    p.add_argument("--pp", type=int_arg(1, 1024), help="the M pipeline stages (alone or with --tp) and the "
                   "values sent between them")
    p.add_argument("--ep", action="store_true", help="with --tp: experts whole, split across ranks")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--page-size", type=int_arg(1, 1024), default=16, help="tokens per KV cache page")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("verify", help="compare a spec with Hugging Face transformers on random weights")
    p.add_argument("spec", nargs="?", help="spec (default: chosen by the config's architectures)")
    p.add_argument("--config", required=True, help="a Hugging Face config.json")
    p.add_argument("--steps", type=int_arg(1, 4096), default=32, help="greedy decode steps after the prefill")
    p.add_argument("--tol", type=float_arg(0, lo_open=True), default=1e-4, help="max relative logit error")
    p.add_argument("-v", "--verbose", action="store_true", help="print every step")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("generate", help="generate text from a checkpoint or engine directory")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", type=nonempty, metavar="TEXT", help="plain text prompt")
    g.add_argument("--chat", type=nonempty, metavar="MESSAGE",
                   help="a user message, formatted with the model's chat template")
    p.add_argument("--system", metavar="TEXT", help="system message for --chat")
    add_sampling_arguments(p, max_tokens=64)
    add_model_arguments(p)
    p.add_argument("--tp", type=int_arg(1, 1024), default=1, metavar="N",
                   help="split the model over N processes of this machine (tensor parallelism; CPU, "
                        "reference backend)")
    p.add_argument("--ep", action="store_true", help="with --tp: MoE experts whole, split across ranks")
    p.add_argument("--pp", type=int_arg(1, 1024), default=1, metavar="M",
                   help="split the model's layers into M pipeline stages, each on its own process(es) "
                        "(with --tp N: M x N processes; CPU, reference backend)")
    add_speculative_arguments(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("build", help="build an engine directory (cuda or tensorrt) from a spec and checkpoint")
    p.add_argument("spec", nargs="?", help="spec (default: chosen by the checkpoint's architectures)")
    p.add_argument("--checkpoint", default="default", metavar="CHECKPOINT",
                   help="Hugging Face folder or .gguf file (default: 'default', the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="tensorrt", choices=["cuda", "tensorrt"],
                   help="cuda: generated CUDA sources + weights (runs on the CPU too, with the reference backend); "
                        "tensorrt: a TensorRT engine")
    p.add_argument("--out", required=True, type=nonempty, metavar="ENGINE_DIR",
                   help="engine directory to create (must not exist)")
    p.add_argument("--dtype", default="fp16", help="run dtype: fp16 (default), bf16 or fp32")
    p.add_argument("--max-batch", type=int_arg(1), default=8, help="sequences per step")
    p.add_argument("--max-tokens", type=int_arg(1), default=2048, help="new tokens per step, all sequences")
    p.add_argument("--max-seq-len", type=int_arg(1), default=4096, help="positions per sequence")
    p.add_argument("--page-size", type=int_arg(1, 1024), default=16, help="tokens per KV cache page")
    p.add_argument("--arch", type=lambda s: tuple(a.strip() for a in s.split(",")), metavar="sm86,...",
                   help="TensorRT-RTX targets, comma-separated (default: sm80,sm86,sm89,sm120)")
    add_quantization_argument(p, kv_cache=False)
    p.set_defaults(fn=cmd_build)

    p = sub.add_parser("run", help="generate from an engine directory made by `kiln build`")
    p.add_argument("engine", metavar="ENGINE_DIR", help="engine directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", type=nonempty, metavar="TEXT", help="plain text prompt")
    g.add_argument("--chat", type=nonempty, metavar="MESSAGE",
                   help="a user message, formatted with the model's chat template")
    g.add_argument("--tokens", type=_token_ids, metavar="IDS", help="comma-separated prompt token ids; "
                   "prints the generated ids")
    p.add_argument("--system", metavar="TEXT", help="system message for --chat")
    add_sampling_arguments(p, max_tokens=32)
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    add_serve_arguments(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks: latency, throughput, kernels (GPU); serve (a running server); "
                                     "startup (process start to first token)")
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, what in (("latency", "batch-1 decode step and TTFT vs the roofline (GPU, random weights)"),
                       ("throughput", "N requests through the engine (GPU, random weights; --device cpu: "
                                      "a smoke run)"),
                       ("prefix", "TTFT of a request whose system prompt is in the prefix cache vs not (GPU, "
                                  "random weights; --device cpu: a smoke run)")):
        q = modes.add_parser(mode, help=what)
        q.add_argument("--config", required=True, help="a Hugging Face config.json, e.g. configs/*.json")
        q.add_argument("--spec", help="spec (default: chosen by the config's architectures)")
        q.add_argument("--backend", default=None, choices=["reference", "cuda"],
                       help="default: cuda (reference with --device cpu)")
        add_quantization_argument(q)
        if mode == "latency":
            q.add_argument("--prompt", type=int_arg(1), default=2048, help="prompt tokens (TTFT)")
            q.add_argument("--steps", type=int_arg(1), default=64, help="decode steps timed")
            q.add_argument("--hf", action="store_true", help="also time HF transformers generate()")
            q.add_argument("--speculative", default=None, choices=["ngram", "draft"],
                           help="also batch-1 decode with speculation vs without, in the same run")
            q.add_argument("--num-speculative-tokens", type=int_arg(1, 64), default=4, metavar="K")
            q.add_argument("--draft-layers", type=int_arg(1), default=None,
                           help="--speculative draft: the target's first N layers (default: a quarter)")
            q.add_argument("--forced-acceptance", action="store_true",
                           help="--speculative draft: zero the target's layers past the draft's (they still "
                                "run), so every draft token is accepted: the speedup at acceptance K + 1")
            q.add_argument("--tp1-overhead", action="store_true",
                           help="also batch-1 decode through the tensor-parallel runtime at one rank (NCCL, this "
                                "process) vs the plain cuda backend, same weights (issue 14: <= 1%%)")
        elif mode == "prefix":
            q.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                           help="cpu: a smoke run of the benchmark's code (CI), not a measurement")
            q.add_argument("--prefix", type=int_arg(1), default=None,
                           help="system prompt tokens (default: 2000 (GPU), 64 (--device cpu))")
            q.add_argument("--suffix", type=int_arg(1), default=None,
                           help="user tokens after it, never cached (default: 32 (GPU), 8 (--device cpu))")
            q.add_argument("--reps", type=int_arg(1), default=5, help="requests timed of each kind (median)")
        else:
            q.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                           help="cpu: a smoke run of the benchmark's code (CI), not a measurement")
            # Defaults by device: the GPU workload of BENCHMARKS.md, or a smoke run that fits any CPU.
            q.add_argument("--requests", type=int_arg(1), default=None, help="default: 1000 (GPU), 4 (--device cpu)")
            q.add_argument("--input-len", type=int_arg(1), default=None,
                           help="prompt tokens per request (default: 1000 (GPU), 32 (--device cpu))")
            q.add_argument("--output-len", type=int_arg(1), default=None,
                           help="generated tokens per request (default: 1000 (GPU), 8 (--device cpu))")
            q.add_argument("--max-batch", type=int_arg(1), default=None,
                           help="sequences per step (default: 256 (GPU), 4 (--device cpu))")
            q.add_argument("--max-tokens-per-step", type=int_arg(1), default=2048)
            q.add_argument("--page-size", type=int_arg(1, 1024), default=16,
                           help="tokens per KV cache page (default 16)")
            q.add_argument("--no-warmup", action="store_true",
                           help="time from a cold start: without the warm-up request and the decode graphs' capture "
                                "(each bucket up to --max-batch) that otherwise run before the timed region")
            q.add_argument("--kv-fraction", type=float_arg(0, 1, lo_open=True), default=0.9,
                           help="share of free GPU memory (after weights) given to the KV cache")
            q.add_argument("--fp8-act-scale", type=float_arg(0, None, lo_open=True), default=None, metavar="S",
                           help="with --quantization fp8: quantize every linear's activations with this static "
                                "per-tensor scale, as a calibrated checkpoint's input_scale (TensorRT-LLM's FP8 "
                                "recipe) would, instead of measuring one each step; random weights have nothing "
                                "to calibrate on, so the figure is the static path's speed only")
            q.add_argument("--hf-batch", type=int_arg(0), default=0, help="HF generate() baseline batch (0: none)")
            q.add_argument("--lora-adapters", type=int_arg(0), default=0,
                           help="also run with N random LoRA adapters (round-robin over the requests) and report "
                                "decode throughput against the run without (lora_decode_ratio)")
            q.add_argument("--lora-rank", type=int_arg(1), default=16, help="rank of --lora-adapters (default 16)")
            q.add_argument("--guided", default=None, choices=["json", "regex"],
                           help="also run every request constrained (a JSON schema or a regex that cannot end "
                                "early) and report the decode step against the free run (guided_step_overhead)")
            q.add_argument("--tokenizer", default=None, metavar="CHECKPOINT",
                           help="--guided: a .gguf file or a folder with tokenizer.json, the tokenizer the "
                                "grammars compile against (default: the embedded SmolLM2's)")
            q.add_argument("--shared-prefix", type=int_arg(0), default=0, metavar="N",
                           help="the first N prompt tokens are the same in every request (a system prompt): "
                                "the prefix cache's hit rate shows in the output")
            q.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                           help="recompute every prompt")
            q.add_argument("--sweep", nargs="?", const="all", default=None, metavar="SHAPES",
                           help="run the shapes of TensorRT-LLM's published table (all, or a comma-separated "
                                "list such as 1000/1000,2048/128) and print Kiln beside them")
            q.add_argument("--tp", type=int_arg(1, 1024), default=1, metavar="N",
                           help="the model split over N tensor-parallel processes (--device cpu: gloo; cuda: "
                                "the cuda backend, one GPU per rank, NCCL)")
            q.add_argument("--pp", type=int_arg(1, 1024), default=1, metavar="M",
                           help="its layers in M pipeline stages (with --tp N: M x N processes)")
        q.set_defaults(fn=cmd_bench)
    q = modes.add_parser("kernels", help="every kernel vs copy bandwidth and a torch baseline (GPU)")
    q.set_defaults(fn=cmd_bench)
    q = modes.add_parser("serve", help="load a running `kiln serve` with Poisson arrivals (vLLM's benchmark_serving)")
    add_bench_serve_arguments(q)
    q.set_defaults(fn=cmd_bench)
    q = modes.add_parser("startup", help="process start to first token of `kiln generate` (fresh processes)")
    q.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    q.add_argument("--runs", type=int_arg(1, 100), default=5, help="processes started, one after another")
    q.add_argument("--chat", type=nonempty, default="What is the capital of France?", help="the chat message")
    q.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    q.set_defaults(fn=cmd_bench)

    p = sub.add_parser("eval", help="evaluate a model on text: perplexity (and KL divergence from the unquantized "
                                    "model)")
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    q = modes.add_parser("perplexity", help="perplexity over a text in windows scored on their second half "
                                            "(llama.cpp's perplexity tool); --kl-divergence: against the same "
                                            "checkpoint unquantized")
    q.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    q.add_argument("--quantization", type=quant_scheme, default="none", metavar="SCHEME",
                   help="quantize on load (kiln.dsl.passes.QUANT_SCHEMES; default: none)")
    q.add_argument("--text", metavar="FILE",
                   help="UTF-8 text to score (default: Python's documentation topics, pydoc_data.topics)")
    q.add_argument("--kl-divergence", action="store_true",
                   help="also the KL divergence of each position's next-token distribution from the unquantized "
                        "model's (mean, median, p99, max) and how often their top tokens agree")
    q.add_argument("--kl-base", metavar="CHECKPOINT",
                   help="with --kl-divergence: the unquantized model to compare with (default: CHECKPOINT itself, "
                        "unquantized; give it for a checkpoint `kiln quantize` wrote, e.g. 'default')")
    add_model_arguments(q, quantization=False)  # its own --quantization, checked at parse time
    add_kv_cache_argument(q)
    q.add_argument("--context", type=int_arg(2), default=512, metavar="N", help="tokens per window (default: 512)")
    q.add_argument("--stride", type=int_arg(1), default=None, metavar="N",
                   help="a window starts every N tokens and scores its last min(N, context/2) "
                        "(default: --context, non-overlapping windows scored on their second half)")
    q.add_argument("--max-tokens", type=int_arg(2), default=None, metavar="N",
                   help="use only the text's first N tokens (default: all)")
    q.add_argument("--json", action="store_true", help="print the results as one JSON line (the table goes to stderr)")
    q.set_defaults(fn=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a float checkpoint, calibrating on text where the scheme needs "
                                        "it, into a standard format (compressed-tensors, AutoAWQ, GPTQ)")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a Hugging Face safetensors folder or a .gguf file (its weights dequantized); "
                        "'default': the embedded SmolLM2-135M-Instruct")
    p.add_argument("--scheme", required=True,
                   choices=("fp8", "fp8-static", "fp8-channel", "int8-wo", "int4-wo", "smoothquant", "awq", "gptq",
                            "fp8-kv"),
                   help="fp8-static: fp8 with calibrated static activation scales (TensorRT-LLM's FP8 recipe); "
                        "fp8-kv: the weights unchanged plus calibrated fp8 KV cache scales (used with "
                        "--kv-cache-dtype fp8)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")
    p.add_argument("--calibration", metavar="TEXTFILE",
                   help="UTF-8 calibration text (default: the license texts in /usr/share/common-licenses)")
    p.add_argument("--alpha", type=float_arg(0.0, 1.0, lo_open=True), default=0.5,
                   help="SmoothQuant migration strength, in (0, 1] (default 0.5)")
    p.add_argument("--samples", type=int_arg(1), default=32, metavar="N", help="calibration samples (32)")
    p.add_argument("--seq-len", type=int_arg(2), default=512, metavar="N", help="tokens per sample (512)")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns in activation order")
    p.add_argument("--group-size", type=int_arg(1), default=None, metavar="N",
                   help="int4-wo, awq, gptq: input columns per scale and zero point (default 128); must divide "
                        "every quantized weight's input features")
    p.add_argument("--lm-head", action="store_true",
                   help="fp8, fp8-channel, int8-wo, int4-wo: quantize the LM head too (by default it stays in the "
                        "checkpoint's precision, as llm-compressor leaves it)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--spec", metavar="SPEC", help="the spec (default: from the checkpoint's architectures)")
    p.set_defaults(fn=cmd_quantize)
    return ap


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated token ids, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {text!r}")
    return ids


# Exceptions that are the user's doing (module, class): each is one message and exit status 2.
# Looked up in sys.modules, so that catching them imports nothing: a class whose module was
# never imported cannot have been raised.
USER_ERRORS = (
    ("kiln.cli", "UsageError"),
    ("kiln.dsl.errors", "SpecError"),
    ("kiln.runtime.checkpoint", "CheckpointError"),
    ("kiln.runtime.tokenizer", "TokenizerError"),
    ("kiln.runtime.engine_dir", "BuildError"),
    ("kiln.runtime.trt_backend", "TrtRuntimeError"),
    ("kiln.runtime.generate", "GenerateError"),
    ("kiln.runtime.verify", "VerifyError"),
    ("kiln.runtime.server_cli", "ServeError"),
    ("kiln.runtime.bench_serve", "BenchError"),
    ("kiln.runtime.bench", "BenchError"),
    ("kiln.runtime.eval", "EvalError"),
    ("kiln.runtime.quantize", "QuantizeError"),
    ("kiln.codegen.specs", "KernelSpecError"),
    ("kiln.codegen.trt_api", "TensorRTMissing"),
)


def _user_error(e: BaseException) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (status 2, message printed) or --help (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (`kiln show SPEC --kernels | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        return 0
    except Exception as e:
        if not _user_error(e):
            raise
        print(f"kiln {args.command}{' ' + args.mode if getattr(args, 'mode', None) else ''}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m kiln.cli`: run the module as `kiln.cli`, not as a second copy named __main__
    # (whose UsageError would not be the one that `_user_error` looks up).
    from kiln.cli import main as _main

    sys.exit(_main())
