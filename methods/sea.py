"""SEA: sparse attention over the top-k of an attention matrix estimated from compressed keys.

Lee, Kim, Willette and Hwang, "SEA: Sparse Linear Attention with Estimated Attention Mask"
(ICLR 2024, arXiv 2310.01777), Sec. 3 and Fig. 2, in its training-free core:

    K^_c  = mean_{j in block c} k_j                      keys compressed to T / b columns
    A^_ic = phi(q_i) . phi(K^_c) / sum_c' phi(q_i) . phi(K^_c')
                                                         the estimated (compressed) attention, by
                                                         the Performer's kernel (linear cost)
    M_i   = the blocks of the top-k columns of A^_i      the estimated mask, decompressed
    o_i   = sum_{j in M_i} softmax_j(q_i . k_j / sqrt(d)) v_j      exact attention on the mask

phi is ``methods.performer``'s positive random feature map (the Performer instance held here
draws it; SEA's estimator is a Performer too). What is left out: SEA's learned parts (the
CNN decoder that refines A^ and the knowledge distillation that trains it), so this is the
estimator at initialisation; its grouped top-k over several rows is per row here.

Causal (the paper's decoder models, OPT): a block's compressed key is a mean over its keys,
so a block still being written would leak later keys into the estimate; a query chooses
among the blocks wholly at or before it and always keeps its own block (causally masked),
the reading taken here. Non-causal: every block is a candidate. Padded keys leave the block
means and a block of padding only is never chosen. With top_k_blocks >= T / b it is exact.
"""
from __future__ import annotations

import math

import torch

from methods import masks
from methods.base import Cost, SparseMethod, repeat_kv, timed_index
from methods.performer import Performer


class SEA(SparseMethod):
    name = "sea"
    # what the README's method table says (python -m analysis.readme)
    paper = "Lee et al. 2024"
    kind = "sparse (top-k of a linear estimate)"
    official_test = None
    has_index = True  # the estimate and the top-k blocks, under index_timing
    supports_decode = True

    def __init__(self, block_size: int = 16, top_k_blocks: int = 8, num_features: int = 64, feature_seed: int = 0,
                 impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        if block_size < 1 or top_k_blocks < 1:
            raise ValueError(f"SEA: block_size and top_k_blocks must be >= 1, got {block_size}, {top_k_blocks}")
        if num_features < 1:
            raise ValueError(f"SEA: num_features must be >= 1, got {num_features}")
        self.block_size, self.top_k_blocks = block_size, top_k_blocks
        self.estimator = Performer(num_features=num_features, feature_seed=feature_seed, impl="reference",
                                   num_heads=self.num_heads, head_dim=self.head_dim)

    _kpm = None  # the padding of the call in progress (the estimate must see it)

    def estimate(self, q, k, key_padding_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^ [B, H, Tq, nb] the estimated compressed attention, real [B, nb] blocks with a key)."""
        B, H, tq, D = q.shape
        tk, b = k.shape[2], self.block_size
        n = math.ceil(tk / b)
        k = repeat_kv(k, H // k.shape[1])
        w = torch.ones(B, tk, dtype=k.dtype, device=k.device) if key_padding_mask is None else key_padding_mask.to(k.dtype)
        pad = n * b - tk
        ks = torch.nn.functional.pad(k * w[:, None, :, None], (0, 0, 0, pad)).view(B, H, n, b, D).sum(3)
        cnt = torch.nn.functional.pad(w, (0, pad)).view(B, n, b).sum(-1)
        kc = ks / cnt.clamp_min(1)[:, None, :, None]
        fq, fk = self.estimator.features(q, True), self.estimator.features(kc, False)
        a = fq @ fk.transpose(-1, -2)
        return a / a.sum(-1, keepdim=True).clamp_min(1e-30), cnt > 0

    def selected(self, q, k, causal, key_padding_mask=None) -> torch.Tensor:
        """[B, H, Tq, nb] bool: the key blocks each query attends (the index step, timed into
        ``last_index_ms`` under ``methods.base.index_timing(True)``)."""
        with torch.no_grad(), timed_index(self, q):
            a, real = self.estimate(q.detach(), k.detach(), key_padding_mask)
            tq, tk, b = q.shape[2], k.shape[2], self.block_size
            n = a.shape[-1]
            pos = torch.arange(tq, device=q.device).view(-1, 1) + tk - tq
            c = torch.arange(n, device=q.device).view(1, -1)
            cand = real[:, None, None, :].expand_as(a)
            own = (c == pos // b)
            if causal:
                cand = cand & ((c + 1) * b - 1 <= pos)  # whole blocks at or before the query
            a = a.masked_fill(~cand, -1.0)
            top = a.topk(min(self.top_k_blocks, n), dim=-1).indices
            sel = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, top, True) & cand
            return sel | own if causal else sel

    def mask_mod(self, q, k, causal):
        sel, b = self.selected(q, k, causal, self._kpm), self.block_size
        self._sel = sel  # reused by flex_layout (called after mask_mod for the same inputs)

        def sea_mask(bi, h, q_idx, kv_idx):
            return sel[bi, h, q_idx, kv_idx // b]

        return sea_mask

    def flex_layout(self, q, k, causal, block):
        """The selected key blocks of every query row (``mask_mod``'s index) at FlexAttention's
        ``block`` (``flex.coarsen``, rows of one query); None where block_size does not divide it."""
        from methods.kernels import flex

        return flex.coarsen(self._sel, 1, self.block_size, block, q.shape[2], k.shape[2])

    def attend(self, q, k, v, causal, key_padding_mask):
        self._kpm = key_padding_mask
        try:
            return super().attend(q, k, v, causal, key_padding_mask)
        finally:
            self._kpm = self._sel = None  # the index flex_layout reused: not held between calls

    def cost(self, tq, tk, causal) -> Cost:
        b, h, d, m = self.block_size, self.num_heads, self.head_dim, self.estimator.num_features
        n = math.ceil(tk / b)
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        pairs = min(dense_pairs, tq * min(n, self.top_k_blocks + (1 if causal else 0)) * b)
        flops = 4.0 * h * pairs * d + h * (2.0 * (tq + n) * d * m + 2.0 * tq * n * m + tk * d)
        return Cost(flops=flops, density=pairs / dense_pairs, kv_bytes=2.0 * self.num_kv_heads * tk * d * 2)
