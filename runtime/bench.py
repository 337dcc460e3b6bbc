"""`kiln bench latency | throughput | startup`.

latency and throughput time a model made from a spec + config with random weights directly on
the GPU, beside the physical limits and a baseline measured in the same run:
latency:    copy bandwidth and bf16 matmul rate (measured now), batch-1 decode step time vs the
            roofline ((weight + state read/write bytes) / copy bandwidth), TTFT of one prompt vs
            2 * params * tokens / matmul rate, and Hugging Face transformers `generate()` per-step time (--hf);
            --tp1-overhead: batch-1 decode through the tensor-parallel runtime at one rank (NCCL, this
            process) against the plain cuda backend, same weights, timed alike (issue 14: <= 1%).
throughput: N requests with fixed input/output lengths submitted at once through the engine:
            output tok/s, requests/s, TTFT and TPOT percentiles; HF `generate()` at a batch size
            in the same run (--hf-batch); --shared-prefix N gives every prompt the same first N
            tokens, and the prefix cache's hit rate is reported.
prefix:     TTFT of a request whose system prompt (--prefix tokens, default 2,000) is in the
            prefix cache vs one whose system prompt is new, --reps of each, medians and their ratio
            (target <= 0.15 at the 8B shape of BENCHMARKS.md).
startup:    process start to first token of `kiln generate` in fresh processes (any machine; the
            figure in BENCHMARKS.md is of the default model on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import peers
from .batch import SeqSlice, StepBatch
from .bench_serve import percentiles
from .engine import EngineConfig, LLMEngine
from .kv_store import KVStore
from .lora import random_adapters
from .model import random_model
from .sampling_params import SamplingParams
from .state_cache import state_bytes_per_slot


def _events_ms(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = statistics.median(_events_ms(lambda: dst.copy_(src), 20))
    return 2 * nbytes / (ms / 1e3)


def matmul_rate(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    ms = statistics.median(_events_ms(lambda: a @ b, 20))
    return 2 * n ** 3 / (ms / 1e3)


def _config(path: str) -> dict:
    return json.loads(Path(path).read_text())


# Bytes per weight value of each storage format, scales included (int4: a bf16 scale and zero per
# 128 values; ggml blocks: their block size over their values).
_STORED_BYTES = {"fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 128, "gguf_q4_0": 18 / 32, "gguf_q4_1": 20 / 32,
                 "gguf_q8_0": 34 / 32}


def weight_bytes(model) -> int:
    """Bytes a decode step must read: every distinct weight once (tied ones once), each in the
    format it is stored in."""
    total = 0.0
    for w in model.plan.weights.values():
        if w.source is None or model.plan.alias_target(w.name) != w.name:
            continue
        n = 1
        for d in w.shape:
            n *= d
        total += n * (_STORED_BYTES[w.quant.dtype] if w.quant.quantized else model.dtype.itemsize)
    return int(total)


def latency(args) -> dict:
    bw, mm = copy_bandwidth(), matmul_rate()
    m = random_model(args.spec, _config(args.config), dtype="bf16", device="cuda", backend=args.backend,
                     quantization=args.quantization or "none", kv_cache_dtype=args.kv_cache_dtype or "auto")
    params = m.plan.num_parameters()
    wbytes = weight_bytes(m)
    # A state-space model's decode step also reads and writes its sequence's recurrent state (conv + SSM).
    sbytes = 2 * state_bytes_per_slot(m.plan.state_sites, m.dtype)
    ttft, step, back_to_back = _prefill_decode_ms(m.model, m.plan, m.dtype, args.prompt, args.steps)
    gemv_ms, mv_ms = gemv_time(m) if args.backend == "cuda" else (float("nan"), float("nan"))
    result = {
        "copy_bw_TBps": bw / 1e12, "matmul_TFLOPs": mm / 1e12, "params": params, "weight_GB": wbytes / 1e9,
        "state_rw_MB": sbytes / 1e6, "roofline_ms": (wbytes + sbytes) / bw * 1e3, "decode_ms": step,
        "decode_back_to_back_ms": back_to_back,
        "gemms_only_ms": gemv_ms, "gemms_only_mv_ms": mv_ms,
        "ttft_ms": ttft,
        "ttft_floor_ms": 2 * params * args.prompt / mm * 1e3,
    }
    stack = getattr(m.model, "_ssm_stack", None)  # Mamba-2's layers as one kernel (KILN_SSM_STACK): whether it ran
    if stack is not None and stack.stack is not None:
        result["ssm_stack_ran"] = int(stack.ran)
    if getattr(args, "speculative", None):
        m.model = None
        torch.cuda.empty_cache()
        result.update(speculative_decode(args.spec, _config(args.config), args.speculative,
                                         args.num_speculative_tokens, args.draft_layers, args.steps,
                                         backend=args.backend, forced=args.forced_acceptance))
    if args.hf:
        m.model = None  # free the GPU for the HF model
        torch.cuda.empty_cache()
        result["hf_decode_ms"] = hf_decode_ms(args.config, args.steps)
    if getattr(args, "tp1_overhead", False):
        m.model = None
        torch.cuda.empty_cache()
        result.update(tp1_overhead(args.spec, _config(args.config), args.prompt, args.steps))
    return result


def _prefill_decode_ms(model, plan, dtype, prompt_len: int, steps: int) -> tuple[float, float, float]:
    """(TTFT of a `prompt_len`-token prompt, median batch-1 decode step after it, the mean of `steps` more
    enqueued back to back) in ms, CUDA events."""
    kv = KVStore(plan.sites, -(-(prompt_len + 2 * steps + 8) // 16) + 1, 16, dtype, "cuda")
    table = tuple(range(kv.num_pages))
    prompt = torch.randint(0, plan.vocab_size, (prompt_len,))
    with torch.no_grad():
        run_prefill = lambda: model.forward(StepBatch(prompt, [SeqSlice(0, prompt_len, 0, table)]), kv)  # noqa: E731
        run_prefill()
        ttft = statistics.median(_events_ms(run_prefill, 5))
        ctx = prompt_len
        tok = torch.tensor([1])

        def decode():
            nonlocal ctx
            model.forward(StepBatch(tok, [SeqSlice(0, 1, ctx, table)]), kv)
            ctx += 1

        for _ in range(3):
            decode()
        step = statistics.median(_events_ms(decode, steps))
        # the same steps enqueued back to back, one pair of events around them all: the host's work for a step
        # overlaps the GPU's for the one before (as the engine's overlapped steps do), so the figure is the GPU's
        # step time, without the host's jitter that each step's own events include
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            decode()
        b.record()
        b.synchronize()
    return ttft, step, a.elapsed_time(b) / steps


def tp1_overhead(spec, config: dict, prompt_len: int, steps: int, rounds: int = 3) -> dict:
    """Batch-1 decode of one random bf16 model two ways over the same weights: the plain cuda backend,
    and the tensor-parallel runtime at world size 1 (this process is rank 0, NCCL, no workers: the
    shard pass at one rank, rank_model, ParallelModel, CUDA graphs). Timed alike (_prefill_decode_ms),
    alternating `rounds` times; the median of each. NCCL's process group is made and left here."""
    import torch.distributed as dist
    from kiln.dsl import load_spec, passes

    from . import distributed as d
    from .model import make_backend

    if dist.is_initialized():
        raise BenchError("--tp1-overhead: this process already belongs to a process group")
    ref = random_model(spec, config, dtype="bf16", device="cuda", backend="reference")
    plain = make_backend(ref.plan, dict(ref.model.weights), "cuda", "cuda")
    rdv = tempfile.mkdtemp(prefix="kiln-bench-tp1-")
    comm = d.init(0, 1, f"file://{rdv}/store", "nccl", device=f"cuda:{torch.cuda.current_device()}")
    try:
        split = passes.build(load_spec(spec), config, ranks=1)
        parallel = d.ParallelModel(d.rank_model(split, dict(ref.model.weights), comm, backend="cuda"))
        for model in (plain, parallel):
            model.reserve(1, prompt_len + steps + 8)
        times: dict[str, list[float]] = {"plain": [], "tp1": []}
        for _ in range(rounds):
            for name, model in (("plain", plain), ("tp1", parallel)):
                times[name].append(_prefill_decode_ms(model, ref.plan, ref.dtype, prompt_len, steps)[1])
    finally:
        dist.destroy_process_group()
    a, b = statistics.median(times["plain"]), statistics.median(times["tp1"])
    return {"tp1_plain_decode_ms": a, "tp1_parallel_decode_ms": b, "tp1_overhead": b / a - 1}


