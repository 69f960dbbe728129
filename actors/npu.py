"""The emulated Ascend NPU: one Ray actor per NPU.

It owns an HBM ledger of its device's capacity, a cost model of its chip, and
a compute (real torch math on its shard, or emulated timing). An instance's
NPUs form one collective group for the EP all-to-all (two while a resize forms
the next one beside the current: control calls run in their own thread). Torch
is imported only by real compute, so a 718B-shaped emulated instance starts in
seconds.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import replace

import ray

from actors.cost_model import CostModel
from actors.devices import get_device
from actors.hbm import HBMLedger
from actors.protocol import NPUBatch, NPUSpec, NPUStepResult

NPU_RESOURCE = "omni_npu"  # never "NPU": Ray reserves that for real Ascend devices


def _lower_this_thread() -> None:
    """Put the calling thread below every serving thread of the host: SCHED_IDLE
    (it runs on otherwise idle CPU), else the lowest niceness. Never an absolute
    nice value above the current one: Ray starts its workers niced already (15),
    and `setpriority(10)` would have raised such a thread above the steps.
    Linux schedules per thread; elsewhere, or when not allowed, nothing changes."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except (AttributeError, OSError):
        pass


def _below_serving(fn, *args):
    """Run fn in a short-lived thread below every serving thread: a new NPU
    loading its weights shares its host's cores with the NPUs that serve, and
    must not slow their steps. Only for an NPU not serving yet: in one that
    serves, a low-priority thread holding the GIL would stall its own steps. fn
    must not start threads that outlive it (they would inherit its priority)."""
    out: dict = {}

    def run():
        _lower_this_thread()
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # re-raised in the caller's thread
            out["error"] = err

    t = threading.Thread(target=run, name="npu-load")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _node() -> str:
    """The id of the Ray node this process runs on."""
    return ray.get_runtime_context().get_node_id()


def _set_torch_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMNIRAY_NPU_THREADS", "1")))


def _import_compute(mode: str) -> None:
    if mode == "real":
        import actors.collective  # noqa: F401  (torch.distributed)
        import actors.compute.real  # noqa: F401  (torch and the model code)
    else:
        import actors.compute.emulated  # noqa: F401  (numpy and the cost model)


