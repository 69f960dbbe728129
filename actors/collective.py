"""EP collective groups: a `ray.util.collective` backend whose groups can coexist.

Ray's own GLOO backend builds each group on the process's default torch process
group, and a process has only one: an NPU cannot be in its instance's current
group and in the group of the next EP size at once, so a resize had to tear the
old group down and form the new one while the instance stood still. This
backend (registered with Ray as "OMNI_GLOO", Ray's extension point for
collective backends) gives each group its own gloo process group over its own
rendezvous store, so the next group forms in the background while the current
one serves (ElasticMoE's pre-built communication domains) and the switch only
swaps a handle. `PendingGroup` forms one in a thread of its own, so that no
actor task waits on its peers.

Groups are created and destroyed through `ray.util.collective`
(init_collective_group / destroy_collective_group with backend OMNI_GLOO), and
its collectives (allreduce, broadcast, barrier, ...) work on them by group
name; `all_to_all_single` is the one Ray's API lacks, which the EP dispatch uses.

Rendezvous: rank 0 opens a TCP store on a free port of its node and publishes
the address in Ray's internal KV under the group's name; the other ranks wait
for it there. The key goes once every rank has connected.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import ray
import ray.experimental.internal_kv as internal_kv
import torch
import torch.distributed as dist
from ray.util import collective
from ray.util.collective.backend_registry import _global_registry, register_collective_backend
from ray.util.collective.collective import _group_mgr, _group_mgr_lock
from ray.util.collective.collective_group.base_collective_group import BaseGroup
from ray.util.collective.types import AllReduceOptions, ReduceOp

from actors import group_status

BACKEND = "OMNI_GLOO"
FORM_TIMEOUT_S = 60.0  # a member that has not joined by then fails the formation
_POLL_S = 0.002
_REDUCE_OPS = {ReduceOp.SUM: dist.ReduceOp.SUM, ReduceOp.PRODUCT: dist.ReduceOp.PRODUCT,
               ReduceOp.MIN: dist.ReduceOp.MIN, ReduceOp.MAX: dist.ReduceOp.MAX}


def _address_key(group_name: str) -> bytes:
    return f"omniray/collective/{group_name}".encode()


def _one(tensor) -> torch.Tensor:
    """ray.util.collective passes each tensor wrapped in a one-element list."""
    t = tensor[0] if isinstance(tensor, list) else tensor
    return torch.from_numpy(t) if not isinstance(t, torch.Tensor) else t


def _await_address(key: bytes) -> tuple[str, int]:
    deadline = time.monotonic() + FORM_TIMEOUT_S
    while (meta := internal_kv._internal_kv_get(key)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"collective group: rank 0 of {key.decode()} did not publish its address "
                               f"within {FORM_TIMEOUT_S:.0f} s")
        time.sleep(_POLL_S)
    host, port = meta.decode().rsplit(":", 1)
    return host, int(port)


def _rendezvous(world_size: int, rank: int, group_name: str):
    """The group's store and gloo process group, once every rank has connected."""
    key = _address_key(group_name)
    timeout = timedelta(seconds=FORM_TIMEOUT_S)
    if rank == 0:
        host = ray.util.get_node_ip_address()
        store = dist.TCPStore(host, 0, world_size, True, timeout, wait_for_workers=False)
        internal_kv._internal_kv_put(key, f"{host}:{store.port}")
    else:
        host, port = _await_address(key)
        store = dist.TCPStore(host, port, world_size, False, timeout)
    pg = dist.ProcessGroupGloo(dist.PrefixStore(group_name, store), rank, world_size, timeout)
    if rank == 0:  # every rank is connected once the process group exists
        internal_kv._internal_kv_del(key)
    return store, pg


# groups `join` formed, handed to the OmniGlooGroup that ray.util.collective then
# builds under its group-manager lock (which must not be held while peers are awaited)
_formed: dict[str, tuple] = {}


