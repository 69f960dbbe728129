"""Deterministic English training corpus for OmniRay's byte-level BPE tokenizer.

Why generate instead of download: the build has no internet, and the shipped
tokenizer must be reproducible bit for bit from the repository alone.  The text
is templated prose about the things OmniRay's prompts talk about (serving
systems, GPUs/NPUs, MoE models), plus everyday topics (weather, cooking,
numbers), code snippets and chat turns rendered with the same role markers as
``cluster.proxy.tokens.Tokenizer.apply_chat_template``, so that the merges the
trainer learns are the ones real prompts use.  A little CJK, accented text and
emoji is mixed in so common multi-byte sequences get a few merges too.

Every choice is drawn from ``random.Random(seed)``: same seed, same bytes.

    python scripts/tokenizer_corpus.py --out build/tokenizer_corpus.txt

``train_tokenizer.py`` imports :func:`generate_corpus` directly, so writing the
file is only needed to inspect it or to train with another tool.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Iterator
from pathlib import Path

DEFAULT_SEED = 20240917
DEFAULT_TARGET_BYTES = 1_500_000

# Must match cluster/proxy/tokens.py; duplicated so this script runs without
# the package installed.
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_MARKER = "<|end|>"

SYSTEMS = ["the proxy", "the scheduler", "the router", "the engine", "the master",
           "the prefill instance", "the decode instance", "the placement service",
           "the autoscaler", "the KV cache manager", "the block manager", "the gateway"]
HARDWARE = ["GPU", "NPU", "Ascend 910B", "Ascend 910C", "H100", "A100", "CPU",
            "accelerator", "device", "chip", "card", "node"]
MODELS = ["the MoE model", "DeepSeek", "Pangu Pro MoE", "the dense model",
          "the language model", "the draft model", "the expert layer", "the attention layer"]
VERBS = ["schedules", "routes", "batches", "serves", "streams", "evicts", "caches",
         "measures", "balances", "allocates", "transfers", "tokenizes", "prefills", "decodes"]
OBJECTS = ["requests", "tokens", "prompts", "KV blocks", "experts", "batches",
           "sequences", "responses", "queues", "weights", "activations", "replicas"]
ADVERBS = ["quickly", "carefully", "in parallel", "without stopping service",
           "under heavy load", "every step", "in the background", "on demand",
           "with low latency", "at high throughput"]
METRICS = ["latency", "throughput", "time to first token", "inter-token latency",
           "memory usage", "cache hit rate", "queue depth", "expert load", "utilization"]
CITIES = ["London", "Paris", "Tokyo", "Shenzhen", "Berlin", "New York", "Seattle",
          "Sydney", "Toronto", "Madrid", "Oslo", "Cairo", "Lima", "Mumbai"]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "humid", "cold",
           "warm", "stormy", "clear", "mild"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FOODS = ["onions", "garlic", "tomatoes", "rice", "noodles", "chicken", "beans",
         "potatoes", "carrots", "mushrooms", "butter", "flour", "eggs", "cheese"]
COOK_VERBS = ["chop", "stir", "boil", "bake", "fry", "simmer", "mix", "season",
              "roast", "slice", "whisk", "grill"]
NAMES = ["Alice", "Bob", "Carol", "David", "Eve", "Frank", "Grace", "Heidi",
         "Ivan", "Judy", "Mallory", "Oscar", "Peggy", "Trent", "Wei", "Yuki"]
QUESTIONS = ["What is", "How does", "Why does", "Can you explain", "When should I use",
             "Where is", "Who maintains", "Which option controls"]
TOPICS = ["expert parallelism", "prefix caching", "continuous batching",
          "speculative decoding", "the KV cache", "tensor parallelism", "the roofline model",
          "request scheduling", "the all-to-all", "load balancing", "quantization"]
CONNECTIVES = ["However,", "Therefore,", "In practice,", "For example,", "As a result,",
               "Meanwhile,", "In addition,", "First,", "Then,", "Finally,"]
MULTILINGUAL = ["你好，世界", "模型推理服务", "专家并行", "こんにちは", "東京は晴れです",
                "안녕하세요", "café crème", "naïve façade", "über schön", "¿Qué tal?",
                "🙂", "🚀 launch", "✅ done", "🔥 hot experts", "Привет, мир", "€42", "±5 °C"]
IDENTS = ["request", "token", "batch", "block", "expert", "queue", "cache", "layer",
          "model", "config", "result", "count", "weights", "scores", "index"]


def _cap(s: str) -> str:
    """Capitalize the first letter only (str.capitalize would turn "KV" into "kv")."""
    return s[:1].upper() + s[1:]


def _sentence_systems(r: random.Random) -> str:
    s = f"{_cap(r.choice(SYSTEMS))} {r.choice(VERBS)} {r.choice(OBJECTS)} {r.choice(ADVERBS)}."
    if r.random() < 0.5:
        s += (f" {r.choice(CONNECTIVES)} the {r.choice(METRICS)} on each {r.choice(HARDWARE)}"
              f" stays below {r.randint(1, 999)} ms.")
    return s


def _sentence_hardware(r: random.Random) -> str:
    return (f"Each {r.choice(HARDWARE)} has {r.choice([16, 32, 64, 80, 96, 128])} GB of memory and "
            f"runs {r.choice(MODELS)} with {r.randint(2, 256)} experts; "
            f"its {r.choice(['utilization', 'cache hit rate', 'HBM usage'])} is {r.uniform(0, 100):.1f} percent.")


def _sentence_weather(r: random.Random) -> str:
    return (f"On {r.choice(DAYS)} the weather in {r.choice(CITIES)} will be {r.choice(WEATHER)} "
            f"with a high of {r.randint(-10, 38)} degrees and a {r.randint(0, 100)}% chance of rain.")


def _sentence_cooking(r: random.Random) -> str:
    a, b = r.sample(FOODS, 2)
    return (f"{_cap(r.choice(COOK_VERBS))} the {a}, then {r.choice(COOK_VERBS)} the {b} "
            f"for {r.randint(2, 45)} minutes at {r.choice([150, 180, 200, 220])} degrees.")


def _sentence_numbers(r: random.Random) -> str:
    a, b = r.randint(0, 9999), r.randint(1, 999)
    return r.choice([
        f"{a} plus {b} equals {a + b}, and {a} times {b} is {a * b}.",
        f"The invoice for {r.choice(NAMES)} totals ${a}.{b % 100:02d} as of 20{r.randint(10, 30)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}.",
        f"Step {b}: loss {r.uniform(0, 5):.4f}, lr {r.choice(['1e-4', '3e-4', '5e-5'])}, tokens/s {a * 10}.",
    ])


def _code_snippet(r: random.Random) -> str:
    x, y = r.sample(IDENTS, 2)
    return r.choice([
        f"def get_{x}_{y}(self, {x}: int) -> list[int]:\n    return [self.{y}[i] for i in range({x})]\n",
        f"for {x} in {y}s:\n    if {x}.done:\n        continue\n    {x}.step()\n",
        f'{{"{x}": {r.randint(0, 99)}, "{y}": "{r.choice(WEATHER)}", "enabled": true}}\n',
        f"$ python -m pytest tests/test_{x}.py -q\n{r.randint(1, 40)} passed in {r.uniform(0, 9):.2f}s\n",
        f"class {x.capitalize()}{y.capitalize()}:\n    def __init__(self):\n        self.{x} = None\n",
        f"ray.get({x}_actor.{y}.remote({r.randint(0, 9)}))\n",
    ])


def _chat(r: random.Random) -> str:
    parts = []
    if r.random() < 0.6:
        parts.append(f"{ROLE_MARKERS['system']}\nYou are a helpful assistant.{END_MARKER}\n")
    for _ in range(r.randint(1, 3)):
        q = f"{r.choice(QUESTIONS)} {r.choice(TOPICS)} in {r.choice(SYSTEMS)}?"
        parts.append(f"{ROLE_MARKERS['user']}\n{q}{END_MARKER}\n")
        parts.append(f"{ROLE_MARKERS['assistant']}\n{_sentence_systems(r)}{END_MARKER}\n")
    return "".join(parts)


def _multilingual(r: random.Random) -> str:
    return f"{r.choice(NAMES)} wrote: {r.choice(MULTILINGUAL)} {r.choice(MULTILINGUAL)}"


# (weight, generator): prose dominates, as it does in real prompts.
_GENERATORS: list[tuple[int, Callable[[random.Random], str]]] = [
    (6, _sentence_systems), (3, _sentence_hardware), (2, _sentence_weather),
    (2, _sentence_cooking), (2, _sentence_numbers), (2, _code_snippet),
    (3, _chat), (1, _multilingual),
]


def iter_corpus(seed: int = DEFAULT_SEED, target_bytes: int = DEFAULT_TARGET_BYTES) -> Iterator[str]:
    """Yield paragraphs (one training sample each) until ``target_bytes`` of UTF-8 are out."""
    r = random.Random(seed)
    weights = [w for w, _ in _GENERATORS]
    gens = [g for _, g in _GENERATORS]
    written = 0
    while written < target_bytes:
        k = r.randint(1, 4)
        pieces = (r.choices(gens, weights)[0](r) for _ in range(k))
        paragraph = "".join(p if p.endswith("\n") else p + " " for p in pieces).rstrip() + "\n"
        written += len(paragraph.encode("utf-8"))
        yield paragraph


def generate_corpus(seed: int = DEFAULT_SEED, target_bytes: int = DEFAULT_TARGET_BYTES) -> list[str]:
    return list(iter_corpus(seed, target_bytes))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="build/tokenizer_corpus.txt")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--bytes", type=int, default=DEFAULT_TARGET_BYTES, help="minimum corpus size")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(iter_corpus(args.seed, args.bytes))
    out.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.encode('utf-8')):,} bytes to {out}")


if __name__ == "__main__":
    main()
