"""The reference model: parameter counts, seeded weights and EP shards,
checkpoints, generate() (batching invariance, seeded sampling, stop tokens) and
ModelConfig validation."""

from __future__ import annotations


import pytest
import torch
from pydantic import ValidationError

from actors.model.config import ModelConfig
from actors.model.sampler import sample
from actors.model.model import MoEModel
from actors.model.reference import build_reference, generate
from actors.model.weights import (
    expert_of,
    init_module_,
    init_tensor,
    load_checkpoint,
    save_checkpoint,
    shard_names,
)
from actors.protocol import SamplingParams

from helpers import tiny


pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("one_thread")]



def random_prompts(lengths, seed=1, vocab=512):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


# ---- parameter counts ----------------------------------------------------------

COUNT_CONFIGS = {
    "gqa-moge-dense1": dict(name="tiny-gqa-moge"),
    "gqa-moge-tied": dict(name="tiny-gqa-moge", tie_word_embeddings=True),
    "gqa-no-shared-dense2": dict(name="tiny-gqa-moge", num_shared_experts=0, first_k_dense_layers=2),
    "gqa-two-shared": dict(name="tiny-gqa-moge", num_shared_experts=2),
    "mla-q-lora": dict(name="tiny-mla-topk"),
    "mla-no-q-lora": dict(name="tiny-mla-topk", q_lora_rank=None),
    "mla-tied-dense1": dict(name="tiny-mla-topk", tie_word_embeddings=True, first_k_dense_layers=1),
    # MTP heads (actors/model/mtp.py): counted in `mtp`, replicated
    "gqa-moge-mtp2": dict(name="tiny-gqa-moge", num_mtp_layers=2),
    "mla-mtp1": dict(name="tiny-mla-topk", num_mtp_layers=1),
}


@pytest.mark.parametrize("key", list(COUNT_CONFIGS))
def test_parameter_counts_match_built_model(key):
    over = dict(COUNT_CONFIGS[key])
    cfg = tiny(over.pop("name"), **over)
    model = build_reference(cfg)
    counts = cfg.parameter_counts()
    assert sum(p.numel() for p in model.parameters()) == counts.total
    routed = sum(p.numel() for n, p in model.named_parameters() if expert_of(n) is not None)
    assert routed == counts.routed_experts
    assert counts.replicated == counts.total - routed
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert mtp == counts.mtp
    if cfg.tie_word_embeddings:
        assert model.lm_head is None and counts.lm_head == 0


# ---- weights -------------------------------------------------------------------

HELD = {1: [2, 5], 2: [0, 7]}  # tiny-gqa-moge: layer 0 is dense, layers 1-2 MoE


def test_shard_gets_the_same_seeded_tensors_as_the_full_model():
    cfg = tiny("tiny-gqa-moge")
    full = dict(build_reference(cfg).named_parameters())
    shard_model = MoEModel(cfg, held_experts=HELD).to(torch.float64)
    init_module_(shard_model, cfg)
    shard = dict(shard_model.named_parameters())
    assert set(shard) < set(full)
    for name, tensor in shard.items():
        assert torch.equal(tensor, full[name]), name
        assert torch.equal(init_tensor(cfg, name, tensor.shape, tensor.dtype), tensor), name
    experts_held = {expert_of(n) for n in shard if expert_of(n)}
    assert experts_held == {(layer, e) for layer, es in HELD.items() for e in es}
    # distinct tensors of the same shape get distinct values; another seed changes them
    a = full["layers.1.mlp.experts.2.up_proj.weight"]
    b = full["layers.1.mlp.experts.5.up_proj.weight"]
    assert a.shape == b.shape and not torch.equal(a, b)
    other = init_tensor(cfg.model_copy(update={"seed": 1}), "layers.1.mlp.experts.2.up_proj.weight", a.shape, a.dtype)
    assert not torch.equal(other, a)
    assert torch.equal(full["norm.weight"], torch.ones_like(full["norm.weight"]))


