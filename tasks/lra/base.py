"""What the LRA tasks share for the training runner: classification, scored by accuracy."""
from __future__ import annotations

import torch

from tasks.base import Task, to_device


class DataAbsent(FileNotFoundError):
    """A task's real data is not on this machine (a file, a fetched asset, an unreachable hub):
    the run records "not run: data absent" (status skipped) with this reason, not a failure of
    the method."""

    not_run = "data absent"


@torch.no_grad()
def accuracy(model, split, batch_size: int, device, amp, max_batches: int | None = None) -> float:
    """The fraction of ``split``'s (inputs, labels) that ``model`` classifies right, in batches
    of ``batch_size`` (the first ``max_batches`` of them when set). Inputs are one tensor or,
    for two-document tasks (Retrieval), a tuple of tensors sliced alike; the model's training
    mode is restored after."""
    was_training = model.training
    model.eval()
    x, y = split[0], split[1]
    correct = total = 0
    for b, a in enumerate(range(0, len(y), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        rows = slice(a, a + batch_size)
        xb = to_device(tuple(t[rows] for t in x) if isinstance(x, tuple) else x[rows], device)
        with amp:
            logits = model(*xb) if isinstance(xb, tuple) else model(xb)
        correct += int((logits.argmax(-1).cpu() == y[a:a + batch_size]).sum())
        total += len(y[a:a + batch_size])
    model.train(was_training)
    return correct / max(1, total)


class LRATask(Task):
    """An LRA task: ``load()`` gives the splits, which are scored by accuracy."""

    def load(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, model, split, device, amp, batch_size, max_batches=None) -> float:
        """The validation score, higher is better: the accuracy."""
        return accuracy(model, split, batch_size, device, amp, max_batches)

    def test(self, model, split, device, amp, batch_size, best_val: float) -> dict:
        return {"val_acc": best_val, "test_acc": accuracy(model, split, batch_size, device, amp)}
