"""Omni Placement: per-layer expert -> NPU maps with redundant copies of hot experts.

Why
---
Under expert parallelism every NPU of an EP instance runs its own experts, and
all NPUs of a MoE layer advance in lock step (the all-to-all waits for the
slowest). A layer therefore costs what its most loaded NPU costs. Routers are
far from uniform: a few hot experts take a large share of the token-expert
pairs, so the contiguous layout (rank r holds experts r*E/N .. (r+1)*E/N - 1)
leaves the ranks that hold hot experts as stragglers while the others idle.

Omni Placement spends a small per-NPU budget of extra expert slots (HBM for
redundant weights) on copies of the hottest experts, and picks which rank holds
what, from measured per-expert load, so that the maximum NPU load per layer is
as low as it can get. The data plane (actors.ep) splits a replicated expert's
token-expert pairs evenly among its copies (by token index modulo the number
of copies), so a copy of an expert with load L and c copies carries L / c.

Algorithm (one layer; deterministic, ties go to the lower expert id, then the
lower rank)
-----------------------------------------------------------------------------
E = len(load) logical experts, N = ep_size NPUs, K = slots_per_npu slots each,
S = N * K slots in all (S >= E, else ValueError).

0. The default layout: the contiguous map when N divides E, else round robin
   (expert e on rank e % N). With an all-zero load (nothing measured yet) it
   is the answer: no copies, since nothing shows they would help. Otherwise
   it is the first candidate of step 4, so a plan is never worse than it.
1. Copies. Every expert gets one copy. The S - E spare slots then go, one at a
   time, to the expert with the largest load per copy (load / copies), as long
   as that is above zero (a copy of an unloaded expert takes nothing off any
   NPU) and the expert has fewer than N copies (two copies on one NPU would
   split nothing). This greedy minimises the largest load per copy, a lower
   bound of the max NPU load; its grants, in order, are G_1, G_2, ...
2. Placement (longest processing time first, with slot and distinctness
   constraints). Copies are placed largest load-per-copy first, each onto the
   rank with the lowest current load that has a free slot and does not hold
   that expert yet (ties: fewer experts held, then lower rank). Copies of one
   expert carry the same load and are placed one after another, so they land
   on distinct, lightly loaded ranks.
   Should every rank with a free slot already hold the expert, a repair move
   frees a slot: some rank q lacks the expert (it has at most N copies) and
   is full (else it would have been picked), while a rank r with a free slot
   holds fewer experts than q, so q holds an expert x that r lacks; x moves
   from q to r and the copy goes to q (of all such moves, the one with the
   lowest resulting max(load r, load q)). So a placement exists whenever
   S >= E. (The greedy copy counts of step 1 do not seem to ever need it.)
3. Refinement (local search). While a most loaded rank p can be relieved,
   apply the best move (a copy from p to a rank q with a free slot that lacks
   that expert) or swap (a copy on p for a lighter one on q, neither expert
   on the other rank already) that brings both ranks below the current
   maximum. Each step keeps the total and evens out a pair whose larger
   member is at the maximum, so the sum of squared NPU loads strictly falls:
   it terminates (steps are capped as well). Greedy LPT alone can leave a rank
   at about mean + one large copy; this removes most of that slack.
4. How many copies. More copies make the pieces finer but also fix how many
   pieces there are, and that can leave a worse partition than fewer copies
   (e.g. 10 experts on 2 NPUs balance exactly unreplicated, not after the
   greedy replicates four of them). So steps 2-3 run for several prefixes
   G_1..G_u of the grants (every u when there are at most 16 grants, else 17
   evenly spaced u from 0 to all), and the plan with the lowest max NPU load
   wins; ties keep the earlier candidate: the default layout, then fewer
   copies. A candidate already at the mean load ends the search.

Each rank's list is sorted ascending; a rank may end with fewer than K experts.
Cost: a few hundred ms per layer in pure Python for 256 experts on 8-64 NPUs.

The module is torch-free so the control plane can plan without torch.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Mapping, Sequence

from actors.expert_map import ExpertMap

# Loads compare equal within this relative slack (float noise from L / c splits).
_EPS = 1e-12
# A candidate plan must beat the best so far by this much to replace it.
_REL_TOL = 1e-9
# Candidate copy budgets tried per layer, beyond "no copies" (see _spare_counts).
_CANDIDATES = 16
# Local-search steps per candidate plan at most.
_MAX_REFINE_STEPS = 10_000


def slots_needed(num_experts: int, ep_size: int, redundant_per_npu: int = 0) -> int:
    """Slots per NPU for `num_experts` over `ep_size` NPUs plus `redundant_per_npu` spares:
    ceil(num_experts / ep_size) + redundant_per_npu."""
    if ep_size < 1:
        raise ValueError(f"ep_size: must be >= 1, got {ep_size}")
    if num_experts < 0:
        raise ValueError(f"num_experts: must be >= 0, got {num_experts}")
    if redundant_per_npu < 0:
        raise ValueError(f"redundant_per_npu: must be >= 0, got {redundant_per_npu}")
    return -(-num_experts // ep_size) + redundant_per_npu


def _check_load(load: Sequence[float]) -> list[float]:
    values = [float(x) for x in load]
    if not values:
        raise ValueError("load: no experts (empty load vector)")
    for e, x in enumerate(values):
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"load: expert {e} has load {x}; loads must be finite and >= 0")
    return values


def _check_budget(num_experts: int, ep_size: int, slots_per_npu: int) -> None:
    if ep_size < 1:
        raise ValueError(f"ep_size: must be >= 1, got {ep_size}")
    if slots_per_npu * ep_size < num_experts:
        raise ValueError(
            f"slots_per_npu: {slots_per_npu} slots x {ep_size} NPUs cannot hold {num_experts} experts")


def _default_layout(num_experts: int, ep_size: int) -> list[list[int]]:
    if num_experts % ep_size == 0:
        per = num_experts // ep_size
        return [list(range(r * per, (r + 1) * per)) for r in range(ep_size)]
    return [list(range(r, num_experts, ep_size)) for r in range(ep_size)]


def _copy_grants(load: list[float], ep_size: int, spare: int) -> list[int]:
    """Step 1: the experts that receive the spare slots, in the order the greedy
    hands them out (see the module docstring). Any prefix is the greedy's answer
    for that many spares."""
    copies = [1] * len(load)
    grants: list[int] = []
    # max-heap on load per copy, ties to the lower expert id
    heap = [(-x, e) for e, x in enumerate(load) if x > 0 and ep_size > 1]
    heapq.heapify(heap)
    while len(grants) < spare and heap:
        _, e = heapq.heappop(heap)
        copies[e] += 1
        grants.append(e)
        if copies[e] < ep_size:
            heapq.heappush(heap, (-load[e] / copies[e], e))
    return grants


def _place(load: list[float], copies: list[int], ep_size: int, slots_per_npu: int) -> list[list[int]]:
    """Step 2: greedy LPT placement with a repair move when a copy has nowhere to go."""
    held: list[list[int]] = [[] for _ in range(ep_size)]
    held_set: list[set[int]] = [set() for _ in range(ep_size)]
    rank_load = [0.0] * ep_size
    share = [load[e] / copies[e] for e in range(len(load))]
    # exactly the ranks with a free slot, keyed (load, experts held, rank)
    heap = [(0.0, 0, r) for r in range(ep_size)]
    for e in sorted(range(len(load)), key=lambda e: (-share[e], e)):
        for _ in range(copies[e]):
            skipped = []
            while heap and e in held_set[heap[0][2]]:
                skipped.append(heapq.heappop(heap))
            repaired = not heap
            if repaired:
                r = _repair(e, held, held_set, rank_load, share, ep_size, slots_per_npu)
            else:
                r = heapq.heappop(heap)[2]
                for item in skipped:
                    heapq.heappush(heap, item)
            held[r].append(e)
            held_set[r].add(e)
            rank_load[r] += share[e]
            if repaired:
                heap = [(rank_load[q], len(held[q]), q) for q in range(ep_size) if len(held[q]) < slots_per_npu]
                heapq.heapify(heap)
            elif len(held[r]) < slots_per_npu:
                heapq.heappush(heap, (rank_load[r], len(held[r]), r))
    return held


def _repair(e: int, held: list[list[int]], held_set: list[set[int]], rank_load: list[float],
            share: list[float], ep_size: int, slots_per_npu: int) -> int:
    """Free a slot on a rank that lacks `e`: move some expert x from a full rank q
    (without e) to a rank r with a free slot (which holds e, and lacks x). Returns q."""
    best = None
    for r in range(ep_size):
        if len(held[r]) >= slots_per_npu:
            continue
        for q in range(ep_size):
            if e in held_set[q]:
                continue
            for x in held[q]:
                if x in held_set[r]:
                    continue
                cost = max(rank_load[r] + share[x], rank_load[q] - share[x] + share[e])
                key = (cost, q, r, x)
                if best is None or key < best:
                    best = key
    assert best is not None, "a repair move always exists when slots_per_npu * ep_size >= num_experts"
    _, q, r, x = best
    held[q].remove(x)
    held_set[q].discard(x)
    rank_load[q] -= share[x]
    held[r].append(x)
    held_set[r].add(x)
    rank_load[r] += share[x]
    return q


def _refine(held: list[list[int]], share: list[float], slots_per_npu: int) -> None:
    """Step 3: local search on the most loaded ranks (moves and swaps), in place."""
    ep_size = len(held)
    held_set = [set(h) for h in held]
    rank_load = [sum(share[e] for e in h) for h in held]
    by_share = [sorted((share[e], e) for e in h) for h in held]
    for _ in range(_MAX_REFINE_STEPS):
        peak = max(rank_load)
        if peak <= 0:
            return
        tol = _EPS * peak
        best = None  # (resulting max of the two ranks, p, q, x moved p -> q, y moved q -> p or -1)
        for p in range(ep_size):
            if rank_load[p] < peak - tol:
                continue  # only the ranks at the maximum are relieved
            for x in held[p]:
                wx = share[x]
                if wx <= 0:
                    continue
                for q in range(ep_size):
                    gap = rank_load[p] - rank_load[q]
                    if gap <= tol or x in held_set[q]:
                        continue
                    options = _swap_partners(wx, gap, by_share[q], held_set[p])
                    if len(held[q]) < slots_per_npu and wx < gap:
                        options.append((0.0, -1))  # a plain move
                    for wy, y in options:
                        new_max = max(rank_load[p] - wx + wy, rank_load[q] + wx - wy)
                        if new_max < peak - tol:
                            key = (new_max, p, q, x, y)
                            if best is None or key < best:
                                best = key
        if best is None:
            return
        _, p, q, x, y = best
        for src, dst, e in ((p, q, x), (q, p, y)):
            if e < 0:
                continue
            held[src].remove(e)
            held_set[src].discard(e)
            held[dst].append(e)
            held_set[dst].add(e)
            rank_load[src] -= share[e]
            rank_load[dst] += share[e]
        by_share[p] = sorted((share[e], e) for e in held[p])
        by_share[q] = sorted((share[e], e) for e in held[q])


def _swap_partners(wx: float, gap: float, q_items: list[tuple[float, int]], p_set: set[int]) -> list[tuple[float, int]]:
    """The best swap partners for a copy of load `wx` leaving a rank that is `gap`
    above rank q: the copies on q (absent from p) whose loads lie nearest below
    and above wx - gap / 2, within (wx - gap, wx) so the swap relieves p."""
    target = wx - gap / 2
    i = bisect.bisect_left(q_items, (target, -1))
    found = []
    j = i
    while j < len(q_items) and q_items[j][0] < wx:
        if q_items[j][1] not in p_set:
            found.append(q_items[j])
            break
        j += 1
    j = i - 1
    while j >= 0 and q_items[j][0] > wx - gap:
        if q_items[j][1] not in p_set:
            found.append(q_items[j])
            break
        j -= 1
    return found


def plan_layer(load: Sequence[float], ep_size: int, slots_per_npu: int) -> list[list[int]]:
    """One layer: ranks -> experts held (each rank's list sorted ascending).

    `load[e]` is the measured load of logical expert e (token-expert pairs, time,
    any non-negative unit); at most `slots_per_npu` experts per rank."""
    values = _check_load(load)
    num_experts = len(values)
    _check_budget(num_experts, ep_size, slots_per_npu)
    default = _default_layout(num_experts, ep_size)
    if not any(values):
        return default
    grants = _copy_grants(values, ep_size, ep_size * slots_per_npu - num_experts)
    mean = sum(values) / ep_size
    best_held, best_peak = default, max(npu_loads(default, values))
    for used in _spare_counts(len(grants)):
        if best_peak <= mean * (1 + _REL_TOL):
            break  # balanced: nothing can beat it
        copies = [1] * num_experts
        for e in grants[:used]:
            copies[e] += 1
        held = _place(values, copies, ep_size, slots_per_npu)
        share = [values[e] / copies[e] for e in range(num_experts)]
        _refine(held, share, slots_per_npu)
        peak = max(sum(share[e] for e in h) for h in held)
        if peak < best_peak * (1 - _REL_TOL):
            best_held, best_peak = held, peak
    return [sorted(h) for h in best_held]


def _spare_counts(granted: int) -> list[int]:
    """How many of the greedy's spare-slot grants each candidate plan uses: all of
    0..granted when that is at most _CANDIDATES + 1 values, else _CANDIDATES + 1
    evenly spaced ones, 0 and `granted` included."""
    if granted <= _CANDIDATES:
        return list(range(granted + 1))
    return sorted({round(i * granted / _CANDIDATES) for i in range(_CANDIDATES + 1)})


def plan_placement(load: Mapping[int, Sequence[float]], ep_size: int, slots_per_npu: int) -> ExpertMap:
    """Every layer in `load` (layer -> per-logical-expert load)."""
    return ExpertMap({layer: plan_layer(load[layer], ep_size, slots_per_npu) for layer in sorted(load)})


def npu_loads(slots: list[list[int]], load: Sequence[float]) -> list[float]:
    """Load each rank receives under that layer map, a replicated expert's load split evenly among its copies."""
    num_experts = len(load)
    copies = [0] * num_experts
    for rank, held in enumerate(slots):
        for e in held:
            if not 0 <= e < num_experts:
                raise ValueError(f"slots: rank {rank} holds expert {e}, outside 0..{num_experts - 1}")
            copies[e] += 1
    lost = [e for e in range(num_experts) if copies[e] == 0 and load[e]]
    if lost:
        raise ValueError(f"slots: experts {lost} have load but no copy on any NPU")
    return [sum(float(load[e]) / copies[e] for e in held) for held in slots]


def imbalance(slots: list[list[int]], load: Sequence[float]) -> float:
    """max NPU load / mean NPU load (1.0 = perfectly balanced; 1.0 when total load is 0)."""
    per_rank = npu_loads(slots, load)
    total = sum(per_rank)
    if not per_rank or total <= 0:
        return 1.0
    return max(per_rank) / (total / len(per_rank))


def placement_report(expert_map: ExpertMap, load: Mapping[int, Sequence[float]]) -> dict:
    """{"layers": {layer: {"imbalance": float, "max_load": float, "mean_load": float,
    "copies": {expert: n} only for n > 1}}, "max_imbalance": float, "mean_imbalance": float}

    Covers every layer in `load`; each must be in `expert_map` (ValueError otherwise)."""
    layers: dict[int, dict] = {}
    for layer in sorted(load):
        if layer not in expert_map.slots:
            raise ValueError(f"load: layer {layer} is not in the expert map")
        slots = expert_map.slots[layer]
        per_rank = npu_loads(slots, load[layer])
        counts: dict[int, int] = {}
        for held in slots:
            for e in held:
                counts[e] = counts.get(e, 0) + 1
        mean = sum(per_rank) / len(per_rank) if per_rank else 0.0
        layers[layer] = {
            "imbalance": imbalance(slots, load[layer]),
            "max_load": max(per_rank) if per_rank else 0.0,
            "mean_load": mean,
            "copies": {e: n for e, n in sorted(counts.items()) if n > 1},
        }
    ratios = [v["imbalance"] for v in layers.values()]
    return {
        "layers": layers,
        "max_imbalance": max(ratios) if ratios else 1.0,
        "mean_imbalance": sum(ratios) / len(ratios) if ratios else 1.0,
    }
