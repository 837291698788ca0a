"""BiFormer: bi-level routing attention (region-to-region routing, then token attention).

Zhu, Wang, Ke, Zhang and Lau, "BiFormer: Vision Transformer with Bi-Level Routing Attention"
(CVPR 2023, arXiv 2303.08125), Sec. 3.2, Eqs. 2-6, read on a 1-D sequence: the sequence is cut
into regions of ``region_size`` tokens (a last, shorter one when the length is not a multiple).

    Q^r_a = mean_{i in region a} q_i,  K^r_b = mean_{j in region b} k_j     region queries/keys (Eq. 2)
    A^r   = Q^r (K^r)^T                                                     region affinity (Eq. 3)
    I^r_a = topk_b(A^r_ab)                                                  the routed regions (Eq. 4)
    o_i   = softmax over j in the regions I^r_a (q_i . k_j / sqrt(d)) v_j   token attention (Eqs. 5-6)

The official code (rayleizhu/BiFormer, ``ops/bra_legacy.py``) routes once per region for all
heads together (the affinity of the concatenated channels, i.e. summed over heads), on
detached region features (no gradient through the routing), with hard top-k and no routing
weights: the defaults here (``shared_routing=false`` routes each head on its own). Its local
context enhancement (a depthwise convolution of V added to the output) belongs to the model
block and is left out. Padded keys leave the region means, and a region of padding only is
never routed to. With top-k >= the number of regions it is exact attention.

BiFormer is an encoder (vision) method: non-causal only. A causal reading would route with
region means that include later tokens, leaking the future. The pattern is blockwise (one
region = one tile): ``impl=triton`` runs the block-sparse kernel over the routed regions
(region sizes 16-128, powers of two, Tq == Tk), ``impl=flex`` FlexAttention.
"""
from __future__ import annotations

import math

import torch

from methods.base import Cost, SparseMethod, repeat_kv, timed_index


class BiFormer(SparseMethod):
    name = "biformer"
    # what the README's method table says (python -m analysis.readme)
    paper = "Zhu et al. 2023"
    kind = "sparse (region routing)"
    official_test = None
    has_index = True  # the region routing, under index_timing
    supports_causal = False
    impls = ("reference", "flex", "triton")
    triton_backward = True  # the block-sparse kernel has one

    def __init__(self, region_size: int = 64, topk: int = 4, shared_routing: bool = True,
                 impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        if region_size < 1 or topk < 1:
            raise ValueError(f"BiFormer: region_size and topk must be >= 1, got {region_size}, {topk}")
        self.region_size, self.topk, self.shared_routing = region_size, topk, shared_routing

    def _region_means(self, x, valid=None):
        """[B, H, T, d] -> [B, H, n, d] mean of each region (of the valid tokens), and [B, n] whether
        a region holds any valid token."""
        B, H, T, D = x.shape
        r = self.region_size
        n = math.ceil(T / r)
        w = torch.ones(B, T, dtype=x.dtype, device=x.device) if valid is None else valid.to(x.dtype)
        pad = n * r - T
        xs = torch.nn.functional.pad(x * w[:, None, :, None], (0, 0, 0, pad)).view(B, H, n, r, D).sum(3)
        cnt = torch.nn.functional.pad(w, (0, pad)).view(B, n, r).sum(-1)  # [B, n]
        return xs / cnt.clamp_min(1)[:, None, :, None], cnt > 0

    def layout(self, q, k, key_padding_mask=None) -> torch.Tensor:
        """[B, H, nq, nk] bool: the key regions each query region is routed to (the index step,
        timed into ``last_index_ms`` under ``methods.base.index_timing(True)``)."""
        with torch.no_grad(), timed_index(self, q):
            dt = torch.float64 if q.dtype == torch.float64 else torch.float32
            k = repeat_kv(k, q.shape[1] // k.shape[1])
            qr, _ = self._region_means(q.detach().to(dt))
            kr, real = self._region_means(k.detach().to(dt), key_padding_mask)
            a = qr @ kr.transpose(-1, -2)  # [B, H, nq, nk]
            if self.shared_routing:
                a = a.sum(1, keepdim=True).expand_as(a)
            a = a.masked_fill(~real[:, None, None, :], float("-inf"))
            kk = min(self.topk, a.shape[-1])
            top = a.topk(kk, dim=-1).indices
            lay = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, top, True)
            return lay & real[:, None, None, :]

    _kpm = None  # the padding of the call in progress (the routing must see it)

    def mask_mod(self, q, k, causal):
        lay, r = self.layout(q, k, self._kpm), self.region_size
        self._lay = lay  # reused by flex_layout (called after mask_mod for the same inputs)

        def biformer_mask(b, h, q_idx, kv_idx):
            return lay[b, h, q_idx // r, kv_idx // r]

        return biformer_mask

    def flex_layout(self, q, k, causal, block):
        """The routed regions (the layout ``mask_mod`` built) at FlexAttention's ``block``
        (``flex.coarsen``); None where region_size does not divide it."""
        from methods.kernels import flex

        r = self.region_size
        return flex.coarsen(self._lay, r, r, block, q.shape[2], k.shape[2])

    def attend(self, q, k, v, causal, key_padding_mask):
        self._kpm = key_padding_mask
        try:
            return super().attend(q, k, v, causal, key_padding_mask)
        finally:
            self._kpm = self._lay = None  # the index flex_layout reused: not held between calls

    def triton_attend(self, q, k, v, causal, key_padding_mask):
        from methods.kernels import block_sparse as bsk

        r, T = self.region_size, q.shape[2]
        if r not in (16, 32, 64, 128):
            return None
        lay = self.layout(q, k, key_padding_mask)
        idx, cnt = bsk.layout_to_lists(lay)
        idx, cnt, nin = bsk.inside_first(idx, cnt, block_m=r, block_n=r, causal=False, tq=T, tk=T)
        out = bsk.block_sparse_attention(q, k, v, idx, cnt, nin=nin, block_m=r, block_n=r, causal=False,
                                         key_padding_mask=key_padding_mask)
        return out, bsk.tile_work(cnt, r, r, q.shape[0], q.shape[1])

    def cost(self, tq, tk, causal) -> Cost:
        r, h, d = self.region_size, self.num_heads, self.head_dim
        nq, nk = math.ceil(tq / r), math.ceil(tk / r)
        pairs = min(tq * tk, tq * min(self.topk, nk) * r)
        flops = 4.0 * h * pairs * d + 2.0 * h * nq * nk * d + h * (tq + tk) * d  # tokens, regions, means
        return Cost(flops=flops, density=pairs / (tq * tk), kv_bytes=2.0 * self.num_kv_heads * tk * d * 2)
