"""`omniray bench elastic`: ElasticMoE's scale-up latency and throughput while scaling.

Under a steady closed-loop load through the real HTTP server, one instance is
scaled from its EP size to a larger one and back, `cycles` times; then, as the
baseline, a new instance of the larger size is cold-started (new NPU actors,
weights built from scratch and put into the object store, a fresh engine) and
timed to its first step. Reported (medians over the cycles where it is a time):

- scale_up_s / scale_down_s: the command to the first step on the new size
  (cluster.elastic.resize: new NPUs loaded, experts staged, the new group
  formed, the switch, one step), scale_up_s over the scale-ups that did that
  (the first, at least); scale_up_back_s over those back to the NPUs the
  scale-down before parked in the standby pool (scaled_back_up of them:
  nothing loaded or formed); modelled_load_up_s, the part of a scale-up
  an emulated NPU sleeps for copying its weights from host memory into HBM
  (the cost model's host link: a standby NPU's experts, the replicated weights
  having been copied while it waited; 0 with real compute);
- cold_start_s: the same for the cold start;
- throughput_before / between / after: output tokens per second the scaled
  instance generated in steady state at the small size, at the large size
  (once the standby pool has refilled: starting processes is not steady
  state) and at the small size again. Counted from its engine's step log on
  the wall clock, not where the clients receive them: a window would lose
  its last step's tokens still in flight, a large bias in a sub-second window;
- throughput_during: the same inside the scaling windows (command to the end
  of the first step on the new size), and during_vs_steady: the tokens there
  against what the instance generates in steady state over the same time —
  the old size's rate until the switch, the new size's after it. What it
  loses is the scaling's: CPU taken by loading, staging and forming the
  group, the switch pause. (On a few-core host more real-compute NPU
  processes can be slower, not faster: during_vs_before mixes that in,
  during_vs_steady does not.)
- during_vs_steady_ci95: a bootstrap 95 % interval of during_vs_steady over
  the windows: how far the figure could move in another run of as many windows;
- serving_lost_s_up / _down: the same loss as seconds of steady serving per scale
  event, which a shorter window does not magnify (a scaling twice as fast with
  the same cost halves during_vs_steady's window, not this);
- control_vs_steady, serving_lost_s_control: the same measurement around a
  command that switches nothing (InstanceEngine.after_steps: it travels as a
  resize's does, and its window closes with the second step after it, as a
  switch's closes with the step after the switch), sent in the middle of
  every steady phase: what the measurement reads where nothing scales, the
  host's noise and the cost of a command reaching the engine. A scaling
  window's loss beyond the control's is the scaling's own;
- serving_lost_after_s_up / _down: the same for the 2 s after each window: what
  the switch leaves behind it (NPUs released, the old group left, standby
  processes started), not part of the window;
- requests, failed: every request sent, and those that did not complete.

The standby pool (`elastic.standby_npus` of the manifest, by default as many as
the scale-up adds) is part of what is measured: it is how ElasticMoE-style
systems avoid starting processes on the critical path. `--standby 0` measures
the scale-up with actors started on demand instead.

`direct`: the same run on the instance alone (its NPUs, its engine fed requests
straight, scaled by cluster.elastic.resize from here): no HTTP server, proxy or
HTTP client, whose CPU on a small host is most of what a scale event competes with."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import ray

from cluster.bench.loadgen import LoadConfig, RequestResult, closed_loop, run_closed_loop
from cluster.bench.serve import local_server
from cluster.bench.workloads import make_workload


@dataclass
class ElasticBenchConfig:
    instance: str | None = None  # default: the first decode (else mixed) instance
    to_ep: int | None = None  # default: twice its EP size
    concurrency: int = 8
    phase_s: float = 6.0  # steady seconds before, between and after the scale events
    # not steady state: the first requests' prefills, and the worker processes Ray
    # starts for the KV cache's first adoptions (seconds of CPU on a small host)
    warmup_s: float = 5.0
    cycles: int = 5  # up-and-down cycles: the windows are short, several give a steadier figure
    input_len: int = 32
    output_len: int = 64
    standby: int | None = None  # warm NPU actors; default: as many as the scale-up adds
    seed: int = 0
    # the instance alone, its engine fed straight (no HTTP server, proxy or HTTP client):
    # what a scale event costs the instance, without the serving stack's CPU beside it
    direct: bool = False


def _tokens(steps: list[tuple[float, int]], start: float, end: float) -> float:
    """Tokens generated in [start, end], each step's spread evenly over its span
    (the previous step's end to its own): a window that opens in the middle of a
    step gets that step's share of it. Counting whole steps by their ends instead
    reads half a step high on average in a window that opens at a random time and
    closes with a step (a scaling window closes with the first step on the new
    size), which is +7-15 % in a 0.15-0.3 s window of 40-50 ms steps."""
    got = 0.0
    for (before, _), (t, n) in zip(steps, steps[1:]):
        if t > start and before < end:
            got += n * (min(t, end) - max(before, start)) / (t - before)
    return got


def _window_rate(steps: list[tuple[float, int]], start: float, end: float) -> float | None:
    return _tokens(steps, start, end) / (end - start) if end > start else None


def _rate_outside(steps: list[tuple[float, int]], start: float, end: float, hole: ScalingWindow | None) -> float | None:
    """The rate over [start, end] without `hole` (a control window inside it)."""
    if hole is None or not start <= hole.start <= hole.end <= end:
        return _window_rate(steps, start, end)
    span = (hole.start - start) + (end - hole.end)
    return (_tokens(steps, start, hole.start) + _tokens(steps, hole.end, end)) / span if span > 0 else None


@dataclass
class ScalingWindow:
    """One scale event on the run's clock: the command, the switch (the end of the
    old size's last step, where the engine's pause starts: the old size serves
    until then), the first step on the new size; the steady rates of the old and
    new size (once measured), and the resize's own report."""

    start: float
    switch: float
    end: float
    rate_old: float | None = None
    rate_new: float | None = None
    info: dict = field(default_factory=dict)


