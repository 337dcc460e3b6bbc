"""Per-request sampling settings, with vLLM's names, defaults and meanings.

- temperature 0 (below 1e-5) is greedy: argmax of the penalised logits; top-k/top-p/min-p are
  then ignored.
- top_k 0 or -1 disables top-k; top_p 1.0 and min_p 0.0 disable theirs.
- repetition_penalty (HF/CTRL semantics) applies to every token of prompt + output;
  presence_penalty and frequency_penalty (OpenAI semantics) to output tokens only.
- stop strings are matched by the detokenising layer; stop_token_ids and EOS by the scheduler.
- logprobs=k asks for the k most likely tokens of the processed distribution (plus the sampled
  token's logprob); 0 asks for the sampled token's logprob only.
- guided (runtime.guided.GuidedDecodingParams or a dict of its fields: json, regex, choice,
  grammar, json_object) constrains the output; the request stops when the grammar is complete.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .guided import GuidedDecodingParams

# Below this a temperature means greedy, as in vLLM (dividing by ~0 would overflow).
GREEDY_EPS = 1e-5


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# The rule of each scalar field: (test, what a valid value is). One table serves the
# dataclass, the command line's argparse types (`arg_type`) and the server, so every
# entry point rejects the same values with the same words.
RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "n": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_num(v) and 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= -1, "an integer: 0 or -1 (disabled) or >= 1"),
    "min_p": (lambda v: _is_num(v) and 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "presence_penalty": (lambda v: _is_num(v) and -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (lambda v: _is_num(v) and -2 <= v <= 2, "in [-2, 2]"),
    "seed": (lambda v: v is None or _is_int(v) and -(2**63) <= v < 2**63, "None or a 64-bit signed integer"),
    "ignore_eos": (lambda v: isinstance(v, bool), "a bool"),
    "max_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "logprobs": (lambda v: v is None or _is_int(v) and v >= 0, "None or an integer >= 0"),
}


# The numeric fields' ranges as (low, high, low excluded), for the tests of the command line.
BOUNDS = {"n": (1, None, False), "temperature": (0, None, False), "top_p": (0, 1, True), "top_k": (-1, None, False),
          "min_p": (0, 1, False), "repetition_penalty": (0, None, True), "presence_penalty": (-2, 2, False),
          "frequency_penalty": (-2, 2, False), "seed": (-(2**63), 2**63 - 1, False), "max_tokens": (1, None, False),
          "logprobs": (0, None, False)}


def arg_type(name: str) -> Callable[[str], object]:
    """An argparse `type=` for the field `name`: parses the text and applies the field's rule,
    so a bad command-line value is refused while the arguments are parsed."""
    test, rule = RULES[name]
    kind = int if name in ("n", "top_k", "seed", "max_tokens", "logprobs") else float
    rule = rule.removeprefix("None or ")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    parse.bounds = BOUNDS[name]
    return parse


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = field(default_factory=list)
    stop_token_ids: list[int] | None = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int = 16
    logprobs: int | None = None
    guided: GuidedDecodingParams | dict | None = None
    lora: str | None = None  # the LoRA adapter (by name) to run the request with; None: the base model

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        for name, (test, rule) in RULES.items():
            if not test(getattr(self, name)):
                raise bad(name, rule)
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative integers")
        if self.guided is not None:
            self.guided = GuidedDecodingParams.from_value(self.guided)  # GuidedError (a ValueError) names it

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS
