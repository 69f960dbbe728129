"""What a run did inside the server, read off OmniRay's /v1/cluster before and
after it: counters are diffed (the server may have served before), peaks are
read from the state after. Any figure whose keys a server does not publish is
unknown (None), never a crash: other servers, and older OmniRays, lack them."""

from __future__ import annotations

from cluster.bench.workloads import WorkItem, ideal_hit_rate

DEFAULT_BLOCK_SIZE = 16  # EngineSettings' default, for a server that does not say its own
OVERRUN_WARN = 0.01  # above this share of steps, the emulator's latencies are partly the host's
HOST_GAP_WARN = 0.10  # above this share of the engines' busy wall time, the chips idled for the host
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


def host_gap_fraction(before: dict | None, after: dict | None) -> float | None:
    """Wall time the engines spent between two steps while they had work / that
    time plus the steps' own: the share of an instance's busy time its emulated
    NPUs idled for the host (scheduling, results, KV events: a few ms a step on
    a real host; on an overloaded one, far more, and device time stretches with it)."""
    gap, steps = _delta(before, after, "host_gap_s"), _delta(before, after, "step_wall_s")
    return gap / (gap + steps) if gap is not None and steps is not None and gap + steps > 0 else None


def server_figures(before: dict | None, after: dict | None) -> dict:
    """The run's figures from the server: hit rate, emulator overruns, preemptions
    (a preempted request that finds its own blocks again counts them as cached:
    a hit rate above the ideal), queue-wait peaks and the starvation bound, and
    (when known) the tokenizer's work."""
    out = {"kv_hit_rate": kv_hit_rate(before, after), "emulation_overrun_fraction": overrun_fraction(before, after),
           "emulation_host_gap_fraction": host_gap_fraction(before, after), "preemptions": _delta(before, after, "preemptions")}
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
    """A line to print when the emulator overran in more than 1 % of the steps, or
    its chips idled for the host more than 10 % of their busy time."""
    lines = []
    frac = summary.get("emulation_overrun_fraction")
    if frac is not None and frac > OVERRUN_WARN:
        lines.append(f"the emulator overran its modelled time in {frac:.1%} of steps")
    gap = summary.get("emulation_host_gap_fraction")
    if gap is not None and gap > HOST_GAP_WARN:
        lines.append(f"the emulated NPUs idled {gap:.1%} of their busy time waiting for the host between steps")
    if not lines:
        return None
    return "; ".join(lines) + ": latencies are partly the host's (raise --time-scale)"
