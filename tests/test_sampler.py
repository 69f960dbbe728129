"""The batched sampler (actors.model.sampler) with the OpenAI sampling options:
penalties, logit_bias, bans and guided-decoding masks, logprobs and prompt
logprobs, against hand computations and the reference model; real compute's
prompt logprobs over a chunked prefill, and the emulated stand-ins. No Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actors.compute.emulated import EmulatedCompute, standin_token
from actors.compute.real import RealCompute
from actors.cost_model import CostModel
from actors.devices import get_device
from actors.expert_map import ExpertMap
from actors.hbm import HBMLedger
from actors.model.reference import build_reference, generate
from actors.model.sampler import RowContext, apply_options, sample, sample_rows
from actors.protocol import NPUBatch, NPUSpec, SamplingParams, SeqWork

from helpers import tiny

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("one_thread")]

V = 64
LOGITS = torch.randn(V, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
SEEDS = range(40)


def bitmask(ids, vocab: int) -> np.ndarray:
    """The packed int32 bitmask allowing `ids` (xgrammar's layout)."""
    bits = np.zeros(-(-vocab // 32) * 32, dtype=np.uint8)
    bits[list(ids)] = 1
    return np.packbits(bits, bitorder="little").view("<i4")


def draw(params: SamplingParams, logits=LOGITS, index: int = 0, **ctx) -> int:
    return sample_rows(logits[None], [RowContext(params, index, **ctx)])[0][0]


# ---- penalties: the processed logits, by hand -------------------------------------

def test_penalties_follow_vllm_formulas():
    x = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, 0.0], dtype=torch.float64)
    prompt, output = (0, 1), (2, 2, 3, 0)
    p = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.25, presence_penalty=0.5)
    got = apply_options(x.clone()[None], [RowContext(p, output_ids=output, prompt_ids=prompt)])[0]
    want = []
    for t, v in enumerate(x.tolist()):
        if t in prompt or t in output:
            v = v / 1.5 if v > 0 else v * 1.5
        count = output.count(t)
        want.append(v - 0.25 * count - (0.5 if count else 0.0))
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    # and draws follow the softmax of those logits over the temperature
    probs = torch.softmax(torch.tensor(want, dtype=torch.float64) / 0.7, -1)
    sampled = p.model_copy(update={"temperature": 0.7})
    n = 4000
    draws = [draw(sampled.model_copy(update={"seed": s}), logits=x, output_ids=output, prompt_ids=prompt)
             for s in range(n)]
    freq = torch.bincount(torch.tensor(draws), minlength=len(want)).double() / n
    assert (freq - probs).abs().max() < 0.03  # 4 sigma at n = 4000


def test_each_penalty_alone():
    x = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    rows = [RowContext(SamplingParams(presence_penalty=-1.0), output_ids=(0, 0)),
            RowContext(SamplingParams(frequency_penalty=1.0), output_ids=(0, 0, 2)),
            RowContext(SamplingParams(repetition_penalty=2.0), prompt_ids=(1,), output_ids=(0,))]
    got = apply_options(x.repeat(3, 1), rows)
    assert got.tolist() == [[3.0, -1.0, 0.5], [0.0, -1.0, -0.5], [1.0, -2.0, 0.5]]


def test_penalties_change_greedy_tokens_as_expected():
    best = int(torch.argmax(LOGITS))
    assert draw(SamplingParams(frequency_penalty=2.0), output_ids=(best,) * 20) != best
    assert draw(SamplingParams(presence_penalty=-2.0), output_ids=(3,)) == (
        3 if LOGITS[3] + 2.0 > LOGITS.max() else best)


# ---- logit_bias, banned, allowed --------------------------------------------------

@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=2.0, top_p=0.95)])
def test_logit_bias_forces_and_forbids(params):
    worst = int(torch.argmin(LOGITS))
    best = int(torch.argmax(LOGITS))
    forced = params.model_copy(update={"logit_bias": {worst: 100.0}})
    assert {draw(forced.model_copy(update={"seed": s})) for s in SEEDS} == {worst}
    forbid = params.model_copy(update={"logit_bias": {best: -100.0}})
    assert best not in {draw(forbid.model_copy(update={"seed": s}), index=s) for s in SEEDS}


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=5.0)])
def test_banned_and_allowed_are_honoured(params):
    best = int(torch.argmax(LOGITS))
    allowed = {1, 5, 33, 63}
    for s in SEEDS:
        p = params.model_copy(update={"seed": s})
        assert draw(p, index=s, banned=(best,)) != best
        assert draw(p, index=s, allowed=bitmask(allowed, V)) in allowed
        assert draw(p, index=s, allowed=bitmask(allowed, V), banned=(33, 63)) in {1, 5}
    # tokens past what the bitmask covers are disallowed
    wide = torch.cat([LOGITS, torch.full((40,), 50.0, dtype=torch.float64)])
    assert draw(params.model_copy(update={"seed": 1}), logits=wide, allowed=bitmask(allowed, V)) in allowed
    sampled = {draw(SamplingParams(temperature=5.0, seed=s), index=s, allowed=bitmask(allowed, V)) for s in SEEDS}
    assert sampled == allowed  # a draw, not a fallback to one token


def test_a_row_that_allows_nothing_is_refused():
    with pytest.raises(ValueError):
        draw(SamplingParams(), allowed=bitmask([3], V), banned=(3,))


# ---- temperature, top-k, seeds ------------------------------------------------------

def test_top_k_zero_means_all():
    flat = torch.zeros(8, dtype=torch.float64)
    assert {draw(SamplingParams(temperature=1.0, seed=s), logits=flat) for s in range(200)} == set(range(8))
    for s in SEEDS:
        p = SamplingParams(temperature=0.9, seed=s)
        assert draw(p, index=s) == draw(p.model_copy(update={"top_k": V}), index=s)


def test_seeded_draws_are_unchanged_for_plain_params():
    """The tokens the sampler drew before the new options (frozen here)."""
    assert [sample(LOGITS, SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=s), s) for s in range(12)] == [
        11, 43, 53, 53, 53, 53, 53, 29, 11, 53, 53, 53]
    assert [sample(LOGITS, SamplingParams(temperature=1.5, seed=s), 3) for s in range(12)] == [
        62, 62, 33, 13, 9, 62, 53, 9, 53, 38, 53, 53]


def test_options_that_do_not_bite_do_not_change_a_draw():
    for s in SEEDS:
        p = SamplingParams(temperature=1.2, top_k=30, seed=s)
        want = draw(p, index=s)
        assert draw(p, index=s) == want  # reproducible
        idle = p.model_copy(update={"frequency_penalty": 1.0, "presence_penalty": 1.0, "logprobs": 5,
                                    "logit_bias": {7: 0.0}, "min_tokens": 3})
        assert draw(idle, index=s, allowed=bitmask(range(V), V)) == want


def test_a_row_samples_the_same_whatever_it_is_batched_with():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, V, generator=gen, dtype=torch.float64)
    rows = [RowContext(SamplingParams(temperature=0.7, seed=1, logprobs=2), 4),
            RowContext(SamplingParams(), 0),
            RowContext(SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, seed=2, temperature=1.0), 2,
                       output_ids=(1, 2, 2), prompt_ids=(5,)),
            RowContext(SamplingParams(logit_bias={9: 3.0}, top_p=0.5, temperature=1.0, seed=3), 1),
            RowContext(SamplingParams(logprobs=0), 7, banned=(int(torch.argmax(logits[4])),)),
            RowContext(SamplingParams(temperature=2.0, top_k=4, seed=4), 0, allowed=bitmask(range(0, V, 2), V))]
    tokens, lps = sample_rows(logits, rows)
    for i, row in enumerate(rows):
        alone_tokens, alone_lps = sample_rows(logits[i : i + 1], [row])
        assert alone_tokens == [tokens[i]] and alone_lps == [lps[i]], i
    order = [5, 3, 1, 4, 0, 2]
    shuffled = sample_rows(logits[order], [rows[i] for i in order])
    assert shuffled == ([tokens[i] for i in order], [lps[i] for i in order])


