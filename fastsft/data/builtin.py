"""The built-in instruction dataset, generated in code: short tasks with exact answers.

It lets ``fastsft train`` run with nothing from outside and makes progress measurable: every
response has one right answer, so held-out exact-match accuracy is meaningful even for a tiny model.
Records are in prompt/completion form with terse prompts, because with a byte-level tokenizer every
prompt character is a token the model must read.
"""

from __future__ import annotations

import json
import random
import string

LETTERS = string.ascii_lowercase


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, lo: int = 3, hi: int = 5) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(lo, hi))]


def _add(rng):
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"{a}+{b}=", str(a + b)


def _reverse(rng):
    w = _word(rng)
    return f"reverse {w}:", w[::-1]


def _upper(rng):
    w = _word(rng)
    return f"upper {w}:", w.upper()


def _sort(rng):
    d = _digits(rng)
    return f"sort {' '.join(map(str, d))}:", " ".join(map(str, sorted(d)))


def _max(rng):
    d = _digits(rng)
    return f"max {' '.join(map(str, d))}:", str(max(d))


def _count(rng):
    w = _word(rng, 1, 9)
    return f"length {w}:", str(len(w))


def _to_json(rng):
    keys = rng.sample("abcdxyz", rng.randint(1, 2))
    pairs = {k: rng.randint(0, 9) for k in keys}
    text = ",".join(f"{k}={v}" for k, v in pairs.items())
    return f"json {text}:", json.dumps(pairs, separators=(",", ":"))


TASKS = {"add": _add, "reverse": _reverse, "upper": _upper, "sort": _sort, "max": _max,
         "length": _count, "json": _to_json}


def generate(n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/completion records, tasks drawn uniformly, reproducible from ``seed``."""
    rng = random.Random(seed)
    names = sorted(TASKS)
    records = []
    for _ in range(n):
        prompt, answer = TASKS[rng.choice(names)](rng)
        records.append({"prompt": prompt, "completion": answer})
    return records