def _steady_tokens(w: ScalingWindow) -> float:
    """What the instance generates in steady state over `w`: the old size's rate up
    to the switch, the new size's from it on."""
    return w.rate_old * (w.switch - w.start) + w.rate_new * (w.end - w.switch)


def during_vs_steady(steps: list[tuple[float, int]], windows: list[ScalingWindow]) -> float | None:
    """Tokens the instance generated inside the scaling windows over what it
    generates in steady state in the same time."""
    if any(w.rate_old is None or w.rate_new is None for w in windows):
        return None
    expected = sum(_steady_tokens(w) for w in windows)
    got = sum(_tokens(steps, w.start, w.end) for w in windows)
    return got / expected if expected > 0 else None


def serving_lost_s(steps: list[tuple[float, int]], windows: list[ScalingWindow]) -> float | None:
    """Mean seconds of steady serving one scale event costs: the tokens a window fell
    short of steady state by, at the window's steady rate. Unlike during_vs_steady it
    does not depend on the window's length: a faster scaling with the same cost
    reads the same here, and a lower ratio there."""
    if not windows or any(w.rate_old is None or w.rate_new is None for w in windows):
        return None
    lost = 0.0
    for w in windows:
        expected = _steady_tokens(w)
        if expected > 0:
            lost += (expected - _tokens(steps, w.start, w.end)) * (w.end - w.start) / expected
    return lost / len(windows)


BOOTSTRAP_RESAMPLES = 2000


def during_vs_steady_ci(steps: list[tuple[float, int]], windows: list[ScalingWindow], level: float = 0.95,
                        seed: int = 0) -> tuple[float, float] | None:
    """A bootstrap interval of during_vs_steady over the windows (resampled with
    replacement, seeded: a rerun on the same log reads the same): a window of a
    few steps reads anywhere from 0.6 to 1.2 on a busy host, and a run has a dozen,
    so the point figure alone does not say whether it is above or below a target."""
    if len(windows) < 2 or any(w.rate_old is None or w.rate_new is None for w in windows):
        return None
    import numpy as np

    got = np.array([_tokens(steps, w.start, w.end) for w in windows])
    expected = np.array([_steady_tokens(w) for w in windows])
    picks = np.random.default_rng(seed).integers(0, len(windows), size=(BOOTSTRAP_RESAMPLES, len(windows)))
    totals = expected[picks].sum(axis=1)
    ratios = got[picks].sum(axis=1)[totals > 0] / totals[totals > 0]
    if not len(ratios):
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


AFTER_S = 2.0  # seconds after a window in which serving_lost_after_s looks for what the switch left behind


def serving_lost_after_s(steps: list[tuple[float, int]], windows: list[ScalingWindow],
                         horizon: float = AFTER_S) -> float | None:
    """Mean seconds of steady serving lost in the `horizon` after each window, at the
    new size's steady rate: what follows the first step on the new size (the
    released NPUs going, the old group left, processes started to refill the
    standby pool), which the window leaves out."""
    if not windows or any(not w.rate_new for w in windows):
        return None
    return sum(horizon - _tokens(steps, w.end, w.end + horizon) / w.rate_new
               for w in windows) / len(windows)


