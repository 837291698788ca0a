"""Needle in a haystack: a key-value needle at a chosen depth of natural filler text.

For each (context length, depth) cell of the grid, a prompt of exactly ``length`` tokens of
the model's own tokenizer: filler text (from the corpus, at a seeded offset) with the
needle sentence inserted at ``depth`` (0 = start, 1 = end of the haystack), followed by the
question. Prompts are built in token space, so lengths are exact; a prompt longer than the
model's window is an error, never cut. Scoring is exact match: the generated continuation
starts with the needle's value.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


class ByteTokenizer:
    """UTF-8 bytes as tokens (the harness's own LMs)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


NEEDLE = "The special magic number for {key} is {value}."
VALUE_DIGITS = 7  # needle values: seven-digit numbers
QUESTION = " What is the special magic number for {key}? The special magic number for {key} is"


def random_key(rng: random.Random) -> str:
    """A needle key: eight lowercase letters."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))


def random_value(rng: random.Random) -> str:
    """A needle value: a VALUE_DIGITS-digit number."""
    return str(rng.randrange(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS))


@dataclass
class Prompt:
    ids: list[int]
    key: str
    answer: str
    needle_start: int  # token index where the needle begins
    length: int
    depth: float


def make_prompt(tokenizer, filler: str, length: int, depth: float, seed: int, window: int | None = None) -> Prompt:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if window is not None and length > window:
        raise ValueError(f"a {length}-token prompt does not fit the model's window of {window}")
    rng = random.Random(seed)
    key, value = random_key(rng), random_value(rng)
    needle = tokenizer.encode(" " + NEEDLE.format(key=key, value=value) + " ")
    question = tokenizer.encode(QUESTION.format(key=key))
    n_hay = length - len(needle) - len(question)
    if n_hay < 0:
        raise ValueError(f"length {length} is shorter than the needle and question ({len(needle) + len(question)} tokens)")
    stream = tokenizer.encode(filler)
    if len(stream) < n_hay:
        raise ValueError(f"the filler text has {len(stream)} tokens, {n_hay} are needed")
    off = rng.randrange(0, len(stream) - n_hay + 1)
    hay = stream[off: off + n_hay]
    at = round(depth * n_hay)
    ids = hay[:at] + needle + hay[at:] + question
    assert len(ids) == length
    return Prompt(ids=ids, key=key, answer=value, needle_start=at, length=length, depth=depth)


def score(tokenizer, generated_ids, answer: str) -> float:
    """RULER-style string match: 1.0 when the continuation starts with the answer."""
    return float(tokenizer.decode(generated_ids).strip().startswith(answer))


def grid(tokenizer, filler: str, lengths, depths, seed: int = 0, window: int | None = None):
    return [make_prompt(tokenizer, filler, L, d, seed * 1_000_003 + i, window)
            for i, (L, d) in enumerate((L, d) for L in lengths for d in depths)]
