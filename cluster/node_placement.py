"""Which nodes an instance's NPU actors go to, at launch and as it grows.

A manifest gives each instance a Ray placement strategy (STRICT_PACK, PACK,
SPREAD, STRICT_SPREAD): at launch, a placement group of one `omni_npu` bundle
per NPU, the strict groups reserved before the soft ones (reserve_groups).
Placement groups cannot grow, so the NPUs a scale-up adds are placed relative
to the ones the instance has (their nodes: each NPU's memory report):

- standby NPUs (already running somewhere) are chosen by their node: on the
  instance's node first for PACK, on nodes it uses least for SPREAD; the STRICT
  strategies take no standby NPU that breaks them;
- the others start in a placement group of their own, its bundles carrying a
  node label selector (`ray.io/node-id`): pinned to the instance's node (PACK)
  or kept off its nodes (SPREAD). STRICT strategies fail the scale-up clearly
  when the cluster cannot meet them; PACK and SPREAD fall back to a group
  without the selector (Ray then packs or spreads the added NPUs among
  themselves).

Decisions and placement groups only: cluster.elastic starts and releases the actors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import ray

from actors.npu import NPU_RESOURCE

NODE_LABEL = "ray.io/node-id"  # the label Ray gives every node: its id
SOFT_WAIT_S = 1.0  # how long PACK and SPREAD wait for a group on the preferred nodes before falling back


class PlacementError(RuntimeError):
    """The cluster cannot place NPUs as the instance's strategy demands."""


@dataclass(frozen=True)
class NodePlacement:
    """An instance's placement strategy and how long to wait for Ray to meet it."""

    strategy: str  # STRICT_PACK, PACK, SPREAD or STRICT_SPREAD
    timeout_s: float = 60.0

    @property
    def strict(self) -> bool:
        return self.strategy.startswith("STRICT_")

    @property
    def packs(self) -> bool:
        return self.strategy.endswith("PACK")


def home_node(nodes: list[str]) -> str:
    """The node holding most of an instance's NPUs (the first of them on a tie)."""
    counts = Counter(nodes)
    return max(nodes, key=lambda n: counts[n])


def choose_standby(placement: NodePlacement, nodes: list[str], candidates: list[tuple[object, str]],
                   n: int) -> list[tuple[object, str]]:
    """Up to `n` of the standby `candidates` (actor, node) for an instance whose
    NPUs are on `nodes`, best first: PACK on its home node first, SPREAD one at a
    time on the node it then uses least; STRICT strategies only where they hold
    (STRICT_SPREAD: a node with none of its NPUs, one each)."""
    if placement.packs:
        home = home_node(nodes)
        ok = [c for c in candidates if c[1] == home]
        if not placement.strict:
            ok += [c for c in candidates if c[1] != home]
        return ok[:n]
    used, left, chosen = Counter(nodes), list(candidates), []
    while left and len(chosen) < n:
        best = min(left, key=lambda c: used[c[1]])
        if placement.strict and used[best[1]]:
            break
        chosen.append(best)
        used[best[1]] += 1
        left.remove(best)
    return chosen


def create_group(name: str, n: int, strategy: str, timeout_s: float, selector: dict | None = None):
    """A placement group of `n` omni_npu bundles (each with label `selector`, if
    given), ready; PlacementError, the group removed, if Ray cannot place it
    within `timeout_s` (it would otherwise wait for the nodes forever)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{NPU_RESOURCE: 1}] * n, strategy=strategy, name=name,
                         bundle_label_selector=[selector] * n if selector else None)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        where = f" with {selector}" if selector else ""
        raise PlacementError(
            f"{name}: placement {strategy} of {n} NPUs{where} cannot be met by the cluster's nodes within "
            f"{timeout_s:g} s (each node offers its own '{NPU_RESOURCE}' slots)"
        ) from None
    return pg


# the order a launch reserves its instances' groups in: those Ray must meet exactly first
# (a soft group placed before a strict one may split the free slots the strict one needs
# across nodes), the larger first within a strategy
RESERVE_ORDER = ("STRICT_PACK", "STRICT_SPREAD", "PACK", "SPREAD")


def reserve_groups(requests: list[tuple[str, int, str]], timeout_s: float) -> dict[str, object]:
    """Placement groups, by name, for instances launched together: `requests` of
    (name, NPUs, strategy), made one at a time in RESERVE_ORDER, each ready before
    the next is asked for (Ray places pending groups in no order of ours). If one
    fails (a PlacementError, or the wait is interrupted), those made so far are removed."""
    ordered = sorted(requests, key=lambda r: (RESERVE_ORDER.index(r[2]), -r[1]))
    groups: dict[str, object] = {}
    try:
        for name, n, strategy in ordered:
            groups[name] = create_group(f"{name}-npus", n, strategy, timeout_s)
    except BaseException:
        for pg in groups.values():
            remove_group(pg)
        raise
    return groups


def added_group(name: str, n: int, placement: NodePlacement, nodes: list[str]):
    """The placement group for `n` NPUs an instance adds, its NPUs (and the
    standby ones it takes) on `nodes`: see the module's docstring."""
    if placement.packs:
        selector = {NODE_LABEL: home_node(nodes)}
    else:
        selector = {NODE_LABEL: f"!in({','.join(sorted(set(nodes)))})"}
    try:
        return create_group(name, n, placement.strategy, placement.timeout_s if placement.strict else SOFT_WAIT_S,
                            selector)
    except PlacementError:
        if placement.strict:
            raise
    return create_group(name, n, placement.strategy, placement.timeout_s)


def remove_group(pg) -> None:
    """Remove a placement group (its actors gone or going); one removed already is fine."""
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception:  # already removed (the controller and the driver both hold the instance)
        pass
