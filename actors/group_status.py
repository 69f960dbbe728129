"""Whether a collective group has formed, kept in Ray's internal KV (the GCS),
where the group's rendezvous address already lives.

Each member records there that it formed the group, or why it could not; the
controller waits for every rank there. Waiting thus takes no CPU from the NPUs
that serve while the group forms beside their current one: asking each NPU
instead (an actor call every few milliseconds) cost about a millisecond of its
CPU per call, most of what staging a resize cost the serving NPUs. Torch-free:
the control plane reads it.
"""

from __future__ import annotations

import time

import ray.experimental.internal_kv as internal_kv

_PREFIX = "omniray/collective-formed/"
POLL_S = 0.005


def _group_prefix(group_name: str) -> str:
    return f"{_PREFIX}{group_name}/"


def record(group_name: str, rank: int, error: BaseException | None = None) -> None:
    """This member formed `group_name` (or failed to, with `error`); the value
    starts with when (for `sweep`)."""
    kind = "ok" if error is None else "failed"
    internal_kv._internal_kv_put(f"{_group_prefix(group_name)}{kind}/{rank}",
                                 f"{time.time():.3f} {repr(error) if error else ''}")


def formed(group_name: str, world: int) -> bool:
    """Whether all `world` ranks formed the group; a member's failure raises."""
    keys = internal_kv._internal_kv_list(_group_prefix(group_name))
    failed = [k for k in keys if b"/failed/" in k]
    if failed:
        why = (internal_kv._internal_kv_get(failed[0]) or b"").decode().partition(" ")[2]
        rank = failed[0].rsplit(b"/", 1)[1].decode()
        raise RuntimeError(f"collective group {group_name}: rank {rank} failed to form it: {why}")
    return len(keys) >= world


def wait_formed(group_name: str, world: int, timeout_s: float) -> None:
    """Until every rank formed `group_name` (polling the GCS, not the members)."""
    deadline = time.monotonic() + timeout_s
    while not formed(group_name, world):
        if time.monotonic() > deadline:
            raise TimeoutError(f"collective group {group_name} did not form within {timeout_s:.0f} s")
        time.sleep(POLL_S)


def forget(group_name: str) -> None:
    """Drop the group's records (once the controller has read them)."""
    internal_kv._internal_kv_del(_group_prefix(group_name), del_by_prefix=True)


def sweep(older_than_s: float) -> int:
    """Drop every group's records written more than `older_than_s` ago: those no one
    waits for any more (a member that gave up after its waiter did records a
    failure that `forget` came too early for). Returns how many went."""
    cutoff, gone = time.time() - older_than_s, 0
    for key in internal_kv._internal_kv_list(_PREFIX):
        value = internal_kv._internal_kv_get(key)
        try:
            written = float((value or b"").split(b" ", 1)[0])
        except ValueError:  # not one of ours as we write them: stale all the same
            written = 0.0
        if written < cutoff:
            internal_kv._internal_kv_del(key)
            gone += 1
    return gone
