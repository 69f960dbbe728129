"""`omniray bench chaos --faults none --duration S`: a soak.

A closed loop of streaming requests runs through the real server for S
seconds with no fault, while every process of the Ray session (GCS, raylet,
the Serve proxy and replicas, the master, engines and NPU actors) has its
resident memory sampled. After a warm-up, a leak shows as growth: each
process's RSS at the end against its RSS when the warm-up ended. Latency
drift shows as the p99 of each window of the run after the warm-up, against
the first. The load generator itself (this process) is not counted: it keeps
every request's result.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

from cluster.bench.loadgen import BackgroundLoad, LoadConfig, RequestResult
from cluster.bench.report import _pct
from cluster.bench.serve import local_server
from cluster.bench.workloads import make_workload

RAY_DAEMONS = ("gcs_server", "raylet")


def _label(proc: psutil.Process) -> str | None:
    """A Ray process's name ("ray::NPUActor", "raylet"...), None for any other process.
    A worker's title names the method it runs now: only the class is kept."""
    try:
        name, cmd = proc.name(), proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    title = cmd[0] if cmd else name
    if title.startswith("ray::"):
        return title.split(".")[0].split(" ")[0]
    return name if name in RAY_DAEMONS else None


@dataclass
class RSSSampler:
    """Samples the RSS of every process of the local Ray session every `interval_s`, on a thread."""

    interval_s: float = 10.0
    samples: dict[int, list[tuple[float, int]]] = field(default_factory=dict)  # pid -> [(t, rss bytes)]
    labels: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self, t: float) -> None:
        """The Ray session this process started: its descendants (GCS, raylet, the workers)."""
        for proc in psutil.Process().children(recursive=True):
            label = _label(proc)
            if label is None:
                continue
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.labels.setdefault(proc.pid, label)
            self.samples.setdefault(proc.pid, []).append((t, rss))

    def start(self, t0: float) -> None:
        def loop():
            while not self._stop.is_set():
                self.sample(time.perf_counter() - t0)
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self, t0: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample(time.perf_counter() - t0)

    def growth(self, warmup_s: float) -> list[dict]:
        """Per process alive through the run: RSS when the warm-up ended, at the end, and
        the growth in between (largest first)."""
        rows = []
        for pid, series in self.samples.items():
            after = [(t, rss) for t, rss in series if t >= warmup_s]
            if len(after) < 2 or series[0][0] > warmup_s:  # started after the warm-up: no baseline
                continue
            start, end = after[0][1], after[-1][1]
            rows.append({"process": self.labels[pid], "pid": pid, "rss_mb_warm": round(start / 2**20, 1),
                         "rss_mb_end": round(end / 2**20, 1), "rss_mb_max": round(max(r for _, r in after) / 2**20, 1),
                         "growth_pct": round(100.0 * (end - start) / start, 2)})
        return sorted(rows, key=lambda r: -r["growth_pct"])


def _windows(results: list[RequestResult], warmup_s: float, end_s: float, n: int) -> list[dict]:
    """The p99 end-to-end latency of the requests that started in each of n equal
    windows after the warm-up."""
    width = (end_s - warmup_s) / n
    out = []
    for k in range(n):
        lo, hi = warmup_s + k * width, warmup_s + (k + 1) * width
        e2e = [r.e2e_s for r in results if r.ok and lo <= r.start_s < hi]
        out.append({"from_s": round(lo, 1), "to_s": round(hi, 1), "requests": len(e2e), "p99_e2e_s": _pct(e2e, 99)})
    return out


def run_soak(manifest, duration_s: float, concurrency: int = 8, output_len: int = 48, seed: int = 0,
             warmup_s: float | None = None, sample_s: float = 10.0, windows: int = 4,
             address: str | None = None, console=None) -> dict:
    """Load for `duration_s` with no fault; RSS of every Ray process and p99 per window."""
    if duration_s <= 0:
        raise ValueError(f"duration: must be > 0 seconds (got {duration_s})")
    warmup_s = min(60.0, duration_s / 5) if warmup_s is None else warmup_s
    if not 0 <= warmup_s < duration_s:
        raise ValueError(f"warmup: must be in [0, duration) (got {warmup_s} of {duration_s} s)")
    items = make_workload("random", 256, seed=seed, token_range=(16, min(manifest.model.vocab_size, 512)),
                          input_len=32, output_len=output_len)
    say = console.print if console is not None else (lambda *_: None)
    sampler = RSSSampler(sample_s)
    with local_server(manifest, address) as server:
        with BackgroundLoad(items, LoadConfig(server.url, concurrency=concurrency, seed=seed)) as load:
            sampler.start(load.t0)
            try:
                while load.elapsed() < duration_s:
                    time.sleep(min(30.0, max(0.0, duration_s - load.elapsed())))
                    say(f"{load.elapsed():7.0f} s of {duration_s:.0f} s")
            finally:
                sampler.stop(load.t0)
    results: list[RequestResult] = load.results
    rows = sampler.growth(warmup_s)
    per_window = _windows(results, warmup_s, duration_s, windows)
    p99s = [w["p99_e2e_s"] for w in per_window if w["p99_e2e_s"] is not None]
    return {
        "manifest": manifest.name, "duration_s": duration_s, "warmup_s": warmup_s, "concurrency": concurrency,
        "sent": len(results), "completed": sum(r.ok for r in results), "failed": sum(not r.ok for r in results),
        "processes": rows, "max_growth_pct": max((r["growth_pct"] for r in rows), default=None),
        "windows": per_window, "p99_drift": (p99s[-1] / p99s[0]) if len(p99s) >= 2 and p99s[0] else None,
        "rss_series": {f"{sampler.labels[pid]} [{pid}]": [(round(t, 1), round(rss / 2**20, 1)) for t, rss in s]
                       for pid, s in sampler.samples.items()},
    }


def print_soak(summary: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"bench chaos --faults none: {summary['manifest']}, {summary['duration_s']:.0f} s "
                    f"(warm-up {summary['warmup_s']:.0f} s)")
    for col in ("process", "RSS warm (MiB)", "RSS end (MiB)", "max (MiB)", "growth %"):
        t.add_column(col, justify="left" if col == "process" else "right")
    for r in summary["processes"]:
        t.add_row(r["process"], f"{r['rss_mb_warm']:.1f}", f"{r['rss_mb_end']:.1f}", f"{r['rss_mb_max']:.1f}",
                  f"{r['growth_pct']:+.2f}")
    console.print(t)
    w = Table(title="p99 end-to-end latency per window after the warm-up")
    for col in ("window (s)", "requests", "p99 e2e (s)"):
        w.add_column(col, justify="right")
    for x in summary["windows"]:
        p99 = "-" if x["p99_e2e_s"] is None else f"{x['p99_e2e_s']:.3f}"
        w.add_row(f"{x['from_s']:.0f}-{x['to_s']:.0f}", str(x["requests"]), p99)
    console.print(w)
    drift = summary["p99_drift"]
    console.print(f"sent {summary['sent']}, completed {summary['completed']}, failed {summary['failed']}; "
                  f"largest growth {summary['max_growth_pct']}%; p99 last/first window "
                  f"{'-' if drift is None else f'{drift:.2f}'}")
