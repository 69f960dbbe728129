"""The HBM ledger of one emulated NPU.

An emulated NPU allocates no real device memory, yet placement, KV-cache
sizing and autoscaling decisions must fail exactly where a real 64 GiB chip
would. The ledger is that bookkeeping: every weight shard, KV block pool and
activation buffer is charged under (category, key), a charge that does not fit
is refused with a message that says who asked for what and how much room was
left, and nothing is charged when it is refused.

One ledger per NPU actor; no global state.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def format_bytes(nbytes: int) -> str:
    """Human units, binary: '12.0 GiB', '512.0 MiB', '3.0 KiB', '17 B'."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


class HBMOutOfMemory(MemoryError):
    """A charge that does not fit in the NPU's remaining HBM.

    Carries what was asked and how much room there was, so a caller (the
    placement planner, the KV-cache sizer) can react without parsing text.
    """

    def __init__(self, npu: str, category: str, key: str, requested: int, used: int, capacity: int):
        self.npu = npu
        self.category = category
        self.key = key
        self.requested = requested
        self.used = used
        self.capacity = capacity
        self.free = capacity - used
        super().__init__(
            f"NPU {npu}: cannot allocate {format_bytes(requested)} ({requested} B) for {category} {key!r}"
            f" — {format_bytes(used)} used of {format_bytes(capacity)}, {format_bytes(self.free)} free"
            f" (used {used} B, free {self.free} B, capacity {capacity} B)"
        )

    def __reduce__(self):
        # rebuild from the fields, so the error crosses Ray's actor boundary intact
        return (type(self), (self.npu, self.category, self.key, self.requested, self.used, self.capacity))


class HBMLedger:
    """Bytes charged to one NPU's HBM, by category ('weights', 'kv', ...) and key.

    Keys are unique within a category so that a release frees exactly what was
    charged, and charging the same thing twice is caught as the bug it is.
    """

    def __init__(self, npu: str, capacity_bytes: int):
        if int(capacity_bytes) <= 0:
            raise ValueError(f"NPU {npu}: HBM capacity must be positive, got {capacity_bytes}")
        self.npu = npu
        self._capacity = int(capacity_bytes)
        self._used = 0
        self._charges: dict[str, dict[str, int]] = {}

    # ---- sizes ------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return self._capacity - self._used

    def used_by(self, category: str) -> int:
        """Bytes charged under `category` (0 if none)."""
        return sum(self._charges.get(category, {}).values())

    def charged(self, category: str, key: str) -> int | None:
        """Bytes charged under (category, key), or None if nothing is."""
        return self._charges.get(category, {}).get(key)

    def fits(self, nbytes: int) -> bool:
        """Whether a charge of `nbytes` would succeed now."""
        return 0 <= nbytes <= self.free

    # ---- charge / release -------------------------------------------------
    def charge(self, category: str, key: str, nbytes: int) -> None:
        """Charge `nbytes` to (category, key); all-or-nothing.

        Raises ValueError for a negative size or an existing (category, key),
        HBMOutOfMemory when it does not fit; the ledger is unchanged then."""
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"NPU {self.npu}: negative charge {nbytes} B for {category} {key!r}")
        if key in self._charges.get(category, {}):
            raise ValueError(
                f"NPU {self.npu}: {category} {key!r} is already charged "
                f"({format_bytes(self._charges[category][key])}); release it first"
            )
        if not self.fits(nbytes):
            raise HBMOutOfMemory(self.npu, category, key, nbytes, self._used, self._capacity)
        self._charges.setdefault(category, {})[key] = nbytes
        self._used += nbytes

    def release(self, category: str, key: str) -> int:
        """Free (category, key); returns the bytes freed. KeyError if not charged."""
        entries = self._charges.get(category, {})
        if key not in entries:
            raise KeyError(f"NPU {self.npu}: nothing charged for {category} {key!r}")
        nbytes = entries.pop(key)
        if not entries:
            del self._charges[category]
        self._used -= nbytes
        return nbytes

    def release_category(self, category: str) -> int:
        """Free everything under `category`; returns the bytes freed (0 if none)."""
        nbytes = sum(self._charges.pop(category, {}).values())
        self._used -= nbytes
        return nbytes

    # ---- reporting ----------------------------------------------------------
    def report(self) -> dict:
        """Plain dict for metrics and the dashboard: sizes in bytes."""
        return {
            "npu": self.npu,
            "capacity": self._capacity,
            "used": self._used,
            "free": self.free,
            "by_category": {c: sum(e.values()) for c, e in sorted(self._charges.items())},
        }

    def __repr__(self) -> str:
        return (
            f"HBMLedger({self.npu!r}, {format_bytes(self._used)} used of "
            f"{format_bytes(self._capacity)}, {format_bytes(self.free)} free)"
        )