def gemv_time(m) -> tuple[float, float]:
    """The batch-1 decode's GEMMs alone (cuBLAS, M = 1), replayed as one CUDA graph in model
    order over the model's own weights: the part of a step the generated kernels cannot
    shorten. Returns (F.linear ms, torch.mv ms) — two cuBLAS entry points."""
    gemms = list(m.model._gemm.values())
    if any(not isinstance(w, torch.Tensor) for w, _ in gemms):
        return float("nan"), float("nan")  # quantized weights: no cuBLAS bf16 GEMM to time alone
    xs = {w.shape[1]: torch.randn(1, w.shape[1], device="cuda", dtype=m.dtype) for w, _ in gemms}
    out = []
    for fn in (lambda x, w: torch.nn.functional.linear(x, w), lambda x, w: torch.mv(w, x[0])):
        def run():
            for w, _ in gemms:
                fn(xs[w.shape[1]], w)
        run()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        out.append(statistics.median(_events_ms(g.replay, 10)))
    return out[0], out[1]


def hf_decode_ms(config_path: str, steps: int, batch: int = 1, prompt: int = 128) -> float:
    """Median decode-step time of HF transformers generate() (eager, its default cache) on random
    weights: a streamer timestamps every step, so the prefill never enters the figure."""
    import transformers
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):  # called with the prompt, then once per generated token
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    cfg = transformers.AutoConfig.for_model(**_config(config_path))
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")
    clock = Clock()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                       pad_token_id=0, streamer=clock)
    del model
    torch.cuda.empty_cache()
    steps_s = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # after the first token
    return statistics.median(steps_s) * 1e3