def test_shard_names_keeps_replicated_and_held_experts_only():
    cfg = tiny("tiny-gqa-moge")
    names = list(build_reference(cfg).state_dict())
    kept = shard_names(names, HELD)
    shard_model = MoEModel(cfg, held_experts=HELD)
    assert kept == [n for n in names if n in set(shard_model.state_dict())]
    assert set(kept) == set(shard_model.state_dict())
    for n in names:
        owner = expert_of(n)
        if owner is None:
            assert n in kept
        else:
            assert (n in kept) == (owner[1] in HELD.get(owner[0], []))
    assert "layers.1.mlp.gate.weight" in kept and "layers.1.mlp.shared_experts.up_proj.weight" in kept
    assert "layers.1.mlp.experts.3.up_proj.weight" not in kept
    assert not any(expert_of(n) for n in shard_names(names, {}))


def test_expert_of():
    assert expert_of("layers.12.mlp.experts.63.down_proj.weight") == (12, 63)
    assert expert_of("layers.1.mlp.shared_experts.up_proj.weight") is None
    assert expert_of("layers.1.mlp.gate.weight") is None


@pytest.mark.parametrize("base", ["tiny-gqa-moge", "tiny-mla-topk"])
def test_checkpoint_round_trip(tmp_path, base):
    cfg = tiny(base)
    model = build_reference(cfg)
    path = tmp_path / "model.safetensors"
    save_checkpoint(model.state_dict(), path)
    state = load_checkpoint(path)
    assert set(state) == set(model.state_dict())
    loaded = build_reference(cfg, state)
    prompts = random_prompts([5, 11])
    a = generate(model, prompts, 6, keep_logits=True)
    b = generate(loaded, prompts, 6, keep_logits=True)
    assert a.tokens == b.tokens
    for la, lb in zip(a.logits, b.logits):
        assert torch.equal(torch.stack(la), torch.stack(lb))
    # a different seed's weights do not give the same output (the load did something)
    c = generate(build_reference(cfg.model_copy(update={"seed": 3})), prompts, 6)
    assert c.tokens != a.tokens


def test_load_checkpoint_missing_path(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)  # a directory is not a checkpoint


# ---- generate --------------------------------------------------------------------

BATCH_LENGTHS = [3, 17, 1, 9, 30]


@pytest.mark.parametrize("base", ["tiny-gqa-moge", "tiny-mla-topk"])
def test_batching_invariance_greedy(base):
    model = build_reference(tiny(base))
    prompts = random_prompts(BATCH_LENGTHS)
    batched = generate(model, prompts, 8, keep_logits=True)
    assert [len(t) for t in batched.tokens] == [8] * len(prompts)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], 8, keep_logits=True)
        assert alone.tokens[0] == batched.tokens[i], f"prompt {i}"
        torch.testing.assert_close(torch.stack(alone.logits[0]), torch.stack(batched.logits[i]), rtol=0, atol=1e-9)
    # the prompts do not all produce the same thing (the test can tell them apart)
    assert len({tuple(t) for t in batched.tokens}) > 1


SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)


def test_seeded_sampling_is_batch_invariant_and_seed_dependent():
    model = build_reference(tiny("tiny-gqa-moge"))
    prompts = random_prompts([6, 13, 2])
    batched = generate(model, prompts, 16, params=SEEDED)
    for i, p in enumerate(prompts):
        assert generate(model, [p], 16, params=SEEDED).tokens[0] == batched.tokens[i]
    assert generate(model, prompts, 16, params=SEEDED).tokens == batched.tokens  # reproducible
    other = generate(model, prompts, 16, params=SEEDED.model_copy(update={"seed": 8}))
    for i in range(len(prompts)):
        assert other.tokens[i] != batched.tokens[i]
    greedy = generate(model, prompts, 16)
    assert greedy.tokens != batched.tokens


