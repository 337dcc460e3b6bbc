"""`kiln eval perplexity`: a model's perplexity over a text and, with `--kl-divergence`, the KL
divergence of each position's next-token distribution from the unquantized model's — what
llama.cpp's perplexity tool reports (`--kl-divergence`), so a quantization scheme is judged
by how far it moves the model, not only by one averaged number.

Texts. Evaluation and calibration (`kiln quantize`) must never share text: a scheme calibrated
on the text it is then scored on looks better than it is. So they come from different corpora
that every machine we run on has:
- evaluation (`default_text`): the English prose of Python's own documentation, the module
  `pydoc_data.topics` that every Python install ships (its `topics` dict, joined in sorted key
  order so that the token stream is the same on every machine with the same Python);
- calibration (`calibration_text`): the license texts of Debian's `base-files` package under
  /usr/share/common-licenses (Apache, GPL, BSD, ...), in sorted file order.
tests/test_eval.py checks that the two share no paragraph.

Windows. The text is tokenized once (no special tokens) and cut into windows of `context`
tokens that start every `stride` tokens (default: `context`, non-overlapping windows, as
llama.cpp cuts its chunks). Each window runs through the model as one sequence from position
0 and is scored on its last min(stride, context // 2) tokens: every scored token has at least
half a window of context, as in llama.cpp, which scores the second half of each chunk. With
stride <= context / 2 the windows slide and every token after the first window's unscored
part is scored exactly once. A tail shorter than a window is not scored. When the tokenizer
puts a BOS token before a text (`add_bos`), each window's first token is replaced by it, as
llama.cpp does.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .batch import SeqSlice, StepBatch
from .kv_store import KVStore

if TYPE_CHECKING:
    from .model import LoadedModel
    from .tokenizer import Tokenizer

CALIBRATION_DIR = Path("/usr/share/common-licenses")
DEFAULT_CONTEXT = 512


class EvalError(Exception):
    """A bad argument or input of `kiln eval` (names the option or file), reported without a traceback."""


# --- texts ---------------------------------------------------------------------------------


def default_text() -> str:
    """The evaluation text: Python's documentation topics (`pydoc_data.topics`), sorted by key."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split it out of the base Python package
        raise EvalError("the default evaluation text, Python's `pydoc_data.topics`, is not installed with this "
                        "Python; give a text file with --text FILE") from None
    return "\n\n".join(topics[key] for key in sorted(topics))


def calibration_text(folder: Path = CALIBRATION_DIR) -> str:
    """The calibration text for `kiln quantize`: the license texts Debian's base-files package
    ships, in sorted file order. Symbolic links there (GPL -> GPL-3, ...) repeat another file
    and are skipped. Never the evaluation text (see the module docstring)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink()) if folder.is_dir() else []
    if not files:
        raise EvalError(f"no calibration text: {folder} holds no license texts (Debian's base-files package ships "
                        f"them); give a calibration text file instead")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def read_text(path: str | Path, option: str = "--text") -> str:
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{option} {path}: {'is a directory' if p.is_dir() else 'no such file'}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{option} {path}: not UTF-8 text (byte {e.start})") from None


def bos_token(tokenizer: Tokenizer) -> int | None:
    """The BOS id the tokenizer puts before a text, or None if it adds none."""
    bos = tokenizer.bos_token_id
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bos if bos is not None and ids and ids[0] == bos else None


# --- windows and scores --------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    start: int  # index of its first token in the stream
    scored: int  # its last `scored` tokens are the targets


def windows(n_tokens: int, context: int, stride: int | None = None) -> list[Window]:
    """Windows of `context` tokens starting every `stride` (default: `context`) tokens, each
    scored on its last min(stride, context // 2) tokens; a partial tail window is dropped."""
    stride = context if stride is None else stride
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context, got context={context}, stride={stride}")
    scored = min(stride, context // 2)
    return [Window(s, scored) for s in range(0, n_tokens - context + 1, stride)]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] negative log-likelihood of each target under its row of logits [N, V] (fp32 or wider)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.view(-1, 1)).squeeze(-1)