def _launch(manifest, name: str, ep: int, role: str, placement, refs):
    """An instance of the manifest's model and engine settings, its engine started;
    killed if the engine fails to start."""
    from actors.engine.scheduler import SchedulerConfig
    from cluster.launcher import launch_engine, launch_instance

    eng = manifest.engine
    inst = launch_instance(name, manifest.model, ep, manifest.compute, manifest.device, refs, role=role,
                           backend=manifest.collective_backend, time_scale=manifest.time_scale,
                           block_size=eng.block_size, kv_blocks=eng.kv_blocks, placement=placement)
    try:
        launch_engine(inst, SchedulerConfig(eng.max_num_seqs, eng.max_num_batched_tokens, eng.block_size),
                      overlap_steps=eng.overlap_steps)
    except BaseException:
        inst.shutdown()
        raise
    return inst


def _publish(manifest) -> dict | None:
    """The weights in the object store (real compute; emulated NPUs need none)."""
    from cluster.launcher import publish_weights

    return publish_weights(manifest.model, manifest.checkpoint) if manifest.compute == "real" else None


def cold_start(manifest, instance_spec, ep: int) -> float:
    """Seconds from nothing to the first step of a new instance of `ep` NPUs:
    new actors, weights built from scratch (real compute) or charged (emulated),
    a fresh engine, one token generated."""
    from actors.protocol import EngineRequest

    t0 = time.perf_counter()
    inst = _launch(manifest, f"cold-{uuid.uuid4().hex[:6]}", ep, "mixed", instance_spec.placement, _publish(manifest))
    try:
        async def first_token():
            async for ref in inst.engine.generate.remote(EngineRequest("cold-start", [7, 8, 9], max_tokens=1)):
                await ref

        asyncio.run(first_token())
        return time.perf_counter() - t0
    finally:
        inst.shutdown()


@dataclass
class _Target:
    """What the bench drives: scale the instance to an EP size (the resize's report),
    send it the control command (InstanceEngine.after_steps), whether standby NPUs
    are still starting, the instance's step log from a wall-clock time on, and a
    closed-loop load run until stop() (started(t0) gets its clock)."""

    scale: Callable[[int], dict]
    control: Callable[[], list]  # the ends of the instance's next two steps (the control command)
    warming: Callable[[], bool]
    steps_since: Callable[[float], list]
    load: Callable[[Callable[[], bool], Callable[[float], None]], list[RequestResult]]


@contextmanager
def _served(manifest, name: str, items, cfg: ElasticBenchConfig, address: str | None) -> Iterator[_Target]:
    """The whole server: requests over HTTP, scaled through its controller."""
    with local_server(manifest, address) as server:
        load = LoadConfig(server.url, concurrency=cfg.concurrency, seed=cfg.seed)
        yield _Target(
            scale=lambda ep: ray.get(server.controller.scale.remote(name, ep)),
            control=lambda: ray.get(server.controller.after_steps.remote(name, 2)),
            warming=lambda: bool(ray.get(server.controller.describe.remote())["standby_warming"]),
            steps_since=lambda t: ray.get(server.controller.steps_since.remote(name, t)),
            load=lambda stop, started: asyncio.run(run_closed_loop(items, load, stop, started)))


@contextmanager
def _direct(manifest, spec, items, cfg: ElasticBenchConfig, address: str | None) -> Iterator[_Target]:
    """The instance alone: its NPUs, its engine fed EngineRequests straight, a standby
    pool of the manifest's size, scaled by cluster.elastic.resize from here."""
    from cluster.elastic import StandbyPool, resize
    from cluster.launcher import connect

    connect(address, log_to_driver=False)
    refs = _publish(manifest)
    inst = _launch(manifest, f"{spec.name}-direct-{uuid.uuid4().hex[:6]}", spec.ep, spec.role, spec.placement, refs)
    pool = None
    try:
        size = manifest.elastic.standby_npus
        pool = StandbyPool(inst.specs[0], size, refs) if size else None
        yield _Target(
            scale=lambda ep: resize(inst, ep, refs, standby=pool),
            control=lambda: ray.get(inst.engine.after_steps.remote(2)),
            warming=lambda: bool(pool and pool.num_warming()),
            steps_since=lambda t: ray.get(inst.engine.steps_since.remote(t)),
            load=lambda stop, started: asyncio.run(closed_loop(
                lambda i, item, t0: _engine_request(inst.engine, i, item, t0), items, cfg.concurrency, stop, started)))
    finally:
        if pool is not None:
            pool.shutdown()
        inst.shutdown()


