"""BASED: linear attention with a second-order Taylor feature map, plus a small sliding window
of exact softmax attention.

Arora et al., "Simple linear attention language models balance the recall-throughput tradeoff"
(ICML 2024, arXiv 2402.18668), Sec. 4 and App. (the Taylor map of its official code,
HazyResearch/based ``TaylorExp``):

    phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]      1 + d + d^2 features
    phi(q) . phi(k) = 1 + s + s^2 / 2,   s = q . k / sqrt(d)         (exp(s) to second order; >= 1/2)
    linear:  y_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps),  eps = 1e-12
             (j <= i causal; every j non-causal)
    recurrent:  S_t = S_{t-1} + phi(k_t) v_t^T,  z_t = z_{t-1} + phi(k_t),
                y_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)
    window:  w_i = softmax over the keys with 0 <= i - j < window (causal; |i - j| < window
             non-causal) of q_i . k_j / sqrt(d), times v        (exact; a ring buffer when decoding)
    o_i = (y_i + w_i) / 2          (window = 0: o_i = y_i)

Readings chosen: BASED places its Taylor linear attention and its sliding-window attention in
different layers of a hybrid model (with gated convolutions); one attention operator here holds
both, each normalised on its own, and returns their mean. BASED projects q and k to a small
feature dimension (16) while v keeps the head dimension; here q, k and v share the head dimension
d, and the Taylor map acts on all d of it (a state of (1 + d + d^2) x d per head).

impl=reference  the explicit matrices: (1 + s + s^2/2) masked and row-normalised, and masked
                softmax for the window
impl=chunked    the features: non-causal phi(Q) (phi(K)^T V); causal in blocks of ``chunk_size``
                (``methods.lightning.tiled_causal``, the denominator as an extra value column);
                the window as masked softmax (a banded kernel is future work)

Padded keys add nothing to either part. The feature map approximates exp only near s = 0 and
the model learns to use it: the method is trained from scratch (``training_free = False``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods import masks
from methods.base import AttentionMethod, Cost, dense_flops, masked_attention, repeat_kv
from methods.decode import SinkWindowDecode, sdpa
from methods.lightning import run_steps, tiled_causal
from methods.recurrent_decode import RecurrentDecode, grouped

EPS = 1e-12


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]: [..., d] -> [..., 1 + d + d^2]."""
    d = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / (math.sqrt(2) * math.sqrt(d))
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], dim=-1)