def kl_divergence(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """[N] KL(P_base || P) of each row: sum_v p_base(v) * (log p_base(v) - log p(v)), in nats —
    llama.cpp's direction (the reference distribution weights the log ratio)."""
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (base_logp.exp() * (base_logp - logp)).sum(-1)


class WindowRunner:
    """Runs one window at a time through a model as a fresh sequence: one KV store, reused
    (a window starts at position 0, so nothing of the previous one is read)."""

    def __init__(self, loaded: LoadedModel, context: int, page_size: int = 16):
        pages = -(-context // page_size)
        self.loaded = loaded
        self.kv = KVStore(loaded.plan.sites, pages, page_size, loaded.dtype, loaded.device)
        self.block_table = tuple(range(pages))

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), vocab] fp32 logits of every position."""
        batch = StepBatch(torch.tensor(tokens, dtype=torch.long, device=self.loaded.device),
                          [SeqSlice(0, len(tokens), 0, self.block_table)])
        return self.loaded.model.forward(batch, self.kv, all_logits=True)


@dataclass
class EvalResult:
    context: int
    stride: int
    windows: int
    nll: np.ndarray  # [N] per scored token, nats
    base_nll: np.ndarray | None = None  # the unquantized model's, with --kl-divergence
    kl: np.ndarray | None = None  # [N] KL(base || model) per scored position
    same_top: np.ndarray | None = None  # [N] bool: the two models' most likely tokens agree
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.nll.size)

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    def summary(self) -> dict:
        """Every figure, JSON-ready. ppl_stderr: the standard error of the mean NLL carried to the
        perplexity (ppl * se), as llama.cpp prints it."""
        n = self.tokens
        se = float(self.nll.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        out = dict(ppl=self.ppl, ppl_stderr=self.ppl * se, mean_nll=float(self.nll.mean()), tokens=n,
                   windows=self.windows, context=self.context, stride=self.stride)
        if self.kl is not None:
            ppl_base = math.exp(float(self.base_nll.mean()))
            kl = self.kl
            out.update(ppl_base=ppl_base, ppl_ratio=self.ppl / ppl_base,
                       kl_mean=float(kl.mean()), kl_median=float(np.median(kl)),
                       kl_p99=float(np.percentile(kl, 99)), kl_p999=float(np.percentile(kl, 99.9)),
                       kl_max=float(kl.max()), same_top=float(self.same_top.mean()))
        out.update(self.extra)
        return out


def evaluate(loaded: LoadedModel, tokens: list[int], context: int = DEFAULT_CONTEXT, stride: int | None = None,
             base: LoadedModel | None = None, bos: int | None = None, progress: bool = False) -> EvalResult:
    """Perplexity of `loaded` over `tokens` (see the module docstring for the windows); with
    `base`, also each scored position's KL divergence from `base` and top-token agreement.
    `base` may be `loaded` itself (KL 0, nothing run twice)."""
    from tqdm import tqdm

    stride = context if stride is None else stride
    wins = windows(len(tokens), context, stride)
    if not wins:
        raise EvalError(f"{len(tokens)} tokens are fewer than one window of {context}")
    runner = WindowRunner(loaded, context)
    base_runner = WindowRunner(base, context) if base is not None and base is not loaded else None
    nll, base_nll, kl, same = [], [], [], []
    nll_sum = 0.0
    with torch.no_grad(), tqdm(total=len(wins), unit="window", file=sys.stderr, disable=not progress,
                               desc="perplexity") as bar:
        for w in wins:
            ids = list(tokens[w.start:w.start + context])
            if bos is not None:
                ids[0] = bos
            rows = slice(context - w.scored - 1, context - 1)  # logits at i predict token i + 1
            targets = torch.tensor(ids[context - w.scored:], dtype=torch.long, device=loaded.device)
            logits = runner.logits(ids)[rows]
            nll.append(token_nll(logits, targets).cpu())
            nll_sum += float(nll[-1].double().sum())
            if base is not None:
                base_logits = base_runner.logits(ids)[rows].to(logits.device) if base_runner else logits
                base_nll.append(token_nll(base_logits, targets).cpu())
                kl.append(kl_divergence(base_logits, logits).cpu())
                same.append((base_logits.argmax(-1) == logits.argmax(-1)).cpu())
            bar.set_postfix_str(f"ppl {math.exp(nll_sum / (len(nll) * w.scored)):.4f}", refresh=False)
            bar.update(1)

    def cat(parts):
        return torch.cat(parts).double().numpy() if parts else None

    same_top = torch.cat(same).numpy() if same else None
    return EvalResult(context, stride, len(wins), cat(nll), cat(base_nll), cat(kl), same_top)


# --- the command ---------------------------------------------------------------------------


def quantization_schemes() -> tuple[str, ...]:
    """The schemes `--quantization` takes: the IR's own list, read when asked."""
    from kiln.dsl.passes import QUANT_SCHEMES

    return tuple(QUANT_SCHEMES)


