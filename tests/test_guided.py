"""Guided decoding (actors/engine/guided.py): a random token chooser restricted to
the matcher's bitmask must still produce JSON that parses and fits the schema."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import tokenizers

from actors.engine.guided import GuideCompiler, GuideSpec, validate

from helpers import tiny

pytestmark = pytest.mark.fast

TOKENIZER_JSON = Path(__file__).resolve().parent.parent / "cluster" / "assets" / "tokenizer.json"
VOCAB = tiny("tiny-gqa-moge").vocab_size
PADDED_VOCAB = VOCAB + 100  # a model whose embedding table is larger than the tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "light blue"]},
        "ok": {"type": "boolean"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["color", "ok", "age"],
    "additionalProperties": False,
}
CLOSERS = set('"}]')


@pytest.fixture(scope="module")
def hf() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))


@pytest.fixture(scope="module")
def compiler() -> GuideCompiler:
    return GuideCompiler(TOKENIZER_JSON.read_text(encoding="utf-8"), VOCAB)


def allowed_ids(mask: np.ndarray) -> np.ndarray:
    """Token ids whose bit is set: bit j of word i is token 32*i + j."""
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))


def outside_strings(text: str) -> str:
    """The characters of a JSON text that are not inside a string literal."""
    out, in_str, escaped = [], False, False
    for c in text:
        if in_str:
            in_str, escaped = (escaped or c != '"'), (not escaped and c == "\\")
        elif c == '"':
            in_str = True
        else:
            out.append(c)
    return "".join(out)


def drive(matcher, hf, seed: int, max_tokens: int = 200, free: int = 60) -> list[int]:
    """Sample uniformly among the allowed ids (EOS among them once the JSON is
    complete) until EOS. After `free` tokens, prefer ids that decode to closing
    characters only (`"`, `}`, `]`) or EOS, so that unbounded strings end."""
    rng, out = np.random.default_rng(seed), []
    n_tok = hf.get_vocab_size(with_added_tokens=True)
    for step in range(max_tokens):
        mask = matcher.bitmask()
        assert mask.dtype == np.int32 and mask.shape == ((matcher.vocab_size + 31) // 32,)
        ids = allowed_ids(mask)
        assert len(ids) and ids.max() < n_tok  # never an id the tokenizer lacks
        assert (matcher.eos_token_id in ids) == matcher.is_accepting  # EOS only once the JSON is complete
        if step >= free:
            closing = [i for i in ids if i == matcher.eos_token_id or (hf.decode([int(i)]) and set(hf.decode([int(i)])) <= CLOSERS)]
            ids = np.array(closing) if closing else ids
        token = int(rng.choice(ids))
        assert matcher.accept(token)
        if token == matcher.eos_token_id:
            assert matcher.is_terminated
            return out
        out.append(token)
    raise AssertionError(f"no EOS within {max_tokens} tokens: {hf.decode(out)!r}")


def test_json_object_random_output_parses(compiler, hf):
    texts = []
    for seed in range(8):
        text = hf.decode(drive(compiler.matcher(GuideSpec("json_object")), hf, seed))
        assert isinstance(json.loads(text), dict), text
        assert not any(c.isspace() for c in outside_strings(text)), text  # compact: no whitespace between tokens
        texts.append(text)
    assert max(map(len, texts)) > 20, texts  # not only "{}"


def test_json_schema_random_output_validates(compiler, hf):
    spec = GuideSpec.from_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}})
    seen = set()
    for seed in range(8):
        value = json.loads(hf.decode(drive(compiler.matcher(spec), hf, seed)))
        jsonschema.validate(value, SCHEMA)
        seen.add((value["color"], value["ok"]))
    assert len(seen) > 1  # random choices, not one forced path


def test_padded_vocab_never_allows_extra_ids(hf):
    comp = GuideCompiler(TOKENIZER_JSON.read_text(encoding="utf-8"), PADDED_VOCAB)
    spec = GuideSpec("json_schema", json.dumps(SCHEMA))
    matchers = [comp.matcher(spec) for _ in range(3)]
    batch = np.zeros((4, comp.mask_words), dtype=np.int32)
    comp.fill_bitmasks(matchers, batch)
    assert comp.mask_words == (PADDED_VOCAB + 31) // 32
    for row in batch[:3]:
        np.testing.assert_array_equal(row, matchers[0].bitmask())
        assert allowed_ids(row).max() < VOCAB
    assert not matchers[0].accept(VOCAB + 5) and not matchers[0].accept(-1)
    jsonschema.validate(json.loads(hf.decode(drive(matchers[0], hf, seed=3))), SCHEMA)


def test_disallowed_token_is_refused_and_state_kept(compiler, hf):
    m = compiler.matcher(GuideSpec("json_object"))
    before = m.bitmask()
    allowed = set(allowed_ids(before))
    bad = next(i for i in range(VOCAB) if i not in allowed)
    assert not m.accept(bad)
    assert not m.accept(compiler.eos_token_id)  # JSON not complete yet
    assert m.error is None and not m.is_terminated
    np.testing.assert_array_equal(m.bitmask(), before)
    brace = hf.token_to_id("{")
    assert m.accept(brace) and m.accept(hf.token_to_id("}"))
    assert m.is_accepting and m.done
    assert list(allowed_ids(m.bitmask())) == [compiler.eos_token_id]
    assert m.rollback(1) and not m.is_accepting


def test_compiled_grammars_are_cached():
    comp = GuideCompiler(TOKENIZER_JSON.read_text(encoding="utf-8"), VOCAB, cache_size=2)
    specs = [GuideSpec("json_schema", json.dumps({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}))
             for i in range(3)]
    first = comp._compiled(specs[0])
    assert comp._compiled(specs[0]) is first
    comp.matcher(specs[1]), comp.matcher(specs[2])
    assert len(comp._cache) == 2 and specs[0] not in comp._cache


@pytest.mark.parametrize("schema, words", [
    ('{"type": "nonsense"}', "nonsense"),
    ('{"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}', "missing"),
    ('{"type": "integer", "minimum": 5, "maximum": 1}', "minimum"),
    ('{"type": "string", "pattern": "("}', "regex"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not valid JSON"),
])
def test_invalid_schema_raises(compiler, schema, words):
    spec = GuideSpec("json_schema", schema)
    with pytest.raises(ValueError, match="response_format") as e:
        validate(spec)
    assert words in str(e.value)
    with pytest.raises(ValueError):
        compiler.matcher(spec)


def test_spec_from_response_format():
    assert GuideSpec.from_response_format(None) is None
    assert GuideSpec.from_response_format({"type": "text"}) is None
    assert GuideSpec.from_response_format({"type": "json_object"}) == GuideSpec("json_object")
    validate(GuideSpec("json_object"))
    for bad in [{"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x"}}]:
        with pytest.raises(ValueError, match="response_format"):
            GuideSpec.from_response_format(bad)
    with pytest.raises(ValueError):
        GuideSpec("json_schema")


def test_compile_and_mask_timing(hf):
    text = TOKENIZER_JSON.read_text(encoding="utf-8")
    t0 = time.perf_counter()
    comp = GuideCompiler(text, VOCAB)
    t1 = time.perf_counter()
    m = comp.matcher(GuideSpec("json_schema", json.dumps(SCHEMA)))
    t2 = time.perf_counter()
    steps, spent = 0, 0.0
    for seed in range(5):
        m = comp.matcher(GuideSpec("json_schema", json.dumps(SCHEMA)))
        rng = np.random.default_rng(seed)
        while not m.is_terminated:
            s = time.perf_counter()
            mask = m.bitmask()
            spent += time.perf_counter() - s
            steps += 1
            assert m.accept(int(rng.choice(allowed_ids(mask))))
    print(f"\nguided: tokenizer load {1e3 * (t1 - t0):.1f} ms, schema compile {1e3 * (t2 - t1):.2f} ms, "
          f"mask step {1e6 * spent / steps:.1f} us (mean of {steps}), vocab {VOCAB}")
