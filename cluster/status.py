"""`omniray status`: a live terminal view of a running OmniRay server — its
instances, NPUs with HBM bars, the master's queue, the KV cache and expert load —
from the same state `GET /v1/cluster` returns (over HTTP with `--url`, or read
from the master's published snapshot when joining the Ray cluster)."""

from __future__ import annotations

import asyncio
import time

import httpx
from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from actors.expert_map import imbalance_score
from cluster.metrics import device_loads


def fetch_http(url: str, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(f"{url.rstrip('/').removesuffix('/v1')}/v1/cluster", headers=headers, timeout=10)
    if resp.status_code != 200:
        raise RuntimeError(f"{url}: GET /v1/cluster answered {resp.status_code}: {resp.text[:200]}")
    return resp.json()


def fetch_ray(address: str | None) -> dict:
    """The master's latest published snapshot, read through the object store."""
    import ray

    from actors.kv_cache import KV_CACHE_NAME
    from cluster.controller import CONTROLLER_NAME
    from cluster.launcher import NAMESPACE, connect
    from cluster.proxy.master import MASTER_NAME, fetch_published

    connect(address or "auto", log_to_driver=False)
    try:
        master = ray.get_actor(MASTER_NAME, namespace=NAMESPACE)
    except ValueError:
        raise RuntimeError(f"no OmniRay master in namespace {NAMESPACE!r} of this Ray cluster (is `omniray serve` "
                           "running?)") from None
    # the published state; a master that has published none yet (or whose read failed) is asked directly
    snap = asyncio.run(fetch_published(master, 10.0)) or ray.get(master.snapshot.remote(), timeout=10)
    try:
        snap["kv_cache"] = ray.get(ray.get_actor(KV_CACHE_NAME, namespace=NAMESPACE).stats.remote(), timeout=10)
    except ValueError:
        snap["kv_cache"] = None
    try:
        snap["elastic"] = ray.get(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE).elastic_view.remote(),
                                  timeout=10)
    except ValueError:
        snap["elastic"] = None
    return snap


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def render(snap: dict):
    """The cluster view as rich renderables."""
    head = (f"policy [bold]{snap.get('policy')}[/bold]  P/D {snap.get('pd_mode')}  "
            f"queue {snap.get('queue_length')}/{snap.get('max_queue')} (decode {snap.get('decode_queue_length', 0)})  "
            f"paused {snap.get('paused')}  counters {snap.get('counters')}")
    inst = Table(title="instances", expand=True)
    for col in ("instance", "role", "healthy", "running", "waiting", "in flight", "queued tokens", "free KV blocks",
                "cached prefixes", "expert imbalance (per layer)"):
        inst.add_column(col)
    npus = Table(title="NPUs", expand=True)
    for col in ("npu", "device", "HBM", "used GiB", "of GiB", "experts held"):
        npus.add_column(col)
    for i in snap.get("instances", []):
        e = i.get("engine") or {}
        free = e.get("free_blocks") or []
        total = e.get("total_blocks") or []
        loads = device_loads(i.get("npus", []))
        imb = " ".join(f"{imbalance_score(v):.2f}" for _, v in sorted(loads.items())) or "-"
        inst.add_row(i["name"], i["role"], "yes" if i["healthy"] else "[red]no[/red]", str(e.get("running", "-")),
                     str(e.get("waiting", "-")), str(i.get("inflight", 0)), str(i.get("queued_tokens", "-")),
                     f"{min(free)}/{min(total)}" if free and total else "-", str(i.get("cached_prefix_blocks", 0)), imb)
        for n in i.get("npus", []):
            hbm = n.get("hbm", {})
            used, cap = hbm.get("used", 0), hbm.get("capacity", 1)
            held = sum(len(v) for v in n.get("experts", {}).values())
            npus.add_row(str(n.get("name")), str(n.get("device")), ProgressBar(total=cap, completed=used, width=30),
                         _gib(used), _gib(cap), f"{held} over {len(n.get('experts', {}))} layers")
    kv = snap.get("kv_cache")
    kv_line = "global KV cache: off" if not kv else (
        f"global KV cache: {kv['blocks']} blocks, {_gib(kv['bytes'])} of {_gib(kv['capacity_bytes'])} GiB, "
        f"hits {kv['hits']}, misses {kv['misses']}, evictions {kv['evictions']}")
    el = snap.get("elastic")
    reserve = ", ".join(f"{k} {v}" for k, v in (el or {}).get("reserve_npus", {}).items() if v)
    el_line = "elastic: no controller" if not el else (
        f"elastic: {el['standby_npus']} standby NPUs ({el['standby_warming']} warming), "
        f"reserve: {reserve or 'none'}")
    return Panel(Group(head, inst, npus, kv_line, el_line), title=f"OmniRay {snap.get('model', '')}")




def watch(fetch, console, interval_s: float = 1.0, once: bool = False) -> None:
    if once:
        console.print(render(fetch()))
        return
    from rich.live import Live

    with Live(render(fetch()), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval_s)
            live.update(render(fetch()))
