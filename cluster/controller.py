"""ClusterController: the actor that owns the instances while the server runs and
carries out every change to them — operator commands (`POST /v1/cluster/scale`,
`/rebalance`, `omniray scale`) and the autoscaler's decisions.

One action at a time (a lock): resize an instance's EP (cluster.elastic.resize),
add an instance (launched, then announced to the master), remove one (the
master stops routing to it, it finishes what it holds, then it goes), and
rebalance experts (Omni Placement from the measured load). Every action is
logged, kept in `events` and exported as `omniray_scaling_events_total`.
The master records the membership it is told (a restarted master reads it back).

It restarts too. The actors it has started (NPUs, engines) and placement groups
are the keeper's (cluster.keeper), so they outlive it; a restarted controller
rebuilds its view from what is alive (cluster.recovery): the instances, their
NPUs, reserves and the standby pool. What lives only in its memory starts
afresh: the event log (a `recover` event first), the autoscaler's cool-downs,
and the NPUs a scale-down parked for a scale-up back (recycled into the standby
pool).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

import ray

from cluster.autoscaler import AutoscalerPolicy, ClusterSignals, InstanceSignals, ScalingDecision
from cluster.config import InstanceSpec, Manifest
from cluster.elastic import StandbyPool, allowed_ep, measured_expert_load, rebuild, remap, resize
from cluster.launcher import Instance, launch_manifest_instance
from cluster.node_placement import home_node
from cluster.placement import placement_report, plan_placement, slots_needed
from cluster.recovery import recover

logger = logging.getLogger(__name__)

CONTROLLER_NAME = "omniray.controller"
EVENT_LOG_LEN = 128
SNAPSHOT_READ_TIMEOUT_S = 5.0  # the autoscaler's read of the master's state; a round without it decides nothing


class ScalingError(ValueError):
    """An action that cannot be done as asked; the message names the field."""


class ClusterController:
    def __init__(self, manifest: Manifest, instances: list[Instance], weight_refs: dict | None, kv_cache=None,
                 keeper=None):
        self.manifest = manifest
        self.instances = {i.name: i for i in instances}
        self.weight_refs = weight_refs  # the weights, put once at start-up: every new NPU loads from here
        self.kv_cache = kv_cache
        self.keeper = keeper  # starts (and owns) the actors this controller adds: cluster.keeper
        self.lock = threading.Lock()
        self.events: deque[dict] = deque(maxlen=EVENT_LOG_LEN)
        self.standby: StandbyPool | None = None
        self.policy = AutoscalerPolicy(manifest.autoscaler, lambda n: allowed_ep(manifest.model.num_experts, n))
        self._stop = threading.Event()
        self.metrics = None
        if _restarted():  # the instances given are those of the start: the view is rebuilt from what is alive
            t0 = time.perf_counter()
            found = recover(manifest, keeper, kv_cache)
            self.instances = found.instances
            if manifest.elastic.standby_npus and self.instances:
                self.standby = self._standby_pool(found.spare)
            else:
                for actor in found.spare:
                    ray.kill(actor)
            self._run()
            self._record("recover", "", "restart", "ok", time.perf_counter() - t0,
                         found.summary() | {"standby_npus": len(self.standby.actors) if self.standby else 0})

    def start(self) -> dict:
        """Warm the standby pool and start the autoscaler loop (if the manifest enables it)."""
        if self.manifest.elastic.standby_npus and self.instances:
            self.standby = self._standby_pool([])
        self._run()
        return self.describe()

    def _standby_pool(self, adopt: list) -> StandbyPool:
        return StandbyPool(next(iter(self.instances.values())).specs[0], self.manifest.elastic.standby_npus,
                           self.weight_refs, nodes=self._home_nodes(), owner=self.keeper, adopt=adopt)

    def _run(self) -> None:
        """The metrics and the loops: the autoscaler's (if the manifest enables it) and the monitor's."""
        from cluster.metrics import ScalingMetrics

        self.metrics = ScalingMetrics()
        if self.manifest.autoscaler.enabled:
            threading.Thread(target=self._autoscale_loop, daemon=True, name="autoscaler").start()
        threading.Thread(target=self._monitor_loop, daemon=True, name="monitor").start()
        self._export_sizes()

    # ---- state (calls that reach it while it restarts wait for it: they change nothing) -------
    @ray.method(max_task_retries=-1)
    def describe(self) -> dict:
        view = self.elastic_view()
        return {
            # reserve_npus: NPUs a scale-down released inside the instance's placement group,
            # kept for its next scale-up (they hold their slots: a group cannot shrink)
            "instances": [{"name": i.name, "role": i.role, "npus": i.ep_size, "reserve_npus": view["reserve_npus"][i.name],
                           "experts": {str(k): v for k, v in i.specs[0].expert_map.slots.items()}}
                          for i in self.instances.values()],
            "standby_npus": view["standby_npus"],
            "standby_warming": view["standby_warming"],
            "standby_nodes": view["standby_nodes"],
            "autoscaler": self.manifest.autoscaler.model_dump(),
            "events": list(self.events),
        }

    @ray.method(max_task_retries=-1)
    def elastic_view(self) -> dict:
        """NPUs outside the instances' current sets (`/v1/cluster`'s "elastic"): the
        standby pool and the nodes its new NPUs start on (the instances' home
        nodes, following them as they come and go), and per instance its reserve."""
        return {"standby_npus": len(self.standby.actors) if self.standby else 0,
                "standby_warming": self.standby.num_warming() if self.standby else 0,
                "standby_nodes": list(self.standby.nodes) if self.standby else [],
                "reserve_npus": {i.name: len(i.reserve) for i in self.instances.values()}}

    @ray.method(max_task_retries=-1)
    def steps_since(self, instance: str, t: float) -> list[tuple[float, int]]:
        """The instance's step log (step end on the wall clock, tokens)
        from `t` on, whichever NPUs it ran on: throughput across scaling events."""
        return ray.get(self._instance(instance).engine.steps_since.remote(t))

    @ray.method(max_task_retries=-1)
    def after_steps(self, instance: str, n: int = 2) -> list[float | None]:
        """The wall-clock ends of the instance's next n steps: the control command of
        `omniray bench elastic` (it travels as a scale command does, and changes nothing)."""
        return ray.get(self._instance(instance).engine.after_steps.remote(n))

    @ray.method(max_task_retries=-1)
    def npu_handles(self, instance: str) -> list:
        """The instance's NPU actors now (fault injection: `omniray bench chaos`)."""
        return list(self._instance(instance).npus)

    # ---- actions -------------------------------------------------------------------------
    def scale(self, instance: str, npus: int, trigger: str = "operator") -> dict:
        """EP resize of `instance` to `npus` NPUs while it serves."""
        inst = self._instance(instance)
        if npus == inst.ep_size:
            return {"instance": instance, "from_ep": npus, "to_ep": npus, "unchanged": True}
        if not allowed_ep(self.manifest.model.num_experts, npus):
            raise ScalingError(f"npus: {npus} does not divide the model's {self.manifest.model.num_experts} experts")
        return self._act("scale_ep", inst.role, trigger,
                         lambda: resize(inst, npus, self.weight_refs, standby=self.standby))

    def add_instance(self, role: str, npus: int | None = None, trigger: str = "operator") -> dict:
        if role not in ("prefill", "decode", "mixed"):
            raise ScalingError(f"role: {role!r} is not one of prefill, decode, mixed")
        same = [i for i in self.instances.values() if i.role == role]
        npus = npus or (same[0].ep_size if same else self.manifest.instances[0].ep)
        if not allowed_ep(self.manifest.model.num_experts, npus):
            raise ScalingError(f"npus: {npus} does not divide the model's {self.manifest.model.num_experts} experts")
        n = 0
        while f"{role}{n}" in self.instances:
            n += 1
        name = f"{role}{n}"
        return self._act("add_instance", role, trigger, lambda: self._launch(name, role, npus))

    def remove_instance(self, instance: str, trigger: str = "operator") -> dict:
        inst = self._instance(instance)
        if sum(1 for i in self.instances.values() if i.role == inst.role) == 1:
            raise ScalingError(f"instance: {instance} is the last {inst.role} instance; add another first")
        return self._act("remove_instance", inst.role, trigger, lambda: self._drain_and_remove(inst))

    def rebalance(self, instance: str | None = None, trigger: str = "operator") -> dict:
        """Omni Placement: a new expert map per layer from the measured expert load,
        with `elastic.redundant_experts` extra slots per NPU for copies of hot experts."""
        targets = [self._instance(instance)] if instance else list(self.instances.values())
        return self._act("rebalance", ",".join(sorted({t.role for t in targets})), trigger,
                         lambda: {"instances": [self._rebalance_one(t) for t in targets]})

    def rebuild(self, instance: str, trigger: str = "operator") -> dict:
        """New NPUs for an instance that lost one; the master routes to it again after."""
        inst = self._instance(instance)

        def do():
            result = rebuild(inst, self.weight_refs, self.standby)
            ray.get(self._master().mark_rebuilt.remote(inst.name))
            return result

        return self._act("rebuild", inst.role, trigger, do)

    def shutdown(self) -> None:
        self._stop.set()
        for inst in self.instances.values():
            inst.shutdown()
        if self.standby is not None:
            self.standby.shutdown()

    # ---- how ------------------------------------------------------------------------------
    def _instance(self, name: str) -> Instance:
        if name not in self.instances:
            raise ScalingError(f"instance: no instance {name!r} (have {', '.join(sorted(self.instances))})")
        return self.instances[name]

    def _act(self, action: str, role: str, trigger: str, do) -> dict:
        t0 = time.perf_counter()
        with self.lock:
            try:
                result = do()
            except Exception as err:
                self._record(action, role, trigger, "error", time.perf_counter() - t0, {"error": str(err)})
                raise
        seconds = time.perf_counter() - t0
        self._record(action, role, trigger, "ok", seconds, result)
        return {"action": action, "seconds": seconds, **result}

    def _record(self, action, role, trigger, outcome, seconds, detail) -> None:
        event = {"time": time.time(), "action": action, "role": role, "trigger": trigger, "outcome": outcome,
                 "seconds": seconds, **{k: v for k, v in detail.items() if k != "memory"}}
        self.events.append(event)
        logger.info("scaling: %s", event)
        if self.metrics is not None:
            self.metrics.event(action, role, trigger, outcome, seconds)
        self._export_sizes()

    def _export_sizes(self) -> None:
        if self.metrics is not None:
            self.metrics.sizes(self.instances.values(), len(self.standby.actors) if self.standby else 0)

    def _home_nodes(self) -> list[str]:
        """The instances' home nodes, once each: where standby NPUs wait (StandbyPool.nodes)."""
        return list(dict.fromkeys(home_node([m["node"] for m in i.memory]) for i in self.instances.values()))

    def _standby_follows_instances(self) -> None:
        """After an instance was added or removed: new standby NPUs start on the nodes of those there are now."""
        if self.standby is not None:
            self.standby.nodes = self._home_nodes()

    def _master(self):
        from cluster.proxy.master import MASTER_NAME

        return ray.get_actor(MASTER_NAME)

    def _launch(self, name: str, role: str, npus: int) -> dict:
        inst = launch_manifest_instance(self.manifest, InstanceSpec(name=name, role=role, ep=npus),
                                        self.weight_refs, self.kv_cache, owner=self.keeper)
        try:
            ray.get(self._master().add_instance.remote(name, role))
        except Exception:
            inst.shutdown()
            raise
        self.instances[name] = inst
        self._standby_follows_instances()
        return {"instance": name, "role": role, "npus": npus}

    def _drain_and_remove(self, inst: Instance) -> dict:
        master = self._master()
        ray.get(master.drain.remote(inst.name))
        deadline = time.monotonic() + self.manifest.elastic.drain_timeout_s
        finished_at = None
        while time.monotonic() < deadline:
            st = ray.get(inst.engine.stats.remote())
            load = ray.get(master.in_flight.remote(inst.name))
            if st.running + st.waiting == 0 and load["inflight"] == 0:
                finished_at = time.monotonic()
                break
            time.sleep(0.05)
        if finished_at is None:
            raise ScalingError(f"instance: {inst.name} did not drain within {self.manifest.elastic.drain_timeout_s} s; "
                               f"it stays, out of routing")
        ray.get(master.remove_instance.remote(inst.name))
        del self.instances[inst.name]
        inst.shutdown()
        self._standby_follows_instances()
        return {"instance": inst.name, "role": inst.role, "npus": inst.ep_size}

    def _rebalance_one(self, inst: Instance) -> dict:
        load = measured_expert_load(inst)
        if not load or not any(sum(v) for v in load.values()):
            return {"instance": inst.name, "skipped": "no measured expert load yet"}
        cfg = inst.specs[0].model
        slots = slots_needed(cfg.num_experts, inst.ep_size, self.manifest.elastic.redundant_experts)
        current = inst.specs[0].expert_map
        plan = plan_placement(load, inst.ep_size, slots)
        before, after = placement_report(current, load), placement_report(plan, load)
        result = {"instance": inst.name, "imbalance_before": before["max_imbalance"],
                  "imbalance_after": after["max_imbalance"]}
        if after["max_imbalance"] >= before["max_imbalance"] - 1e-9:
            return result | {"skipped": "the current map is already as balanced"}
        return result | remap(inst, plan)

    # ---- the autoscaler loop ----------------------------------------------------------------
    def signals(self) -> ClusterSignals | None:
        """What the policy decides from: the master's published snapshot."""
        from cluster.proxy.master import fetch_published

        try:
            master = self._master()
        except ValueError:  # no master (yet, or restarting)
            return None
        snap = asyncio.run(fetch_published(master, SNAPSHOT_READ_TIMEOUT_S))
        if snap is None:
            return None
        cfg = self.manifest.autoscaler
        instances = []
        for row in snap["instances"]:
            inst, eng = self.instances.get(row["name"]), row.get("engine") or {}
            if inst is None:
                continue
            total, free = eng.get("total_blocks") or [1], eng.get("free_blocks") or [1]
            usage = max(1 - f / t for f, t in zip(free, total)) if total else 0.0
            instances.append(InstanceSignals(inst.name, inst.role, inst.ep_size, row["healthy"], row.get("draining", False),
                                             eng.get("running", 0), eng.get("waiting", 0), usage))
        lat = snap.get("latencies", [])

        def attainment(values, slo):
            values = [v for v in values if v is not None]
            return None if slo is None or not values else sum(v <= slo for v in values) / len(values)

        return ClusterSignals(snap["queue_length"], instances, snap.get("decode_queue_length", 0),
                              attainment([t for t, _ in lat], cfg.ttft_slo_s), attainment([p for _, p in lat], cfg.tpot_slo_s))

    def autoscale_once(self) -> list[dict]:
        """One round of the policy: decide, carry out, record. Returns what was done."""
        signals = self.signals()
        if signals is None:
            return []
        done = []
        for d in self.policy.decide(signals, time.monotonic()):
            try:
                done.append(self._carry_out(d))
            except Exception as err:  # logged and counted by _act; the loop goes on
                logger.warning("autoscaler: %s failed: %s", d.as_dict(), err)
            self.policy.record(d, time.monotonic())
        return done

    def _carry_out(self, d: ScalingDecision) -> dict:
        if d.action == "scale_ep":
            return self.scale(d.instance, d.npus, trigger="autoscaler") | {"reason": d.reason}
        if d.action == "add_instance":
            return self.add_instance(d.role, d.npus, trigger="autoscaler") | {"reason": d.reason}
        return self.remove_instance(d.instance, trigger="autoscaler") | {"reason": d.reason}

    def check_health(self) -> list[dict]:
        """Rebuild every instance whose engine says an NPU of it died."""
        done = []
        for name, inst in list(self.instances.items()):
            try:
                healthy = ray.get(inst.engine.stats.remote(), timeout=10).healthy
            except (ray.exceptions.RayError, KeyError):
                continue  # an engine that does not answer: nothing this controller can rebuild
            if not healthy:
                try:
                    done.append(self.rebuild(name, trigger="health"))
                except Exception as err:
                    logger.warning("health: rebuilding %s failed: %s", name, err)
        return done

    def _monitor_loop(self) -> None:
        """Re-export the sizes (gauges), top the standby pool up once it has been
        short for elastic.standby_refill_delay_s and, with elastic.auto_rebuild,
        rebuild broken instances."""
        while not self._stop.wait(self.manifest.elastic.health_check_s):
            try:
                self._export_sizes()
                if self.standby is not None:
                    with self.lock:  # not while a scaling action takes from it or gives back
                        self.standby.top_up(self.manifest.elastic.standby_refill_delay_s)
                if self.manifest.elastic.auto_rebuild:
                    self.check_health()
            except Exception:
                logger.exception("health check failed")

    def _autoscale_loop(self) -> None:
        while not self._stop.wait(self.manifest.autoscaler.interval_s):
            try:
                self.autoscale_once()
            except Exception:
                logger.exception("autoscaler round failed")


def _restarted() -> bool:
    """Whether this runs in a controller actor Ray restarted."""
    ctx = ray.get_runtime_context()
    return ctx.get_actor_id() is not None and bool(ctx.was_current_actor_reconstructed)


def create_controller(manifest: Manifest, instances: list[Instance], weight_refs: dict | None, kv_cache=None,
                      keeper=None):
    """The named controller actor (threaded: an action may run while state is read;
    it restarts on failure, rebuilding its view: see the module's docstring) and the
    ref its start returns. `keeper` starts the actors it adds (cluster.keeper)."""
    ctl = ray.remote(ClusterController).options(name=CONTROLLER_NAME, num_cpus=0, max_concurrency=16,
                                                max_restarts=-1).remote(manifest, instances, weight_refs, kv_cache,
                                                                        keeper)
    return ctl, ctl.start.remote()

