"""The master's prefix index: which block hashes each instance (and the global KV
cache) holds, kept exact by following their KV events (actors.kv_events).

One `PrefixIndex` per source, one `follow` task per source: the task long-polls
the source's `kv_events(after, epoch)` and applies the batches in order, so an
eviction stops attracting requests as soon as its batch lands, without any
polling interval. A gap in the numbering (batches lost, the producer restarted)
makes the next call ask for a full dump; a master that restarts starts every
index from a dump, then follows the events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

import ray

from actors.kv_events import WAIT_S, KVEventBatch

logger = logging.getLogger(__name__)

RETRY_S = 0.5  # after a failed call (the source restarting, or dead: its health is the refresh's business)


def prefix_depth(hashes: list[int], cached: Collection[int]) -> int:
    """Leading hashes all present in ``cached``: a prefix chain, so the first miss ends it."""
    depth = 0
    for h in hashes:
        if h not in cached:
            break
        depth += 1
    return depth


class PrefixIndex:
    """The block hashes one source holds, as of its last applied batch."""

    def __init__(self):
        self.hashes: set[int] = set()
        self.epoch: str | None = None
        self.seq: int | None = None  # None: ask for a full dump
        self.applied = 0  # batches applied (dumps included)
        self.dumps = 0

    def depth(self, hashes: list[int]) -> int:
        return prefix_depth(hashes, self.hashes)

    def apply(self, batches: list[KVEventBatch]) -> None:
        """Apply in order; on a gap stop, and ask for a dump next time."""
        for b in batches:
            if b.cleared:
                self.hashes = set(b.stored)
                self.dumps += 1
            elif b.epoch != self.epoch or self.seq is None or b.seq != self.seq + 1:
                logger.info("prefix index: gap (had %s/%s, got %s/%s); asking for a dump",
                            self.epoch, self.seq, b.epoch, b.seq)
                self.seq = None
                return
            else:
                self.hashes.difference_update(b.removed)
                self.hashes.update(b.stored)
            self.epoch, self.seq = b.epoch, b.seq
            self.applied += 1


async def follow(source: Callable[[], object], index: PrefixIndex, name: str) -> None:
    """Keep `index` up to date with the KV events of `source()` (an actor handle,
    looked up at each call: a named actor may come and go) until cancelled."""
    while True:
        try:
            batches = await asyncio.wait_for(source().kv_events.remote(index.seq, index.epoch), WAIT_S + 5.0)
        except asyncio.TimeoutError:  # the source is busy or stuck: ask again
            continue
        except (ray.exceptions.RayError, ValueError) as err:
            logger.debug("prefix index of %s: %s; retrying", name, err)
            await asyncio.sleep(RETRY_S)
            continue
        if batches:
            index.apply(batches)
