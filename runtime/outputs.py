"""What a request returns, in vLLM's shape: RequestOutput with one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


class Logprob(float):
    """One token's log probability, as vLLM's `Logprob`: `.logprob`, `.rank` (1 = the most
    likely token of the distribution sampled from) and `.decoded_token` (its text).

    It is also the float itself, so code written against plain float logprobs (the OpenAI
    server's renderer, arithmetic, sorting) keeps working unchanged.
    """

    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None):
        self = super().__new__(cls, logprob)
        self.rank = rank
        self.decoded_token = decoded_token
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"

    def __reduce__(self):
        return (Logprob, (float(self), self.rank, self.decoded_token))


@dataclass
class CompletionOutput:
    index: int
    text: str  # everything generated so far (cumulative)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Per generated token: {token id: Logprob} for the top `logprobs` tokens plus the sampled one.
    logprobs: list[dict[int, Logprob]] | None = None
    delta: str = ""  # text added since the previous output of this request (streaming)
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs (when asked for)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the text prompt; for chat the rendered template, for token ids their decoding
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None  # why the request could not run (finish_reason "error")
