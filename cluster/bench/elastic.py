"""`omniray bench elastic`: ElasticMoE's scale-up latency and throughput while scaling.

Under a steady closed-loop load through the real HTTP server, one instance is
scaled from its EP size to a larger one and back; then, as the baseline, a new
instance of the larger size is cold-started (new NPU actors, weights built from
scratch and put into the object store, a fresh engine) and timed to its first
step. Reported:

- scale_up_s / scale_down_s: the command to the first step on the new size
  (cluster.elastic.resize: new NPUs loaded, experts staged, the switch, one step);
- cold_start_s: the same for the cold start;
- throughput_before / during / after: output tokens per second the clients
  received in the steady phase, inside the two scaling windows, and after;
- requests, failed: every request sent, and those that did not complete.

The standby pool (`elastic.standby_npus` of the manifest, by default as many as
the scale-up adds) is part of what is measured: it is how ElasticMoE-style
systems avoid starting processes on the critical path. `--standby 0` measures
the scale-up with actors started on demand instead.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass

import ray

from cluster.bench.loadgen import LoadConfig, RequestResult, run_closed_loop, token_times
from cluster.bench.serve import local_server
from cluster.bench.workloads import make_workload


@dataclass
class ElasticBenchConfig:
    instance: str | None = None  # default: the first decode (else mixed) instance
    to_ep: int | None = None  # default: twice its EP size
    concurrency: int = 8
    phase_s: float = 6.0  # steady seconds before, between and after the two scale events
    input_len: int = 32
    output_len: int = 64
    standby: int | None = None  # warm NPU actors; default: as many as the scale-up adds
    seed: int = 0


def _window_rate(times: list[float], start: float, end: float) -> float | None:
    if end <= start:
        return None
    return sum(start <= t < end for t in times) / (end - start)


def cold_start(manifest, instance_spec, ep: int) -> float:
    """Seconds from nothing to the first step of a new instance of `ep` NPUs:
    new actors, weights built from scratch (real compute) or charged (emulated),
    a fresh engine, one token generated."""
    from actors.engine.scheduler import SchedulerConfig
    from actors.protocol import EngineRequest
    from cluster.launcher import launch_engine, launch_instance, publish_weights

    eng = manifest.engine
    t0 = time.perf_counter()
    refs = publish_weights(manifest.model, manifest.checkpoint) if manifest.compute == "real" else None
    inst = launch_instance(f"cold-{uuid.uuid4().hex[:6]}", manifest.model, ep, manifest.compute, manifest.device, refs,
                           role="mixed", backend=manifest.collective_backend, time_scale=manifest.time_scale,
                           block_size=eng.block_size, kv_blocks=eng.kv_blocks, placement=instance_spec.placement)
    try:
        launch_engine(inst, SchedulerConfig(eng.max_num_seqs, eng.max_num_batched_tokens, eng.block_size))

        async def first_token():
            async for ref in inst.engine.generate.remote(EngineRequest("cold-start", [7, 8, 9], max_tokens=1)):
                await ref

        asyncio.run(first_token())
        return time.perf_counter() - t0
    finally:
        inst.shutdown()


def run_elastic_bench(manifest, cfg: ElasticBenchConfig, address: str | None = None, console=None) -> dict:
    roles = {i.name: i for i in manifest.instances}
    name = cfg.instance or next((i.name for i in manifest.instances if i.role == "decode"),
                                next((i.name for i in manifest.instances if i.role == "mixed"), None))
    if name not in roles:
        raise ValueError(f"instance: {name!r} is not in the manifest (have {', '.join(roles)})")
    from_ep = roles[name].ep
    to_ep = cfg.to_ep or from_ep * 2
    if to_ep <= from_ep:
        raise ValueError(f"to_ep: {to_ep} must be above the instance's EP size {from_ep}")
    manifest = manifest.model_copy(deep=True)
    manifest.elastic.standby_npus = to_ep - from_ep if cfg.standby is None else cfg.standby
    vocab = manifest.model.vocab_size
    items = make_workload("random", 256, seed=cfg.seed, token_range=(16, min(vocab, 512)),
                          input_len=cfg.input_len, output_len=cfg.output_len)
    say = console.print if console is not None else (lambda *_: None)

    with local_server(manifest, address) as server:
        load = LoadConfig(server.url, concurrency=cfg.concurrency, seed=cfg.seed)
        stop, clock, out = threading.Event(), {}, {}
        runner = threading.Thread(target=lambda: out.setdefault("results", asyncio.run(
            run_closed_loop(items, load, stop.is_set, lambda t0: clock.setdefault("t0", t0)))))
        runner.start()
        try:
            while "t0" not in clock:
                time.sleep(0.01)
            t0 = clock["t0"]
            time.sleep(cfg.phase_s)
            say(f"scaling {name}: EP {from_ep} -> {to_ep}")
            up_start = time.perf_counter() - t0
            up = ray.get(server.controller.scale.remote(name, to_ep))
            up_end = time.perf_counter() - t0
            time.sleep(cfg.phase_s)
            say(f"scaling {name}: EP {to_ep} -> {from_ep}")
            down_start = time.perf_counter() - t0
            down = ray.get(server.controller.scale.remote(name, from_ep))
            down_end = time.perf_counter() - t0
            time.sleep(cfg.phase_s)
            end = time.perf_counter() - t0
        finally:
            stop.set()
            runner.join()
        say("cold start of the same instance (the baseline)")
        cold_s = cold_start(manifest, roles[name], to_ep)

    results: list[RequestResult] = out["results"]
    times = sorted(t for r in results if r.ok for t in token_times(r))
    during_tokens = sum(up_start <= t < up_end or down_start <= t < down_end for t in times)
    during_s = (up_end - up_start) + (down_end - down_start)
    warmup = min(1.0, cfg.phase_s / 4)  # the first requests' prefills are not steady state
    summary = {
        "manifest": manifest.name, "instance": name, "from_ep": from_ep, "to_ep": to_ep,
        "standby_npus": manifest.elastic.standby_npus,
        "scale_up_s": up["total_s"], "scale_down_s": down["total_s"], "cold_start_s": cold_s,
        "scale_up_vs_cold_start": cold_s / up["total_s"],
        "pause_up_s": up["pause_s"], "pause_down_s": down["pause_s"], "prepare_up_s": up["prepare_s"],
        "migrated_down": down["migrated"],
        "throughput_before": _window_rate(times, warmup, up_start),
        "throughput_during": during_tokens / during_s if during_s > 0 else None,
        "throughput_after": _window_rate(times, down_end, end),
        "requests": len(results), "failed": sum(not r.ok for r in results),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    before = summary["throughput_before"]
    summary["during_vs_before"] = summary["throughput_during"] / before if before else None
    return summary


def print_elastic(summary: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"bench elastic: {summary['manifest']} {summary['instance']} "
                    f"EP {summary['from_ep']} -> {summary['to_ep']} -> {summary['from_ep']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("scale_up_s", "scale_down_s", "cold_start_s", "scale_up_vs_cold_start", "pause_up_s", "pause_down_s",
                "throughput_before", "throughput_during", "throughput_after", "during_vs_before", "requests", "failed"):
        v = summary.get(key)
        t.add_row(key, "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(t)
