"""Tensor / expert / pipeline parallelism on torch.distributed: one process per rank (gloo on CPU,
NCCL on GPU).

Rank 0 runs the engine (scheduler, sampler, server) with a `ParallelModel` as its backend: each
step it broadcasts the batch (tokens + sequence metadata) to the other ranks, then every rank runs
its shard of the plan with its backend and its own KV cache (its KV heads), meeting at the
collectives the shard pass placed in the plan (plan.collectives). Ranks 1.. run `worker_loop`.

Backends: the reference backend (CPU processes, gloo), or the cuda backend (`backend="cuda"`: the
fused kernel program, codegen/fuse.py, on `cuda:<rank>`). On GPUs the collectives run over NCCL and are
captured in the cuda backend's CUDA graphs like its kernels; the step broadcast (pickled objects) runs
over a second, gloo group on the CPU, as vLLM does, so a step's metadata never waits on the device.
CUDA tensors over gloo (tests: ranks sharing one GPU) go through the CPU, so there the graphs are off.
Processes are started by Kiln (`spawn_workers`, torch.multiprocessing's spawn start method) or by
`torchrun` (`join_torchrun`: every process runs the same kiln command, on one node or several). A
rank that dies is noticed through the process group's timeout: the others raise `RankLost` and exit
with a message, never hang.

Pipeline parallelism (dsl/passes.py `stage`): ranks are stage-major (global rank = stage * tp + tp
rank; each stage's tp ranks share a process group for the shard pass's collectives). Every rank gets
the step's batch and cuts it alike into up to one micro-batch per stage (`micro_batches`: contiguous
groups of its sequences); for each in turn, stage s receives the values earlier stages send it (gloo,
rank t of a stage to rank t of the next), runs its instructions with a KV cache of its own layers'
sites and sends on, without waiting, what later stages read, so that stage s + 1 computes micro-batch
i while stage s computes i + 1. The last stage sends each micro-batch's sampled logits to rank 0,
which receives them after its own share and samples. A step of one sequence is one micro-batch.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from kiln.dsl import Plan
from kiln.dsl.plan import Program, Value

from .batch import StepBatch
from .kv_store import KVStore
from .parallel_weights import expert_programs_elsewhere, local_plan, local_types, local_weights
from .reference import ReferenceModel, StepContext

DEFAULT_TIMEOUT_S = 60.0


class RankLost(RuntimeError):
    """Another rank stopped answering (it died or hung): this one gives up."""


# dtypes a stage-to-stage message may carry, by their code in its header
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool, torch.float64)
_HEADER = 8  # int64s: dtype code, ndim, dims (at most 6)


@dataclass
class Comm:
    rank: int
    world: int
    timeout_s: float = DEFAULT_TIMEOUT_S
    tp: int = 0  # tensor-parallel ranks per pipeline stage (0: the whole world, one stage)
    group: Any = None  # this rank's stage's tensor-parallel process group (None: the whole world)
    device: str = "cpu"  # where messages' headers live (NCCL sends CUDA tensors only)
    backend: str = "gloo"  # the collectives' ("nccl": CUDA tensors, graph-capturable)
    cpu_group: Any = None  # the step broadcast's gloo group with NCCL (None: the default group)

    @property
    def tp_size(self) -> int:
        return self.tp or self.world

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def stage(self) -> int:
        return self.rank // self.tp_size

    def collective(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        """all_reduce: `t` summed over the ranks, in place when contiguous; all_gather: the ranks' `t`
        concatenated along features. gloo cannot all_gather CUDA tensors: they go through the CPU."""
        try:
            if t.is_cuda and self.backend == "gloo":
                out = self.collective(kind, t.cpu())
                return t.copy_(out) if kind == "all_reduce" and t.is_contiguous() else out.to(t.device)
            if kind == "all_reduce":
                t = t.contiguous()
                dist.all_reduce(t, group=self.group)
                return t
            parts = [torch.empty_like(t) for _ in range(self.tp_size)]
            dist.all_gather(parts, t.contiguous(), group=self.group)
            return torch.cat(parts, dim=1)
        except RuntimeError as e:  # gloo: a peer closed its connection, or the timeout passed
            raise RankLost(f"rank {self.rank}: a {kind} failed ({_short(e)}): another rank died or stopped "
                           f"answering") from None

    def isend(self, t: torch.Tensor, stage: int) -> list:
        """`t` to this tensor-parallel rank's peer in pipeline stage `stage` (a header of dtype and
        shape, then the data: the receiver needs no plan to size it), without waiting: the (work,
        tensor) pairs to pass to `wait`. Messages to one peer arrive in the order they were sent."""
        peer = stage * self.tp_size + self.tp_rank
        head = torch.zeros(_HEADER, dtype=torch.int64)
        head[0], head[1] = _DTYPES.index(t.dtype), t.dim()
        head[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        head, t = head.to(self.device), t.contiguous()
        try:
            return [(dist.isend(head, peer), head), (dist.isend(t, peer), t)]
        except RuntimeError as e:
            raise RankLost(f"rank {self.rank}: a send to rank {peer} (stage {stage}) failed ({_short(e)}): another "
                           f"rank died or stopped answering") from None

    def wait(self, sending: list) -> None:
        """Wait for the sends `isend` started."""
        try:
            for work, _ in sending:
                work.wait()
        except RuntimeError as e:
            raise RankLost(f"rank {self.rank}: a send failed ({_short(e)}): another rank died or stopped "
                           f"answering") from None

    def recv(self, stage: int) -> torch.Tensor:
        """What this tensor-parallel rank's peer in pipeline stage `stage` sends (`send`)."""
        peer = stage * self.tp_size + self.tp_rank
        try:
            head = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
            dist.recv(head, peer)
            head = head.cpu().tolist()
            t = torch.empty(head[2:2 + head[1]], dtype=_DTYPES[head[0]], device=self.device)
            dist.recv(t, peer)
        except RuntimeError as e:
            raise RankLost(f"rank {self.rank}: a receive from rank {peer} (stage {stage}) failed ({_short(e)}): "
                           f"another rank died or stopped answering") from None
        return t

    def broadcast(self, obj=None):
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        except RuntimeError as e:
            raise RankLost(f"rank {self.rank}: the step broadcast from rank 0 failed ({_short(e)}): a rank died "
                           f"or stopped answering") from None
        return box[0]


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def init(rank: int, world: int, init_method: str, backend: str = "gloo",
         timeout_s: float = DEFAULT_TIMEOUT_S, tp: int = 0, device: str = "cpu") -> Comm:
    """Join the process group; with `tp` < world (pipeline stages of `tp` ranks each) also make each
    stage's tensor-parallel group (every rank makes every group, in the same order). backend "nccl"
    (device: this rank's "cuda:N"): NCCL for the collectives, made here with a first all-reduce (a
    communicator must exist before a CUDA graph captures one), and a gloo group for the step broadcast."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        if tp and tp < world:
            raise ValueError("NCCL ranks run tensor parallelism only (pipeline stages: gloo, the reference backend)")
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world, timeout=timeout)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        dist.all_reduce(torch.zeros(1, device=device))
        torch.cuda.synchronize(device)
        return Comm(rank, world, timeout_s, 0, None, device, "nccl", cpu_group)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    group = None
    if tp and tp < world:
        if world % tp:
            raise ValueError(f"{world} ranks do not make pipeline stages of {tp} tensor-parallel ranks")
        groups = [dist.new_group(list(range(s * tp, (s + 1) * tp)), timeout=timeout) if tp > 1 else None
                  for s in range(world // tp)]
        group = groups[rank // tp]
    return Comm(rank, world, timeout_s, tp if tp and tp < world else 0, group, device)


def init_from_env(backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S, tp: int = 0,
                  device: str = "cpu") -> Comm:
    """Under `torchrun`: RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment."""
    return init(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", backend, timeout_s, tp, device)


def rank_model(plan: Plan, weights: dict[str, torch.Tensor], comm: Comm, whole: bool = True,
               backend: str = "reference", device: str | None = None, use_graphs: bool | None = None):
    """This rank's backend: its shard (and pipeline stage) of the plan and weights (`whole`: cut from
    whole weights; else already this rank's, from load_sharded). backend "cuda": a CudaModel on `device`
    (default: the comm's) over the plan with this rank's value types (runtime/parallel_weights.py
    local_types); CUDA graphs (`use_graphs` None: on) need NCCL: over gloo they are off."""
    mine = local_weights(plan, weights, comm.rank) if whole else weights
    if backend == "cuda":
        return _cuda_rank_model(plan, mine, comm, device or comm.device, use_graphs)
    if backend != "reference":
        raise ValueError(f"tensor parallelism: unknown backend '{backend}' (reference, cuda)")
    model = (StageModel if plan.stages else ReferenceModel)(local_plan(plan, comm.rank), mine)
    model.comm = comm
    model.remote = expert_programs_elsewhere(model.plan, comm.rank)
    return model


def _cuda_rank_model(plan: Plan, weights: dict[str, torch.Tensor], comm: Comm, device: str,
                     use_graphs: bool | None):
    from .cuda_backend import CudaModel

    if plan.stages:
        raise ValueError(f"--pp {len(plan.stages)}: pipeline stages run on the reference backend only")
    if any(w.shard.kind == "expert" for w in plan.weights.values()):
        raise ValueError("--ep: experts whole per rank run on the reference backend only (the cuda backend's "
                         "grouped GEMMs stack every expert)")
    graphs = comm.backend == "nccl" if use_graphs is None else use_graphs
    if graphs and comm.backend != "nccl" and comm.world > 1:
        raise ValueError("CUDA graphs with tensor parallelism need NCCL: a gloo collective copies through the CPU")
    local = dataclasses.replace(local_plan(plan, comm.rank), types=local_types(plan, comm.rank))
    model = CudaModel(local, {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in weights.items()},
                      use_graphs=graphs)
    model.comm = comm
    return model


def micro_batches(batch: StepBatch, n: int) -> list[StepBatch]:
    """The step's sequences in at most `n` contiguous groups of about equal token counts (none empty),
    each a StepBatch of its own (token offsets from 0). Their sampled rows, concatenated in order, are
    the step's (`sample_rows`), as are their tokens."""
    seqs = batch.seqs
    if not seqs:
        return [batch]
    n = max(1, min(n, len(seqs)))
    total = batch.num_tokens
    groups: list[list] = [[] for _ in range(n)]
    done, g = 0, 0
    for i, sq in enumerate(seqs):
        # move on once this group has its share, keeping one sequence for each group still to come
        if groups[g] and (done >= total * (g + 1) / n or len(seqs) - i <= n - 1 - g) and g < n - 1:
            g += 1
        groups[g].append(sq)
        done += sq.length
    out = []
    for grp in groups:
        lo, hi = grp[0].start, grp[-1].start + grp[-1].length
        out.append(StepBatch(batch.tokens[lo:hi], [dataclasses.replace(q, start=q.start - lo) for q in grp]))
    return out


class StageModel(ReferenceModel):
    """One pipeline stage's reference backend (a plan with `stages`): receives what earlier stages
    send it, runs its instructions, sends on what later stages read. `forward` returns the logits on
    rank 0 (the last stage's, received) and on the last stage's ranks; None elsewhere.

    A step runs as up to one micro-batch per stage (`micro_batches`: its sequences in contiguous
    groups), one after another on every stage, the sends non-blocking: while stage s + 1 computes
    micro-batch i, stage s computes micro-batch i + 1. Stage 0 receives the logits last."""

    def forward(self, batch: StepBatch, kv: KVStore, all_logits: bool = False) -> torch.Tensor | None:
        plan, comm = self.plan, self.comm
        st, last = plan.stages[comm.stage], len(plan.stages) - 1
        device = next((w.device for w in self.weights.values() if isinstance(w, torch.Tensor)), batch.tokens.device)
        if batch.tokens.device != device:
            batch = StepBatch(batch.tokens.to(device), batch.seqs)
        parts = micro_batches(batch, len(plan.stages))
        sending: list = []  # this rank's sends in flight (their tensors kept alive until they complete)
        outs = [self._stage(mb, kv, all_logits, sending) for mb in parts]
        if st.index == 0 and comm.tp_rank == 0:
            outs = [comm.recv(last) for _ in parts]
        comm.wait(sending)
        return torch.cat(outs) if outs[0] is not None else None

    def _stage(self, batch: StepBatch, kv: KVStore, all_logits: bool, sending: list) -> torch.Tensor | None:
        """This stage's instructions on one micro-batch: receive, run, send on (non-blocking)."""
        plan, comm = self.plan, self.comm
        st, last = plan.stages[comm.stage], len(plan.stages) - 1
        sends = [c for c in plan.collectives if c.kind == "send"]
        ctx = StepContext(batch, kv, self.weights)
        ctx.collectives = {c.value: c.kind for c in plan.collectives if c.kind != "send"}
        ctx.comm, ctx.remote, ctx.types, ctx.lora = comm, self.remote, plan.types, None
        env = {Value("tokens"): batch.tokens, Value("positions"): ctx.positions}
        for c in sends:
            if c.dst == st.index and c.src < st.index:
                env[c.value] = comm.recv(c.src)
        instrs = plan.program.instrs[st.start:st.stop]
        ctx.run(Program(plan.program.inputs, instrs, instrs[-1].out), env)
        for c in sends:
            if c.src == st.index and c.dst > st.index:
                sending += comm.isend(env[c.value], c.dst)
        if st.index != last:
            return None
        out = env[plan.program.output]
        out = (out if all_logits else out[batch.sample_rows()]).float()
        if st.index != 0 and comm.tp_rank == 0:
            sending += comm.isend(out, 0)
        return out


class ParallelModel:
    """Rank 0's backend: broadcasts each step, then runs rank 0's shard. Same interface as its
    backend's (ReferenceModel, CudaModel: the engine cannot tell)."""

    def __init__(self, model):
        self.inner = model
        self.backend = model.backend
        self.plan = model.plan
        self.weights = model.weights
        self.procs: list = []  # the worker processes spawn_workers started (none under torchrun / tests)
        self.rendezvous: str | None = None
        self.owns_group = False  # join_torchrun's: shutdown leaves the process group after "stop"

    def reserve(self, max_seqs: int, max_context: int) -> None:
        """The cuda backend sizes its scratch and graphs by it: every rank alike (the same graphs
        capture the same collectives)."""
        if self.backend == "cuda":
            if self.inner.comm.world > 1:
                self.inner.comm.broadcast(("reserve", max_seqs, max_context))
            self.inner.reserve(max_seqs, max_context)

    def forward(self, batch: StepBatch, kv: KVStore, all_logits: bool = False) -> torch.Tensor:
        try:
            if self.inner.comm.world > 1:  # (one rank: nobody to tell)
                self.inner.comm.broadcast(("step", batch.tokens.cpu(), batch.seqs, all_logits, kv.num_pages,
                                           kv.page_size))
            return self.inner.forward(batch, kv, all_logits)
        except RankLost as e:
            raise RankLost(f"{e}{self.lost()}") from None

    def lost(self) -> str:
        """The workers of spawn_workers that have exited, for a RankLost message ("" if none has)."""
        for p in self.procs:  # the peer that closed its connection is exiting, or has: wait a moment
            p.join(1.0)
        gone = [f"{p.name} (pid {p.pid}) {_exit_status(p.exitcode)}" for p in self.procs if p.exitcode is not None]
        return f" ({'; '.join(gone)})" if gone else ""

    def shutdown(self) -> None:
        """Tell the workers to exit (their loops return). With workers of spawn_workers: wait for them
        and leave the process group (a second call does nothing)."""
        if not dist.is_initialized():
            return
        lost = False
        try:
            self.inner.comm.broadcast(("stop",))
        except RankLost:
            if not self.procs:
                raise
            lost = True
        if self.owns_group:
            self.owns_group = False
            dist.destroy_process_group()
        if self.procs:
            for p in self.procs:
                p.join(5.0 if lost else self.inner.comm.timeout_s)
                if p.is_alive():  # stuck at a collective with a lost rank: it did not hear "stop"
                    p.terminate()
                    p.join(5.0)
            self.procs = []
            dist.destroy_process_group()
            if self.rendezvous:
                import shutil

                shutil.rmtree(self.rendezvous, ignore_errors=True)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _exit_status(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def worker_loop(model, dtype: torch.dtype | None = None, device: str | None = None) -> int:
    """Ranks 1..: run each step rank 0 broadcasts, with a KV cache of this rank's heads (in `dtype` on
    `device`; default: the model's, fp32 on the CPU for the reference backend); returns the number of
    steps run when rank 0 says stop. Raises RankLost if rank 0 (or a peer) dies."""
    cuda = getattr(model, "backend", "") == "cuda"
    dtype = dtype or (model.dtype if cuda else torch.float32)
    device = device or (str(model.device) if cuda else "cpu")
    kv, steps = None, 0
    while True:
        msg = model.comm.broadcast()
        if msg[0] == "stop":
            return steps
        if msg[0] == "reserve":
            model.reserve(*msg[1:])
            continue
        _, tokens, seqs, all_logits, pages, page_size = msg
        if kv is None or kv.num_pages != pages or kv.page_size != page_size:
            kv = KVStore(model.plan.sites, pages, page_size, dtype, device)
        model.forward(StepBatch(tokens.to(device), seqs), kv, all_logits)
        steps += 1


# -- processes started by Kiln: the parent is rank 0 -------------------------------------------


def check_gpus(ranks: int) -> None:
    """`--tp N` on the cuda backend: one GPU per rank, refused by name with fewer."""
    from kiln.dsl.errors import SpecError

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < ranks:
        raise SpecError(f"--tp {ranks} --backend cuda: one GPU per rank, and this machine has {gpus} CUDA GPU(s)",
                        None, f"use --tp {gpus} or fewer" if gpus else "run --tp on the CPU (--device cpu)")


def spawn_workers(checkpoint, spec, dtype: torch.dtype, ranks: int, experts: str = "tp",
                  timeout_s: float = DEFAULT_TIMEOUT_S, stages: int = 1, backend: str = "reference") -> ParallelModel:
    """Start ranks 1..ranks*stages-1 (`ranks` tensor-parallel ranks per pipeline stage) as processes of
    this machine (torch.multiprocessing, spawn start method;
    they meet at a file store in a fresh temporary folder), make this process rank 0 and return its
    backend. Each rank reads its own shard of `checkpoint` (`load_sharded`; a non-safetensors
    checkpoint is loaded whole and cut). The workers are daemonic and run `worker_loop` until rank 0's
    `shutdown()` (also run at exit); if rank 0 dies they notice within `timeout_s` and exit.
    backend "cuda": rank r runs the cuda backend on cuda:r (its weights and KV cache there), NCCL."""
    import atexit
    import tempfile

    import torch.multiprocessing as mp

    if dist.is_initialized():
        raise RuntimeError("spawn_workers: this process already belongs to a process group (one tensor-parallel "
                           "model per process)")
    # bad options fail before any process starts
    if backend == "cuda":
        check_gpus(ranks * stages)
    plan, ckpt = _sharded_plan(checkpoint, spec, ranks, experts, stages)
    world = ranks * stages
    rdv = tempfile.mkdtemp(prefix="kiln-tp-")
    init_method = f"file://{rdv}/store"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, ranks, init_method, str(checkpoint), str(spec), dtype, experts,
                                               timeout_s, stages, backend), daemon=True, name=f"kiln-tp-rank{r}")
             for r in range(1, world)]
    for p in procs:
        p.start()
    comm = _init_rank(0, world, init_method, timeout_s, ranks, backend)
    weights = _load_rank(plan, ckpt, 0, dtype, comm.device)
    model = ParallelModel(rank_model(plan, weights, comm, whole=False, backend=backend))
    model.procs, model.rendezvous = procs, rdv
    atexit.register(model.shutdown)
    return model


