"""The paged KV store's block export and import: what moves a sequence's KV
between NPUs (an elastic scale-in) and from a prefill instance to a decode one."""

from __future__ import annotations

import pytest
import torch

from actors.model.paged_kv import PagedKVStore

from helpers import tiny


@pytest.mark.parametrize("model", ["tiny-gqa-moge", "tiny-mla-topk"])
def test_blocks_round_trip_between_stores(model):
    cfg = tiny(model)
    src, dst = PagedKVStore(cfg, 16, 4, torch.float32), PagedKVStore(cfg, 16, 4, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for layer in src.pool:
        for t in layer:
            t.copy_(torch.randn(t.shape, generator=gen))
    before = [[t.clone() for t in layer] for layer in dst.pool]

    moved, into = [9, 2, 14, 5], [0, 7, 3, 11]
    data = src.export_blocks(moved)
    assert len(data) == len(moved)
    for d in data:
        d.setflags(write=False)  # as the object store hands them back
    dst.import_blocks(into, data)

    untouched = [b for b in range(16) if b not in into]
    for layer_src, layer_dst, layer_before in zip(src.pool, dst.pool, before):
        for s, d, b in zip(layer_src, layer_dst, layer_before):
            assert torch.equal(d[into], s[moved])  # each block landed where it was told, in order
            assert torch.equal(d[untouched], b[untouched])
