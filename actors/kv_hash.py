"""Prefix-chain block hashes, the way vLLM's automatic prefix caching computes them.

A prompt is cut into blocks of `block_size` tokens. Block i's hash covers its
parent's hash (block i-1, or a fixed root for block 0), its own token ids and an
optional `extra` key (LoRA name, cache salt, multimodal hash, ...). Because the
parent is folded in, equal hashes mean equal *prefixes*, not just equal blocks,
so "how much of this prompt is cached" is the longest run of leading hashes
that an index holds. A trailing partial block is not hashed: its KV is still
being written and cannot be shared.

The proxy, every engine and the global KV cache actor compute these in
different processes and compare them, so the hash must be the same in every
process and Python run. Python's `hash()` is salted per process for strings
(PYTHONHASHSEED), hence blake2b over a fixed byte encoding instead.

No torch and no ray import: the proxy's tokenizer threads use this too.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

SEED = "omniray-apc-v1"  # change it to invalidate every hash everywhere at once
_MASK = (1 << 64) - 1


def _digest(payload: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


ROOT: int = _digest(SEED.encode("utf-8"))  # parent of block 0


def _encode_extra(extra: str | None) -> bytes:
    # Tagged so that None and "" (and any string) never encode alike.
    if extra is None:
        return b"\x00"
    if not isinstance(extra, str):
        raise TypeError(f"extra must be str or None, got {type(extra).__name__}")
    raw = extra.encode("utf-8")
    return b"\x01" + struct.pack("<Q", len(raw)) + raw


def hash_block(parent: int, tokens: Sequence[int], extra: str | None = None) -> int:
    """Hash of one block given its parent's hash: an unsigned 64-bit int.

    Encoding: parent (u64), token count (u64), tokens (i64 each), tagged extra,
    all little-endian, so the bytes (and the hash) do not depend on the platform.
    An engine calls this as each block fills to extend its chain incrementally.
    """
    n = len(tokens)
    payload = struct.pack(f"<QQ{n}q", parent & _MASK, n, *tokens) + _encode_extra(extra)
    return _digest(payload)


def block_hashes(
    token_ids: Sequence[int], block_size: int, extra: str | None = None, root: int = ROOT
) -> list[int]:
    """One hash per FULL block of `token_ids`, chained from `root`."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[int] = []
    parent = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra)
        out.append(parent)
    return out
