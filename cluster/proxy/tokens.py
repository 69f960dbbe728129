"""Tokenizer, chat template and streaming detokenizer for the Omni Proxy.

Data flow: the proxy slave renders a chat request with
:meth:`Tokenizer.chat_segments`, encodes it once (``cluster.proxy.token_cache``:
cached, on the tokenizer thread; the ids are what the prefill and decode sides
and the KV-block hashes reuse), and turns the engine's token stream back into
text deltas with one :class:`IncrementalDetokenizer` per request.

The shipped tokenizer (``cluster/assets/tokenizer.json``) is a 512-token
byte-level BPE trained by ``scripts/train_tokenizer.py``; any Hugging Face
``tokenizer.json`` can be loaded instead with :meth:`Tokenizer.from_file`.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from importlib import resources

import tokenizers
from tokenizers import decoders

ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
END_MARKER = "<|end|>"
# First name present wins: OmniRay's own, then the common Hugging Face spellings.
_EOS_NAMES = ("<|eos|>", "</s>", "<|endoftext|>")
_BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<|startoftext|>")


def _shipped_tokenizer_json() -> str:
    # importlib.resources rather than __file__, so it also works from a wheel or zip.
    return resources.files("cluster").joinpath("assets", "tokenizer.json").read_text(encoding="utf-8")


def tokenizer_json_text(path: str | None = None) -> str:
    """The text of a manifest's tokenizer.json (None: the shipped one): what an engine's
    guided decoding builds its token masks from."""
    if path is None:
        return _shipped_tokenizer_json()
    with open(path, encoding="utf-8") as f:
        return f.read()


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the ids the server needs.

    Wrapping (not subclassing) keeps the proxy's surface to the few calls it
    uses, so another backend could stand in without touching callers.
    """

    def __init__(self, hf: tokenizers.Tokenizer, source: str = "<memory>"):
        self.hf = hf
        self.source = source
        self.eos_token_id = self._first_id(_EOS_NAMES)
        self.bos_token_id = self._first_id(_BOS_NAMES)
        self.pad_token_id = self.hf.token_to_id("<|pad|>")

    @classmethod
    def from_file(cls, path: str | None = None) -> Tokenizer:
        """Load a ``tokenizer.json``; ``None`` loads the one shipped with the package.

        Errors name the path, since a bad path in a manifest is the usual cause.
        """
        source = "cluster/assets/tokenizer.json (package data)" if path is None else str(path)
        try:
            text = tokenizer_json_text(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"tokenizer file not found: {source}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read tokenizer file {source}: {e}") from e
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise ValueError(f"not a valid tokenizer.json: {source}: {e}") from e
        return cls(hf, source)

    def _first_id(self, names: Iterable[str]) -> int | None:
        return next((i for i in map(self.hf.token_to_id, names) if i is not None), None)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included (what an embedding table needs)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``. Marker strings inside ``text`` become their special ids."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Like :meth:`encode` for many texts; the Rust side runs them in parallel with
        the GIL released. (The `_fast` call keeps no offsets: the same ids, sooner, and
        its results free in about 1 ms, where a 1 MiB prompt's offsets take ~70 ms.)"""
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; an id the tokenizer does not know (an emulated model's
        vocabulary is larger than the shipped tokenizer's) shows as <unk:ID>."""
        ids, n = list(ids), self.vocab_size
        if all(0 <= i < n for i in ids):
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        parts, run = [], []
        for i in ids + [-1]:
            if 0 <= i < n:
                run.append(i)
                continue
            if run:
                parts.append(self.hf.decode(run, skip_special_tokens=skip_special_tokens))
                run = []
            if i != -1:
                parts.append(unknown_id_text(i))
        return "".join(parts)

    def apply_chat_template(self, messages: Sequence[dict]) -> str:
        """Render OpenAI-style messages, ending with the assistant marker as generation prompt.

        ``<|role|>\\n{content}<|end|>\\n`` per message, then ``<|assistant|>\\n``
        (``developer`` is rendered as ``system``). No BOS is added: prepending it is
        the caller's choice. CHAT_TEMPLATE is the same template in Jinja.
        """
        return "".join(self.chat_segments(messages))

    def chat_segments(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                      continue_final_message: bool = False) -> list[str]:
        """The chat template one message at a time. Every segment starts with a
        special marker, where the tokenizer splits anyway, so encoding the segments
        one by one gives exactly the ids of the whole prompt, and a chat history
        re-sent each turn is tokenized once per message (TokenCache).
        `continue_final_message`: the last message is left open (no end marker)."""
        parts = []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            marker = ROLE_MARKERS.get(ROLE_ALIASES.get(role, role))
            if marker is None:
                expected = sorted([*ROLE_MARKERS, *ROLE_ALIASES])
                raise ValueError(f"message {i}: unsupported chat role {role!r}; expected one of {expected}")
            content = m.get("content")
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise ValueError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
            parts.append(f"{marker}\n{content}{END_MARKER}\n")
        if continue_final_message and parts:
            parts[-1] = parts[-1].removesuffix(f"{END_MARKER}\n")
        if add_generation_prompt:
            parts.append(f"{ROLE_MARKERS['assistant']}\n")
        return parts

    def special_tokens(self) -> dict[str, str | None]:
        """The BOS, EOS and padding tokens as text (None where the tokenizer has none)."""
        ids = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id, "pad_token": self.pad_token_id}
        return {name: None if i is None else self.hf.id_to_token(i) for name, i in ids.items()}


# Tokenizer.apply_chat_template in Jinja, for clients that render prompts themselves
# (/tokenizer_info; Hugging Face's convention: `messages`, `add_generation_prompt`).
CHAT_TEMPLATE = (
    "{%- set markers = " + json.dumps(ROLE_MARKERS | {a: ROLE_MARKERS[r] for a, r in ROLE_ALIASES.items()}) + " -%}"
    "{%- for message in messages -%}"
    "{{- markers[message['role']] + '\\n' + (message['content'] or '') + '" + END_MARKER + "\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- markers['assistant'] + '\\n' -}}{%- endif -%}"
)


def unknown_id_text(token_id: int) -> str:
    return f"<unk:{token_id}>"


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes->printable-unicode table that the ByteLevel decoder undoes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


class IncrementalDetokenizer:
    """Turns a token stream into text deltas whose concatenation equals ``decode(ids)``.

    Byte-level BPE splits multi-byte UTF-8 characters across tokens, so decoding
    one token at a time would emit U+FFFD halves. For byte-level tokenizers this
    maps each token to its raw bytes and feeds an incremental UTF-8 decoder,
    which holds back an incomplete character until its last byte arrives: O(1)
    per token and exact. Other tokenizers (SentencePiece-style) use a sliding
    window: re-decode the tokens since the last clean boundary and emit what was
    added, unless it ends in U+FFFD (an unfinished character).

    Call :meth:`add` per token id and :meth:`flush` once at the end of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        hf = tokenizer.hf
        self._byte_level = isinstance(hf.decoder, decoders.ByteLevel)
        self._special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # window path only
        self._prefix = 0  # window start: a clean character boundary
        self._read = 0  # end of the tokens whose text is already emitted

    def add(self, token_id: int) -> str:
        """Feed one id; return the newly completed text (possibly "")."""
        if self._byte_level:
            return self._utf8.decode(self._token_bytes(token_id))
        self._ids.append(token_id)
        return self._window_delta(final=False)

    def flush(self) -> str:
        """End of stream: emit whatever is held back (an unfinished character as U+FFFD)."""
        if self._byte_level:
            return self._utf8.decode(b"", final=True)
        return self._window_delta(final=True)

    def _token_bytes(self, token_id: int) -> bytes:
        if self.skip_special_tokens and token_id in self._special:
            return b""
        token = self.tokenizer.hf.id_to_token(token_id) if token_id >= 0 else None
        if token is None:  # as decode(): visible, so an emulated model's tokens still stream as text
            return unknown_id_text(token_id).encode()
        try:
            return bytes(_BYTE_DECODER[c] for c in token)
        except KeyError:  # like the Rust ByteLevel decoder: unmapped token -> its UTF-8
            return token.encode("utf-8")

    def _window_delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read], self.skip_special_tokens)
        new_text = decode(self._ids[self._prefix :], self.skip_special_tokens)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