def throughput(args, m=None) -> dict:
    """`m`: a model bench_model(args) built, reused (a sweep builds one for all its shapes; a paired run one for
    both halves); None: built here."""
    if getattr(args, "guided", None):  # the same workload free first, then every request constrained
        m = m if m is not None else bench_model(args)
        free = _throughput(argparse.Namespace(**{**vars(args), "guided": None, "hf_batch": 0, "_tokenizer": True}), m)
        result = _throughput(argparse.Namespace(**{**vars(args), "_tokenizer": True}), m)
        result["free_decode_step_ms_p50"] = free["decode_step_ms_p50"]
        result["free_output_tok_s"] = free["output_tok_s"]
        result["guided_step_overhead"] = result["decode_step_ms_p50"] / max(free["decode_step_ms_p50"], 1e-9) - 1
        return result
    if getattr(args, "lora_adapters", 0):  # the same workload without adapters first, then with them
        m = m if m is not None else bench_model(args)
        base = throughput(argparse.Namespace(**{**vars(args), "lora_adapters": 0, "hf_batch": 0}), m)
        result = _throughput(args, m)
        result["base_decode_step_ms_p50"] = base["decode_step_ms_p50"]
        result["base_output_tok_s"] = base["output_tok_s"]
        result["lora_decode_ratio"] = base["decode_step_ms_p50"] / max(result["decode_step_ms_p50"], 1e-9)
        return result
    return _throughput(args, m)


def bench_model(args):
    """The random model a throughput run measures: --config's shape, --quantization / --kv-cache-dtype applied on
    load; with --tp / --pp split over that many processes of this machine."""
    cpu = getattr(args, "device", "cuda") == "cpu"  # a smoke run of the same code (CI), not a benchmark
    tp, pp = getattr(args, "tp", 1) or 1, getattr(args, "pp", 1) or 1
    if tp * pp > 1:  # check_args allowed it (the cuda backend: --tp alone, one GPU per rank)
        return split_random_model(args.spec, _config(args.config), tp, pp, "reference" if cpu else "cuda")
    return random_model(args.spec, _config(args.config), dtype="fp32" if cpu else "bf16",
                        device="cpu" if cpu else "cuda", backend=args.backend,
                        quantization=args.quantization or "none", kv_cache_dtype=args.kv_cache_dtype or "auto",
                        act_scale=getattr(args, "fp8_act_scale", None))


def release_engine(m) -> None:
    """After a run on a reused model: its graphs (which hold the finished engine's KV cache) dropped and the freed
    memory back to the device, so that the next engine sizes its KV cache from all of it again."""
    drop = getattr(m.model, "drop_graphs", None)
    if drop is not None:
        drop()
    gc.collect()  # the engine's reference cycles, if any, before the cache is emptied
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _throughput(args, m=None) -> dict:
    result: dict = {}
    if args.hf_batch:  # first: on an empty GPU unless the model is already built (a reused one)
        ms = hf_decode_ms(args.config, 32, batch=args.hf_batch, prompt=args.input_len)
        result["hf_batch"] = args.hf_batch
        result["hf_step_ms"] = ms
        result["hf_output_tok_s"] = args.hf_batch / (ms / 1e3)
    tp, pp = getattr(args, "tp", 1) or 1, getattr(args, "pp", 1) or 1
    owned = m is None  # built here: a split model's processes stop at the end
    if owned:
        m = bench_model(args)
    else:
        release_engine(m)  # a reused model: the run before's graphs and KV cache go first
    if tp * pp > 1:
        result.update(tp=tp, pp=pp)
    engine = LLMEngine(m, None, EngineConfig(page_size=getattr(args, "page_size", 16), max_num_seqs=args.max_batch,
                                             kv_memory_fraction=args.kv_fraction,
                                             max_tokens_per_step=args.max_tokens_per_step,
                                             max_model_len=args.input_len + args.output_len,
                                             enable_prefix_caching=getattr(args, "prefix_caching", True)))
    result["page_size"] = engine.config.page_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, m.plan.vocab_size, (args.requests, args.input_len), generator=gen).tolist()
    shared = min(getattr(args, "shared_prefix", 0), args.input_len)
    for p in prompts[1:]:
        p[:shared] = prompts[0][:shared]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    if getattr(args, "_tokenizer", False):  # --guided: both runs detokenise, so only the grammar differs
        engine.tokenizer = guided_tokenizer(getattr(args, "tokenizer", None))  # (requests ignore EOS)
        prompts = [[t % engine.tokenizer.vocab_size for t in p] for p in prompts]
    if getattr(args, "guided", None):
        params = replace(params, guided=guided_workload(args.guided, args.output_len))
        result["guided"] = args.guided
    loras: list = []
    if getattr(args, "lora_adapters", 0):  # random PEFT adapters on every linear, round-robin over requests
        folder = tempfile.mkdtemp(prefix="kiln-lora-")
        for name, path in random_adapters(m.plan, args.lora_adapters, args.lora_rank, folder).items():
            engine.load_lora(name, path)
            loras.append(replace(params, lora=name))
        result.update(lora_adapters=args.lora_adapters, lora_rank=args.lora_rank)
    t0 = time.perf_counter()  # after the adapters are loaded (loading them drops captured graphs)
    if not getattr(args, "no_warmup", False):
        result["graphs_captured"] = warm_up(engine, args.input_len, args.output_len)
    result["warmup_s"] = time.perf_counter() - t0
    start = time.perf_counter()
    first: dict[str, float] = {}
    end: dict[str, float] = {}
    for i, p in enumerate(prompts):
        engine.add_request(p, loras[i % len(loras)] if loras else params)
    kinds: dict[str, list[float]] = {"decode": [], "mixed": []}  # step wall times by kind
    prompt_tokens = 0  # of the steps with prompt tokens
    counts = getattr(engine.model, "step_counts", None)  # how the backend ran its steps (cuda: graphs or eager)
    counts_before = dict(counts) if counts is not None else {}
    last = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        kinds.setdefault(engine.last_step.kind, []).append(now - last)
        prompt_tokens += engine.last_step.num_prefill_tokens
        last = now
        for o in outs:
            first.setdefault(o.request_id, now)
            if o.finished:
                end[o.request_id] = now
    total = time.perf_counter() - start
    if tp * pp > 1 and owned:
        m.model.shutdown()  # the worker processes exit
    ttft = percentiles([first[r] - start for r in first])
    tpot = percentiles([(end[r] - first[r]) / max(1, args.output_len - 1) for r in end])
    result.update({
        "requests": args.requests, "input_len": args.input_len, "output_len": args.output_len,
        "output_tok_s": args.requests * args.output_len / total, "req_s": args.requests / total,
        "ttft_p50_ms": ttft["p50"], "ttft_p99_ms": ttft["p99"],
        "tpot_p50_ms": tpot["p50"], "tpot_p99_ms": tpot["p99"], "seconds": total,
        "kv": engine.capacity, "preemptions": engine.scheduler.num_preemptions,
        **prefix_stats(engine),
        # where the time went: decode-only steps (CUDA graphs) and steps with prompt tokens (eager)
        "decode_steps": len(kinds["decode"]), "decode_steps_s": sum(kinds["decode"]),
        "decode_step_ms_p50": percentiles(kinds["decode"])["p50"] if kinds["decode"] else 0.0,
        "mixed_steps": len(kinds["mixed"]), "mixed_steps_s": sum(kinds["mixed"]),
        "mixed_step_ms_p50": percentiles(kinds["mixed"])["p50"] if kinds["mixed"] else 0.0,
        "mixed_step_ms_p90": percentiles(kinds["mixed"])["p90"] if kinds["mixed"] else 0.0,
        "mixed_step_ms_max": 1e3 * max(kinds["mixed"], default=0.0),
        "prompt_tokens_per_mixed_step": prompt_tokens / len(kinds["mixed"]) if kinds["mixed"] else 0.0,
        # the backend's steps in the timed region by how they ran (runtime/cuda_backend.py step_counts)
        **{f"steps_{k}": v - counts_before.get(k, 0) for k, v in sorted((counts or {}).items())},
    })
    return result


