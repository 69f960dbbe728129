"""The engine's side of an elastic switch: an EP resize (ElasticMoE) or a new
expert map (Omni Placement), applied between two steps of the engine's loop.

The control plane (cluster.elastic) sets the new NPUs up, stages their experts
and forms their group while the instance serves; what is left here is the
switch itself: NPUs adopted ahead of it (their handles and block managers),
the KV export of the sequences on NPUs that leave, and the bookkeeping of the
switch (ranks, block managers, the executor), with no await inside it so that
the loop and aborts see it whole. The new specs ride on each NPU's next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import ray

from actors.engine.block_manager import BlockManager
from actors.engine.sequence import Sequence
from actors.executor import InstanceExecutor

logger = logging.getLogger(__name__)


@dataclass
class PendingSwitch:
    """A switch the engine's loop applies before its next step."""

    npus: list  # the NPU actors to step from then on, in rank order
    specs: list  # an NPUSpec each
    memory: list[dict]  # a memory report each
    done: asyncio.Future  # resolved by the switch: its report (or the error that failed it)
    recompute: bool  # a rebuild: the leaving NPUs cannot be read, their sequences recompute their KV
    exported: dict[str, tuple]  # seq id -> (ref of its leaving NPU's export, its first row there)


class ElasticSwitch:
    """What a switch needs beyond the engine's state: the NPUs adopted for it, the
    switch that waits for the loop, and what the last switch replaced (freed
    beside the next step, not in its pause). A companion of InstanceEngine: it
    reads and replaces the engine's executor, block managers and layout."""

    def __init__(self, engine):
        self.engine = engine
        self.pending: PendingSwitch | None = None
        self.adopted: dict[str, tuple[object, BlockManager]] = {}  # by actor id: NPUs set up for the next switch
        self.retired: tuple | None = None

    async def reconfigure(self, npus: list[str], specs: list, memory: list[dict], recompute: bool) -> dict:
        """See InstanceEngine.reconfigure."""
        eng = self.engine
        if self.pending is not None:
            raise RuntimeError(f"engine {eng.config.name}: a reconfiguration is already in progress")
        known = {n._actor_id.hex(): n for n in eng.executor.npus} | {k: n for k, (n, _) in self.adopted.items()}
        missing = [i for i in npus if i not in known]
        if missing:
            raise ValueError(f"npus: {', '.join(missing)} neither serve in nor were adopted by engine {eng.config.name}")
        t0 = time.time()
        # the leaving NPUs export their sequences' KV now: each runs its export right after
        # its steps in flight (a synchronous actor runs one caller's tasks in the order they
        # were sent), beside this engine's switch, so the first step on the new size finds it done
        exported = {} if recompute else self.export_kv(self.leaving(set(npus)), specs[0].compute == "real")
        switched = asyncio.get_running_loop().create_future()
        self.pending = PendingSwitch([known[i] for i in npus], specs, memory, switched, recompute, exported)
        eng._wake.set()
        info = await switched
        first = eng._next_step()
        exports = info.pop("exports")
        if exports:  # the leaving NPUs go once this returns: their KV must be out by then (the engine owns the copies)
            await asyncio.to_thread(ray.wait, exports, num_returns=len(exports), fetch_local=False)
        if first is not None:
            at, error = await first
            if at is not None:
                info["first_step_at"] = at  # wall clock, as the step log
                info["first_step_s"] = at - t0
            elif error is not None:  # switched all the same: its requests failed loudly, a lost NPU marks it unhealthy
                info["first_step_error"] = error
        return info

    async def adopt(self, npus: list, specs: list, weight_refs: dict | None, reports: list[dict] | None) -> list[dict]:
        """See InstanceEngine.adopt."""
        if reports is None:
            reports = list(await asyncio.gather(*(n.setup.remote(weight_refs, s) for n, s in zip(npus, specs))))
        else:
            await asyncio.gather(*(n.ready.remote() for n in npus))
        bs = self.engine.config.scheduler.block_size
        self.adopted.update((n._actor_id.hex(), (n, BlockManager(r["kv_blocks"], bs))) for n, r in zip(npus, reports))
        return reports

    def leaving(self, staying) -> list[Sequence]:
        """The running sequences on NPUs not among `staying` (actor ids) after a switch."""
        npus = self.engine.executor.npus
        return [s for s in self.engine.scheduler.running
                if s.rank is not None and npus[s.rank]._actor_id.hex() not in staying]

    def export_kv(self, seqs: list[Sequence], holds_data: bool) -> dict[str, tuple]:
        """The KV of `seqs`, each on an NPU that leaves: one export call and one object
        per NPU for all of its sequences (a call and an object a sequence would cost
        the NPU, the engine and the first step's fetch each, while the instance
        waits). Whole block tables: no step is sent between the command and the
        switch (the steps already sent grew them first). Returns, by sequence id,
        (the ref of its NPU's export, its first row there); the ref is None where
        the NPUs hold no KV data (emulated: the kept NPU models the copy from the
        block count alone)."""
        blocks, rows = {}, {}
        for seq in seqs:
            exported = blocks.setdefault(seq.rank, [])
            rows[seq.seq_id] = (seq.rank, len(exported))
            exported += seq.block_table
        npus = self.engine.executor.npus
        refs = {r: npus[r].export_blocks.remote(b) for r, b in blocks.items() if b and holds_data}
        self.engine.counters.kv_exports += len(refs)
        return {seq_id: (refs.get(r), first) for seq_id, (r, first) in rows.items()}

    async def apply(self) -> None:
        """The loop's part: switch to the pending NPUs (no step in flight)."""
        switch, self.pending = self.pending, None
        t0, switch_at = time.monotonic(), time.time()  # the old size's last step is in the step log
        eng = self.engine
        try:
            # the sequences on leaving NPUs, their KV exported when the command came
            # (those of them still running: none came since, no step ran between)
            moving = self.leaving({n._actor_id.hex() for n in switch.npus})
            specs = switch.specs
            if not eng.scheduler.has_work():  # no step to carry the specs: switch the NPUs now
                await asyncio.gather(*(n.commit.remote(s) for n, s in zip(switch.npus, specs)))
                specs = None
        except Exception as err:
            logger.exception("engine %s: reconfiguration failed", eng.config.name)
            eng.healthy = False
            for seq in list(eng.seqs.values()):
                eng._fail(seq, f"engine {eng.config.name}: reconfiguration failed: {err}")
            switch.done.set_exception(err)
            return
        self._rebind(switch, moving, specs)  # no await from here on: atomic for the loop and for aborts
        # the exports finish beside the first step (whose imports wait for them), not in the pause
        exports = list(dict.fromkeys(ref for ref, _ in switch.exported.values() if ref is not None))
        switch.done.set_result({"ep": len(switch.npus), "pause_s": time.monotonic() - t0, "switch_at": switch_at,
                                "migrated": len(moving), "exports": exports})

    def _rebind(self, switch: PendingSwitch, moving: list[Sequence], specs: list | None) -> None:
        """The engine steps `switch.npus` from now on: kept NPUs keep their block
        managers and sequences (re-ranked), adopted ones bring theirs, and the
        sequences of leaving NPUs wait to load their exported KV on another."""
        eng = self.engine
        old = eng.executor.npus
        old_rank = {n._actor_id.hex(): r for r, n in enumerate(old)}
        new_rank = {n._actor_id.hex(): r for r, n in enumerate(switch.npus)}
        bs = eng.config.scheduler.block_size
        managers = []
        for npu in switch.npus:
            kept = old_rank.get(npu._actor_id.hex())  # else adopted (reconfigure checked): its manager is built
            managers.append(eng.managers[kept] if kept is not None else self.adopted[npu._actor_id.hex()][1])
        for seq in eng.scheduler.running:
            if seq.rank is not None and old[seq.rank]._actor_id.hex() in new_rank:
                seq.rank = new_rank[old[seq.rank]._actor_id.hex()]
        for seq in moving:
            if not seq.finish_reason:  # block i of its KV: row first + i of its old NPU's export (on its node)
                ref, first = switch.exported.get(seq.seq_id, (None, 0))
                tokens = seq.num_computed if seq.seq_id in switch.exported else 0  # else (a rebuild) it recomputes
                eng.scheduler.migrate(seq, [[ref, first + i] for i in range(-(-tokens // bs))], tokens,
                                      eng.nodes[seq.rank])
        self.retired = (eng.executor, eng.managers, self.adopted)
        eng.managers = eng.scheduler.managers = managers
        eng.prefixes.recount(managers)
        eng.nodes = [m.get("node") for m in switch.memory]
        eng.executor = InstanceExecutor(switch.npus, specs)
        eng._layout = (list(switch.npus), list(switch.specs), list(switch.memory))
        self.adopted = {}  # the ones not switched to went back to the standby pool or away
        eng.counters.reconfigurations += 1
        eng.counters.migrated_seqs += len(moving)
        eng.healthy = True