def test_sampler_top_k_top_p_restrict_the_draw():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(512, generator=gen, dtype=torch.float64) * 2
    best = int(torch.argmax(logits))
    top5 = set(torch.topk(logits, 5).indices.tolist())
    for seed in range(40):
        assert sample(logits, SamplingParams(temperature=1.0, top_k=1, seed=seed), 0) == best
        assert sample(logits, SamplingParams(temperature=1.0, top_p=1e-6, seed=seed), 0) == best
        assert sample(logits, SamplingParams(temperature=5.0, top_k=5, seed=seed), seed) in top5
    draws = {sample(logits, SamplingParams(temperature=5.0, top_k=5, seed=s), 0) for s in range(40)}
    assert len(draws) > 1  # not greedy
    assert sample(logits, SamplingParams(), 0) == best


def test_stop_token_stops_only_that_sequence():
    model = build_reference(tiny("tiny-mla-topk"))
    prompts = random_prompts([7, 12])
    full = generate(model, prompts, 10)
    first = full.tokens[0]
    # a token first produced at index j >= 1 that the other sequence never produces
    j = next(
        i for i in range(1, len(first)) if first[i] not in first[:i] and first[i] not in full.tokens[1]
    )
    stopped = generate(model, prompts, 10, stop_token_ids={first[j]})
    assert stopped.tokens[0] == first[: j + 1]  # the stop token is emitted, nothing after it
    assert stopped.tokens[1] == full.tokens[1]


def test_max_new_tokens_one():
    model = build_reference(tiny("tiny-gqa-moge"))
    out = generate(model, random_prompts([4, 8]), 1, keep_logits=True)
    assert [len(t) for t in out.tokens] == [1, 1]
    assert [len(l) for l in out.logits] == [1, 1]
    assert out.tokens[0][0] == int(torch.argmax(out.logits[0][0]))


def test_max_new_tokens_zero_generates_nothing():
    model = build_reference(tiny("tiny-gqa-moge"))
    assert generate(model, [[1, 2, 3]], 0).tokens == [[]]


def test_empty_prompt_is_rejected():
    model = build_reference(tiny("tiny-gqa-moge"))
    with pytest.raises(ValueError):
        generate(model, [[5, 6, 7], []], 3)


def test_float64_model_gives_float64_logits():
    cfg = tiny("tiny-gqa-moge")
    model = build_reference(cfg)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, cfg.hidden_size, generator=gen, dtype=torch.float64)
    nudged = hidden * (1 + 1e-15)
    a, b = model.logits(hidden), model.logits(nudged)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


# ---- config validation -------------------------------------------------------------


def test_config_rejects_heads_not_multiple_of_kv_heads():
    with pytest.raises(ValidationError, match=r"num_heads \(6\).*num_kv_heads \(4\)"):
        ModelConfig(attention="gqa", num_heads=6, num_kv_heads=4)
    ModelConfig(attention="gqa", num_heads=8, num_kv_heads=4)  # fine
    ModelConfig(attention="mla", num_heads=6, num_kv_heads=4)  # MLA ignores num_kv_heads


def test_config_rejects_moge_k_not_multiple_of_groups():
    with pytest.raises(ValidationError, match=r"num_experts_per_tok \(6\).*num_expert_groups \(4\)"):
        ModelConfig(router="moge", num_experts=8, num_expert_groups=4, num_experts_per_tok=6)
    with pytest.raises(ValidationError, match=r"num_experts \(10\).*num_expert_groups \(4\)"):
        ModelConfig(router="moge", num_experts=10, num_expert_groups=4, num_experts_per_tok=4)
    with pytest.raises(ValidationError, match="num_experts_per_tok"):
        ModelConfig(num_experts=4, num_experts_per_tok=5)
    # the same numbers are fine for a top-k router
    ModelConfig(router="topk", num_experts=8, num_expert_groups=4, num_experts_per_tok=6)


def test_config_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValidationError, match="num_expert"):
        ModelConfig(num_expert=8)
    with pytest.raises(ValidationError, match="hidden_size"):
        ModelConfig(hidden_size=0)
    with pytest.raises(ValidationError, match="head_dim"):
        ModelConfig(attention="gqa", head_dim=15)
