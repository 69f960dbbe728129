"""EP all-to-all over a real ray.util.collective gloo group, and EP instances
against the single-process reference."""

from __future__ import annotations

import sys
import uuid
from types import SimpleNamespace

import pytest
import ray
import torch
from torch import nn

from actors.ep import EPExperts, join_ep_group
from actors.expert_map import ExpertMap
from actors.model.router import RouterOutput
from actors.npu import NPU_RESOURCE
from cluster.config import load_manifest
from cluster.verify import run_verify


# the probe actor below lives in this test module, which workers cannot import
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _Scale(nn.Module):
    """Expert e multiplies by e + 1, so each output row says which expert made it."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


@ray.remote(num_cpus=0, resources={NPU_RESOURCE: 1})
class _EPProbe:
    def __init__(self, rank: int, slots: list[list[int]], num_experts: int, group: str):
        torch.set_num_threads(1)
        self.rank = rank
        pg = join_ep_group(len(slots), rank, "gloo", group)
        self.ep = EPExperts(ExpertMap({0: slots}), rank, num_experts, pg)
        self.moe = SimpleNamespace(layer=0, experts=nn.ModuleDict({str(e): _Scale(e + 1.0) for e in slots[rank]}))

    def run(self, x, ids):
        return self.ep.run(self.moe, x, RouterOutput(ids, torch.ones(ids.shape, dtype=x.dtype)))


def _round_trip(slots, num_experts, tokens_per_rank, k=2, seed=0):
    group = f"probe-{uuid.uuid4().hex[:6]}"
    probes = [_EPProbe.remote(r, slots, num_experts, group) for r in range(len(slots))]
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for t in tokens_per_rank:
        x = torch.randn(t, 8, generator=gen, dtype=torch.float64)
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
        inputs.append((x, ids))
    outs = ray.get([p.run.remote(x, ids) for p, (x, ids) in zip(probes, inputs)])
    for p in probes:
        ray.kill(p)
    return inputs, outs


@pytest.mark.parametrize(
    "slots,tokens",
    [
        ([[0, 1], [2, 3]], [5, 3]),
        ([[0, 1], [2, 3], [4, 5], [6, 7]], [7, 0, 4, 1]),  # a rank with no tokens still takes part
        ([[0, 1, 2], [0, 3, 4]], [6, 6]),  # expert 0 has two copies (Omni Placement redundancy)
    ],
)
def test_dispatch_combine_round_trips_tokens_exactly(ray_session, slots, tokens):
    num_experts = len({e for held in slots for e in held})
    inputs, outs = _round_trip(slots, num_experts, tokens)
    for (x, ids), out in zip(inputs, outs):
        assert out.shape == (x.shape[0], ids.shape[1], x.shape[1])
        expected = x.unsqueeze(1) * (ids.to(x.dtype) + 1).unsqueeze(-1)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("manifest", ["local", "tiny-mla"])
def test_ep_instances_match_reference(ray_session, manifest):
    rows = run_verify(load_manifest(manifest), [1, 2, 4], num_tokens=12)
    for row in rows:
        assert row.mismatched_tokens == 0, row
        assert row.max_logit_diff <= row.tolerance, row
        assert row.tokens == row.prompts * 12
