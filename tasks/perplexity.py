"""Perplexity: a corpus (tasks/text.py's documents), byte-level tokens, strided evaluation.

Strided evaluation (as Hugging Face documents it): windows of ``context`` tokens moved by
``stride``; each token after the first is scored exactly once, with at least
``context - stride`` tokens before it (the first window's tokens with fewer).
Perplexity = exp(mean NLL per token); bits per byte = total NLL / (bytes * ln 2), which for
byte-level tokens is the NLL per token in bits.
"""
from __future__ import annotations

import math
import random
import re

import torch
from tqdm.auto import tqdm

from tasks.base import Task
from tasks.cache import cached
from tasks.text import byte_stream, documents


def load(cfg) -> dict:
    """For the training runner: train windows [N, max_len + 1]; val/test byte streams."""
    key = {"task": "perplexity", "source": cfg.source, "subset": cfg.get("subset"),
           "files": list(cfg.get("data_files") or []), "max_len": int(cfg.max_len)}

    episodes = int(cfg.get("needle_episodes") or 0)
    needles = int(cfg.get("needles_per_episode") or 1)
    min_len = cfg.get("episode_min_len")
    if episodes:
        key.update(needle_episodes=episodes, needles_per_episode=needles, episode_format=2,
                   **({"episode_min_len": int(min_len)} if min_len else {}))

    def build():
        docs = documents(cfg)
        d = {s: byte_stream(v) for s, v in docs.items()}
        n = int(cfg.max_len) + 1
        tr = d["train"][: (len(d["train"]) // n) * n].view(-1, n)
        if episodes:
            tr = torch.cat([tr, needle_episodes("\n\n".join(docs["train"]), episodes, n, int(cfg.get("seed", 0)),
                                                 needles, int(min_len) if min_len else None)])
        return {"train": tr, "val": d["val"], "test": d["test"]}

    data = cached("perplexity", key, build)
    n_tr = len(data["train"])
    out = {"kind": "lm", "train": (data["train"], torch.zeros(n_tr, dtype=torch.long)),
           "val": data["val"], "test": data["test"], "vocab_size": 256, "num_classes": 256,
           "pad_id": None, "cls_id": None}
    weight = float(cfg.get("answer_weight") or 1.0)
    if episodes and weight != 1.0:  # per-token loss weights: the answers count `weight` times
        out["loss_weight"] = 1.0 + (weight - 1.0) * answer_mask(data["train"]).to(torch.float16)
    return out


def answer_mask(windows: torch.Tensor) -> torch.Tensor:
    """[N, n] bool: the bytes of the answers to needle questions (what the episodes teach)."""
    from tasks.needle import QUESTION

    # the question's text with any key, then " <digits>."
    answer = re.compile("[a-z]+".join(map(re.escape, QUESTION.split("{key}"))).encode() + rb" (\d+)\.")
    mask = torch.zeros(windows.shape, dtype=torch.bool)
    for i, row in enumerate(windows):
        for m in answer.finditer(row.numpy().tobytes()):
            mask[i, m.start(1):m.end(1)] = True
    return mask


def needle_episodes(text: str, count: int, n: int, seed: int = 0, needles: int = 1,
                    min_len: int | None = None) -> torch.Tensor:
    """[count, n] byte windows of retrieval practice, mixed into language modelling so that the
    needle and RULER evaluations of the trained LM measure the attention method, not an LM that
    never learned to look back. An episode is training text with key-value needle sentences at
    uniform random depths, then, for each needle in shuffled order, the needle task's question
    followed by its answer (with one needle: exactly a needle prompt and its answer). More
    needles give more retrieval events per token and distractor keys that force the key to be
    matched. With ``min_len``, each window packs episodes of log-uniform lengths between
    min_len and n (``needles`` scaled to each one's length): short look-backs, learnt first,
    beside long ones, a curriculum inside every batch. The evaluation prompts use other keys
    and values, and the test documents as filler."""
    if needles < 1:
        raise ValueError(f"needles per episode must be >= 1, got {needles}")
    rng = random.Random(seed + 7_777)
    out = torch.empty(count, n, dtype=torch.uint8)
    for i in tqdm(range(count), desc="needle episodes", unit="ep", leave=False):
        lens = [n]
        if min_len:
            lens, left = [], n
            while left:
                L = min(left, round(math.exp(rng.uniform(math.log(min_len), math.log(n)))))
                L = left if left - L < min_len else L
                lens.append(L)
                left -= L
        ids = b"".join(_episode(rng, text, L, max(1, round(needles * L / n))) for L in lens)
        assert len(ids) == n
        out[i] = torch.tensor(list(ids), dtype=torch.uint8)
    return out


def _episode(rng: random.Random, text: str, n: int, needles: int) -> bytes:
    from tasks.needle import NEEDLE, QUESTION, random_key, random_value

    keys: list[str] = []
    while len(keys) < needles:
        k = random_key(rng)
        keys += [k] if k not in keys else []
    vals = [random_value(rng) for _ in keys]
    sent = [(" " + NEEDLE.format(key=k, value=v) + " ").encode() for k, v in zip(keys, vals)]
    order = rng.sample(range(needles), needles)
    qa = b"".join((QUESTION.format(key=keys[j]) + f" {vals[j]}.").encode() for j in order)
    n_hay = n - sum(map(len, sent)) - len(qa)
    if n_hay < 0:
        raise ValueError(f"{needles} needles with their questions take {n - n_hay} bytes, more than the "
                         f"{n}-byte episode: use fewer needles per episode or a longer window")
    a = rng.randrange(0, max(1, len(text) - 2 * n))
    hay = text[a: a + 2 * n].encode()[:n_hay]
    if len(hay) < n_hay:
        raise ValueError(f"the training text is too short for {n}-byte needle episodes")
    cuts = sorted(rng.randint(0, n_hay) for _ in range(needles))
    parts, prev = [], 0
    for c, ss in zip(cuts, sent):
        parts += [hay[prev:c], ss]
        prev = c
    return b"".join(parts) + hay[prev:] + qa


@torch.no_grad()
def evaluate(logits_fn, tokens: torch.Tensor, context: int, stride: int, device,
             max_tokens: int | None = None, n_bytes: int | None = None) -> dict:
    """Strided perplexity of a 1-D token stream; ``logits_fn([1, T]) -> [1, T, V]``."""
    if stride < 1 or stride > context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    tokens = tokens[: max_tokens] if max_tokens else tokens
    n = len(tokens)
    nll, scored, nxt = 0.0, 0, 1  # nxt: the next target position to score
    while nxt < n:
        end = min(context if nxt == 1 else nxt + stride, n)  # first window: a full context
        start = max(0, end - context)
        x = tokens[start:end].long().to(device)
        logits = logits_fn(x[None, :-1]).float()[0]  # predicts x[1:], positions start+1 .. end-1
        lp = torch.log_softmax(logits, -1).gather(-1, x[1:, None])[:, 0]
        keep = end - nxt  # targets nxt .. end-1, each scored once
        nll -= float(lp[-keep:].sum())
        scored += keep
        nxt = end
    n_bytes = n_bytes if n_bytes is not None else scored
    return {"ppl": math.exp(nll / scored), "nll": nll / scored, "bpb": nll / (n_bytes * math.log(2)),
            "tokens": scored}


class Perplexity(Task):
    """Language modelling (conf/task/perplexity.yaml) for the training runner: windows to train
    on; validation and test scored by strided perplexity over ``max_len``-token contexts."""

    def load(self) -> dict:
        return load(self.cfg)

    def _perplexity(self, model, stream, device, amp) -> dict:
        model.eval()
        with amp:
            out = evaluate(model, stream, int(self.cfg.max_len), int(self.cfg.stride), device,
                           self.cfg.get("eval_tokens"))
        model.train()
        return out

    def validate(self, model, split, device, amp, batch_size, max_batches=None) -> float:
        """The validation score, higher is better: minus the perplexity."""
        return -self._perplexity(model, split, device, amp)["ppl"]

    def test(self, model, split, device, amp, batch_size, best_val: float) -> dict:
        out = self._perplexity(model, split, device, amp)
        return {"val_ppl": -best_val, "test_ppl": out["ppl"], "test_bpb": out["bpb"],
                "test_tokens": out["tokens"]}

    def evaluate_pretrained(self, model, seed: int) -> dict:
        """Perplexity of a pretrained model (runner=pretrained) on held-out prose:
        ``prose`` text, windows of ``seq_len`` tokens moved by ``prose_stride``."""
        from tasks import real_text

        t = self.cfg
        return real_text.perplexity(model, t.prose, int(t.seq_len), int(t.prose_stride),
                                    t.prose_windows and int(t.prose_windows))
