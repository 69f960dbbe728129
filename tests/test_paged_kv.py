"""The paged KV store's block export and import: what moves a sequence's KV
between NPUs (an elastic scale-in) and from a prefill instance to a decode one."""

from __future__ import annotations

import pytest
import torch

from actors.model.paged_kv import PagedKVStore

from helpers import tiny

pytestmark = pytest.mark.fast


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
    data = src.export_stacked(moved)
    assert len(data) == len(moved)
    data.setflags(write=False)  # as the object store hands it back
    dst.import_blocks(into, list(data))

    untouched = [b for b in range(16) if b not in into]
    for layer_src, layer_dst, layer_before in zip(src.pool, dst.pool, before):
        for s, d, b in zip(layer_src, layer_dst, layer_before):
            assert torch.equal(d[into], s[moved])  # each block landed where it was told, in order
            assert torch.equal(d[untouched], b[untouched])


@pytest.mark.parametrize("model", ["tiny-gqa-moge", "tiny-mla-topk"])
def test_a_step_writes_and_reads_every_sequence_as_the_sequence_store_does(model):
    """One slot mapping a step, one scatter and one gather a layer: each sequence's
    context (scattered blocks, a chunk, a decode row, a block boundary crossed)
    is exactly what the per-sequence store holds, step after step."""
    from actors.model.batch import ForwardBatch
    from actors.model.kv_store import SequenceKVStore
    from actors.model.paged_kv import kv_shapes

    cfg = tiny(model)
    paged, plain = PagedKVStore(cfg, 32, 4, torch.float32), SequenceKVStore()
    tables = {"a": [7, 2, 30, 11, 4], "b": [0, 19, 5], "c": [25, 13, 8, 1]}
    steps = [{"a": 6, "b": 3, "c": 9}, {"a": 1, "b": 5, "c": 1}, {"a": 1, "c": 4}]
    gen, done = torch.Generator().manual_seed(1), {s: 0 for s in tables}
    for step in steps:
        items = [(sid, [0] * n, done[sid]) for sid, n in step.items()]
        batch = ForwardBatch.build(items)
        paged.unbind_all()
        for sid, _, start in items:
            paged.bind(sid, tables[sid], start)
        for layer in range(len(paged.pool)):
            new = [torch.randn(batch.num_tokens, *shape, generator=gen) for shape in kv_shapes(cfg)]
            got, want = paged.append_batch(layer, batch, *new), plain.append_batch(layer, batch, *new)
            assert paged.plan(batch) is paged.plan(batch)  # made once for the step
            for g, w in zip(got, want):
                assert all(torch.equal(x, y) for x, y in zip(g, w))
        for sid, n in step.items():
            done[sid] += n
