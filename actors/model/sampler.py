"""Sampling: a batch of logit rows -> a token (and, when asked, its logprobs) per row.

vLLM's semantics, applied in this order to each row's logits:
  1. logprobs are RAW: the float64 log-softmax of the model's logits before any
     option below (vLLM's default `raw_logprobs`); top-N is by that logprob.
  2. `logit_bias` is added; `banned` tokens and tokens outside `allowed` (a
     guided-decoding bitmask, actors.protocol.sampleable) become -inf.
  3. repetition penalty p, for tokens in the prompt or the output: a logit > 0
     is divided by p, one < 0 multiplied by it.
  4. frequency penalty f and presence penalty r: minus f * (count in the
     output), minus r if that count is > 0.
  5. temperature 0: argmax. Else divided by the temperature, top-k (0 = all),
     top-p, and a draw from the softmax.

A seeded draw uses a generator seeded by (seed, index of the token in the
output), never a shared RNG stream, so a sequence samples the same tokens
whatever it is batched with and whichever NPU runs it. Rows with no options
cost one batched argmax; the options are built as matrices (bias, mask,
output counts) for the rows that use them only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from actors.model.batch import ForwardBatch
from actors.protocol import SamplingParams, SeqWork, TokenLogprob, sampleable


@dataclass(frozen=True)
class RowContext:
    """What sampling one row needs besides its logits (SeqWork's sampling fields)."""

    params: SamplingParams
    output_index: int = 0  # index of the token to sample in the output (seeds the draw)
    output_ids: Sequence[int] = ()  # tokens generated so far (penalties)
    prompt_ids: Sequence[int] = ()  # the prompt (repetition penalty)
    banned: Sequence[int] = ()
    allowed: np.ndarray | None = None  # packed int32 bitmask (actors.protocol.SeqWork.allowed)

    @classmethod
    def of(cls, w: SeqWork) -> RowContext:
        return cls(w.params, w.output_index, w.output_ids, w.prompt_ids, w.banned, w.allowed)

    @property
    def processed(self) -> bool:
        """Whether any option changes the logits before the draw (steps 2 to 4)."""
        return bool(self.params.logit_bias or self.banned or self.allowed is not None or self.params.needs_history)


def sample(logits: torch.Tensor, params: SamplingParams, output_index: int) -> int:
    """Next token from one row of logits [V] (plain params: no history, no masks)."""
    return sample_rows(logits[None], [RowContext(params, output_index)])[0][0]


def sample_rows(logits: torch.Tensor, rows: Sequence[RowContext]) -> tuple[list[int], list[TokenLogprob | None]]:
    """A token per row of logits [B, V], and its logprobs where the row's params ask
    (else None). A row's token does not depend on the other rows."""
    tokens = [0] * len(rows)
    argmax = [r.params.greedy and not r.processed for r in rows]
    plain = [i for i, a in enumerate(argmax) if a]
    rest = [i for i, a in enumerate(argmax) if not a]
    if plain:
        best = torch.argmax(logits if not rest else logits[plain], dim=-1).tolist()
        for i, t in zip(plain, best):
            tokens[i] = t
    if rest:
        for i, t in zip(rest, _sample_processed(logits[rest].double(), [rows[i] for i in rest])):
            tokens[i] = t
    asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if asked:
        found = logprobs_of(logits[asked], [tokens[i] for i in asked], [rows[i].params.logprobs for i in asked])
        for i, lp in zip(asked, found):
            logprobs[i] = lp
    return tokens, logprobs


def logprobs_of(logits: torch.Tensor, token_ids: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """Row i's raw logprob of token_ids[i] (float64 log-softmax of logits [R, V]),
    with its top[i] most likely tokens."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    chosen = lp.gather(1, torch.tensor(list(token_ids), dtype=torch.long)[:, None])[:, 0].tolist()
    values, ids = torch.topk(lp, min(max(top, default=0), lp.shape[1]), dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(t, c, tuple(zip(ids[i][:k], values[i][:k])))
            for i, (t, c, k) in enumerate(zip(token_ids, chosen, top))]


def apply_options(x: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
    """Steps 2 to 4 on float64 logits x [B, V] (in place; returned)."""
    vocab = x.shape[1]
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    if biased:
        bias = torch.zeros(len(biased), vocab, dtype=x.dtype)
        for row, i in enumerate(biased):
            inside = {t: b for t, b in rows[i].params.logit_bias.items() if t < vocab}
            bias[row, list(inside)] = torch.tensor(list(inside.values()), dtype=x.dtype)
        x[biased] += bias
    masks = {i: m for i, r in enumerate(rows) if (m := sampleable(r.allowed, r.banned, vocab)) is not None}
    if masks:
        keep = torch.from_numpy(np.stack(list(masks.values())))
        if not keep.any(dim=1).all():
            raise ValueError("sampling: a row allows no token (its allowed bitmask and banned ids exclude all)")
        x[list(masks)] = x[list(masks)].masked_fill(~keep, float("-inf"))
    hist = [i for i, r in enumerate(rows) if r.params.needs_history]
    if hist:
        counts = _counts([rows[i].output_ids for i in hist], vocab)
        p = torch.tensor([rows[i].params.repetition_penalty for i in hist], dtype=x.dtype)[:, None]
        f = torch.tensor([rows[i].params.frequency_penalty for i in hist], dtype=x.dtype)[:, None]
        r = torch.tensor([rows[i].params.presence_penalty for i in hist], dtype=x.dtype)[:, None]
        seen = (counts > 0) | (_counts([rows[i].prompt_ids for i in hist], vocab) > 0)
        h = x[hist]
        h = torch.where(seen, torch.where(h > 0, h / p, h * p), h)
        x[hist] = h - f * counts - r * (counts > 0)
    return x


def _counts(ids: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    """[len(ids), vocab] occurrences of each token in each list (one bincount)."""
    flat = torch.tensor([row * vocab + t for row, seq in enumerate(ids) for t in seq if 0 <= t < vocab],
                        dtype=torch.long)
    return torch.bincount(flat, minlength=len(ids) * vocab).view(len(ids), vocab).double()


def _sample_processed(x: torch.Tensor, rows: Sequence[RowContext]) -> list[int]:
    """Tokens for float64 logits x [B, V] of rows that are processed or not greedy."""
    apply_options(x, rows)
    tokens = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        for i, t in zip(greedy, torch.argmax(x[greedy], dim=-1).tolist()):
            tokens[i] = t
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if drawn:
        probs = _probs(x[drawn], [rows[i].params for i in drawn])
        for row, i in enumerate(drawn):
            gen = torch.Generator()
            seed = rows[i].params.seed
            if seed is None:
                gen.seed()  # unseeded requests are not reproducible, as in OpenAI's API
            else:
                gen.manual_seed((seed * 1_000_003 + rows[i].output_index) % (2**63))
            tokens[i] = int(torch.multinomial(probs[row], 1, generator=gen).item())
    return tokens


def _probs(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p over float64 logits x [B, V]: the draw's distribution."""
    scores = x / torch.tensor([p.temperature for p in params], dtype=x.dtype)[:, None]
    vocab = scores.shape[1]
    topk = [i for i, p in enumerate(params) if p.top_k]
    if topk:
        k = torch.tensor([min(params[i].top_k, vocab) for i in topk], dtype=torch.long)
        kth = torch.topk(scores[topk], int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        scores[topk] = scores[topk].masked_fill(scores[topk] < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    topp = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if topp:
        top_p = torch.tensor([params[i].top_p for i in topp], dtype=probs.dtype)[:, None]
        sorted_p, order = torch.sort(probs[topp], dim=-1, descending=True)
        cut = torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p  # drop once the mass before reaches top_p
        sorted_p[cut] = 0.0
        probs[topp] = torch.zeros_like(sorted_p).scatter(1, order, sorted_p)
    return probs


def prompt_logprobs(lm_head, hidden: torch.Tensor, fb: ForwardBatch, works: Sequence[SeqWork]) -> dict[str, list[TokenLogprob | None]]:
    """The prompt logprobs of the chunks `works` fed in forward batch `fb`, for those
    whose params ask (actors.protocol.NPUStepResult.prompt_logprobs): row i's target
    is token_ids[i+1], or next_token after the last row of a chunk that does not
    sample; a chunk that samples has None for its last row. One `lm_head` matmul
    over the final hidden states [T, h] of the rows that have a target."""
    rows, targets, tops, spans = [], [], [], []
    for seq, w in zip(fb.slices(), works):
        if w.params.prompt_logprobs is None:
            continue
        after = w.prompt_targets
        spans.append((w.seq_id, seq.length, len(after)))
        rows.extend(range(seq.offset, seq.offset + len(after)))
        targets.extend(after)
        tops.extend([w.params.prompt_logprobs] * len(after))
    found = iter(logprobs_of(lm_head(hidden[rows]), targets, tops) if rows else ())
    return {seq_id: [next(found) for _ in range(k)] + [None] * (length - k) for seq_id, length, k in spans}
