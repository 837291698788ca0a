"""ReLA: rectified linear attention, with the gated RMSNorm that stabilises it.

Zhang, Titov and Sennrich, "Sparse Attention with Linear Units" (EMNLP 2021, arXiv 2104.07012),
Sec. 3, Eqs. 4-6:

    s_ij  = q_i . k_j / sqrt(d)                      (d: the head dimension)
    a_ij  = ReLU(s_ij)                               no normalisation over j: exact zeros are sparse
    o_i   = sum_j a_ij v_j                           per head, then the heads concatenated: x [H*d]
    LN(x) = g * x / sqrt(mean(x^2) + eps) * sigmoid(w * x)      gated RMSNorm (ReLA-g)

The official code (bzhangGo/zero, ``modules/rela.py``) is the default: the query is scaled by
d^-1/2, masked scores are set to 0 (so ReLU gives them weight 0), and the gated RMSNorm runs on
the concatenation of all heads' outputs (the model width H*d), with the gain g initialised to
1, the gate w drawn as TensorFlow's default (Glorot uniform of a vector: U(-sqrt(3/n),
sqrt(3/n)), n = H*d) and eps = 1e-8. ``norm=rms`` is the paper's plain RMSNorm variant (no gate),
``norm=none`` the unnormalised ReLU attention (the paper reports that it diverges in training).

Causal and non-causal (the paper's decoder and encoder). ReLU(q k^T) does not factorise, so
there is no recurrent form: a decode step is one row over the cache (``decode``), as in the
official code's cache-based decoding. The gated RMSNorm has weights, and the ReLU scores' scale
is learned by the model: the method is trained from scratch (``training_free = False``); used in
place of softmax in a pretrained model its outputs are not meaningful.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from methods import masks
from methods.base import AttentionInputError, AttentionMethod, Cost, dense_flops, repeat_kv

NORMS = ("gated_rms", "rms", "none")
EPS = 1e-8


class ReLA(AttentionMethod):
    name = "rela"
    # what the README's method table says (python -m analysis.readme)
    paper = "Zhang et al. 2021"
    kind = "sparse (ReLU scores, trainable)"
    official_test = "tests/test_linear_family.py::test_rela_matches_the_official_code"
    trainable = True  # the gated RMSNorm's gain and gate
    training_free = False
    supports_decode = True  # models decode with ReLA itself (one row over the cache)

    def __init__(self, norm: str = "gated_rms", **structural):
        super().__init__(**structural)
        if norm not in NORMS:
            raise ValueError(f"ReLA: norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        width = self.num_heads * self.head_dim
        if norm != "none":
            self.gain = nn.Parameter(torch.ones(width))
        if norm == "gated_rms":
            bound = math.sqrt(3.0 / width)
            self.gate = nn.Parameter(torch.empty(width).uniform_(-bound, bound))

    @property
    def real_kernel(self) -> bool:
        return False  # the reference computes every score (ReLU's zeros are not skipped)

    def check_inputs(self, q, k, v, causal, key_padding_mask) -> None:
        super().check_inputs(q, k, v, causal, key_padding_mask)
        if self.norm != "none" and q.shape[-1] != self.head_dim:
            raise AttentionInputError(
                f"ReLA: built for head_dim={self.head_dim} (its norm has H*d weights), got D={q.shape[-1]}")

    def weights(self, q, k, causal, key_padding_mask=None) -> torch.Tensor:
        """a = ReLU(q k^T / sqrt(d)) with masked pairs 0: [B, H, Tq, Tk], fp32 (fp64 for fp64)."""
        B, H, tq, D = q.shape
        tk = k.shape[2]
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        k = repeat_kv(k, H // k.shape[1])
        s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) / math.sqrt(D)
        allowed = masks.attention_mask(B, 1, tq, tk, causal, key_padding_mask, device=q.device)
        if allowed is not None:
            s = s * allowed  # the official code: masked scores become 0, so ReLU drops them
        return torch.relu(s)

    def normalise(self, o: torch.Tensor) -> torch.Tensor:
        """The (gated) RMSNorm over the concatenated heads: o [B, H, T, d] -> [B, H, T, d]."""
        if self.norm == "none":
            return o
        B, H, T, D = o.shape
        x = o.transpose(1, 2).reshape(B, T, H * D)
        y = self.gain.to(x.dtype) * x * torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS)
        if self.norm == "gated_rms":
            y = y * torch.sigmoid(self.gate.to(x.dtype) * x)
        return y.view(B, T, H, D).transpose(1, 2)

    def attend(self, q, k, v, causal, key_padding_mask):
        a = self.weights(q, k, causal, key_padding_mask)
        o = torch.matmul(a, repeat_kv(v, q.shape[1] // v.shape[1]).to(a.dtype))
        return self.normalise(o).to(q.dtype)

    def decode(self, q, k, v) -> torch.Tensor:
        """A decode step: the newest queries over the whole cache (end-aligned, causal)."""
        return self.attend(q, k, v, True, None)

    def cost(self, tq, tk, causal) -> Cost:
        h, d = self.num_heads, self.head_dim
        pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        flops = dense_flops(h, d, tq, tk, causal) + h * pairs + 6.0 * h * tq * d  # ReLU, norm
        return Cost(flops=flops, density=flops / dense_flops(h, d, tq, tk, causal),
                    kv_bytes=2.0 * self.num_kv_heads * tk * d * 2)
