"""`kiln bench serve`: load a running server the way vLLM's benchmark_serving does.

For each request rate, `num_requests` streaming /v1/completions requests are sent with
Poisson arrivals (exponential gaps of mean 1/rate; rate "inf" sends them all at once), each
with a random prompt of `input_len` words (about as many tokens) and `max_tokens = output_len` (ignore_eos, so
every request generates exactly that many). Reported per rate: completed and failed
requests, request and token throughput, and p50 / p90 / p99 of
- TTFT: request sent -> first streamed token;
- TPOT: (end-to-end - TTFT) / (output tokens - 1);
- ITL: the gaps between streamed chunks;
- E2E: request sent -> last byte.
Only loopback URLs are accepted: this is a benchmark of a local server, not a load tool.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

_WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
          "word but not what all were we when your can said there use an each which she do how their if will up "
          "other about out many then them these so some her would make like him into time has look two more write "
          "go see number no way could people my than first water been call who oil its now find long down day did "
          "get come made may part").split()
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class BenchError(Exception):
    """A bad benchmark argument, or a server that cannot be benchmarked."""


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


@dataclass
class RateReport:
    rate: float
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float  # generated tokens / s
    total_token_throughput: float  # (prompt + generated) tokens / s
    mean_prompt_tokens: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: list[str]


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """p50 / p90 / p99 (linear interpolation, as numpy's default) and the mean, times scale."""
    if not values:
        return {k: math.nan for k in ("mean", "p50", "p90", "p99")}
    xs = sorted(values)

    def q(p):
        pos = (len(xs) - 1) * p
        lo, hi = math.floor(pos), math.ceil(pos)
        return (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)) * scale

    return {"mean": sum(xs) / len(xs) * scale, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def check_loopback(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in _LOOPBACK:
        raise BenchError(f"--url must be an http URL on this machine (127.0.0.1, localhost or ::1), got {url!r}")
    return url.rstrip("/").removesuffix("/v1")


async def _one(client, url: str, body: dict) -> Result:
    t0 = time.perf_counter()
    last = t0
    res = Result(ok=False)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    res.ok = res.output_tokens > 0 and not res.error
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error event")
                elif chunk.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"
    res.e2e = time.perf_counter() - t0
    return res


async def run_rate(url: str, model: str, rate: float, num_requests: int, input_len: int, output_len: int,
                   seed: int = 0, api_key: str | None = None, timeout: float = 600.0) -> RateReport:
    import httpx

    rng = random.Random(seed)
    bodies = [{"model": model, "prompt": " ".join(rng.choice(_WORDS) for _ in range(input_len)),
               "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}} for _ in range(num_requests)]
    gaps = [0.0 if math.isinf(rate) else rng.expovariate(rate) for _ in bodies]
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=num_requests + 8, max_keepalive_connections=num_requests + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers, trust_env=False) as client:
        tasks = []
        start = time.perf_counter()
        for body, gap in zip(bodies, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(_one(client, url, body)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    prompt_tokens = sum(r.prompt_tokens for r in good)
    return RateReport(
        rate=rate, num_requests=num_requests, completed=len(good), failed=len(results) - len(good),
        duration_s=duration, request_throughput=len(good) / duration, output_throughput=out_tokens / duration,
        total_token_throughput=(out_tokens + prompt_tokens) / duration,
        mean_prompt_tokens=prompt_tokens / len(good) if good else math.nan,
        ttft_ms=percentiles([r.ttft for r in good]),
        tpot_ms=percentiles([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]),
        itl_ms=percentiles([g for r in good for g in r.itl]), e2e_ms=percentiles([r.e2e for r in good]),
        errors=sorted({r.error for r in results if not r.ok})[:5])


def run_benchmark(url: str, rates: list[float], num_requests: int, input_len: int = 64, output_len: int = 32,
                  model: str | None = None, seed: int = 0, api_key: str | None = None,
                  timeout: float = 600.0) -> list[RateReport]:
    import httpx

    url = check_loopback(url)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        listed = httpx.get(f"{url}/v1/models", headers=headers, timeout=30, trust_env=False)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {url}: {e}") from None
    if listed.status_code != 200:
        raise BenchError(f"{url}/v1/models answered HTTP {listed.status_code}: {listed.text[:200]}")
    names = [m["id"] for m in listed.json()["data"]]
    model = model or names[0]
    if model not in names:
        raise BenchError(f"model {model!r} is not served at {url}; served: {names}")
    return [asyncio.run(run_rate(url, model, rate, num_requests, input_len, output_len, seed + i, api_key, timeout))
            for i, rate in enumerate(rates)]


def format_reports(reports: list[RateReport]) -> str:
    head = (f"{'rate':>6} {'ok':>5} {'fail':>5} {'dur s':>7} {'req/s':>7} {'out tok/s':>9} "
            f"{'TTFT ms p50/p90/p99':>22} {'TPOT ms p50/p90/p99':>22} {'E2E ms p50/p90/p99':>24}")
    rows = [head]
    for r in reports:
        def trio(d):
            return "/".join(f"{d[k]:.0f}" if d[k] >= 10 else f"{d[k]:.1f}" for k in ("p50", "p90", "p99"))
        rows.append(f"{r.rate:>6g} {r.completed:>5} {r.failed:>5} {r.duration_s:>7.1f} {r.request_throughput:>7.2f} "
                    f"{r.output_throughput:>9.1f} {trio(r.ttft_ms):>22} {trio(r.tpot_ms):>22} {trio(r.e2e_ms):>24}")
        rows += [f"       error: {e}" for e in r.errors]
    return "\n".join(rows)


def cmd_bench_serve(args) -> int:
    check_loopback(args.url)  # before anything is sent
    reports = run_benchmark(args.url, args.rates, args.num_requests, args.input_len, args.output_len, args.model,
                            args.seed, args.api_key, args.timeout)
    print(format_reports(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=2)
    return 0 if all(r.failed == 0 for r in reports) else 1
