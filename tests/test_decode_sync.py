"""No host synchronisation in a decode step's ``select`` + ``attend_selected`` (issue 24:
``runner=decode`` replays those two phases from a CUDA graph, and a phase that reads a device
tensor back to the host cannot be captured: on the H200 NSA's and SparseK's decode paths were
"not captured: called a synchronizing CUDA operation").

On the CPU a read-back is invisible, so the test spies on what would synchronise on a GPU:
``item``, ``tolist``, ``__bool__`` / ``__int__`` / ``__float__`` / ``__index__`` (``if t``,
``int(t)``, a tensor as a Python index), ``nonzero`` / ``torch.nonzero`` / ``argwhere`` /
``torch.unique`` / ``masked_select`` (sizes from data), boolean-mask indexing (``x[mask]``),
``cpu`` / ``numpy``, ``repeat_interleave`` with tensor repeats, and ``torch.tensor`` /
``as_tensor`` (a tensor built from host data: a host-to-device copy on a GPU). The spied
phases must give the same output as unspied ones (the spy changes nothing it lets through)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from methods.decode import decode_path
from tests.decode_helpers import HKV, B, D, load, qkv

T, L = 40, 33

NSA_KW = dict(block_size=8, num_selected=3, window=8, compress_block=8, compress_stride=4, impl="reference")
CASES = [
    ("nsa", NSA_KW),
    ("nsa", {**NSA_KW, "compress_stride": 8, "num_selected": 2, "window": 5}),
    ("sparsek", dict(k=4, window=4, impl="gather")),
    ("sparsek", dict(k=3, window=6, impl="reference", position_slope=0.3)),
    ("sparq", dict(r=4, k=8)),
    ("quest", dict(page_size=4, token_budget=8)),
    ("loki", dict()),
    ("double_sparsity", dict()),
    ("tidal_decode", dict(token_budget=8)),
    ("twilight", dict()),
    ("retrieval_attention", dict()),
    ("squeezed_attention", dict(percent_clusters=10.0, observation_window=4)),
    ("squeezed_attention", dict(percent_clusters=10.0, observation_window=4, selection="fraction")),
    ("squeezed_attention", dict(percent_clusters=25.0, observation_window=4, hierarchical=True)),
]


class SyncError(AssertionError):
    pass


def _refuse(what):
    def f(*a, **kw):
        raise SyncError(f"a decode step's select/attend called {what}: a host synchronisation on a GPU")
    return f


@contextlib.contextmanager
def no_host_sync(mp):
    """Inside: every read-back listed in the module docstring raises ``SyncError``."""
    for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
                 "cpu", "numpy", "masked_select", "unique", "unique_consecutive"):
        mp.setattr(torch.Tensor, attr, _refuse(f"Tensor.{attr}"))
    for name in ("nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "tensor", "as_tensor"):
        mp.setattr(torch, name, _refuse(f"torch.{name}"))
    getitem, rep_t, rep_f = torch.Tensor.__getitem__, torch.Tensor.repeat_interleave, torch.repeat_interleave

    def _bool_index(idx):
        items = idx if isinstance(idx, tuple) else (idx,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    def spy_getitem(self, idx):
        if _bool_index(idx):
            raise SyncError("a decode step's select/attend indexed with a boolean mask (x[mask]): data-dependent size")
        return getitem(self, idx)

    def spy_rep(fn):
        def f(x, repeats=None, *a, **kw):
            if isinstance(repeats, torch.Tensor) or (repeats is None and isinstance(x, torch.Tensor) and fn is rep_f):
                raise SyncError("a decode step's select/attend called repeat_interleave with tensor repeats")
            return fn(x, repeats, *a, **kw)
        return f

    mp.setattr(torch.Tensor, "__getitem__", spy_getitem)
    mp.setattr(torch.Tensor, "repeat_interleave", spy_rep(rep_t))
    mp.setattr(torch, "repeat_interleave", spy_rep(rep_f))
    yield


def _path(name, kw):
    m = load(name, **kw)
    if name in ("nsa", "sparsek"):  # trained-looking weights (as tests/test_decode_paths.py sets them)
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            if name == "nsa":
                m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=g))
                m.gate.bias.copy_(torch.randn(3, generator=g))
            else:
                m.score.weight.copy_(torch.randn(m.score.weight.shape, generator=g))
    path = decode_path(m)
    if path.needs_calibration:
        cq, ck, _ = qkv(48, seed=7, dtype=torch.float32, anisotropic=True)
        path.calibrate([(cq, ck)])
    return path


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_select_and_attend_read_nothing_back_to_the_host(name, kw, monkeypatch):
    path = _path(name, kw)
    q, k, v = qkv(T, dtype=torch.float32, seed=5)
    cache = path.new_cache(B, T, q.dtype)
    with torch.no_grad():
        path.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
        for i in range(L, T):  # several steps: NSA completes a compression block on some of them
            q_t, k_t, v_t = (x[:, :, i:i + 1] for x in (q, k, v))
            path.append(cache, k_t, v_t)
            want = path.attend_selected(q_t, cache, path.select(q_t, cache))
            with monkeypatch.context() as mp, no_host_sync(mp):
                out = path.attend_selected(q_t, cache, path.select(q_t, cache))
            torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert out.shape == (B, path.num_heads, 1, D) and cache.num_kv_heads == HKV


def test_the_spy_catches_each_kind_of_read_back(monkeypatch):
    """The spy is not vacuous: each read-back it names raises inside it, and plain device work
    (arithmetic, topk, gather, torch.where, int-tensor indexing) passes."""
    x, reps = torch.arange(6.0), torch.ones(6, dtype=torch.long)
    reads = [lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0] > 1), lambda: int(x[0]),
             lambda: x.nonzero(), lambda: torch.nonzero(x), lambda: x[x > 2], lambda: torch.unique(x),
             lambda: x.cpu(), lambda: torch.tensor([1]), lambda: x.repeat_interleave(reps),
             lambda: [0, 1][x.long()[1]]]
    with monkeypatch.context() as mp, no_host_sync(mp):
        for r in reads:
            with pytest.raises(SyncError):
                r()
        y = torch.where(x > 2, x, 0).topk(2).indices
        z = x.gather(0, y) + x[y] + x[:, None][1:3, 0].sum() + x.repeat_interleave(2)[:2].sum()
    assert z.shape == (2,)
