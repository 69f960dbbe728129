"""Every omniray_ metric, declared once. Exported through Ray's metrics agent
(Prometheus format, the Ray dashboard, dashboards/ for Grafana).

Metrics objects are made inside the actors that record them, never at import:
`ProxyMetrics` in each slave, `MasterMetrics` in the master. Ray's exporter
adds its own `ray_` prefix on the Prometheus side (`ray_omniray_ttft_seconds`).
A slave also keeps its own metrics (the `slave` rows) in a registry of its own,
which its `GET /metrics` serves under the same names, without the prefix.

Running totals that a source keeps (the tokenizer cache's, the global KV cache's,
the NPUs' expert load) are exported as counters: each report adds what changed
since the last one (`_Deltas`), so `rate()` reads them as Prometheus expects.

| metric | kind | tags | recorded by |
| --- | --- | --- | --- |
| omniray_request_stage_seconds | histogram | model, gap | slave: each lifecycle gap |
| omniray_ttft_seconds | histogram | model | slave |
| omniray_tpot_seconds | histogram | model | slave: (finished - first token) / (tokens - 1) |
| omniray_e2e_seconds | histogram | model | slave |
| omniray_requests_total | counter | model, outcome | slave: stop, length, aborted, error_4xx/5xx |
| omniray_tokens_total | counter | model, kind | slave: prompt, completion |
| omniray_tokenizer_calls_total | counter | model | slave: tokenizer runs (cache misses) |
| omniray_tokenizer_cache_hits_total | counter | model | slave: texts whose token ids were reused |
| omniray_queue_length | gauge | | master: requests waiting for dispatch |
| omniray_decode_queue_length | gauge | | master: prefilled requests waiting for a decode instance (P/D) |
| omniray_instance_queued_tokens | gauge | instance, role | master: uncached prompt tokens dispatched there, not yet prefilled |
| omniray_instance_running | gauge | instance, role | master: the engine's running sequences |
| omniray_instance_waiting | gauge | instance, role | master: the engine's waiting sequences |
| omniray_instance_free_kv_blocks | gauge | instance, role | master: free KV blocks (the fullest NPU) |
| omniray_instance_healthy | gauge | instance, role | master: 1 answering, 0 not |
| omniray_npu_hbm_used_bytes | gauge | instance, npu | master: the NPU's HBM ledger |
| omniray_npu_hbm_capacity_bytes | gauge | instance, npu | master |
| omniray_expert_routed_tokens_total | counter | instance, layer, npu | master: token-expert pairs routed to the NPU's experts |
| omniray_expert_imbalance | gauge | instance, layer | master: (max - min) / mean of the device loads since the NPUs' last reset |
| omniray_kv_cache_hits_total | counter | | master: global KV cache blocks hit |
| omniray_kv_cache_misses_total | counter | | master: blocks queried past the matched prefix |
| omniray_kv_cache_evictions_total | counter | | master: blocks dropped for capacity |
| omniray_kv_cache_blocks | gauge | | master: blocks indexed now |
| omniray_dispatched_total | counter | | master: requests dispatched |
| omniray_rejected_total | counter | reason | master: queue_full, no_instance |
| omniray_scaling_events_total | counter | action, role, trigger, outcome | controller: scale_ep, add_instance, remove_instance, rebalance; operator or autoscaler; ok or error |
| omniray_scaling_seconds | histogram | action | controller: command to done (a resize: to the first step on the new size) |
| omniray_instance_npus | gauge | instance, role | controller: the instance's EP size now |
| omniray_standby_npus | gauge | | controller: warm NPU actors ready for a scale-up |
"""

from __future__ import annotations

import prometheus_client
from ray.util.metrics import Counter, Gauge, Histogram

from actors.expert_map import imbalance_score
from cluster.placement import npu_loads

# seconds: 1 ms .. 2 min, roughly x2.5 per bucket
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0]


class _Deltas:
    """A source's running totals turned into a counter's increments: what changed since
    the last report. A total that fell (its source restarted or was reset) counts from
    zero again, as Prometheus' rate() reads a counter reset."""

    def __init__(self):
        self._last: dict = {}

    def __call__(self, key, total: float) -> float:
        before = self._last.get(key, 0)
        self._last[key] = total
        return total - before if total >= before else total

    def vector(self, key, totals: list[float]) -> list[float]:
        """The same for a vector of totals that reset together (an NPU's expert load)."""
        before = self._last.get(key)
        self._last[key] = list(totals)
        if before is None or len(before) != len(totals) or any(t < b for t, b in zip(totals, before)):
            return list(totals)
        return [t - b for t, b in zip(totals, before)]