class OmniGlooGroup(BaseGroup):
    """One named group on its own gloo process group (not the process's default)."""

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)
        self._store, self._pg = _formed.pop(group_name, None) or _rendezvous(world_size, rank, group_name)

    @classmethod
    def backend(cls):
        return BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available() and dist.is_gloo_available()

    def destroy_group(self):
        self._pg = self._store = None

    # ---- the all-to-all Ray's API lacks ------------------------------------------------------
    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor,
                          out_splits: list[int] | None = None, in_splits: list[int] | None = None) -> torch.Tensor:
        self._pg.alltoall_base(out, inp, out_splits or [], in_splits or [], dist.AllToAllOptions()).wait()
        return out

    # ---- ray.util.collective's collectives -------------------------------------------------------
    def allreduce(self, tensor, allreduce_options=None):
        opts = dist.AllreduceOptions()
        opts.reduceOp = _REDUCE_OPS[allreduce_options.reduceOp if allreduce_options else ReduceOp.SUM]
        self._pg.allreduce([_one(tensor)], opts).wait()

    def barrier(self, barrier_options=None):
        self._pg.barrier().wait()

    def reduce(self, tensor, reduce_options=None):
        t = _one(tensor)
        opts = dist.ReduceOptions()
        opts.rootRank = reduce_options.root_rank if reduce_options else 0
        opts.reduceOp = _REDUCE_OPS[reduce_options.reduceOp if reduce_options else ReduceOp.SUM]
        self._pg.reduce([t if self.rank == opts.rootRank else t.clone()], opts).wait()

    def allgather(self, tensor_list, tensor, allgather_options=None):
        outs = [_one([t]) for t in (tensor_list[0] if isinstance(tensor_list[0], list) else tensor_list)]
        self._pg.allgather([outs], [_one(tensor)]).wait()

    def broadcast(self, tensor, broadcast_options=None):
        opts = dist.BroadcastOptions()
        opts.rootRank = broadcast_options.root_rank if broadcast_options else 0
        self._pg.broadcast([_one(tensor)], opts).wait()

    def reducescatter(self, tensor, tensor_list, reducescatter_options=None):
        """gloo has no reduce-scatter: allreduce every chunk, keep this rank's."""
        chunks = [_one([t]) for t in (tensor_list[0] if isinstance(tensor_list[0], list) else tensor_list)]
        opts = AllReduceOptions()
        opts.reduceOp = reducescatter_options.reduceOp if reducescatter_options else ReduceOp.SUM
        for chunk in chunks:
            self.allreduce([chunk], opts)
        _one(tensor).copy_(chunks[self.rank])

    def send(self, tensor, send_options):
        self._pg.send([_one(tensor)], send_options.dst_rank, 0).wait()

    def recv(self, tensor, recv_options):
        self._pg.recv([_one(tensor)], recv_options.src_rank, 0).wait()


def register() -> None:
    """Make OMNI_GLOO known to ray.util.collective in this process (idempotent)."""
    if not _global_registry.is_registered(BACKEND):
        register_collective_backend(BACKEND, OmniGlooGroup)


def join(world: int, rank: int, group_name: str) -> OmniGlooGroup:
    """Join (form, with the other ranks) the named group; blocks until all joined.
    The outcome is recorded for whoever waits for the group (actors.group_status)."""
    register()
    try:
        # formed first, outside ray.util.collective's group-manager lock: that lock is
        # per process, and a formation waiting for its peers under it would hold up
        # every other group of the process (one forming beside it, one leaving)
        _formed[group_name] = _rendezvous(world, rank, group_name)
        collective.init_collective_group(world, rank, BACKEND, group_name)
        with _group_mgr_lock:
            group = _group_mgr.get_group_by_name(group_name)
    except BaseException as err:
        group_status.record(group_name, rank, err)
        raise
    group_status.record(group_name, rank)
    return group


class PendingGroup:
    """A group forming in a thread of its own. An NPU that serves must never hold
    one of its tasks while it waits for its peers: if its next step were queued
    behind that task, and a peer's joining behind the peer's step (which waits
    for this NPU in the current group's all-to-all), neither would move. So
    forming starts here and returns; the controller waits for the group in the
    GCS (actors.group_status), and the NPU collects it with `wait` at the switch."""

    def __init__(self, world: int, rank: int, group_name: str):
        self._out: dict = {}
        self._thread = threading.Thread(target=self._form, args=(world, rank, group_name),
                                        name=f"form-{group_name}", daemon=True)
        self._thread.start()

    def _form(self, world: int, rank: int, group_name: str) -> None:
        try:
            self._out["group"] = join(world, rank, group_name)
        except BaseException as err:  # raised to whoever polls or waits
            self._out["error"] = err

    def done(self) -> bool:
        """Formed (True), still forming (False); a failed formation raises."""
        if self._thread.is_alive():
            return False
        if "error" in self._out:
            raise self._out["error"]
        return True

    def wait(self) -> OmniGlooGroup:
        self._thread.join()
        self.done()
        return self._out["group"]


def leave(group_name: str) -> None:
    if collective.is_group_initialized(group_name):
        collective.destroy_collective_group(group_name)
