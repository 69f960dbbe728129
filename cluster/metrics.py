"""Every omniray_ metric, declared once. Exported through Ray's metrics agent
(Prometheus format, the Ray dashboard, dashboards/ for Grafana).

Metrics objects are made inside the actors that record them (a Serve replica,
the master), never at import: `ProxyMetrics()` in each slave.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

# seconds: 1 ms .. 2 min, roughly x2.5 per bucket
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0]


class ProxyMetrics:
    """What a slave records per request: the lifecycle gaps, TTFT, end to end,
    token counts, outcomes and the tokenizer's work."""

    def __init__(self, model: str):
        tags = ("model",)
        self.model = {"model": model}
        self.stage = Histogram("omniray_request_stage_seconds", "time between consecutive lifecycle stages",
                               LATENCY_BUCKETS, tag_keys=(*tags, "gap"))
        self.ttft = Histogram("omniray_ttft_seconds", "received -> first token", LATENCY_BUCKETS, tag_keys=tags)
        self.e2e = Histogram("omniray_e2e_seconds", "received -> finished", LATENCY_BUCKETS, tag_keys=tags)
        self.requests = Counter("omniray_requests_total", "requests by outcome", tag_keys=(*tags, "outcome"))
        self.tokens = Counter("omniray_tokens_total", "prompt and generated tokens", tag_keys=(*tags, "kind"))
        self.tokenizer_calls = Gauge("omniray_tokenizer_calls", "tokenizer runs (cache misses) so far",
                                     tag_keys=tags)
        self.tokenizer_hits = Gauge("omniray_tokenizer_cache_hits", "texts whose ids were reused", tag_keys=tags)

    def request_done(self, life, outcome: str, prompt_tokens: int, completion_tokens: int) -> None:
        for gap, seconds in life.gaps().items():
            self.stage.observe(max(0.0, seconds), {**self.model, "gap": gap})
        if life.ttft_s is not None:
            self.ttft.observe(life.ttft_s, self.model)
        if life.e2e_s is not None:
            self.e2e.observe(life.e2e_s, self.model)
        self.requests.inc(1, {**self.model, "outcome": outcome})
        self.tokens.inc(prompt_tokens, {**self.model, "kind": "prompt"})
        if completion_tokens:
            self.tokens.inc(completion_tokens, {**self.model, "kind": "completion"})

    def tokenizer(self, stats: dict) -> None:
        self.tokenizer_calls.set(stats["tokenizer_calls"], self.model)
        self.tokenizer_hits.set(stats["tokenizer_cache_hits"], self.model)
