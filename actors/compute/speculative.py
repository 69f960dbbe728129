"""MTP speculative decoding inside an NPU step (greedy requests only).

A decode work item carries [last token, draft]: the main model's forward over
both rows verifies the draft — accepted if the main model's greedy token at
the last token equals it — and yields one more token (the correction, or the
bonus after an accepted draft). Then the MTP head reads the main model's
residual at every accepted position and the token that followed it, filling
its own KV cache, and its prediction at the last position is the next draft.
A rejected draft's KV needs no rollback: the engine simply does not count it,
and the next step overwrites its slot in the paged cache.
"""

from __future__ import annotations

import torch

from actors.model.batch import ForwardBatch
from actors.model.moe import LocalExperts
from actors.protocol import SeqWork


def verify_drafts(model, hidden: torch.Tensor, seq, w: SeqWork) -> tuple[list[int], int]:
    """(accepted drafts, the token after them) for one sequence's rows."""
    k = w.num_drafts
    end = seq.offset + seq.length
    greedy = torch.argmax(model.logits(hidden[end - k - 1 : end]), dim=-1).tolist()
    drafts = w.token_ids[-k:]
    n = 0
    while n < k and drafts[n] == greedy[n]:
        n += 1
    return drafts[:n], greedy[n]


def propose_drafts(model, residual: torch.Tensor, fb: ForwardBatch, works: list[SeqWork], tokens: dict, accepted: dict, cache) -> dict[str, int]:
    """Run MTP depth 0 over each proposing sequence's accepted rows; its last row's
    greedy prediction is the sequence's next draft."""
    items, rows = [], []
    for seq, w in zip(fb.slices(), works):
        if not w.propose:
            continue
        valid = seq.length - w.num_drafts + len(accepted.get(w.seq_id, []))
        last_next = tokens.get(w.seq_id, w.next_token)
        if last_next is None:
            continue
        nxt = w.token_ids[1:valid] + [last_next]
        items.append((w.seq_id, nxt, w.start_pos))
        rows.extend(range(seq.offset, seq.offset + valid))
    if not items:
        return {}
    mtp_fb = ForwardBatch.build(items)
    out = model.mtp_forward(0, residual[torch.tensor(rows, dtype=torch.long)], mtp_fb, cache, LocalExperts())
    logits = model.logits(model.norm(out[mtp_fb.last_rows()]))
    return {seq_id: int(t) for (seq_id, _, _), t in zip(items, torch.argmax(logits, dim=-1).tolist())}
