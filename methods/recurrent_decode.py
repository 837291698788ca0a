"""Decode paths of the linear-attention family as recurrent state updates (issue 24): the cache
holds the method's state, not the keys and values.

A linear method's causal output at position t depends on the keys and values before it only
through a fixed-size state (Katharopoulos et al. 2020, Sec. 3.4, "transformers are RNNs"):

    S_t = lambda_t S_{t-1} + phi(k_t) v_t^T   (and a normaliser z_t = z_{t-1} + phi(k_t) where
    o_t = read(q_t, S_t)                        the method divides by one)

so a decode step reads and writes the state, whatever the context length. ``RecurrentDecode``
keeps that state in the cache's ``aux`` (``StateCache``: no K/V rows, so ``bytes_held`` is the
state's size in bytes; a method that also keeps recent keys, BASED's window, keeps them as rows
of a ring buffer). The prefill runs the method's own causal prefill and folds its L keys and
values into the state in one closed-form update (``absorb``: no loop over the tokens); each
decode step folds in one token (phase ``append``) and reads the state with the new query (phase
``attend``); there is no selection. A step reads the state (``index_bytes``) and the rows it
keeps (``kv_bytes``). Per method (each module defines its ``absorb`` and ``readout``):
Lightning (``methods.lightning``), Cottention, BASED, Performer.
"""
from __future__ import annotations

import torch

from methods.decode import KVCache, Selection, _Adapter


class StateCache(KVCache):
    """A ``KVCache`` that holds no K/V rows (capacity 0): a recurrent method's state lives in
    ``aux``; ``seen`` counts the tokens folded into it."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, dtype=torch.float32, device="cpu"):
        super().__init__(batch, num_kv_heads, head_dim, 1, dtype, device)
        self.k, self.v, self.pos = self.k[:, :, :0].clone(), self.v[:, :, :0].clone(), self.pos[:0].clone()


def grouped(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, F] @ state [B, Hs, F, E] where Hs is H (a state per query head) or Hkv (one
    per KV head, shared by the query heads of its group): [B, H, n, E]."""
    B, H, n, F = x.shape
    Hs = state.shape[1]
    if Hs == H:
        return x @ state
    return (x.reshape(B, Hs, (H // Hs) * n, F) @ state).view(B, H, n, state.shape[-1])


class RecurrentDecode(_Adapter):
    """The decode path of a linear method: ``absorb(cache, k, v)`` folds tokens [B, Hkv, n, D]
    (at positions cache.seen ...) into the state in ``cache.aux``; ``readout(q_t, cache)`` is the
    output of the query over it. Subclasses that keep K/V rows override ``cache_capacity`` and
    ``keep``."""

    def state_dtype(self, cache: KVCache) -> torch.dtype:
        return torch.float64 if cache.dtype == torch.float64 else torch.float32

    def cache_capacity(self, tokens: int) -> int:
        return 0  # no K/V rows

    def new_cache(self, batch: int, tokens: int, dtype=torch.float32, device="cpu") -> KVCache:
        cap = self.cache_capacity(int(tokens))
        if cap == 0:
            return StateCache(batch, self.num_kv_heads, self.head_dim, dtype, device)
        return KVCache(batch, self.num_kv_heads, self.head_dim, cap, dtype, device)

    def store(self, cache: KVCache, k, v) -> None:
        self.absorb(cache, k, v)  # before ``keep``: absorb reads the first new position from cache.seen
        self.keep(cache, k, v)

    def keep(self, cache: KVCache, k, v) -> None:
        """The K/V rows kept (default: none; the tokens are counted)."""
        cache.seen += k.shape[2]

    def state_bytes(self, cache: KVCache) -> float:
        return float(sum(t.numel() * t.element_size() for t in cache.aux.values()))

    def select(self, q_t, cache: KVCache) -> Selection:
        self._check_q(q_t, cache)
        return Selection(index_bytes=self.state_bytes(cache))  # the state is read; every kept row too

    def attend_selected(self, q_t, cache: KVCache, sel: Selection) -> torch.Tensor:
        return self.readout(q_t, cache).to(q_t.dtype)

    def absorb(self, cache: KVCache, k, v) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def readout(self, q_t, cache: KVCache) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


__all__ = ["StateCache", "RecurrentDecode", "grouped"]