def split_random_model(spec, config: dict, tp: int, pp: int, backend: str = "reference"):
    """`--tp N --pp M`: a random model split over N x M processes of this machine (gloo; this one is
    rank 0, runtime/distributed.py): every rank makes random_model's weights (same seed) and keeps
    its shard and stage. backend "cuda" (--tp only): rank r makes them in bf16 on cuda:r and runs the
    cuda backend there, NCCL. Stop its workers with `.model.shutdown()` (also run at exit)."""
    import atexit

    import torch.multiprocessing as mp

    from . import distributed as d

    rdv = tempfile.mkdtemp(prefix="kiln-bench-tp-")
    args = (str(spec), config, tp, pp, f"file://{rdv}/store", backend)
    procs = [mp.get_context("spawn").Process(target=_split_rank, args=(r, *args), daemon=True,
                                             name=f"kiln-tp-rank{r}") for r in range(1, tp * pp)]
    for p in procs:
        p.start()
    whole, inner = _split_rank(0, *args)
    model = d.ParallelModel(inner)
    model.procs, model.rendezvous = procs, rdv
    atexit.register(model.shutdown)
    return replace(whole, plan=model.plan, model=model)


def _split_rank(rank: int, spec: str, config: dict, tp: int, pp: int, init_method: str, backend: str = "reference"):
    """Rank `rank` of split_random_model: rank 0 returns (the whole model, its shard); the others
    run the steps rank 0 broadcasts until it says stop."""
    import os
    import sys

    from kiln.dsl import load_spec, passes

    from . import distributed as d

    if rank:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (tp * pp)))
    if backend == "cuda":
        comm = d.init(rank, tp, init_method, "nccl", device=f"cuda:{rank}")
        whole = random_model(spec, config, dtype="bf16", device=f"cuda:{rank}")
    else:
        comm = d.init(rank, tp * pp, init_method, tp=tp)
        whole = random_model(spec, config)
    shard = d.rank_model(passes.build(load_spec(spec), config, ranks=tp, stages=pp), whole.model.weights, comm,
                         backend=backend)
    if backend == "cuda" and rank:
        whole = None  # the shard is cut (copied): the whole model's memory goes back
        torch.cuda.empty_cache()
    if rank == 0:
        return whole, shard
    try:
        with torch.no_grad():
            d.worker_loop(shard)
    except d.RankLost as e:
        print(f"kiln bench throughput, rank {rank}: {e}; exiting", file=sys.stderr)
        os._exit(1)
    torch.distributed.destroy_process_group()


