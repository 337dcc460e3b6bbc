"""Tensor / expert parallelism on torch.distributed: one process per rank (gloo on CPU, NCCL on GPU).

Rank 0 runs the engine (scheduler, sampler, server) with a `ParallelModel` as its backend: each
step it broadcasts the batch (tokens + sequence metadata) to the other ranks, then every rank runs
its shard of the plan with the reference backend and its own KV cache (its KV heads), meeting at the
collectives the shard pass placed in the plan (plan.collectives). Ranks 1.. run `worker_loop`.
Processes are started by Kiln (`spawn_workers`, torch.multiprocessing's spawn start method) or by
`torchrun` (`init_from_env`). A rank that dies is noticed through the process group's timeout: the
others raise `RankLost` and exit with a message, never hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from kiln.dsl import Plan

from .batch import StepBatch
from .kv_store import KVStore
from .parallel_weights import expert_programs_elsewhere, local_plan, local_weights
from .reference import ReferenceModel

DEFAULT_TIMEOUT_S = 60.0


class RankLost(RuntimeError):
    """Another rank stopped answering (it died or hung): this one gives up."""


@dataclass
class Comm:
    rank: int
    world: int
    timeout_s: float = DEFAULT_TIMEOUT_S

    def collective(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        try:
            if kind == "all_reduce":
                t = t.contiguous()
                dist.all_reduce(t)
                return t
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts, dim=1)
        except RuntimeError as e:  # gloo: a peer closed its connection, or the timeout passed
            raise RankLost(f"rank {self.rank}: a {kind} failed ({_short(e)}): another rank died or stopped "
                           f"answering") from None

    def broadcast(self, obj=None):
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as e:
            raise RankLost(f"rank {self.rank}: the step broadcast from rank 0 failed ({_short(e)}): a rank died "
                           f"or stopped answering") from None
        return box[0]


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def init(rank: int, world: int, init_method: str, backend: str = "gloo",
         timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return Comm(rank, world, timeout_s)


def init_from_env(backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    """Under `torchrun`: RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment."""
    return init(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", backend, timeout_s)


def rank_model(plan: Plan, weights: dict[str, torch.Tensor], comm: Comm, whole: bool = True) -> ReferenceModel:
    """This rank's reference backend: its shard of the plan and weights (`whole`: cut from whole
    weights; else already this rank's, from load_sharded)."""
    mine = local_weights(plan, weights, comm.rank) if whole else weights
    model = ReferenceModel(local_plan(plan, comm.rank), mine)
    model.comm = comm
    model.remote = expert_programs_elsewhere(model.plan, comm.rank)
    return model


class ParallelModel:
    """Rank 0's backend: broadcasts each step, then runs rank 0's shard. Same interface as
    ReferenceModel (the engine cannot tell)."""

    backend = "reference"

    def __init__(self, model: ReferenceModel):
        self.inner = model
        self.plan = model.plan
        self.weights = model.weights
        self.procs: list = []  # the worker processes spawn_workers started (none under torchrun / tests)
        self.rendezvous: str | None = None

    def reserve(self, max_seqs: int, max_context: int) -> None:
        pass

    def forward(self, batch: StepBatch, kv: KVStore, all_logits: bool = False) -> torch.Tensor:
        self.inner.comm.broadcast(("step", batch.tokens.cpu(), batch.seqs, all_logits, kv.num_pages, kv.page_size))
        return self.inner.forward(batch, kv, all_logits)

    def shutdown(self) -> None:
        """Tell the workers to exit (their loops return). With workers of spawn_workers: wait for them
        and leave the process group (a second call does nothing)."""
        if not dist.is_initialized():
            return
        try:
            self.inner.comm.broadcast(("stop",))
        except RankLost:
            if not self.procs:
                raise
        if self.procs:
            for p in self.procs:
                p.join(self.inner.comm.timeout_s)
            self.procs = []
            dist.destroy_process_group()
            if self.rendezvous:
                import shutil

                shutil.rmtree(self.rendezvous, ignore_errors=True)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def worker_loop(model: ReferenceModel, dtype: torch.dtype = torch.float32, device: str = "cpu") -> int:
    """Ranks 1..: run each step rank 0 broadcasts, with a KV cache of this rank's heads; returns
    the number of steps run when rank 0 says stop. Raises RankLost if rank 0 (or a peer) dies."""
    kv, steps = None, 0
    while True:
        msg = model.comm.broadcast()
        if msg[0] == "stop":
            return steps
        _, tokens, seqs, all_logits, pages, page_size = msg
        if kv is None or kv.num_pages != pages or kv.page_size != page_size:
            kv = KVStore(model.plan.sites, pages, page_size, dtype, device)
        model.forward(StepBatch(tokens.to(device), seqs), kv, all_logits)
        steps += 1