class NPUActor:
    def __init__(self, spec: NPUSpec):
        self.warm_replica = None  # a standby NPU's replicated model and KV pool, built while it waited
        self.weight_refs: dict | None = None  # the object-store refs it warmed with (setup need not resend them)
        self._adopt(spec)

    def _adopt(self, spec: NPUSpec) -> None:
        self.spec = spec
        self.device = get_device(spec.device)
        self.ledger = HBMLedger(spec.name, self.device.hbm_bytes)
        self.cost = CostModel(self.device)
        self.compute = None
        self.groups: dict = {}  # collective groups this process is in, by name (two during a resize)
        self.forming: dict = {}  # groups still forming in their own thread (collective.PendingGroup), by name
        self.device_time_s = 0.0
        self.steps = 0
        self.sampled: dict[str, int] = {}  # seq id -> the token its last step sampled
        self.prepares = 0  # prepare calls: experts staged from elsewhere ahead of a switch

    def ready(self) -> str:
        return self.spec.name

    def warm(self, weight_refs: dict | None = None) -> str:
        """A standby NPU: import what its compute needs now (torch and the model
        code, or the emulator) and put in place the part of the model every NPU
        holds (real compute: built, its weights loaded from the object store, and
        the KV pool; emulated: the modelled copy of those weights into HBM; no HBM
        charged yet), so that joining an instance later costs only its experts.
        Returns its node's id (where a scale-up may place it)."""
        self.weight_refs = weight_refs
        _below_serving(self._prebuild, weight_refs)
        return _node()

    def _prebuild(self, weight_refs: dict | None) -> None:
        _import_compute(self.spec.compute)
        if weight_refs and self.spec.compute == "real":
            from actors.compute.real import WarmReplica

            _set_torch_threads()
            self.warm_replica = WarmReplica.build(self.spec, weight_refs)
        elif self.spec.compute != "real":
            from actors.compute.emulated import EmulatedReplica

            self.warm_replica = EmulatedReplica.build(self.spec, self.cost)

    @ray.method(concurrency_group="control")
    def setup(self, weight_refs: dict | None, spec: NPUSpec | None = None) -> dict:
        """Load this NPU's weights (what it built as a standby NPU aside) below
        serving priority (an NPU set up is not serving yet), then (real compute,
        EP > 1) join its EP group. Not the joining: threads inherit their creator's
        scheduling, and the group's gloo threads carry every all-to-all of this
        NPU's life. `spec` gives a standby NPU its place; `weight_refs` None: the
        ones it warmed with (a dict of refs costs both ends of every call that
        carries it: Ray registers each ref passed as a borrowed reference)."""
        if spec is not None:
            self._adopt(spec)
        if weight_refs is not None:
            self.weight_refs = weight_refs  # kept: a recycled NPU loads again from them
        _below_serving(self._load, self.weight_refs)
        self.compute.remap(self.spec, self._group(self.spec))
        return self._report()

    def _load(self, weight_refs: dict | None) -> None:
        if self.spec.compute == "real":
            from actors.compute.real import RealCompute

            _set_torch_threads()
            self.compute = RealCompute(self.spec, self.ledger, self.cost, None)
            self.compute.load_weights(weight_refs, self.warm_replica)
            self.warm_replica = None
        else:
            from actors.compute.emulated import EmulatedCompute

            self.compute = EmulatedCompute(self.spec, self.ledger, self.cost)
            self.compute.load_weights(weight_refs, self.warm_replica)
            self.warm_replica = None

    def _report(self) -> dict:
        # load_s: the modelled seconds its weights took to load (emulated compute; real compute takes them)
        return self.ledger.report() | {"kv_blocks": self.compute.num_blocks, "block_size": self.spec.block_size,
                                       "load_s": getattr(self.compute, "load_s", 0.0), "node": _node()}

    def _group(self, spec: NPUSpec):
        """spec's collective group (real compute, EP > 1): formed ahead by
        form_group, else joined now with the instance's other NPUs."""
        if not spec.has_group:
            return None
        name = spec.group_name
        if name in self.forming:
            self.groups[name] = self.forming.pop(name).wait()
        elif name not in self.groups:
            from actors import collective

            self.groups[name] = collective.join(spec.ep_size, spec.rank, name)
        return self.groups[name]

    @ray.method(concurrency_group="control")
    def leave_groups_but(self, keep: list[str]) -> None:
        """Leave every collective group not in `keep` (after a switch, off its pause:
        the new group, and the previous one when a scale-up keeps it to scale back
        to), and forget the ones still forming (from a resize that failed: they
        give up after the collective's timeout)."""
        for name in [n for n in self.forming if n not in keep]:
            pending = self.forming.pop(name)
            try:
                if pending.done():
                    self.groups[name] = pending.wait()
            except Exception:
                pass  # it failed to form: nothing to leave
        leaving = [n for n in self.groups if n not in keep]
        if not leaving:  # (emulated NPUs never import torch)
            return
        from actors import collective

        for name in leaving:
            collective.leave(name)
            del self.groups[name]

    @ray.method(concurrency_group="control")
    def recycle(self, spec: NPUSpec) -> str:
        """Back to standby, as `spec` (an instance released this NPU): leave its
        groups, drop its experts, keep the replicated model and the KV pool (real
        compute; emulated: the replicated weights in its HBM) as the warm replica a
        standby builds, so the next adoption costs
        only its experts and no process has to start. In the control thread, so
        that an adoption sent after it (setup) runs after it. Returns its node's id."""
        self.leave_groups_but([])
        replica = self.compute.release() if self.compute is not None else None
        self._adopt(spec)
        self.warm_replica = replica
        return _node()

    # ---- elastic: a new expert map or EP size, applied between two steps ------------------
    # prepare and form_group run in the "control" thread, beside the steps: the
    # instance keeps serving on its current group and experts meanwhile.
    @ray.method(concurrency_group="control")
    def prepare(self, spec: NPUSpec) -> int:
        """Stage the experts `spec` assigns this NPU (while the instance keeps serving)."""
        self.prepares += 1
        return self.compute.prepare(spec)

    @ray.method(concurrency_group="control")
    def form_group(self, spec: NPUSpec) -> None:
        """Start forming `spec`'s collective group with its other NPUs (all call this
        together) while this NPU still serves in its current one; returns at once
        (see collective.PendingGroup: no task of a serving NPU waits on its peers).
        The caller waits for the group in the GCS (actors.group_status)."""
        if not spec.has_group or spec.group_name in self.groups:
            return
        if spec.group_name not in self.forming:
            from actors import collective

            self.forming[spec.group_name] = collective.PendingGroup(spec.ep_size, spec.rank, spec.group_name)

    def commit(self, spec: NPUSpec) -> None:
        """Switch to `spec` between two steps (called by the step whose batch carries
        it, or by the engine when it is idle): its collective group (formed ahead
        by form_group, else now) and the staged experts; the previous group stays
        until leave_groups_but, after the switch. No report: it would cost the
        switch's first step, and the controller has the NPU's from its setup."""
        group = self._group(spec)
        self.compute.remap(spec, group)
        self.spec = spec

    def export_blocks(self, blocks: list[int]):
        """KV blocks of the sequences leaving this NPU, as one array (a row each): one
        call and one object to fetch for all of them, not one a block or a sequence
        (each costs its owner and its reader calls).
        Real compute only: an emulated NPU holds no KV data (the engine asks none)."""
        return self.compute.export_blocks(blocks)

    # one call per step, on the hot path: no task events, which would fill the GCS's
    # task-event buffer (hundreds of MiB over a 20-minute soak, `omniray bench chaos --faults none`)
    @ray.method(enable_task_events=False)
    def step(self, batch: NPUBatch) -> NPUStepResult:
        if batch.spec is not None:
            self.commit(batch.spec)
        if any(w.follows for w in batch.seqs):
            batch = replace(batch, seqs=[replace(w, token_ids=[self.sampled[w.seq_id]]) if w.follows else w
                                         for w in batch.seqs])
        result = self.compute.step(batch)
        self.sampled = result.tokens  # what a follow-on step (SeqWork.follows) feeds
        self.device_time_s += result.device_time_s
        self.steps += 1
        return result

    def free(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self.compute.free(seq_id)

    def memory(self) -> dict:
        return self.ledger.report()

    def stats(self) -> dict:
        return {
            "name": self.spec.name,
            "rank": self.spec.rank,
            "device": self.device.name,
            "compute": self.spec.compute,
            "steps": self.steps,
            "device_time_s": self.device_time_s,
            "hbm": self.ledger.report(),
            "expert_load": self.compute.expert_load() if self.compute else {},
            "node": _node(),
            "groups": sorted(self.groups),
            "tensors_fetched": getattr(self.compute, "tensors_fetched", 0),  # at load, from the object store
            "prepares": self.prepares,
            "kv_blocks_loaded": dict(getattr(self.compute, "kv_blocks_loaded", {})),  # by link: see kv_pool.blocks_loaded
            "torch_imported": "torch" in sys.modules,  # emulated NPUs never need it
            "experts": {str(layer): ids for layer, ids in self.spec.expert_map.held_by(self.spec.rank).items()},
        }