class Based(AttentionMethod):
    name = "based"
    # what the README's method table says (python -m analysis.readme)
    paper = "Arora et al. 2024"
    kind = "linear (Taylor) + window"
    official_test = "tests/test_linear_family.py::test_based_matches_the_official_code"
    trainable = True  # the model learns q and k for the Taylor kernel (no weights here)
    training_free = False
    supports_decode = True  # models decode with the method itself (end-aligned causal)
    impls = ("reference", "chunked")

    def __init__(self, window: int = 64, chunk_size: int = 64, impl: str = "chunked", **structural):
        super().__init__(impl=impl, **structural)
        if int(window) != window or window < 0:
            raise ValueError(f"Based: window must be an integer >= 0 (0: linear attention alone), got {window!r}")
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"Based: chunk_size must be a positive integer, got {chunk_size!r}")
        self.window, self.chunk_size = int(window), int(chunk_size)

    @property
    def real_kernel(self) -> bool:
        return False  # the window part is masked dense attention in both paths

    # ---- the two parts -------------------------------------------------------------------
    def linear_part(self, q, k, v, causal, key_padding_mask):
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        rep = q.shape[1] // k.shape[1]
        tq, tk = q.shape[2], k.shape[2]
        qq, kk, vv = q.to(dt), repeat_kv(k.to(dt), rep), repeat_kv(v.to(dt), rep)
        keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None].to(dt)
        if self.impl == "reference":
            s = qq @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
            a = 1 + s + s * s / 2
            if causal:
                a = a * torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
            if keep is not None:
                a = a * keep.transpose(-1, -2)
            return (a @ vv) / (a.sum(-1, keepdim=True) + EPS)
        fq, fk = taylor_features(qq), taylor_features(kk)
        if keep is not None:
            fk = fk * keep
        if not causal:
            return (fq @ (fk.transpose(-1, -2) @ vv)) / (fq @ fk.sum(-2)[..., None] + EPS)
        ones = torch.ones_like(vv[..., :1]) if keep is None else keep.expand_as(vv[..., :1])
        nd = tiled_causal(F.pad(fq, (0, 0, tk - tq, 0)), fk, torch.cat([vv, ones], -1),
                          self.chunk_size)[:, :, tk - tq:]
        return nd[..., :-1] / (nd[..., -1:] + EPS)

    def window_part(self, q, k, v, causal, key_padding_mask):
        tq, tk = q.shape[2], k.shape[2]
        off, w = tk - tq, self.window
        mods = [masks.sliding_window(w, off)]
        if causal:
            mods.append(masks.causal(off))
        else:
            mods.append(lambda b, h, qi, ki: (ki - qi - off) < w)  # |i - j| < window
        if key_padding_mask is not None:
            mods.append(masks.key_padding(key_padding_mask))
        mask = masks.materialize(masks.and_masks(*mods), q.shape[0], 1, tq, tk, device=q.device)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        return masked_attention(q.to(dt), k.to(dt), v.to(dt), mask)

    def attend(self, q, k, v, causal, key_padding_mask):
        y = self.linear_part(q, k, v, causal, key_padding_mask)
        if self.window:
            y = (y + self.window_part(q, k, v, causal, key_padding_mask)) / 2
        return y.to(q.dtype)

    def decode(self, q, k, v) -> torch.Tensor:
        """A decode step over the whole cache (end-aligned, causal); ``step`` is the O(1) form."""
        return self.attend(q, k, v, True, None)

    # ---- the recurrent form ----------------------------------------------------------------
    def step(self, state, q_t, k_t, v_t):
        """One token: q_t [B, H, D], k_t, v_t [B, Hkv, D] -> (o_t [B, H, D], state).
        state: (S [B, H, F, D], z [B, H, F], the last ``window`` keys and values); None at first."""
        dt = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        rep = q_t.shape[1] // k_t.shape[1]
        qq = q_t.to(dt)
        kk = repeat_kv(k_t.to(dt)[:, :, None], rep)[:, :, 0]
        vv = repeat_kv(v_t.to(dt)[:, :, None], rep)[:, :, 0]
        fq, fk = taylor_features(qq), taylor_features(kk)
        if state is None:
            empty = kk[:, :, None][:, :, :0]  # [B, H, 0, D]
            state = (0.0, 0.0, empty, empty)
        s, z, ks, vs = state
        s = s + fk[..., :, None] * vv[..., None, :]
        z = z + fk
        y = (fq[..., None, :] @ s)[..., 0, :] / ((fq * z).sum(-1, keepdim=True) + EPS)
        keep = max(self.window, 1)  # the ring buffer: the last `window` keys and values
        ks = torch.cat([ks, kk[:, :, None]], 2)[:, :, -keep:]
        vs = torch.cat([vs, vv[:, :, None]], 2)[:, :, -keep:]
        if self.window:
            p = torch.softmax((ks @ qq[..., None])[..., 0] / math.sqrt(qq.shape[-1]), -1)  # [B, H, w]
            y = (y + (p[..., None, :] @ vs)[..., 0, :]) / 2
        return y.to(q_t.dtype), (s, z, ks, vs)

    def recurrent(self, q, k, v) -> torch.Tensor:
        """The causal output token by token through ``step``: [B, H, T, D]."""
        return run_steps(self.step, q, k, v)

    def decode_adapter(self) -> BasedDecode:
        """The decode path over a KV cache (``methods.decode``): the Taylor state and the window."""
        return BasedDecode(self)

    def cost(self, tq, tk, causal) -> Cost:
        h, d, w = self.num_heads, self.head_dim, self.window
        f = 1 + d + d * d
        dense = dense_flops(h, d, tq, tk, causal)
        if self.impl == "reference":
            flops = dense + h * 4.0 * (masks.causal_pairs(tq, tk) if causal else tq * tk)
        else:
            flops = h * (2.0 * (tq + tk) * d * d  # the features
                         + 2.0 * (tq + tk) * f * (d + 1))  # phi(K)^T [V 1] and phi(Q) S
            if causal:
                flops += h * 2.0 * tq * self.chunk_size * (f + d + 1)
        if w:  # the window: every pair of the band
            band = masks.window_pairs(tk - tq, tk, w) if causal else min(tq * tk, tq * (2 * w - 1))
            flops += 4.0 * h * band * d
        return Cost(flops=flops, density=flops / dense,
                    kv_bytes=2.0 * self.num_kv_heads * (f * d + f + 2 * w * d))


class BasedDecode(RecurrentDecode):
    """BASED's decode path: the Taylor state S [B, Hkv, F, D] and normaliser z [B, Hkv, F] (one
    per KV head, shared by its query heads), S <- S + phi(k)^T v, z <- z + phi(k), and the last
    ``window`` keys and values as rows of a ring buffer (``SinkWindowDecode`` without sinks);
    o_t = (phi(q_t) S / (phi(q_t) . z + eps) + softmax window attention) / 2."""

    decode_sinks = 0

    def __init__(self, method):
        super().__init__(method)
        self.decode_window = method.window

    def decode_params(self) -> dict:
        return {"window": self.decode_window}

    def cache_capacity(self, tokens: int) -> int:
        return min(tokens, self.decode_window)

    def keep(self, cache, k, v) -> None:
        SinkWindowDecode.store(self, cache, k, v)  # the ring of the last ``window`` tokens

    def absorb(self, cache, k, v) -> None:
        dt = self.state_dtype(cache)
        fk = taylor_features(k.to(dt))  # [B, Hkv, n, F]
        add_s, add_z = fk.transpose(-1, -2) @ v.to(dt), fk.sum(2)
        if "S" not in cache.aux:
            cache.aux["S"], cache.aux["z"] = add_s, add_z
        else:
            cache.aux["S"], cache.aux["z"] = cache.aux["S"] + add_s, cache.aux["z"] + add_z

    def readout(self, q_t, cache):
        dt = self.state_dtype(cache)
        qq = q_t.to(dt)
        fq = taylor_features(qq)
        y = grouped(fq, cache.aux["S"]) / (grouped(fq, cache.aux["z"][..., None]) + EPS)
        if self.decode_window:
            y = (y + sdpa(qq, cache.keys().to(dt), cache.values().to(dt))) / 2
        return y