# -- processes started by torchrun: every process runs the same kiln command ----------------------


def under_torchrun() -> bool:
    """Whether torchrun (or a launcher like it) started this process: torch.distributed's env://
    variables are set. `kiln generate|serve ... --tp N --pp M` then joins that process group instead
    of starting its own ranks (multi-node: `torchrun --nnodes ... --rdzv-endpoint HOST:PORT`)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def join_torchrun(checkpoint, spec, dtype: torch.dtype, ranks: int, experts: str = "tp",
                  timeout_s: float = DEFAULT_TIMEOUT_S, stages: int = 1, backend: str = "reference") -> ParallelModel:
    """Under torchrun, where every process runs the same command: this process is rank RANK of
    WORLD_SIZE, which must be ranks x stages. Rank 0 returns its backend (it runs the command: the
    engine, the server); every other rank loads its shard, runs rank 0's steps and ends the process
    when rank 0 stops (status 0; 1 when a rank is lost). backend "cuda": the GPU is LOCAL_RANK's."""
    import atexit
    import sys

    from kiln.dsl.errors import SpecError

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    opt = f"--tp {ranks}" + (f" --pp {stages}" if stages > 1 else "")
    if world != ranks * stages:
        raise SpecError(f"{opt}: {ranks * stages} ranks, but torchrun started WORLD_SIZE={world} processes", None,
                        f"start {ranks * stages} processes in all (torchrun's nodes x processes per node), or change "
                        f"{opt}")
    local = int(os.environ.get("LOCAL_RANK", rank))
    if backend == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local >= gpus:
            raise SpecError(f"{opt} --backend cuda: local rank {local} needs GPU cuda:{local}, and this machine has "
                            f"{gpus}", None, "start at most one process per GPU on each node (torchrun's processes "
                            "per node)")
        comm = init(rank, world, "env://", "nccl", timeout_s, ranks, f"cuda:{local}")
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        comm = init(rank, world, "env://", timeout_s=timeout_s, tp=ranks)
    plan, ckpt = _sharded_plan(checkpoint, spec, ranks, experts, stages)
    model = rank_model(plan, _load_rank(plan, ckpt, rank, dtype, comm.device), comm, whole=False, backend=backend)
    if rank == 0:
        parallel = ParallelModel(model)
        parallel.owns_group = True
        atexit.register(parallel.shutdown)
        return parallel
    _serve_steps(model, dtype, stages)
    sys.exit(0)  # this rank's part of the command is done: rank 0 printed or served its results