def _load(source, quantization: str, kv_cache_dtype: str = "auto"):
    """load_model with the weights' scheme and the KV cache's dtype."""
    from .model import load_model

    return load_model(source.path, **dict(source.options, quantization=quantization, kv_cache_dtype=kv_cache_dtype))


def perplexity_cli(args) -> int:
    """`kiln eval perplexity`; every argument is checked before any weights load."""
    from .generate import ModelSource

    context, stride = args.context, args.stride if args.stride is not None else args.context
    if stride > context:
        raise EvalError(f"--stride {stride}: must be <= --context ({context})")
    kl_base = getattr(args, "kl_base", None)
    if kl_base is not None and not args.kl_divergence:
        raise EvalError("--kl-base applies with --kl-divergence")
    if args.max_tokens is not None and args.max_tokens < context:
        raise EvalError(f"--max-tokens {args.max_tokens}: fewer than one window (--context {context})")
    text = read_text(args.text) if args.text is not None else default_text()
    text_name = args.text if args.text is not None else "pydoc_data.topics"
    source = ModelSource.open(args.checkpoint, spec=args.spec, dtype=args.dtype, device=args.device,
                              backend=args.backend, tokenizer=True)
    if args.quantization != "none" and source.manifest is not None:
        raise EvalError(f"--quantization {args.quantization}: {source.path} is an engine directory, whose weights "
                        f"were fixed by `kiln build`; give the checkpoint it was built from")
    if source.context_len is not None and context > source.context_len:
        raise EvalError(f"--context {context}: exceeds the context length of {source.name} "
                        f"({source.context_len} tokens)")
    t0 = time.perf_counter()
    tokens = source.tokenizer.encode(text, add_special_tokens=False)
    total = len(tokens)
    if args.max_tokens is not None:
        tokens = tokens[:args.max_tokens]
    if len(tokens) < context:
        raise EvalError(f"--text {text_name}: {len(tokens)} tokens, fewer than one window (--context {context})")
    t1 = time.perf_counter()
    kv = getattr(args, "kv_cache_dtype", None) or "auto"
    loaded = _load(source, args.quantization, kv)
    base = None
    if kl_base is not None:  # a quantized checkpoint's own float model (it cannot be loaded unquantized)
        base = _load(ModelSource.open(kl_base, spec=args.spec, dtype=args.dtype, device=args.device,
                                      backend=args.backend, tokenizer=False), "none")
    elif args.kl_divergence:  # against the same checkpoint unquantized; "none" is its own base
        base = loaded if args.quantization == "none" and kv == "auto" else _load(source, "none")
    t2 = time.perf_counter()
    result = evaluate(loaded, tokens, context, stride, base=base, bos=bos_token(source.tokenizer), progress=True)
    t3 = time.perf_counter()
    result.extra.update(model=source.name, quantization=args.quantization, kv_cache_dtype=kv, text=str(text_name),
                        text_tokens=total, tokens_used=len(tokens), load_s=round(t2 - t1, 3),
                        eval_s=round(t3 - t2, 3), tokenize_s=round(t1 - t0, 3))
    summary = result.summary()
    table = format_table(summary)
    if args.json:
        sys.stderr.write(table)
        print(json.dumps(summary))
    else:
        sys.stdout.write(table)
    return 0


def format_table(s: dict) -> str:
    rows = [("model", f"{s['model']} (quantization {s['quantization']})"),
            ("text", f"{s['text']}: {s['tokens_used']:,} of {s['text_tokens']:,} tokens"),
            ("windows", f"{s['windows']} x {s['context']} tokens, stride {s['stride']}, {s['tokens']:,} scored"),
            ("perplexity", f"{s['ppl']:.4f} +/- {s['ppl_stderr']:.4f}")]
    if "kl_mean" in s:
        rows += [("base perplexity", f"{s['ppl_base']:.4f} (ratio {s['ppl_ratio']:.5f})"),
                 ("KL mean", f"{s['kl_mean']:.6f}"),
                 ("KL median / p99 / max", f"{s['kl_median']:.6f} / {s['kl_p99']:.6f} / {s['kl_max']:.6f}"),
                 ("same top token", f"{100 * s['same_top']:.2f}%")]
    rows.append(("time", f"load {s['load_s']:.1f} s, eval {s['eval_s']:.1f} s "
                         f"({s['windows'] * s['context'] / max(s['eval_s'], 1e-9):,.0f} tok/s through the model)"))
    width = max(len(k) for k, _ in rows)
    return "".join(f"{k:<{width}}  {v}\n" for k, v in rows)
