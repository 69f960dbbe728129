"""What a run did inside the server, read off OmniRay's /v1/cluster before and
after it: counters are diffed (the server may have served before), peaks are
read from the state after. Any figure whose keys a server does not publish is
unknown (None), never a crash: other servers, and older OmniRays, lack them."""

from __future__ import annotations

from cluster.bench.workloads import WorkItem, ideal_hit_rate

DEFAULT_BLOCK_SIZE = 16  # EngineSettings' default, for a server that does not say its own
OVERRUN_WARN = 0.01  # above this share of steps, the emulator's latencies are partly the host's
PEAKS = (  # summary key <- snapshot key (the master's since it started)
    ("max_queue_wait_s", "queue_wait_max_s"), ("max_decode_queue_wait_s", "decode_queue_wait_max_s"),
    ("starvation_ms", "starvation_ms"),
)


def _engine_sum(snap: dict, key: str, skip_decode: bool) -> int | float | None:
    """An engine counter summed over the instances (None if one lacks it)."""
    engines = [i.get("engine") for i in snap.get("instances", [])
               if not (skip_decode and i.get("role") == "decode")]
    engines = [e for e in engines if e]
    if any(key not in e for e in engines):
        return None
    return sum(e[key] for e in engines)


def _delta(before: dict | None, after: dict | None, key: str, skip_decode: bool = False) -> int | float | None:
    """An engine counter's growth over the run (None: unknown)."""
    if not before or not after:
        return None
    start, end = _engine_sum(before, key, skip_decode), _engine_sum(after, key, skip_decode)
    return None if start is None or end is None else end - start


def _ratio(before: dict | None, after: dict | None, num: str, den: str, skip_decode: bool) -> float | None:
    """delta(num) / delta(den) of engine counters over the run (None: unknown or no den)."""
    n, d = _delta(before, after, num, skip_decode), _delta(before, after, den, skip_decode)
    return n / d if n is not None and d else None


def kv_hit_rate(before: dict | None, after: dict | None) -> float | None:
    """Prompt tokens served from a KV cache / prompt tokens, over the run, from the
    engines' counters (prefill or mixed instances: where prompts are computed)."""
    return _ratio(before, after, "cached_tokens", "prompt_tokens", skip_decode=True)


def overrun_fraction(before: dict | None, after: dict | None) -> float | None:
    """Engine steps where an emulated NPU outlasted its modelled time / steps, over
    the run: the share of steps whose length was the host's, not the chip's."""
    return _ratio(before, after, "overrun_steps", "steps", skip_decode=False)


def server_figures(before: dict | None, after: dict | None) -> dict:
    """The run's figures from the server: hit rate, emulator overruns, preemptions
    (a preempted request that finds its own blocks again counts them as cached:
    a hit rate above the ideal), queue-wait peaks and the starvation bound, and
    (when known) the tokenizer's work."""
    out = {"kv_hit_rate": kv_hit_rate(before, after), "emulation_overrun_fraction": overrun_fraction(before, after),
           "preemptions": _delta(before, after, "preemptions")}
    out.update({key: (after or {}).get(snap_key) for key, snap_key in PEAKS})
    counters0, counters1 = (before or {}).get("counters", {}), (after or {}).get("counters", {})
    if "dispatch_s" in counters0 and "dispatch_s" in counters1:  # the master's own time deciding (host seconds)
        out["master_dispatch_s"] = counters1["dispatch_s"] - counters0["dispatch_s"]
    tok0, tok1 = (before or {}).get("tokenizer"), (after or {}).get("tokenizer")
    if tok0 and tok1:
        for key in ("tokenizer_s", "tokenizer_calls"):
            out[key] = tok1[key] - tok0[key]
    return out


def block_size_of(snap: dict | None) -> int | None:
    """The server's KV block size, where its state says it."""
    value = (snap or {}).get("block_size")
    return value if isinstance(value, int) and value > 0 else None


def prefix_reuse(items: list[WorkItem], block_size: int, hit_rate: float | None) -> dict:
    """The ideal hit rate of the workload at the server's block size, and how much of
    it the run achieved."""
    ideal = ideal_hit_rate(items, block_size)
    return {"ideal_kv_hit_rate": ideal,
            "kv_hit_fraction_of_ideal": hit_rate / ideal if hit_rate is not None and ideal else None}


def overrun_warning(summary: dict) -> str | None:
    """A line to print when the emulator overran in more than 1 % of the steps."""
    frac = summary.get("emulation_overrun_fraction")
    if frac is None or frac <= OVERRUN_WARN:
        return None
    return (f"the emulator overran its modelled time in {frac:.1%} of steps: latencies are partly the host's "
            "(raise --time-scale)")