class _Twin:
    """A slave's metric recorded twice: through Ray's metrics agent (with every other
    actor's) and in the slave's own registry (its /metrics)."""

    _KINDS = {Counter: (prometheus_client.Counter, "inc"), Gauge: (prometheus_client.Gauge, "set"),
              Histogram: (prometheus_client.Histogram, "observe")}

    def __init__(self, kind: type, registry: prometheus_client.CollectorRegistry, name: str, doc: str,
                 tag_keys: tuple[str, ...], buckets: list[float] | None = None):
        local_kind, self._verb = self._KINDS[kind]
        self._ray = kind(name, doc, buckets, tag_keys=tag_keys) if buckets else kind(name, doc, tag_keys=tag_keys)
        extra = {"buckets": buckets} if buckets else {}
        self._local = local_kind(name, doc, tag_keys, registry=registry, **extra)

    def record(self, value: float, tags: dict[str, str]) -> None:
        getattr(self._ray, self._verb)(value, tags)
        getattr(self._local.labels(**tags), self._verb)(value)


class ProxyMetrics:
    """What a slave records per request: the lifecycle gaps, TTFT, end to end,
    token counts, outcomes and the tokenizer's work."""

    def __init__(self, model: str):
        tags = ("model",)
        self.model = {"model": model}
        self.registry = prometheus_client.CollectorRegistry()

        def twin(kind, name, doc, tag_keys=tags, buckets=None):
            return _Twin(kind, self.registry, name, doc, tag_keys, buckets)

        self.stage = twin(Histogram, "omniray_request_stage_seconds", "time between consecutive lifecycle stages",
                          (*tags, "gap"), LATENCY_BUCKETS)
        self.ttft = twin(Histogram, "omniray_ttft_seconds", "received -> first token", buckets=LATENCY_BUCKETS)
        self.tpot = twin(Histogram, "omniray_tpot_seconds", "time per output token after the first",
                         buckets=LATENCY_BUCKETS)
        self.e2e = twin(Histogram, "omniray_e2e_seconds", "received -> finished", buckets=LATENCY_BUCKETS)
        self.requests = twin(Counter, "omniray_requests_total", "requests by outcome", (*tags, "outcome"))
        self.tokens = twin(Counter, "omniray_tokens_total", "prompt and generated tokens", (*tags, "kind"))
        self.tokenizer_calls = twin(Counter, "omniray_tokenizer_calls_total", "tokenizer runs (cache misses)")
        self.tokenizer_hits = twin(Counter, "omniray_tokenizer_cache_hits_total", "texts whose token ids were reused")
        self._deltas = _Deltas()

    def request_done(self, life, outcome: str, prompt_tokens: int, completion_tokens: int) -> None:
        for gap, seconds in life.gaps().items():
            self.stage.record(max(0.0, seconds), {**self.model, "gap": gap})
        if life.ttft_s is not None:
            self.ttft.record(life.ttft_s, self.model)
        if life.e2e_s is not None:
            self.e2e.record(life.e2e_s, self.model)
        tpot = life.tpot_s(completion_tokens)
        if tpot is not None:
            self.tpot.record(tpot, self.model)
        self.requests.record(1, {**self.model, "outcome": outcome})
        self.tokens.record(prompt_tokens, {**self.model, "kind": "prompt"})
        if completion_tokens:
            self.tokens.record(completion_tokens, {**self.model, "kind": "completion"})

    def tokenizer(self, stats: dict) -> None:
        """The token cache's running totals (TokenCache.stats)."""
        for counter, key in ((self.tokenizer_calls, "tokenizer_calls"), (self.tokenizer_hits, "tokenizer_cache_hits")):
            if (delta := self._deltas(key, stats[key])) > 0:
                counter.record(delta, self.model)

    def rejected(self, status: int) -> None:
        """A request answered with an error status before or while generating."""
        self.requests.record(1, {**self.model, "outcome": f"error_{status}"})

    def exposition(self) -> bytes:
        """This slave's metrics in Prometheus' text format (what GET /metrics serves)."""
        return prometheus_client.generate_latest(self.registry)


