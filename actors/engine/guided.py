"""Guided decoding for OpenAI's ``response_format``: JSON object / JSON schema.

Data flow: the HTTP layer turns a request's ``response_format`` into a
:class:`GuideSpec` (:meth:`GuideSpec.from_response_format`) and checks it with
:func:`validate` (a ValueError becomes a 400); the spec travels on the engine
request. Each engine builds one :class:`GuideCompiler` from the tokenizer
(the text of a Hugging Face ``tokenizer.json``) and the model's vocab_size,
asks it for one :class:`GuideMatcher` per guided sequence, and before every
decode step puts ``matcher.bitmask()`` (or a row filled by
:meth:`GuideCompiler.fill_bitmasks`) on the sequence's ``SeqWork.allowed``;
each sampled token goes back through :meth:`GuideMatcher.accept`.

The grammar work is llguidance's (Rust; the tokenizer.json is handed to it as
is, so it undoes the byte-level BPE itself). The mask is packed int32, one bit
per token id, ``ceil(vocab_size / 32)`` words: bit j of word i allows token
``32*i + j``, the layout xgrammar and llguidance use. Ids past the tokenizer's
own vocabulary (a model's embedding table may be padded) are never allowed;
EOS is allowed only once the JSON is complete.

Whitespace is compact (none between tokens of the JSON): with unbounded runs a
model could keep emitting blanks forever and never close the object.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import llguidance as llg
import llguidance.numpy as llg_np
import numpy as np
import tokenizers

# First name present wins (the same order as the proxy's tokenizer).
_EOS_NAMES = ("<|eos|>", "</s>", "<|endoftext|>")
# "Any JSON object": what OpenAI's json_object mode promises.
_ANY_OBJECT = '{"type": "object"}'
# Applied after the schema's own "x-guidance" options, so a request cannot turn
# unbounded whitespace back on.
_JSON_OPTIONS = {"whitespace_flexible": False}
DEFAULT_CACHE_SIZE = 32


@dataclass(frozen=True)
class GuideSpec:
    """What a sequence's output must be: ``json_object`` (any JSON object) or
    ``json_schema`` (``schema``: the JSON schema as a JSON string)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None

    def __post_init__(self):
        if self.kind == "json_object":
            if self.schema is not None:
                raise ValueError("GuideSpec: json_object takes no schema")
        elif self.kind == "json_schema":
            if not isinstance(self.schema, str):
                raise ValueError("GuideSpec: json_schema needs the schema as a JSON string")
        else:
            raise ValueError(f"GuideSpec: unknown kind {self.kind!r}; expected 'json_object' or 'json_schema'")

    @classmethod
    def from_response_format(cls, response_format: dict | None) -> GuideSpec | None:
        """The spec of an OpenAI ``response_format`` mapping; None for no constraint
        (absent, or ``{"type": "text"}``). Raises ValueError naming the bad field."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise ValueError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object")
        if kind != "json_schema":
            raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
        js = response_format.get("json_schema")
        if not isinstance(js, dict):
            raise ValueError("response_format.json_schema must be an object")
        schema = js.get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be an object (the JSON schema)")
        return cls("json_schema", json.dumps(schema))  # key order kept: it is the output's property order


def _grammar(spec: GuideSpec) -> str:
    """llguidance's grammar text of a spec; ValueError for a schema that is not a JSON object."""
    text = _ANY_OBJECT if spec.kind == "json_object" else spec.schema
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"response_format: the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError("response_format: the JSON schema must be a JSON object")
    return llg.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)


def validate(spec: GuideSpec) -> None:
    """Raise ValueError (a clear message) if the spec's schema cannot be compiled:
    bad JSON, an unknown type, a dangling $ref, an unsatisfiable bound, a bad pattern.
    Needs no tokenizer, so the HTTP layer can call it before the request is queued."""
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(_grammar(spec))
    if is_error:
        raise ValueError(f"response_format: unsupported or invalid JSON schema: {messages[0]}")


