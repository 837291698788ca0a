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

import torch
from tqdm.auto import tqdm

from tasks.base import Task
from tasks.text import ByteTokenizer, filler

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


class Needle(Task):
    """The needle grid (conf/task/needle.yaml) for the evaluation runner: every (length, depth)
    cell, ``samples`` prompts each, filler from the ``corpus``' test documents."""

    runs_on_press = True  # on a pretrained model it generates through a KV-cache press's session

    def evaluate(self, model, device, amp, max_new_tokens: int, seed: int) -> dict:
        t, tok = self.cfg, ByteTokenizer()
        hay = filler(t.corpus)
        cells, examples = [], []
        grid = [(int(L), float(d)) for L in t.lengths for d in t.depths]
        for i, (L, d) in enumerate(tqdm(grid, desc="needle", unit="cell")):
            hits = []
            for s in range(int(t.samples)):
                p = make_prompt(tok, hay, L, d, seed=seed * 1_000_003 + i * 1000 + s,
                                window=model.max_len - max_new_tokens)
                with amp:
                    out = model.generate(torch.tensor([p.ids], device=device), max_new_tokens)
                hits.append(score(tok, out[0].tolist(), p.answer))
                if s == 0:  # what the model answered, for reading the record
                    examples.append({"length": L, "depth": d, "answer": p.answer,
                                     "generated": tok.decode(out[0].tolist())})
            cells.append({"length": L, "depth": d, "score": sum(hits) / len(hits)})
        return {"cells": cells, "accuracy": sum(c["score"] for c in cells) / len(cells),
                "examples": examples}

    def evaluate_pretrained(self, model, seed: int) -> dict:
        """The needle grid on a pretrained model (runner=pretrained): Paul Graham's essays as
        haystack, ``trials`` prompts per (length, depth) cell, lengths in the model's tokens,
        ``batch_size`` prompts of one length per forward pass."""
        from tasks import real_text

        t = self.cfg
        return real_text.needle(model, [int(n) for n in t.token_lengths], [float(d) for d in t.depths],
                                int(t.trials), seed, int(t.get("batch_size") or 1),
                                str(t.get("setting") or "query_aware"))
