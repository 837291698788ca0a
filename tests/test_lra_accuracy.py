"""LRA accuracy on one- and two-document inputs (Retrieval passes a tuple of two tensors)."""
import contextlib

import torch

from tasks.lra.base import accuracy


class _PairModel(torch.nn.Module):
    """Predicts class 1 when the two documents' first tokens are equal."""

    def forward(self, a, b):
        same = (a[:, 0] == b[:, 0]).long()
        return torch.nn.functional.one_hot(same, 2).float()


class _FirstToken(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0] % 2, 2).float()


def test_two_document_inputs_are_sliced_per_batch():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 3, (10, 4), generator=g)
    b = torch.randint(0, 3, (10, 4), generator=g)
    y = (a[:, 0] == b[:, 0]).long()
    y[:3] = 1 - y[:3]  # three wrong labels: 7 of 10 right
    model = _PairModel().train()
    acc = accuracy(model, ((a, b), y), batch_size=4, device="cpu", amp=contextlib.nullcontext())
    assert acc == 0.7
    assert model.training  # the mode it came in with


def test_one_document_inputs_and_max_batches():
    x = torch.tensor([[0], [1], [2], [3], [4]])
    y = torch.tensor([0, 1, 1, 1, 1])  # predictions 0 1 0 1 0: right, right, wrong, right, wrong
    model = _FirstToken().eval()
    amp = contextlib.nullcontext()
    assert accuracy(model, (x, y), batch_size=2, device="cpu", amp=amp) == 3 / 5
    assert accuracy(model, (x, y), batch_size=2, device="cpu", amp=amp, max_batches=1) == 1.0
    assert not model.training