class GuideMatcher:
    """The grammar state of one guided sequence. Not thread-safe; one per sequence."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, eos_token_id: int):
        self._m = matcher
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def bitmask(self) -> np.ndarray:
        """The tokens allowed next: int32, ``ceil(vocab_size/32)`` words, packed as
        in the module docstring. Only EOS once the sequence :attr:`is_terminated`."""
        out = np.empty(self.mask_words, dtype=np.int32)
        self.fill_bitmask(out)
        return out

    def fill_bitmask(self, out: np.ndarray) -> None:
        """:meth:`bitmask` written into ``out`` (int32, C-contiguous, ``mask_words``
        long), e.g. one row of a batch's mask array."""
        if out.dtype != np.int32 or out.shape != (self.mask_words,) or not out.flags["C_CONTIGUOUS"]:
            raise ValueError(f"bitmask target must be a contiguous int32 array of {self.mask_words} words")
        self._m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token. False (state unchanged) if the grammar does
        not allow it here, so a caller may still pick another. EOS is accepted when
        the JSON is complete, and after an :attr:`error` (the mask then allows only EOS)."""
        token_id = int(token_id)
        if token_id == self.eos_token_id:  # validate_tokens() says 0 for EOS once the matcher is stopped
            if self._m.is_error():
                return True
            return self._m.is_accepting() and self._m.consume_token(token_id)
        if not 0 <= token_id < self.vocab_size or self._m.validate_tokens([token_id]) != 1:
            return False
        return self._m.consume_token(token_id)

    def rollback(self, num_tokens: int) -> bool:
        """Undo the last ``num_tokens`` accepted tokens (speculative decoding, preemption)."""
        return self._m.rollback(num_tokens)

    @property
    def is_accepting(self) -> bool:
        """The JSON is complete: EOS may come now (more may still be allowed)."""
        return self._m.is_accepting()

    @property
    def is_terminated(self) -> bool:
        """EOS was accepted, or nothing but EOS can follow (the JSON is closed),
        or the matcher hit an internal limit (see :attr:`error`)."""
        return self._m.is_stopped()

    done = is_terminated

    @property
    def error(self) -> str | None:
        """Why the matcher stopped on an error (a grammar-too-complex limit), else None."""
        if not self._m.is_error():
            return None
        return self._m.get_error() or "error"


class GuideCompiler:
    """Compiles specs for one tokenizer and vocab; compiled grammars are kept in an
    LRU of ``cache_size`` specs and each matcher is a cheap copy of one.

    ``tokenizer_json``: the text of a Hugging Face tokenizer.json. ``vocab_size``:
    the model's (at least the tokenizer's; the extra ids are never allowed).
    ``eos_token_id``: None looks up ``<|eos|>``, ``</s>``, ``<|endoftext|>``.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int | None = None,
                 cache_size: int = DEFAULT_CACHE_SIZE):
        hf = tokenizers.Tokenizer.from_str(tokenizer_json)
        n_tok = hf.get_vocab_size(with_added_tokens=True)
        if vocab_size < n_tok:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {n_tok} tokens")
        if eos_token_id is None:
            eos_token_id = next((i for i in map(hf.token_to_id, _EOS_NAMES) if i is not None), None)
            if eos_token_id is None:
                raise ValueError(f"the tokenizer has no EOS token (none of {_EOS_NAMES}); pass eos_token_id")
        if not 0 <= eos_token_id < n_tok:
            raise ValueError(f"eos_token_id {eos_token_id} is not a token of the tokenizer")
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.cache_size = cache_size
        self._tok = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_id,
                                    slices=llg.LLTokenizer.json_slices())
        self._cache: OrderedDict[GuideSpec, llg.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: llg.LLExecutor | None = None

    @classmethod
    def from_file(cls, path: str, vocab_size: int, eos_token_id: int | None = None,
                  cache_size: int = DEFAULT_CACHE_SIZE) -> GuideCompiler:
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), vocab_size, eos_token_id, cache_size)

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def _compiled(self, spec: GuideSpec) -> llg.LLMatcher:
        """A pristine matcher of the spec's grammar (cached; never advanced)."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        m = llg.LLMatcher(self._tok, _grammar(spec), log_level=0)  # never raises: errors are state
        if m.is_error():
            raise ValueError(f"response_format: unsupported or invalid JSON schema: {m.get_error()}")
        with self._lock:
            self._cache[spec] = m
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return m

    def matcher(self, spec: GuideSpec) -> GuideMatcher:
        """A fresh matcher for one sequence. ValueError if the spec does not compile."""
        return GuideMatcher(self._compiled(spec).deep_copy(), self.vocab_size, self.eos_token_id)

    def fill_bitmasks(self, matchers: Sequence[GuideMatcher], out: np.ndarray) -> None:
        """Row i of ``out`` (int32, C-contiguous, ``(>= len(matchers), mask_words)``)
        := ``matchers[i].bitmask()``, computed in parallel outside the GIL."""
        if out.dtype != np.int32 or out.ndim != 2 or out.shape[1] != self.mask_words or out.shape[0] < len(matchers):
            raise ValueError(f"bitmask target must be int32 of shape (>= {len(matchers)}, {self.mask_words})")
        if self._executor is None:
            self._executor = llg.LLExecutor()
        llg_np.fill_next_token_bitmask_par(self._executor, [(g._m, i) for i, g in enumerate(matchers)], out)
