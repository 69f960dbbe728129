"""A request's choices: several prompts and n samples each, merged into one
stream of deltas with OpenAI's choice indices, and what completions add to a
choice (echo, best_of, logprobs in the completions and chat shapes).

One prompt's n choices are one engine request (they share its KV,
cluster.proxy.pipeline); a list of prompts is that many requests, run side by
side. Choice `i * n + j` is sample j of prompt i, as OpenAI and vLLM number them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from cluster.proxy.pipeline import Delta

TokenText = Callable[[int], str]  # a token's text, as logprobs show it


async def merge(runs: list[AsyncIterator[Delta]], n: int) -> AsyncIterator[Delta]:
    """The deltas of every prompt's run as they come, choice j of prompt i as
    index i * n + j. An error in any run ends the merge with that error (the
    others are cancelled, which frees their KV)."""
    if len(runs) == 1:
        async for d in runs[0]:
            yield d
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, run: AsyncIterator[Delta]) -> None:
        try:
            async for d in run:
                await queue.put(replace(d, index=i * n + d.index))
            await queue.put(done)
        except BaseException as err:  # noqa: BLE001 (handed to the consumer, who raises it)
            await queue.put(err)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(runs)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


@dataclass
class Echo:
    """`echo`: a choice's text begins with its prompt, and (with logprobs) its logprobs
    with the prompt's. The prompt's logprobs arrive on choice 0's first delta of its
    prompt; deltas of the other choices that come before it wait for it."""

    texts: list[str]  # per prompt
    prompt_ids: list[list[int]]  # per prompt
    n: int
    with_logprobs: bool
    prompt_logprobs: dict[int, list] = field(default_factory=dict)  # per prompt, once known
    started: set[int] = field(default_factory=set)  # choices whose prompt went out
    held: dict[int, list[Delta]] = field(default_factory=dict)  # per prompt, waiting for its logprobs

    async def apply(self, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        async for d in deltas:
            prompt = d.index // self.n
            if d.prompt_logprobs is not None:
                self.prompt_logprobs[prompt] = d.prompt_logprobs
            if self.with_logprobs and prompt not in self.prompt_logprobs:
                self.held.setdefault(prompt, []).append(d)
                continue
            for held in self.held.pop(prompt, []):
                yield self._prefixed(held)
            yield self._prefixed(d)
        for held in [d for ds in self.held.values() for d in ds]:  # (no prompt logprobs came: none to show)
            yield self._prefixed(held)

    def _prefixed(self, d: Delta) -> Delta:
        if d.index in self.started:
            return d
        self.started.add(d.index)
        prompt = d.index // self.n
        entries = None
        if self.with_logprobs:  # (token id, TokenLogprob or None): the prompt's first token has none
            lps = self.prompt_logprobs.get(prompt) or [None] * len(self.prompt_ids[prompt])
            entries = list(zip(self.prompt_ids[prompt], lps)) + entries_of(d)
        return replace(d, text=self.texts[prompt] + d.text, logprobs=entries)


def entries_of(d: Delta) -> list:
    """A delta's logprobs as (token id, TokenLogprob) pairs (an echoed prompt's are pairs already)."""
    return [e if isinstance(e, tuple) else (e.token_id, e) for e in d.logprobs or []]


def drop_generated(deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """`max_tokens: 0` (with echo): the one token generated to run the prompt is not
    part of the answer; each choice ends at its prompt."""

    async def gen():
        async for d in deltas:
            if d.prompt_logprobs is not None or d.finish_reason is not None:  # (the prompt's logprobs go on)
                yield replace(d, text="", finish_reason=d.finish_reason and "length", completion_tokens=0,
                              logprobs=[])

    return gen()


def cumulative_logprob(entries: list) -> float:
    return sum(lp.logprob for _, lp in entries if lp is not None)


def best(choices: dict[int, dict], n: int, best_of: int) -> list[dict]:
    """best_of: of each prompt's best_of choices (dicts with their logprob `entries`),
    the n with the highest cumulative logprob, in that order (an echoed prompt adds
    the same to each of its choices: the order is the generated tokens')."""
    kept = []
    for prompt in range(len(choices) // best_of):
        group = [choices[prompt * best_of + j] for j in range(best_of)]
        group.sort(key=lambda c: -cumulative_logprob(c["entries"]))
        kept += group[:n]
    return kept


# ---- logprobs in OpenAI's shapes ---------------------------------------------------------


def completion_logprobs(entries: list, token_text: TokenText, start_offset: int = 0) -> dict:
    """The completions API's logprobs: parallel lists over the tokens of the choice's
    text (echoed prompt first: its first token has no logprob). top_logprobs holds
    the alternatives and the token itself, as vLLM."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = start_offset
    for token_id, lp in entries:
        text = token_text(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:  # the prompt's first token: nothing before it to predict it from
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(lp.logprob)
        top = {token_text(t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list, token_text: TokenText) -> dict:
    """The chat API's logprobs: `content`, one item per generated token with its
    bytes and `top_logprobs` (the N most likely, as OpenAI)."""

    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
                        for _, lp in entries if lp is not None]}
