"""Expert parallelism: which NPU holds which expert, and the all-to-all that gets
tokens there and back.

Data flow of one MoE layer on rank r of an EP-N instance (every rank runs it
in lock step, with however many tokens it has, zero included):
  route (local) -> pick a physical copy of each token's experts -> sort the
  token-expert pairs by (destination rank, slot) -> exchange the per-(rank,
  slot) counts (all_to_all_single, equal splits) -> dispatch the hidden rows
  (all_to_all_single with split sizes) -> run the local experts slot by slot
  -> combine: send the outputs back the same way reversed -> un-permute into
  [T, k, hidden]. The MoE layer then weights and sums them, as in the reference.

The group is a `ray.util.collective` group of the OMNI_GLOO backend
(actors.collective: gloo, one torch process group per group, so the next EP
size's group can form while this one serves); Ray's collective API has no
all-to-all, so the group's own `all_to_all_single` carries the dispatch.
"""

from __future__ import annotations

import copy
import time

import torch

from actors.expert_map import ExpertMap
from actors.model.moe import MoELayer, apply_grouped
from actors.model.router import RouterOutput


class _LayerRoutes:
    """Lookup tables of one layer: logical expert -> copies; (rank, expert) -> slot."""

    def __init__(self, ranks: list[list[int]], num_experts: int):
        copies = [[r for r, held in enumerate(ranks) if e in held] for e in range(num_experts)]
        width = max(len(c) for c in copies)
        self.num_copies = torch.tensor([len(c) for c in copies])
        self.copy_rank = torch.tensor([c + [c[0]] * (width - len(c)) for c in copies])  # [E, width]
        self.num_slots = max(len(h) for h in ranks)
        slot = torch.full((len(ranks), num_experts), -1, dtype=torch.long)
        for r, held in enumerate(ranks):
            for s, e in enumerate(held):
                slot[r, e] = s
        self.slot = slot
        self.local = ranks


class EPExperts:
    """ExpertExecutor over an EP group: this rank's experts plus all-to-all."""

    def __init__(self, expert_map: ExpertMap, rank: int, num_experts: int, group=None):
        self.expert_map, self.rank, self.group = expert_map, rank, group
        self.world = expert_map.ep_size
        self.comm_s = 0.0  # wall seconds in all-to-alls, waits for the other ranks included
        self.routes = {layer: _LayerRoutes(ranks, num_experts) for layer, ranks in expert_map.slots.items()}

    def on(self, expert_map: ExpertMap, rank: int, num_experts: int, group) -> "EPExperts":
        """The executor for `expert_map` and `rank` over `group`: this one's lookup
        tables when they are the same map and rank (an NPU joining its group after
        loading, or committing a spec it was set up with), else new ones."""
        if (expert_map, rank) != (self.expert_map, self.rank):
            return EPExperts(expert_map, rank, num_experts, group)
        same = copy.copy(self)
        same.group = group
        return same

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits=None, in_splits=None) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.group.all_to_all_single(out, inp, out_splits, in_splits)
        finally:
            self.comm_s += time.perf_counter() - t0

    def run(self, moe: MoELayer, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        t, k = route.expert_ids.shape
        hidden = x.shape[-1]
        lr = self.routes[moe.layer]
        ids = route.expert_ids.reshape(-1)
        token = torch.arange(t).repeat_interleave(k)
        dest = lr.copy_rank[ids, token % lr.num_copies[ids]]
        slot = lr.slot[dest, ids]
        key = dest * lr.num_slots + slot
        order = torch.argsort(key, stable=True)
        send_counts = torch.bincount(key, minlength=self.world * lr.num_slots)
        recv_counts = self._a2a(torch.empty_like(send_counts), send_counts)
        send_split = send_counts.view(self.world, -1).sum(1).tolist()
        recv_split = recv_counts.view(self.world, -1).sum(1).tolist()
        recv = self._a2a(x.new_empty(sum(recv_split), hidden), x[token[order]], recv_split, send_split)
        # received rows: by source rank, then by slot; name each row's local expert
        slots_of_rows = torch.arange(lr.num_slots).repeat(self.world).repeat_interleave(recv_counts)
        held = torch.tensor(lr.local[self.rank] or [0])
        outputs = apply_grouped(moe.experts, recv, held[slots_of_rows])
        back = self._a2a(x.new_empty(t * k, hidden), outputs, send_split, recv_split)
        per_pair = torch.empty_like(back)
        per_pair[order] = back
        return per_pair.view(t, k, hidden)