# -- processes started by Kiln: the parent is rank 0 -------------------------------------------


def spawn_workers(checkpoint, spec, dtype: torch.dtype, ranks: int, experts: str = "tp",
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelModel:
    """Start ranks 1..ranks-1 as processes of this machine (torch.multiprocessing, spawn start method;
    they meet at a file store in a fresh temporary folder), make this process rank 0 and return its
    backend. Each rank reads its own shard of `checkpoint` (`load_sharded`; a non-safetensors
    checkpoint is loaded whole and cut). The workers are daemonic and run `worker_loop` until rank 0's
    `shutdown()` (also run at exit); if rank 0 dies they notice within `timeout_s` and exit."""
    import atexit
    import tempfile

    import torch.multiprocessing as mp

    if dist.is_initialized():
        raise RuntimeError("spawn_workers: this process already belongs to a process group (one tensor-parallel "
                           "model per process)")
    plan, ckpt = _sharded_plan(checkpoint, spec, ranks, experts)  # bad options fail before any process starts
    rdv = tempfile.mkdtemp(prefix="kiln-tp-")
    init_method = f"file://{rdv}/store"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, ranks, init_method, str(checkpoint), str(spec), dtype, experts,
                                               timeout_s), daemon=True, name=f"kiln-tp-rank{r}")
             for r in range(1, ranks)]
    for p in procs:
        p.start()
    comm = init(0, ranks, init_method, timeout_s=timeout_s)
    weights = _load_rank(plan, ckpt, 0, dtype)
    model = ParallelModel(rank_model(plan, weights, comm, whole=False))
    model.procs, model.rendezvous = procs, rdv
    atexit.register(model.shutdown)
    return model


def _sharded_plan(checkpoint, spec, ranks: int, experts: str):
    from kiln.dsl import load_spec, passes

    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    config_file = str(ckpt.path) if ckpt.format == "gguf" else str(ckpt.path) + "/config.json"
    return passes.build(load_spec(spec), ckpt.config, config_file, ranks=ranks, experts=experts), ckpt


def _load_rank(plan: Plan, ckpt, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from .parallel_weights import load_sharded
    from .weights import load_weights

    if ckpt.format == "safetensors":
        return load_sharded(plan, ckpt, rank, dtype)[0]
    return local_weights(plan, load_weights(plan, ckpt, dtype, "cpu"), rank)  # GGUF: no slice reads


def _worker(rank: int, world: int, init_method: str, checkpoint: str, spec: str, dtype: torch.dtype,
            experts: str, timeout_s: float) -> None:
    """Ranks 1..: load this rank's shard, then run rank 0's steps until it says stop (or is lost)."""
    import sys

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        comm = init(rank, world, init_method, timeout_s=timeout_s)
        plan, ckpt = _sharded_plan(checkpoint, spec, world, experts)
        model = rank_model(plan, _load_rank(plan, ckpt, rank, dtype), comm, whole=False)
        with torch.no_grad():
            worker_loop(model, dtype)
    except RankLost as e:
        print(f"kiln: tensor-parallel {e}; exiting", file=sys.stderr)
        os._exit(1)
    dist.destroy_process_group()
