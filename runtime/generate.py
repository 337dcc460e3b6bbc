"""`kiln generate`: one prompt through one model, streamed to the terminal.

Uses the single-sequence driver, the batched sampler (so temperature / top-p / top-k
behave exactly as in the engine) and incremental detokenisation.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from .model import LoadedModel, SingleSequence, load_model
from .sampler import Sampler, SamplingRow, make_generator
from .sampling_params import SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    prefill_s: float
    decode_s: float


def generate(loaded: LoadedModel, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             on_text=None) -> Generation:
    seq = SingleSequence(loaded, len(prompt_ids) + params.max_tokens)
    sampler = Sampler()
    gen = make_generator(params, loaded.device)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    out: list[int] = []
    text = ""
    finish = "length"
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else tokenizer.eos_token_ids)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = seq.step(prompt_ids)
        t1 = time.perf_counter()
        while len(out) < params.max_tokens:
            token = int(sampler.sample(logits, [SamplingRow(params, prompt_ids, out, gen)]).tokens[0])
            out.append(token)
            if token in stops:
                finish = "stop"
                break
            delta = detok.feed(token)
            text += delta
            if on_text and delta:
                on_text(delta)
            if any(s in text for s in params.stop):
                text = text[: min(text.index(s) for s in params.stop if s in text)]
                finish = "stop"
                break
            logits = seq.step([token])
    tail = detok.flush() if finish == "length" else ""
    if on_text and tail:
        on_text(tail)
    return Generation(prompt_ids, out, text + tail, finish, t1 - t0, time.perf_counter() - t1)


def generate_cli(args) -> int:
    if args.checkpoint is None:
        from .gguf_file import default_model_path
        args.checkpoint = str(default_model_path())
    loaded = load_model(args.checkpoint, spec=args.spec, dtype=args.dtype, device=args.device,
                        backend=args.backend)
    tokenizer = Tokenizer.from_checkpoint(loaded.checkpoint)
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.chat})
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    g = generate(loaded, tokenizer, prompt_ids, params, on_text=show)
    n = len(g.token_ids)
    print()
    print(f"[{loaded.plan.spec.name}, {args.backend}, {args.dtype}, {args.device}: prompt {len(prompt_ids)} tokens "
          f"in {g.prefill_s:.2f} s, {n} tokens in {g.decode_s:.2f} s "
          f"({n / g.decode_s if g.decode_s > 0 else 0:.1f} tok/s), finish: {g.finish_reason}]", file=sys.stderr)
    return 0
