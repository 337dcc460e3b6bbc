"""The engine: in-flight batching over any backend.

Each `step()` asks the scheduler for a flattened batch, runs the model once, samples one
token for each sequence that produced logits, detokenises incrementally, applies stop
strings, and returns the outputs of the requests that changed. Requests join and leave
between steps; `n > 1` becomes n child sequences (seeds seed, seed+1, ...), as in vLLM.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import torch

from .checkpoint import context_length
from .kv_cache import BlockPool, describe_capacity, kv_bytes_per_page, pages_for_memory
from .kv_store import KVStore
from .model import LoadedModel
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampler import Sampler, SamplingRow, make_generator
from .sampling_params import SamplingParams
from .scheduler import Request, Scheduler
from .tokenizer import IncrementalDetokenizer, Tokenizer

# Defaults by device. On the CPU the KV cache holds max_num_seqs sequences of max_model_len
# tokens and nothing more: 8 x 2,048 tokens is 0.7 GiB for the default 135M model in fp32
# (4 GiB for an 8B model), which a 16 GB laptop can hold beside the weights.
DEFAULT_MAX_NUM_SEQS = {"cuda": 64, "cpu": 8}
DEFAULT_MAX_MODEL_LEN = {"cuda": 4096, "cpu": 2048}


@dataclass
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None  # default: from free GPU memory (CUDA) or max_num_seqs x max_model_len (CPU)
    kv_memory_fraction: float = 0.9  # of free GPU memory after weights
    max_num_seqs: int | None = None  # default: DEFAULT_MAX_NUM_SEQS of the device
    max_tokens_per_step: int = 2048
    max_model_len: int | None = None  # default: the model's context, at most DEFAULT_MAX_MODEL_LEN of the device
    chunked_prefill: bool = True
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        def positive(name: str, optional: bool) -> None:
            v = getattr(self, name)
            if (v is not None or not optional) and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1{' or None' if optional else ''}, got {v!r}")

        for name in ("page_size", "max_tokens_per_step"):
            positive(name, optional=False)
        for name in ("num_pages", "max_num_seqs", "max_model_len"):
            positive(name, optional=True)
        f = self.kv_memory_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {f!r}")


@dataclass(frozen=True)
class StepInfo:
    """What the last `step()` ran: benchmarks split their time by kind of step with it."""

    num_seqs: int = 0
    num_tokens: int = 0
    num_prefill_tokens: int = 0  # tokens of sequences with more than one new token

    @property
    def kind(self) -> str:
        return "idle" if not self.num_tokens else "mixed" if self.num_prefill_tokens else "decode"


@dataclass
class _Track:
    """Per child sequence: its sampling state and the text produced so far."""

    parent: str
    index: int
    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    text: str = ""
    delta: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    done: CompletionOutput | None = None


@dataclass
class _Group:
    prompt: str | None
    prompt_ids: list[int]
    children: list[str] = field(default_factory=list)
    error: str | None = None


class LLMEngine:
    def __init__(self, loaded: LoadedModel, tokenizer: Tokenizer | None, config: EngineConfig | None = None,
                 *, context_len: int | None = None):
        """`context_len`: the model's context length (default: what its checkpoint's config states);
        max_model_len may not exceed it."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = tokenizer
        self.config = config = replace(config or EngineConfig())  # a copy: the defaults get filled in
        if context_len is None and loaded.checkpoint is not None:
            context_len = context_length(loaded.checkpoint.config)
        kind = "cuda" if loaded.device.type == "cuda" else "cpu"
        if config.max_num_seqs is None:
            config.max_num_seqs = DEFAULT_MAX_NUM_SEQS[kind]
        if config.max_model_len is None:
            config.max_model_len = min(context_len or DEFAULT_MAX_MODEL_LEN[kind], DEFAULT_MAX_MODEL_LEN[kind])
        elif context_len is not None and config.max_model_len > context_len:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context length "
                             f"({context_len})")
        self.model.reserve(config.max_num_seqs, config.max_model_len)  # the backend sizes its per-step state
        sites = [(s.kv_heads, s.head_dim, s.v_head_dim) for s in loaded.plan.sites]
        per_page = kv_bytes_per_page(config.page_size, sites, loaded.dtype.itemsize)
        num_pages, free = config.num_pages, None
        if num_pages is None:
            if loaded.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(loaded.device)
                num_pages = pages_for_memory(free, config.kv_memory_fraction, per_page)
            else:
                num_pages = -(-config.max_num_seqs * config.max_model_len // config.page_size)
        if free is not None:
            self.capacity = describe_capacity(num_pages, config.page_size, per_page, config.kv_memory_fraction, free)
        else:
            self.capacity = (f"KV cache: {num_pages:,} pages x {config.page_size} tokens = "
                             f"{num_pages * config.page_size:,} tokens, {num_pages * per_page / 2**30:.2f} GiB "
                             f"({loaded.device.type} memory)")
        self.kv = KVStore(loaded.plan.sites, num_pages, config.page_size, loaded.dtype, loaded.device)
        self.pool = BlockPool(num_pages, config.page_size)
        eos = tokenizer.eos_token_ids if tokenizer is not None else ()
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_tokens_per_step,
                                   config.chunked_prefill, config.policy, eos_token_ids=eos)
        self.sampler = Sampler()
        self._tracks: dict[str, _Track] = {}
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count()
        self.last_step = StepInfo()

    # -- requests -------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, prompt_text: str | None = None) -> str:
        """`prompt_text`: the text token-id prompts came from (a rendered chat template), reported
        as RequestOutput.prompt; by default their decoding."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            text = prompt_text
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.loaded.plan.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        group = _Group(text, ids)
        self._groups[request_id] = group
        for i in range(params.n):
            child_params = params if params.n == 1 else replace(
                params, n=1, seed=None if params.seed is None else params.seed + i)
            child = request_id if params.n == 1 else f"{request_id}#{i}"
            detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
            self._tracks[child] = _Track(request_id, i, make_generator(child_params, self.loaded.device), detok,
                                         logprobs=[] if params.logprobs is not None else None)
            group.children.append(child)
            self.scheduler.add(Request(child, list(ids), child_params, priority))
        return request_id

    def abort(self, request_id: str) -> bool:
        group = self._groups.get(request_id)
        if group is None:
            return False
        for child in group.children:
            self.scheduler.cancel(child)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    # -- one step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        step = self.scheduler.schedule()
        seqs = step.batch.seqs
        self.last_step = StepInfo(len(seqs), step.batch.num_tokens, sum(s.length for s in seqs if s.length > 1))
        changed: set[str] = set()
        if step.batch.num_tokens:
            with torch.no_grad():  # tokens stay on the host: each backend moves what it needs
                logits = self.model.forward(step.batch, self.kv)
            rows = step.sampled_requests
            out = self.sampler.sample(logits, [
                SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, self._tracks[r.request_id].generator)
                for r in rows])
            tokens = out.tokens.tolist()
            row_of = {r.request_id: i for i, r in enumerate(rows)}
            for req in self.scheduler.update(step, tokens):
                self._on_token(req, row_of[req.request_id], out)
                changed.add(self._tracks[req.request_id].parent)
        for req in self.scheduler.take_finished():
            self._on_finish(req)
            changed.add(self._tracks[req.request_id].parent)
        return [self._output(pid) for pid in list(self._groups) if pid in changed]  # arrival order

    def _on_token(self, req: Request, row: int, out) -> None:
        track = self._tracks[req.request_id]
        token = req.output_token_ids[-1]
        if track.logprobs is not None and out.topk_logprobs is not None:
            k = req.params.logprobs
            entry = {int(t): Logprob(lp, rank, self._token_text(t)) for rank, (t, lp) in enumerate(
                zip(out.topk_token_ids[row, :k].tolist(), out.topk_logprobs[row, :k].tolist()), start=1)}
            sampled = float(out.sampled_logprobs[row])
            entry[token] = Logprob(sampled, int(out.sampled_ranks[row]), self._token_text(token))
            track.logprobs.append(entry)
            track.cumulative_logprob = (track.cumulative_logprob or 0.0) + sampled
        if track.detok is None or (req.finished and req.finish_reason == "stop"):
            return  # an eos or stop token ended it: its text is not part of the output
        delta = track.detok.feed(token)
        text = track.text + delta
        for s in req.params.stop:
            cut = text.find(s, max(0, len(track.text) - len(s)))
            if cut >= 0:
                track.delta += text[:cut][len(track.text):]
                track.text = text[:cut]
                self.scheduler.finish(req.request_id, "stop", stop_reason=s)
                return
        track.text, track.delta = text, track.delta + delta

    def _on_finish(self, req: Request) -> None:
        track = self._tracks[req.request_id]
        if req.finish_reason == "length" and track.detok is not None:
            tail = track.detok.flush()
            track.text += tail
            track.delta += tail
        if req.finish_reason == "error":
            self._groups[track.parent].error = req.error
        track.done = CompletionOutput(track.index, track.text, list(req.output_token_ids), req.finish_reason,
                                      req.stop_reason, track.logprobs, cumulative_logprob=track.cumulative_logprob)

    def _output(self, parent: str) -> RequestOutput:
        group = self._groups[parent]
        outs = []
        finished = True
        for child in group.children:
            track = self._tracks[child]
            # While running: the live list (it grows; copy it to keep a snapshot).
            req_tokens = track.done.token_ids if track.done else self._live_tokens(child)
            outs.append(CompletionOutput(track.index, track.text, req_tokens,
                                         track.done.finish_reason if track.done else None,
                                         track.done.stop_reason if track.done else None,
                                         track.logprobs, track.delta, track.cumulative_logprob))
            track.delta = ""
            finished = finished and track.done is not None
        result = RequestOutput(parent, group.prompt, group.prompt_ids, outs, finished, group.error)
        if finished:
            for child in group.children:
                del self._tracks[child]
            del self._groups[parent]
        return result

    def _token_text(self, token: int) -> str | None:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer is not None else None

    def _live_tokens(self, child: str) -> list[int]:
        req = self.scheduler.get(child)
        return req.output_token_ids if req is not None else []
