"""The emulated Ascend NPU: one Ray actor per NPU.

It owns an HBM ledger of its device's capacity, a cost model of its chip, and
a compute (real torch math on its shard, or emulated timing). An instance's
NPUs form one collective group for the EP all-to-all. Torch is imported only
by real compute, so a 718B-shaped emulated instance starts in seconds.
"""

from __future__ import annotations

import ray

import os

from actors.cost_model import CostModel
from actors.devices import get_device
from actors.hbm import HBMLedger
from actors.protocol import NPUBatch, NPUSpec, NPUStepResult

NPU_RESOURCE = "omni_npu"  # never "NPU": Ray reserves that for real Ascend devices


class NPUActor:
    def __init__(self, spec: NPUSpec):
        self._adopt(spec)

    def _adopt(self, spec: NPUSpec) -> None:
        self.spec = spec
        self.device = get_device(spec.device)
        self.ledger = HBMLedger(spec.name, self.device.hbm_bytes)
        self.cost = CostModel(self.device)
        self.compute = None
        self.group_joined: str | None = None  # the collective group this process is in
        self.device_time_s = 0.0
        self.steps = 0

    def ready(self) -> str:
        return self.spec.name

    def warm(self) -> str:
        """A standby NPU: import what real compute needs now, so that joining an
        instance later costs only loading weights."""
        if self.spec.compute == "real":
            import actors.compute.real  # noqa: F401  (torch and the model code)
        return self.spec.name

    def setup(self, weight_refs: dict | None, join_group: bool = True, spec: NPUSpec | None = None) -> dict:
        """Load this NPU's weights and (real compute, EP > 1) join the EP group.
        `spec` gives a standby NPU its place; `join_group=False` leaves the group
        to `commit`, when a resized instance forms its new group."""
        if spec is not None:
            self._adopt(spec)
        if self.spec.compute == "real":
            import torch

            torch.set_num_threads(int(os.environ.get("OMNIRAY_NPU_THREADS", "1")))
            from actors.compute.real import RealCompute

            self.compute = RealCompute(self.spec, self.ledger, self.cost, None)
        else:
            from actors.compute.emulated import EmulatedCompute

            self.compute = EmulatedCompute(self.spec, self.ledger, self.cost)
        self.compute.load_weights(weight_refs)
        if join_group:
            self.compute.remap(self.spec, self._join(self.spec))
        return self._report()

    def _report(self) -> dict:
        return self.ledger.report() | {"kv_blocks": self.compute.num_blocks, "block_size": self.spec.block_size}

    def _join(self, spec: NPUSpec):
        """Leave the current collective group and join spec's (real compute, EP > 1);
        returns its torch process group. One default torch process group per
        process: it goes with the old group, and the new one brings its own."""
        if spec.compute != "real":
            return None
        if self.group_joined == spec.group_name:
            return self.compute.experts.group
        if self.group_joined is not None:
            import torch.distributed as dist
            from ray.util import collective

            collective.destroy_collective_group(self.group_joined)
            if dist.is_initialized():
                dist.destroy_process_group()
            self.group_joined = None
        if spec.ep_size == 1:
            return None
        from actors.ep import join_ep_group

        group = join_ep_group(spec.ep_size, spec.rank, spec.backend, spec.group_name)
        self.group_joined = spec.group_name
        return group

    # ---- elastic: a new expert map or EP size, applied between two steps ------------------
    def prepare(self, spec: NPUSpec) -> int:
        """Stage the experts `spec` assigns this NPU (while the instance keeps serving)."""
        return self.compute.prepare(spec)

    def commit(self, spec: NPUSpec) -> dict:
        """Switch to `spec`: join its collective group (all the instance's NPUs call
        this together) and install the staged experts."""
        group = self._join(spec)
        self.compute.remap(spec, group)
        self.spec = spec
        return self._report()

    def export_blocks(self, blocks: list[int]):
        """KV blocks of a sequence leaving this NPU (one return value per block)."""
        out = self.compute.export_blocks(blocks)
        return out[0] if len(out) == 1 else tuple(out)

    def step(self, batch: NPUBatch) -> NPUStepResult:
        result = self.compute.step(batch)
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
            "node": ray.get_runtime_context().get_node_id(),
            "experts": {str(layer): ids for layer, ids in self.spec.expert_map.held_by(self.spec.rank).items()},
        }