async def _engine_request(engine, i: int, item, t0: float) -> RequestResult:
    """One request streamed from the engine actor (loadgen's _one, without HTTP)."""
    from actors.protocol import EngineRequest

    start, first, n, error = time.perf_counter(), None, 0, ""
    try:
        req = EngineRequest(f"elastic-{i}-{uuid.uuid4().hex[:6]}", list(item.prompt_ids),
                            max_tokens=item.max_tokens, ignore_eos=True)
        async for ref in engine.generate.remote(req):
            n += len((await ref).token_ids)
            first = first or (time.perf_counter() if n else None)
    except Exception as err:  # counted as failed, as an HTTP error would be
        error = repr(err)
    end = time.perf_counter()
    return RequestResult(i, item.group, start - t0, len(item.prompt_ids), n, first - start if first else None,
                         (end - first) / (n - 1) if first and n > 1 else None, end - start, error=error)


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

    drive = _direct(manifest, roles[name], items, cfg, address) if cfg.direct else \
        _served(manifest, name, items, cfg, address)
    with drive as target:
        stop, clock, out = threading.Event(), {}, {}
        runner = threading.Thread(target=lambda: out.setdefault(
            "results", target.load(stop.is_set, lambda t0: clock.setdefault("t0", t0))))
        runner.start()
        try:
            while "t0" not in clock:
                time.sleep(0.01)
            wall0 = time.time() - (time.perf_counter() - clock["t0"])  # the run's start, wall clock
            now = lambda: time.time() - wall0  # noqa: E731

            def scale(ep: int) -> ScalingWindow:
                say(f"scaling {name}: EP -> {ep}")
                start = now()
                info = target.scale(ep)
                end = info["first_step_at"] - wall0 if info.get("first_step_at") else now()
                return ScalingWindow(start, min(max(info["switch_at"] - wall0, start), end), end, info=info)

            def control() -> ScalingWindow | None:
                start = now()
                ends = target.control()
                return ScalingWindow(start, ends[0] - wall0, ends[1] - wall0) if None not in ends else None

            def steady_phase() -> ScalingWindow | None:
                """phase_s of steady serving with the control command in its middle."""
                time.sleep(cfg.phase_s / 2)
                window = control()
                time.sleep(cfg.phase_s / 2)
                return window

            cycles, controls = [], []  # controls: per steady phase, small size first, then large, small, ...
            time.sleep(cfg.warmup_s)
            settled = now()
            controls.append(steady_phase())
            for _ in range(cfg.cycles):
                up = scale(to_ep)
                while target.warming():
                    time.sleep(0.1)
                refilled = now()
                controls.append(steady_phase())
                down = scale(from_ep)
                controls.append(steady_phase())
                cycles.append((up, refilled, down))
            end = now()
        finally:
            stop.set()
            runner.join()
        steps = [(t - wall0, n) for t, n in target.steps_since(wall0)]
        say("cold start of the same instance (the baseline)")
        cold_s = cold_start(manifest, roles[name], to_ep)

    results: list[RequestResult] = out["results"]
    # steady phases: small size before each cycle (and after the last), large size inside it;
    # each one's rate leaves its control window out
    small_controls, large_controls = controls[0::2], controls[1::2]
    small = [_rate_outside(steps, settled if i == 0 else cycles[i - 1][2].end,
                           cycles[i][0].start if i < len(cycles) else end, small_controls[i])
             for i in range(len(cycles) + 1)]
    large = [_rate_outside(steps, refilled, down.start, c) for (_, refilled, down), c in zip(cycles, large_controls)]
    controls = [replace(c, rate_old=rate, rate_new=rate)
                for c, rate in zip(controls, [r for pair in zip(small, large + [None]) for r in pair])
                if c is not None]
    windows = [w for i, (up, _, down) in enumerate(cycles)
               for w in (replace(up, rate_old=small[i], rate_new=large[i]),
                         replace(down, rate_old=large[i], rate_new=small[i + 1]))]
    during_s = sum(w.end - w.start for w in windows)
    during_tokens = sum(_tokens(steps, w.start, w.end) for w in windows)
    ups, downs = [c[0] for c in cycles], [c[2] for c in cycles]
    # scale-ups that adopted NPUs and formed a group (the first, at least), apart from those back
    # to the NPUs the previous scale-down parked, which load and form nothing
    adopting, back_ups = [e for e in ups if not e.info.get("back")], [e for e in ups if e.info.get("back")]
    scale_up_s = statistics.median(e.info["total_s"] for e in adopting)
    summary = {
        "manifest": manifest.name, "instance": name, "direct": cfg.direct, "from_ep": from_ep, "to_ep": to_ep,
        "standby_npus": manifest.elastic.standby_npus, "cycles": len(cycles),
        "scale_up_s": scale_up_s, "scale_down_s": statistics.median(e.info["total_s"] for e in downs),
        "cold_start_s": cold_s, "scale_up_vs_cold_start": cold_s / scale_up_s,
        "pause_up_s": statistics.median(e.info["pause_s"] for e in ups),
        "pause_down_s": statistics.median(e.info["pause_s"] for e in downs),
        "prepare_up_s": statistics.median(e.info["prepare_s"] for e in adopting),
        "modelled_load_up_s": statistics.median(e.info["modelled_load_s"] for e in adopting),
        "scale_up_back_s": statistics.median(e.info["total_s"] for e in back_ups) if back_ups else None,
        "scaled_back_up": len(back_ups),  # ups that adopted the NPUs the scale-down before had parked
        "migrated_down": sum(e.info["migrated"] for e in downs),
        "scaled_back": sum(bool(e.info.get("back")) for e in downs),  # downs that reused the pre-scale-up layout
        "refill_s": statistics.median(refilled - up.end for up, refilled, _ in cycles),
        "throughput_before": small[0], "throughput_between": _mean(large), "throughput_after": small[-1],
        "throughput_during": during_tokens / during_s if during_s > 0 else None,
        "during_vs_steady": during_vs_steady(steps, windows),
        "during_vs_steady_ci95": during_vs_steady_ci(steps, windows),  # bootstrap over the windows
        # the same, scale-ups and scale-downs apart (their windows and costs differ)
        "during_vs_steady_up": during_vs_steady(steps, windows[0::2]),
        "during_vs_steady_down": during_vs_steady(steps, windows[1::2]),
        "during_vs_steady_per_window": [during_vs_steady(steps, [w]) for w in windows],
        "serving_lost_s_up": serving_lost_s(steps, windows[0::2]),
        "serving_lost_s_down": serving_lost_s(steps, windows[1::2]),
        # the control command's windows in the steady phases: what the same measurement reads
        # where nothing scales (the host's noise, and the cost of a command reaching the engine)
        "control_vs_steady": during_vs_steady(steps, controls),
        "control_vs_steady_per_window": [during_vs_steady(steps, [c]) for c in controls],
        "serving_lost_s_control": serving_lost_s(steps, controls),
        "serving_lost_after_s_up": serving_lost_after_s(steps, windows[0::2]),
        "serving_lost_after_s_down": serving_lost_after_s(steps, windows[1::2]),
        "requests": len(results), "failed": sum(not r.ok for r in results),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "host_cpus": host_cpus(),
    }
    before = summary["throughput_before"]
    summary["during_vs_before"] = summary["throughput_during"] / before if before else None
    return summary


