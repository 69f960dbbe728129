"""ElasticMoE: the scaling actions, carried out while the instance serves.

- `resize`: an instance's EP size N -> M. The NPUs it keeps keep their weights
  and their KV in place (ElasticMoE's zero-copy reuse); new NPUs (from the
  standby pool when there is one, else started now) load their experts from the
  object store, where the weights were put once at start-up; the kept NPUs stage
  the experts the new map moves to them, and the M NPUs form their new
  collective group beside the current one (actors.collective), all while the
  instance serves. Only then does the engine switch, between two steps: every
  NPU swaps to the new group, sequences on NPUs that leave export their KV
  through the object store and resume on a kept NPU, and the next step runs on
  M NPUs. Each leaving NPU exports the KV of all its sequences as one object,
  sent when the command reaches the engine (it runs right after that NPU's step
  in flight), so the first step on the new size finds it done; emulated compute
  charges the copy to the intra-node link when both NPUs share a node, else to
  RoCE. The released NPUs go last: back to the standby pool when there is
  one (a later scale-up adopts them without starting a process), else away;
  those of a placement group the instance still serves in (they would die with
  it) stay in its reserve instead, which its next scale-up takes first.
  A scale-up leaves the kept NPUs in their previous group and has them set the
  experts they drop aside (ElasticMoE's pre-built communication domains): a
  scale-down back to that size then stages nothing and forms no group. It goes
  the other way too: that scale-down parks the NPUs it releases in the standby
  pool as they are (experts, KV pool, still in the larger group, as the kept
  NPUs stay), and the next scale-up back to that group adopts them with nothing
  to load, stage or form; a parked NPU taken for anything else is recycled.
  A pool a scale-up drew from starts processes for the rest only after
  `elastic.standby_refill_delay_s`: a starting Ray worker takes about a CPU
  second, at a priority above the serving workers.
- `remap`: the same switch with the same NPUs and a new expert map (Omni
  Placement's rebalance).
- `cold_start`: the baseline a resize is measured against — a new instance of
  the same size from nothing (new actors, weights built from scratch).

Decisions (when, how far) belong to cluster.autoscaler and the operator; this
module only acts. Torch is not imported here.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import replace

import ray

from actors import group_status
from actors.executor import InstanceExecutor
from actors.expert_map import ExpertMap
from actors.protocol import NPUSpec
from cluster.launcher import Instance, start_npu_actors
from cluster.node_placement import added_group, choose_standby

GROUP_WAIT_S = 120.0  # a forming group's members give up after 60 s (actors.collective)


def allowed_ep(num_experts: int, ep: int) -> bool:
    """An EP size the contiguous expert layout supports."""
    return ep >= 1 and num_experts % ep == 0


def resized_specs(inst: Instance, ep: int, expert_map: ExpertMap | None = None) -> list[NPUSpec]:
    """The specs of `inst` at EP `ep`: a fresh collective group; unless a placement
    is given, the experts laid out to move the fewest (ExpertMap.resized)."""
    cfg = inst.specs[0].model
    if expert_map is None:
        if not allowed_ep(cfg.num_experts, ep):
            raise ValueError(f"npus: {ep} does not divide the model's {cfg.num_experts} experts")
        expert_map = inst.specs[0].expert_map.resized(cfg.num_experts, ep)
    if expert_map.ep_size != ep:
        raise ValueError(f"expert_map: built for EP {expert_map.ep_size}, not {ep}")
    expert_map.validate(cfg.num_experts)
    group = f"{inst.name}-{uuid.uuid4().hex[:8]}"
    base = inst.specs[0]
    return [replace(base, name=f"{inst.name}.npu{r}", rank=r, expert_map=expert_map, group_name=group,
                    retain_dropped=False) for r in range(ep)]


def _retaining(inst: Instance, specs: list[NPUSpec]) -> list[NPUSpec]:
    """A scale-up's specs, the NPUs it keeps told to keep the experts they drop
    (where they gain none: what they hold then stays within what they held)."""
    out = list(specs)
    for r, now in enumerate(inst.specs[: len(specs)]):
        if not any(specs[r].expert_map.gained(r, now.expert_map.held_by(r)).values()):
            out[r] = replace(specs[r], retain_dropped=True)
    return out


def _back(inst: Instance, ep: int, expert_map: ExpertMap | None) -> list[NPUSpec] | None:
    """The specs a scale-down to `ep` returns to at no cost: those of the instance's
    first `ep` NPUs before its last scale-up (their group, the experts they kept)."""
    if inst.dormant is None or len(inst.dormant) != ep or expert_map is not None:
        return None
    return [replace(s, retain_dropped=False) for s in inst.dormant]


def _retained(inst: Instance, n: int) -> list[list[ExpertMap]]:
    """Per NPU of the first n of `inst`, the maps whose experts at its rank it
    holds: its own, and the one it kept from before its last switch."""
    out = []
    for r, now in enumerate(inst.specs[:n]):
        kept = now.retain_dropped and inst.dormant is not None and r < len(inst.dormant)
        out.append([now.expert_map] + ([inst.dormant[r].expert_map] if kept else []))
    return out


def _gains(new: NPUSpec, held: list[ExpertMap]) -> bool:
    """Whether `new` gives its NPU an expert that none of the maps it holds
    (at its rank) has. A scale-down back to the layout of before the last
    scale-up names the very map the NPU kept: nothing to compare (comparing
    48 layers on 8 NPUs cost the controller 1.5 ms in the step in flight)."""
    if any(new.expert_map is m for m in held):
        return False
    have: dict[int, set[int]] = {}
    for m in held:
        for layer, es in m.held_by(new.rank).items():
            have.setdefault(layer, set()).update(es)
    return any(new.expert_map.gained(new.rank, have).values())


class StandbyPool:
    """Warm NPU actors (process started, compute code imported, the replicated
    part of the model in place: built from the object store, or with emulated
    compute the modelled copy of its weights into HBM; no HBM charged) that a
    scale-up adopts instead of starting actors then: adopting one costs only its
    experts.

    NPUs a scale-down releases come back here (NPUActor.recycle) while the pool
    is below its size, so scaling up and down again starts no process. What a
    scale-up drew and no scale-down gave back is started by `top_up`, once the
    pool has been short for a while: a starting worker runs Python and `import
    ray` at the raylet's priority, above the workers that serve, and on a small
    host that stalls serving for most of a second."""

    def __init__(self, template: NPUSpec, size: int, weight_refs: dict | None = None,
                 nodes: list[str] | None = None, owner=None, adopt: list | None = None):
        # `nodes`: where standby NPUs should wait, in turn (the instances' nodes: a scale-up
        # keeping an instance's placement takes only standby NPUs on the right node);
        # `owner`: who starts them (cluster.keeper; None: this process); `adopt`: NPU actors
        # alive already (a restarted controller's spare ones), recycled into the pool first
        self.template, self.size, self.weight_refs, self.nodes = template, size, weight_refs, nodes or []
        self.owner = owner
        self.actors = []
        # actor id -> the collective group a scale-down back left it in, experts and all
        # (`park`): the instance's next scale-up back to that group adopts it as it is
        self.parked: dict[str, str] = {}
        self.warming: list = []  # warm-up refs of actors still starting or recycling
        self.node_refs: dict[str, ray.ObjectRef] = {}  # per actor id, its warm-up's (or recycling's) ref: its node
        self.drawn_at = time.monotonic()  # the last take
        self.give_back(list(adopt or []))
        ray.get(self.refill(size - len(self.actors)))

    def _spec(self, i: int) -> NPUSpec:
        return replace(self.template, name=f"standby{i}", instance="standby", rank=0)

    def _nodes_for(self, n: int) -> list[str] | None:
        """Nodes for n new standby NPUs: in turn, starting with those the pool has fewest on."""
        if not self.nodes:
            return None
        have = Counter(node for _, node in self._placed(wait=False))
        out = []
        for _ in range(n):
            node = min(self.nodes, key=lambda x: have[x])
            out.append(node)
            have[node] += 1
        return out

    def _placed(self, wait: bool) -> list[tuple[object, str]]:
        """(actor, node id) of the pool's actors whose node is known (those done
        warming or recycling; `wait`: all, once they are), in the pool's order.
        One that failed to warm is on no node."""
        refs = [self.node_refs[a._actor_id.hex()] for a in self.actors]
        done = refs if wait else ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []
        out = []
        for actor, ref in zip(self.actors, refs):
            if ref in done:
                try:
                    out.append((actor, ray.get(ref)))
                except ray.exceptions.RayError:
                    pass
        return out

    def take(self, n: int) -> list:
        return self._unpark(self._remove(self.actors[:n]))

    def take_placed(self, n: int, choose) -> list[tuple[object, str]]:
        """Up to n actors, with their nodes, as `choose(candidates, n)` picks them
        from (actor, node id) in the pool's order (cluster.node_placement): from
        those whose node is known, else, if that is not enough and some are still
        warming or recycling, from all of them once they are done."""
        if n <= 0:
            return []
        known = self._placed(wait=False)
        chosen = choose(known, n)
        if len(chosen) < n and len(known) < len(self.actors):
            chosen = choose(self._placed(wait=True), n)
        self._unpark(self._remove([a for a, _ in chosen]))
        return chosen

    def _remove(self, taken: list) -> list:
        ids = {a._actor_id.hex() for a in taken}
        self.actors = [a for a in self.actors if a._actor_id.hex() not in ids]
        for i in ids:
            self.node_refs.pop(i, None)
        self.drawn_at = time.monotonic()
        return taken

    def _unpark(self, taken: list) -> list:
        """Parked NPUs taken for anything but their scale-up back: recycled first
        (their recycling runs before the adoption sent after it)."""
        for i, n in enumerate(taken):
            if self.parked.pop(n._actor_id.hex(), None) is not None:
                n.recycle.remote(self._spec(i))
        return taken

    def _room_for(self, npus: list) -> list:
        """As many of `npus` as the pool lacks; the rest go."""
        room = max(0, self.size - len(self.actors))
        for n in npus[room:]:
            ray.kill(n)
        return npus[:room]

    def _recycle(self, npus: list) -> None:
        """Recycle NPUs of the pool (NPUActor.recycle): warming again until done."""
        refs = [n.recycle.remote(self._spec(i)) for i, n in enumerate(npus)]
        self.node_refs.update((n._actor_id.hex(), r) for n, r in zip(npus, refs))
        self.warming.extend(refs)

    def park(self, npus: list, group: str, nodes: list[str]) -> None:
        """NPUs a scale-down back released, kept as they are (experts, KV pool,
        membership of `group`, on `nodes`) so that the instance's next scale-up back
        to `group` adopts them with nothing to load or form (`take_parked`);
        counted in the pool, and recycled if taken for anything else. Those the
        pool has no room for go."""
        for n, node in zip(self._room_for(npus), nodes):
            self.parked[n._actor_id.hex()] = group
            self.node_refs[n._actor_id.hex()] = ray.put(node)
            self.actors.append(n)

    def take_parked(self, group: str, n: int) -> list | None:
        """The n NPUs parked in `group`, in the order they were parked; None when
        fewer are left (one was taken for something else, or had no room): then
        the rest are recycled, since their group cannot serve again."""
        mine = [a for a in self.actors if self.parked.get(a._actor_id.hex()) == group]
        for a in mine:
            del self.parked[a._actor_id.hex()]
        if len(mine) == n:
            return self._remove(mine)
        self._recycle(mine)
        return None

    def refill(self, n: int) -> list:
        """Start n more; returns their warm-up refs (a caller may go on without waiting)."""
        fresh = start_npu_actors([self._spec(i) for i in range(n)], nodes=self._nodes_for(n), owner=self.owner) \
            if n else []
        self.actors.extend(fresh)
        refs = [a.warm.remote(self.weight_refs) for a in fresh]
        self.node_refs.update((a._actor_id.hex(), r) for a, r in zip(fresh, refs))
        self.warming.extend(refs)
        return refs

    def give_back(self, npus: list) -> None:
        """NPUs an instance released: standby again, as many as the pool lacks; the
        rest go. Their recycling runs before any adoption sent after it."""
        back = self._room_for(npus)
        self._recycle(back)
        self.actors.extend(back)

    def top_up(self, after_s: float = 0.0) -> int:
        """Start processes for what the pool lacks, once `after_s` have passed since
        the last take (a scale-down meanwhile gives NPUs back instead). Returns how many."""
        short = self.size - len(self.actors)
        if short <= 0 or time.monotonic() - self.drawn_at < after_s:
            return 0
        self.refill(short)
        return short

    def num_warming(self) -> int:
        """Actors of the pool still starting or recycling (their work competes for CPU)."""
        if self.warming:
            self.warming = ray.wait(self.warming, num_returns=len(self.warming), timeout=0)[1]
        return len(self.warming)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors, self.node_refs, self.parked = [], {}, {}


def _new_npus(inst: Instance, kept: list, specs: list[NPUSpec], weight_refs: dict | None,
              standby: StandbyPool | None, nodes: list[str] | None = None,
              keep_groups: bool = False) -> tuple[list, list[dict]]:
    """Everything before the switch, while the instance serves: the `kept` NPUs
    stage their experts for `specs` and form its collective group; NPU actors for
    the rest of `specs`, set up by the engine, load from the object store and join
    that group as they finish. Those come from the instance's reserve first, then
    from the standby pool, and the others start now: see _placed for where, next
    to its NPUs on `nodes` (default: the kept ones'). Returns the new actors and
    their memory reports; on failure the new actors go (the reserve's back to it),
    and so does a placement group left empty, unless `keep_groups` (a rebuild's:
    the instance's own placement, for its next try)."""
    adding = len(specs) - len(kept)
    reserved, reserved_nodes = _take_reserve(inst, adding)
    # where the rest go first: a placement that cannot be met fails before anything is staged
    try:
        nodes = (nodes if nodes is not None else [m["node"] for m in inst.memory[: len(kept)]]) + reserved_nodes
        pooled, bundles = _placed(inst, nodes, adding - len(reserved), standby)
    except Exception:
        inst.reserve = reserved + inst.reserve
        raise
    back = [a for a, _ in reserved]
    warm = back + pooled
    groups = _groups(inst)
    staging = _stage(kept, _retained(inst, len(kept)), specs, groups)
    cold_specs = specs[len(kept) + len(warm):]
    cold = start_npu_actors(cold_specs, bundles, owner=inst.owner)
    fresh = warm + cold
    if bundles:
        inst.bundles.update((n._actor_id.hex(), b) for n, b in zip(cold, bundles))
    # warm NPUs hold the refs they warmed (or were set up) with: sent again, they cost milliseconds a call
    held = not pooled or (standby is not None and standby.weight_refs is weight_refs)
    try:
        # the engine sets them up: their first step then finds its connections open
        adopting = []
        if warm:
            adopting.append(inst.engine.adopt.remote(warm, specs[len(kept):len(kept) + len(warm)],
                                                     None if held else weight_refs))
        if cold:
            adopting.append(inst.engine.adopt.remote(cold, cold_specs, weight_refs))
        done = ray.get(adopting + staging)
        if fresh or specs[0].group_name not in groups:
            _await_group(specs)
    except Exception:
        for n in pooled + cold:
            ray.kill(n)
        inst.release(cold, keep_groups)
        to_reserve(inst, back)
        raise
    reports = [r for part in done[: len(adopting)] for r in part]
    return fresh, reports


def _adopt_parked(inst: Instance, kept: list, parked: list, specs: list[NPUSpec], reports: list[dict]) -> None:
    """A scale-up back to the group the NPUs a scale-down parked are still in: they
    hold their experts and KV pool, and the kept NPUs the experts they dropped
    (they gain none: nothing staged unless they do), so the engine only takes
    them back (no setup: `reports` are theirs from before) and no group forms."""
    staging = _stage(kept, _retained(inst, len(kept)), specs, _groups(inst))
    ray.get([inst.engine.adopt.remote(parked, specs[len(kept):], None, reports)] + staging)


def _take_reserve(inst: Instance, n: int) -> tuple[list[tuple[object, object]], list[str]]:
    """Up to n of the instance's reserve entries (actor, ref of its recycling), and
    their nodes (what the recycling returned); one whose recycling failed (its
    process died) goes."""
    taken, nodes = [], []
    while inst.reserve and len(taken) < n:
        actor, ref = inst.reserve.pop(0)
        try:
            nodes.append(ray.get(ref))
            taken.append((actor, ref))
        except ray.exceptions.RayError:
            ray.kill(actor)
            inst.release([actor])
    return taken, nodes


def to_reserve(inst: Instance, npus: list) -> None:
    """NPUs of the instance's placement groups it no longer serves on: recycled
    (experts and HBM charges dropped, groups left) into its reserve."""
    spec = replace(inst.specs[0], name=f"{inst.name}.reserve", rank=0, retain_dropped=False)
    inst.reserve += [(n, n.recycle.remote(spec)) for n in npus]


def _placed(inst: Instance, nodes: list[str], n: int, standby: StandbyPool | None) -> tuple[list, list | None]:
    """For n NPUs an instance adds beside its NPUs on `nodes`: standby NPUs, and the
    placement-group bundles (group, index) to start the rest in (None: anywhere).
    With a placement strategy (cluster.node_placement): the standby NPUs it allows
    (best first), then bundles of the instance's groups whose NPU died (a rebuild's:
    the same nodes), then a new group of its own; raises PlacementError when a
    STRICT strategy cannot be met (the standby NPUs taken go back)."""
    if inst.placement is None:
        return (standby.take(n) if standby is not None else []), None
    taken = standby.take_placed(n, lambda c, k: choose_standby(inst.placement, nodes, c, k)) if standby else []
    warm = [a for a, _ in taken]
    free = inst.free_bundles()[: n - len(warm)]
    left = n - len(warm) - len(free)
    if not left:
        return warm, free
    args = (f"{inst.name}-npus-{uuid.uuid4().hex[:8]}", left, inst.placement, nodes + [node for _, node in taken])
    try:
        pg = ray.get(inst.owner.added_group.remote(*args)) if inst.owner is not None else added_group(*args)
    except Exception:
        if standby is not None:
            standby.give_back(warm)
        raise
    inst.groups.append(pg)
    return warm, free + [(pg, i) for i in range(left)]


def _groups(inst: Instance) -> set[str]:
    """The collective groups `inst`'s NPUs are in, by name (emulated NPUs form none):
    its own (all of them), and the one its first NPUs kept through its last
    scale-up (Instance.dormant)."""
    return {inst.specs[0].group_name} | ({inst.dormant[0].group_name} if inst.dormant else set())


def _stage(npus: list, have: list[list[ExpertMap]], specs: list[NPUSpec], groups: set[str]) -> list:
    """Refs, per kept NPU (holding the experts of the maps `have`, in `groups`), of its starting
    to form the new group (in a thread of its own: see _await_group) and of its
    staging the experts `specs` adds to it. No call where there is nothing to do
    (no new group, no expert gained): each costs the controller and a serving NPU CPU."""
    refs = []
    for npu, held, new in zip(npus, have, specs):
        if new.has_group and new.group_name not in groups:
            refs.append(npu.form_group.remote(new))
        if _gains(new, held):
            refs.append(npu.prepare.remote(new))
    return refs


def _await_group(specs: list[NPUSpec]) -> None:
    """Until every NPU of `specs` has formed its collective group (if it has one).
    Waited for in the GCS, where each member records it (actors.group_status):
    neither a task of a serving NPU waiting on its peers (that is how two NPUs
    deadlock: one's joining queued behind its step, the other's step behind its
    joining) nor polling the NPUs themselves, which costs their CPU. A failed
    formation raises here; the members give up after the collective's own timeout."""
    if not specs[0].has_group:
        return
    name = specs[0].group_name
    group_status.sweep(2 * GROUP_WAIT_S)  # records of earlier formations no one waits for any more
    try:
        group_status.wait_formed(name, len(specs), GROUP_WAIT_S)
    finally:
        group_status.forget(name)


def _switch(inst: Instance, npus: list, specs: list[NPUSpec], memory: list[dict], recompute: bool = False,
            standby: StandbyPool | None = None, keep_previous: bool = False, park: bool = False) -> dict:
    """The engine serves on `npus` (staged, their group formed; `memory` their
    reports) from its next step, whose batches carry the new specs. Then the
    NPUs it no longer uses go back to `standby` (else they go), and the ones it
    keeps leave their previous group, unless `keep_previous` (the instance may
    scale back to it: a scale-up, whose NPUs all stay in it, or a scale-down
    that `park`s the NPUs it releases, still in it, in the standby pool)."""
    info = ray.get(inst.engine.reconfigure.remote([n._actor_id.hex() for n in npus], specs, memory, recompute))
    if inst.specs[0].has_group or specs[0].has_group:  # else none to leave (emulated, EP 1)
        keep = [specs[0].group_name] + ([inst.specs[0].group_name] if keep_previous else [])
        ray.get([n.leave_groups_but.remote(keep) for n in npus])
    using = {n._actor_id.hex() for n in npus}
    leaving = [n for n in inst.npus if n._actor_id.hex() not in using]
    # NPUs in the instance's placement groups die with their group: one whose group still
    # holds an NPU it serves on (whose slot would not come free) stays its own, in its
    # reserve; the others go, and their group with them. A standby NPU is placed by its
    # node alone and goes back.
    bound = [n for n in leaving if n._actor_id.hex() in inst.bundles]
    serving = {inst.bundles[k][0].id for k in using if k in inst.bundles}
    gone = [n for n in bound if inst.bundles[n._actor_id.hex()][0].id not in serving]
    for n in gone:
        ray.kill(n)
    inst.release(gone)
    to_reserve(inst, [n for n in bound if n not in gone])
    leaving = [n for n in leaving if n not in bound]
    inst.parked = None
    if standby is not None and park:
        reports = {n._actor_id.hex(): m for n, m in zip(inst.npus, inst.memory)}
        inst.parked = [reports[n._actor_id.hex()] for n in leaving]
        standby.park(leaving, inst.specs[0].group_name, [m["node"] for m in inst.parked])
    elif standby is not None:
        standby.give_back(leaving)
    else:
        for n in leaving:
            ray.kill(n)
    inst.dormant = inst.specs if keep_previous else None
    inst.npus, inst.specs, inst.memory = list(npus), specs, memory
    inst.executor = InstanceExecutor(inst.npus)
    return info


def resize(inst: Instance, ep: int, weight_refs: dict | None, expert_map: ExpertMap | None = None,
           standby: StandbyPool | None = None) -> dict:
    """Scale `inst` to `ep` NPUs while it serves (NPUs from `standby` first; the
    ones a scale-down releases go back to it); returns the timings:
    prepare_s (new NPUs loaded, experts staged, the new group formed), pause_s
    (the switch between two steps), first_step_s (the switch's start to the
    first step on the new size; None when idle), total_s (the command to that
    step, or to the switch when idle); switch_at and first_step_at (wall clock,
    as the engine's step log: the end of the last step on the old size, where
    the pause starts, and the end of the first on the new); modelled_load_s,
    the longest modelled copy of a new NPU's weights into HBM in prepare_s
    (emulated compute, else 0);
    back, whether it returned to the layout of before the last scale-up
    (Instance.dormant: nothing staged, no group formed); first_step_error, why
    the first step on the new size failed, if it did (InstanceEngine.reconfigure)."""
    t0 = time.time()
    old_ep = inst.ep_size
    back = _back(inst, ep, expert_map)
    parked = None
    if back is not None and ep > old_ep:  # back up to the group its parked NPUs are still in
        parked = standby.take_parked(back[0].group_name, ep - old_ep) if standby is not None and inst.parked else None
        back = back if parked is not None else None
    specs = back or resized_specs(inst, ep, expert_map)
    if ep > old_ep:
        specs = _retaining(inst, specs)
    kept = inst.npus[: min(ep, old_ep)]
    if parked is not None:
        try:
            _adopt_parked(inst, kept, parked, specs, inst.parked)
            fresh, reports = parked, inst.parked
        except ray.exceptions.RayActorError:  # one died while parked: their group is broken; they go
            for n in parked:
                ray.kill(n)
            inst.parked, parked, back = None, None, None
            specs = _retaining(inst, resized_specs(inst, ep, expert_map))
    if parked is None:
        fresh, reports = _new_npus(inst, kept, specs, weight_refs, standby)
    prepared = time.time()
    # a scale-down back parks the NPUs it releases, if they are all the standby pool's
    # (not of the instance's placement groups, which keep theirs: see _switch)
    park = back is not None and ep < old_ep and standby is not None and \
        not any(n._actor_id.hex() in inst.bundles for n in inst.npus[ep:])
    info = _switch(inst, kept + fresh, specs, inst.memory[: len(kept)] + reports, standby=standby,
                   keep_previous=ep > old_ep or park, park=park)
    done = info.get("first_step_at", time.time())
    return {
        "instance": inst.name, "from_ep": old_ep, "to_ep": ep, "back": back is not None, "prepare_s": prepared - t0,
        "modelled_load_s": 0.0 if parked else max((r["load_s"] for r in reports), default=0.0),
        "pause_s": info["pause_s"], "first_step_s": info.get("first_step_s"), "migrated": info["migrated"],
        "total_s": done - t0, "switch_at": info["switch_at"], "first_step_at": info.get("first_step_at"),
        "first_step_error": info.get("first_step_error"),
    }


def rebuild(inst: Instance, weight_refs: dict | None, standby: StandbyPool | None = None) -> dict:
    """A new set of NPUs for an instance that lost one (its collective group is
    broken with it): same EP size and expert map, every NPU new (as a scale-up
    finds them; with a placement strategy the ones started now take the bundles of
    the ones they replace: the same nodes), the engine kept. Sequences it still
    holds recompute their KV on the new NPUs."""
    t0 = time.perf_counter()
    specs = resized_specs(inst, inst.ep_size, inst.specs[0].expert_map)
    nodes = [m["node"] for m in inst.memory]
    # the broken NPUs go first: their bundles (the instance's placement) take the new ones
    for n in inst.npus:
        ray.kill(n)
        inst.bundles.pop(n._actor_id.hex(), None)  # not released: their groups stay, for the new NPUs
    fresh, reports = _new_npus(inst, [], specs, weight_refs, standby, nodes, keep_groups=True)
    try:
        info = _switch(inst, fresh, specs, reports, recompute=True)
    except Exception:
        for n in fresh:
            ray.kill(n)
        inst.release(fresh, keep_groups=True)
        raise
    inst.release([])  # a group whose bundles no new NPU took (standby ones were) goes
    return {"instance": inst.name, "npus": len(specs), "recomputed": info["migrated"],
            "total_s": time.perf_counter() - t0}


def remap(inst: Instance, expert_map: ExpertMap) -> dict:
    """Apply a new expert map to `inst`'s NPUs while it serves (the switch is
    between two steps; each NPU stages the experts it gains beforehand)."""
    t0 = time.perf_counter()
    expert_map.validate(inst.specs[0].model.num_experts)
    if expert_map.ep_size != inst.ep_size:
        raise ValueError(f"expert_map: built for EP {expert_map.ep_size}, instance {inst.name} has {inst.ep_size}")
    specs = [replace(s, expert_map=expert_map, retain_dropped=False) for s in inst.specs]
    staged = ray.get([n.prepare.remote(s) for n, s in zip(inst.npus, specs)])  # bytes (the group stays)
    info = _switch(inst, inst.npus, specs, inst.memory)
    return {"instance": inst.name, "staged_bytes": sum(staged), "pause_s": info["pause_s"],
            "total_s": time.perf_counter() - t0}


def measured_expert_load(inst: Instance) -> dict[int, list[int]]:
    """Token-expert pairs routed per logical expert and layer, summed over the
    instance's NPUs (each counts what its own tokens chose)."""
    from cluster.metrics import total_expert_load

    return total_expert_load(ray.get(inst.engine.npu_stats.remote()))
