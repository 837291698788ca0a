"""Entmax attention: alpha-entmax in place of softmax, whose outputs have exact zeros.

Peters, Niculae and Martins, "Sparse Sequence-to-Sequence Models" (ACL 2019, arXiv 1905.05702),
Eqs. 9-10 and Alg. 2; used as the attention normaliser by Correia, Niculae and Martins,
"Adaptively Sparse Transformers" (EMNLP 2019, arXiv 1909.00015), Sec. 3:

    alpha-entmax(z) = argmax_{p in simplex} p . z + H^T_alpha(p)     (Tsallis alpha-entropy)
                    = [(alpha - 1) z - tau 1]_+ ^ (1 / (alpha - 1))  tau: the threshold with sum p = 1
    o_i = sum_j alpha-entmax(s_i)_j v_j,   s_ij = q_i . k_j / sqrt(d)

alpha -> 1 is softmax, alpha = 2 is sparsemax; alpha = 1.5 (the default, the papers' choice) has
the closed form of Alg. 2: with z sorted decreasingly and z' = z / 2, for each support size
rho, tau(rho) = mean_rho - sqrt(max(0, (1 - rho (meansq_rho - mean_rho^2)) / rho)) and the
support is the largest rho with tau(rho) <= z'_rho; p = [z' - tau]_+^2.

The ``entmax`` package (the papers' authors' code) computes it: ``entmax15`` (exact, sort
based) for alpha = 1.5, ``sparsemax`` for alpha = 2, ``entmax_bisect`` (bisection on tau,
``n_iter`` steps) for any other alpha > 1. Adaptively Sparse Transformers learn alpha per head;
here alpha is a fixed hyperparameter (one value for every head).

Masked pairs (causal, padding) get exactly zero weight: their scores are set to the row's
largest allowed score minus 1 / (alpha - 1) + 1, below the threshold tau >= (alpha - 1) max z - 1
that sum p = 1 forces (finite, so the sort and the bisection see no -inf); a row with no
allowed key gives zeros. Causal and non-causal. Entmax needs every score of its row, so there is
no recurrent form: a decode step is one row over the cache (``decode``). The sparsity is learned
by the model: the method is trained from scratch (``training_free = False``); in a model trained
with softmax, swapping in entmax changes the attention distribution and is not meaningful.
"""
from __future__ import annotations

import math

import torch

from methods import masks
from methods.base import AttentionMethod, Cost, dense_flops, repeat_kv


class Entmax(AttentionMethod):
    name = "entmax"
    # what the README's method table says (python -m analysis.readme)
    paper = "Peters et al. 2019"
    kind = "sparse (alpha-entmax)"
    official_test = None
    trainable = True  # the model learns to use sparse attention (no weights of its own)
    training_free = False
    supports_decode = True  # models decode with entmax itself (one row over the cache)

    def __init__(self, alpha: float = 1.5, n_iter: int = 50, **structural):
        super().__init__(**structural)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 1):
            raise ValueError(f"Entmax: alpha must be a finite number > 1 (1 is softmax: use dense), "
                             f"got {alpha!r}")
        if int(n_iter) != n_iter or n_iter < 1:
            raise ValueError(f"Entmax: n_iter (bisection steps) must be a positive integer, got {n_iter!r}")
        self.alpha, self.n_iter = float(alpha), int(n_iter)

    @property
    def real_kernel(self) -> bool:
        return False  # every score is computed; the zeros of the weights are not skipped

    def normaliser(self, s: torch.Tensor) -> torch.Tensor:
        """alpha-entmax over the last axis (the ``entmax`` package)."""
        import entmax

        if self.alpha == 1.5:
            return entmax.entmax15(s, dim=-1)
        if self.alpha == 2.0:
            return entmax.sparsemax(s, dim=-1)
        return entmax.entmax_bisect(s, alpha=self.alpha, dim=-1, n_iter=self.n_iter)

    def weights(self, q, k, causal, key_padding_mask=None) -> torch.Tensor:
        """p = alpha-entmax(q k^T / sqrt(d)) over the allowed keys: [B, H, Tq, Tk], fp32 (fp64)."""
        B, H, tq, D = q.shape
        tk = k.shape[2]
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        k = repeat_kv(k, H // k.shape[1])
        s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) / math.sqrt(D)
        allowed = masks.attention_mask(B, 1, tq, tk, causal, key_padding_mask, device=q.device)
        if allowed is None:
            return self.normaliser(s)
        top = s.detach().masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows with no key
        s = torch.where(allowed, s, top - 1.0 / (self.alpha - 1.0) - 1.0)
        return self.normaliser(s) * allowed

    def attend(self, q, k, v, causal, key_padding_mask):
        p = self.weights(q, k, causal, key_padding_mask)
        return torch.matmul(p, repeat_kv(v, q.shape[1] // v.shape[1]).to(p.dtype)).to(q.dtype)

    def decode(self, q, k, v) -> torch.Tensor:
        """A decode step: the newest queries over the whole cache (end-aligned, causal)."""
        return self.attend(q, k, v, True, None)

    def cost(self, tq, tk, causal) -> Cost:
        h, d = self.num_heads, self.head_dim
        pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        if self.alpha in (1.5, 2.0):  # sort, then cumulative sums and the threshold
            extra = pairs * (math.log2(max(tk, 2)) + 8.0)
        else:  # bisection: each step evaluates [(alpha-1) z - tau]_+^(1/(alpha-1)) and sums it
            extra = pairs * 4.0 * self.n_iter
        flops = dense_flops(h, d, tq, tk, causal) + h * extra
        return Cost(flops=flops, density=flops / dense_flops(h, d, tq, tk, causal),
                    kv_bytes=2.0 * self.num_kv_heads * tk * d * 2)
