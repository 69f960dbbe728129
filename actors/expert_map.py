"""ExpertMap: which NPU of an EP instance holds which routed expert, per MoE layer.

The control plane (cluster.placement) decides it; the data plane (actors.ep)
routes tokens by it. Torch-free, so emulated NPUs never import torch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np


def imbalance_score(loads: Iterable) -> float:
    """(max - min) / mean of per-device loads (any numbers, a 1-D tensor too); 0 is
    perfectly balanced. Torch-free, so the master and the slaves never import torch."""
    values = [float(x) for x in loads]
    mean = sum(values) / len(values) if values else 0.0
    return 0.0 if mean == 0 else (max(values) - min(values)) / mean


@dataclass(frozen=True)
class ExpertMap:
    """Per MoE layer: slots[layer][rank] = logical experts that rank holds.

    A logical expert may sit on several ranks (redundant copies of hot experts,
    Omni Placement); a token's pairs for such an expert are split across the
    copies by token index."""

    slots: dict[int, list[list[int]]]

    # ---- on the wire: a spec carries its map in every setup, prepare and switching
    # step. Pickled as nested lists, a 72B map at EP 16 (48 layers, 800 lists) cost
    # 0.3-0.5 ms each way per NPU, most of it the garbage collector walking the new
    # lists, on the CPU the instance serves with. Now the sender pickles bytes it
    # encoded once, and a process decodes a map it has seen before from its cache.
    def __reduce__(self):
        return (_decode, (self._encoded,))

    @cached_property
    def _encoded(self) -> bytes:
        """[layers, ranks, layer ids, experts per (layer, rank), experts] as int32,
        built once per map (a map is never changed: a new one is made)."""
        layers = list(self.slots)
        ranks = len(self.slots[layers[0]]) if layers else 0
        counts = [len(held) for layer in layers for held in self.slots[layer]]
        flat = [e for layer in layers for held in self.slots[layer] for e in held]
        return np.array([len(layers), ranks, *layers, *counts, *flat], dtype=np.int32).tobytes()

    @classmethod
    def contiguous(cls, moe_layers: list[int], num_experts: int, ep_size: int) -> "ExpertMap":
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the EP size ({ep_size})")
        per = num_experts // ep_size
        return cls({layer: [list(range(r * per, (r + 1) * per)) for r in range(ep_size)] for layer in moe_layers})

    def resized(self, num_experts: int, ep_size: int) -> "ExpertMap":
        """The map at `ep_size` (one copy of each expert, num_experts / ep_size a
        rank) that moves the fewest experts from this one (ElasticMoE: the NPUs an
        instance keeps keep their weights where they are). Ranks both maps have keep
        what they hold, up to the new share (scaling up, the first ones; copies
        dropped); the experts no kept rank holds fill the free slots, new ranks
        first, in expert order."""
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the EP size ({ep_size})")
        share = num_experts // ep_size
        slots = {}
        for layer, ranks in self.slots.items():
            placed: set[int] = set()
            held = [[] for _ in range(ep_size)]
            for rank, experts in enumerate(ranks[:ep_size]):
                for e in experts:
                    if len(held[rank]) < share and e not in placed:
                        held[rank].append(e)
                        placed.add(e)
            free = [r for r in range(ep_size) if r >= len(ranks)] + [r for r in range(min(ep_size, len(ranks)))]
            rest = iter(e for e in range(num_experts) if e not in placed)
            for rank in free:
                held[rank].extend(e for _, e in zip(range(share - len(held[rank])), rest))
            slots[layer] = held
        return ExpertMap(slots)

    @property
    def ep_size(self) -> int:
        return len(next(iter(self.slots.values()))) if self.slots else 1

    def held_by(self, rank: int) -> dict[int, list[int]]:
        return {layer: ranks[rank] for layer, ranks in self.slots.items()}

    def gained(self, rank: int, held: Mapping[int, Iterable[int]]) -> dict[int, list[int]]:
        """Per layer, the experts `rank` holds in this map that `held` (what an NPU
        holds now) lacks: what it must stage before it can switch to this map."""
        gained = {}
        for layer, experts in self.held_by(rank).items():
            have = set(held.get(layer, ()))
            gained[layer] = [e for e in experts if e not in have]
        return gained

    def validate(self, num_experts: int) -> None:
        for layer, ranks in self.slots.items():
            present = {e for held in ranks for e in held}
            missing = set(range(num_experts)) - present
            if missing:
                raise ValueError(f"layer {layer}: experts {sorted(missing)} have no copy on any NPU")
            for rank, held in enumerate(ranks):
                if len(set(held)) != len(held):
                    raise ValueError(f"layer {layer}: rank {rank} holds an expert twice")


@lru_cache(maxsize=8)  # the maps a process receives again (setup, then the switch)
def _decode(encoded: bytes) -> ExpertMap:
    values = np.frombuffer(encoded, dtype=np.int32)
    num_layers, ranks = int(values[0]), int(values[1])
    layers = values[2:2 + num_layers].tolist()
    counts = values[2 + num_layers:2 + num_layers + num_layers * ranks]
    flat = values[2 + num_layers + num_layers * ranks:]
    if num_layers and ranks and (counts == counts[0]).all():  # the usual case: one share a rank
        return ExpertMap(dict(zip(layers, flat.reshape(num_layers, ranks, int(counts[0])).tolist())))
    flat, at, slots = flat.tolist(), 0, {}
    for i, layer in enumerate(layers):
        held = []
        for count in counts[i * ranks:(i + 1) * ranks].tolist():
            held.append(flat[at:at + count])
            at += count
        slots[layer] = held
    return ExpertMap(slots)
