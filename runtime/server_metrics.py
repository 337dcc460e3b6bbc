"""Prometheus metrics of the server, one registry per app (several apps can share a process).

Per model: requests by finish reason, TTFT / TPOT / end-to-end histograms, running and
waiting sequences, KV cache pages used and total, prompt and generated tokens, and the prefix
cache's hit rate as a counter pair (kiln_prefix_cache_hits_total / kiln_prefix_cache_queries_total:
tokens served from the cache over tokens admitted requests needed in the cache). Per endpoint:
HTTP responses by status code.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .async_engine import EngineHooks, EngineStats, RequestStats

_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_TPOT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5)
_E2E = (0.01, 0.05, 0.1, 0.3, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.http = Counter("kiln_http_requests", "HTTP responses by endpoint and status code",
                            ["endpoint", "status"], registry=r)
        self.finished = Counter("kiln_requests_finished", "Generation requests by finish reason",
                                ["model", "finish_reason"], registry=r)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Time to first token",
                              ["model"], buckets=_TTFT, registry=r)
        self.tpot = Histogram("kiln_time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=_TPOT, registry=r)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "End-to-end request latency",
                             ["model"], buckets=_E2E, registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.running = Gauge("kiln_num_requests_running", "Sequences in the running batch", ["model"], registry=r)
        self.waiting = Gauge("kiln_num_requests_waiting", "Sequences waiting for a seat", ["model"], registry=r)
        self.pages_used = Gauge("kiln_kv_cache_pages_used", "KV cache pages in use", ["model"], registry=r)
        self.pages_total = Gauge("kiln_kv_cache_pages_total", "KV cache pages", ["model"], registry=r)
        self.prefix_queries = Counter("kiln_prefix_cache_queries", "Tokens admitted requests needed in the KV "
                                      "cache (prompt, plus output so far after a preemption)", ["model"], registry=r)
        self.prefix_hits = Counter("kiln_prefix_cache_hits", "Of kiln_prefix_cache_queries, tokens found in the "
                                   "prefix cache (not recomputed)", ["model"], registry=r)
        self.preemptions = Gauge("kiln_num_preemptions", "Preemptions so far", ["model"], registry=r)

    def hooks(self, model: str) -> EngineHooks:
        return _ModelHooks(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelHooks(EngineHooks):
    def __init__(self, metrics: ServerMetrics, model: str):
        self.m, self.model = metrics, model
        metrics.pages_used.labels(model).set(0)
        metrics.running.labels(model).set(0)
        metrics.waiting.labels(model).set(0)
        metrics.prefix_queries.labels(model).inc(0)  # present (at 0) from the start
        metrics.prefix_hits.labels(model).inc(0)
        self._prefix = (0, 0)  # the engine's totals at the last step: the counters grow by the difference

    def on_step(self, stats: EngineStats) -> None:  # engine thread; prometheus_client is thread-safe
        m, name = self.m, self.model
        m.running.labels(name).set(stats.running)
        m.waiting.labels(name).set(stats.waiting)
        m.pages_used.labels(name).set(stats.kv_pages_used)
        m.pages_total.labels(name).set(stats.kv_pages_total)
        m.preemptions.labels(name).set(stats.preemptions)
        queries, hits = stats.prefix_query_tokens, stats.prefix_hit_tokens
        m.prefix_queries.labels(name).inc(queries - self._prefix[0])
        m.prefix_hits.labels(name).inc(hits - self._prefix[1])
        self._prefix = (queries, hits)

    def on_request_done(self, stats: RequestStats) -> None:
        m, name = self.m, self.model
        m.finished.labels(name, stats.finish_reason or "error").inc()
        m.prompt_tokens.labels(name).inc(stats.prompt_tokens)
        m.generation_tokens.labels(name).inc(stats.generated_tokens)
        for hist, value in ((m.ttft, stats.ttft), (m.tpot, stats.tpot), (m.e2e, stats.e2e)):
            if value is not None:
                hist.labels(name).observe(value)
