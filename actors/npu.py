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
        self.spec = spec
        self.device = get_device(spec.device)
        self.ledger = HBMLedger(spec.name, self.device.hbm_bytes)
        self.cost = CostModel(self.device)
        self.compute = None
        self.device_time_s = 0.0
        self.steps = 0

    def ready(self) -> str:
        return self.spec.name

    def setup(self, weight_refs: dict | None) -> dict:
        """Join the EP group (real compute, EP > 1) and load this NPU's weights."""
        if self.spec.compute == "real":
            import torch

            torch.set_num_threads(int(os.environ.get("OMNIRAY_NPU_THREADS", "1")))
            from actors.compute.real import RealCompute

            from actors.ep import join_ep_group

            spec = self.spec
            group = join_ep_group(spec.ep_size, spec.rank, spec.backend, spec.group_name) if spec.ep_size > 1 else None
            self.compute = RealCompute(self.spec, self.ledger, self.cost, group)
        else:
            from actors.compute.emulated import EmulatedCompute

            self.compute = EmulatedCompute(self.spec, self.ledger, self.cost)
        self.compute.load_weights(weight_refs)
        return self.ledger.report() | {"kv_blocks": self.compute.num_blocks, "block_size": self.spec.block_size}

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
