"""`omniray bench chaos`: faults under load lose no accepted request.

A closed loop of streaming requests runs through the real server while, one
after another with `phase_s` seconds between them, the faults asked for strike:
an NPU actor of an instance, the global KV cache actor, the master, the cluster
controller. Every request is sorted into: rejected (429/503 before it was
accepted), failed (accepted but not completed with all its tokens) and
completed. Requests that were in flight when a fault struck give the fault-time
p99 latency, the others the steady p99. The controller's health check rebuilds
the broken instance; the KV cache actor, the master and the controller restart
by themselves (the controller's NPUs are the keeper's: they outlive it, and it
finds them again). The NPUs the server holds (serving, reserve, standby) are
counted before the first fault and again once it has recovered from the last:
`npus_before`, `npus_after`.
"""

from __future__ import annotations

import time

import ray

from cluster.bench.loadgen import BackgroundLoad, LoadConfig, RequestResult
from cluster.bench.report import _pct
from cluster.bench.serve import local_server
from cluster.bench.workloads import make_workload

FAULTS = ("npu", "kv_cache", "master", "controller")
RECOVERY_WAIT_S = 120.0  # after the last phase, how long the server may take to be whole again


def _kill(server, fault: str) -> str:
    """Kill one actor of the running server; returns what was killed."""
    from actors.kv_cache import KV_CACHE_NAME
    from cluster.launcher import NAMESPACE

    if fault == "npu":
        inst = ray.get(server.controller.describe.remote())["instances"][0]["name"]
        npus = ray.get(server.controller.npu_handles.remote(inst))
        ray.kill(npus[0])  # no restart: the instance is rebuilt on new NPUs
        return f"{inst}.npu0"
    if fault == "kv_cache":
        ray.kill(ray.get_actor(KV_CACHE_NAME, namespace=NAMESPACE), no_restart=False)
        return KV_CACHE_NAME
    if fault == "master":
        ray.kill(server.master, no_restart=False)
        return "master"
    if fault == "controller":
        ray.kill(server.controller, no_restart=False)
        return "controller"
    raise ValueError(f"faults: unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")


def _events(server) -> list[dict]:
    """The controller's event log (none while it does not answer)."""
    try:
        return ray.get(server.controller.describe.remote(), timeout=30)["events"]
    except ray.exceptions.RayError:
        return []


def count_npus(view: dict) -> int:
    """The NPUs a server holds, by its controller's view: serving, reserve, standby."""
    return sum(i["npus"] + i["reserve_npus"] for i in view["instances"]) + view["standby_npus"]


def _recovered(server, timeout_s: float = RECOVERY_WAIT_S) -> tuple[int | None, float | None]:
    """Once the server is whole again (the controller answers, every instance is
    healthy, the standby pool is full and warm): the NPUs it holds, and the
    seconds that took; (None, None) if it is not within `timeout_s`."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        try:
            view = ray.get(server.controller.describe.remote(), timeout=30)
            healthy = all(r["healthy"] for r in ray.get(server.master.snapshot.remote(), timeout=30)["instances"])
        except ray.exceptions.RayError:
            view, healthy = None, False
        standby = server.manifest.elastic.standby_npus
        if view and healthy and view["standby_npus"] == standby and not view["standby_warming"]:
            return count_npus(view), time.perf_counter() - t0
        time.sleep(0.2)
    return None, None


def _rejected(r: RequestResult) -> bool:
    return r.error.startswith("HTTP 429") or r.error.startswith("HTTP 503")


def run_chaos_bench(manifest, faults: list[str], concurrency: int = 8, phase_s: float = 5.0, output_len: int = 48,
                    seed: int = 0, address: str | None = None, console=None) -> dict:
    for f in faults:
        if f not in FAULTS:
            raise ValueError(f"faults: unknown fault {f!r}; expected one of {', '.join(FAULTS)}")
    if "kv_cache" in faults and not manifest.engine.global_kv_cache:
        raise ValueError(f"faults: kv_cache needs a global KV cache; manifest {manifest.name} has "
                         f"engine.global_kv_cache: false")
    items = make_workload("random", 256, seed=seed, token_range=(16, min(manifest.model.vocab_size, 512)),
                          input_len=32, output_len=output_len)
    say = console.print if console is not None else (lambda *_: None)
    with local_server(manifest, address) as server:
        record, events = [], []
        with BackgroundLoad(items, LoadConfig(server.url, concurrency=concurrency, seed=seed)) as load:
            npus_before = count_npus(ray.get(server.controller.describe.remote()))
            for fault in faults:
                time.sleep(phase_s)
                if fault == "controller":  # its event log does not survive it: read it first
                    events += _events(server)
                at = load.elapsed()
                what = _kill(server, fault)
                say(f"{at:6.1f} s: killed {what}")
                record.append({"fault": fault, "killed": what, "at_s": at})
            time.sleep(phase_s)
            npus_after, recovery_s = _recovered(server)
        events += _events(server)

    results: list[RequestResult] = load.results
    want = {i: items[i % len(items)].max_tokens for i in range(len(results) + concurrency)}
    rejected = [r for r in results if _rejected(r)]
    accepted = [r for r in results if not _rejected(r)]
    completed = [r for r in accepted if r.ok and r.output_tokens == want[r.index]]
    def struck(r):
        return any(r.start_s <= f["at_s"] <= r.start_s + r.e2e_s for f in record)

    steady = [r.e2e_s for r in completed if not struck(r)]
    hit = [r.e2e_s for r in completed if struck(r)]
    return {
        "manifest": manifest.name, "sent": len(results), "accepted": len(accepted), "completed": len(completed),
        "failed": len(accepted) - len(completed), "rejected": len(rejected), "faults": record,
        "p99_latency_s_steady": _pct(steady, 99), "p99_latency_s_fault": _pct(hit, 99),
        "requests_hit_by_a_fault": len(hit),
        "npus_before": npus_before, "npus_after": npus_after, "recovery_s": recovery_s,
        "rebuilds": [e for e in events if e["action"] == "rebuild"],
        "controller_restarts": [e for e in events if e["action"] == "recover"],
        "errors": sorted({r.error[:160] for r in accepted if r not in completed})[:5],
    }


def print_chaos(summary: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"bench chaos: {summary['manifest']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("sent", "accepted", "completed", "failed", "rejected", "requests_hit_by_a_fault",
                "p99_latency_s_steady", "p99_latency_s_fault", "npus_before", "npus_after", "recovery_s"):
        v = summary[key]
        t.add_row(key, "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
    for f in summary["faults"]:
        t.add_row(f"killed at {f['at_s']:.1f} s", f["killed"])
    console.print(t)