# ---- logprobs ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logprobs_are_raw_and_top_n_sorted(dtype):
    logits = (torch.randn(3, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3).to(dtype)
    rows = [RowContext(SamplingParams(logprobs=5)),
            RowContext(SamplingParams(logprobs=0, temperature=1.0, seed=2)),
            RowContext(SamplingParams(logprobs=20, logit_bias={0: 100.0}))]  # raw: the bias does not show
    tokens, lps = sample_rows(logits, rows)
    raw = torch.log_softmax(logits.double(), -1)
    assert tokens[2] == 0
    for i, (t, lp) in enumerate(zip(tokens, lps)):
        assert lp.token_id == t
        assert abs(lp.logprob - raw[i, t].item()) < 1e-9
        n = rows[i].params.logprobs
        assert len(lp.top) == n
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        want = torch.topk(raw[i], n)
        assert [t for t, _ in lp.top] == want.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(want.values.tolist(), abs=1e-12)
    assert sample_rows(logits, [RowContext(SamplingParams())] * 3)[1] == [None] * 3


# ---- the reference generate with the options ------------------------------------

@pytest.fixture(scope="module")
def model():
    return build_reference(tiny("tiny-gqa-moge"))


PROMPT = [5, 17, 300, 42, 9, 77, 8, 123, 64, 3, 211]


def test_reference_logprobs_and_prompt_logprobs(model):
    params = SamplingParams(logprobs=3, prompt_logprobs=2)
    out = generate(model, [PROMPT, [1, 2]], 4, params=[params, SamplingParams()], keep_logits=True)
    assert out.logprobs[1] == [] and out.prompt_logprobs[1] == []
    for tok, lp, logits in zip(out.tokens[0], out.logprobs[0], out.logits[0]):
        assert lp.token_id == tok and lp.top[0][0] == tok  # greedy: the most likely
        assert abs(lp.logprob - torch.log_softmax(logits.double(), -1)[tok].item()) < 1e-9
    pl = out.prompt_logprobs[0]
    assert len(pl) == len(PROMPT) and pl[0] is None
    # the prefix's next-token distribution, prompt token by prompt token
    for j in (1, 6, len(PROMPT) - 1):
        prefix = generate(model, [PROMPT[:j]], 1, keep_logits=True).logits[0][0]
        want = torch.log_softmax(prefix.double(), -1)
        assert pl[j].token_id == PROMPT[j] and abs(pl[j].logprob - want[PROMPT[j]].item()) < 1e-9
        assert len(pl[j].top) == 2


def test_reference_min_tokens_bans_stop_and_eos(model):
    free = generate(model, [PROMPT], 6).tokens[0]
    eos, stop = free[0], free[1]
    assert generate(model, [PROMPT], 6, eos_token_id=eos).tokens[0] == [eos]
    held = generate(model, [PROMPT], 6, params=SamplingParams(min_tokens=3), stop_token_ids={stop},
                    eos_token_id=eos).tokens[0]
    assert eos not in held[:3] and stop not in held[:3]
    assert len(held) == 6 or held[-1] in (eos, stop)


def test_reference_penalties_use_the_sequences_history(model):
    plain = generate(model, [PROMPT], 12).tokens[0]
    assert len(set(plain)) < len(plain)  # the greedy output repeats itself
    fresh = generate(model, [PROMPT], 12, params=SamplingParams(presence_penalty=2.0,
                                                                   frequency_penalty=2.0)).tokens[0]
    assert fresh != plain and len(set(fresh)) > len(set(plain))
    # batched with a plain prompt, each keeps its own history
    both = generate(model, [PROMPT, PROMPT], 12, params=[SamplingParams(presence_penalty=2.0,
                                                                        frequency_penalty=2.0),
                                                         SamplingParams()])
    assert both.tokens == [fresh, plain]


# ---- real compute: prompt logprobs over a chunked prefill --------------------------

def real_compute(cfg, model) -> RealCompute:
    """An EP-1 real NPU in this process, holding `model` (no Ray, no object store)."""
    device = get_device("910B")
    spec = NPUSpec("t.npu0", "t", 0, "910B", "real", cfg, ExpertMap.contiguous(cfg.moe_layers, cfg.num_experts, 1),
                   "g")
    compute = RealCompute(spec, HBMLedger(spec.name, device.hbm_bytes), CostModel(device))
    compute.model = model
    return compute


def test_real_compute_prompt_logprobs_over_two_chunks_equal_the_reference(model):
    params = SamplingParams(prompt_logprobs=4, logprobs=2)
    ref = generate(model, [PROMPT], 1, params=params)
    compute = real_compute(tiny("tiny-gqa-moge"), model)
    k = 4
    first = compute.step(NPUBatch(1, [SeqWork("a", PROMPT[:k], 0, sample=False, params=params,
                                              next_token=PROMPT[k]),
                                      SeqWork("b", [1, 2, 3], 0)]))
    assert first.tokens == {"b": generate(model, [[1, 2, 3]], 1).tokens[0][0]}
    assert set(first.prompt_logprobs) == {"a"} and not first.logprobs
    second = compute.step(NPUBatch(2, [SeqWork("a", PROMPT[k:], k, params=params)]))
    got = first.prompt_logprobs["a"] + second.prompt_logprobs["a"]
    assert len(got) == len(PROMPT) and got[-1] is None  # the last row's target is generated
    for mine, want in zip(got[:-1], ref.prompt_logprobs[0][1:]):
        assert mine.token_id == want.token_id
        assert abs(mine.logprob - want.logprob) < 1e-9
        assert [t for t, _ in mine.top] == [t for t, _ in want.top]
        assert all(abs(a - b) < 1e-9 for (_, a), (_, b) in zip(mine.top, want.top))
    assert second.tokens["a"] == ref.tokens[0][0]
    assert abs(second.logprobs["a"].logprob - ref.logprobs[0][0].logprob) < 1e-9


def test_real_compute_samples_with_penalties_like_the_reference(model):
    params = SamplingParams(temperature=0.9, seed=4, repetition_penalty=1.4, frequency_penalty=0.5,
                            logit_bias={7: 2.0})
    ref = generate(model, [PROMPT], 5, params=params).tokens[0]
    compute = real_compute(tiny("tiny-gqa-moge"), model)
    out, pos = [], 0
    feed = PROMPT
    for i in range(5):
        step = compute.step(NPUBatch(i, [SeqWork("a", feed, pos, params=params, output_index=i,
                                                 output_ids=tuple(out), prompt_ids=tuple(PROMPT))]))
        pos += len(feed)
        out.append(step.tokens["a"])
        feed = [out[-1]]
    assert out == ref


# ---- emulated stand-ins -------------------------------------------------------------

def emulated_compute() -> EmulatedCompute:
    cfg = tiny("tiny-gqa-moge")
    device = get_device("910B")
    spec = NPUSpec("e.npu0", "e", 0, "910B", "emulated", cfg,
                   ExpertMap.contiguous(cfg.moe_layers, cfg.num_experts, 1), "g", time_scale=0.0)
    return EmulatedCompute(spec, HBMLedger(spec.name, device.hbm_bytes), CostModel(device))


def test_emulated_standin_respects_allowed_and_banned():
    compute, vocab = emulated_compute(), 512
    allowed = {3, 40, 41, 500}
    for last in range(30):
        work = dict(token_ids=[last, last + 1], start_pos=7, block_table=[0])  # paged: no KV charge
        plain = compute.step(NPUBatch(1, [SeqWork("p", **work)]))
        assert plain.tokens["p"] == standin_token(last + 1, 9, vocab) and not plain.logprobs
        step = compute.step(NPUBatch(1, [
            SeqWork("a", **work, allowed=bitmask(allowed, vocab), params=SamplingParams(logprobs=3)),
            SeqWork("b", **work, banned=(plain.tokens["p"],)),
            SeqWork("c", **work, allowed=bitmask(allowed, vocab), banned=(3, 500)),
            SeqWork("d", **work, allowed=bitmask(range(vocab), vocab))]))
        assert step.tokens["a"] in allowed and step.tokens["c"] in {40, 41}
        assert step.tokens["b"] != plain.tokens["p"] and step.tokens["d"] == plain.tokens["p"]
        lp = step.logprobs["a"]
        assert lp.token_id == step.tokens["a"] and lp.logprob == -math.log(4)
        assert [t for t, _ in lp.top] == [step.tokens["a"]] + sorted(allowed - {step.tokens["a"]})[:2]
        assert set(step.logprobs) == {"a"}


def test_emulated_prompt_logprobs_are_uniform_over_the_vocabulary():
    compute = emulated_compute()
    p = SamplingParams(prompt_logprobs=2)
    step = compute.step(NPUBatch(1, [SeqWork("a", [9, 8, 7], 0, sample=False, params=p, next_token=6),
                                     SeqWork("b", [9, 8, 7], 0, params=p)]))
    a, b = step.prompt_logprobs["a"], step.prompt_logprobs["b"]
    assert [x.token_id for x in a] == [8, 7, 6] and b[-1] is None and [x.token_id for x in b[:2]] == [8, 7]
    assert all(x.logprob == -math.log(512) and x.top == ((x.token_id, x.logprob), (0, x.logprob)) for x in a)
