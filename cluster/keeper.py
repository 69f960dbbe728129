"""The Keeper: the actor that starts, and so owns, a server's NPU and engine
actors and the placement groups its cluster controller adds.

Ray ends an actor (and a placement group) with the process that started it.
The cluster controller restarts (a new process each time), so it never starts
one itself: it asks the keeper, which does nothing else and has nothing to fail
with. The keeper is started by whoever starts the server (the `omniray serve`
driver, or the detached BackendOwner of a Serve config), so everything still
ends with the server: its shutdown kills the keeper last, and a driver that
dies takes the keeper with it.

It holds a handle of each actor it started (an actor no one holds goes) and
answers a restarted controller with the NPUs alive and the placement-group
bundle each sits in. NPU actors are named (`omniray.npu.<id>`): a killed
actor's name goes with it, which is how the keeper forgets the dead.
"""

from __future__ import annotations

import threading
import uuid

import ray

from cluster.launcher import engine_name, start_engine_actor, start_npu_actors
from cluster.node_placement import added_group, create_group

NPU_NAME_PREFIX = "omniray.npu."


class Keeper:
    def __init__(self):
        self.lock = threading.Lock()  # threaded: a placement group's wait does not hold the others
        self.npus: dict[str, tuple[object, tuple | None]] = {}  # actor name -> (actor, bundle (group, index) or None)
        self.engines: dict[str, object] = {}  # instance name -> its engine actor

    def start_npus(self, specs: list, bundles: list | None = None, nodes: list[str] | None = None) -> list:
        """cluster.launcher.start_npu_actors, the actors named and held here."""
        names = [f"{NPU_NAME_PREFIX}{uuid.uuid4().hex[:12]}" for _ in specs]
        with self.lock:
            self._forget_dead()
            npus = start_npu_actors(specs, bundles, nodes, names=names)
            self.npus.update(zip(names, zip(npus, bundles or [None] * len(npus))))
        return npus

    def start_engine(self, config, npus: list, memory: list[dict], specs: list):
        """cluster.launcher.start_engine_actor, the engine held here."""
        with self.lock:
            self._forget_dead()
            self.engines[config.name] = start_engine_actor(config, npus, memory, specs)
            return self.engines[config.name]

    def create_group(self, *args, **kwargs):
        """cluster.node_placement.create_group, the group owned here."""
        return create_group(*args, **kwargs)

    def added_group(self, *args):
        """cluster.node_placement.added_group, the group owned here."""
        return added_group(*args)

    def alive_npus(self) -> list[tuple[object, tuple | None]]:
        """(actor, bundle) of every NPU actor it started that is alive."""
        with self.lock:
            self._forget_dead()
            return list(self.npus.values())

    def names(self) -> list[str]:
        """The names of the actors it holds (the server's shutdown waits for them to go)."""
        with self.lock:
            self._forget_dead()
            return list(self.npus) + [engine_name(n) for n in self.engines]

    def _forget_dead(self) -> None:
        alive = set(ray.util.list_named_actors())
        self.npus = {k: v for k, v in self.npus.items() if k in alive}
        self.engines = {k: v for k, v in self.engines.items() if engine_name(k) in alive}


def create_keeper():
    """The keeper actor, owned by the caller (the server's driver or BackendOwner)."""
    return ray.remote(Keeper).options(num_cpus=0, max_concurrency=8).remote()
