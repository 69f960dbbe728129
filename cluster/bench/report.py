"""Results of a load run: the summary (percentiles, throughput, goodput under an
SLO), the per-request table as parquet, and the plot. The summary is computed
from the same table the parquet file holds, so the two always agree."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.bench.loadgen import RequestResult


LATENCY_KEYS = (  # summary keys in seconds of the run's clock (device seconds: cluster.bench.clock)
    *(f"{m}_p{q}_s" for m in ("ttft", "tpot", "e2e") for q in (50, 90, 99)),
    "itl_p50_s", "itl_p99_s", "ttft_p50_short_third_s", "max_queue_wait_s", "max_decode_queue_wait_s",
)
RATE_KEYS = ("request_per_s", "output_tok_per_s", "goodput_req_per_s")  # per second of the run's clock


@dataclass(frozen=True)
class SLO:
    """A request is good if it finished and met every bound given (None: no bound).
    A one-token answer has no time per output token, so it cannot miss the TPOT
    bound (as vLLM's goodput counts it); without a TTFT or E2E it misses those."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def met(self, row: dict) -> bool:
        if row["error"]:
            return False
        if self.tpot_s is not None and row["tpot_s"] is not None and row["tpot_s"] > self.tpot_s:
            return False
        return all(bound is None or (row[key] is not None and row[key] <= bound)
                   for key, bound in (("ttft_s", self.ttft_s), ("e2e_s", self.e2e_s)))


def to_table(results: list[RequestResult]) -> pa.Table:
    return pa.table({
        "index": [r.index for r in results],
        "group": [r.group for r in results],
        "start_s": [r.start_s for r in results],
        "prompt_tokens": [r.prompt_tokens for r in results],
        "output_tokens": [r.output_tokens for r in results],
        "ttft_s": pa.array([r.ttft_s for r in results], pa.float64()),
        "tpot_s": pa.array([r.tpot_s for r in results], pa.float64()),
        "e2e_s": pa.array([r.e2e_s for r in results], pa.float64()),
        "itl_s": pa.array([r.itl_s for r in results], pa.list_(pa.float64())),
        "cached_tokens": pa.array([r.cached_tokens for r in results], pa.int64()),
        "error": [r.error for r in results],
    })


def write_parquet(table: pa.Table, path: str) -> None:
    pq.write_table(table, path)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(table: pa.Table, wall_s: float, slo: SLO | None = None) -> dict:
    """The summary of one run, from the client's side (keys documented in the README;
    the server's figures are added by cluster.bench.server_view)."""
    rows = table.to_pylist()
    ok = [r for r in rows if not r["error"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    summary = {
        "requests": len(rows),
        "completed": len(ok),
        "failed": len(rows) - len(ok),
        "wall_s": wall_s,
        "request_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tok_per_s": out_tokens / wall_s if wall_s > 0 else None,
        "input_tokens": sum(r["prompt_tokens"] for r in ok),
        "output_tokens": out_tokens,
    }
    for metric in ("ttft_s", "tpot_s", "e2e_s"):
        values = [r[metric] for r in ok if r[metric] is not None]
        for q in (50, 90, 99):
            summary[f"{metric[:-2]}_p{q}_s"] = _pct(values, q)
    itl = [g for r in ok for g in r["itl_s"]]
    summary["itl_p50_s"], summary["itl_p99_s"] = _pct(itl, 50), _pct(itl, 99)
    summary["ttft_p50_short_third_s"] = _short_third_ttft(ok)
    if slo is not None:
        good = sum(slo.met(r) for r in rows)
        summary["goodput_req_per_s"] = good / wall_s if wall_s > 0 else None
        summary["slo_attainment"] = good / len(rows) if rows else None
    return summary


def _short_third_ttft(ok: list[dict]) -> float | None:
    """TTFT p50 of the third of the completed requests with the shortest prompts (ties
    by index; at least one): what weighted sorting should bring down, short jobs first."""
    shortest = sorted(ok, key=lambda r: (r["prompt_tokens"], r["index"]))[: -(-len(ok) // 3)]
    return _pct([r["ttft_s"] for r in shortest if r["ttft_s"] is not None], 50)


def write_json(summary: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


def print_summary(summary: dict, console, title: str = "bench serve") -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    unit = "device ms" if summary.get("latency_unit") == "device_s" else "ms"
    for key, value in summary.items():
        if isinstance(value, float):
            if key in LATENCY_KEYS:
                value = f"{value * 1000:.1f} {unit}"
            elif key.endswith("_s") and not key.endswith("per_s") and key != "wall_s":
                value = f"{value * 1000:.1f} ms"
            else:
                value = f"{value:.3f}"
        table.add_row(key, str(value))
    console.print(table)


def plot(table: pa.Table, path: str, title: str = "omniray bench serve") -> None:
    """Latency CDFs (TTFT, TPOT, end to end) and output throughput over time, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.to_pylist() if not r["error"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for metric in ("ttft_s", "tpot_s", "e2e_s"):
        values = np.sort([r[metric] for r in rows if r[metric] is not None])
        if len(values):
            left.plot(values * 1000, np.arange(1, len(values) + 1) / len(values), label=metric[:-2])
    left.set_xlabel("ms")
    left.set_ylabel("fraction of requests")
    left.set_title("latency CDF")
    left.legend()
    ends = [(r["start_s"] + r["e2e_s"], r["output_tokens"]) for r in rows if r["e2e_s"] is not None]
    if ends:
        horizon = max(t for t, _ in ends)
        bins = np.linspace(0, horizon, min(50, max(2, len(ends))) + 1)
        tokens, _ = np.histogram([t for t, _ in ends], bins=bins, weights=[n for _, n in ends])
        right.step(bins[1:], tokens / np.diff(bins), where="post")
    right.set_xlabel("time since start (s)")
    right.set_ylabel("output tokens/s (by completion time)")
    right.set_title("throughput over time")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
