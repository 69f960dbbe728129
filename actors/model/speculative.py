"""Greedy self-speculative decoding with the model's own MTP head(s).

Each round, per live sequence whose main-model cache holds positions 0..L-1
and whose last token t_L is not yet processed:
1. draft: MTP depth 0 on its pending rows (main pre-norm hidden h_i, token
   t_{i+1}) up to i = L-1 gives d_1 (for t_{L+1}); it is then chained k-1 more
   times at positions L, L+1, ..., fed its own output hidden and its own draft.
2. verify: ONE batched main-model forward over [t_L, d_1..d_k] at L..L+k gives
   the main greedy tokens g_0..g_k. Accept the longest prefix d_1..d_n with
   d_j == g_{j-1}, then emit g_n (the correction, or the bonus when n == k).
3. roll back: main layers keep positions 0..L+n; the MTP layer keeps 0..L-1
   (only rows built from true hidden states and true tokens); chained draft
   rows are dropped right after drafting.
Every emitted token is a main-model greedy token over a cache holding only
accepted tokens, so the output equals `reference.generate`'s greedy output;
the MTP head only decides how many tokens one main forward yields.

With num_mtp_layers > 1 only depth 0 drafts (chained), as vLLM's MTP proposer
does: deeper depths would each need their own trailing cache history.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from actors.model.batch import ForwardBatch
from actors.model.kv_store import SequenceKVStore
from actors.model.model import MoEModel
from actors.model.moe import LocalExperts


class TruncatableKVStore(SequenceKVStore):
    """SequenceKVStore that can forget a sequence's newest positions (rejected drafts)."""

    def truncate(self, seq_id: str, length: int, layers=None) -> None:
        """Keep positions [0, length) of `layers` (default: all) of seq_id."""
        kept = self.export(seq_id)
        for layer, tensors in kept.items():
            if layers is None or layer in layers:
                kept[layer] = tuple(t[:length] for t in tensors)
        self.load(seq_id, kept)


@dataclass
class SpecStats:
    drafted: int = 0  # draft tokens proposed (and verified)
    accepted: int = 0  # draft tokens the main model agreed with
    forward_passes: int = 0  # batched main-model forwards, prefill included
    draft_passes: int = 0  # batched MTP forwards
    trace: list[tuple[int, int, list[int], int]] = field(default_factory=list)
    # per sequence round: (prompt index, tokens generated before it, drafts, accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class SpeculativeOutput:
    tokens: list[list[int]]  # generated ids per prompt
    stats: SpecStats


@dataclass
class _Seq:
    tokens: list[int]  # prompt + generated; tokens[-1] is not yet in the main cache
    pending: torch.Tensor  # main pre-norm hidden of positions mtp_len..L-1, not yet in the MTP cache
    mtp_len: int = 0

    @property
    def main_len(self) -> int:
        return len(self.tokens) - 1


@contextmanager
def _capture_prenorm(model: MoEModel, box: list):
    """MTP needs the main model's hidden before its final norm, which forward()
    discards; a hook keeps verification literally `model(...)`, the same call
    reference.generate makes, instead of a re-implementation of it."""
    handle = model.norm.register_forward_hook(lambda mod, args, out: box.append(args[0]))
    try:
        yield
    finally:
        handle.remove()


def _main_forward(model, items, cache, experts, stats):
    """(batch, pre-norm hidden [T, h], greedy next token of every row [T])."""
    batch, box = ForwardBatch.build(items), []
    with _capture_prenorm(model, box):
        normed = model(batch, cache, experts)
    stats.forward_passes += 1
    return batch, box[0], torch.argmax(model.logits(normed), dim=-1)


def _mtp_step(model, items, hidden, cache, experts, stats):
    """One MTP depth-0 forward; returns (output hidden, greedy draft) at each sequence's last row."""
    batch = ForwardBatch.build(items)
    out = model.mtp_forward(0, hidden, batch, cache, experts)[batch.last_rows()]
    stats.draft_passes += 1
    return out, torch.argmax(model.logits(model.norm(out)), dim=-1)


