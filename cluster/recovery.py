"""What a restarted cluster controller finds alive: its view rebuilt from the
actors, not from the memory it lost.

- the instances: the master's snapshot (name, role), else every engine alive
  by name;
- per instance, its NPUs, their specs and memory reports: its engine
  (InstanceEngine.layout), the engine found by name;
- the placement-group bundle of each NPU, and the NPUs beside the instances':
  the keeper (cluster.keeper), which started every one of them. One in a group
  an instance serves in is that instance's reserve (recycled into it again);
  one in no such group is the rest of a launch or rebuild cut short, and goes;
  the others are the standby pool's (spare).

An engine that is alive but does not answer is asked again until
RECOVER_WAIT_S has passed; then its instance is left out, and so that none of
its NPUs is taken for a spare one, nothing beside the instances is touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray

from actors.executor import InstanceExecutor
from cluster.config import InstanceSpec, Manifest
from cluster.elastic import to_reserve
from cluster.launcher import PLACEMENT_TIMEOUT_S, Instance, engine_name
from cluster.node_placement import NodePlacement

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 30.0  # one read of the master's, the keeper's or an engine's state
RECOVER_WAIT_S = 120.0  # how long an engine alive that does not answer is asked again


@dataclass
class Found:
    instances: dict[str, Instance] = field(default_factory=dict)
    spare: list = field(default_factory=list)  # NPU actors for the standby pool
    complete: bool = True  # every instance was read (else spare is empty: see the module's docstring)

    def summary(self) -> dict:
        return {"instances": sorted(self.instances), "npus": sum(i.ep_size for i in self.instances.values()),
                "reserve_npus": sum(len(i.reserve) for i in self.instances.values()), "spare_npus": len(self.spare),
                "complete": self.complete}


def recover(manifest: Manifest, keeper, kv_cache) -> Found:
    found = Found()
    try:
        held = ray.get(keeper.alive_npus.remote(), timeout=READ_TIMEOUT_S) if keeper is not None else []
    except ray.exceptions.RayError as err:  # the instances serve on; what is beside them stays unknown
        logger.warning("recover: the keeper does not answer (%s): no reserve or standby NPUs found", err)
        held, found.complete = [], False
    bundle_of = {a._actor_id.hex(): b for a, b in held if b is not None}
    for name, role in _members():
        inst = _instance(manifest, name, role, keeper, kv_cache)
        if inst is None:
            found.complete = False
            continue
        if inst.engine is None:  # no engine by its name: the instance is gone, its NPUs are strays
            continue
        inst.bundles = {k: bundle_of[k] for k in (n._actor_id.hex() for n in inst.npus) if k in bundle_of}
        inst.groups = list({pg.id: pg for pg, _ in inst.bundles.values()}.values())
        found.instances[name] = inst
    if not found.complete:
        return found
    serving = {n._actor_id.hex() for i in found.instances.values() for n in i.npus}
    group_of = {pg.id: i for i in found.instances.values() for pg in i.groups}
    for actor, bundle in held:
        key = actor._actor_id.hex()
        if key in serving:
            continue
        if bundle is None:
            found.spare.append(actor)
        elif bundle[0].id in group_of:
            inst = group_of[bundle[0].id]
            inst.bundles[key] = bundle
            to_reserve(inst, [actor])
        else:
            ray.kill(actor)
    return found


def _members() -> list[tuple[str, str | None]]:
    """(name, role) of the instances: the master's, else every engine alive by name (role unknown)."""
    from cluster.proxy.master import MASTER_NAME

    try:
        snapshot = ray.get(ray.get_actor(MASTER_NAME).snapshot.remote(), timeout=READ_TIMEOUT_S)
        return [(r["name"], r["role"]) for r in snapshot["instances"]]
    except (ValueError, ray.exceptions.RayError):
        prefix = engine_name("")
        return [(n[len(prefix):], None) for n in ray.util.list_named_actors() if n.startswith(prefix)]


def _instance(manifest: Manifest, name: str, role: str | None, keeper, kv_cache) -> Instance | None:
    """The instance as its engine serves it; one without an engine (Instance.engine
    None) when none has its name; None when the engine did not answer in time."""
    deadline = time.monotonic() + RECOVER_WAIT_S
    while True:
        try:
            engine = ray.get_actor(engine_name(name))
        except ValueError:
            return Instance(name, role or "", [], [], InstanceExecutor([]))
        try:
            npus, specs, memory = ray.get(engine.layout.remote(), timeout=READ_TIMEOUT_S)
            role = role or ray.get(engine.stats.remote(), timeout=READ_TIMEOUT_S).role
            break
        except ray.exceptions.RayError as err:
            if time.monotonic() > deadline:
                logger.warning("recover: the engine of %s does not answer (%s); the instance is left out", name, err)
                return None
            time.sleep(1.0)
    spec = next((s for s in manifest.instances if s.name == name), InstanceSpec())
    return Instance(name, role, specs, npus, InstanceExecutor(npus), memory,
                    placement=NodePlacement(spec.placement, PLACEMENT_TIMEOUT_S) if spec.placement else None,
                    engine=engine, kv_cache=kv_cache, owner=keeper)