class MasterMetrics:
    """What the master exports on each refresh: its queue, every instance's load,
    every NPU's HBM and expert load, and the global KV cache."""

    def __init__(self):
        inst = ("instance", "role")
        self.queue = Gauge("omniray_queue_length", "requests waiting for dispatch")
        self.decode_queue = Gauge("omniray_decode_queue_length", "prefilled requests waiting for a decode instance")
        self.queued_tokens = Gauge("omniray_instance_queued_tokens", "uncached prompt tokens dispatched, not yet prefilled",
                                   tag_keys=inst)
        self.running = Gauge("omniray_instance_running", "running sequences", tag_keys=inst)
        self.waiting = Gauge("omniray_instance_waiting", "waiting sequences", tag_keys=inst)
        self.free_blocks = Gauge("omniray_instance_free_kv_blocks", "free KV blocks (fullest NPU)", tag_keys=inst)
        self.healthy = Gauge("omniray_instance_healthy", "1 if the engine answers", tag_keys=inst)
        self.hbm_used = Gauge("omniray_npu_hbm_used_bytes", "HBM charged", tag_keys=("instance", "npu"))
        self.hbm_capacity = Gauge("omniray_npu_hbm_capacity_bytes", "HBM size", tag_keys=("instance", "npu"))
        self.routed = Counter("omniray_expert_routed_tokens_total", "token-expert pairs routed to the NPU's experts",
                              tag_keys=("instance", "layer", "npu"))
        self.imbalance = Gauge("omniray_expert_imbalance", "(max - min) / mean of device loads",
                               tag_keys=("instance", "layer"))
        self.kv = {k: Counter(f"omniray_kv_cache_{k}_total", f"global KV cache blocks: {k}") for k in
                   ("hits", "misses", "evictions")}
        self.kv_blocks = Gauge("omniray_kv_cache_blocks", "blocks the global KV cache indexes")
        self._deltas = _Deltas()
        self.dispatched = Counter("omniray_dispatched_total", "requests dispatched")
        self.rejected = Counter("omniray_rejected_total", "requests refused", tag_keys=("reason",))

    def instances(self, queue_length: int, decode_queue_length: int, instances) -> None:
        self.queue.set(queue_length)
        self.decode_queue.set(decode_queue_length)
        for inst in instances:
            tags = {"instance": inst.name, "role": inst.role}
            self.queued_tokens.set(inst.load.queued_tokens, tags)
            self.running.set(inst.stats.running if inst.stats else 0, tags)
            self.waiting.set(inst.stats.waiting if inst.stats else 0, tags)
            self.free_blocks.set(inst.free_blocks, tags)
            self.healthy.set(1 if inst.healthy else 0, tags)
            if inst.npus:
                self.npus(inst.name, inst.npus)

    def npus(self, instance: str, npus: list[dict]) -> None:
        for npu in npus:
            tags = {"instance": instance, "npu": str(npu.get("name"))}
            self.hbm_used.set(npu["hbm"]["used"], tags)
            self.hbm_capacity.set(npu["hbm"]["capacity"], tags)
        for layer, loads in device_loads(npus).items():
            self.imbalance.set(imbalance_score(loads), {"instance": instance, "layer": str(layer)})
        # each NPU's expert load since the last report, then split over the experts' holders now
        routed = [{**npu, "expert_load": {layer: self._deltas.vector((instance, npu.get("name"), layer), load)
                                          for layer, load in npu.get("expert_load", {}).items()}} for npu in npus]
        for layer, loads in device_loads(routed).items():
            for npu, load in zip(npus, loads):
                if load > 0:
                    self.routed.inc(load, {"instance": instance, "layer": str(layer), "npu": str(npu.get("name"))})

    def kv_cache(self, stats: dict | None) -> None:
        """The global KV cache actor's running totals (GlobalKVCache.stats) and its size."""
        if stats:
            for key, counter in self.kv.items():
                if (delta := self._deltas(key, stats[key])) > 0:
                    counter.inc(delta)
            self.kv_blocks.set(stats["blocks"])


class ScalingMetrics:
    """What the cluster controller exports: each scaling action and the EP sizes."""

    def __init__(self):
        self.events = Counter("omniray_scaling_events_total", "scaling actions carried out",
                              tag_keys=("action", "role", "trigger", "outcome"))
        self.duration = Histogram("omniray_scaling_seconds", "scaling action: command to done",
                                  LATENCY_BUCKETS, tag_keys=("action",))
        self.npus = Gauge("omniray_instance_npus", "EP size of the instance", tag_keys=("instance", "role"))
        self.standby = Gauge("omniray_standby_npus", "warm NPU actors ready for a scale-up")

    def event(self, action: str, role: str, trigger: str, outcome: str, seconds: float) -> None:
        self.events.inc(1, {"action": action, "role": role, "trigger": trigger, "outcome": outcome})
        if outcome == "ok":
            self.duration.observe(seconds, {"action": action})

    def sizes(self, instances, standby: int) -> None:
        for inst in instances:
            self.npus.set(inst.ep_size, {"instance": inst.name, "role": inst.role})
        self.standby.set(standby)


def total_expert_load(npus: list[dict]) -> dict[int, list[int]]:
    """Per MoE layer, the token-expert pairs routed to each logical expert, summed
    over every NPU's routing (each NPU routes its own sequences over all experts)."""
    totals: dict[int, list[int]] = {}
    for npu in npus:
        for layer, loads in npu.get("expert_load", {}).items():
            acc = totals.setdefault(int(layer), [0] * len(loads))
            totals[int(layer)] = [a + b for a, b in zip(acc, loads)]
    return totals


def device_loads(npus: list[dict]) -> dict[int, list[float]]:
    """Per MoE layer, the tokens routed to each NPU's experts: total_expert_load
    over the experts it holds, a replicated expert's split among its copies (the
    EP dispatch spreads them so, and Omni Placement plans by the same count).
    A layer whose snapshot is inconsistent (taken mid-switch) is left out."""
    out = {}
    for layer, total in total_expert_load(npus).items():
        try:
            out[layer] = npu_loads([npu.get("experts", {}).get(str(layer), []) for npu in npus], total)
        except ValueError:
            continue
    return out