def host_cpus() -> int:
    """The cores this process (and the Ray it starts) may run on: with real compute the
    NPUs do their math on them, beside the control plane, so the throughput figures
    depend on how many there are (BENCHMARKS.md: 0.8 on 2 cores, 0.93 on 16)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _mean(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def print_elastic(summary: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"bench elastic{' --direct' if summary['direct'] else ''}: {summary['manifest']} {summary['instance']} "
                    f"EP {summary['from_ep']} -> {summary['to_ep']} -> {summary['from_ep']}, {summary['cycles']} cycles, "
                    f"{summary['host_cpus']} CPUs")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("scale_up_s", "modelled_load_up_s", "scale_up_back_s", "scale_down_s", "cold_start_s",
                "scale_up_vs_cold_start",
                "pause_up_s", "pause_down_s",
                "throughput_before", "throughput_between", "throughput_after", "throughput_during",
                "during_vs_steady", "during_vs_steady_up", "during_vs_steady_down", "during_vs_before",
                "control_vs_steady", "serving_lost_s_up", "serving_lost_s_down", "serving_lost_s_control",
                "serving_lost_after_s_up", "serving_lost_after_s_down", "requests", "failed"):
        v = summary.get(key)
        t.add_row(key, "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        if key == "during_vs_steady" and summary.get("during_vs_steady_ci95"):
            low, high = summary["during_vs_steady_ci95"]
            t.add_row("  95% interval (windows resampled)", f"{low:.3f}-{high:.3f}")
    console.print(t)
