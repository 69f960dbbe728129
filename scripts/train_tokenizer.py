"""Train OmniRay's shipped byte-level BPE tokenizer (``cluster/assets/tokenizer.json``).

Regenerate the shipped file (deterministic: same corpus seed, same output) with

    python scripts/train_tokenizer.py --vocab-size 512 --out cluster/assets/tokenizer.json

Why these choices:

* Byte-level BPE with ``ByteLevel.alphabet()`` as the initial alphabet: all 256
  bytes are in the vocabulary, so any UTF-8 text (CJK, emoji, binary junk in a
  prompt) encodes without an unknown token and decodes back exactly.
* ``add_prefix_space=False`` and no normalizer: ``decode(encode(s)) == s`` for
  every string, which the lifecycle's token reuse and the streaming
  detokenizer rely on.
* A small vocabulary (512 by default): the emulated models are small and
  their embedding tables are sized from ``vocab_size``; 256 bytes + 7 special
  tokens leave ~250 merges, enough for common English words.
* The special tokens are cut out of the training text (``_split_specials``),
  as the added-vocabulary matcher cuts them out at encode time; otherwise
  the role markers in the chat samples would waste merges on ``<|``,
  ``assistant`` and ``er|>`` that no real text ever uses.

The corpus comes from ``tokenizer_corpus.py`` (generated in-process, no
downloads); ``--corpus FILE ...`` trains on text files instead.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tokenizer_corpus  # noqa: E402  (sibling script, not a package)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "cluster" / "assets" / "tokenizer.json"

# Order fixes their ids (0..6); cluster/proxy/tokens.py looks them up by name.
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


_SPECIALS_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _split_specials(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from (piece for piece in _SPECIALS_RE.split(text) if piece)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (an iterable of strings)."""
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_split_specials(texts), trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer.")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int, default=tokenizer_corpus.DEFAULT_SEED, help="corpus seed")
    p.add_argument("--corpus-bytes", type=int, default=tokenizer_corpus.DEFAULT_TARGET_BYTES)
    p.add_argument("--corpus", nargs="*", help="train on these text files instead of the generated corpus")
    args = p.parse_args(argv)

    if args.corpus:
        texts = [Path(f).read_text(encoding="utf-8") for f in args.corpus]
    else:
        texts = tokenizer_corpus.generate_corpus(args.seed, args.corpus_bytes)
    tok = build_tokenizer(texts, args.vocab_size)

    for i, t in enumerate(SPECIAL_TOKENS):  # the ids the docstring promises
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out), pretty=True)
    print(f"wrote {out} (vocab_size={tok.get_vocab_size(with_added_tokens=True)})")


if __name__ == "__main__":
    main()
