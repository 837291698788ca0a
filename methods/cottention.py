"""Cottention: cosine-similarity attention, linear in the sequence length, with its RNN form.

Mongaras, Dohm and Larson, "Cottention: Linear Transformers With Cosine Attention" (2024,
arXiv 2409.18747), Sec. 3:

    q^_i = q_i / |q_i|,  k^_j = k_j / |k_j|          (L2 norms: scores in [-1, 1], no softmax)
    non-causal:  O = (Q^ K^^T) V = Q^ (K^^T V)
    causal:      o_i = sum_{j <= i} (q^_i . k^_j) v_j
    recurrent:   S_t = S_{t-1} + k^_t v_t^T,   o_t = q^_t S_t       (state d x d per head)

Without a softmax the output grows with the number of keys; the authors divide by the sequence
length raised to a learned power, sigma(m_h) with one m_h per head, initialised to 0.5. The
official causal code (GPTCosAttention) divides each *value* by the count of keys at and before
its position: v_j <- v_j / max(1, c_j^sigma(m_h)), which is the default here
(``length_scale=value``: the recurrent state takes the scaled values). ``length_scale=output``
divides each *output* by the count of keys its query sees, o_i / max(1, n_i^sigma(m_h)) (our
reading of the paper's "divide by the sequence length"); non-causally both are N^sigma(m_h),
N the number of real keys. ``length_scale=none`` is the official bidirectional (BERT) code, which
scales nothing. Counts skip padded keys (the official code's mask), and padded keys add nothing.

impl=reference  the explicit matrix (Q^ K^^T (.) M) V'
impl=chunked    non-causal Q^ (K^^T V'); causal in blocks of ``chunk_size`` (exact masked
                products inside a block, a running d x d state across blocks:
                ``methods.lightning.tiled_causal`` without decay), O(T) memory

The exponent is learned with the model and cosine scores are not softmax's: the method is
trained from scratch (``training_free = False``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import AttentionMethod, Cost, dense_flops, repeat_kv
from methods.lightning import run_steps, tiled_causal
from methods.recurrent_decode import RecurrentDecode, grouped

LENGTH_SCALES = ("value", "output", "none")


class Cottention(AttentionMethod):
    name = "cottention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Mongaras et al. 2024"
    kind = "linear (cosine similarity)"
    official_test = "tests/test_linear_family.py::test_cottention_matches_the_official_code"
    trainable = True  # the length-scale exponent per head
    training_free = False
    supports_decode = True  # models decode with the method itself (end-aligned causal)
    impls = ("reference", "chunked")

    def __init__(self, length_scale: str = "value", norm_const_init: float = 0.5, chunk_size: int = 64,
                 impl: str = "chunked", **structural):
        super().__init__(impl=impl, **structural)
        if length_scale not in LENGTH_SCALES:
            raise ValueError(f"Cottention: length_scale must be one of {LENGTH_SCALES}, got {length_scale!r}")
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"Cottention: chunk_size must be a positive integer, got {chunk_size!r}")
        self.length_scale, self.chunk_size = length_scale, int(chunk_size)
        self.norm_const = nn.Parameter(torch.full((self.num_heads,), float(norm_const_init)))

    @property
    def real_kernel(self) -> bool:
        return self.impl == "chunked"  # never forms the T x T matrix

    def _exponent(self, dt, device) -> torch.Tensor:
        return torch.sigmoid(self.norm_const.to(device=device, dtype=dt)).view(1, -1, 1, 1)  # [1, H, 1, 1]

    def _counts(self, B, tk, causal, key_padding_mask, device, dt) -> torch.Tensor:
        """Real keys at and before each key position (causal) or in all (non-causal): [B, 1, Tk, 1]."""
        real = (torch.ones(B, tk, device=device, dtype=dt) if key_padding_mask is None
                else key_padding_mask.to(dt))
        c = real.cumsum(-1) if causal else real.sum(-1, keepdim=True).expand(B, tk)
        return c[:, None, :, None]

    def attend(self, q, k, v, causal, key_padding_mask):
        B, H, tq, _ = q.shape
        tk = k.shape[2]
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        rep = H // k.shape[1]
        qn = F.normalize(q.to(dt), dim=-1)
        kn, vv = repeat_kv(F.normalize(k.to(dt), dim=-1), rep), repeat_kv(v.to(dt), rep)
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :, None].to(dt)
            kn, vv = kn * keep, vv * keep
        scale = None
        if self.length_scale != "none":
            scale = self._counts(B, tk, causal, key_padding_mask, q.device, dt) ** self._exponent(dt, q.device)
            scale = scale.clamp_min(1.0)  # [B, H, Tk, 1]
            if self.length_scale == "value":
                vv = vv / scale
        if not causal:
            o = qn @ (kn.transpose(-1, -2) @ vv) if self.impl == "chunked" else (qn @ kn.transpose(-1, -2)) @ vv
        elif self.impl == "reference":
            allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
            o = ((qn @ kn.transpose(-1, -2)) * allowed) @ vv
        else:
            o = tiled_causal(F.pad(qn, (0, 0, tk - tq, 0)), kn, vv, self.chunk_size)[:, :, tk - tq:]
        if self.length_scale == "output":
            o = o / scale[:, :, tk - tq:]  # the count of the query's own position
        return o.to(q.dtype)

    def decode(self, q, k, v) -> torch.Tensor:
        """A decode step over the whole cache (end-aligned, causal); ``step`` is the O(1) form."""
        return self.attend(q, k, v, True, None)

    def step(self, state, q_t, k_t, v_t):
        """One token of the recurrent form: q_t [B, H, D], k_t, v_t [B, Hkv, D] ->
        (o_t [B, H, D], state). state: (S [B, H, D, D], keys so far); None at the start."""
        dt = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        rep = q_t.shape[1] // k_t.shape[1]
        qn = F.normalize(q_t.to(dt), dim=-1)
        kn = repeat_kv(F.normalize(k_t.to(dt), dim=-1)[:, :, None], rep)[:, :, 0]
        vv = repeat_kv(v_t.to(dt)[:, :, None], rep)[:, :, 0]
        s, n = (0.0, 0) if state is None else state
        n += 1
        scale = (torch.tensor(float(n), dtype=dt, device=q_t.device) ** self._exponent(dt, q_t.device)[..., 0]
                 ).clamp_min(1.0)  # [1, H, 1]
        if self.length_scale == "value":
            vv = vv / scale
        s = s + kn[..., :, None] * vv[..., None, :]
        o = (qn[..., None, :] @ s)[..., 0, :]
        if self.length_scale == "output":
            o = o / scale
        return o.to(q_t.dtype), (s, n)

    def recurrent(self, q, k, v) -> torch.Tensor:
        """The causal output token by token through ``step``: [B, H, T, D]."""
        return run_steps(self.step, q, k, v)

    def decode_adapter(self) -> CottentionDecode:
        """The decode path over a KV cache (``methods.decode``): the recurrent state."""
        return CottentionDecode(self)

    def cost(self, tq, tk, causal) -> Cost:
        h, d = self.num_heads, self.head_dim
        dense = dense_flops(h, d, tq, tk, causal)
        if self.impl == "reference":
            flops = dense
        else:
            flops = h * 2.0 * (tq + tk) * d * d  # K^T V and Q S (2 flops per multiply-add)
            if causal:
                flops += h * 4.0 * tq * self.chunk_size * d  # the blocks' own masked products
        flops += h * 3.0 * (tq + tk) * d  # the L2 norms
        return Cost(flops=flops, density=flops / dense, kv_bytes=2.0 * self.num_heads * d * d)


class CottentionDecode(RecurrentDecode):
    """Cottention's decode path: the state S [B, Hs, D, D] of its RNN form (module docstring),
    S <- S + sum_j k^_j v'_j^T over the new tokens, o_t = q^_t S_t (divided by the count of
    keys for ``length_scale=output``); one state per query head with ``length_scale=value``
    (each head scales the values by its own exponent), else one per KV head."""

    def absorb(self, cache, k, v) -> None:
        m, dt = self.method, self.state_dtype(cache)
        kn, vv = F.normalize(k.to(dt), dim=-1), v.to(dt)
        if m.length_scale == "value":  # v_j / max(1, c_j^sigma(m_h)), c_j = j + 1 keys at and before j
            rep = self.num_heads // self.num_kv_heads
            kn, vv = repeat_kv(kn, rep), repeat_kv(vv, rep)
            c = torch.arange(cache.seen + 1, cache.seen + k.shape[2] + 1, device=k.device, dtype=dt)
            vv = vv / (c.view(1, 1, -1, 1) ** m._exponent(dt, k.device)).clamp_min(1.0)
        add = kn.transpose(-1, -2) @ vv
        cache.aux["S"] = add if "S" not in cache.aux else cache.aux["S"] + add

    def readout(self, q_t, cache):
        m, dt = self.method, self.state_dtype(cache)
        o = grouped(F.normalize(q_t.to(dt), dim=-1), cache.aux["S"])
        if m.length_scale == "output":  # the count of keys the query sees (its own included)
            o = o / (torch.tensor(float(cache.seen), dtype=dt, device=o.device)
                     ** m._exponent(dt, o.device)).clamp_min(1.0)
        return o
