"""ListOps as Long Range Arena generates it (Tay et al. 2021; Nangia & Bowman 2018).

Trees of the operators MAX, MIN, MED (integer median) and SM (sum modulo 10) over the
digits 0-9, built recursively: below the maximum depth (10) a node is an operator with
2..max_args (10) arguments with probability VALUE_P = 0.25, else a digit; a tree is kept
when its length (digits + one token per operator + one closing bracket) lies strictly
between min_length and max_length (500 and 2000). The label is the tree's value (10
classes). Sequences are the tokens without LRA's printed parentheses, which repeat what
the brackets already say, so a sequence's token count is its length and fits the 2000-token
window whole. Splits 96k/2k/2k, each from its own seed, generated in parallel shards of
2000 (each seeded alone: the data does not depend on the worker count); cached on disk.
"""
from __future__ import annotations

import multiprocessing
import os
import random

import torch
from tqdm.auto import tqdm

from tasks.cache import cached
from tasks.lra.base import LRATask

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUE_P = 0.25
PAD, CLS = "<pad>", "<cls>"
VOCAB = (PAD, CLS, *OPERATORS, END, *map(str, range(10)))
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    """(tree, length): a tree is a digit or (operator, [subtrees])."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.randrange(10), 1
    n = rng.randint(2, max_args)
    args, length = [], 2
    for _ in range(n):
        t, ln = generate_tree(rng, depth + 1, max_depth, max_args)
        args.append(t)
        length += ln
    return (rng.choice(OPERATORS), args), length


def evaluate(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree
    vals = [evaluate(a) for a in args]
    if op == MIN:
        return min(vals)
    if op == MAX:
        return max(vals)
    if op == MED:
        s = sorted(vals)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2  # int(np.median)
    return sum(vals) % 10


def tokens(tree) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    op, args = tree
    return [op, *(t for a in args for t in tokens(a)), END]


SHARD = 2000  # sequences per generation shard: shards are seeded alone, so any worker count
#               gives the same data


def _shard(args):
    n, seed, min_length, max_length, max_depth, max_args = args
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if min_length < length < max_length:
            out.append((tokens(tree), evaluate(tree)))
    return out


def generate(n: int, seed: int, min_length=500, max_length=2000, max_depth=10, max_args=10,
             desc: str = "listops", workers: int | None = None):
    """n (token list, label) pairs, deterministic for a seed: shards of SHARD sequences, shard
    i seeded by (seed, i), generated in parallel over ``workers`` processes (default: CPUs)."""
    jobs = [(min(SHARD, n - a), seed * 100_003 + i, min_length, max_length, max_depth, max_args)
            for i, a in enumerate(range(0, n, SHARD))]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    out = []
    with tqdm(total=n, desc=desc, unit="seq", leave=False) as bar:
        if workers <= 1:
            results = map(_shard, jobs)
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            results = pool.imap(_shard, jobs)
        for part in results:
            out.extend(part)
            bar.update(len(part))
        if workers > 1:
            pool.close()
            pool.join()
    return out


def encode(seqs, max_len: int) -> torch.Tensor:
    x = torch.zeros(len(seqs), max_len, dtype=torch.int16)
    for i, s in enumerate(seqs):
        if len(s) > max_len:
            raise ValueError(f"a ListOps sequence of {len(s)} tokens exceeds max_len={max_len}")
        x[i, : len(s)] = torch.tensor([TOKEN_ID[t] for t in s], dtype=torch.int16)
    return x


def load(cfg) -> dict:
    """{'train'|'val'|'test': (inputs [N, max_len] int, labels [N]), 'vocab_size', 'num_classes', ...}"""
    key = {k: cfg[k] for k in ("num_train", "num_val", "num_test", "min_length", "max_length",
                               "max_depth", "max_args", "max_len", "seed")}

    def build():
        out = {}
        for i, split in enumerate(("train", "val", "test")):
            pairs = generate(int(cfg[f"num_{split}"]), int(cfg.seed) * 1000 + i, cfg.min_length,
                             cfg.max_length, cfg.max_depth, cfg.max_args, desc=f"listops {split}")
            out[split] = (encode([p[0] for p in pairs], int(cfg.max_len)),
                          torch.tensor([p[1] for p in pairs], dtype=torch.long))
        return out

    data = cached("lra_listops", {"task": "listops", **key}, build)
    return {**{s: data[s] for s in ("train", "val", "test")}, "vocab_size": len(VOCAB),
            "num_classes": 10, "pad_id": TOKEN_ID[PAD], "cls_id": TOKEN_ID[CLS]}


class ListOps(LRATask):
    """ListOps (conf/task/lra/listops.yaml), generated as above."""

    def load(self) -> dict:
        return load(self.cfg)
