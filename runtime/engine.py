"""The engine: in-flight batching over any backend.

Each `step()` asks the scheduler for a flattened batch, runs the model once, samples one
token for each sequence that produced logits, detokenises incrementally, applies stop
strings, and returns the outputs of the requests that changed. Requests join and leave
between steps; `n > 1` becomes n child sequences (seeds seed, seed+1, ...), as in vLLM.

Overlap (EngineConfig.overlap; vLLM's "async scheduling", SGLang's "overlap scheduler"): a
`step()` launches the step after the one it reads back before reading it, so the GPU runs step
N + 1 while the host waits for, records and detokenises step N's tokens, and is never idle
between steps. The rows continuing from N take their input on the device from N's sampled tokens
(StepBatch.pending; Scheduler.schedule_ahead has the accounting). Each call still returns the
outputs of exactly one step, N's, as without overlap; the step it launched stays in flight until
the next call. Only when no running request needs its new token on the host to build its next
step (guided decoding's mask, penalties' counts, speculative drafts) and no preemption or page
shortage is in the way; otherwise the call reads N back first and schedules as before. A prompt
longer than the token budget is no obstacle: its next chunk's tokens are on the host. A request
that finishes at N (eos, stop token or string, abort) has one extra row in N + 1: it is never
recorded, and its pages are freed as usual (stream order: a later owner of a page only writes it
in a later launch).
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field, replace

import torch

from .checkpoint import context_length
from .kv_cache import BlockPool, describe_capacity, kv_bytes_per_page, pages_for_memory
from .kv_store import KVStore, page_sites
from .lora import LoraSet
from .model import LoadedModel
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampler import SampleOutput, Sampler, SamplingRow, make_generator
from .sampling_params import SamplingParams
from .scheduler import Request, RequestState, Scheduler
from .speculative import DEFAULT_NUM_SPECULATIVE_TOKENS, METHODS, DraftProposer, SpecStats, ngram_propose, verify
from .state_cache import StatePool, StateSnapshots, StateStore, state_bytes_per_slot
from .tokenizer import IncrementalDetokenizer, Tokenizer

# Defaults by device. On the CPU the KV cache holds max_num_seqs sequences of max_model_len
# tokens and nothing more: 8 x 2,048 tokens is 0.7 GiB for the default 135M model in fp32
# (4 GiB for an 8B model), which a 16 GB laptop can hold beside the weights.
DEFAULT_MAX_NUM_SEQS = {"cuda": 64, "cpu": 8}
DEFAULT_MAX_MODEL_LEN = {"cuda": 4096, "cpu": 2048}
# EngineConfig.overlap=None: on for the cuda backend (where the GPU runs while the host works),
# unless KILN_OVERLAP=0 (a benchmark's off switch: `KILN_OVERLAP=0 kiln bench throughput ...`).
OVERLAP_ENV = "KILN_OVERLAP"
# KILN_OVERLAP_CHUNKS=0: no step is launched ahead after a prompt chunk with more to go (as before session 21);
# a benchmark's same-run baseline for Scheduler.schedule_ahead's chunk continuation. Read when an engine is made.
OVERLAP_CHUNKS_ENV = "KILN_OVERLAP_CHUNKS"


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
    # Speculative decoding (runtime/speculative.py): None, "ngram" (prompt lookup) or "draft" (a
    # draft model given to LLMEngine); up to num_speculative_tokens drafts per sequence and step.
    speculative: str | None = None
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS
    enable_prefix_caching: bool = True  # reuse the K/V of full pages of a prompt prefix seen before
    # Models with recurrent state (state-space layers): how many states at prompt page boundaries are kept for
    # prefix reuse (runtime/state_cache.py StateSnapshots), each the size of a sequence's state, from the same
    # memory as the live ones. None: max_num_seqs (on a GPU, fewer where live and kept states would take over half
    # the free memory); 0: none, and no prefix reuse for such a model.
    state_snapshots: int | None = None
    # Launch each step before reading the previous one back (module docstring); None: on for the cuda
    # backend unless KILN_OVERLAP=0, off otherwise. Off with speculative decoding or a backend that
    # cannot take device-side input tokens (tensor parallel, TensorRT).
    overlap: bool | None = None

    def __post_init__(self) -> None:
        def positive(name: str, optional: bool) -> None:
            v = getattr(self, name)
            if (v is not None or not optional) and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1{' or None' if optional else ''}, got {v!r}")

        if self.speculative not in (None, *METHODS):
            raise ValueError(f"speculative must be None or one of {', '.join(METHODS)}, got {self.speculative!r}")
        for name in ("page_size", "max_tokens_per_step", "num_speculative_tokens"):
            positive(name, optional=False)
        for name in ("num_pages", "max_num_seqs", "max_model_len"):
            positive(name, optional=True)
        f = self.kv_memory_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {f!r}")
        v = self.state_snapshots
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"state_snapshots must be an integer >= 0 or None, got {v!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}")
        if self.overlap is not None and not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be True, False or None, got {self.overlap!r}")


def cache_namespace(loaded: LoadedModel) -> str:
    """What a KV page's contents depend on besides its tokens: the weights (a checkpoint's path,
    or for weights made in this process, their identity), the spec and its parameters, the run
    dtype, the weights' quantization and the KV cache's storage. Prefix cache hits only happen
    within one namespace, so nothing is shared across models, quantizations or KV dtypes."""
    plan = loaded.plan
    weights = (f"checkpoint:{loaded.checkpoint.path.resolve()}" if loaded.checkpoint is not None
               else f"in-process:{id(loaded.model)}")
    quant = sorted({f"{w.quant.dtype}" for w in plan.weights.values() if w.quant.quantized})
    kv = [s.kv_dtype for s in plan.sites]
    params = sorted((k, repr(v)) for k, v in plan.params.items())
    return repr((weights, plan.spec.name, params, str(loaded.dtype), quant, kv))


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
class _Launched:
    """A step launched and not yet read back (overlap)."""

    step: object  # scheduler.ScheduledStep
    rows: list[Request]  # its sampled requests, in row order
    out: SampleOutput  # on the host once `ready` has completed (CPU: at once)
    device_tokens: torch.Tensor  # the sampled tokens where they were sampled: the next step's inputs
    ready: torch.cuda.Event | None  # the copies to the host are done


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
    matcher: object | None = None  # guided decoding: the llguidance matcher of this sequence
    speculate: bool = True  # speculative decoding for this sequence (when the engine has it on)


@dataclass
class _Group:
    prompt: str | None
    prompt_ids: list[int]
    children: list[str] = field(default_factory=list)
    error: str | None = None


class LLMEngine:
    def __init__(self, loaded: LoadedModel, tokenizer: Tokenizer | None, config: EngineConfig | None = None,
                 *, context_len: int | None = None, draft: LoadedModel | None = None):
        """`context_len`: the model's context length (default: what its checkpoint's config states);
        max_model_len may not exceed it. `draft`: the draft model of speculative="draft" (sharing
        the target's tokenizer), run on its own KV cache."""
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
        if (config.speculative == "draft") != (draft is not None):
            raise ValueError("speculative='draft' needs a draft model (--draft CHECKPOINT)" if draft is None else
                             f"a draft model was given but speculative is {config.speculative!r}, not 'draft'")
        for m in (loaded, draft) if draft is not None else (loaded,):
            repage = getattr(m.model, "set_page_size", None)  # the cuda backend's kernels are built per page size
            if repage is not None:
                repage(config.page_size)
        self.model.reserve(config.max_num_seqs, config.max_model_len)  # the backend sizes its per-step state
        # State-space layers keep a fixed-size recurrent state per sequence (runtime/state_cache.py): a
        # slot per seat, taken from the memory budget before the pages. Their state cannot be rewound: a
        # prefix is reused only where the state after it was kept (config.state_snapshots, from the same
        # budget), and there is no speculation.
        state_sites = loaded.plan.state_sites
        per_slot = state_bytes_per_slot(state_sites, loaded.dtype)
        snapshots = 0
        if state_sites and config.enable_prefix_caching:
            snapshots = config.max_num_seqs if config.state_snapshots is None else config.state_snapshots
            if config.state_snapshots is None and loaded.device.type == "cuda":
                # the default gives way where live and kept states would take over half the free memory (a
                # 2.7B Mamba-2's state is 168 MiB: 256 seats hold 42 GiB before any is kept)
                half = torch.cuda.mem_get_info(loaded.device)[0] // 2
                snapshots = max(0, min(snapshots, half // per_slot - config.max_num_seqs))
        state_bytes = (config.max_num_seqs + snapshots) * per_slot
        if state_sites and config.speculative is not None:
            raise ValueError(f"speculative decoding ({config.speculative}) is not supported for a model with "
                             f"recurrent state (state-space layers): rejected drafts would advance its state")
        # (a site with no KV heads: one another pipeline stage holds, runtime/parallel_weights.py local_plan)
        sites = page_sites(loaded.plan.sites, loaded.dtype)
        per_page = kv_bytes_per_page(config.page_size, sites) if sites else 0
        draft_per_page = 0
        if draft is not None:  # its KV cache takes its share of the memory: as many pages as the target's
            draft.model.reserve(config.max_num_seqs, config.max_model_len + config.num_speculative_tokens)
            draft_per_page = kv_bytes_per_page(config.page_size, page_sites(draft.plan.sites, draft.dtype))
        num_pages, free = config.num_pages, None
        if num_pages is None:
            if loaded.device.type == "cuda" and per_page + draft_per_page:
                free, _ = torch.cuda.mem_get_info(loaded.device)
                num_pages = pages_for_memory(max(0, free - int(state_bytes / config.kv_memory_fraction)),
                                             config.kv_memory_fraction, per_page + draft_per_page)
            else:
                num_pages = -(-config.max_num_seqs * config.max_model_len // config.page_size)
        if free is not None:
            self.capacity = describe_capacity(num_pages, config.page_size, per_page, config.kv_memory_fraction, free)
        else:
            self.capacity = (f"KV cache: {num_pages:,} pages x {config.page_size} tokens = "
                             f"{num_pages * config.page_size:,} tokens, {num_pages * per_page / 2**30:.2f} GiB "
                             f"({loaded.device.type} memory)")
        if state_sites:
            self.capacity += (f"; recurrent state: {config.max_num_seqs} slots + {snapshots} kept for prefix reuse, "
                              f"{state_bytes / 2**30:.2f} GiB")
        self.kv = KVStore(loaded.plan.sites, num_pages, config.page_size, loaded.dtype, loaded.device,
                          state=StateStore(config.max_num_seqs, state_sites, loaded.dtype, loaded.device,
                                           num_snapshots=snapshots) if state_sites else None)
        self.pool = BlockPool(num_pages, config.page_size)
        eos = tokenizer.eos_token_ids if tokenizer is not None else ()
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_tokens_per_step,
                                   config.chunked_prefill, config.policy, eos_token_ids=eos,
                                   prefix_caching=config.enable_prefix_caching and (not state_sites or snapshots > 0),
                                   namespace=cache_namespace(loaded),
                                   states=StatePool(config.max_num_seqs) if state_sites else None,
                                   snapshots=StateSnapshots(snapshots) if snapshots else None)
        self.sampler = Sampler()
        self._tracks: dict[str, _Track] = {}
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count()
        self.last_step = StepInfo()
        # LoRA adapters (runtime/lora.py): the backend applies the set; each request names one.
        self.lora = LoraSet(loaded.plan, loaded.device, loaded.dtype)
        self.model.lora = self.lora
        self._guided = None  # runtime.guided.GuidedDecoder, made by the first guided request
        self._guided_lock = threading.Lock()
        self.spec_stats = SpecStats()
        overlap = config.overlap
        if overlap is None:
            overlap = loaded.model.backend == "cuda" and os.environ.get(OVERLAP_ENV, "1") != "0"
        self.overlap = bool(overlap and config.speculative is None and getattr(loaded.model, "takes_pending", False))
        self._launched: _Launched | None = None  # overlap: the step in flight between calls
        self._ahead_chunks = os.environ.get(OVERLAP_CHUNKS_ENV, "1") != "0"
        self.num_overlapped = 0  # steps launched before the previous one was read back
        self.num_dropped_rows = 0  # their rows of requests that finished first (never recorded)
        self._drafter = None
        if draft is not None:
            # Room for every target page plus each sequence's lookahead.
            extra = config.max_num_seqs * (self.pool.pages_needed(config.num_speculative_tokens) + 1)
            self._drafter = DraftProposer(draft, num_pages + extra, config.page_size, loaded.plan.vocab_size)

    # -- requests -------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, prompt_text: str | None = None,
                    speculate: bool = True) -> str:
        """`prompt_text`: the text token-id prompts came from (a rendered chat template), reported
        as RequestOutput.prompt; by default their decoding. `speculate=False`: this request decodes
        one token per step even when the engine speculates (guided requests always do)."""
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
        matchers = [self._matcher(params) for _ in range(params.n)]  # a bad grammar fails before any state
        adapter, salt = self._adapter(params)
        group = _Group(text, ids)
        self._groups[request_id] = group
        for i in range(params.n):
            child_params = params if params.n == 1 else replace(
                params, n=1, seed=None if params.seed is None else params.seed + i)
            child = request_id if params.n == 1 else f"{request_id}#{i}"
            detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
            self._tracks[child] = _Track(request_id, i, make_generator(child_params, self.loaded.device), detok,
                                         logprobs=[] if params.logprobs is not None else None,
                                         matcher=matchers[i], speculate=speculate)
            group.children.append(child)
            self.scheduler.add(Request(child, list(ids), child_params, priority, adapter=adapter, cache_salt=salt))
        return request_id

    def _adapter(self, params: SamplingParams) -> tuple[int, str]:
        """(slot, prefix-cache salt) of the request's LoRA adapter: KV pages computed with one adapter
        are never reused by another, nor by a later adapter loaded under the same name."""
        if params.lora is None:
            return -1, ""
        slot = self.lora.slot(params.lora)  # UnknownLora (a ValueError) naming it
        return slot, f"lora:{params.lora}:{self.lora.adapters[params.lora].uid}"

    def load_lora(self, name: str, path) -> None:
        """Load a PEFT adapter as `name` (runtime/lora.py LoraError when it does not fit)."""
        self.lora.load(name, path)

    def unload_lora(self, name: str) -> None:
        """Unload an adapter; refused (ValueError) while a request runs with it."""
        slot = self.lora.slot(name)
        users = [r for r in list(self._tracks) if (req := self.scheduler.get(r)) is not None and req.adapter == slot]
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {len(users)} request(s); unload it when they finish")
        self.lora.unload(name)

    def capture_graphs(self, prompt_len: int | None = None) -> int:
        """Capture now the CUDA graphs this engine's steps replay, as vLLM does at start-up, so that no request
        waits for one: the decode graph of every batch bucket up to max_num_seqs and the large mixed graphs of a
        full token budget (the backend's capture_decode_graphs), of `prompt_len`-token prompts where given (as
        many as a full step holds; else of one or two). Returns how many were captured: 0 for a backend without
        graphs. (A LoRA adapter loaded later drops them; they are captured again on first use.)"""
        capture = getattr(self.model, "capture_decode_graphs", None)
        if capture is None:
            return 0
        made = capture(self.kv, self.config.max_num_seqs, self.config.max_tokens_per_step, prompt_len)
        if self.loaded.device.type == "cuda":
            torch.cuda.synchronize(self.loaded.device)
        return made

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
        if self.overlap:
            return self._step_overlap()
        proposals, qs = self._propose()
        step = self.scheduler.schedule(proposals)
        seqs = step.batch.seqs
        self.last_step = StepInfo(len(seqs), step.batch.num_tokens, sum(s.length for s in seqs if s.length > 1))
        changed: set[str] = set()
        if step.batch.num_tokens:
            rows = step.sampled_requests
            if step.drafts:  # a step that verifies drafts: one row per token that has logits
                rows = [r for r in rows for _ in range(1 + len(step.drafts.get(r.request_id, ())))]
            # Guided rows' masks are computed on a worker thread while the model runs.
            masks = self._start_masks(rows)
            with torch.no_grad():  # tokens stay on the host: each backend moves what it needs
                logits = self._forward(step)
            if step.drafts:
                changed.update(self._verify(step, logits, masks, qs))
            else:
                out = self.sampler.sample(logits, [
                    SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, self._tracks[r.request_id].generator)
                    for r in rows], masks.result())
                tokens = out.tokens.tolist()
                row_of = {r.request_id: i for i, r in enumerate(rows)}
                for req in self.scheduler.update(step, tokens):
                    self._on_token(req, row_of[req.request_id], out)
                    changed.add(self._tracks[req.request_id].parent)
        for req in self.scheduler.take_finished():
            self._on_finish(req)
            changed.add(self._tracks[req.request_id].parent)
        return [self._output(pid) for pid in list(self._groups) if pid in changed]  # arrival order

    def _step_overlap(self) -> list[RequestOutput]:
        """One call with overlap: make sure a step is in flight (schedule it now if none is), launch
        the one after it when that needs nothing from the host, then read the first back."""
        launched, self._launched = self._launched, None
        if launched is not None and not any(r.state is RequestState.RUNNING for r in launched.step.requests):
            self._read(launched)  # every row of it finished meanwhile: nothing to record
            self.num_dropped_rows += len(launched.rows)
            launched = None
        changed: set[str] = set()
        if launched is None:
            step = self.scheduler.schedule()
            if step.batch.num_tokens:
                launched = self._launch(step)
        if launched is not None:
            ahead = self.scheduler.schedule_ahead(launched.step, launched.device_tokens, self._fast,
                                                  chunks=self._ahead_chunks)
            if ahead is not None and ahead.batch.num_tokens:
                self._launched = self._launch(ahead)
                self.num_overlapped += 1
            # The GPU now runs the step after while the host waits for this one's tokens.
            changed = self._record(launched)
        else:
            self.last_step = StepInfo()
        for req in self.scheduler.take_finished():
            self._on_finish(req)
            changed.add(self._tracks[req.request_id].parent)
        return [self._output(pid) for pid in list(self._groups) if pid in changed]  # arrival order

    def _forward(self, step) -> torch.Tensor:
        """The step's logits, with the recurrent state it continues from restored first and the states it
        leaves at kept boundaries saved after it (Scheduler: prefix reuse with state), in stream order."""
        if step.restore:
            self.kv.state.restore(step.restore)
        logits = self.model.forward(step.batch, self.kv)
        if step.save:
            self.kv.state.save(step.save)
        return logits

    def _fast(self, req: Request) -> bool:
        """Whether req's next step can be built without its newest token on the host."""
        p = req.params
        return (self._tracks[req.request_id].matcher is None and p.repetition_penalty == 1.0
                and not p.presence_penalty and not p.frequency_penalty)

    def _launch(self, step) -> _Launched:
        """Run `step` and sample it, reading nothing back: the tokens (and logprobs) are copied to
        pinned host memory behind the sampling kernels, in stream order."""
        rows = step.sampled_requests
        masks = self._start_masks(rows)  # guided rows (never in an optimistic step: `_fast`)
        with torch.no_grad():
            logits = self._forward(step)
            out = self.sampler.sample(logits, [
                SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, self._tracks[r.request_id].generator)
                for r in rows], masks.result())
        device_tokens, ready = out.tokens, None
        if out.tokens.device.type == "cuda":
            def host(t):
                return None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
                    t, non_blocking=True)

            out = SampleOutput(*(host(t) for t in (out.tokens, out.topk_logprobs, out.topk_token_ids,
                                                  out.sampled_logprobs, out.sampled_ranks)))
            ready = torch.cuda.Event()
            ready.record()
        return _Launched(step, rows, out, device_tokens, ready)

    def _read(self, launched: _Launched) -> list[int]:
        if launched.ready is not None:
            launched.ready.synchronize()  # waits for this step only, not for the one launched after it
        return launched.out.tokens.tolist()

    def _record(self, launched: _Launched) -> set[str]:
        """Read a launched step back and record its tokens; the parents of the requests that changed.
        Rows of requests finished since it was scheduled are dropped by `Scheduler.update`."""
        step = launched.step
        seqs = step.batch.seqs
        self.last_step = StepInfo(len(seqs), step.batch.num_tokens, sum(s.length for s in seqs if s.length > 1))
        tokens = self._read(launched)
        row_of = {id(r): i for i, r in enumerate(launched.rows)}
        changed = set()
        got = self.scheduler.update(step, tokens)
        self.num_dropped_rows += len(launched.rows) - len(got)
        for req in got:
            self._on_token(req, row_of[id(req)], launched.out)
            changed.add(self._tracks[req.request_id].parent)
        return changed

    def guided_decoder(self):
        """The GuidedDecoder (runtime.guided), made on first use; thread-safe, so that a server can
        compile a request's grammar (cached) before it queues the request."""
        with self._guided_lock:
            if self._guided is None:
                if self.tokenizer is None:
                    raise ValueError("guided decoding needs a tokenizer")
                from .guided import GuidedDecoder

                self._guided = GuidedDecoder(self.tokenizer, self.loaded.plan.vocab_size, self.loaded.device)
            return self._guided

    def _matcher(self, params: SamplingParams):
        return None if params.guided is None else self.guided_decoder().matcher(params.guided)

    def _start_masks(self, rows: list[Request]):
        from .guided import PendingMask

        if self._guided is None:
            return PendingMask(None, self.loaded.device)
        return self._guided.start_masks([(i, m) for i, r in enumerate(rows)
                                         if (m := self._tracks[r.request_id].matcher) is not None])

    # -- speculative decoding ------------------------------------------------------------------
    def _propose(self) -> tuple[dict[str, list[int]], dict[str, torch.Tensor | None]]:
        """Draft tokens for the running requests that decode next step (and, from a draft model,
        the distributions of sampled requests' drafts)."""
        cfg = self.config
        if cfg.speculative is None:
            return {}, {}
        want = []
        for r in self.scheduler.running:
            track = self._tracks[r.request_id]
            if r.num_tokens - r.num_computed != 1 or not track.speculate or track.matcher is not None:
                continue
            # No draft past max_tokens: the last token of a request is never a draft, so its cache
            # positions stay within prompt + max_tokens - 1, what the scheduler admitted it for.
            k = min(cfg.num_speculative_tokens, r.params.max_tokens - len(r.output_token_ids) - 1)
            if k >= 1:
                want.append((r, k))
        if cfg.speculative == "ngram":
            drafts = {r.request_id: d for r, k in want if (d := ngram_propose(r.all_token_ids, k))}
            return drafts, {}
        made = self._drafter.propose(
            [(r.request_id, r.all_token_ids, k, SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids,
                                                            self._tracks[r.request_id].generator))
             for r, k in want], keep={r.request_id for r in self.scheduler.running})
        return {rid: d for rid, (d, _) in made.items() if d}, {rid: q for rid, (_, q) in made.items()}

    def _verify(self, step, logits: torch.Tensor, masks, qs) -> set[str]:
        """Sample / verify every sampled slice of a step that carries drafts (a slice without drafts
        is sampled as usual: zero drafts, one row); record the tokens; returns the parents of the
        requests that changed."""
        reqs = step.sampled_requests
        drafts = [step.drafts.get(r.request_id, []) for r in reqs]
        sampling = []
        for r, d in zip(reqs, drafts):  # row j of a request sees its drafts before j as output
            gen = self._tracks[r.request_id].generator
            sampling += [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids + d[:j], gen)
                         for j in range(len(d) + 1)]
        processed = self.sampler.process(logits, sampling, masks.result())
        v = verify(processed, drafts, [qs.get(r.request_id) if d else None for r, d in zip(reqs, drafts)],
                   [r.params.greedy for r in reqs], [self._tracks[r.request_id].generator for r in reqs])
        stats = self.spec_stats
        stats.target_steps += 1
        for d, toks in zip(drafts, v.tokens):
            if d:
                stats.verifications += 1
                stats.drafted += len(d)
                stats.accepted += len(toks) - 1
                stats.emitted += len(toks)
        out = self._row_logprobs(processed, reqs, v)
        before = {r.request_id: len(r.output_token_ids) for r in reqs}
        first_row = {r.request_id: row for r, row in zip(reqs, v.rows)}
        changed = set()
        for req in self.scheduler.update(step, v.tokens):
            base = before[req.request_id]
            new = req.output_token_ids[base:]
            for i, token in enumerate(new):
                if self._on_token(req, first_row[req.request_id] + i, out, token, final=i == len(new) - 1):
                    del req.output_token_ids[base + i + 1:]  # a stop string ended it at this token
                    break
            changed.add(self._tracks[req.request_id].parent)
        return changed

    def _row_logprobs(self, processed: torch.Tensor, reqs: list[Request], v):
        """Logprobs of every row's emitted token (rows past a request's last token: its argmax)."""
        asked = [r.params.logprobs for r in reqs if r.params.logprobs is not None]
        if not asked:
            return SampleOutput(tokens=processed.argmax(dim=-1))
        tokens = processed.argmax(dim=-1).cpu()
        for start, toks in zip(v.rows, v.tokens):
            tokens[start:start + len(toks)] = torch.tensor(toks)
        tokens = tokens.to(processed.device)
        logprobs = processed.log_softmax(dim=-1)
        top = logprobs.topk(min(max(asked), processed.shape[1]), dim=-1)
        sampled = logprobs.gather(1, tokens[:, None])
        return SampleOutput(tokens, top.values, top.indices, sampled[:, 0], (logprobs > sampled).sum(dim=-1) + 1)

    def _on_token(self, req: Request, row: int, out, token: int | None = None, final: bool = True) -> bool:
        """Record one new token of req (default: its last); `final`: the last of this step's.
        True when a stop string (or the grammar) ended the request at this token."""
        track = self._tracks[req.request_id]
        token = req.output_token_ids[-1] if token is None else token
        guided_end = None if track.matcher is None else self._guided.advance(track.matcher, token)
        if track.logprobs is not None and out.topk_logprobs is not None:
            k = req.params.logprobs
            entry = {int(t): Logprob(lp, rank, self._token_text(t)) for rank, (t, lp) in enumerate(
                zip(out.topk_token_ids[row, :k].tolist(), out.topk_logprobs[row, :k].tolist()), start=1)}
            sampled = float(out.sampled_logprobs[row])
            entry[token] = Logprob(sampled, int(out.sampled_ranks[row]), self._token_text(token))
            track.logprobs.append(entry)
            track.cumulative_logprob = (track.cumulative_logprob or 0.0) + sampled
        if track.detok is None or (final and req.finished and req.finish_reason == "stop"):
            return False  # an eos or stop token ended it: its text is not part of the output
        delta = track.detok.feed(token)
        text = track.text + delta
        for s in req.params.stop:
            cut = text.find(s, max(0, len(track.text) - len(s)))
            if cut >= 0:
                track.delta += text[:cut][len(track.text):]
                track.text = text[:cut]
                if req.finished:  # the scheduler ended it at this token too (max_tokens): the stop string wins
                    req.finish_reason, req.stop_reason = "stop", s
                else:
                    self.scheduler.finish(req.request_id, "stop", stop_reason=s)
                return True
        track.text, track.delta = text, track.delta + delta
        if guided_end is not None and not req.finished:  # the grammar is complete (or broken)
            self.scheduler.finish(req.request_id, "stop" if guided_end == "complete" else "error")
            if guided_end != "complete":
                req.error = guided_end
            return True
        return False

    def _on_finish(self, req: Request) -> None:
        track = self._tracks[req.request_id]
        if self._drafter is not None:
            self._drafter.release(req.request_id)
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