@torch.no_grad()
def speculative_generate(
    model: MoEModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    num_draft: int = 1,
    stop_token_ids: set[int] | None = None,
    executor=None,
) -> SpeculativeOutput:
    """Greedy generation of exactly max_new_tokens per prompt (fewer only after a
    stop token), drafting num_draft tokens a round with the MTP head."""
    if model.mtp is None:
        raise ValueError("speculative_generate needs a model with num_mtp_layers > 0")
    if max_new_tokens < 1 or num_draft < 1 or any(not p for p in prompts):
        raise ValueError("need max_new_tokens >= 1, num_draft >= 1 and non-empty prompts")
    stop, stats = stop_token_ids or set(), SpecStats()
    cache, experts = TruncatableKVStore(), executor or LocalExperts()
    main_layers = set(range(model.cfg.num_layers))
    mtp_layers = set(range(model.cfg.num_layers, model.cfg.num_layers + model.cfg.num_mtp_layers))
    out: list[list[int]] = [[] for _ in prompts]

    def emit(i: int, sid: str, new: list[int]) -> bool:
        """Append accepted tokens, clipped at a stop token; True if i goes on."""
        for t in new:
            out[i].append(t)
            if t in stop:
                break
        live = len(out[i]) < max_new_tokens and out[i][-1] not in stop
        if not live:
            cache.free(sid)
        return live

    # prefill: the first token, and the pending hidden rows of every prompt position
    batch, pre, greedy = _main_forward(model, [(str(i), list(p), 0) for i, p in enumerate(prompts)], cache, experts, stats)
    seqs: dict[str, _Seq] = {}
    for s in batch.slices():
        i, rows = int(s.seq_id), slice(s.offset, s.offset + s.length)
        first = int(greedy[s.offset + s.length - 1])
        if emit(i, s.seq_id, [first]):
            seqs[s.seq_id] = _Seq(list(prompts[i]) + [first], pre[rows])

    while seqs:
        k = {sid: min(num_draft, max_new_tokens - len(out[int(sid)]) - 1) for sid in seqs}
        drafts: dict[str, list[int]] = {sid: [] for sid in seqs}
        # draft step 0: catch the MTP cache up to position L-1 with true rows
        dsids = [sid for sid in seqs if k[sid] > 0]
        if dsids:
            items = [(sid, seqs[sid].tokens[seqs[sid].mtp_len + 1 :], seqs[sid].mtp_len) for sid in dsids]
            hid, tok = _mtp_step(model, items, torch.cat([seqs[sid].pending for sid in dsids]), cache, experts, stats)
            for row, sid in enumerate(dsids):
                seq = seqs[sid]
                seq.mtp_len, seq.pending = seq.main_len, seq.pending[:0]
                drafts[sid].append(int(tok[row]))
            last_hid = dict(zip(dsids, hid))
            # chained steps: the single head fed its own hidden and draft, one position on
            for step in range(1, num_draft):
                csids = [sid for sid in dsids if k[sid] > step]
                if not csids:
                    break
                items = [(sid, [drafts[sid][-1]], seqs[sid].main_len + step - 1) for sid in csids]
                hid, tok = _mtp_step(model, items, torch.stack([last_hid[sid] for sid in csids]), cache, experts, stats)
                for row, sid in enumerate(csids):
                    drafts[sid].append(int(tok[row]))
                    last_hid[sid] = hid[row]
            for sid in dsids:  # drop chained rows: they were built from drafts
                cache.truncate(sid, seqs[sid].mtp_len, mtp_layers)
        # verify every sequence's [last token + drafts] in one main forward
        items = [(sid, [seq.tokens[-1]] + drafts[sid], seq.main_len) for sid, seq in seqs.items()]
        batch, pre, greedy = _main_forward(model, items, cache, experts, stats)
        nxt = {}
        for s in batch.slices():
            seq, d = seqs[s.seq_id], drafts[s.seq_id]
            g = greedy[s.offset : s.offset + s.length].tolist()
            n = 0
            while n < len(d) and d[n] == g[n]:
                n += 1
            stats.drafted, stats.accepted = stats.drafted + len(d), stats.accepted + n
            i = int(s.seq_id)
            if d:
                stats.trace.append((i, len(out[i]), list(d), n))
            new = d[:n] + [g[n]]
            if emit(i, s.seq_id, new):
                cache.truncate(s.seq_id, seq.main_len + n + 1, main_layers)
                rows = pre[s.offset : s.offset + n + 1]  # positions L..L+n: all accepted
                seq.pending = torch.cat([seq.pending, rows])
                seq.tokens += new
                nxt[s.seq_id] = seq
        seqs = nxt
    return SpeculativeOutput(out, stats)