def _sharded_plan(checkpoint, spec, ranks: int, experts: str, stages: int = 1):
    from kiln.dsl import load_spec, passes

    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    config_file = str(ckpt.path) if ckpt.format == "gguf" else str(ckpt.path) + "/config.json"
    return passes.build(load_spec(spec), ckpt.config, config_file, ranks=ranks, experts=experts,
                        stages=stages), ckpt


def _init_rank(rank: int, world: int, init_method: str, timeout_s: float, ranks: int, backend: str) -> Comm:
    """The process group of a rank of spawn_workers: gloo (reference backend), NCCL on cuda:rank (cuda)."""
    if backend == "cuda":
        return init(rank, world, init_method, "nccl", timeout_s, ranks, f"cuda:{rank}")
    return init(rank, world, init_method, timeout_s=timeout_s, tp=ranks)


def _load_rank(plan: Plan, ckpt, rank: int, dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    from .parallel_weights import load_sharded
    from .weights import load_weights

    if ckpt.format == "safetensors":
        return load_sharded(plan, ckpt, rank, dtype, device)[0]
    return local_weights(plan, load_weights(plan, ckpt, dtype, device), rank)  # GGUF: no slice reads


def _worker(rank: int, ranks: int, init_method: str, checkpoint: str, spec: str, dtype: torch.dtype,
            experts: str, timeout_s: float, stages: int = 1, backend: str = "reference") -> None:
    """Ranks 1..: load this rank's shard, then run rank 0's steps until it says stop (or is lost)."""
    import signal
    import sys

    # Ctrl-C reaches the terminal's whole process group: rank 0 stops the workers ("stop") as it exits
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    world = ranks * stages
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        comm = _init_rank(rank, world, init_method, timeout_s, ranks, backend)
        plan, ckpt = _sharded_plan(checkpoint, spec, ranks, experts, stages)
        model = rank_model(plan, _load_rank(plan, ckpt, rank, dtype, comm.device), comm, whole=False,
                           backend=backend)
    except RankLost as e:
        print(f"kiln: {'pipeline' if stages > 1 else 'tensor'}-parallel {e}; exiting", file=sys.stderr)
        os._exit(1)
    _serve_steps(model, dtype, stages)


def _serve_steps(model, dtype: torch.dtype, stages: int) -> None:
    """A rank other than 0: run rank 0's steps until it says stop, then leave the process group; a lost
    rank ends the process with status 1 and a message."""
    import sys

    try:
        with torch.no_grad():
            worker_loop(model, dtype, model.comm.device)
    except RankLost as e:
        print(f"kiln: {'pipeline' if stages > 1 else 'tensor'}-parallel {e}; exiting", file=sys.stderr)
        os._exit(1)
    dist.destroy_process_group()
