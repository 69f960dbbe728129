"""Tests for cluster/proxy/tokens.py and the shipped byte-level BPE."""

import json
import random
import re
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from cluster.proxy.tokens import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.fast

ASSET = Path(__file__).resolve().parent.parent / "cluster" / "assets" / "tokenizer.json"
TEXTS = [
    "The scheduler routes requests to the least loaded NPU.",
    "你好，世界！专家并行 (expert parallelism) 🚀🔥 done ✅",
    "emoji with modifiers: 👩🏽‍💻 👍🏻 🇯🇵 and combining e\u0301",
    "code:\n    def f(x):\n\treturn x ** 2  # ±5 °C, €42\r\n",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_every_byte_is_encodable(tok):
    text = bytes(range(256)).decode("latin-1") + "".join(map(chr, range(0x3000, 0x3100)))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < tok.vocab_size


def test_vocab_size_matches_file(tok):
    data = json.loads(ASSET.read_text(encoding="utf-8"))
    ids = set(data["model"]["vocab"].values()) | {t["id"] for t in data["added_tokens"]}
    assert tok.vocab_size == len(ids) == max(ids) + 1 == 512


def test_special_ids(tok):
    assert tok.bos_token_id == tok.hf.token_to_id("<|bos|>") is not None
    assert tok.eos_token_id == tok.hf.token_to_id("<|eos|>") is not None
    assert tok.decode([tok.bos_token_id, *tok.encode("hi"), tok.eos_token_id]) == "hi"
    assert tok.decode([tok.eos_token_id], skip_special_tokens=False) == "<|eos|>"


def test_bpe_learned_merges(tok):
    text = "the model serves tokens and the scheduler routes requests with low latency"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8")) * 0.6
    assert len(tok.encode(" the")) == 1


def test_chat_template_two_turns(tok):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Weather?"},
    ]
    prompt = tok.apply_chat_template(messages)
    assert prompt == (
        "<|system|>\nYou are helpful.<|end|>\n"
        "<|user|>\nHi<|end|>\n"
        "<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nWeather?<|end|>\n"
        "<|assistant|>\n"
    )
    ids = tok.encode(prompt)
    markers = [tok.hf.token_to_id(m) for m in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")]
    assert all(m is not None for m in markers)
    assert [i for i in ids if i in markers] == [markers[0], markers[3], markers[1], markers[3],
                                                  markers[2], markers[3], markers[1], markers[3], markers[2]]
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.decode(ids) == "\nYou are helpful.\n\nHi\n\nHello!\n\nWeather?\n\n"


def test_chat_template_bad_role(tok):
    with pytest.raises(ValueError, match="tool"):
        tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    with pytest.raises(ValueError, match="None"):
        tok.apply_chat_template([{"content": "no role"}])


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(str(path))):
        Tokenizer.from_file(str(path))


def test_invalid_file_names_path(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        Tokenizer.from_file(str(path))


def test_any_hf_tokenizer_json_loads(tmp_path):
    """A foreign byte-level tokenizer.json (no merges, HF-style ``</s>``) loads and works."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["</s>"])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    t = Tokenizer.from_file(str(path))
    assert t.eos_token_id == hf.token_to_id("</s>") and t.bos_token_id is None
    assert t.decode(t.encode("héllo 🚀")) == "héllo 🚀"


def _stream(tok, ids, skip=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    return deltas, deltas + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_matches_decode(tok, text):
    ids = tok.encode(text)
    deltas, all_deltas = _stream(tok, ids)
    assert "".join(all_deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_holds_back_partial_chars(tok):
    ids = tok.encode("🚀")
    assert len(ids) > 1  # 4 UTF-8 bytes, not one token in a 512 vocab
    deltas, _ = _stream(tok, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🚀"


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_specials_and_random(tok, skip):
    rng = random.Random(0)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": TEXTS[1] + TEXTS[2]}]))
    ids += [rng.randrange(tok.vocab_size) for _ in range(500)]  # arbitrary ids, even invalid UTF-8
    _, all_deltas = _stream(tok, ids, skip)
    assert "".join(all_deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_window_path(tmp_path):
    """Non-byte-level decoders (here: ByteFallback, SentencePiece style) use the window path."""
    chars = sorted(set("".join(TEXTS[:1]) + "▁"))
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate(c for c in chars if c not in vocab)})
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = Tokenizer(hf)
    text = "The 你好 🚀 scheduler"
    ids = tok.encode(text)
    deltas, all_deltas = _stream(tok, ids)
    assert "".join(all_deltas) == tok.decode(ids)
    assert "你好" in tok.decode(ids) and not any("\ufffd" in d for d in deltas)


def test_ids_beyond_the_vocabulary_show_as_unk_in_both_decoders():
    tok = Tokenizer.from_file()
    ids = tok.encode("an emulated model") + [tok.vocab_size + 7, 150_000] + tok.encode(" says")
    text = tok.decode(ids)
    assert text == tok.decode(tok.encode("an emulated model")) + f"<unk:{tok.vocab_size + 7}><unk:150000>" \
        + tok.decode(tok.encode(" says"))
    stream = IncrementalDetokenizer(tok)
    assert "".join(stream.add(i) for i in ids) + stream.flush() == text
