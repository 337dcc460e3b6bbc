"""One rank of `.ci/device_parallel.sh` (under torchrun): a random-init model of tests/configs.py
split over TP x PP ranks (NCCL, one GPU per rank, the reference backend), greedy tokens and logits
compared with the same model in one process on rank 0's GPU. Prints one JSON line per config.

CANNOT RUN TODAY: it needs a machine with TP x PP > 1 GPUs (see .ci/device_parallel.sh)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kiln.dsl import load_spec, passes  # noqa: E402
from kiln.runtime import distributed as d  # noqa: E402
from kiln.runtime.model import SingleSequence, random_model  # noqa: E402

from tests.configs import FAMILY_CONFIGS  # noqa: E402


def greedy(step, prompt, n):
    logits = [step(prompt)[-1]]
    tokens = []
    for _ in range(n):
        tokens.append(int(logits[-1].argmax()))
        logits.append(step([tokens[-1]])[-1])
    return tokens, torch.stack(logits)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--configs", default="llama,gemma3,qwen3_moe,deepseek_v2")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU: a smoke run of this script")
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu:
        device, backend = "cpu", "gloo"
    else:
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    comm = d.init_from_env(backend, timeout_s=120, tp=args.tp, device=device)
    for name in args.configs.split(","):
        spec = ROOT / "models" / f"{name.split('-')[0]}.kiln"
        config = FAMILY_CONFIGS[name]
        full = random_model(spec, config, device=device)  # seed 0: the same weights on every rank
        plan = passes.build(load_spec(spec), config, ranks=args.tp, stages=args.pp)
        model = d.rank_model(plan, full.model.weights, comm)
        if comm.rank:
            with torch.no_grad():
                d.worker_loop(model, torch.float32, device)
            continue
        with torch.no_grad():
            want_tokens, want = greedy(SingleSequence(full, 64).step, [5, 17, 3, 99, 42, 7], args.steps)
            seq = SingleSequence(full, 64)
            seq.model = d.ParallelModel(model)
            seq.kv = d.KVStore(model.plan.sites, seq.kv.num_pages, seq.kv.page_size, torch.float32, device)
            got_tokens, got = greedy(seq.step, [5, 17, 3, 99, 42, 7], args.steps)
            seq.model.shutdown()
        print(json.dumps(dict(config=name, tp=args.tp, pp=args.pp, same_tokens=got_tokens == want_tokens,
                              max_abs=float((got - want).abs().max()))), flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
