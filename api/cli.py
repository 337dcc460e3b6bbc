"""The `kiln` command line.

Every user error (a bad spec, config, checkpoint or argument) ends in a one-paragraph
message and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kiln.dsl import SpecError, check, load_spec
from kiln.dsl.loader import MODELS_DIR


class UsageError(Exception):
    """A bad command-line argument or file, reported without a traceback."""


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
    if args.spec is None:
        print(f"Specs in {MODELS_DIR}:")
        for path in sorted(MODELS_DIR.glob("*.kiln")):
            spec = load_spec(path)
            lines = len(path.read_text().splitlines())
            archs = ", ".join(spec.architectures) or "-"
            print(f"  {spec.name:<10} {lines:>4} lines  {archs}")
        return 0
    spec = load_spec(args.spec)
    plan = check(spec, _read_config(args.config), args.config or "config.json")
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
    from kiln.codegen.show import show_ir, show_kernels

    plan = check(load_spec(args.spec), _read_config(args.config), args.config or "config.json")
    sys.stdout.write(show_kernels(plan, args.dtype, args.page_size) if args.kernels else show_ir(plan))
    return 0


def cmd_verify(args) -> int:
    from kiln.runtime.model import spec_for_config
    from kiln.runtime.verify import verify

    config = _read_config(args.config)
    spec = args.spec or spec_for_config(config, args.config)
    t0 = time.time()
    report = verify(config, spec, steps=args.steps)
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kiln", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="parse and check a spec, print its IR summary (no SPEC: list specs)")
    p.add_argument("spec", nargs="?", help="a .kiln file or the name of a spec in models/")
    p.add_argument("--config", help="a Hugging Face config.json (or its folder) to bind parameters")
    p.add_argument("-v", "--verbose", action="store_true", help="list every weight")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("show", help="print generated artefacts: the unrolled IR, or the CUDA kernels")
    p.add_argument("spec")
    p.add_argument("--config", help="a Hugging Face config.json (default: the spec's defaults)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--kernels", action="store_true", help="the rendered CUDA kernels")
    g.add_argument("--ir", action="store_true", help="the unrolled, typed op program")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--page-size", type=int, default=16)
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("verify", help="compare a spec with Hugging Face transformers on random weights")
    p.add_argument("spec", nargs="?", help="spec (default: chosen by the config's architectures)")
    p.add_argument("--config", required=True, help="a Hugging Face config.json")
    p.add_argument("--steps", type=int, default=32, help="greedy decode steps after the prefill")
    p.add_argument("--tol", type=float, default=1e-4, help="max relative logit error")
    p.add_argument("-v", "--verbose", action="store_true", help="print every step")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("generate", help="generate text from a checkpoint (HF folder or .gguf)")
    p.add_argument("checkpoint", nargs="?", help="HF folder or .gguf file (default: the embedded SmolLM2)")
    p.add_argument("--spec", help="spec (default: chosen by the checkpoint's architecture)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="plain text prompt")
    g.add_argument("--chat", help="a user message, formatted with the model's chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="reference", choices=["reference", "cuda"])
    p.set_defaults(fn=cmd_generate)

    from kiln.runtime import bench_serve, server_cli  # argument declarations only: cheap imports

    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    server_cli.add_arguments(p)
    p.set_defaults(fn=server_cli.cmd_serve)

    p = sub.add_parser("bench", help="benchmarks on the GPU (latency, throughput, kernels), "
                       "or of a running server (serve)")
    p.add_argument("mode", choices=["latency", "throughput", "kernels", "serve"])
    p.add_argument("--spec", help="spec (default: chosen by the config's architectures)")
    p.add_argument("--config", help="a Hugging Face config.json, one of configs/*.json")
    p.add_argument("--backend", default="cuda", choices=["reference", "cuda"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run of `throughput --backend reference` (CI), not a measurement")
    p.add_argument("--prompt", type=int, default=2048, help="latency: prompt tokens (TTFT)")
    p.add_argument("--steps", type=int, default=64, help="latency: decode steps timed")
    p.add_argument("--hf", action="store_true", help="latency: also time HF transformers generate()")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-tokens-per-step", type=int, default=2048)
    p.add_argument("--kv-fraction", type=float, default=0.9,
                   help="throughput: share of free GPU memory (after weights) given to the KV cache")
    p.add_argument("--hf-batch", type=int, default=0, help="throughput: HF generate() baseline batch")
    bench_serve.add_arguments(p, lengths=False)  # serve: --url, --rates, --num-requests, ...
    p.set_defaults(fn=cmd_bench)

    from kiln.runtime.build import add_build_parsers
    add_build_parsers(sub)
    return ap


def cmd_bench(args) -> int:
    if args.mode == "serve":
        from kiln.runtime.bench_serve import cmd_bench_serve
        return cmd_bench_serve(args)
    if args.mode == "kernels":
        from kiln.codegen.bench_kernels import main as bench_kernels
        return bench_kernels([]) or 0
    from kiln.runtime.bench import main as bench_main
    from kiln.runtime.model import spec_for_config

    if args.config is None:
        raise UsageError("kiln bench latency/throughput needs --config (one of configs/*.json)")
    if args.spec is None:
        args.spec = spec_for_config(_read_config(args.config), args.config)
    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    from kiln.runtime.build import BuildError
    from kiln.runtime.checkpoint import CheckpointError
    from kiln.runtime.trt_backend import TrtRuntimeError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (SpecError, CheckpointError, UsageError, BuildError, TrtRuntimeError) as e:
        print(f"kiln {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
