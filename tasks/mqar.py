"""MQAR: multi-query associative recall, as Zoology generates it (Arora et al., "Zoology:
Measuring and Improving Recall in Efficient Language Models", ICLR 2024, Sec. 3.1;
HazyResearch/zoology, ``zoology/data/associative_recall.py``, ``multiquery_ar``).

A sequence of ``max_len + 1`` tokens over a vocabulary of ``vocab_size``:

    k_1 v_1 k_2 v_2 ... k_D v_D | ... k_a v_a ... k_b v_b ...        (D = num_kv_pairs)

keys drawn without replacement from [1, V/2), values from [V/2, V); then every key is queried
once, in random order, at even offsets 2g of the query section, the gaps g drawn without
replacement from a power law p(g) ~ g^(a - 1) (a = ``power_a``, 0.01: queries cluster near the
context, as in Zoology); the answer is the token after the query key. The other positions of
the query section are uniform random tokens (Zoology's ``random_non_queries``). The model is a
causal LM trained on next-token prediction with the loss on the answers only (loss weight 1
there, 0 elsewhere; runner=train's ``loss_weight``). One difference from Zoology, which keeps
labels apart from inputs: here the answer also stands in the input after its query key (the
runner trains on windows of tokens), so a later query sees the earlier answers, which carry
no information about its own answer (values are distinct).

Scores: the accuracy of the argmax prediction on the answers (val_acc, test_acc). The record
also carries the attention's decode state: ``state_bytes`` (bytes of state per sequence, all
layers, bf16, at this length: the method's ``cost(...).kv_bytes``) and ``state_constant``
(whether that state stays the same at twice the length: a recurrent state, not a cache).
"""
from __future__ import annotations

import numpy as np
import torch

from tasks.base import Task
from tasks.cache import cached

PAD = 0


def check(num_kv_pairs: int, max_len: int, vocab_size: int, power_a: float = 0.01) -> None:
    """Raise ValueError naming the parameter when the sequences cannot be built."""
    if num_kv_pairs < 1:
        raise ValueError(f"MQAR: num_kv_pairs must be >= 1, got {num_kv_pairs}")
    if vocab_size // 2 - 1 < num_kv_pairs or vocab_size - vocab_size // 2 < num_kv_pairs:
        raise ValueError(f"MQAR: vocab_size={vocab_size} holds fewer than num_kv_pairs={num_kv_pairs} "
                         f"distinct keys (1 .. V/2 - 1) or values (V/2 .. V - 1)")
    space = (max_len + 1 - 2 * num_kv_pairs) // 2
    if space < num_kv_pairs:
        raise ValueError(f"MQAR: max_len={max_len} is too short for num_kv_pairs={num_kv_pairs}: "
                         f"needs max_len >= {4 * num_kv_pairs - 1} (the pairs, then a query and its answer each)")
    if not power_a > 0:
        raise ValueError(f"MQAR: power_a must be > 0, got {power_a}")


def generate(n: int, num_kv_pairs: int, max_len: int, vocab_size: int, seed: int, power_a: float = 0.01,
             random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, max_len + 1] int64, answer [n, max_len + 1] bool: the positions holding an
    answer, i.e. the token after a query key), deterministic for a seed."""
    check(num_kv_pairs, max_len, vocab_size, power_a)
    rng = np.random.default_rng(seed)
    D, L = num_kv_pairs, max_len + 1
    half = vocab_size // 2
    ctx = 2 * D
    space = (L - ctx) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    x = np.full((n, L), PAD, dtype=np.int64)
    ans = np.zeros((n, L), dtype=bool)
    if random_non_queries:
        x[:, ctx:] = rng.integers(0, vocab_size, size=(n, L - ctx))
    for i in range(n):
        keys = rng.choice(np.arange(1, half), size=D, replace=False)
        vals = rng.choice(np.arange(half, vocab_size), size=D, replace=False)
        x[i, 0:ctx:2], x[i, 1:ctx:2] = keys, vals
        gaps = rng.choice(space, size=D, replace=False, p=p)
        pos = ctx + 2 * gaps
        x[i, pos], x[i, pos + 1] = keys, vals
        ans[i, pos + 1] = True
    return torch.from_numpy(x), torch.from_numpy(ans)


def state_bytes(model, seq_len: int) -> dict:
    """The attention's decode state of ``model`` (a decoder whose blocks hold ``method``)."""
    blocks = getattr(model, "blocks", None) or [model]
    total = sum(b.method.cost(1, seq_len, True).kv_bytes for b in blocks)
    doubled = sum(b.method.cost(1, 2 * seq_len, True).kv_bytes for b in blocks)
    return {"state_bytes": total, "state_constant": bool(doubled == total)}


@torch.no_grad()
def answer_accuracy(model, split, device, amp, batch_size: int, max_batches: int | None = None) -> float:
    """The fraction of answers the model's argmax predicts (from the tokens before each)."""
    x, ans = split
    was_training = model.training
    model.eval()
    correct = total = 0
    for b, a in enumerate(range(0, len(x), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        xb, mb = x[a:a + batch_size].to(device), ans[a:a + batch_size, 1:].to(device)
        with amp:  # the logits at the answers only
            pred = model(xb[:, :-1], select=mb).argmax(-1)
        correct += (pred == xb[:, 1:][mb]).sum()
        total += int(mb.sum())
    model.train(was_training)
    return int(correct) / max(1, total)


class MQAR(Task):
    """MQAR (conf/task/mqar.yaml) for runner=train with a causal model (model=lm)."""

    def load(self) -> dict:
        c = self.cfg
        check(int(c.num_kv_pairs), int(c.max_len), int(c.vocab_size), float(c.power_a))
        key = {k: c[k] for k in ("num_kv_pairs", "max_len", "vocab_size", "power_a", "random_non_queries",
                                 "num_train", "num_val", "num_test", "seed")}

        def build():
            out = {}
            for i, split in enumerate(("train", "val", "test")):
                out[split] = generate(int(c[f"num_{split}"]), int(c.num_kv_pairs), int(c.max_len),
                                      int(c.vocab_size), int(c.seed) * 1000 + i, float(c.power_a),
                                      bool(c.random_non_queries))
            return out

        data = cached("mqar", {"task": "mqar", **key}, build)
        x, ans = data["train"]
        return {"kind": "lm", "train": (x, torch.zeros(len(x), dtype=torch.long)), "loss_weight": ans.float(),
                "val": data["val"], "test": data["test"], "vocab_size": int(c.vocab_size),
                "num_classes": int(c.vocab_size), "pad_id": None, "cls_id": None}

    def validate(self, model, split, device, amp, batch_size, max_batches=None) -> float:
        """The validation score, higher is better: the answers' accuracy."""
        return answer_accuracy(model, split, device, amp, batch_size, max_batches)

    def test(self, model, split, device, amp, batch_size, best_val: float) -> dict:
        return {"val_acc": best_val, "test_acc": answer_accuracy(model, split, device, amp, batch_size),
                **state_bytes(model, int(self.cfg.max_len))}
