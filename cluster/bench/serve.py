"""`omniray bench serve`: a workload against an OpenAI-compatible server —
the one at `--url`, or an OmniRay server this command starts from a manifest
(embedded local Ray) and tears down afterwards."""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass

from cluster.bench.clock import Clock
from cluster.bench.loadgen import LoadConfig, cluster_stats, run_load
from cluster.bench.report import SLO, plot, summarize, to_table, write_json, write_parquet
from cluster.bench.server_view import (DEFAULT_BLOCK_SIZE, block_size_of, overrun_warning, prefix_reuse,
                                       server_figures)
from cluster.bench.workloads import WorkItem

STATS_SETTLE_S = 1.0  # the master publishes engine counters every ~0.1 s; slaves poll every 0.2 s


@dataclass
class ServeBenchResult:
    summary: dict
    table: object  # pyarrow.Table, one row per request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_server(manifest, address: str | None = None, port: int | None = None, keep_serve: bool = False):
    """An OmniRay server of `manifest` on `port` (default: a free one), for the length
    of the block. `keep_serve`: Ray Serve stays up afterwards (a next server on the same
    port skips its ~5 s start; the caller shuts Serve down)."""
    from cluster.launcher import connect
    from cluster.server import start_server

    connect(address, log_to_driver=False)  # the replicas' access logs would drown the progress bar
    server = start_server(manifest, port=port or free_port())
    try:
        yield server
    finally:
        server.shutdown(stop_serve=not keep_serve)


def run_serve_bench(items: list[WorkItem], cfg: LoadConfig, slo: SLO | None = None, console=None,
                    label: str = "requests", clock: Clock = Clock(), block_size: int | None = None) -> ServeBenchResult:
    """Run the workload once (its arrivals and cfg's rate already on `clock`); the
    summary is computed from the per-request table and the server's state before and
    after, in the clock's unit (SLO bounds too). `block_size`: the server's, for the
    ideal hit rate (None: what its state says, else the default)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    before = asyncio.run(cluster_stats(cfg))
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=console is None) as progress:
        task = progress.add_task(label, total=len(items))
        results, wall_s = asyncio.run(run_load(items, cfg, on_done=lambda _: progress.advance(task)))
    after = None
    if before is not None:  # a state published once the engines' counters include the run
        after = asyncio.run(cluster_stats(cfg, newer_than=time.time() + STATS_SETTLE_S))
        if after is None and console is not None:
            console.print("[yellow]the server's /v1/cluster did not update after the run: "
                          "KV hit rate, overrun and tokenizer figures left out[/yellow]")
    table = to_table(results)
    summary = summarize(table, wall_s, clock.wall_slo(slo))
    summary.update(server_figures(before, after))
    block_size = block_size or block_size_of(before) or DEFAULT_BLOCK_SIZE
    summary.update(prefix_reuse(items, block_size, summary["kv_hit_rate"]))
    summary = clock.report(summary)
    if console is not None and (warning := overrun_warning(summary)):
        console.print(f"[yellow]{label}: {warning}[/yellow]")
    return ServeBenchResult(summary, table)


def write_outputs(result: ServeBenchResult, out: str | None, plot_path: str | None, json_path: str | None,
                  title: str = "omniray bench serve") -> None:
    if out:
        write_parquet(result.table, out)
    if plot_path:
        plot(result.table, plot_path, title)
    if json_path:
        write_json(result.summary, json_path)