def guided_tokenizer(source: str | None = None):
    """The tokenizer of `source` (as serve's --tokenizer), else the embedded SmolLM2's: the grammar
    engine needs one; a random model's larger vocabulary only adds tokens that are never allowed."""
    from .checkpoint import CheckpointError
    from .generate import open_tokenizer
    from .tokenizer import TokenizerError

    try:
        return open_tokenizer(source)
    except (TokenizerError, CheckpointError) as e:
        raise BenchError(f"--tokenizer {source}: {e}") from None


def guided_workload(kind: str, output_len: int) -> dict:
    """A constraint that cannot complete within output_len tokens (so constrained requests run as
    many steps as free ones): JSON with at least output_len array items, or an endless regex."""
    if kind == "json":
        return {"json": {"type": "object", "properties": {"values": {
            "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10**6}, "minItems": output_len}},
            "required": ["values"], "additionalProperties": False}}
    return {"regex": "(?:[a-z]+ ){" + str(output_len) + ",}[a-z]+"}


def warm_up(engine: LLMEngine, input_len: int, output_len: int) -> int:
    """What a throughput benchmark's timed region leaves out, as its peers' do (vLLM captures its CUDA graphs
    at start-up; a TensorRT-LLM engine is built before trtllm-bench runs): the kernels one request of the
    workload's shape compiles and loads, and the CUDA graphs (LLMEngine.capture_graphs: every decode bucket up
    to the engine's max_num_seqs, the full steps' large mixed graphs with as many prompts as the workload's full
    steps hold; the number captured is returned). The request's prompt is drawn apart from the workload's,
    so it gives the prefix cache no hits, and the counters the result reports start from zero after it."""
    gen = torch.Generator().manual_seed(12345)
    vocab = engine.tokenizer.vocab_size if engine.tokenizer is not None else engine.loaded.plan.vocab_size
    prompt = torch.randint(0, vocab, (input_len,), generator=gen).tolist()
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=min(output_len, 4), ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    made = engine.capture_graphs(input_len)
    s = engine.scheduler
    s.prefix_query_tokens = s.prefix_hit_tokens = s.num_preemptions = 0
    engine.num_overlapped = engine.num_dropped_rows = 0
    return made


def prefix_stats(engine: LLMEngine) -> dict:
    """The prefix cache's counters: hit rate = tokens served from the cache / prompt tokens."""
    s = engine.scheduler
    return {"prefix_caching": s.prefix_caching, "prefix_query_tokens": s.prefix_query_tokens,
            "prefix_hit_tokens": s.prefix_hit_tokens,
            "prefix_hit_rate": s.prefix_hit_tokens / s.prefix_query_tokens if s.prefix_query_tokens else 0.0}


def prefix(args) -> dict:
    """TTFT (add_request to the first token, one request alone) of a prompt of --prefix system
    tokens + --suffix user tokens, when the system prompt is new (uncached) and when a request
    with the same system prompt and another user suffix ran just before (cached: only the suffix
    is computed, its queries attending to the cached pages). Each kind --reps times, alternating,
    each uncached one with a new random system prompt; medians. max_tokens_per_step holds a whole
    prompt, so an uncached TTFT is one prefill step, as in `bench latency`."""
    cpu = getattr(args, "device", "cuda") == "cpu"
    device = "cpu" if cpu else "cuda"
    m = random_model(args.spec, _config(args.config), dtype="fp32" if cpu else "bf16", device=device,
                     backend=args.backend, quantization=args.quantization or "none",
                     kv_cache_dtype=args.kv_cache_dtype or "auto")
    n = args.prefix + args.suffix
    page = 16
    per_prompt = -(-n // page)
    # Room for every prompt of the run at once, so that nothing is evicted between the two requests of a pair.
    engine = LLMEngine(m, None, EngineConfig(page_size=page, num_pages=(2 * args.reps + 6) * per_prompt,
                                             max_num_seqs=2, max_tokens_per_step=max(2048, n), max_model_len=n + 1))
    gen = torch.Generator().manual_seed(0)
    vocab = m.plan.vocab_size

    def tokens(k: int) -> list[int]:
        return torch.randint(0, vocab, (k,), generator=gen).tolist()

    def ttft(prompt: list[int]) -> float:
        if not cpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()  # the sampled token is on the host when step returns
        return time.perf_counter() - t0

    sched = engine.scheduler
    uncached, cached, hits = [], [], []
    for rep in range(args.reps + 1):  # the first pair warms up both paths (kernels, allocator)
        system = tokens(args.prefix)
        before = sched.prefix_hit_tokens
        t_new = ttft(system + tokens(args.suffix))
        if sched.prefix_hit_tokens != before:
            raise BenchError("a new random system prompt hit the prefix cache: the benchmark is broken")
        t_hit = ttft(system + tokens(args.suffix))
        if rep:
            uncached.append(t_new)
            cached.append(t_hit)
            hits.append(sched.prefix_hit_tokens - before)
    u, c = statistics.median(uncached), statistics.median(cached)
    return {"prefix_tokens": args.prefix, "suffix_tokens": args.suffix, "reps": args.reps,
            "ttft_uncached_ms": u * 1e3, "ttft_cached_ms": c * 1e3, "cached_over_uncached": c / u,
            "cached_tokens_per_hit": statistics.median(hits), "kv": engine.capacity, **prefix_stats(engine)}


class BenchError(Exception):
    """A benchmark that cannot run here or with these arguments; one message."""


def startup(args) -> dict:
    """Process start to first token: `kiln generate CHECKPOINT --chat ... --max-tokens 1` run in
    fresh processes one after another, timed from just before the process is created to the
    first byte it writes to stdout (the first token's text, flushed as soon as it is sampled).
    Each run is paired with a process that only imports torch (the floor no Kiln change can go
    below), so that a busy machine shows as a slower floor rather than as a slower Kiln."""
    import os
    import platform
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "kiln.cli", "generate", *([args.checkpoint] if args.checkpoint else []),
           "--chat", args.chat, "--max-tokens", "1", "--device", args.device]
    # The floor writes a byte once torch is imported, timed the same way (its exit not counted).
    floor = [sys.executable, "-c", "import sys, torch; sys.stdout.write('.'); sys.stdout.flush()"]
    times, floors, stats = [], [], ""
    for _ in range(args.runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen(floor, stdout=subprocess.PIPE)
        proc.stdout.read(1)
        floors.append(time.perf_counter() - t0)
        proc.communicate()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = proc.stdout.read(1)
        t1 = time.perf_counter()
        rest, err = proc.communicate()
        if proc.returncode != 0 or not first:
            last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"`kiln {' '.join(cmd[3:])}` failed (exit status {proc.returncode}): {last}")
        times.append(t1 - t0)
        stats = err.decode(errors="replace").strip().splitlines()[-1]
    return {
        "command": "kiln " + " ".join(cmd[3:]), "runs": args.runs,
        "first_token_s_median": statistics.median(times), "first_token_s_min": min(times),
        "first_token_s_max": max(times), "first_run_s": times[0],
        "import_torch_s_median": statistics.median(floors),
        "kiln_beyond_torch_s_median": statistics.median(t - f for t, f in zip(times, floors)),
        "last_run_stats": stats, "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_model()}",
    }


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


# throughput's workload when not given: BENCHMARKS.md's on a GPU; on a CPU, a smoke run of seconds
# (the GPU workload there would hold a 23 GB KV cache for the default model's shape and run for hours)
THROUGHPUT_DEFAULTS = {"cuda": dict(requests=1000, input_len=1000, output_len=1000, max_batch=256),
                       "cpu": dict(requests=4, input_len=32, output_len=8, max_batch=4)}


# prefix's workload when not given: the 2,000-token system prompt on a GPU; a smoke run on a CPU
PREFIX_DEFAULTS = {"cuda": dict(prefix=2000, suffix=32), "cpu": dict(prefix=64, suffix=8)}


def check_args(args) -> None:
    """latency / throughput: the option combinations this machine can run (fills in the defaults
    that depend on the device)."""
    cpu = getattr(args, "device", "cuda") == "cpu"
    if args.backend is None:
        args.backend = "reference" if cpu else "cuda"
    if args.mode == "throughput":
        for name, value in THROUGHPUT_DEFAULTS["cpu" if cpu else "cuda"].items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.mode == "prefix":
        for name, value in PREFIX_DEFAULTS["cpu" if cpu else "cuda"].items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.mode == "throughput" and getattr(args, "sweep", None):
        sweep_shapes(args.sweep)  # refused here, before any model loads
    if getattr(args, "fp8_act_scale", None) is not None and args.quantization != "fp8":
        raise BenchError(f"--fp8-act-scale quantizes the activations of fp8 weights with per-tensor scales "
                         f"(--quantization fp8), not --quantization {args.quantization or 'none'}")
    if args.mode == "throughput" and (getattr(args, "tp", 1) or 1) * (getattr(args, "pp", 1) or 1) > 1:
        check_split(args, cpu)
    if getattr(args, "tp1_overhead", False) and args.backend != "cuda":
        raise BenchError(f"--tp1-overhead times the cuda backend (plain vs the tensor-parallel runtime at one "
                         f"rank), not --backend {args.backend}")
    if cpu and (args.backend != "reference" or getattr(args, "hf_batch", 0)):
        raise BenchError("--device cpu runs the reference backend without an HF baseline (no --backend cuda, "
                         "no --hf-batch): a smoke run of the benchmark's code, not a measurement")
    if not cpu and not torch.cuda.is_available():
        raise BenchError(f"`kiln bench {args.mode}` measures a CUDA GPU and this machine has none"
                         + (f" (`{args.mode} --device cpu` is a smoke run of its code)"
                            if args.mode in ("throughput", "prefix") else ""))


def check_split(args, cpu: bool) -> None:
    """throughput --tp / --pp: what the split model (CPU processes, gloo) cannot run, by name."""
    tp, pp = args.tp or 1, args.pp or 1
    opt = " ".join(f"--{k} {v}" for k, v in (("tp", tp), ("pp", pp)) if v > 1)
    if not cpu:
        if pp > 1:
            raise BenchError(f"{opt} --device cuda: pipeline stages run on CPU processes (the reference backend, "
                             f"gloo) only; the cuda backend runs --tp N alone (or use --device cpu)")
        if args.backend != "cuda":
            raise BenchError(f"{opt} --device cuda runs the cuda backend (NCCL), not --backend {args.backend}; "
                             f"the reference backend splits over CPU processes (--device cpu)")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < tp:
            raise BenchError(f"{opt}: the split model needs {tp} CUDA GPUs of this machine (one per rank), it has "
                             f"{gpus} (`throughput --device cpu {opt}` is a smoke run over CPU processes)")
    for name, value, why in (("--quantization", args.quantization, "quantized weights are not split across ranks"),
                             ("--kv-cache-dtype", args.kv_cache_dtype if args.kv_cache_dtype != "auto" else None,
                              "the split KV cache runs in the run dtype only"),
                             ("--lora-adapters", getattr(args, "lora_adapters", 0) or None,
                              "LoRA adapters are not split across ranks")):
        if value:
            raise BenchError(f"{opt} with {name} {value}: {why} yet")


PEERS = Path(__file__).resolve().parent.parent / "configs" / "trtllm-perf-overview.json"


def sweep_shapes(value: str) -> tuple[tuple[int, int], ...]:
    """--sweep's value: "all" (every published shape), or a comma-separated list of them."""
    if value == "all":
        return peers.SWEEP_SHAPES
    known = {f"{i}/{o}": (i, o) for i, o in peers.SWEEP_SHAPES}
    shapes = []
    for item in value.split(","):
        if item.strip() not in known:
            raise BenchError(f"--sweep {value}: {item.strip()!r} is not a shape of the published table; "
                             f"give all, or some of {', '.join(known)}")
        shapes.append(known[item.strip()])
    return tuple(dict.fromkeys(shapes))


def precision_of(args, cpu: bool) -> str:
    """What a run computes in, for its header and the sweep's table beside the peers' (their FP8 figures
    are weights and KV cache)."""
    parts = ["fp32" if cpu else "bf16"]
    q, kv = getattr(args, "quantization", None) or "none", getattr(args, "kv_cache_dtype", None) or "auto"
    if q != "none":
        static = getattr(args, "fp8_act_scale", None)
        parts.append(f"weights {q}" + (f", activations static (scale {static:g})" if static is not None else ""))
    if kv != "auto":
        parts.append(f"KV {kv}")
    return ", ".join(parts)


def _step_counts(r: dict) -> str:
    """The backend's step counts of a throughput result ("steps_*"), as '; steps: eager 3, mixed_graph 70'."""
    counts = [f"{k[len('steps_'):]} {v}" for k, v in r.items() if k.startswith("steps_") and v]
    return "; steps: " + ", ".join(counts) if counts else ""


def sweep(args, device_name: str, precision: str) -> int:
    """throughput at each shape of TensorRT-LLM's published table (or those --sweep names), printed
    beside its figures for this card. On a CPU (a smoke run) the shapes are divided by 64."""
    table = peers.load(PEERS)
    scale = 64 if getattr(args, "device", "cuda") == "cpu" else 1
    ours = {}
    m = bench_model(args)  # one model for every shape: each run makes its own engine, KV cache and graphs
    for isl, osl in sweep_shapes(args.sweep):
        args.input_len, args.output_len = max(1, isl // scale), max(1, osl // scale)
        r = throughput(args, m)
        print(f"{isl}/{osl}: {r['output_tok_s']:,.0f} output tok/s ({r['seconds']:.1f} s: {r['decode_steps']} decode "
              f"steps, p50 {r['decode_step_ms_p50']:.2f} ms; {r['mixed_steps']} with prompt tokens, "
              f"{r['mixed_steps_s']:.1f} s, p50 {r['mixed_step_ms_p50']:.2f} / p90 {r['mixed_step_ms_p90']:.2f} / max "
              f"{r['mixed_step_ms_max']:.0f} ms, {r['prompt_tokens_per_mixed_step']:,.0f} prompt tokens each; "
              f"{r['preemptions']} preemptions{_step_counts(r)})", flush=True)
        ours[(isl, osl)] = r["output_tok_s"]
    if hasattr(m.model, "shutdown"):  # a split model (--tp / --pp): its worker processes exit
        m.model.shutdown()
    print(peers.sweep_table(table, peers.card_of(device_name), ours, precision))
    return 0


def main(args) -> int:
    if args.mode == "startup":
        r = startup(args)
        print(f"# kiln bench startup, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {r['machine']}")
        print("| metric | value |\n| --- | --- |")
        for k, v in r.items():
            print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
        return 0
    check_args(args)
    cpu = getattr(args, "device", "cuda") == "cpu"
    name = "CPU (smoke run, not a benchmark)" if cpu else torch.cuda.get_device_name()
    print(f"# {name}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, spec {args.spec}, "
          f"config {args.config}, backend {args.backend}, {precision_of(args, cpu)}")
    if args.mode == "throughput" and args.sweep:
        return sweep(args, name, precision_of(args, cpu))
    r = latency(args) if args.mode == "latency" else prefix(args) if args.mode == "prefix" else throughput(args)
    print(json.dumps(r, indent=1, default=str))
    print("| metric | value |\n| --- | --- |")
    for k, v in r.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if args.mode == "latency":
        print(f"decode / roofline = {r['decode_ms'] / r['roofline_ms']:.3f} (target <= 1.10); "
              f"TTFT / floor = {r['ttft_ms'] / r['ttft_floor_ms']:.3f} (target <= 1.10)"
              + (f"; HF generate / kiln = {r['hf_decode_ms'] / r['decode_ms']:.1f}x" if "hf_decode_ms" in r else ""))
        if "tp1_overhead" in r:
            print(f"TP=1 code path: {r['tp1_parallel_decode_ms']:.4f} ms vs plain {r['tp1_plain_decode_ms']:.4f} ms "
                  f"per decode step: overhead {100 * r['tp1_overhead']:+.2f}% (target <= 1%)")
    elif args.mode == "prefix":
        print(f"TTFT with a cached {r['prefix_tokens']}-token system prompt: {r['ttft_cached_ms']:.2f} ms, "
              f"uncached: {r['ttft_uncached_ms']:.2f} ms; cached / uncached = {r['cached_over_uncached']:.3f} "
              f"(target <= 0.15)")
    elif "hf_output_tok_s" in r:
        print(f"kiln / HF generate(batch {r['hf_batch']}) = {r['output_tok_s'] / r['hf_output_tok_s']:.2f}x "
              f"(target >= 8); TensorRT-LLM published: 15,220 tok/s (1000/1000, FP8, H100 SXM)")
    return 0


def speculative_decode(spec, config: dict, method: str, k: int, draft_layers: int | None, steps: int,
                       backend: str = "cuda", device: str = "cuda", prompt_len: int = 256,
                       dtype: str | None = None, forced: bool = False) -> dict:
    """Batch-1 greedy decode of `steps` tokens through the engine, plain and speculative, in the
    same run: tokens/s of each, acceptance length, tokens per target step, the speedup.
    The draft (method "draft") is the target truncated to `draft_layers` layers (default: a
    quarter), sharing its weights; the prompt is a random 32-token block repeated, so n-gram
    lookup finds matches (random-weight models also tend to repeat themselves).
    forced: the target's layers past the draft's are zeroed — they still run, at full cost, but
    leave the residual stream as it is — so the draft predicts the target exactly and every draft
    token is accepted (acceptance length k + 1): the speedup at a known acceptance, which random
    weights cannot otherwise give. dtype: default fp32 on the CPU, bf16 on the GPU (where greedy
    tokens may differ from plain decoding at a near-tie: verification runs other kernels)."""
    from .model import make_backend
    from .speculative import truncated_copy

    if forced and method != "draft":
        raise BenchError("--forced-acceptance needs --speculative draft")
    dtype = dtype or ("fp32" if device == "cpu" else "bf16")
    ref = random_model(spec, config, dtype=dtype, device=device, backend="reference")
    draft = None
    if method == "draft":
        draft_layers = draft_layers or max(1, int(config.get("num_hidden_layers", 4)) // 4)
        draft = truncated_copy(ref, spec, config, draft_layers, backend)
        if forced:
            kept = {s.name for s in draft.plan.weights.values() if s.source is not None}
            for name, t in ref.model.weights.items():
                if name not in kept and isinstance(t, torch.Tensor):
                    t.zero_()
    # The reference model's weights, shared by the target's backend and the draft's.
    target = replace(ref, model=make_backend(ref.plan, dict(ref.model.weights), backend, device))
    gen = torch.Generator().manual_seed(0)
    block = torch.randint(0, ref.plan.vocab_size, (32,), generator=gen).tolist()
    prompt = (block * (prompt_len // 32 + 1))[:prompt_len]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)

    def run(spec_method):
        cfg = EngineConfig(page_size=16, max_num_seqs=1, max_model_len=prompt_len + steps + k + 1,
                           num_pages=-(-(prompt_len + steps + k + 1) // 16) + 1, speculative=spec_method,
                           num_speculative_tokens=k)
        engine = LLMEngine(target, None, cfg, draft=draft if spec_method == "draft" else None)
        # A first request through the same engine captures its CUDA graphs (each engine's own:
        # they write its KV pages), so the timed one replays them.
        engine.add_request(prompt, params)
        while engine.has_unfinished():
            engine.step()
        engine.add_request(prompt, params)
        engine.step()  # the prefill (and first token)
        if device != "cpu":
            torch.cuda.synchronize()
        t0, n0, steps_run = time.perf_counter(), 1, 0
        out = None
        while engine.has_unfinished():
            outs = engine.step()
            steps_run += 1
            out = outs[-1] if outs else out
        if device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        n = len(out.outputs[0].token_ids) - n0 if out else 0
        return n / dt if dt > 0 else 0.0, n / max(steps_run, 1), engine.spec_stats, out.outputs[0].token_ids

    run(None)  # warm-up of both paths (kernels compiled, cuBLAS algorithms picked)
    run(method)
    plain_tps, _, _, plain_tokens = run(None)
    spec_tps, per_step, stats, spec_tokens = run(method)
    return {"spec_method": method, "spec_k": k, "spec_draft_layers": draft_layers if draft is not None else 0,
            "plain_decode_tok_s": plain_tps, "spec_decode_tok_s": spec_tps, "spec_speedup": spec_tps / plain_tps,
            "spec_acceptance_length": stats.acceptance_length, "spec_acceptance_rate": stats.acceptance_rate,
            "spec_tokens_per_target_step": per_step, "spec_same_tokens": spec_tokens == plain_tokens,
            "spec_forced_acceptance": forced}
