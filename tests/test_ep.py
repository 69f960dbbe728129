"""EP all-to-all over a real ray.util.collective gloo group, and EP instances
against the single-process reference."""

from __future__ import annotations

import sys
import time
import uuid
from types import SimpleNamespace

import pytest
import ray
import torch
from torch import nn

from actors import collective as omni_collective
from actors import group_status
from actors.ep import EPExperts
from actors.expert_map import ExpertMap
from actors.model.router import RouterOutput
from actors.npu import NPU_RESOURCE
from cluster.config import load_manifest
from cluster.verify import run_verify

pytestmark = pytest.mark.ray


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
        pg = omni_collective.join(len(slots), rank, group)
        self.ep = EPExperts(ExpertMap({0: slots}), rank, num_experts, pg)
        self.moe = SimpleNamespace(layer=0, experts=nn.ModuleDict({str(e): _Scale(e + 1.0) for e in slots[rank]}))

    def run(self, x, ids, max_rows=None):
        """The layer's output and the all-to-alls it took."""
        self.ep.max_rows, before = max_rows, self.ep.comm_calls
        out = self.ep.run(self.moe, x, RouterOutput(ids, torch.ones(ids.shape, dtype=x.dtype)))
        return out, self.ep.comm_calls - before


def _round_trip(slots, num_experts, tokens_per_rank, k=2, seed=0, bounded=False, dtype=torch.float64):
    """Each rank's (input, expert ids) and (output, all-to-alls); `bounded`: the
    step's bound on rows comes along, as in an engine step."""
    group = f"probe-{uuid.uuid4().hex[:6]}"
    probes = [_EPProbe.remote(r, slots, num_experts, group) for r in range(len(slots))]
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for t in tokens_per_rank:
        x = torch.randn(t, 8, generator=gen, dtype=torch.float64).to(dtype)
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
        inputs.append((x, ids))
    bound = max(tokens_per_rank) if bounded else None
    outs = ray.get([p.run.remote(x, ids, bound) for p, (x, ids) in zip(probes, inputs)])
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
@pytest.mark.parametrize("bounded", [True, False], ids=["counts-in-header", "counts-first"])
def test_dispatch_combine_round_trips_tokens_exactly(ray_session, slots, tokens, bounded):
    """With the step's bound the counts travel in the dispatch's header (two
    all-to-alls); without it they go first (three). Either way every row comes
    back from the expert it was sent to."""
    num_experts = len({e for held in slots for e in held})
    inputs, outs = _round_trip(slots, num_experts, tokens, bounded=bounded)
    for (x, ids), (out, calls) in zip(inputs, outs):
        assert out.shape == (x.shape[0], ids.shape[1], x.shape[1])
        expected = x.unsqueeze(1) * (ids.to(x.dtype) + 1).unsqueeze(-1)
        assert torch.equal(out, expected)
        assert calls == (2 if bounded else 3)


def test_header_counts_stay_exact_in_bfloat16(ray_session):
    """300 rows for one slot: a count bfloat16 cannot hold (the header is bytes)."""
    inputs, outs = _round_trip([[0], [1]], 2, [300, 2], bounded=True, dtype=torch.bfloat16)
    for (x, ids), (out, calls) in zip(inputs, outs):
        assert torch.equal(out, x.unsqueeze(1) * (ids.to(x.dtype) + 1).unsqueeze(-1)) and calls == 2


@pytest.mark.parametrize("manifest, ep_sizes", [("local", [1, 2, 4]), ("tiny-mla", [4])])  # tiny-mla at 1, 2: test_cli
def test_ep_instances_match_reference(ray_session, manifest, ep_sizes):
    rows = run_verify(load_manifest(manifest), ep_sizes, num_tokens=12)
    for row in rows:
        assert row.mismatched_tokens == 0, row
        assert row.max_logit_diff <= row.tolerance, row
        assert row.tokens == row.prompts * 12


def test_a_members_failure_to_form_a_group_reaches_whoever_waits_for_it(ray_session):
    name = f"f-{uuid.uuid4().hex[:6]}"
    group_status.record(name, 0)
    assert not group_status.formed(name, 2)
    group_status.record(name, 1, TimeoutError("rank 0 did not publish its address"))
    with pytest.raises(RuntimeError, match=r"rank 1 failed to form it: .*did not publish its address"):
        group_status.wait_formed(name, 2, timeout_s=5)
    group_status.forget(name)
    with pytest.raises(TimeoutError, match="did not form within"):
        group_status.wait_formed(name, 2, timeout_s=0.05)


