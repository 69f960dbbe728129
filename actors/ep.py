"""Expert parallelism: which NPU holds which expert, and the all-to-all that gets
tokens there and back.

Data flow of one MoE layer on rank r of an EP-N instance (every rank runs it
in lock step, with however many tokens it has, zero included):
  route (local) -> pick a physical copy of each token's experts -> sort the
  token-expert pairs by (destination rank, slot) -> dispatch: to every rank one
  fixed-size block, a header of the per-slot counts then the hidden rows
  (all_to_all_single, equal splits) -> run the local experts slot by slot ->
  combine: the outputs back in blocks of the same capacity -> un-permute into
  [T, k, hidden]. The MoE layer then weights and sums them, as in the reference.
Two all-to-alls a layer: the counts travel with the rows, so no exchange of
counts goes first. A block holds `max_rows * k` rows, where `max_rows` (the
most token rows any rank feeds this step) comes with the step from the engine:
no rank can send another more. The blocks are bytes, so the counts stay exact
whatever the model's dtype. Without a bound (a forward outside an engine step)
the counts are exchanged first, then rows with split sizes: three all-to-alls.

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
        self.comm_calls = 0  # all-to-alls made
        self.max_rows: int | None = None  # the step's bound on any rank's token rows (set per step)
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
        self.comm_calls += 1
        try:
            return self.group.all_to_all_single(out, inp, out_splits, in_splits)
        finally:
            self.comm_s += time.perf_counter() - t0

    def run(self, moe: MoELayer, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        t, k = route.expert_ids.shape
        lr = self.routes[moe.layer]
        ids = route.expert_ids.reshape(-1)
        token = torch.arange(t).repeat_interleave(k)
        dest = lr.copy_rank[ids, token % lr.num_copies[ids]]
        slot = lr.slot[dest, ids]
        key = dest * lr.num_slots + slot
        order = torch.argsort(key, stable=True)
        send_counts = torch.bincount(key, minlength=self.world * lr.num_slots)
        rows = x[token[order]]
        if self.max_rows is None:
            recv, recv_counts, back = self._exchange_counted(rows, send_counts)
        else:
            recv, recv_counts, back = self._exchange_blocks(rows, send_counts, lr.num_slots, self.max_rows * k)
        # received rows: by source rank, then by slot; name each row's local expert
        slots_of_rows = torch.arange(lr.num_slots).repeat(self.world).repeat_interleave(recv_counts)
        held = torch.tensor(lr.local[self.rank] or [0])
        outputs = apply_grouped(moe.experts, recv, held[slots_of_rows])
        per_pair = torch.empty(t * k, x.shape[-1], dtype=x.dtype)
        per_pair[order] = back(outputs)
        return per_pair.view(t, k, x.shape[-1])

    def _exchange_counted(self, rows: torch.Tensor, send_counts: torch.Tensor):
        """Counts first, then the rows with split sizes: (received rows, received
        counts per (source, slot), the combine that sends outputs back)."""
        recv_counts = self._a2a(torch.empty_like(send_counts), send_counts)
        send_split = send_counts.view(self.world, -1).sum(1).tolist()
        recv_split = recv_counts.view(self.world, -1).sum(1).tolist()
        recv = self._a2a(rows.new_empty(sum(recv_split), rows.shape[-1]), rows, recv_split, send_split)
        return recv, recv_counts, lambda out: self._a2a(rows.new_empty(rows.shape), out, send_split, recv_split)

    def _exchange_blocks(self, rows: torch.Tensor, send_counts: torch.Tensor, num_slots: int, capacity: int):
        """One fixed-size block per rank, its counts in a header: the same as
        _exchange_counted with one all-to-all less."""
        row_bytes = rows.shape[-1] * rows.element_size()
        head = -(-num_slots * 4 // 8) * 8  # int32 counts, padded so the rows stay aligned for any dtype
        per_dest = send_counts.view(self.world, num_slots)
        send_split = per_dest.sum(1).tolist()
        if max(send_split) > capacity:
            raise RuntimeError(f"EP dispatch: {max(send_split)} rows for one rank over the step's bound {capacity}")
        send = torch.zeros(self.world, head + capacity * row_bytes, dtype=torch.uint8)
        send[:, : num_slots * 4] = per_dest.to(torch.int32).contiguous().view(torch.uint8)
        _pack(send[:, head:], rows, send_split, row_bytes)
        got = self._a2a(torch.empty_like(send), send)
        recv_counts = got[:, : num_slots * 4].contiguous().view(torch.int32).reshape(-1).long()
        recv_split = recv_counts.view(self.world, -1).sum(1).tolist()
        recv = _unpack(got[:, head:], recv_split, rows.dtype, rows.shape[-1])

        def back(outputs: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(self.world, capacity * row_bytes, dtype=torch.uint8)
            _pack(out, outputs, recv_split, row_bytes)
            return _unpack(self._a2a(torch.empty_like(out), out), send_split, rows.dtype, rows.shape[-1])

        return recv, recv_counts, back


def _pack(blocks: torch.Tensor, rows: torch.Tensor, split: list[int], row_bytes: int) -> None:
    """Rows (in destination order, `split` of them for each) into each destination's byte block."""
    flat = rows.contiguous().view(torch.uint8).reshape(-1)
    start = 0
    for d, n in enumerate(split):
        blocks[d, : n * row_bytes] = flat[start : start + n * row_bytes]
        start += n * row_bytes


def _unpack(blocks: torch.Tensor, split: list[int], dtype: torch.dtype, hidden: int) -> torch.Tensor:
    """The rows each source's byte block holds (`split` of them), in source order."""
    item = dtype.itemsize
    parts = [blocks[s, : n * hidden * item].contiguous().view(dtype).view(n, hidden) for s, n in enumerate(split)]
    return torch.cat(parts) if parts else torch.empty(0, hidden, dtype=dtype)