def test_a_failure_recorded_after_its_waiter_gave_up_is_swept_later(ray_session):
    """A member that gives up after the controller did (and forgot the group)
    leaves a record no one reads: the next formation's sweep takes it."""
    name = f"late-{uuid.uuid4().hex[:6]}"
    group_status.record(name, 3, TimeoutError("rank 0 did not publish its address"))
    assert group_status.sweep(older_than_s=3600) == 0  # written just now: someone may still wait for it
    time.sleep(0.05)
    assert group_status.sweep(older_than_s=0.01) >= 1
    assert group_status.formed(name, 1) is False  # its failure would raise here: it is gone


@ray.remote(num_cpus=0, resources={NPU_RESOURCE: 1}, concurrency_groups={"control": 1})
class _GroupMember:
    """A process in several OMNI_GLOO groups at once, as an NPU is during a resize
    (a group forms in a thread of its own, as NPUActor.form_group starts it)."""

    def __init__(self):
        self.pending = {}

    @ray.method(concurrency_group="control")
    def join(self, world: int, rank: int, name: str) -> int:
        return omni_collective.join(world, rank, name).world_size

    @ray.method(concurrency_group="control")
    def start(self, world: int, rank: int, name: str) -> None:
        self.pending[name] = omni_collective.PendingGroup(world, rank, name)

    @ray.method(concurrency_group="control")
    def formed(self, name: str) -> bool:
        return self.pending[name].done()

    def a2a(self, name: str, inp: torch.Tensor) -> torch.Tensor:
        from ray.util.collective.collective import _group_mgr

        return _group_mgr.get_group_by_name(name).all_to_all_single(torch.empty_like(inp), inp)

    def allreduce(self, name: str, value: float) -> float:
        from ray.util import collective

        t = torch.tensor([value])
        collective.allreduce(t, group_name=name)
        return t.item()

    def leave(self, name: str) -> bool:
        omni_collective.leave(name)
        from ray.util import collective

        return collective.is_group_initialized(name)


def test_a_process_holds_two_groups_and_the_old_one_serves_while_the_new_one_forms(ray_session):
    """ElasticMoE's pre-formed group: members 0, 1 keep exchanging on group A
    while A's members and a third process form group B; then both work, by name,
    through ray.util.collective, and leaving A leaves B intact."""
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    m = [_GroupMember.remote() for _ in range(3)]
    try:
        ray.get([m[r].join.remote(2, r, a) for r in range(2)])
        # B's ranks 1, 2 start forming (the calls return at once: no task waits on its peers);
        # rank 0 of B is not there yet, so B cannot finish
        ray.get([m[r].start.remote(3, r, b) for r in (1, 2)], timeout=30)
        out_a = ray.get([m[r].a2a.remote(a, torch.tensor([10.0 * r, 10.0 * r + 1])) for r in range(2)])
        assert [o.tolist() for o in out_a] == [[0.0, 10.0], [1.0, 11.0]]
        assert ray.get([m[r].formed.remote(b) for r in (1, 2)]) == [False, False]  # still forming while A served
        assert not group_status.formed(b, 3)  # what the controller waits on, in the GCS
        ray.get(m[0].start.remote(3, 0, b))
        group_status.wait_formed(b, 3, timeout_s=60)
        assert ray.get([m[r].formed.remote(b) for r in range(3)]) == [True] * 3
        group_status.forget(b)
        assert not group_status.formed(b, 3)
        out_b = ray.get([m[r].a2a.remote(b, torch.arange(3.0) + 3 * r) for r in range(3)])
        assert [o.tolist() for o in out_b] == [[0.0, 3.0, 6.0], [1.0, 4.0, 7.0], [2.0, 5.0, 8.0]]
        assert ray.get([m[r].allreduce.remote(a, r + 1.0) for r in range(2)]) == [3.0, 3.0]
        assert ray.get([m[r].leave.remote(a) for r in range(2)]) == [False, False]
        assert ray.get([m[r].allreduce.remote(b, r + 1.0) for r in range(3)]) == [6.0] * 3
    finally:
        for member in m:
            ray.kill(member)
